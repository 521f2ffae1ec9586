"""`python -m deepseek_operator` / `deepseek-operator`: run the operator in-process with kopf; `deepseek-operator
uninstall-cleanup` empties the CRDs before the chart's `helm uninstall` deletes them (uninstall_cleanup.py)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import enum
import logging
import signal
import sys
import threading
import time
import traceback
from collections.abc import Iterator, Sequence
from dataclasses import replace
from typing import Any

import httpx
import kopf

from . import uninstall_cleanup
from .apikey_reconciler import release_keys_of_deleted_deployments
from .auth_store import AuthConfigStore
from .durations import parse_duration
from .handlers import build_registry
from .kopf_settings import build_kopf_settings
from .kube import APIKEYS, DEEPSEEKDEPLOYMENTS, KubeApi, KubeError, load_connection
from .leader_election import LeaderElector, StandbyLiveness, default_identity, exit_now
from .runtime import OperatorRuntime
from .settings import OperatorSettings, settings_from_env
from .signing_key_store import SigningKeyStore

log = logging.getLogger("deepseek_operator")
CRD_CHECK_EVERY = 2.0  # seconds between looks for the CRDs while they are not served
CRD_LOG_EVERY = 60.0  # seconds between the log lines that say the operator still waits for them
CRD_WATCH_EVERY = 5.0  # seconds between looks for the CRDs while the operator reconciles
KOPF_STOP_GRACE = 10.0  # seconds kopf gets to stop (SIGTERM, or its CRDs gone); it waits 5 s for its own handlers
# Seconds the reconciles still running once kopf has stopped (a rollout's verification, a key's issuance) get to
# finish after SIGTERM, their API client closed (requests already sent are answered, no new one goes out); past
# that the process ends without them (each step is safe to cut, as in a crash). Both graces together stay well
# inside a pod's default terminationGracePeriodSeconds (30 s).
WORKER_STOP_GRACE = 5.0
TIDY_EVERY = 10.0  # seconds between clean-ups after deployments gone with their CRD (_tidy_without_deployments)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="deepseek-operator",
        description="Serve DeepSeek models on Kubernetes and issue their API keys. Every option also reads "
                    "DEEPSEEK_OPERATOR_<OPTION> (e.g. DEEPSEEK_OPERATOR_NAMESPACES=a,b).",
        epilog=f"`deepseek-operator {uninstall_cleanup.COMMAND} --help`: delete every ApiKey and DeepSeekDeployment "
               "and wait until this operator has finalized them (before `helm uninstall` deletes the CRDs).",
    )
    scope = parser.add_mutually_exclusive_group()
    scope.add_argument("--namespace", "-n", action="append", dest="namespaces", metavar="NS",
                       help="watch this namespace (repeatable)")
    scope.add_argument("--all-namespaces", "-A", action="store_true", default=None, help="watch every namespace")
    parser.add_argument("--liveness", dest="liveness_endpoint", metavar="URL",
                        help="liveness endpoint (default http://0.0.0.0:8080/healthz; 'none' disables it)")
    parser.add_argument("--log-format", choices=["json", "plain"])
    parser.add_argument("--verbose", "-v", action="store_true", default=None)
    parser.add_argument("--workers", type=int, help="size of each reconcile worker pool (default 16)")
    parser.add_argument("--kubeconfig",
                        help="kubeconfig file (default $KUBECONFIG, else ~/.kube/config, else in-cluster)")
    for option in ("signing-key-rotation", "signing-key-propagation", "signing-key-retire-margin",
                   "drift-check-interval", "issuer-check-interval", "retry-interval"):
        parser.add_argument(f"--{option}", type=parse_duration, metavar="DURATION")
    parser.add_argument("--signing-key-namespace", metavar="NS",
                        help="where the private signing keys are kept (default: the pod's own namespace; outside "
                             "a cluster 'deepseek-operator', created if missing)")
    election = parser.add_argument_group("leader election (run several replicas; only the Lease holder acts)")
    election.add_argument("--leader-election", action=argparse.BooleanOptionalAction, default=None,
                          help="take part in leader election (default off)")
    election.add_argument("--leader-election-namespace", metavar="NS",
                          help="namespace of the Lease (default: the pod's own)")
    election.add_argument("--leader-election-lease-name", metavar="NAME",
                          help="name of the Lease (default deepseek-operator)")
    for option, default in (("lease-duration", "15s"), ("renew-deadline", "10s"), ("retry-period", "2s")):
        election.add_argument(f"--leader-election-{option}", type=parse_duration, metavar="DURATION",
                              help=f"default {default}")
    return parser


def settings_from_args(args: argparse.Namespace, base: OperatorSettings) -> OperatorSettings:
    changes: dict[str, Any] = {k: v for k, v in vars(args).items() if v is not None}
    if "namespaces" in changes:
        changes["namespaces"] = tuple(changes["namespaces"])
        changes["all_namespaces"] = False
    if changes.get("all_namespaces"):
        changes["namespaces"] = ()
    if changes.get("liveness_endpoint") == "none":
        changes["liveness_endpoint"] = None
    return replace(base, **changes)


def configure_logging(settings: OperatorSettings) -> None:
    kopf.configure(verbose=settings.verbose,
                   log_format=kopf.LogFormat.JSON if settings.log_format == "json" else kopf.LogFormat.FULL)
    logging.getLogger("kopf._core.reactor.running").addFilter(_NotInMainThread())
    for noisy in ("httpx", "httpcore", "kubernetes", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if not settings.verbose:
        # kopf's per-object "Handler succeeded" lines would be one per key per change.
        logging.getLogger("kopf.objects").setLevel(logging.WARNING)


@contextlib.contextmanager
def stop_on_signals() -> Iterator[threading.Event]:
    """An event set by SIGTERM/SIGINT while the block runs (the previous handlers come back after it)."""
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield stop
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def wait_for_crds(settings: OperatorSettings) -> bool:
    """Wait (serving liveness, reconciling nothing) until the API server serves both CRDs; False on SIGTERM/SIGINT.

    kopf resolves the resources it watches once, when it starts (it does not watch CRDs): started before the CRDs
    exist, as when a GitOps tool applies the operator before them or the chart installs it with `crds.enabled=false`,
    it would never serve them."""
    liveness = (StandbyLiveness(settings.liveness_endpoint, lambda: True, (b'{"waitingFor": "crds"}', b""))
                if settings.liveness_endpoint is not None else contextlib.nullcontext())
    kube = KubeApi(load_connection(settings.kubeconfig), max_connections=1)
    last_log = -CRD_LOG_EVERY
    next_tidy = 0.0
    with stop_on_signals() as stop, liveness, contextlib.closing(kube):
        while True:
            try:
                missing = kube.unserved([DEEPSEEKDEPLOYMENTS, APIKEYS])
                problem = ""
            except (KubeError, OSError, httpx.HTTPError) as exc:
                missing, problem = [], f"the API server could not be asked: {exc}"
            if stop.is_set():  # a signal that came while the API server was asked: kopf would not see it
                return False
            if DEEPSEEKDEPLOYMENTS in missing and time.monotonic() >= next_tidy:
                problem = _tidy_without_deployments(kube, settings, keys=APIKEYS not in missing)
                next_tidy = time.monotonic() + TIDY_EVERY
            if not missing and not problem:
                if last_log > -CRD_LOG_EVERY:
                    log.info("the CustomResourceDefinitions are served: starting")
                return True
            now = time.monotonic()
            if now - last_log >= CRD_LOG_EVERY:
                last_log = now
                names = ", ".join(f"{r.plural}.{r.group}" for r in missing)
                log.warning("waiting for the CustomResourceDefinitions %s to be served (install them with the "
                            "chart's crds.enabled=true, or kubectl apply -f crds/); nothing is reconciled until "
                            "then%s", names or "deepseekdeployments.deepseek.ai, apikeys.deepseek.ai",
                            f" ({problem})" if problem else "")
            if stop.wait(CRD_CHECK_EVERY):
                return False


def _tidy_without_deployments(kube: KubeApi, settings: OperatorSettings, keys: bool) -> str:
    """While the DeepSeekDeployment CRD is not served, every deployment is gone with it, and what the operator would do
    on seeing each go is done here, since kopf does not run: their signing keys are deleted, and (`keys`: the ApiKey
    CRD is served) the ApiKeys being deleted are let go, whose finalizers would wait for an operator that waits for
    that CRD. Each checks that the deployment is really gone. Returns what went wrong, if anything."""
    try:
        swept = SigningKeyStore(kube, settings.key_namespace, AuthConfigStore(kube)).sweep()
        released = release_keys_of_deleted_deployments(
            kube, [None] if settings.all_namespaces else list(settings.namespaces), time.time()) if keys else []
    except (KubeError, OSError, httpx.HTTPError) as exc:
        return f"signing keys or ApiKeys of the deleted deployments could not be cleaned up: {exc}"
    if released:
        log.info("let go of %d ApiKey(s) being deleted, whose deployments are gone with their CRD: %s",
                 len(released), ", ".join(released[:20]) + (" ..." if len(released) > 20 else ""))
    if swept:
        log.info("deleted the signing keys of %d deployment(s) gone with their CRD", len(swept))
    return ""


def wait_for_leadership(elector: LeaderElector, liveness_endpoint: str | None) -> bool:
    """Stand by (serving liveness, reconciling nothing) until this process holds the Lease; False on SIGTERM/SIGINT."""
    liveness = (StandbyLiveness(liveness_endpoint, elector.standby_healthy) if liveness_endpoint is not None
                else contextlib.nullcontext())
    with stop_on_signals() as stop, liveness:
        if not elector.acquire(stop):
            return False
        if stop.is_set():  # the signal came while the Lease was taken: hand it back instead of leading regardless
            elector.step_down()
            return False
        return True


class _NotInMainThread(logging.Filter):
    """Drops kopf's warning that it ignores OS signals in a thread: this process handles them (run_kopf)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("OS signals are ignored: running not in the main thread")


