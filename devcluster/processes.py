"""A small, honest kubelet for our own images: pods whose image is mapped run as local processes.

For each such pod the runtime makes a sandbox (``devcluster.podnet``: a network namespace with the pod IP on the
cluster bridge), materializes its volumes (``devcluster.volumes``), and runs each container's command as a process
in that network namespace and in a private mount + UTS namespace of its own, where every volume is bind-mounted at
its real ``mountPath`` (so ``/var/run/secrets/kubernetes.io/serviceaccount`` works unchanged), ``/etc/hosts`` names
the pod, and the hostname is the pod name. Nothing in args or env is rewritten: the paths are real.

Filesystem rule: a container sees this machine's filesystem with its volumes mounted over it (its own mount
namespace; other processes and containers do not see them). A mountPath therefore hides what the host has there,
for that container only -- except the paths the container runs from (this virtual environment and the project's
source), which stay visible at their own paths even under a volume at /tmp or /root. A missing mount point is
created on the host as an empty folder (or file, for a file subPath) and left there: removing it would detach the
mounts of pods of other clusters on this machine.

What the process gets, as in Kubernetes:
- argv: ``command + args`` when ``command`` is set, else the image's mapped entry point + ``args``; ``$(VAR)``
  references are expanded from the container's environment (``$$`` escapes, unknown references stay as written).
- env: ``envFrom`` then ``env`` (``valueFrom`` secretKeyRef, configMapKeyRef, fieldRef, resourceFieldRef), plus
  ``PATH`` (this virtual environment's ``bin`` first), ``HOSTNAME``, ``HOME=/root``, ``LANG`` and
  ``KUBERNETES_SERVICE_HOST``/``_PORT`` -- nothing else from the host. There is no kube-proxy, so these point at the
  API server itself: the bridge gateway and the API server's real port (its certificate names that address).
  Service environment variables (``<SVC>_SERVICE_HOST``) are not set and there is no cluster DNS: ClusterIPs and
  Service names lead nowhere here. Pods reach each other at pod IPs and the host at the gateway address.
- stdout and stderr go to ``<state dir>/pods/<ns>_<pod>_<uid>/logs/<container>/<restartCount>.log``.

Status is observed, not assumed: container states with reasons and exit codes, ``restartCount``, ``started``,
readiness/liveness/startup probes (``devcluster.probes``), restarts per ``restartPolicy`` with the kubelet's
back-off (0 s, then 10 s doubling to 300 s, reset after 10 minutes of running) shown as ``CrashLoopBackOff``.
Deletion runs the ``preStop`` hook, sends SIGTERM to the container's process group, waits the grace period, then
SIGKILLs whatever is left in the pod's network namespace. Unsupported: ephemeral containers, ``postStart`` hooks,
``securityContext`` (processes run as the agent's user), resource limits (not enforced), ``hostNetwork``.
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
import logging
import math
import os
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from kubernetes import client
from kubernetes.utils import parse_quantity

from devcluster.network import PodNetwork
from devcluster.podnet import PodNetError, PodSandbox
from devcluster.probes import Prober, ProbeTarget, probe_once
from devcluster.runtime import Pod, condition, now_rfc3339
from devcluster.volumes import PodVolumes, SourceReader, VolumeError, downward_value

log = logging.getLogger("devcluster.processes")

VOLUME_SYNC_SECONDS = 1.0
BACKOFF_INITIAL = 10.0
BACKOFF_MAX = 300.0
BACKOFF_RESET_AFTER = 600.0
SHUTDOWN_GRACE_MAX = 5.0
# what the kubelet keeps of a failed container's log as its termination message (FallbackToLogsOnError)
TERMINATION_LOG_BYTES = 2048
TERMINATION_LOG_LINES = 80
NODE_ALLOCATABLE = {"cpu": "64", "memory": "512Gi", "ephemeral-storage": "1Ti"}


class ConfigError(RuntimeError):
    """The container cannot be started as configured yet (a referenced Secret/ConfigMap key is missing)."""


def expand(text: str, env: dict[str, str]) -> str:
    """Kubernetes' `$(VAR)` expansion: known names are replaced, `$$` is a literal `$`, the rest stays."""
    out: list[str] = []
    i = 0
    while i < len(text):
        ch = text[i]
        if ch == "$" and i + 1 < len(text):
            nxt = text[i + 1]
            if nxt == "$":
                out.append("$")
                i += 2
                continue
            if nxt == "(":
                end = text.find(")", i + 2)
                if end != -1:
                    name = text[i + 2:end]
                    out.append(env[name] if name in env else text[i:end + 1])
                    i = end + 1
                    continue
        out.append(ch)
        i += 1
    return "".join(out)


