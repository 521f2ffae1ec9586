"""The serving part of the DeepSeekDeployment reconcile: gather, decide (rollout.next_step), act.

Called from `DeploymentReconciler.reconcile` after the issuer, under the same per-deployment lock. It keeps the
server's ServiceAccount/Role/RoleBinding, the blue/green Deployments and both Services in line with the rollout's
decisions, runs verification requests, and writes the rollout fields and conditions of status. It returns when it
wants to run again (fast while a rollout progresses, slowly when stable), or earlier, before acting, when another
reconcile of the deployment waits for the lock.
"""

from __future__ import annotations

import logging
import os
import secrets
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass, replace
from functools import partial
from typing import Any

from . import failpoints
from .conditions import Condition, condition_reason, merge_conditions
from .durations import parse_duration
from .engines import engine_name, uses_vllm, vllm_image
from .host_paths import host_path_refusal
from .issuer import Issuers
from .kube import DEEPSEEKDEPLOYMENTS, EVENTS, SECRETS, Conflict, KubeApi, KubeError, Resource, ensure_controlled
from .revision import compute_revision
from .rollout import (
    BEFORE_SWITCH,
    POST_VERIFYING,
    PROVISIONING,
    STARTING,
    Decision,
    LiveTraffic,
    Observed,
    RolloutSettings,
    next_step,
    observe_color,
)
from .settings import ENV_PREFIX
from .verification import AnalysisSettings, Verifier, ready_endpoints
from .workloads import (
    COLOR_LABEL,
    COLORS,
    DEPLOYMENT_LABEL,
    DEPLOYMENTS,
    ENDPOINT_SLICES,
    PODS,
    REVISION_LABEL,
    ROLE_BINDINGS,
    ROLES,
    SERVICE_ACCOUNTS,
    SERVICES,
    active_service_name,
    build_active_service,
    build_deployment,
    build_preview_service,
    build_record_key_secret,
    build_server_account,
    color_deployment_name,
    endpoint_url,
    label_selector_text,
    preview_service_name,
)

log = logging.getLogger(__name__)
HOST_PATH_NOT_ALLOWED = "HostPathNotAllowed"


def model_source_condition(refusal: str | None) -> Condition:
    """`ModelSourceAllowed`: False with the reason when the spec's model source may not be mounted (host_paths.py)."""
    if refusal is not None:
        return Condition("ModelSourceAllowed", False, HOST_PATH_NOT_ALLOWED, refusal)
    return Condition("ModelSourceAllowed", True, "Allowed", "the model source may be mounted")

MAX_STEPS_PER_RECONCILE = 8
# Requests of deployment reconciles in flight at once (see ServingReconciler._together).
SERVING_REQUESTS = 8
_RESOURCES = {"ServiceAccount": SERVICE_ACCOUNTS, "Role": ROLES, "RoleBinding": ROLE_BINDINGS}


@dataclass(frozen=True)
class RolloutTiming:
    """How often a deployment is looked at: while a rollout progresses, and when stable (seconds).

    From `DEEPSEEK_OPERATOR_ROLLOUT_PROGRESSING_INTERVAL` / `..._ROLLOUT_STABLE_INTERVAL` (`2s`, `1m`, ...).
    """

    progressing_interval: float = 2.0
    stable_interval: float = 30.0

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> RolloutTiming:
        environ = os.environ if environ is None else environ
        values: dict[str, float] = {}
        for name in ("progressing_interval", "stable_interval"):
            key = f"{ENV_PREFIX}ROLLOUT_{name.upper()}"
            if key in environ:
                try:
                    values[name] = parse_duration(environ[key])
                except ValueError as exc:
                    raise ValueError(f"{key}={environ[key]!r}: {exc}") from exc
        return cls(**values)


TEMPLATE_REFUSED = "InvalidPodTemplate"


def _refusal(exc: KubeError) -> str:
    """The API server's sentence from a refused write (`Deployment.apps "x" is invalid: ...`), without the method
    and path."""
    text = str(exc)
    marker = f": {exc.status} {exc.reason}: "
    return (text.split(marker, 1)[1] if marker in text else text)[:500]