class Ending(enum.Enum):
    """How `run_kopf` ended."""

    STOPPED = "stopped"  # SIGTERM/SIGINT, kopf stopped and no reconcile runs
    UNFINISHED = "unfinished"  # SIGTERM/SIGINT, and kopf or a reconcile had not ended within its grace
    CRDS_GONE = "CRDs gone"  # the CRDs are no longer served: wait for them again


def run_kopf(settings: OperatorSettings) -> Ending:
    """Reconcile until SIGTERM/SIGINT or until the CRDs are no longer served (then wait for them again).

    Once kopf has stopped, the runtime's API client is closed: a reconcile still running (a rollout's verification,
    say) sends no more requests, so it writes nothing beside a standby that takes the Lease, or beside the runtime
    started when the CRDs are back. After a signal such reconciles get WORKER_STOP_GRACE seconds to end; past that
    the process ends without them (`Ending.UNFINISHED`): each of their steps is safe to cut, as in a crash, and the
    next start takes the objects up again.

    kopf resolves the resources it watches once, at its start. It runs in a thread of its own, and this (main) thread
    looks for the CRDs every CRD_WATCH_EVERY seconds: once either is gone (deleted by hand, or with the release), kopf
    is asked to stop (its stop flag) and the operator waits for them again, in the same process. A watch request that
    runs into the missing CRD first fails with a 404 and stops kopf with that error: the same end. A kopf that has not
    stopped KOPF_STOP_GRACE seconds after being asked (an API request of its own can wait forever for credentials its
    stopping has already closed) is left behind, idle."""
    runtime = OperatorRuntime.connect(settings)
    kopf_settings = build_kopf_settings(settings)
    # kopf would SIGKILL its thread (the whole process) 10 minutes after a stop it did not ask for; this thread decides
    kopf_settings.process.ultimate_exiting_timeout = None
    stop_kopf = threading.Event()
    failure: list[BaseException] = []

    def reconcile() -> None:
        try:
            kopf.run(registry=build_registry(runtime), settings=kopf_settings, standalone=True,
                     clusterwide=settings.all_namespaces, namespaces=list(settings.namespaces),
                     liveness_endpoint=settings.liveness_endpoint, stop_flag=stop_kopf)
        except BaseException as exc:  # reported by the main thread
            failure.append(exc)

    thread = threading.Thread(target=reconcile, name="kopf", daemon=True)
    kube = KubeApi(load_connection(settings.kubeconfig), max_connections=1)
    gone: list[str] = []
    with stop_on_signals() as signalled, contextlib.closing(kube):
        thread.start()
        next_look = time.monotonic() + CRD_WATCH_EVERY
        while thread.is_alive() and not signalled.wait(min(1.0, max(0.0, next_look - time.monotonic()))):
            if time.monotonic() >= next_look:
                gone = _missing_crds(kube)
                if gone:
                    log.warning("the CustomResourceDefinitions %s are no longer served: stopping, to wait for them "
                                "again", ", ".join(gone))
                    break
                next_look = time.monotonic() + CRD_WATCH_EVERY
        stop_kopf.set()
        thread.join(KOPF_STOP_GRACE)
        if thread.is_alive():
            log.warning("kopf has not stopped %.0f s after it was asked to; going on without it. Where it waits:\n%s",
                        KOPF_STOP_GRACE, describe_stuck(thread, runtime.kopf_loop))
        # Whether or not kopf got to its clean-up (which does the same): idle worker threads (ours, and kopf's for
        # its synchronous handlers, which it never shuts down) end now, none of them takes new work, and what still
        # runs sends no more API requests.
        runtime.stop_workers()
        kopf_settings.execution.executor.shutdown(wait=False, cancel_futures=True)
        runtime.kube.close()
        if signalled.is_set():
            running = runtime.wait_for_workers(WORKER_STOP_GRACE)
            if running:
                log.warning("stopping with %d reconcile(s) still running %.0f s after kopf stopped (they send no "
                            "more API requests): the objects they were working on are taken up again at the next "
                            "start", running, WORKER_STOP_GRACE)
            return Ending.UNFINISHED if running or thread.is_alive() else Ending.STOPPED
        if failure:
            # A watch of a resource that is no longer served fails with a 404 as soon as its CRD goes, often before
            # the next look. The CRDs may already be back (wait_for_crds then returns at once).
            exc = failure[0]
            gone = gone or _missing_crds(kube)
            if not gone and getattr(exc, "status", None) != 404:
                raise exc
            log.warning("reconciling stopped (%s: %s): the CustomResourceDefinitions %s; waiting for them again",
                        type(exc).__name__, str(exc)[:200],
                        f"{', '.join(gone)} are no longer served" if gone else "were replaced")
            return Ending.CRDS_GONE
        return Ending.CRDS_GONE if gone else Ending.STOPPED


