"""The blue-green world shared by the e2e tests and bench/rollout.py: the operator as a subprocess, a namespace
handle, and a client that sends requests through the active Service the whole time.

The servers run as real local processes (devcluster's process runtime maps `*deepseek-server*` images to this
venv's `deepseek-server`); traffic reaches them through `devcluster.proxy.ServiceProxy`, which follows the active
Service's ready endpoints like kube-proxy would.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import tempfile
import threading
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
from kubernetes import client

from devcluster.testing import polling
from devcluster.testing.crds import install_crds
from devcluster.testing.processes import stop_process

REPO = Path(__file__).resolve().parents[2]
GROUP, VERSION, PLURAL = "deepseek.ai", "v1alpha1", "deepseekdeployments"
SERVER_IMAGE = "deepseek-server:e2e"
MODEL_NAME = "tiny-chat"
# An annotation the operator ignores, set by `World.reconciled` to learn when a reconcile has run to its end.
BARRIER_ANNOTATION = "e2e.deepseek.ai/barrier"

# Fast polling so rollouts take seconds; production defaults are seconds to minutes.
E2E_OPERATOR_ENV = {
    "DEEPSEEK_OPERATOR_DRIFT_CHECK_INTERVAL": "2s",
    "DEEPSEEK_OPERATOR_ISSUER_CHECK_INTERVAL": "5s",
    "DEEPSEEK_OPERATOR_RETRY_INTERVAL": "1s",
    "DEEPSEEK_OPERATOR_ROLLOUT_PROGRESSING_INTERVAL": "1s",
    "DEEPSEEK_OPERATOR_ROLLOUT_STABLE_INTERVAL": "3s",
    # The tiny models are made under the temporary directory and mounted by hostPath.
    "DEEPSEEK_OPERATOR_ALLOWED_HOST_PATH_PREFIXES": tempfile.gettempdir(),
}


def wait_for(what: str, check: Callable[[], Any], timeout: float = 60,
             interval: float = 0.25) -> Any:
    return polling.wait_for(what, check, timeout, interval)


class OperatorProcess:
    """`python -m deepseek_operator --all-namespaces` with its log in a file; SIGKILL-able at failpoints."""

    def __init__(self, kubeconfig: str, env: dict[str, str]) -> None:
        self.kubeconfig = kubeconfig
        self.env = env
        self.proc: subprocess.Popen[bytes] | None = None
        self.failpoint: str | None = None
        self.log_path = Path(tempfile.mkstemp(prefix="deepseek-operator-e2e-", suffix=".log")[1])

    def start(self, failpoint: str | None = None) -> None:
        assert self.proc is None or self.proc.poll() is not None, "operator already running"
        env = {**os.environ, "KUBECONFIG": self.kubeconfig, **self.env}
        env.pop("DEEPSEEK_OPERATOR_FAILPOINT", None)
        self.failpoint = failpoint
        if failpoint:
            env["DEEPSEEK_OPERATOR_FAILPOINT"] = failpoint
        with self.log_path.open("ab") as log:
            log.write(f"---- start failpoint={failpoint}\n".encode())
            log.flush()
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "deepseek_operator", "--all-namespaces", "--liveness", "none",
                 "--log-format", "plain"], env=env, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)

    def stop(self) -> None:
        stop_process(self.proc)

    def wait_exit(self, timeout: float) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    def ensure_plain(self) -> None:
        """Running, and without a failpoint (a failed test may have left it dead or armed)."""
        if self.running and self.failpoint:
            self.stop()
        if not self.running:
            self.start()

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, lines: int = 60) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])


class World:
    """What a test does to and reads from one namespace."""

    def __init__(self, api_client: client.ApiClient, namespace: str, model: Path) -> None:
        self.api_client = api_client
        self.namespace = namespace
        self.model = model
        self.core = client.CoreV1Api(api_client)
        self.apps = client.AppsV1Api(api_client)
        self.custom = client.CustomObjectsApi(api_client)

    def spec(self, **overrides: Any) -> dict[str, Any]:
        spec: dict[str, Any] = {
            "model": {"name": MODEL_NAME, "revision": "v1", "source": {"hostPath": {"path": str(self.model)}}},
            "image": SERVER_IMAGE,
            "replicas": 1,
            "resources": {"gpus": 1},
            "server": {"precision": "fp32", "maxNewTokens": 16, "maxBatchSize": 4},
            "rateLimit": {"requestsPerSecond": 1000, "burst": 1000},
            "rollout": {"progressDeadlineSeconds": 180, "scaleDownDelaySeconds": 600,
                        "analysis": {"requests": 2, "windowSeconds": 3, "maxLatencyMs": 20000}},
        }
        spec.update(overrides)
        return spec

    def create(self, name: str = "chat", **overrides: Any) -> dict[str, Any]:
        body = {"apiVersion": f"{GROUP}/{VERSION}", "kind": "DeepSeekDeployment", "metadata": {"name": name},
                "spec": self.spec(**overrides)}
        return self.custom.create_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL, body)

    def get(self, name: str = "chat") -> dict[str, Any]:
        return self.custom.get_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL, name)

    def patch(self, body: dict[str, Any], name: str = "chat") -> dict[str, Any]:
        return self.custom.patch_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL, name, body)

    def annotate(self, key: str, value: str | None, name: str = "chat") -> None:
        self.patch({"metadata": {"annotations": {key: value}}}, name)

    def status(self, name: str = "chat") -> dict[str, Any]:
        return self.get(name).get("status") or {}

    def condition(self, type_: str, name: str = "chat") -> dict[str, Any]:
        return next((c for c in self.status(name).get("conditions") or [] if c["type"] == type_), {})

    def reconciled(self, name: str = "chat", timeout: float = 120) -> None:
        """Return once the operator has finished a reconcile of `name` that began after this call.

        It changes an annotation the operator ignores and waits for kopf's record of the last handled
        configuration (written only after the handler succeeded) to hold it. Events of one object are handled in
        order, so whatever was done to the object before this call has been handled too: a check that something
        did NOT happen is meaningful after it, unlike after a fixed sleep.
        """
        marker = uuid.uuid4().hex
        self.annotate(BARRIER_ANNOTATION, marker, name)

        def handled() -> bool:
            annotations = self.get(name)["metadata"].get("annotations") or {}
            for key, value in annotations.items():
                if key.endswith("last-handled-configuration"):
                    essence = json.loads(value)
                    if (essence.get("metadata", {}).get("annotations") or {}).get(BARRIER_ANNOTATION) == marker:
                        return True
            return False

        wait_for(f"a reconcile of {name} after barrier {marker}", handled, timeout)

    def wait_phase(self, phase: str, *, revision: str | None = None, name: str = "chat",
                   timeout: float = 180) -> dict[str, Any]:
        def reached() -> dict[str, Any] | None:
            status = self.status(name)
            rollout = status.get("rollout") or {}
            if rollout.get("phase") == phase and (revision is None or rollout.get("revision") == revision):
                return status
            return None
        return wait_for(f"rollout phase {phase} (revision {revision})", reached, timeout)

    def events(self, reason: str, name: str = "chat") -> list[client.CoreV1Event]:
        return [e for e in self.core.list_namespaced_event(self.namespace).items
                if e.involved_object.name == name and e.reason == reason]

    def wait_event(self, reason: str, name: str = "chat", timeout: float = 30) -> list[client.CoreV1Event]:
        """The Events with `reason` once there is one: the operator records some of them after the status write
        they explain, so a test that has just seen that status waits for them."""
        return wait_for(f"a {reason} Event on {name}", lambda: self.events(reason, name), timeout)

    def create_apikey(self, name: str = "alice", deployment: str = "chat", **spec: Any) -> str:
        """An ApiKey (scope model:predict unless `spec` says otherwise); its token once the Secret holds it."""
        body = {"apiVersion": f"{GROUP}/{VERSION}", "kind": "ApiKey", "metadata": {"name": name},
                "spec": {"deploymentRef": {"name": deployment}, "subject": name, "environment": "dev",
                         "scopes": ["model:predict"], **spec}}
        self.custom.create_namespaced_custom_object(GROUP, VERSION, self.namespace, "apikeys", body)

        def token() -> str | None:
            try:
                secret = self.core.read_namespaced_secret(f"{name}-apikey", self.namespace)
            except client.ApiException:
                return None
            data = secret.data or {}
            return base64.b64decode(data["api-key"]).decode() if "api-key" in data else None
        return str(wait_for(f"ApiKey {name}'s Secret", token, 60))


@contextmanager
def bench_world(namespace: str, prefix: str, operator_env: dict[str, str] | None = None
                ) -> Iterator[tuple[World, OperatorProcess]]:
    """What a script on devcluster starts from: a devcluster of its own with the CRDs, `namespace`, a tiny Llama and
    the operator running (E2E_OPERATOR_ENV plus `operator_env`); everything is stopped on leaving."""
    from devcluster import DevCluster

    polling.exit_on_sigterm()
    workdir = Path(tempfile.mkdtemp(prefix=prefix))
    os.chmod(workdir, 0o755)  # the servers run as another user and read the model through it
    model = workdir / "tiny"
    subprocess.run([sys.executable, "-m", "deepseek_server", "make-tiny-model", "--arch", "llama", str(model)],
                   check=True, capture_output=True)
    with DevCluster.from_env() as cluster:
        kubeconfig = str(cluster.kubeconfig)
        install_crds(kubeconfig)
        api = cluster.api_client()
        client.CoreV1Api(api).create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=namespace)))
        operator = OperatorProcess(kubeconfig, {**E2E_OPERATOR_ENV, **(operator_env or {})})
        operator.start()
        try:
            yield World(api, namespace, model), operator
        finally:
            operator.stop()


class ContinuousClient:
    """Sends chat completions through a URL one after another, each on a new connection, and counts failures;
    `stream=True` streams each one (an error event after the 200 counts as a failure, as the openai client raises)."""

    def __init__(self, base_url: str, token: str, stream: bool = False) -> None:
        self.base_url = base_url
        self.token = token
        self.stream = stream
        self.ok = 0
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="continuous-client", daemon=True)

    def _run(self) -> None:
        import openai

        while not self._stop.is_set():
            http = httpx.Client(limits=httpx.Limits(max_keepalive_connections=0), timeout=30, trust_env=False)
            api = openai.OpenAI(base_url=self.base_url, api_key=self.token, http_client=http, max_retries=0)
            request: dict[str, Any] = {"model": MODEL_NAME, "max_tokens": 4, "temperature": 0.7,
                                       "messages": [{"role": "user", "content": "hello"}]}
            try:
                if self.stream:
                    finished = [chunk.choices[0].finish_reason
                                for chunk in api.chat.completions.create(**request, stream=True) if chunk.choices]
                    answered = bool(finished) and finished[-1] is not None
                else:
                    answered = bool(api.chat.completions.create(**request).choices)
                if answered:
                    self.ok += 1
                else:
                    self.failures.append("no choices" if not self.stream else "a stream without its finish_reason")
            except Exception as exc:  # every failure counts, whatever its type
                self.failures.append(f"{type(exc).__name__}: {exc}"[:300])
            finally:
                http.close()
            self._stop.wait(0.2)

    def __enter__(self) -> ContinuousClient:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(40)
