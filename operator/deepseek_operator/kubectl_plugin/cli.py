"""`kubectl deepseek`: day-2 commands for DeepSeekDeployments and ApiKeys (a kubectl plugin: krew-style, the
`kubectl-deepseek` executable on PATH).

Every change is an annotation the operator already honours; the plugin picks the right value (the revision being
rolled out, the failed revision, a fresh rotation request) so that nobody copies a revision hash by hand.
"""

from __future__ import annotations

import argparse
import base64
import os
import sys
import time
import urllib.parse
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any

from ..apikey_plan import HELD_READY_REASONS, ROTATE_ANNOTATION
from ..kube import unusable_kubeconfig
from ..names import GROUP, VERSION, apikey_secret_name
from ..revision import compute_revision
from ..rollout import ABORT_ANNOTATION, PROMOTE_ANNOTATION, RETRY_ANNOTATION
from ..workloads import COLORS, color_deployment_name
from .views import (
    PluginError,
    abort_target,
    already_asked,
    describe_deployment,
    env_exports,
    keys_table,
    promote_target,
    recent_events,
    retry_needs_reset,
    retry_target,
    spec_revision,
    stale_token_reason,
)

DEPLOYMENTS = "deepseekdeployments"
APIKEYS = "apikeys"
MERGE_PATCH = "application/merge-patch+json"
CONFLICT_ATTEMPTS = 5