def resource_value(container: dict[str, Any], resource: str, divisor: str | None) -> str:
    """A resourceFieldRef value: the limit (else request for requests.*, else node allocatable), ceil by divisor."""
    kind, _, name = resource.partition(".")
    res = container.get("resources") or {}
    value = (res.get(kind) or {}).get(name) or (res.get("limits") or {}).get(name) or NODE_ALLOCATABLE.get(name)
    if value is None:
        raise ConfigError(f"unsupported resourceFieldRef {resource!r}")
    divide_by = parse_quantity(divisor or "1") or 1  # the API server defaults an unset divisor to "0"
    amount = parse_quantity(value) / divide_by
    return str(math.ceil(amount))


def image_command(image: str, image_commands: dict[str, list[str]]) -> list[str] | None:
    for pattern, argv in image_commands.items():
        if fnmatch.fnmatch(image, pattern):
            return list(argv)
    return None


def _exit_code(returncode: int) -> int:
    return 128 - returncode if returncode < 0 else returncode


def log_tail(path: Path, max_bytes: int = TERMINATION_LOG_BYTES, max_lines: int = TERMINATION_LOG_LINES) -> str:
    """The end of a container's log as the kubelet puts it in the status of a container that failed under
    `terminationMessagePolicy: FallbackToLogsOnError`: the last `max_lines` lines, at most `max_bytes` bytes."""
    try:
        with open(path, "rb") as log_file:
            log_file.seek(max(log_file.seek(0, os.SEEK_END) - max_bytes, 0))
            data = log_file.read()
    except OSError:
        return ""
    return "\n".join(data.decode(errors="replace").split("\n")[-max_lines - 1:]).strip("\n")


def _state(waiting: dict[str, Any] | None = None, running: dict[str, Any] | None = None,
           terminated: dict[str, Any] | None = None) -> dict[str, Any]:
    # Every key is present (null clears a stale one): the agent writes status as a strategic merge patch.
    return {"waiting": waiting, "running": running, "terminated": terminated}


def _terminated(code: int, reason: str, started: str | None, finished: str, container_id: str | None,
                message: str | None = None) -> dict[str, Any]:
    return {"exitCode": code, "signal": None, "reason": reason, "message": message, "startedAt": started,
            "finishedAt": finished, "containerID": container_id}