def describe_stuck(thread: threading.Thread, loop: asyncio.AbstractEventLoop | None, limit: int = 8) -> str:
    """Where a thread that should have ended waits: its stack, and the stacks of its event loop's unfinished tasks
    (code locations only: no local variables, so nothing a request carried)."""
    lines = []
    frame = sys._current_frames().get(thread.ident) if thread.ident is not None else None
    if frame is not None:
        lines.append(f"thread {thread.name}:")
        lines += [f"  {entry.filename}:{entry.lineno} in {entry.name}"
                  for entry in reversed(traceback.extract_stack(frame, limit))]
    try:
        tasks = list(asyncio.all_tasks(loop)) if loop is not None and not loop.is_closed() else []
    except RuntimeError:  # the loop's task set changed meanwhile
        tasks = []
    for task in tasks:
        lines.append(f"task {task.get_name()}:")
        for task_frame in task.get_stack(limit=limit):
            code = task_frame.f_code
            lines.append(f"  {code.co_filename}:{task_frame.f_lineno} in {code.co_name}")
    return "\n".join(lines) or "(nothing to show)"


def _missing_crds(kube: KubeApi) -> list[str]:
    """The CRDs the API server does not serve now; none when it cannot be asked (kopf reports that itself)."""
    try:
        return [f"{r.plural}.{r.group}" for r in kube.unserved([DEEPSEEKDEPLOYMENTS, APIKEYS])]
    except (KubeError, OSError, httpx.HTTPError):
        return []


