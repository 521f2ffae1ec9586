"""`make demo`: the whole product on one machine, as a user meets it.

devcluster up → ``helm install`` of the operator chart (the operator pod runs as a local process: devcluster maps
the ``*deepseek-operator*`` image to this environment's ``deepseek-operator``) → a tiny random-weight DeepSeek-style
model → a DeepSeekDeployment and an ApiKey applied with kubectl → Ready → a service proxy to the active Service →
a printed ``curl`` and OpenAI-client example with the key from the Secret, each run once to prove it works.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from devcluster.cluster import ClusterConfig, DevCluster, KubectlError, _alive, named_state_dir
from devcluster.paths import cache_root

REPO = Path(__file__).resolve().parent.parent
CHART = REPO / "charts" / "deepseek-operator"
EXAMPLE = REPO / "examples" / "tiny-model.yaml"
OPERATOR_NAMESPACE = "deepseek-system"


@dataclass
class Demo:
    """What `up` made: where to send requests and with which key (the key is only ever printed to the user)."""

    cluster: DevCluster
    namespace: str
    base_url: str
    api_key: str
    model: str


def _kubectl_json(cluster: DevCluster, *args: str) -> dict:
    return json.loads(cluster.kubectl(*args, "-o", "json").stdout)


def ensure_cluster(name: str, log: Callable[[str], None]) -> DevCluster:
    state_dir = named_state_dir(name)
    if (state_dir / "state.json").exists():
        running = DevCluster.attach(state_dir)
        if running.state and all(_alive(pid) for pid in running.state.pids.values()):
            log(f"[demo] devcluster {name} already running")
            return running
        running.stop()
    cluster = DevCluster(ClusterConfig(name=name), state_dir, keep_state=True, log=log)
    cluster.start()
    return cluster


def ensure_model(log: Callable[[str], None]) -> Path:
    path = cache_root() / "demo-models" / "tiny-deepseek-llm"
    if not (path / "config.json").exists():
        log(f"[demo] writing a tiny random-weight Llama-architecture model to {path}")
        subprocess.run([str(Path(sys.executable).parent / "deepseek-server"), "make-tiny-model", "--arch", "llama",
                        str(path)], check=True)
    return path


def install_chart(cluster: DevCluster, log: Callable[[str], None]) -> None:
    log("[demo] helm upgrade --install deepseek-operator (operator image mapped to a local process)")
    cluster.helm("upgrade", "--install", "deepseek-operator", str(CHART), "--namespace", OPERATOR_NAMESPACE,
                 "--create-namespace", "--set", "image.repository=local/deepseek-operator", "--set", "image.tag=dev",
                 "--set", "operator.logFormat=plain",
                 # The demo's tiny model is mounted from this machine: allow exactly that folder.
                 "--set-json", f"operator.allowedHostPathPrefixes={json.dumps([str(cache_root() / 'demo-models')])}",
                 "--wait", "--timeout", "5m")


def apply_resources(cluster: DevCluster, namespace: str, model_path: Path, log: Callable[[str], None]) -> None:
    created = cluster.kubectl("create", "namespace", namespace, check=False)
    if created.returncode and "AlreadyExists" not in created.stderr:
        raise KubectlError(created.returncode, created.args, created.stdout, created.stderr)
    manifest = EXAMPLE.read_text().replace("/var/lib/deepseek/models/tiny-deepseek-llm", str(model_path))
    log(f"[demo] kubectl apply -n {namespace} -f {EXAMPLE.relative_to(REPO)}")
    cluster.apply(manifest, namespace=namespace)


def wait_ready(cluster: DevCluster, namespace: str, kind: str, name: str, timeout: float,
               log: Callable[[str], None]) -> None:
    log(f"[demo] waiting for {kind}/{name} to be Ready (a first model load takes a while)...")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        obj = _kubectl_json(cluster, "get", kind, name, "-n", namespace)
        conds = {c["type"]: c for c in obj.get("status", {}).get("conditions", [])}
        ready = conds.get("Ready")
        if ready and ready["status"] == "True":
            return
        time.sleep(2)
    message = (ready or {}).get("message", "no Ready condition yet")
    raise RuntimeError(f"{kind}/{name} not Ready after {timeout:.0f}s: {message} "
                       f"(kubectl describe {kind} {name} -n {namespace})")


def start_proxy(cluster: DevCluster, namespace: str, service: str, port: int) -> int:
    pid_file = cluster.state_dir / "demo-proxy.pid"
    if pid_file.exists():
        old = int(pid_file.read_text())
        if _alive(old):
            os.killpg(old, signal.SIGTERM)
    log_file = open(cluster.logs_dir / "demo-proxy.log", "ab")  # noqa: SIM115 - handed to the child
    proc = subprocess.Popen([sys.executable, "-m", "devcluster", "--name", cluster.config.name, "proxy",
                             f"svc/{service}", str(port), "-n", namespace], stdout=log_file,
                            stderr=subprocess.STDOUT, start_new_session=True)
    log_file.close()
    pid_file.write_text(str(proc.pid))
    return proc.pid


def read_key(cluster: DevCluster, namespace: str, secret: str) -> str:
    data = _kubectl_json(cluster, "get", "secret", secret, "-n", namespace)["data"]
    return base64.b64decode(data["OPENAI_API_KEY"]).decode()


def check_example(base_url: str, api_key: str, model: str, timeout: float = 60) -> str:
    """Send the printed request once; return the completion text."""
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": "Hello!"}],
                       "max_tokens": 8}).encode()
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        req = urllib.request.Request(f"{base_url}/chat/completions", data=body, method="POST", headers={
            "Authorization": f"Bearer {api_key}", "Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=30) as resp:
                return json.loads(resp.read())["choices"][0]["message"]["content"]
        except OSError as exc:  # the proxy may still be starting
            last = exc
            time.sleep(1)
    raise RuntimeError(f"the example request failed: {last}")


def up(name: str = "demo", namespace: str = "demo", port: int = 18000,
       log: Callable[[str], None] = lambda m: print(m, file=sys.stderr, flush=True)) -> Demo:
    started = time.monotonic()
    cluster = ensure_cluster(name, log)
    model_path = ensure_model(log)
    install_chart(cluster, log)
    apply_resources(cluster, namespace, model_path, log)
    wait_ready(cluster, namespace, "deepseekdeployments.deepseek.ai", "tiny", 900, log)
    wait_ready(cluster, namespace, "apikeys.deepseek.ai", "demo-user", 120, log)
    start_proxy(cluster, namespace, "tiny", port)
    api_key = read_key(cluster, namespace, "demo-user-apikey")
    base_url = f"http://127.0.0.1:{port}/v1"
    demo = Demo(cluster, namespace, base_url, api_key, "tiny-deepseek")
    answer = check_example(base_url, api_key, demo.model)
    log(f"[demo] ready in {time.monotonic() - started:.0f}s; the example below just answered: {answer!r}")
    return demo


def instructions(demo: Demo) -> str:
    ns = demo.namespace
    return f"""