class ContainerRunner(threading.Thread):
    """Runs one container of a pod: start, probe, restart per restartPolicy, stop on request."""

    def __init__(self, worker: PodWorker, spec: dict[str, Any], init: bool = False) -> None:
        super().__init__(name=f"container-{worker.key}-{spec['name']}", daemon=True)
        self.worker = worker
        self.spec = spec
        self.name = spec["name"]
        self.init = init
        self.argv0 = image_command(spec.get("image", ""), worker.runtime.image_commands)
        # A container whose image has no mapping is simulated even in a process pod (a sidecar we do not own):
        # its command names a program of that image, not of this machine.
        self.simulated = self.argv0 is None
        self.restart_count = 0
        self.state = _state(waiting={"reason": "ContainerCreating", "message": None})
        self.last_state = _state()
        self.started = False
        self.ready = False
        self.container_id: str | None = None
        self.done = False  # terminated for good (no restart will follow)
        self.proc: subprocess.Popen[bytes] | None = None
        self.kill_reason: str | None = None
        self.stopping = threading.Event()
        self.wake = threading.Event()
        self.probers: list[Prober] = []
        self.env: dict[str, str] = {}

    # ------------------------------------------------------------------ status
    def status(self) -> dict[str, Any]:
        return {
            "name": self.name, "image": self.spec.get("image", ""),
            "imageID": f"devcluster-{'simulated' if self.simulated else 'process'}://{self.spec.get('image', '')}",
            "containerID": self.container_id, "ready": self.ready, "started": self.started,
            "restartCount": self.restart_count, "state": dict(self.state), "lastState": dict(self.last_state),
        }

    @property
    def exit_code(self) -> int | None:
        term = self.state.get("terminated")
        return term["exitCode"] if term else None

    # ------------------------------------------------------------------ lifecycle
    def run(self) -> None:
        try:
            self._run()
        except Exception as exc:  # a bug must show in the pod's status, not end a thread silently
            log.exception("container %s/%s failed", self.worker.key, self.name)
            self.state = _state(waiting={"reason": "RunContainerError", "message": f"devcluster: {exc!r}"})
            self.ready = False

    def _run(self) -> None:
        if self.simulated:  # a sidecar image with no mapping: simulated, as on the simulated runtime
            self.state = _state(running={"startedAt": now_rfc3339()})
            self.started = self.ready = True
            self.container_id = f"devcluster-simulated://{self.worker.uid}/{self.name}"
            return
        crashes = 0
        while not self.stopping.is_set():
            try:
                env = self.worker.container_env(self.spec)
            except Exception as exc:  # any unresolvable reference keeps the container waiting, as the kubelet does
                message = f"{exc.status} {exc.reason}" if isinstance(exc, client.ApiException) else str(exc)
                if not isinstance(exc, ConfigError | client.ApiException):
                    message = f"{type(exc).__name__}: {exc}"
                self.state = _state(waiting={"reason": "CreateContainerConfigError", "message": message})
                self.stopping.wait(1)
                continue
            try:
                argv = self._argv(env)
                self.worker.check_mounts(self.spec)
            except ConfigError as exc:
                self.state = _state(waiting={"reason": "CreateContainerConfigError", "message": str(exc)})
                self.stopping.wait(1)
                continue
            ran_from = time.monotonic()
            code, reason = self._run_once(argv, env)
            if self.stopping.is_set():
                return
            ran_for = time.monotonic() - ran_from
            crashes = 1 if ran_for > BACKOFF_RESET_AFTER else crashes + 1
            policy = self.worker.pod["spec"].get("restartPolicy") or "Always"
            restart = policy == "Always" or (policy == "OnFailure" and code != 0)
            if self.init and code == 0:
                self.done = True
                return
            if self.init and policy == "Never":
                self.done = True
                return
            if not restart:
                self.done = True
                return
            delay = 0.0 if crashes <= 1 else min(BACKOFF_MAX, BACKOFF_INITIAL * 2 ** (crashes - 2))
            self.last_state = self.state
            if delay > 0:
                meta = self.worker.pod["metadata"]
                self.state = _state(waiting={
                    "reason": "CrashLoopBackOff",
                    "message": f"back-off {delay:g}s restarting failed container={self.name} "
                               f"pod={meta['name']}_{meta['namespace']}({meta['uid']})"})
                if self.stopping.wait(delay):
                    return
            self.restart_count += 1
            log.info("restarting %s/%s (%s, exit %s, restart %d)", self.worker.key, self.name, reason, code,
                     self.restart_count)

    def _argv(self, env: dict[str, str]) -> list[str]:
        command = self.spec.get("command")
        args = self.spec.get("args") or []
        base = list(command) if command else list(self.argv0 or [])
        if not base:
            raise ConfigError(f"container {self.name} has no command and its image's entry point mapping is empty")
        return [expand(a, env) for a in [*base, *args]]

    def _run_once(self, argv: list[str], env: dict[str, str]) -> tuple[int, str]:
        """Start the process, probe it, wait for its end; (exit code, reason)."""
        self.env = env
        log_path = self.worker.log_path(self.name, self.restart_count)
        log_path.parent.mkdir(parents=True, exist_ok=True)
        launcher = self.worker.launcher(self.spec, env)
        with open(log_path, "ab") as logfile:
            try:
                self.proc = subprocess.Popen([*launcher, *argv], stdout=logfile, stderr=subprocess.STDOUT,
                                             stdin=subprocess.DEVNULL, env=env, start_new_session=True)
            except OSError as exc:
                self.state = _state(waiting={"reason": "RunContainerError", "message": str(exc)})
                self.stopping.wait(5)
                return 128, "StartError"
        started_at = now_rfc3339()
        self.container_id = f"devcluster://{self.worker.uid}/{self.name}/{self.restart_count}"
        self.kill_reason = None
        self.state = _state(running={"startedAt": started_at})
        self.started = "startupProbe" not in self.spec
        self.ready = self.started and "readinessProbe" not in self.spec
        self._start_probers()
        proc = self.proc
        while proc.poll() is None:
            if self.kill_reason is not None or self.stopping.is_set():
                break
            self.wake.wait(0.2)
            self.wake.clear()
        self._stop_probers()
        if proc.poll() is None and not self.stopping.is_set():
            grace = self._liveness_grace()
            self.terminate_process(grace)
        if self.stopping.is_set():
            return 0, "Stopped"
        code = _exit_code(proc.wait())
        self.ready = False
        self.started = False
        reason = "Completed" if code == 0 else "Error"
        message = self.kill_reason
        if message is None and code != 0 and self.spec.get("terminationMessagePolicy") == "FallbackToLogsOnError":
            message = log_tail(log_path) or None  # no termination-log file here: the kubelet's fallback
        self.state = _state(terminated=_terminated(code, reason, started_at, now_rfc3339(), self.container_id,
                                                   message))
        return code, reason

    def _liveness_grace(self) -> float:
        for kind in ("livenessProbe", "startupProbe"):
            grace = (self.spec.get(kind) or {}).get("terminationGracePeriodSeconds")
            if grace is not None:
                return float(grace)
        return float(self.worker.pod["spec"].get("terminationGracePeriodSeconds", 30))

    def _start_probers(self) -> None:
        assert self.proc is not None
        target = ProbeTarget(pod_ip=self.worker.pod_ip, pid=self.proc.pid, env=self.env,
                             ports={p["name"]: int(p["containerPort"]) for p in self.spec.get("ports") or []
                                    if p.get("name")})
        self.probers = []
        startup = self.spec.get("startupProbe")
        if startup:
            self._add_prober("startup", startup, target, self._on_startup)
        elif not self.init:
            self._start_after_startup(target)

    def _start_after_startup(self, target: ProbeTarget) -> None:
        if self.init:
            return
        if self.spec.get("readinessProbe"):
            self._add_prober("readiness", self.spec["readinessProbe"], target, self._on_readiness)
        if self.spec.get("livenessProbe"):
            self._add_prober("liveness", self.spec["livenessProbe"], target, self._on_liveness)

    def _add_prober(self, kind: str, probe: dict[str, Any], target: ProbeTarget, callback: Any) -> None:
        prober = Prober(kind, probe, target, callback, f"{self.worker.key}/{self.name}")
        self.probers.append(prober)
        prober.start()

    def _stop_probers(self) -> None:
        for prober in self.probers:
            prober.stop()
        self.probers = []

    def _on_startup(self, ok: bool, message: str) -> None:
        if ok:
            self.started = True
            self.ready = "readinessProbe" not in self.spec
            self._start_after_startup(self.probers[0].target)
        else:
            self.kill_reason = f"Container {self.name} failed startup probe, will be restarted: {message}"
            self.wake.set()

    def _on_readiness(self, ok: bool, message: str) -> None:
        self.ready = ok and self.started

    def _on_liveness(self, ok: bool, message: str) -> None:
        if not ok:
            self.kill_reason = f"Container {self.name} failed liveness probe, will be restarted: {message}"
            self.wake.set()

    def terminate_process(self, grace: float) -> None:
        """SIGTERM the container's process group, wait `grace` seconds, then SIGKILL it."""
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=max(grace, 0.0))
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=5)

    def stop(self, grace: float) -> None:
        """End the container for good: preStop hook, SIGTERM, grace, SIGKILL."""
        self.stopping.set()
        self.wake.set()
        self._stop_probers()
        proc = self.proc
        if proc is not None and proc.poll() is None:
            started = time.monotonic()
            pre_stop = (self.spec.get("lifecycle") or {}).get("preStop")
            if pre_stop and grace > 0:
                self._run_hook(pre_stop, proc.pid, grace)
            self.terminate_process(max(0.0, grace - (time.monotonic() - started)))
            code = _exit_code(proc.returncode if proc.returncode is not None else -9)
            self.state = _state(terminated=_terminated(code, "Completed" if code == 0 else "Error",
                                                       (self.state.get("running") or {}).get("startedAt"),
                                                       now_rfc3339(), self.container_id))
        self.ready = False
        self.join(timeout=5)

    def _run_hook(self, hook: dict[str, Any], pid: int, grace: float) -> None:
        if "sleep" in hook:
            time.sleep(min(float(hook["sleep"].get("seconds", 0)), grace))
            return
        probe = {**hook, "timeoutSeconds": grace}
        target = ProbeTarget(pod_ip=self.worker.pod_ip, pid=pid, ports={})
        ok, message = probe_once(probe, target)
        if not ok:
            log.warning("preStop hook of %s/%s failed: %s", self.worker.key, self.name, message)