def run(settings: OperatorSettings) -> None:
    """Run until SIGTERM/SIGINT; with leader election, reconcile only while holding the Lease. The CRDs going away
    while it runs stops reconciling until they are back, in the same process."""
    while wait_for_crds(settings):
        elector: LeaderElector | None = None
        if settings.leader_election:
            elector = LeaderElector.connect(settings.leader_election_config(default_identity()), settings.kubeconfig)
            if not wait_for_leadership(elector, settings.liveness_endpoint):
                elector.close()
                return
            # Renewal starts before kopf does; losing the Lease from here on ends the process at once.
            elector.keep_leading()
        try:
            ending = run_kopf(settings)
        finally:
            if elector is not None:
                elector.step_down()
                elector.close()
        if ending is Ending.UNFINISHED:
            exit_now(0)  # the interpreter's exit would wait for those threads without a limit
        if ending is not Ending.CRDS_GONE:
            return


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == [uninstall_cleanup.COMMAND]:
        return uninstall_cleanup.main(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        settings = settings_from_args(args, settings_from_env())
        settings.validate()
        load_connection(settings.kubeconfig)  # KubeConfigError (a ValueError) now, not a traceback later
    except ValueError as exc:
        print(f"deepseek-operator: {exc}", file=sys.stderr)
        return 2
    configure_logging(settings)
    run(settings)
    return 0


if __name__ == "__main__":
    sys.exit(main())