def _same_grants(actual: dict[str, Any], desired: dict[str, Any]) -> bool:
    """RBAC objects: up to date when rules, roleRef and subjects agree (ownership is checked before)."""
    return all(actual.get(key) == desired.get(key) for key in ("rules", "roleRef", "subjects"))


def _same_selector(actual: dict[str, Any], desired: dict[str, Any]) -> bool:
    return bool((actual.get("spec") or {}).get("selector") == desired["spec"]["selector"])


def status_patch(previous: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, Any]:
    """A JSON merge patch turning `previous` into `new` for the keys of `new` (None deletes, maps recurse)."""
    patch: dict[str, Any] = {}
    for key, value in new.items():
        old = previous.get(key)
        if isinstance(value, dict) and isinstance(old, dict):
            inner = status_patch(old, value)
            for gone in set(old) - set(value):
                inner[gone] = None
            if inner:
                patch[key] = inner
        elif value != old:
            patch[key] = value
    return patch


def then_patch(first: Mapping[str, Any], then: Mapping[str, Any]) -> dict[str, Any] | None:
    """One JSON merge patch doing what `first` and then `then` do, or None where no single patch can: `then` patches
    a map that `first` deletes or sets to something else (the keys to delete are those stored) (pure)."""
    patch = dict(first)
    for key, value in then.items():
        if isinstance(value, dict) and key in patch:
            if not isinstance(patch[key], dict):
                return None
            inner = then_patch(patch[key], value)
            if inner is None:
                return None
            patch[key] = inner
        else:
            patch[key] = value
    return patch


