"""`deepseek-operator uninstall-cleanup`: delete every ApiKey, then every DeepSeekDeployment, in the namespaces the
operator watches, and wait until they are gone: the chart's pre-delete hook when `helm uninstall` deletes the CRDs
(crds.keep=false).

An ApiKey carries the finalizer `deepseek.ai/finalizer`, which only a running operator removes, after revoking the
key's tokens. `helm uninstall` deletes the operator and the CRDs together, so without this the ApiKeys, their CRD and
their namespaces would stay `Terminating`. Keys go first, while their deployments still publish the revoked list;
then the deployments, while the operator is there to delete their private signing keys (in its own namespace, where
nothing else would).

Nothing is deleted until the operator's Deployment has a ready replica (`--operator`): a deletion cannot be taken
back, and with no operator to finalize them every key would stay `Terminating`, to be revoked and removed whenever an
operator next runs, even if the uninstall is then given up.

Of ApiKeys and DeepSeekDeployments only object metadata is read (names, finalizers, deletion marks), and of the
operator's Deployment only its replica counts: never a Secret, a key's spec or status, so nothing logged here can hold
a token.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import httpx

from .durations import parse_duration
from .kube import (
    APIKEYS,
    DEEPSEEKDEPLOYMENTS,
    KubeApi,
    KubeConfigError,
    KubeError,
    NotFound,
    Resource,
    load_connection,
)
from .names import FINALIZER
from .workloads import DEPLOYMENTS

log = logging.getLogger("deepseek_operator.uninstall_cleanup")

COMMAND = "uninstall-cleanup"
DEFAULT_TIMEOUT = 180.0
POLL_INTERVAL = 1.0  # seconds between looks at what is left
REPORT_EVERY = 10.0  # seconds between the log lines that say what is still being waited for
NAMED_AT_MOST = 10  # objects named in one line; the rest are counted


@dataclass(frozen=True)
class Leftover:
    """An object still there: where, which finalizers hold it, whether its deletion has begun."""

    namespace: str
    name: str
    finalizers: tuple[str, ...]
    deleting: bool

    def describe(self) -> str:
        if not self.deleting:
            return f"{self.namespace}/{self.name}"
        if not self.finalizers:
            return f"{self.namespace}/{self.name} (Terminating)"
        return f"{self.namespace}/{self.name} (Terminating, finalizers: {', '.join(self.finalizers)})"


def leftovers(items: Iterable[Mapping[str, Any]]) -> list[Leftover]:
    """The objects of a metadata listing (PartialObjectMetadata items), sorted by namespace and name (pure)."""
    found = []
    for item in items:
        meta = item.get("metadata") or {}
        found.append(Leftover(str(meta.get("namespace", "")), str(meta.get("name", "")),
                              tuple(meta.get("finalizers") or ()), bool(meta.get("deletionTimestamp"))))
    return sorted(found, key=lambda o: (o.namespace, o.name))


def describe_all(objects: Sequence[Leftover], at_most: int = NAMED_AT_MOST) -> str:
    """`ns/a, ns/b (Terminating, finalizers: ...), and 3 more` (pure)."""
    named = ", ".join(o.describe() for o in objects[:at_most])
    rest = len(objects) - at_most
    return f"{named}, and {rest} more" if rest > 0 else named


def counted(count: int, kind: str) -> str:
    """`1 ApiKey`, `2 ApiKeys` (pure)."""
    return f"{count} {kind}{'' if count == 1 else 's'}"


def scope_text(namespaces: Sequence[str] | None) -> str:
    """`every namespace` or `namespaces a, b` (pure)."""
    if namespaces is None:
        return "every namespace"
    return f"namespace{'s' if len(namespaces) > 1 else ''} {', '.join(namespaces)}"


def format_seconds(seconds: float) -> str:
    """`45s`, `3m`, `2m30s` (pure)."""
    minutes, rest = divmod(round(seconds), 60)
    if not minutes:
        return f"{rest}s"
    return f"{minutes}m{rest}s" if rest else f"{minutes}m"


def timeout_message(kind: str, left: Sequence[Leftover], timeout: float, operator: str | None) -> str:
    """Why the cleanup gives up, naming what is left and what to do, in one line (pure)."""
    where = f" ({operator})" if operator else ""
    reasons = []
    if any(FINALIZER in o.finalizers for o in left):
        reasons.append(f"the operator{where} removes {FINALIZER} once it has revoked a key's tokens: check that it "
                       "runs and what its log says about these keys")
    if any(o.deleting and set(o.finalizers) - {FINALIZER} for o in left):
        reasons.append("finalizers that are not the operator's are removed by whoever added them")
    if any(not o.deleting for o in left):
        reasons.append("some were created again after they were deleted (by a GitOps tool? suspend it first)")
    if not reasons:
        reasons.append("the API server has not removed them yet")
    why = "; ".join(reasons)
    return (f"{counted(len(left), kind)} still there after {format_seconds(timeout)}: {describe_all(left)}. "
            f"{why[0].upper()}{why[1:]}. The uninstall stops here, before Helm deletes anything; run helm uninstall "
            "again once they are gone (README, Troubleshooting: 'helm uninstall fails with job "
            "...-uninstall-cleanup failed').")


def operator_state(deployment: Mapping[str, Any] | None) -> tuple[bool, str]:
    """Whether the operator's Deployment has a ready replica, and what it shows, e.g. `0 of 1 replica(s) ready` (pure).
    """
    if deployment is None:
        return False, "its Deployment does not exist"
    wanted = (deployment.get("spec") or {}).get("replicas", 1)
    ready = int((deployment.get("status") or {}).get("readyReplicas") or 0)
    if ready > 0:
        return True, f"{ready} of {wanted} replica(s) ready"
    if wanted == 0:
        return False, "scaled to zero"
    return False, f"0 of {wanted} replica(s) ready"


def operator_down_message(operator: str, state: str, waited: float, keys: Sequence[Leftover] | None) -> str:
    """Why the cleanup deleted nothing: no operator runs to finalize what it would delete; one line (pure)."""
    namespace, _, name = operator.partition("/")
    if keys is None:
        held = "every ApiKey in scope is left as it is"
    elif keys:
        held = f"the {counted(len(keys), 'ApiKey')} in scope {'is' if len(keys) == 1 else 'are'} left as " \
               f"{'it is' if len(keys) == 1 else 'they are'}: {describe_all(keys)}"
    else:
        held = "there is no ApiKey in scope"
    after = f" after {format_seconds(waited)}" if waited > 0 else ""
    return (f"the operator {operator} is not running ({state}){after}: nothing was deleted, since every ApiKey "
            f"deleted now would stay Terminating under {FINALIZER} until an operator revokes its tokens, even if the "
            f"uninstall were then given up; {held}. Start it (kubectl scale deployment {name} -n {namespace} "
            "--replicas=1) and run helm uninstall again (README, Troubleshooting: 'helm uninstall fails with job "
            "...-uninstall-cleanup failed').")


class CleanupRefused(Exception):
    """The API server refused a call for good (401/403): waiting longer would not help."""


def permanent(error: KubeError) -> bool:
    return error.status in (401, 403)


class UninstallCleanup:
    """Deletes the objects of each kind in turn and waits until they are gone, within one deadline."""

    def __init__(self, kube: KubeApi, namespaces: Sequence[str] | None, timeout: float, *,
                 operator: str | None = None, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        self.kube = kube
        self.namespaces = list(namespaces) if namespaces is not None else None
        self.timeout = timeout
        self.operator = operator
        self.clock = clock
        self.sleep = sleep

    def run(self) -> bool:
        """True once every ApiKey and DeepSeekDeployment in scope is gone; False (logged why) otherwise."""
        deadline = self.clock() + self.timeout
        try:
            if self.operator is not None and not self._operator_runs(deadline):
                return False
            for resource in (APIKEYS, DEEPSEEKDEPLOYMENTS):
                if not self._empty(resource, deadline):
                    return False
        except CleanupRefused as exc:
            log.error("%s", exc)
            return False
        log.info("every ApiKey and DeepSeekDeployment is gone (looked in %s)", scope_text(self.namespaces))
        return True

    def _operator_runs(self, deadline: float) -> bool:
        """Wait (within the deadline) until the operator's Deployment has a ready replica; False, logged why, when it
        has none by then or does not exist."""
        assert self.operator is not None
        namespace, _, name = self.operator.partition("/")
        started = self.clock()
        next_report = started + REPORT_EVERY
        state = "not looked at yet"
        while True:
            try:
                deployment = self.kube.get(DEPLOYMENTS, namespace, name)
                running, state = operator_state(deployment)
                if running:
                    log.info("the operator %s runs (%s)", self.operator, state)
                    return True
                if deployment is None:  # nothing will start it within the uninstall
                    break
            except KubeError as exc:
                if permanent(exc):
                    raise CleanupRefused(
                        f"the API server refused to read the operator's Deployment {self.operator} ({exc}); the "
                        "hook's RBAC must allow get on it; nothing was deleted") from exc
                log.warning("could not read the operator's Deployment %s (%s); trying again", self.operator, exc)
            except (httpx.HTTPError, OSError) as exc:
                log.warning("could not read the operator's Deployment %s (%s); trying again", self.operator, exc)
            now = self.clock()
            if now >= deadline:
                break
            if now >= next_report:
                next_report = now + REPORT_EVERY
                log.info("waiting for the operator %s to run (%s; %s left) before deleting anything", self.operator,
                         state, format_seconds(deadline - now))
            self.sleep(min(POLL_INTERVAL, max(deadline - now, 0.0)))
        try:  # the keys this leaves alone, named so that the message says what is at stake
            keys = self._list(APIKEYS)
        except (KubeError, CleanupRefused, httpx.HTTPError, OSError):
            keys = None
        log.error("%s", operator_down_message(self.operator, state, self.clock() - started, keys))
        return False

    def _list(self, resource: Resource) -> list[Leftover] | None:
        """What is there now; None when the kind is not served (its CRD is not installed)."""
        items: list[dict[str, Any]] = []
        for namespace in self.namespaces if self.namespaces is not None else [None]:
            try:
                listed, _ = self.kube.list_metadata(resource, namespace, label_selector="")
            except NotFound:
                return None
            except KubeError as exc:
                if permanent(exc):
                    raise CleanupRefused(
                        f"the API server refused to list {resource.plural} in {scope_text(self.namespaces)} ({exc}); "
                        "the hook's RBAC must allow list and deletecollection of apikeys and deepseekdeployments "
                        "there") from exc
                raise
            items.extend(listed)
        return leftovers(items)

    def _delete(self, resource: Resource, objects: Sequence[Leftover]) -> None:
        """Delete every object in each namespace where one is not being deleted yet: one request per namespace (ten
        thousand keys are not ten thousand round trips before the operator can start on them)."""
        for namespace in sorted({o.namespace for o in objects if not o.deleting}):
            try:
                self.kube.delete_collection(resource, namespace)
            except KubeError as exc:
                if permanent(exc):
                    raise CleanupRefused(
                        f"the API server refused to delete the {resource.plural} in namespace {namespace} ({exc}); "
                        "the hook's RBAC must allow list and deletecollection of apikeys and deepseekdeployments "
                        "there") from exc
                raise

    def _empty(self, resource: Resource, deadline: float) -> bool:
        kind, scope = resource.kind, scope_text(self.namespaces)
        left: list[Leftover] = []
        first = True
        next_report = self.clock() + REPORT_EVERY
        while True:
            try:
                listed = self._list(resource)
                if listed is None and first:
                    log.info("%ss are not served (their CRD is not installed): nothing to delete", kind)
                    return True
                left = listed or []
                if not left:
                    log.info("no %s to delete (looked in %s)" if first else "the %ss are gone (looked in %s)",
                             kind, scope)
                    return True
                if first:
                    log.info("deleting %s (looked in %s): %s", counted(len(left), kind), scope, describe_all(left))
                    first = False
                # Every look deletes what is not being deleted yet: objects created again meanwhile (a GitOps sync)
                # too, which are named if they outlast the deadline.
                self._delete(resource, left)
            except (KubeError, httpx.HTTPError, OSError) as exc:
                log.warning("could not look at or delete the %ss (%s); trying again", kind, exc)
            now = self.clock()
            if now >= deadline:
                log.error("%s", timeout_message(kind, left, self.timeout, self.operator))
                return False
            if now >= next_report:
                next_report = now + REPORT_EVERY
                log.info("waiting for %s to go (%s left): %s", counted(len(left), kind), format_seconds(deadline - now),
                         describe_all(left))
            self.sleep(min(POLL_INTERVAL, max(deadline - now, 0.0)))


def operator_reference(text: str) -> str:
    """`NAMESPACE/DEPLOYMENT`, both parts non-empty (an argparse type)."""
    namespace, slash, name = text.partition("/")
    if not (slash and namespace and name) or "/" in name:
        raise argparse.ArgumentTypeError(f"expected NAMESPACE/DEPLOYMENT, got {text!r}")
    return text


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=f"deepseek-operator {COMMAND}",
        description="Delete every ApiKey, then every DeepSeekDeployment, and wait until the running operator has "
                    "finalized them (revoked the keys' tokens). The chart runs this before `helm uninstall` deletes "
                    "the CRDs (crds.keep=false). Exits 1 naming what is left when they are not gone in time.")
    scope = parser.add_mutually_exclusive_group(required=True)
    scope.add_argument("--namespace", "-n", action="append", dest="namespaces", metavar="NS",
                       help="a namespace the operator watches (repeatable)")
    scope.add_argument("--all-namespaces", "-A", action="store_true", help="the operator watches every namespace")
    parser.add_argument("--timeout", type=parse_duration, default=DEFAULT_TIMEOUT, metavar="DURATION",
                        help="give up after this long (default 3m)")
    parser.add_argument("--operator", metavar="NAMESPACE/DEPLOYMENT", type=operator_reference,
                        help="the operator's Deployment: nothing is deleted until it has a ready replica (without "
                             "this, nothing is checked); named in the message when keys are not finalized in time")
    parser.add_argument("--kubeconfig", help="kubeconfig file (default $KUBECONFIG, else in-cluster)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr)
    for noisy in ("httpx", "httpcore"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        connection = load_connection(args.kubeconfig)
    except KubeConfigError as exc:
        log.error("%s", exc)
        return 2
    kube = KubeApi(connection, max_connections=1)
    try:
        cleanup = UninstallCleanup(kube, None if args.all_namespaces else args.namespaces, args.timeout,
                                   operator=args.operator)
        return 0 if cleanup.run() else 1
    except (KubeError, httpx.HTTPError, OSError) as exc:
        log.error("the API server could not be reached or refused a call: %s", exc)
        return 1
    finally:
        kube.close()