class PodWorker(threading.Thread):
    """Brings one pod up (sandbox, volumes, init containers, containers) and reports its status."""

    def __init__(self, runtime: ProcessRuntime, pod: Pod, pod_ip: str, host_ip: str) -> None:
        meta = pod["metadata"]
        super().__init__(name=f"pod-{meta['namespace']}/{meta['name']}", daemon=True)
        self.runtime = runtime
        self.pod = pod
        self.uid: str = meta["uid"]
        self.key = f"{meta['namespace']}/{meta['name']}"
        self.pod_ip = pod_ip
        self.host_ip = host_ip
        self.dir = runtime.pods_dir / f"{meta['namespace']}_{meta['name']}_{self.uid}"
        self.sandbox = PodSandbox.for_pod(runtime.network, self.uid, pod_ip)
        self.sandbox_ready = False
        self.volumes = PodVolumes(runtime.api, pod, self.dir)
        self.volumes_ready = False
        self.start_time = now_rfc3339()
        self.waiting_message: str | None = None
        self.init_runners = [ContainerRunner(self, c, init=True) for c in pod["spec"].get("initContainers") or []]
        self.runners = [ContainerRunner(self, c) for c in pod["spec"].get("containers") or []]
        self.initialized = not self.init_runners
        self.init_failed = False
        self.stopping = threading.Event()
        self.torn_down = False
        self.lock = threading.Lock()
        self.transitions: dict[str, tuple[bool, str]] = {}

    def log_path(self, container: str, restart: int) -> Path:
        return self.dir / "logs" / container / f"{restart}.log"

    # ------------------------------------------------------------------ bring-up
    def run(self) -> None:
        try:
            self._run()
        except Exception as exc:
            log.exception("pod %s failed", self.key)
            self.waiting_message = f"devcluster: {exc!r}"

    def _run(self) -> None:
        while not self.stopping.is_set() and not self.sandbox_ready:
            if not self.runtime.enabled:
                self.waiting_message = ("devcluster has no pod network (the agent needs root to make network "
                                        "namespaces); process pods cannot start")
                self.stopping.wait(5)
                continue
            try:
                self.dir.mkdir(parents=True, exist_ok=True)
                self.sandbox.create(self.runtime.network)
                self.sandbox_ready = True
                self.waiting_message = None
            except PodNetError as exc:
                self.waiting_message = f"failed to create pod sandbox: {exc}"
                log.warning("%s: %s", self.key, self.waiting_message)
                self.stopping.wait(2)
        while not self.stopping.is_set() and not self.volumes_ready:
            try:
                self.volumes.sync(SourceReader(self.runtime.api), first=True)
                self.volumes_ready = True
                self.waiting_message = None
            except (VolumeError, client.ApiException) as exc:
                self.waiting_message = f"MountVolume.SetUp failed: {exc}"
                self.stopping.wait(1)
        if self.stopping.is_set():
            return
        self._write_hosts()
        for runner in self.init_runners:
            if self.stopping.is_set():
                return
            runner.start()
            runner.join()
            if runner.exit_code != 0:
                self.init_failed = True
                self._teardown()
                return
        self.initialized = True
        for runner in self.runners:
            if not self.stopping.is_set():
                runner.start()
        for runner in self.runners:
            while runner.is_alive() and not self.stopping.is_set():
                runner.join(0.5)
        if not self.stopping.is_set() and all(r.done or r.simulated for r in self.runners):
            self._teardown()  # every container ended for good (restartPolicy Never/OnFailure): free the sandbox

    def _write_hosts(self) -> None:
        meta = self.pod["metadata"]
        lines = ["127.0.0.1\tlocalhost", "::1\tlocalhost ip6-localhost ip6-loopback",
                 f"{self.pod_ip}\t{meta['name']}"]
        for alias in self.pod["spec"].get("hostAliases") or []:
            lines.append(f"{alias['ip']}\t{' '.join(alias.get('hostnames') or [])}")
        (self.dir / "etc-hosts").write_text("\n".join(lines) + "\n")

    def refresh_volumes(self, reader: SourceReader) -> None:
        if self.volumes_ready and not self.torn_down:
            try:
                self.volumes.sync(reader, first=False)
            except Exception:
                log.exception("volume refresh of %s failed", self.key)

    # ------------------------------------------------------------------ what a container gets
    def field_pod(self) -> Pod:
        pod = dict(self.pod)
        pod["status"] = {**(pod.get("status") or {}), "podIP": self.pod_ip, "hostIP": self.host_ip}
        return pod

    def container_env(self, spec: dict[str, Any]) -> dict[str, str]:
        """The container's environment, resolved as the kubelet does (envFrom, then env with $(VAR) expansion)."""
        meta = self.pod["metadata"]
        bin_dir = str(Path(sys.executable).parent)
        env: dict[str, str] = {
            "PATH": f"{bin_dir}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "HOSTNAME": meta["name"], "HOME": "/root", "LANG": "C.UTF-8",
            "KUBERNETES_SERVICE_HOST": self.runtime.network.gateway,
            "KUBERNETES_SERVICE_PORT": str(self.runtime.apiserver_port),
            "KUBERNETES_SERVICE_PORT_HTTPS": str(self.runtime.apiserver_port),
            "KUBERNETES_PORT": f"tcp://{self.runtime.network.gateway}:{self.runtime.apiserver_port}",
        }
        ns = meta["namespace"]
        reader = SourceReader(self.runtime.api)
        for source in spec.get("envFrom") or []:
            prefix = source.get("prefix") or ""
            if "configMapRef" in source:
                ref = source["configMapRef"]
                data = reader.config_map(ns, ref["name"])
                what = f'configmap "{ref["name"]}"'
            else:
                ref = source["secretRef"]
                data = reader.secret(ns, ref["name"])
                what = f'secret "{ref["name"]}"'
            if data is None:
                if ref.get("optional"):
                    continue
                raise ConfigError(f"{what} not found")
            env.update({prefix + k: v.decode(errors="replace") for k, v in data.items()})
        for var in spec.get("env") or []:
            name = var["name"]
            if "valueFrom" not in var:
                env[name] = expand(var.get("value") or "", env)
                continue
            value = self._value_from(var["valueFrom"], spec, reader)
            if value is not None:
                env[name] = value
        return env

    def _value_from(self, source: dict[str, Any], spec: dict[str, Any], reader: SourceReader) -> str | None:
        ns = self.pod["metadata"]["namespace"]
        for kind, read in (("secretKeyRef", reader.secret), ("configMapKeyRef", reader.config_map)):
            if kind in source:
                ref = source[kind]
                data = read(ns, ref["name"])
                label = "secret" if kind == "secretKeyRef" else "configmap"
                if data is None or ref["key"] not in data:
                    if ref.get("optional"):
                        return None
                    if data is None:
                        raise ConfigError(f'{label} "{ref["name"]}" not found')
                    raise ConfigError(f"couldn't find key {ref['key']} in {label} {ns}/{ref['name']}")
                return data[ref["key"]].decode(errors="replace")
        if "fieldRef" in source:
            path = source["fieldRef"]["fieldPath"]
            if path == "status.podIPs":
                return self.pod_ip
            if path == "status.hostIPs":
                return self.host_ip
            try:
                return downward_value(self.field_pod(), path)
            except VolumeError as exc:
                raise ConfigError(str(exc)) from exc
        if "resourceFieldRef" in source:
            ref = source["resourceFieldRef"]
            container = spec
            if ref.get("containerName"):
                container = next((c for c in self.pod["spec"]["containers"] if c["name"] == ref["containerName"]),
                                 spec)
            return resource_value(container, ref["resource"], ref.get("divisor"))
        raise ConfigError(f"unsupported valueFrom {sorted(source)}")

    def check_mounts(self, spec: dict[str, Any]) -> None:
        """Refuse a mountPath that would replace the whole filesystem the entry points run from."""
        for mount in spec.get("volumeMounts") or []:
            if Path(mount["mountPath"]) == Path("/"):
                raise ConfigError(f"volumeMount {mount['name']} at / would hide this machine's filesystem, "
                                  "which devcluster runs the container from; mount it somewhere else")

    def launcher(self, spec: dict[str, Any], env: dict[str, str]) -> list[str]:
        """argv prefix that enters the pod's network namespace and a private mount/UTS namespace, mounts the
        container's volumes at their mountPaths, and execs the container's argv (so the pid is the process's).

        Every mount source, and the paths the container runs from (this virtual environment and the project's
        source for editable installs), is opened as a file descriptor before the first mount and mounted from
        /proc/self/fd: a volume at /tmp or /root (an emptyDir for a read-only root filesystem, say) would otherwise
        hide the host paths of later sources, and of the Python environment, that live under it. `mount` must not
        canonicalize /proc/self/fd/N: it would turn it back into the (by then covered) path.
        """
        script = ["set -e", f"echo {shlex.quote(self.pod['metadata']['name'][:63])} > /proc/sys/kernel/hostname",
                  f"exec 9<{shlex.quote(str(self.dir / 'etc-hosts'))}"]
        mounts = sorted(spec.get("volumeMounts") or [], key=lambda m: len(m["mountPath"].rstrip("/")))
        binds: list[tuple[str, bool, bool]] = []  # (mountPath, is a folder, read-only); its fd is 10 + index
        for mount in mounts:
            src = self.volumes.host_path(mount["name"])
            sub = mount.get("subPath") or (expand(mount["subPathExpr"], env) if mount.get("subPathExpr") else "")
            if sub:
                src = src / sub
                if not src.exists():
                    src.mkdir(parents=True, exist_ok=True)  # the kubelet creates a missing subPath as a folder
            script.append(f"exec {10 + len(binds)}<{shlex.quote(str(src))}")
            binds.append((mount["mountPath"], src.is_dir(), bool(mount.get("readOnly"))))
        for root in hidden_runtime_roots([m["mountPath"] for m in mounts]):
            script.append(f"exec {10 + len(binds)}<{shlex.quote(str(root))}")
            binds.append((str(root), True, False))
        for index, (path, is_dir, read_only) in enumerate(binds):
            dst = shlex.quote(path)
            if is_dir:
                script.append(f"mkdir -p {dst}")
            else:
                script.append(f"[ -e {dst} ] || {{ mkdir -p \"$(dirname {dst})\"; : > {dst}; }}")
            script.append(f"mount --no-canonicalize --bind /proc/self/fd/{10 + index} {dst}")
            if read_only:
                script.append(f"mount -o remount,bind,ro {dst}")
            script.append(f"exec {10 + index}<&-")
        script.append("mount --no-canonicalize --bind /proc/self/fd/9 /etc/hosts")
        script.append("exec 9<&-")
        workdir = spec.get("workingDir")
        if workdir:
            script.append(f"mkdir -p {shlex.quote(workdir)}; cd {shlex.quote(workdir)}")
        else:
            script.append("cd /")
        script.append("unset OLDPWD")
        script.append('exec "$@"')
        # bash, not sh: dash redirects only file descriptors 0-9.
        return [self.runtime.unshare, "--mount", "--uts", "--propagation", "private", "--",
                self.runtime.nsenter, f"--net={self.sandbox.netns_path}", "--",
                "/bin/bash", "-c", "\n".join(script), "bash"]

    # ------------------------------------------------------------------ status
    def _condition(self, kind: str, value: bool, reason: str | None = None) -> dict[str, Any]:
        previous = self.transitions.get(kind)
        if previous is None or previous[0] != value:
            previous = (value, now_rfc3339())
            self.transitions[kind] = previous
        # reason always present (null clears a stale one under the agent's strategic merge patch)
        return {**condition(kind, value, previous[1]), "reason": reason}

    def status(self) -> dict[str, Any]:
        with self.lock:
            return self._status()

    def _status(self) -> dict[str, Any]:
        runners = self.runners
        main_statuses = []
        for runner in runners:
            st = runner.status()
            if not self.initialized or not self.volumes_ready or not self.sandbox_ready:
                reason = "PodInitializing" if self.volumes_ready and self.init_runners else "ContainerCreating"
                st["state"] = _state(waiting={"reason": reason, "message": self.waiting_message})
            main_statuses.append(st)
        init_statuses = [r.status() for r in self.init_runners]
        if self.init_failed:
            phase = "Failed"
        elif not self.initialized:
            phase = "Pending"
        elif runners and all(r.done for r in runners if not r.simulated) and any(not r.simulated for r in runners):
            failed = any(r.exit_code not in (0, None) for r in runners if not r.simulated)
            phase = "Failed" if failed else "Succeeded"
        elif any(r.container_id for r in runners):
            phase = "Running"
        else:
            phase = "Pending"
        containers_ready = bool(runners) and all(r.ready for r in runners) and self.initialized
        gates = [g["conditionType"] for g in self.pod["spec"].get("readinessGates") or []]
        existing = {c["type"]: c.get("status") for c in (self.pod.get("status") or {}).get("conditions") or []}
        pod_ready = containers_ready and all(existing.get(g) == "True" for g in gates)
        not_ready_reason = None if containers_ready else "ContainersNotReady"
        if phase in ("Succeeded", "Failed"):
            not_ready_reason = "PodCompleted"
        status: dict[str, Any] = {
            "phase": phase,
            "hostIP": self.host_ip, "hostIPs": [{"ip": self.host_ip}],
            "startTime": self.start_time,
            "conditions": [
                self._condition("PodReadyToStartContainers", self.sandbox_ready),
                self._condition("Initialized", self.initialized,
                                None if self.initialized else "ContainersNotInitialized"),
                self._condition("ContainersReady", containers_ready, not_ready_reason),
                self._condition("Ready", pod_ready, None if pod_ready else not_ready_reason),
            ],
            "containerStatuses": main_statuses,
        }
        if self.sandbox_ready:
            status["podIP"] = self.pod_ip
            status["podIPs"] = [{"ip": self.pod_ip}]
        if init_statuses:
            status["initContainerStatuses"] = init_statuses
        return status

    # ------------------------------------------------------------------ end
    def terminate(self, grace: float) -> None:
        """Stop every container (in parallel, each with the grace period), then remove the sandbox."""
        self.stopping.set()
        threads = [threading.Thread(target=r.stop, args=(grace,), daemon=True)
                   for r in [*self.init_runners, *self.runners] if r.is_alive() or r.proc is not None]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(grace + 15)
        self._teardown()
        self.join(timeout=5)

    def _teardown(self) -> None:
        with self.lock:
            if self.torn_down:
                return
            self.torn_down = True
        try:
            self.sandbox.delete()
        except Exception:
            log.exception("removing the sandbox of %s failed", self.key)