class ServingReconciler:
    """Serving children and the rollout of every DeepSeekDeployment (thread-safe per deployment via the caller)."""

    def __init__(self, kube: KubeApi, issuers: Issuers, timing: RolloutTiming | None = None, *,
                 verifier: Verifier | None = None, clock: Callable[[], float] = time.time,
                 allowed_host_path_prefixes: tuple[str, ...] = ()) -> None:
        self._allowed_host_paths = allowed_host_path_prefixes
        self._kube = kube
        self._issuers = issuers
        self._timing = timing or RolloutTiming.from_env()
        self._verifier = verifier or Verifier()
        self._clock = clock
        # A pass's independent reads and writes go out together: on a busy API server each round trip is what a
        # rollout step waits for (tens of milliseconds each under an ApiKey burst, where a pass read one by one
        # took seconds). Only requests run here; nothing here submits more work to it.
        self._requests = ThreadPoolExecutor(max_workers=SERVING_REQUESTS, thread_name_prefix="serving")
        # (namespace, name) -> (color, revision, the API server's message): a color Deployment the API server
        # refused to create or replace for a revision (422 Invalid: e.g. an affinity block a pod cannot have). Such
        # a revision never gets pods, so the next step rolls it back at once with that message instead of waiting
        # in Provisioning, with nothing in status, past its deadline.
        self._refused: dict[tuple[str, str], tuple[str, str, str]] = {}

    def _together(self, *calls: Callable[[], Any]) -> list[Any]:
        """Run `calls` at once; their results in order, or the first one's exception in that order (as if run one
        after another, except that the later ones ran too)."""
        futures = [self._requests.submit(call) for call in calls]
        wait(futures)
        return [future.result() for future in futures]

    # ------------------------------------------------------------------------------------------------ gather
    def _observe(self, dsd: dict[str, Any], *alongside: Callable[[], Any]
                 ) -> tuple[Observed, dict[str, list[dict[str, Any]]]]:
        """What the step decides from; `alongside`: requests sent together with its reads."""
        namespace, name = dsd["metadata"]["namespace"], dsd["metadata"]["name"]
        spec = dsd["spec"]
        resources = spec.get("resources") or {}
        gpu_resource = str(resources.get("gpuResourceName", "nvidia.com/gpu"))
        gpus = int(resources.get("gpus", 1))
        selector = label_selector_text({DEPLOYMENT_LABEL: name})
        listed_deployments, pods, service = self._together(
            partial(self._kube.list, DEPLOYMENTS, namespace, label_selector=selector),
            partial(self._kube.list, PODS, namespace, label_selector=selector),
            partial(self._kube.get, SERVICES, namespace, active_service_name(name)), *alongside)[:3]
        deployments = {item["metadata"]["name"]: item for item in listed_deployments}
        uid = dsd["metadata"]["uid"]
        for color in COLORS:
            if color_deployment_name(name, color) in deployments:
                ensure_controlled(DEPLOYMENTS, deployments[color_deployment_name(name, color)], uid)
        pods_by_color: dict[str, list[dict[str, Any]]] = {color: [] for color in COLORS}
        for pod in pods:
            color = (pod["metadata"].get("labels") or {}).get(COLOR_LABEL)
            if color in pods_by_color:
                pods_by_color[color].append(pod)
        events = self._mount_events(namespace, dsd, pods_by_color)
        colors = {color: observe_color(deployments.get(color_deployment_name(name, color)), pods_by_color[color],
                                       gpu_resource=gpu_resource, gpus_per_pod=gpus, events=events)
                  for color in COLORS}
        status = dsd.get("status") or {}
        rollout = status.get("rollout") or {}
        refused = self._refused.pop((namespace, name), None)
        if refused is not None and (rollout.get("color"), rollout.get("revision")) == refused[:2] \
                and rollout.get("phase") in BEFORE_SWITCH:
            color, revision, message = refused
            colors[color] = replace(colors[color], failure=f"the API server refused the pods of revision {revision} "
                                                           f"in {color}: {message}",
                                    failure_reason=TEMPLATE_REFUSED)
        target = None
        if service is not None:
            # Someone else's Service of this name is neither read as the traffic target nor (later) repointed.
            ensure_controlled(SERVICES, service, uid)
            chosen = service["spec"].get("selector") or {}
            if chosen.get(COLOR_LABEL) and chosen.get(REVISION_LABEL):
                target = (chosen[COLOR_LABEL], chosen[REVISION_LABEL])
        live = None
        if rollout.get("phase") == POST_VERIFYING and rollout.get("color") in colors:
            state = colors[rollout["color"]]
            ips = [pod["status"]["podIP"] for pod in pods_by_color[rollout["color"]]
                   if pod["metadata"]["name"] in state.ready_pods and (pod.get("status") or {}).get("podIP")]
            counts = self._verifier.live_counts(ips)
            live = LiveTraffic(*counts) if counts is not None else None
        server = spec.get("server") or {}
        observed = Observed(
            now=self._clock(),
            desired_revision=compute_revision(spec),
            settings=RolloutSettings.from_spec(spec, progressing_interval=self._timing.progressing_interval,
                                               stable_interval=self._timing.stable_interval, status=status),
            status=status,
            colors=colors,
            annotations=dict(dsd["metadata"].get("annotations") or {}),
            service_target=target,
            live=live,
            summary={"model": f"{spec['model']['name']}@{spec['model'].get('revision', 'main')}",
                     "image": str(spec.get("image", "")), "precision": str(server.get("precision", "")),
                     "engine": engine_name(spec), "engineImage": vllm_image(spec) if uses_vllm(spec) else ""},
        )
        return observed, pods_by_color

    def _mount_events(self, namespace: str, dsd: dict[str, Any],
                      pods_by_color: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
        """The kubelet's FailedMount Events in the namespace, read only while new pods are starting."""
        rollout = (dsd.get("status") or {}).get("rollout") or {}
        starting = pods_by_color.get(str(rollout.get("color")), [])
        if rollout.get("phase") not in (PROVISIONING, STARTING) or all(
                (pod.get("status") or {}).get("phase") != "Pending" for pod in starting):
            return []
        try:
            return self._kube.list(EVENTS, namespace, field_selector="involvedObject.kind=Pod,reason=FailedMount")
        except KubeError as exc:
            # Without them a missing hostPath still ends the rollout, at its deadline.
            log.debug("cannot list Events in %s: %s", namespace, exc)
            return []

    # ------------------------------------------------------------------------------------------------ act
    def _ensure_server_account(self, dsd: dict[str, Any]) -> Callable[[], Any]:
        """The server's ServiceAccount, Role and record-key Secret; returns the call that ensures its RoleBinding,
        to be made after them (binding a Role the API server cannot read yet would be refused)."""
        namespace, uid = dsd["metadata"]["namespace"], dsd["metadata"]["uid"]
        *account, binding = build_server_account(dsd)

        def ensure(item: dict[str, Any]) -> Callable[[], Any]:
            return partial(self._kube.create_or_apply, _RESOURCES[item["kind"]], namespace, item, owner_uid=uid,
                           up_to_date=_same_grants)

        self._together(
            *(ensure(item) for item in account),
            # Made once and never rewritten: a new key would only empty the response cache and change fingerprints.
            partial(self._kube.create_or_apply, SECRETS, namespace,
                    build_record_key_secret(dsd, secrets.token_urlsafe(32)), owner_uid=uid,
                    up_to_date=lambda actual, _desired: True))
        return ensure(binding)

    def _replace_field(self, resource: Resource, namespace: str, name: str, owner_uid: str,
                       change: Callable[[dict[str, Any]], bool]) -> bool:
        """Read-modify-write one object `owner_uid` controls (`change` edits it and says whether it changed);
        False when absent, NotOwned when someone else's."""
        for _ in range(5):
            actual = self._kube.get(resource, namespace, name)
            if actual is None:
                return False
            ensure_controlled(resource, actual, owner_uid)
            if not change(actual):
                return True
            try:
                self._kube.replace(resource, namespace, actual)
                return True
            except Conflict:
                continue
        raise KubeError(409, "Conflict", f"{resource.kind} {namespace}/{name} kept changing; will retry", "PUT",
                        resource.path(namespace, name))

    def _scale(self, dsd: dict[str, Any], color: str, replicas: int, revision: str | None) -> None:
        namespace, name = dsd["metadata"]["namespace"], dsd["metadata"]["name"]
        deployment_name = color_deployment_name(name, color)
        if revision is not None:
            desired = build_deployment(dsd, color, revision, replicas)
            # Replaced whole (not applied): the builder's pod template is all of it, and a field it no longer
            # sets (a container, an env var) must go with the new revision.
            self._kube.create_or_replace(
                DEPLOYMENTS, namespace, desired, owner_uid=dsd["metadata"]["uid"],
                up_to_date=lambda actual, want: (
                    actual["spec"]["template"]["metadata"].get("labels") == want["spec"]["template"]["metadata"][
                        "labels"] and actual["spec"].get("replicas") == want["spec"]["replicas"]))
            log.info("%s/%s: %s runs revision %s with %d replica(s)", namespace, name, color, revision, replicas)
            return

        def set_replicas(actual: dict[str, Any]) -> bool:
            if actual["spec"].get("replicas") == replicas:
                return False
            actual["spec"]["replicas"] = replicas
            return True

        self._replace_field(DEPLOYMENTS, namespace, deployment_name, dsd["metadata"]["uid"], set_replicas)
        log.info("%s/%s: %s scaled to %d", namespace, name, color, replicas)

    def _point_service(self, dsd: dict[str, Any], desired: dict[str, Any]) -> None:
        self._kube.create_or_apply(SERVICES, dsd["metadata"]["namespace"], desired, owner_uid=dsd["metadata"]["uid"],
                                   up_to_date=_same_selector)

    def _run_verification(self, dsd: dict[str, Any], decision: Decision) -> dict[str, Any] | None:
        """The analysis block for the requested check, or None when its pods are not all reachable yet."""
        verify = decision.verify
        assert verify is not None
        namespace, name = dsd["metadata"]["namespace"], dsd["metadata"]["name"]
        slices = self._kube.list(ENDPOINT_SLICES, namespace,
                                 label_selector=f"kubernetes.io/service-name={preview_service_name(name)}")
        endpoints = ready_endpoints(slices)
        if verify.only:
            endpoints = [e for e in endpoints if e.pod in verify.only]
        if len(endpoints) < verify.min_pods:
            log.info("%s/%s: %d/%d pod(s) of %s in the preview endpoints; verifying when all are", namespace, name,
                     len(endpoints), verify.min_pods, verify.color)
            return None
        found = self._issuers.view_for(namespace, name, dsd["metadata"]["uid"])
        if found is None or found[0].signing_key is None:
            log.info("%s/%s: no published signing key yet; verification waits", namespace, name)
            return None
        result = self._verifier.verify(
            endpoints, signing_key=found[0].signing_key, namespace=namespace, deployment=name,
            deployment_uid=dsd["metadata"]["uid"], model=dsd["spec"]["model"]["name"],
            settings=AnalysisSettings.from_spec(dsd["spec"]))
        result["stage"] = verify.stage
        result["pods"] = [e.pod for e in endpoints]
        return result

    def _remove_annotations(self, dsd: dict[str, Any], stale: Mapping[str, str]) -> dict[str, Any]:
        """Remove each annotation in `stale` that still has the value given there (a JSON patch `test` guards
        each: a value set meanwhile is left for the next pass to read), say so in an Event; `dsd` as it is without
        them."""
        namespace, name = dsd["metadata"]["namespace"], dsd["metadata"]["name"]
        removed = []
        for annotation, value in stale.items():
            path = "/metadata/annotations/" + annotation.replace("~", "~0").replace("/", "~1")
            try:
                self._kube.json_patch(DEEPSEEKDEPLOYMENTS, namespace, name,
                                      [{"op": "test", "path": path, "value": value}, {"op": "remove", "path": path}])
            except KubeError as exc:
                if exc.status != 422:  # 422: the test failed, the annotation changed or went away meanwhile
                    raise
                continue
            removed.append(f"{annotation}={value}")
        if removed:
            revision = next(iter(stale.values()))
            self._kube.post_event(dsd, type_="Normal", reason="AnnotationsCleared",
                                  message=f"removed {', '.join(removed)} left from the failed attempt of revision "
                                          f"{revision}: they apply to one attempt, and it is tried again")
        annotations = {key: value for key, value in (dsd["metadata"].get("annotations") or {}).items()
                       if key not in stale}
        return {**dsd, "metadata": {**dsd["metadata"], "annotations": annotations}}

    def _apply(self, dsd: dict[str, Any], decision: Decision) -> None:
        for step in decision.scale:
            try:
                self._scale(dsd, step.color, step.replicas, step.revision)
            except KubeError as exc:
                if exc.status != 422 or step.revision is None:
                    raise
                namespace, name = dsd["metadata"]["namespace"], dsd["metadata"]["name"]
                log.warning("%s/%s: the API server refused %s for revision %s: %s", namespace, name,
                            color_deployment_name(name, step.color), step.revision, exc)
                self._refused[(namespace, name)] = (step.color, step.revision, _refusal(exc))
        if decision.preview is not None:
            self._point_service(dsd, build_preview_service(dsd, decision.preview.color, decision.preview.revision))
        if decision.switch is not None:
            failpoints.reached("rollout-before-switch")
            self._point_service(dsd, build_active_service(dsd, decision.switch.color, decision.switch.revision))
            failpoints.reached("rollout-after-switch")
        for note in decision.events:
            self._kube.post_event(dsd, type_=note.type, reason=note.reason, message=note.message)

    def _write_unwritten(self, dsd: dict[str, Any], unwritten: dict[str, Any], patch: dict[str, Any]) -> None:
        """Write `patch` after what the caller left unwritten (`unwritten`, emptied once it is sent): as one PATCH
        where one can do both."""
        namespace, name = dsd["metadata"]["namespace"], dsd["metadata"]["name"]
        both = then_patch(unwritten, patch)
        if both is None:
            self._kube.merge_status(DEEPSEEKDEPLOYMENTS, namespace, name, unwritten)
            unwritten.clear()
            both = patch
        if both:
            self._kube.merge_status(DEEPSEEKDEPLOYMENTS, namespace, name, both)
        unwritten.clear()

    def _write_status(self, dsd: dict[str, Any], decision: Decision, unwritten: dict[str, Any]) -> dict[str, Any]:
        namespace, name = dsd["metadata"]["namespace"], dsd["metadata"]["name"]
        previous = dsd.get("status") or {}
        new = dict(decision.status)
        new["endpoint"] = endpoint_url(namespace, name) if new.get("activeColor") else None
        new["observedGeneration"] = int(dsd["metadata"].get("generation", 1))
        new["conditions"] = merge_conditions(previous.get("conditions"),
                                             [*decision.conditions, model_source_condition(None)],
                                             now=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self._clock())),
                                             generation=new["observedGeneration"], keep_others=True)
        self._write_unwritten(dsd, unwritten, status_patch(previous, new))
        merged = {**previous, **{key: value for key, value in new.items() if value is not None}}
        for key, value in new.items():
            if value is None:
                merged.pop(key, None)
        return merged

    def _refuse_model_source(self, dsd: dict[str, Any], refusal: str, unwritten: dict[str, Any]) -> float:
        """No pods for a model source the operator may not mount: say so, leave any running color as it is."""
        previous = dsd.get("status") or {}
        conditions = [model_source_condition(refusal)]
        if not previous.get("activeColor"):
            conditions.append(Condition("Ready", False, HOST_PATH_NOT_ALLOWED, refusal))
        generation = int(dsd["metadata"].get("generation", 1))
        merged = merge_conditions(previous.get("conditions"), conditions, generation=generation, keep_others=True,
                                  now=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self._clock())))
        # desiredRevision follows the spec at this generation, as `kubectl deepseek` reads it with observedGeneration
        new = {**previous, "observedGeneration": generation, "desiredRevision": compute_revision(dsd["spec"]),
               "conditions": merged}
        patch = status_patch(previous, new)
        self._write_unwritten(dsd, unwritten, patch)
        if patch and condition_reason(previous.get("conditions"), "ModelSourceAllowed") != HOST_PATH_NOT_ALLOWED:
            self._kube.post_event(dsd, type_="Warning", reason=HOST_PATH_NOT_ALLOWED, message=refusal)
        return self._clock() + self._timing.stable_interval

    # ------------------------------------------------------------------------------------------------ entry point
    def reconcile(self, dsd: dict[str, Any], superseded: Callable[[], bool] = lambda: False,
                  unwritten: dict[str, Any] | None = None) -> float:
        """Move the deployment's rollout as far as it can go now; returns when to look again (epoch seconds).

        `superseded()` says that another reconcile of the deployment waits to run (an edit, say): the pass then
        stops at the next point where nothing is half done (before a step's reads, or between its reads and its
        writes) and leaves the rest to that reconcile, which reads the deployment afresh.

        `unwritten`: a status merge patch that `dsd["status"]` holds and the API server does not yet (the issuer's
        fields). It goes out with the pass's first status write, or before a verification (which can take
        seconds), and is emptied then; what is left in it at the end is the caller's to write."""
        unwritten = {} if unwritten is None else unwritten
        refusal = host_path_refusal(dsd["spec"], self._allowed_host_paths)
        if refusal is not None:
            return self._refuse_model_source(dsd, refusal, unwritten)
        again = self._clock() + self._timing.progressing_interval
        if superseded():
            return again
        # the RoleBinding goes out with the first step's reads
        alongside: tuple[Callable[[], Any], ...] = (self._ensure_server_account(dsd),)
        decision: Decision | None = None
        for _ in range(MAX_STEPS_PER_RECONCILE):
            if superseded():
                return again
            observed, _pods = self._observe(dsd, *alongside)
            alongside = ()
            phase_before = ((dsd.get("status") or {}).get("rollout") or {}).get("phase")
            decision = next_step(observed)
            failpoints.reached(f"rollout-{phase_before or 'none'}",
                               f"{dsd['metadata']['namespace']}/{dsd['metadata']['name']}")
            if superseded():  # the waiting reconcile decides afresh: act on nothing of this decision
                return again
            if decision.stale_annotations:
                dsd = self._remove_annotations(dsd, decision.stale_annotations)
            self._apply(dsd, decision)
            verified = False
            if decision.verify is not None:
                self._write_unwritten(dsd, unwritten, {})
                result = self._run_verification(dsd, decision)
                if result is not None:
                    rollout = dict(decision.status.get("rollout") or {})
                    pods = result.pop("pods")
                    if result["passed"]:
                        rollout["verifiedPods"] = sorted(set(rollout.get("verifiedPods") or []) | set(pods))
                    rollout["analysis"] = result
                    decision.status["rollout"] = rollout
                    verified = True
            dsd = {**dsd, "status": self._write_status(dsd, decision, unwritten)}
            if not (decision.again or verified):
                break
        assert decision is not None
        return self._clock() + decision.requeue_after