The tiny DeepSeek-style model is serving behind the active Service, proxied to {demo.base_url}.

  export PATH=$PWD/.venv/bin:$PATH       # kubectl and python from the project's environment
  {demo.cluster.env()}
  kubectl get dsd,ak -n {ns}

  # OPENAI_API_KEY from the key's Secret; OPENAI_BASE_URL the proxy's, not the in-cluster address the Secret has
  eval "$(kubectl deepseek env demo-user -n {ns} --base-url {demo.base_url})"

  curl -s $OPENAI_BASE_URL/chat/completions -H "Authorization: Bearer $OPENAI_API_KEY" \\
       -H 'Content-Type: application/json' \\
       -d '{{"model": "{demo.model}", "messages": [{{"role": "user", "content": "Hello!"}}], "max_tokens": 16}}'

.venv/bin/python - <<'PY'
from openai import OpenAI   # reads OPENAI_API_KEY and OPENAI_BASE_URL
reply = OpenAI().chat.completions.create(
    model="{demo.model}", messages=[{{"role": "user", "content": "Hello!"}}], max_tokens=16)
print(reply.choices[0].message.content)
PY

Roll out a change:  kubectl patch dsd tiny -n {ns} --type merge -p '{{"spec": {{"model": {{"revision": "v2"}}}}}}'
Watch it:           kubectl get dsd tiny -n {ns} -w
Stop everything:    make demo-down
"""


def down(name: str = "demo") -> None:
    state_dir = named_state_dir(name)
    pid_file = state_dir / "demo-proxy.pid"
    if pid_file.exists():
        pid = int(pid_file.read_text())
        if _alive(pid):
            os.killpg(pid, signal.SIGTERM)
    if (state_dir / "state.json").exists():
        cluster = DevCluster.attach(state_dir)
        cluster.keep_state = False
        cluster.stop()
    print(f"demo {name} stopped", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m devcluster.demo")
    parser.add_argument("command", choices=["up", "down"])
    parser.add_argument("--name", default="demo")
    parser.add_argument("--port", type=int, default=18000)
    args = parser.parse_args(argv)
    if args.command == "down":
        down(args.name)
        return 0
    demo = up(args.name, port=args.port)
    print(instructions(demo))
    return 0


if __name__ == "__main__":
    sys.exit(main())
