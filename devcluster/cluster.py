"""DevCluster: etcd, kube-apiserver, kube-controller-manager, kube-scheduler and a node agent as local processes.

Everything lives in one state directory (certificates, etcd data, logs, kubeconfig, ``state.json`` with the pids),
so a cluster started by ``python -m devcluster up`` can be found and stopped by ``down`` from another process, and
``with DevCluster(...) as cluster:`` leaves no process or file behind.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from devcluster import build, pki
from devcluster.network import NetworkError, PodNetwork, bridge_name, pick_pod_cidr, used_ipv4_networks
from devcluster.paths import clusters_root

SERVICE_CIDR = "10.96.0.0/16"


class ClusterError(RuntimeError):
    """The control plane could not start or answer; the message names the component and its log."""


class KubectlError(subprocess.CalledProcessError):
    """A kubectl command that failed; its message ends with what kubectl printed on stderr."""

    def __str__(self) -> str:
        said = (self.stderr or "").strip()
        return f"{super().__str__()}: {said[-2000:]}" if said else super().__str__()


# What the API server answers for a CustomResourceDefinition that is Established but whose kind it does not serve
# yet (its API group is still being registered with the aggregator and discovery): worth another try, unlike a
# rejection by the schema.
NOT_SERVED_YET = ("no matches for kind", "ensure CRDs are installed first",
                  "There can be a delay between when CustomResourceDefinitions are created and when they are available",
                  "the server is currently unable to handle the request",
                  "the server could not find the requested resource")


def not_served_yet(stderr: str) -> bool:
    """Whether a failed kubectl apply failed only because a newly created kind is not served yet."""
    return any(marker in stderr for marker in NOT_SERVED_YET)


# `kubectl wait --for=condition=X` on an object whose status has no conditions yet (a CRD the API server has only
# just stored) fails at once with this instead of waiting.
CONDITIONS_NOT_SET = ".status.conditions accessor error"


def wait_established(kubectl: Callable[..., subprocess.CompletedProcess[str]], crds: list[str],
                     timeout: float) -> None:
    """Wait until the CustomResourceDefinitions `crds` (full names) are Established, by `kubectl(*args)` without
    check; raises KubectlError when kubectl fails otherwise than on conditions not set yet, or past `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        remaining = max(1, round(deadline - time.monotonic()))
        done = kubectl("wait", "--for=condition=Established", f"--timeout={remaining}s", *(f"crd/{c}" for c in crds))
        if not done.returncode:
            return
        if CONDITIONS_NOT_SET not in done.stderr or time.monotonic() > deadline:
            raise KubectlError(done.returncode, done.args, done.stdout, done.stderr)
        time.sleep(0.2)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class ClusterConfig:
    """What to run: node count and GPUs, and which container images run as local processes."""

    name: str = "devcluster"
    nodes: int = 2
    gpus_per_node: int = 8
    gpu_product: str = "NVIDIA-H100-80GB-HBM3"
    # image glob -> command prefix (the container's entrypoint) run as a local process; see devcluster.agent
    image_commands: dict[str, list[str]] = field(default_factory=dict)


@dataclass
class ClusterState:
    """What a running cluster is made of; saved to state.json."""

    name: str
    state_dir: str
    apiserver_port: int
    etcd_port: int
    pod_cidr: str
    bridge: str
    pids: dict[str, int] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    network: bool = False


def default_image_commands() -> dict[str, list[str]]:
    """Our own images map to the entry points of this virtual environment, running the source of the checkout this
    devcluster comes from; vLLM's image to its CPU build."""
    from devcluster.vllm_env import venv_dir  # here: `python -m devcluster.vllm_env` imports this package first

    bin_dir = Path(sys.executable).parent
    # Pods get no environment from this machine, so the virtual environment's editable installs decide what they
    # import, and those may point at another checkout (a git worktree's tests ran the main checkout's operator): the
    # checkout's own source goes first on their PYTHONPATH.
    root = Path(__file__).resolve().parent.parent
    operator_source, server_source = f"PYTHONPATH={root / 'operator'}", f"PYTHONPATH={root / 'server'}"
    return {
        # first: the glob below matches it too. A server whose engine fails after its first answers (tests only).
        "*deepseek-server-flaky*": ["env", f"{server_source}:{root}", sys.executable, "-m", "devcluster.flaky_server"],
        "*deepseek-server*": ["env", server_source, str(bin_dir / "deepseek-server")],
        "*deepseek-operator*": ["env", operator_source, str(bin_dir / "deepseek-operator")],
        # by file path: the test server is stdlib-only and runs whether or not devcluster is installed
        "*devcluster-testserver*": [sys.executable, str(Path(__file__).with_name("testserver.py"))],
        # vLLM's CPU build from its own virtualenv; without it the container fails saying `make vllm-env`
        "*vllm/vllm-openai*": [sys.executable, str(Path(__file__).with_name("vllm_entry.py")),
                               "--vllm-venv", str(venv_dir()), "--"],
    }


def with_own_images(defaults: dict[str, list[str]], mine: dict[str, list[str]]) -> dict[str, list[str]]:
    """`mine` (`--image GLOB=COMMAND`) before `defaults`, since an image takes the first glob it matches: a glob of
    one's own wins over a built-in one that matches the same image, not only over one of the same text (pure)."""
    return {**mine, **{glob: argv for glob, argv in defaults.items() if glob not in mine}}


class DevCluster:
    """A real Kubernetes control plane on this machine. Use as a context manager or call start()/stop()."""

    def __init__(self, config: ClusterConfig | None = None, state_dir: Path | None = None, *,
                 keep_state: bool = False, log: Callable[[str], None] | None = None) -> None:
        self.config = config or ClusterConfig()
        if not self.config.image_commands:
            self.config.image_commands = default_image_commands()
        self._owns_dir = state_dir is None
        self.state_dir = Path(state_dir) if state_dir else Path(tempfile.mkdtemp(prefix="devcluster-"))
        self.keep_state = keep_state
        self.log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
        self.state: ClusterState | None = None

    # ---------------------------------------------------------------- paths
    @property
    def kubeconfig(self) -> Path:
        return self.state_dir / "kubeconfig"

    @property
    def logs_dir(self) -> Path:
        return self.state_dir / "logs"

    @property
    def server_url(self) -> str:
        assert self.state is not None
        return f"https://127.0.0.1:{self.state.apiserver_port}"

    @property
    def network(self) -> PodNetwork:
        assert self.state is not None
        import ipaddress

        return PodNetwork(self.state.bridge, ipaddress.ip_network(self.state.pod_cidr))

    # ---------------------------------------------------------------- factory
    @classmethod
    def from_env(cls) -> DevCluster:
        """The cluster the tests use: settings from DEVCLUSTER_NODES / DEVCLUSTER_GPUS."""
        cfg = ClusterConfig(
            name=f"test-{os.getpid()}",
            nodes=int(os.environ.get("DEVCLUSTER_NODES", "2")),
            gpus_per_node=int(os.environ.get("DEVCLUSTER_GPUS", "8")),
        )
        return cls(cfg)

    @classmethod
    def attach(cls, state_dir: Path) -> DevCluster:
        """A handle on a cluster already running from `state_dir` (started by the CLI)."""
        data = json.loads((state_dir / "state.json").read_text())
        cfg = ClusterConfig(**data["config"])
        cluster = cls(cfg, state_dir, keep_state=True)
        cluster.state = ClusterState(**data)
        return cluster

    def __enter__(self) -> DevCluster:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ---------------------------------------------------------------- lifecycle
    def start(self, timeout: float = 120) -> None:
        """Start every component and wait until the API server is ready and the nodes are Ready."""
        missing = build.missing_binaries()
        if missing:
            self.log(f"[devcluster] building missing binaries: {', '.join(missing)}")
            build.build_all(self.log)
        started = time.monotonic()
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.logs_dir.mkdir(exist_ok=True)
        network = PodNetwork(bridge_name(self.config.name + str(self.state_dir)), pick_pod_cidr(used_ipv4_networks()))
        self.state = ClusterState(
            name=self.config.name, state_dir=str(self.state_dir), apiserver_port=free_port(), etcd_port=free_port(),
            pod_cidr=str(network.cidr), bridge=network.bridge, config=asdict(self.config),
        )
        try:
            try:
                network.create()
                self.state.network = True
            except NetworkError as exc:
                self.log(f"[devcluster] warning: {exc}; pods cannot run as local processes")
            self._write_pki(network)
            self._save()
            self._start_etcd()
            self._start_apiserver(network)
            self._wait_ready(timeout)
            self._write_kubeconfigs()
            self._start_controller_manager()
            self._start_scheduler()
            self._start_agent()
            self._save()
            self._wait_nodes_ready(timeout)
            self._wait_default_service_account(timeout)
        except BaseException:
            self.stop()
            raise
        self.log(f"[devcluster] {self.config.name} ready in {time.monotonic() - started:.1f}s: "
                 f"{self.server_url} (KUBECONFIG={self.kubeconfig})")

    def stop(self) -> None:
        """Stop every process (SIGTERM, then SIGKILL), remove the bridge and, unless kept, the state directory."""
        if self.state is not None:
            # The agent first: it ends the pod processes it started.
            order = ["agent", "kube-scheduler", "kube-controller-manager", "kube-apiserver", "etcd"]
            for name in order:
                pid = self.state.pids.get(name)
                if pid:
                    _terminate_group(pid, grace=15 if name == "agent" else 5)
            self.state.pids.clear()
            if self.state.network:
                # Pods the agent could not end (it was SIGKILLed): every pod netns of this cluster, with whatever
                # still runs inside it, and every veth on the bridge.
                from devcluster import podnet

                for leftover in podnet.sweep(self.network):
                    self.log(f"[devcluster] removed leftover {leftover}")
                self.network.delete()
        if not self.keep_state or self._owns_dir:
            shutil.rmtree(self.state_dir, ignore_errors=True)

    def _save(self) -> None:
        assert self.state is not None
        (self.state_dir / "state.json").write_text(json.dumps(asdict(self.state), indent=2))

    # ---------------------------------------------------------------- components
    def _spawn(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> None:
        assert self.state is not None
        logfile = open(self.logs_dir / f"{name}.log", "ab")  # noqa: SIM115 - handed to the child
        proc = subprocess.Popen(argv, stdout=logfile, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, env=env or os.environ.copy())
        logfile.close()
        self.state.pids[name] = proc.pid

    def _write_pki(self, network: PodNetwork) -> None:
        pki_dir = self.state_dir / "pki"
        pki_dir.mkdir(exist_ok=True)
        now = dt.datetime.now(dt.UTC)
        ca = pki.make_ca(f"devcluster-ca-{self.config.name}", now)
        service_ip = "10.96.0.1"
        serving = pki.issue_cert(ca, "kube-apiserver", now, server=True,
                                 dns_names=("localhost", "kubernetes", "kubernetes.default", "kubernetes.default.svc",
                                            "kubernetes.default.svc.cluster.local"),
                                 ip_addresses=("127.0.0.1", network.gateway, service_ip))
        clients = {
            "admin": pki.issue_cert(ca, "devcluster-admin", now, organizations=("system:masters",)),
            "controller-manager": pki.issue_cert(ca, "system:kube-controller-manager", now),
            "scheduler": pki.issue_cert(ca, "system:kube-scheduler", now),
            "agent": pki.issue_cert(ca, "system:devcluster-agent", now, organizations=("system:masters",)),
        }
        sa_key, sa_pub = pki.make_service_account_keypair()
        _write(pki_dir / "ca.crt", ca.cert_pem)
        _write(pki_dir / "ca.key", ca.key_pem, private=True)
        _write(pki_dir / "apiserver.crt", serving.cert_pem)
        _write(pki_dir / "apiserver.key", serving.key_pem, private=True)
        for name, pair in clients.items():
            _write(pki_dir / f"{name}.crt", pair.cert_pem)
            _write(pki_dir / f"{name}.key", pair.key_pem, private=True)
        _write(pki_dir / "sa.key", sa_key, private=True)
        _write(pki_dir / "sa.pub", sa_pub)

    def _start_etcd(self) -> None:
        assert self.state is not None
        peer = free_port()
        url = f"http://127.0.0.1:{self.state.etcd_port}"
        self._spawn("etcd", [
            str(build.binary("etcd")), "--name", "devcluster", "--data-dir", str(self.state_dir / "etcd"),
            "--listen-client-urls", url, "--advertise-client-urls", url,
            "--listen-peer-urls", f"http://127.0.0.1:{peer}", "--initial-advertise-peer-urls",
            f"http://127.0.0.1:{peer}", "--initial-cluster", f"devcluster=http://127.0.0.1:{peer}",
            "--listen-metrics-urls", f"http://127.0.0.1:{free_port()}",
            "--unsafe-no-fsync", "--quota-backend-bytes", str(4 * 1024**3), "--log-level", "warn",
        ])

    def _start_apiserver(self, network: PodNetwork) -> None:
        assert self.state is not None
        pki_dir = self.state_dir / "pki"
        self._spawn("kube-apiserver", [
            str(build.binary("kube-apiserver")),
            f"--etcd-servers=http://127.0.0.1:{self.state.etcd_port}",
            # 0.0.0.0 so that pods in their own network namespaces reach it through the bridge's gateway.
            "--bind-address=0.0.0.0", f"--secure-port={self.state.apiserver_port}",
            f"--advertise-address={network.gateway}",
            f"--tls-cert-file={pki_dir / 'apiserver.crt'}", f"--tls-private-key-file={pki_dir / 'apiserver.key'}",
            f"--client-ca-file={pki_dir / 'ca.crt'}",
            f"--service-account-key-file={pki_dir / 'sa.pub'}",
            f"--service-account-signing-key-file={pki_dir / 'sa.key'}",
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
            "--api-audiences=https://kubernetes.default.svc.cluster.local",
            "--authorization-mode=Node,RBAC", f"--service-cluster-ip-range={SERVICE_CIDR}",
            "--allow-privileged=true", f"--cert-dir={pki_dir}", "--profiling=false",
            "--enable-priority-and-fairness=false", "--v=0",
        ])

    def _kubeconfig(self, user: str) -> dict[str, Any]:
        pki_dir = self.state_dir / "pki"
        return {
            "apiVersion": "v1", "kind": "Config", "current-context": self.config.name,
            "clusters": [{"name": self.config.name, "cluster": {
                "server": self.server_url, "certificate-authority": str(pki_dir / "ca.crt")}}],
            "users": [{"name": user, "user": {"client-certificate": str(pki_dir / f"{user}.crt"),
                                              "client-key": str(pki_dir / f"{user}.key")}}],
            "contexts": [{"name": self.config.name, "context": {"cluster": self.config.name, "user": user}}],
        }

    def _write_kubeconfigs(self) -> None:
        _write(self.kubeconfig, yaml.safe_dump(self._kubeconfig("admin")).encode(), private=True)
        for user in ("controller-manager", "scheduler", "agent"):
            _write(self.state_dir / f"{user}.kubeconfig", yaml.safe_dump(self._kubeconfig(user)).encode(),
                   private=True)

    def _start_controller_manager(self) -> None:
        assert self.state is not None
        pki_dir = self.state_dir / "pki"
        kc = self.state_dir / "controller-manager.kubeconfig"
        self._spawn("kube-controller-manager", [
            str(build.binary("kube-controller-manager")), f"--kubeconfig={kc}",
            f"--authentication-kubeconfig={kc}", f"--authorization-kubeconfig={kc}",
            "--bind-address=127.0.0.1", f"--secure-port={free_port()}", "--leader-elect=false",
            f"--service-account-private-key-file={pki_dir / 'sa.key'}", f"--root-ca-file={pki_dir / 'ca.crt'}",
            f"--cluster-signing-cert-file={pki_dir / 'ca.crt'}", f"--cluster-signing-key-file={pki_dir / 'ca.key'}",
            "--use-service-account-credentials=true", "--allocate-node-cidrs=false",
            "--controllers=*,-node-ipam-controller,-persistentvolume-attach-detach-controller",
            f"--service-cluster-ip-range={SERVICE_CIDR}", "--concurrent-deployment-syncs=10",
            "--concurrent-replicaset-syncs=10", "--concurrent-gc-syncs=10", "--v=0",
        ])

    def _start_scheduler(self) -> None:
        kc = self.state_dir / "scheduler.kubeconfig"
        self._spawn("kube-scheduler", [
            str(build.binary("kube-scheduler")), f"--kubeconfig={kc}", f"--authentication-kubeconfig={kc}",
            f"--authorization-kubeconfig={kc}", "--bind-address=127.0.0.1", f"--secure-port={free_port()}",
            "--leader-elect=false", "--v=0",
        ])

    def _start_agent(self) -> None:
        env = os.environ.copy()
        env["PYTHONUNBUFFERED"] = "1"
        self._spawn("agent", [sys.executable, "-m", "devcluster.agent", "--state-dir", str(self.state_dir)], env)

    # ---------------------------------------------------------------- readiness
    def _ssl_context(self) -> ssl.SSLContext:
        pki_dir = self.state_dir / "pki"
        ctx = ssl.create_default_context(cafile=str(pki_dir / "ca.crt"))
        ctx.load_cert_chain(str(pki_dir / "admin.crt"), str(pki_dir / "admin.key"))
        return ctx

    def get(self, path: str, timeout: float = 5) -> tuple[int, str]:
        """GET a path on the API server as the admin user: (status, body)."""
        req = urllib.request.Request(self.server_url + path)
        try:
            with urllib.request.urlopen(req, context=self._ssl_context(), timeout=timeout) as resp:
                return resp.status, resp.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode(errors="replace")

    def _check_alive(self) -> None:
        assert self.state is not None
        for name, pid in self.state.pids.items():
            if not _alive(pid):
                tail = _tail(self.logs_dir / f"{name}.log")
                raise ClusterError(f"{name} exited during start-up; last lines of its log:\n{tail}")

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            self._check_alive()
            try:
                status, body = self.get("/readyz", timeout=2)
                if status == 200:
                    return
                last = body[-500:]
            except OSError as exc:
                last = str(exc)
            time.sleep(0.25)
        raise ClusterError(f"kube-apiserver not ready within {timeout:.0f}s: {last}")

    def _wait_nodes_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._check_alive()
            status, body = self.get("/api/v1/nodes")
            if status == 200:
                items = json.loads(body)["items"]
                ready = [n for n in items if any(c["type"] == "Ready" and c["status"] == "True"
                                                 for c in n.get("status", {}).get("conditions", []))]
                if len(ready) >= self.config.nodes:
                    return
            time.sleep(0.25)
        raise ClusterError(f"nodes not Ready within {timeout:.0f}s; see {self.logs_dir / 'agent.log'}")

    def _wait_default_service_account(self, timeout: float) -> None:
        # Pods cannot be created in a namespace before its `default` ServiceAccount exists.
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._check_alive()
            if self.get("/api/v1/namespaces/default/serviceaccounts/default")[0] == 200:
                return
            time.sleep(0.25)
        raise ClusterError("the controller-manager did not create the default ServiceAccount; "
                           f"see {self.logs_dir / 'kube-controller-manager.log'}")

    # ---------------------------------------------------------------- clients
    def api_client(self) -> Any:
        """A kubernetes.client.ApiClient for the admin user."""
        from kubernetes import client, config

        cfg = client.Configuration()
        config.load_kube_config(config_file=str(self.kubeconfig), client_configuration=cfg)
        return client.ApiClient(cfg)

    def kubectl(self, *args: str, input: str | None = None, check: bool = True,
                timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """Run kubectl against this cluster."""
        env = dict(os.environ, KUBECONFIG=str(self.kubeconfig))
        done = subprocess.run([str(build.binary("kubectl")), *args], input=input, capture_output=True, text=True,
                              env=env, timeout=timeout)
        if check and done.returncode:
            raise KubectlError(done.returncode, done.args, done.stdout, done.stderr)
        return done

    def apply(self, manifest: str, namespace: str | None = None, timeout: float = 60) -> None:
        """``kubectl apply`` a manifest, trying again while its kinds are not served yet (a chart or CRD just
        installed); any other failure, and this one past ``timeout``, raises KubectlError."""
        args = ["apply", *(["-n", namespace] if namespace else []), "-f", "-"]
        deadline = time.monotonic() + timeout
        while True:
            done = self.kubectl(*args, input=manifest, check=False)
            if not done.returncode:
                return
            if not not_served_yet(done.stderr) or time.monotonic() > deadline:
                raise KubectlError(done.returncode, done.args, done.stdout, done.stderr)
            time.sleep(1)

    def wait_established(self, *crds: str, timeout: float = 60) -> None:
        """Wait until these CustomResourceDefinitions (full names) are Established (see `wait_established`)."""
        wait_established(lambda *args: self.kubectl(*args, check=False), list(crds), timeout)

    def helm(self, *args: str, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        """Run helm against this cluster (its state kept in the cluster's state directory)."""
        env = dict(os.environ, KUBECONFIG=str(self.kubeconfig), HELM_CACHE_HOME=str(self.state_dir / "helm-cache"),
                   HELM_CONFIG_HOME=str(self.state_dir / "helm-config"),
                   HELM_DATA_HOME=str(self.state_dir / "helm-data"))
        return subprocess.run([str(build.binary("helm")), *args], capture_output=True, text=True, env=env,
                              check=check, timeout=timeout)

    def env(self) -> str:
        return f"export KUBECONFIG={self.kubeconfig}"


def named_state_dir(name: str) -> Path:
    return clusters_root() / name


def _write(path: Path, data: bytes, private: bool = False) -> None:
    path.write_bytes(data)
    if private:
        path.chmod(0o600)


def _alive(pid: int) -> bool:
    try:
        waited, _ = os.waitpid(pid, os.WNOHANG)
        if waited == pid:
            return False
    except ChildProcessError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split()[2] != "Z"
    except OSError:
        return False


def _terminate_group(pid: int, grace: float) -> None:
    """SIGTERM a process group, wait up to `grace` seconds, then SIGKILL what is left."""
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and _alive(pid):
        time.sleep(0.05)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, 0)


def _tail(path: Path, lines: int = 25) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"