class ProcessRuntime:
    """The PodRuntime for pods whose image has an entry point mapping (see the module docstring)."""

    def __init__(self, api: client.ApiClient, state_dir: Path, network: PodNetwork,
                 image_commands: dict[str, list[str]], enabled: bool) -> None:
        self.api = api
        self.state_dir = state_dir
        self.pods_dir = state_dir / "pods"
        self.network = network
        self.image_commands = image_commands
        self.enabled = enabled
        self.unshare = shutil.which("unshare") or "/usr/bin/unshare"
        self.nsenter = shutil.which("nsenter") or "/usr/bin/nsenter"
        self.apiserver_port = int(json.loads((state_dir / "state.json").read_text())["apiserver_port"])
        self.workers: dict[str, PodWorker] = {}
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        threading.Thread(target=self._volume_loop, name="volume-sync", daemon=True).start()

    def sync(self, pod: Pod, pod_ip: str, host_ip: str) -> dict[str, Any]:
        uid = pod["metadata"]["uid"]
        with self.lock:
            worker = self.workers.get(uid)
            if worker is None:
                worker = PodWorker(self, pod, pod_ip, host_ip)
                self.workers[uid] = worker
                worker.start()
        # Labels and annotations may change (downward API); the spec of a running pod does not.
        worker.pod = {**worker.pod, "metadata": pod["metadata"], "status": pod.get("status") or {}}
        worker.volumes.pod = worker.pod
        return worker.status()

    def stop(self, pod: Pod, grace_seconds: float) -> None:
        uid = pod["metadata"]["uid"]
        with self.lock:
            worker = self.workers.pop(uid, None)
        if worker is not None:
            self._stop_worker(worker, grace_seconds)
        else:
            PodSandbox.for_pod(self.network, uid, "").delete()

    def retain(self, uids: set[str]) -> None:
        with self.lock:
            gone = [w for uid, w in self.workers.items() if uid not in uids]
            for worker in gone:
                del self.workers[worker.uid]
        for worker in gone:
            log.info("pod %s vanished from the API; stopping its containers", worker.key)
            grace = float(worker.pod["spec"].get("terminationGracePeriodSeconds", 30))
            threading.Thread(target=self._stop_worker, args=(worker, grace), daemon=True).start()

    def _stop_worker(self, worker: PodWorker, grace: float) -> None:
        worker.terminate(grace)
        shutil.rmtree(worker.dir, ignore_errors=True)

    def shutdown(self) -> None:
        self.stopping.set()
        with self.lock:
            workers = list(self.workers.values())
            self.workers.clear()
        threads = []
        for worker in workers:
            grace = min(SHUTDOWN_GRACE_MAX, float(worker.pod["spec"].get("terminationGracePeriodSeconds", 30)))
            threads.append(threading.Thread(target=worker.terminate, args=(grace,), daemon=True))
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(SHUTDOWN_GRACE_MAX + 10)

    def _volume_loop(self) -> None:
        reader = SourceReader(self.api)
        while not self.stopping.wait(VOLUME_SYNC_SECONDS):
            reader.clear()
            with self.lock:
                workers = list(self.workers.values())
            for worker in workers:
                worker.refresh_volumes(reader)


def hidden_runtime_roots(mount_paths: list[str]) -> list[Path]:
    """The paths a mapped container runs from (this virtual environment, its base interpreter, the project's source
    for editable installs) that one of `mount_paths` would hide."""
    roots = sorted({Path(sys.prefix).resolve(), Path(sys.base_prefix).resolve(),
                    Path(__file__).resolve().parent.parent})
    mounts = [Path(m) for m in mount_paths]
    return [root for root in roots if any(m == root or m in root.parents for m in mounts)]