class Kube:
    """The few API calls the plugin makes, with errors turned into sentences."""

    def __init__(self, kubeconfig: str | None, context: str | None, namespace: str | None) -> None:
        import yaml
        from kubernetes import client, config

        try:
            config.load_kube_config(config_file=kubeconfig, context=context)
            if namespace is None:
                _, active = config.list_kube_config_contexts(config_file=kubeconfig)
                if context:
                    contexts, _ = config.list_kube_config_contexts(config_file=kubeconfig)
                    active = next((c for c in contexts if c.get("name") == context), active)
                namespace = ((active or {}).get("context") or {}).get("namespace")
        except config.ConfigException as exc:
            if kubeconfig or context or os.environ.get("KUBECONFIG"):
                # asked for: a missing file or a mistyped context must not fall back to the pod's own credentials
                raise PluginError(f"the kubeconfig or context asked for cannot be used ({exc})") from None
            try:
                config.load_incluster_config()
            except config.ConfigException:
                raise PluginError(f"no usable kubeconfig ({exc}); set KUBECONFIG or pass --kubeconfig") from None
        except (yaml.YAMLError, OSError, AttributeError, TypeError, ValueError) as exc:
            raise PluginError(f"{unusable_kubeconfig(exc)}; fix it, or pass another with --kubeconfig or "
                              "KUBECONFIG") from None
        self.namespace = namespace or "default"
        self.api_client = client.ApiClient()
        self.custom = client.CustomObjectsApi(self.api_client)
        self.core = client.CoreV1Api(self.api_client)
        self.apps = client.AppsV1Api(self.api_client)

    def call(self, what: str, function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Run one API call; 404 becomes None, anything else a PluginError naming `what`."""
        from kubernetes.client import ApiException
        from urllib3.exceptions import HTTPError

        try:
            return function(*args, **kwargs)
        except ApiException as exc:
            if exc.status == 404 and _kind_not_served(exc):
                raise PluginError(f"{what}: the API server does not serve this kind of object: are the "
                                  "deepseek-operator CRDs installed? (kubectl get crd deepseekdeployments.deepseek.ai "
                                  "apikeys.deepseek.ai)") from None
            if exc.status == 404:
                return None
            if exc.status == 409:
                raise
            raise PluginError(f"{what}: the API server answered {exc.status} {exc.reason}: "
                              f"{_api_message(exc)}") from None
        except HTTPError as exc:
            host = self.api_client.configuration.host
            raise PluginError(f"{what}: cannot reach the API server at {host}: {exc}") from None

    def dsd(self, name: str) -> dict[str, Any]:
        found = self.call(f"reading DeepSeekDeployment {self.namespace}/{name}",
                          self.custom.get_namespaced_custom_object, GROUP, VERSION, self.namespace, DEPLOYMENTS, name)
        if found is None:
            raise PluginError(f"DeepSeekDeployment {name!r} not found in namespace {self.namespace!r} "
                              "(pass -n NAMESPACE?)")
        return dict(found)

    def apikey(self, name: str) -> dict[str, Any]:
        found = self.call(f"reading ApiKey {self.namespace}/{name}",
                          self.custom.get_namespaced_custom_object, GROUP, VERSION, self.namespace, APIKEYS, name)
        if found is None:
            raise PluginError(f"ApiKey {name!r} not found in namespace {self.namespace!r} (pass -n NAMESPACE?)")
        return dict(found)

    def annotate(self, plural: str, obj: dict[str, Any], annotations: dict[str, str | None]) -> dict[str, Any]:
        """Merge `annotations` (None removes one) into `obj`, only if it is still the version that was read."""
        meta = obj["metadata"]
        body = {"metadata": {"annotations": annotations, "resourceVersion": meta["resourceVersion"]}}
        return dict(self.call(f"annotating {meta['namespace']}/{meta['name']}",
                              self.custom.patch_namespaced_custom_object, GROUP, VERSION, meta["namespace"], plural,
                              meta["name"], body, _content_type=MERGE_PATCH))


def _kind_not_served(exc: Any) -> bool:
    """A 404 for the kind itself (its CRD not installed), not for one object of it: the API server then names no
    object in the Status it answers."""
    import json

    try:
        status = json.loads(exc.body)
    except (TypeError, ValueError):
        return False
    return isinstance(status, dict) and not (status.get("details") or {}).get("name")


def _api_message(exc: Any) -> str:
    import json

    try:
        return str(json.loads(exc.body).get("message", exc.body))[:500]
    except (TypeError, ValueError, AttributeError):
        return str(exc.body or exc.reason)[:500]


def _conflicts(function: Callable[[], int]) -> int:
    """Run a read-decide-write step again when the object changed between the read and the write."""
    from kubernetes.client import ApiException

    for _ in range(CONFLICT_ATTEMPTS):
        try:
            return function()
        except ApiException as exc:
            if exc.status != 409:
                raise
    raise PluginError("the object kept changing while it was being annotated; try again")


def _wait(what: str, check: Callable[[], Any], timeout: float, interval: float = 0.5) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        found = check()
        if found:
            return found
        if time.monotonic() >= deadline:
            raise PluginError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


# ---------------------------------------------------------------------------------------------------- commands
def cmd_status(kube: Kube, args: argparse.Namespace) -> int:
    dsd = kube.dsd(args.name)
    colors = {}
    for color in COLORS:
        found = kube.call("reading the color Deployments", kube.apps.read_namespaced_deployment,
                          color_deployment_name(args.name, color), kube.namespace)
        colors[color] = kube.api_client.sanitize_for_serialization(found) if found is not None else None
    listed = kube.call("reading Events", kube.core.list_namespaced_event, kube.namespace,
                       field_selector=f"involvedObject.name={args.name},involvedObject.kind=DeepSeekDeployment")
    events = [kube.api_client.sanitize_for_serialization(e) for e in (listed.items if listed else [])]
    print(describe_deployment(dsd, colors, recent_events(events), desired_revision=spec_revision(dsd, compute_revision),
                              now=time.time()))
    return 0


def _set_rollout_annotation(kube: Kube, name: str, annotation: str, pick: Callable[[dict[str, Any]], str],
                            done: str) -> int:
    def attempt() -> int:
        dsd = kube.dsd(name)
        revision = pick(dsd)
        if already_asked(dsd, annotation, revision):
            print(f"{annotation}={revision} is already set on DeepSeekDeployment {kube.namespace}/{name}; {done}")
            return 0
        kube.annotate(DEPLOYMENTS, dsd, {annotation: revision})
        print(f"set {annotation}={revision} on DeepSeekDeployment {kube.namespace}/{name}; {done}")
        return 0
    return _conflicts(attempt)


def cmd_promote(kube: Kube, args: argparse.Namespace) -> int:
    return _set_rollout_annotation(kube, args.name, PROMOTE_ANNOTATION, promote_target,
                                   "the operator switches traffic once the revision is verified")


def cmd_abort(kube: Kube, args: argparse.Namespace) -> int:
    return _set_rollout_annotation(kube, args.name, ABORT_ANNOTATION, abort_target,
                                   "the operator rolls it back and keeps traffic on the stable color")


def cmd_retry(kube: Kube, args: argparse.Namespace) -> int:
    def attempt() -> int:
        dsd = kube.dsd(args.name)
        revision = retry_target(dsd, spec_revision(dsd, compute_revision))
        if retry_needs_reset(dsd, revision):
            # This value already restarted the revision once: the operator forgets it only when the annotation
            # goes away, so remove it (unless already gone) and wait for status to show that before setting it again.
            if already_asked(dsd, RETRY_ANNOTATION, revision):
                kube.annotate(DEPLOYMENTS, dsd, {RETRY_ANNOTATION: None})

            def forgotten() -> dict[str, Any] | None:
                found = kube.dsd(args.name)
                return None if (found.get("status") or {}).get("retriedRevision") else found
            dsd = _wait("the operator to see the retry annotation removed", forgotten, args.timeout)
        changes: dict[str, str | None] = {RETRY_ANNOTATION: revision}
        aborted = already_asked(dsd, ABORT_ANNOTATION, revision)
        if aborted:
            changes[ABORT_ANNOTATION] = None  # left set, it would abort the retried rollout at once
        kube.annotate(DEPLOYMENTS, dsd, changes)
        print(f"set {RETRY_ANNOTATION}={revision} on DeepSeekDeployment {kube.namespace}/{args.name}"
              + (f" and removed {ABORT_ANNOTATION}={revision}" if aborted else "")
              + "; the operator rolls the failed revision out once more")
        return 0
    return _conflicts(attempt)


def cmd_keys(kube: Kube, args: argparse.Namespace) -> int:
    if args.all_namespaces:
        listed = kube.call("listing ApiKeys", kube.custom.list_cluster_custom_object, GROUP, VERSION, APIKEYS)
    else:
        listed = kube.call(f"listing ApiKeys in {kube.namespace}", kube.custom.list_namespaced_custom_object,
                           GROUP, VERSION, kube.namespace, APIKEYS)
    items = (listed or {}).get("items") or []
    if not items:
        where = "any namespace" if args.all_namespaces else f"namespace {kube.namespace!r}"
        print(f"No ApiKeys found in {where}.")
        return 0
    print(keys_table(items, now=time.time(), with_namespace=args.all_namespaces))
    return 0


def _rfc3339_now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _ready(status: dict[str, Any]) -> dict[str, Any]:
    """An ApiKey's Ready condition ({} when it has none yet)."""
    return next((c for c in status.get("conditions") or [] if c.get("type") == "Ready"), {})


def _held_rotation(status: dict[str, Any]) -> str | None:
    """The Ready condition's message when the key's next token is held back (too many tokens out), else None."""
    ready = _ready(status)
    return str(ready.get("message")) if ready.get("reason") in HELD_READY_REASONS else None


def cmd_rotate(kube: Kube, args: argparse.Namespace) -> int:
    apikey = kube.apikey(args.name)
    if (apikey.get("spec") or {}).get("revoked"):
        raise PluginError(f"ApiKey {kube.namespace}/{args.name} is revoked; set spec.revoked to false to issue a new "
                          "token instead")
    status = apikey.get("status") or {}
    held = _held_rotation(status)
    if held:  # before "no token yet": a key at its bound of tokens out may have none in force, and had many
        raise PluginError(f"ApiKey {kube.namespace}/{args.name} cannot have another token yet: {held}")
    if not status.get("tokenId"):
        # Nothing to rotate: waiting for the operator would only time out. Say why the key has no token.
        ready = _ready(status)
        why = (f"Ready={ready.get('status')}, {ready.get('reason')}: {ready.get('message')}" if ready
               else "the operator has not reported on it yet")
        raise PluginError(f"ApiKey {kube.namespace}/{args.name} has no token to rotate yet ({why}); it gets its first "
                          "token as soon as it can")
    request = _rfc3339_now()
    previous = status.get("tokenId")

    def ask() -> int:
        kube.annotate(APIKEYS, kube.apikey(args.name), {ROTATE_ANNOTATION: request})
        return 0
    _conflicts(ask)
    if args.no_wait:
        print(f"asked the operator to rotate ApiKey {kube.namespace}/{args.name} ({ROTATE_ANNOTATION}={request})")
        return 0

    def rotated() -> dict[str, Any] | None:
        status = kube.apikey(args.name).get("status") or {}
        held = _held_rotation(status)
        if held:
            raise PluginError(f"ApiKey {kube.namespace}/{args.name} keeps its token for now: {held}; the rotation "
                              "asked for happens then on its own")
        return dict(status) if status.get("rotationRequest") == request and not status.get("pendingToken") else None
    status = _wait(f"the operator to rotate ApiKey {kube.namespace}/{args.name}", rotated, args.timeout)
    grace = [p for p in status.get("previousTokens") or [] if p.get("tokenId") == previous]
    old = (f"; the previous token {previous} keeps working until {grace[0].get('revokeAt')}" if grace
           else f"; the previous token {previous} is revoked" if previous else "")
    print(f"rotated ApiKey {kube.namespace}/{args.name}: token {status.get('tokenId')} is in Secret "
          f"{status.get('secretName')}, expires {status.get('expiresAt')}{old}")
    return 0


def cmd_env(kube: Kube, args: argparse.Namespace) -> int:
    apikey = kube.apikey(args.name)
    spec, status = apikey.get("spec") or {}, apikey.get("status") or {}
    if spec.get("revoked"):
        raise PluginError(f"ApiKey {kube.namespace}/{args.name} is revoked: it has no token")
    secret_name = status.get("secretName") or apikey_secret_name(args.name, spec)
    secret = kube.call(f"reading Secret {kube.namespace}/{secret_name}", kube.core.read_namespaced_secret,
                       secret_name, kube.namespace)
    data = (secret.data or {}) if secret is not None else {}
    needed = ("OPENAI_API_KEY",) if args.base_url else ("OPENAI_API_KEY", "OPENAI_BASE_URL")
    missing = [name for name in needed if name not in data]
    if secret is None or missing:
        ready = _ready(status)
        why = f" (Ready={ready.get('status')}, {ready.get('reason')}: {ready.get('message')})" if ready else ""
        raise PluginError(f"Secret {kube.namespace}/{secret_name} of ApiKey {args.name} "
                          f"{'does not exist' if secret is None else 'has no ' + ', '.join(missing)} yet{why}")
    values = {name: base64.b64decode(data[name]).decode() for name in needed}
    stale = stale_token_reason(status, values["OPENAI_API_KEY"])
    if stale:  # the key as it is now: a rotation may have written the Secret after the key was read
        stale = stale_token_reason(kube.apikey(args.name).get("status") or {}, values["OPENAI_API_KEY"])
    if stale:
        raise PluginError(f"ApiKey {kube.namespace}/{args.name}: {stale}")
    if args.base_url:
        values["OPENAI_BASE_URL"] = args.base_url
    print(env_exports(values))
    return 0


def base_url(value: str) -> str:
    """An http(s) URL for --base-url, without a trailing slash (the OpenAI clients add their own)."""
    parts = urllib.parse.urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.query or parts.fragment:
        raise argparse.ArgumentTypeError(f"{value!r} is not an http(s) URL such as http://127.0.0.1:8000/v1")
    return value.rstrip("/")


# ---------------------------------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-n", "--namespace", help="namespace (default: the kubeconfig context's, else 'default')")
    common.add_argument("--context", help="kubeconfig context to use")
    common.add_argument("--kubeconfig", help="path to the kubeconfig file (default: $KUBECONFIG or ~/.kube/config)")

    parser = argparse.ArgumentParser(
        prog="kubectl deepseek",
        description="Day-2 commands for DeepSeekDeployments (rollouts) and ApiKeys of deepseek-operator.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    status = sub.add_parser("status", parents=[common], help="a deployment's rollout, colors, checks and history",
                            description="Show a DeepSeekDeployment in words: serving color and revision, the "
                                        "rollout phase and its verification results, both colors, conditions, "
                                        "history and recent events.")
    status.add_argument("name", metavar="DSD", help="DeepSeekDeployment name")
    status.set_defaults(run=cmd_status)

    for name, run, text in (
        ("promote", cmd_promote, "switch traffic to the revision being rolled out (deepseek.ai/promote=<revision>); "
                                 "with autoPromote: false a verified revision waits for this"),
        ("abort", cmd_abort, "roll back the revision being rolled out (deepseek.ai/abort=<revision>); traffic "
                             "stays on or returns to the stable color"),
        ("retry", cmd_retry, "roll out the failed revision the spec asks for once more "
                             "(deepseek.ai/retry=<revision>)"),
    ):
        command = sub.add_parser(name, parents=[common], help=text.split(" (")[0], description=text[0].upper()
                                 + text[1:] + ". The revision is read from the deployment's status.")
        command.add_argument("name", metavar="DSD", help="DeepSeekDeployment name")
        if run is cmd_retry:  # the only one that waits: for the operator to forget a retry it ran before
            command.add_argument("--timeout", type=float, default=60.0,
                                 help="seconds to wait for the operator to forget an earlier retry of the same "
                                      "revision, where there was one (default 60)")
        command.set_defaults(run=run)

    keys = sub.add_parser("keys", parents=[common], help="list ApiKeys: subject, environment, scopes, expiry, "
                                                         "when the token was issued",
                          description="List ApiKeys with their subject, environment, scopes, readiness, expiry, when "
                                      "the token in force was issued and how many were issued (never a token).")
    keys.add_argument("-A", "--all-namespaces", action="store_true", help="list ApiKeys of every namespace")
    keys.set_defaults(run=cmd_keys)

    rotate = sub.add_parser("rotate", parents=[common], help="rotate an ApiKey's token now",
                            description="Ask the operator to rotate an ApiKey's token now (the deepseek.ai/rotate "
                                        "annotation, set to the current time: each value rotates once). The old "
                                        "token keeps working for the key's gracePeriod.")
    rotate.add_argument("name", metavar="KEY", help="ApiKey name")
    rotate.add_argument("--no-wait", action="store_true", help="return once asked, without waiting for the new token")
    rotate.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for the new token (default 60)")
    rotate.set_defaults(run=cmd_rotate)

    env = sub.add_parser("env", parents=[common], help="print OPENAI_API_KEY / OPENAI_BASE_URL exports",
                         description="Print shell exports of an ApiKey's OPENAI_API_KEY and OPENAI_BASE_URL, "
                                     "e.g. eval \"$(kubectl deepseek env alice)\". The output holds the token.")
    env.add_argument("name", metavar="KEY", help="ApiKey name")
    env.add_argument("--base-url", type=base_url, metavar="URL",
                     help="export this OPENAI_BASE_URL instead of the Secret's, which is the in-cluster Service "
                          "address: for a client outside the cluster, e.g. through `kubectl port-forward "
                          "svc/<deployment> 8000` (http://127.0.0.1:8000/v1) or an Ingress")
    env.set_defaults(run=cmd_env)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        kube = Kube(args.kubeconfig, args.context, args.namespace)
        return int(args.run(kube, args))
    except PluginError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader left (`| head`): nothing more to say, and nothing to flush at exit either.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
