"""The ApiKey reconcile: gather, decide (`apikey_plan`), act in a crash-safe order, write status whole.

Order of effects, so that a SIGKILL between any two steps neither loses a revocation nor issues twice:
1. revocations and limits reach the auth ConfigMap (durably) before status forgets any token id;
2. a new token's id and hash are written to status as `pendingToken` before the token goes into the Secret;
3. status makes the pending token current only after the Secret holds it.
A restarted reconcile settles a leftover `pendingToken` by looking at the Secret (see `resolve_pending`).
"""

from __future__ import annotations

import logging
import random
import re
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from . import failpoints
from .apikey_plan import (
    HELD_READY_REASONS,
    TOKEN_FIELDS,
    ApiKeyEvent,
    IssuerView,
    apikey_conditions,
    build_grant,
    current_binding,
    issue_event,
    live_tokens,
    next_due,
    plan_apikey,
    promote_pending,
    with_pending,
)
from .apikey_secret import build_apikey_secret, secret_token, secret_up_to_date
from .apikey_secret_watch import ApiKeySecretWatch, SecretVersion
from .auth_config import AuthChange, RevokeTokens, SetKeyLimits
from .auth_store import AuthConfigFull, AuthConfigStore
from .conditions import Condition, condition_reason, merge_conditions
from .durations import format_timestamp, parse_duration
from .issuer import Issuers
from .key_material import new_token_id
from .kube import APIKEYS, DEEPSEEKDEPLOYMENTS, SECRETS, Conflict, KubeApi, KubeError, namespace_terminating
from .names import FINALIZER, apikey_secret_name
from .settings import OperatorSettings
from .tokens import sign_token, token_sha256, verified_claims

log = logging.getLogger(__name__)
# A Secret the API server refuses to take is tried again after retry_interval, doubling up to this.
SECRET_WRITE_MAX_BACKOFF = 300.0
# A token as issued (`eyJ...`), or as a Secret's data holds it (base64 of `eyJ`: `ZXlK...`), in an error a webhook or
# proxy might echo from the request body.
_JWT_LIKE = re.compile(r"eyJ[\w-]*\.[\w-]*\.[\w-]*|ZXlK[A-Za-z0-9+/]{16,}=*")


def without_tokens(text: str) -> str:
    """`text` with anything that looks like a token, plain or base64-encoded, replaced by `<token>`."""
    return _JWT_LIKE.sub("<token>", text)
# Issue reasons that bring a key (back) into use, as opposed to rotating one in use: these wait when the auth
# ConfigMap has no room.
NEW_KEY_REASONS = frozenset({"Initial", "Unrevoked"})
# A key whose deployment does not exist is tried again after retry_interval, doubling up to this; the deployment's
# first reconcile wakes it at once (OperatorRuntime.reconcile_deployment), so the back-off only bounds polling.
MISSING_DEPLOYMENT_MAX_BACKOFF = 300.0
OWN_VERSIONS_KEPT = 4


class _SecretNameInUse(Exception):
    """A Secret was created without reading first and its name exists: reconcile again, reading it this time."""


def first_issuance(apikey: Mapping[str, Any]) -> bool:
    """Whether the key (as observed) has never held a token: no token, none pending, not revoked, not deleting.

    Such a key's Secret is created without reading it first (a 409 sends the reconcile back to read it)."""
    status = apikey.get("status") or {}
    return not ((apikey.get("metadata") or {}).get("deletionTimestamp") or (apikey.get("spec") or {}).get("revoked")
                or status.get("tokenId") or status.get("pendingToken"))


@dataclass(frozen=True)
class SecretWriteFailure:
    """The last failed attempts to write a key's Secret: how many in a row, the next allowed one, and why."""

    attempts: int
    retry_at: float
    message: str


def secret_write_failed(previous: SecretWriteFailure | None, error: Exception, *, secret_name: str, now: float,
                        retry_interval: float) -> SecretWriteFailure:
    """The failure record after one more refused write: exponential backoff, the API's message without a token."""
    attempts = (previous.attempts if previous else 0) + 1
    delay = min(SECRET_WRITE_MAX_BACKOFF, retry_interval * 2 ** (attempts - 1))
    detail = without_tokens(str(error))[:500] or type(error).__name__
    return SecretWriteFailure(attempts, now + delay, f"could not write Secret {secret_name}: {detail}")


def secret_known_unchanged(status: Mapping[str, Any], secret_name: str, apikey_uid: str,
                           seen: SecretVersion | None) -> bool:
    """Whether the key's Secret, as the Secret watch last saw it (`seen`), is at the resourceVersion status recorded
    when the operator last wrote it or read it holding the current token (pure): then it still holds that token,
    and a reconcile need not read it."""
    return (seen is not None and bool(status.get("tokenId")) and not status.get("pendingToken")
            and status.get("secretName") == secret_name and bool(status.get("secretResourceVersion"))
            and status.get("secretResourceVersion") == seen.resource_version and seen.owner_uid == apikey_uid)


def drift_check_interval(*, watched: bool, keys: int, resync_interval: float, check_interval: float,
                         checks_per_second: float) -> float:
    """How long until a key's Secret is read again on a timer (pure). With the Secret watch in sync a change wakes
    its key, so the timer is only a rare safety resync; without it, the timer is the drift check, stretched so that
    all `keys` together stay within `checks_per_second`."""
    if watched:
        return max(resync_interval, keys / checks_per_second)
    return max(check_interval, keys / checks_per_second)


def write_landed_nowhere(error: Exception) -> bool:
    """Whether a failed write certainly changed nothing: the API server answered it with a 4xx."""
    return isinstance(error, KubeError) and 400 <= error.status < 500


@dataclass(frozen=True)
class StatusWrite:
    """A first issuance's status, left to write after its token is in the Secret (see `ApiKeyReconciler.reconcile`,
    `defer_status`): what the status write needs of the key as observed (`status_target`), and the status. Only
    that is kept: thousands of these may wait at once."""

    apikey: dict[str, Any]
    status: dict[str, Any]


def status_target(apikey: Mapping[str, Any]) -> dict[str, Any]:
    """The key as the status subresource needs it (pure): identity, and the uid and resourceVersion that guard the
    write. The status subresource takes nothing but status from a body; spec, labels and managed fields would only
    be sent, decoded and dropped."""
    meta = apikey["metadata"]
    return {"apiVersion": apikey["apiVersion"], "kind": apikey["kind"],
            "metadata": {"name": meta["name"], "namespace": meta["namespace"], "uid": meta["uid"],
                         "resourceVersion": meta["resourceVersion"]}}


@dataclass(frozen=True)
class ReconcileResult:
    """What the scheduler needs: when to come back, and which deployment the key belongs to; and a status left for
    the caller to write (`write_status`) when the reconcile was asked to defer a first issuance's."""

    next_due: float | None
    deployment: str | None
    status_write: StatusWrite | None = None


class ApiKeyReconciler:
    def __init__(
        self, kube: KubeApi, issuers: Issuers, auth_store: AuthConfigStore, settings: OperatorSettings,
        *, clock: Callable[[], float] = time.time,
    ) -> None:
        self._kube = kube
        self._issuers = issuers
        self._auth = auth_store
        self._settings = settings
        self._clock = clock
        self._locks: dict[tuple[str, str], threading.Lock] = {}
        self._locks_guard = threading.Lock()
        # In memory on purpose: after a restart one more attempt is cheap, and status needs no extra field.
        self._secret_failures: dict[tuple[str, str], SecretWriteFailure] = {}
        self._missing_deployment: dict[tuple[str, str], int] = {}
        # resourceVersions of the last ApiKey writes made by reconciles (finalizer, status): their watch events are
        # ours and ask for nothing (see `caused_by_own_write`). Several, since events may arrive after later writes.
        self._own_versions: dict[tuple[str, str], tuple[str, ...]] = {}
        # Per key: (Secret name, resourceVersion) of its Secret as last written or verified by this process (None:
        # deleted by it). A Secret watch event at that version is the operator's own write and asks for nothing.
        self._known_secrets: dict[tuple[str, str], tuple[str, str | None]] = {}
        # Keys whose last reconcile left them not Ready, with their deployment: its appearance wakes them.
        self._waiting: dict[tuple[str, str], str] = {}
        # Set by the runtime: metadata of the ApiKey Secrets (resourceVersion, owner), kept by a watch.
        self.secret_watch: ApiKeySecretWatch | None = None

    def _lock(self, namespace: str, name: str) -> threading.Lock:
        with self._locks_guard:
            return self._locks.setdefault((namespace, name), threading.Lock())

    def forget(self, namespace: str, name: str) -> None:
        with self._locks_guard:
            self._locks.pop((namespace, name), None)
            self._secret_failures.pop((namespace, name), None)
            self._missing_deployment.pop((namespace, name), None)
            self._own_versions.pop((namespace, name), None)
            self._known_secrets.pop((namespace, name), None)
            self._waiting.pop((namespace, name), None)

    def waiting_keys(self, namespace: str, deployment: str) -> list[str]:
        """Names of the keys of `deployment` whose last reconcile left them not Ready."""
        with self._locks_guard:
            return [name for (ns, name), dep in self._waiting.items() if ns == namespace and dep == deployment]

    def _note_ready(self, namespace: str, name: str, deployment: str, ready: bool) -> None:
        with self._locks_guard:
            if ready:
                self._waiting.pop((namespace, name), None)
            else:
                self._waiting[(namespace, name)] = deployment

    def secret_version_known(self, namespace: str, name: str, secret_name: str, resource_version: str | None) -> bool:
        """Whether the key's Secret at `resource_version` (None: deleted) is as this process last wrote or verified
        it: a watch event of that version is the operator's own doing."""
        return self._known_secrets.get((namespace, name)) == (secret_name, resource_version)

    def _remember_secret(self, namespace: str, name: str, secret_name: str, resource_version: str | None) -> None:
        self._known_secrets[(namespace, name)] = (secret_name, resource_version)

    def caused_by_own_write(self, namespace: str, name: str, resource_version: str | None) -> bool:
        """Whether this version of the key is one that a reconcile of this process wrote (its event asks for
        nothing: the reconcile that wrote it went on from there)."""
        return resource_version is not None and resource_version in self._own_versions.get((namespace, name), ())

    def reconcile(self, namespace: str, name: str, observed: dict[str, Any] | None = None, *,
                  defer_status: bool = False) -> ReconcileResult:
        """Bring one ApiKey to its desired state, starting from `observed` (the watch event's object) when given;
        retried from a fresh read when the object changed meanwhile.

        `defer_status`: a first token that reached the Secret is usable at once; its status (Ready, token id) is
        returned as `status_write` for the caller to write later with `write_status`, instead of being written now.
        In a burst of new keys the Secrets then come first, one write per key, and the statuses after them. Safe at
        any point: a key whose status was never written holds a token of ours in its Secret, which the next
        reconcile adopts (as after a crash between the two writes)."""
        read_secret = observed is None or not first_issuance(observed)
        with self._lock(namespace, name):
            for _ in range(8):
                try:
                    return self._reconcile_once(namespace, name, observed, read_secret=read_secret,
                                                defer_status=defer_status)
                except Conflict:
                    observed = None
                    continue
                except _SecretNameInUse:
                    observed, read_secret = None, True
                    continue
            raise Conflict(409, "Conflict", f"ApiKey {namespace}/{name} kept changing", "PUT", name)

    def write_status(self, namespace: str, name: str, write: StatusWrite) -> ReconcileResult | None:
        """Write a status a reconcile deferred (`defer_status`). The key changed since it was observed (a 409): it is
        reconciled afresh instead, from a read of it and its Secret, and that reconcile's result is returned."""
        with self._lock(namespace, name):
            failpoints.reached("apikey:before-deferred-status", f"{namespace}/{name}")
            try:
                self._write_status(write.apikey, write.status)
                return None
            except Conflict:
                pass
        return self.reconcile(namespace, name)

    def _write_status(self, apikey: dict[str, Any], status: dict[str, Any]) -> dict[str, Any]:
        body = {**status_target(apikey), "status": status}
        written = self._kube.replace_status(APIKEYS, apikey["metadata"]["namespace"], body)
        self._remember_own_write(written)
        return written

    def _remember_own_write(self, apikey: dict[str, Any]) -> None:
        meta = apikey["metadata"]
        key = (meta["namespace"], meta["name"])
        self._own_versions[key] = (*self._own_versions.get(key, ())[-(OWN_VERSIONS_KEPT - 1):], meta["resourceVersion"])

    def _events(self, apikey: dict[str, Any], events: list[ApiKeyEvent]) -> None:
        for event in events:
            self._kube.post_event(apikey, type_=event.type, reason=event.reason, message=event.message)
            log.info("%s %s/%s: %s", event.reason, apikey["metadata"]["namespace"], apikey["metadata"]["name"],
                     event.message)

    def _reconcile_once(self, namespace: str, name: str, observed: dict[str, Any] | None, *,
                        read_secret: bool, defer_status: bool = False) -> ReconcileResult:
        # The watch event's object is as fresh as a GET would be; if it is not, the first write is refused (409,
        # resourceVersion) and the retry reads.
        apikey = observed if observed is not None else self._kube.get(APIKEYS, namespace, name)
        if apikey is None:
            return ReconcileResult(None, None)
        from_event = observed is not None  # not read by this attempt: it may predate a write of ours
        finalizers = list(apikey["metadata"].get("finalizers") or [])
        if apikey["metadata"].get("deletionTimestamp"):
            if FINALIZER in finalizers:
                self._finalize(apikey)
                # Release the key only now that every token of it is in the revoked list.
                self._kube.merge(APIKEYS, namespace, name, finalizer_removed(apikey))
            return ReconcileResult(None, None)
        if FINALIZER not in finalizers:
            # Before any token exists: a key deleted from now on is finalized (its tokens revoked) first.
            apikey = self._kube.merge(APIKEYS, namespace, name, {"metadata": {
                "finalizers": [*finalizers, FINALIZER], "resourceVersion": apikey["metadata"]["resourceVersion"]}})
            self._remember_own_write(apikey)
            from_event = False
        meta, spec = apikey["metadata"], apikey["spec"]
        uid, generation = meta["uid"], int(meta.get("generation", 1))
        deployment = spec["deploymentRef"]["name"]
        now = int(self._clock())
        found = self._issuers.view_for(namespace, deployment, uid)
        issuer, dsd = found if found else (None, None)
        secret_name = apikey_secret_name(name, spec)
        previous_status = dict(apikey.get("status") or {})
        # A key that never held a token almost never has a Secret yet: it is created without a read, and a 409
        # (name in use: ours from an interrupted reconcile, or someone else's) sends the reconcile back to read it.
        # A key judged from a watch event whose Secret is at the version status recorded is not read either (after
        # a restart: 10,000 keys, no GET); the timer's and the Secret watch's reconciles (no event object) read.
        secret: dict[str, Any] | None = None
        unchanged = False
        if read_secret or issuer is None:
            unchanged = observed is not None and self.secret_watch is not None and secret_known_unchanged(
                previous_status, secret_name, uid, self.secret_watch.lookup(namespace, secret_name))
            if not unchanged:
                secret = self._kube.get(SECRETS, namespace, secret_name)

        while True:
            if secret is not None and not owned_by(secret, uid):
                if not spec.get("revoked"):
                    return self._secret_taken(apikey, previous_status, secret, now)
                # A Secret this key does not own (its owner reference removed, or another's) is neither written nor
                # deleted, but a revocation by spec still revokes every token the key has issued.
                secret = None
            token = secret_token(secret)
            secret_current = unchanged
            if secret is not None and token and issuer is not None:
                desired = build_apikey_secret(apikey=apikey, secret_name=secret_name, deployment=deployment,
                                              token=token, base_url=issuer.base_url)
                secret_current = secret_up_to_date(secret, desired)
            claims = self._own_token_claims(token, issuer, uid, now)
            plan = plan_apikey(apikey, secret_exists=secret is not None or unchanged, secret_token=token,
                               secret_current=secret_current, issuer=issuer, now=now, secret_claims=claims,
                               secret_sha=previous_status["tokenSHA256"] if unchanged else None)
            if not (unchanged and (plan.issue_reason or plan.repair_secret or plan.delete_secret)):
                break
            # The Secret is to be written or deleted: read what it holds first, and decide from that.
            secret, unchanged = self._kube.get(SECRETS, namespace, secret_name), False
        # The Secret's version once this reconcile is done, when it then holds the current token as it should.
        verified_version: str | None = None
        if unchanged:
            verified_version = previous_status["secretResourceVersion"]
        elif (secret is not None and token and secret_current and plan.issue_reason is None
              and token_sha256(token) == plan.status.get("tokenSHA256")):
            verified_version = secret["metadata"]["resourceVersion"]
        status = dict(plan.status)
        events = list(plan.events)

        changes: list[AuthChange] = []
        if plan.revoke and from_event:
            # Revocations go to the auth ConfigMap, a write that the key's resourceVersion does not guard: decided
            # from an event's object older than a status write of ours (a reconcile that overtook this one), they
            # could revoke the token that status and the Secret now hold. Decide again from a read if it changed.
            fresh = self._kube.get(APIKEYS, namespace, name)
            if fresh is None or fresh["metadata"]["resourceVersion"] != apikey["metadata"]["resourceVersion"]:
                raise Conflict(409, "Conflict", f"ApiKey {namespace}/{name} changed since its watch event", "GET",
                               name)
        if plan.revoke:
            changes.append(RevokeTokens(plan.revoke))
        if plan.limits is not None:
            changes.append(plan.limits)
        auth_full = ""
        if changes and dsd is not None:
            try:
                self._auth.commit(namespace, deployment, changes, owner=dsd)
            except AuthConfigFull as exc:
                # The revocations of this commit are stored; only this key's new limits entry waits for room.
                auth_full = str(exc)
            failpoints.reached("apikey:after-auth-commit", f"{namespace}/{name}")
        if plan.issue_reason in NEW_KEY_REASONS and dsd is not None and not auth_full:
            # A new key would later add revocations of its own; existing keys' rotations keep the reserve.
            auth_full = self._auth.new_keys_wait_reason(namespace, deployment)
        if auth_full and plan.issue_reason in NEW_KEY_REASONS:
            plan = replace(plan, issue_reason=None)

        if issuer is not None and not spec.get("revoked"):
            status["secretName"] = secret_name
            self._missing_deployment.pop((namespace, name), None)
        failure = self._secret_failures.get((namespace, name))
        if not plan.issue_reason:
            self._secret_failures.pop((namespace, name), None)
            failure = None
        if plan.issue_reason and issuer is not None and issuer.signing_key is not None:
            if failure is None or now >= failure.retry_at:
                status, apikey, failure, verified_version = self._issue(
                    apikey, status, issuer, plan.issue_reason, plan.previous_revoke_at, secret_name, secret, now,
                    failure, rotation_request=plan.rotation_request, secret_read=read_secret)
                if failure is None:
                    if plan.issue_reason != "Initial":
                        # A first token is recorded in status (Ready, TokenIssued); an Event per new key would be
                        # one more write each in a burst of thousands. Rotations and revocations get Events.
                        events.append(issue_event(plan.issue_reason, status["tokenId"], status["expiresAt"],
                                                  secret_name, plan.issue_detail))
                else:
                    events.append(ApiKeyEvent("Warning", "SecretWriteFailed",
                                              f"{failure.message}; next attempt in "
                                              f"{max(0, int(failure.retry_at - now))} s"))
            if failure is not None and status.get("tokenId") in plan.revoke:
                # The replacement did not reach the Secret: stop calling a revoked token current.
                for field_name in TOKEN_FIELDS:
                    status.pop(field_name, None)
        elif plan.repair_secret and token and issuer is not None:
            repaired = self._kube.create_or_replace(
                SECRETS, namespace,
                build_apikey_secret(apikey=apikey, secret_name=secret_name, deployment=deployment, token=token,
                                    base_url=issuer.base_url),
                up_to_date=secret_up_to_date)
            verified_version = repaired["metadata"]["resourceVersion"]
            self._remember_secret(namespace, name, secret_name, verified_version)
        if plan.delete_secret and secret is not None:
            self._kube.delete(SECRETS, namespace, secret_name, uid=secret["metadata"]["uid"])
            self._remember_secret(namespace, name, secret_name, None)
            status.pop("secretName", None)
        if verified_version and status.get("tokenId") and not status.get("pendingToken") and not spec.get("revoked"):
            status["secretResourceVersion"] = verified_version
            self._remember_secret(namespace, name, secret_name, verified_version)
        else:
            status.pop("secretResourceVersion", None)

        conditions = apikey_conditions(apikey, status, issuer, now=now, deployment=deployment,
                                       secret_write_error=failure.message if failure else None,
                                       auth_config_full=auth_full, held_reason=plan.held_reason,
                                       held_until=plan.held_until)
        ready_now = conditions[0]
        if (ready_now.reason in HELD_READY_REASONS
                and ready_now.reason != condition_reason(previous_status.get("conditions"), "Ready")):
            events.append(ApiKeyEvent("Warning", ready_now.reason, ready_now.message))
        status["conditions"] = merge_conditions(previous_status.get("conditions"), conditions,
                                                now=format_timestamp(now), generation=generation)
        status["observedGeneration"] = generation
        # A first token now in the Secret, nothing else to say: its status may wait (see `reconcile`).
        deferred = (defer_status and plan.issue_reason == "Initial" and failure is None and not events
                    and bool(status.get("tokenId")) and not status.get("pendingToken"))
        if deferred:
            status_write: StatusWrite | None = StatusWrite(status_target(apikey), status)
        else:
            status_write = None
            if status != (apikey.get("status") or {}):
                apikey = self._write_status(apikey, status)
            self._events(apikey, events)
        ready = conditions[0].status is True
        self._note_ready(namespace, name, deployment, ready or bool(spec.get("revoked")))
        due = next_due(status, ready=ready, revoked=bool(spec.get("revoked")), now=now,
                       retry_interval=self._settings.retry_interval, held_until=plan.held_until)
        if failure is not None:
            due = failure.retry_at
        if issuer is None and not spec.get("revoked"):
            due = now + self._missing_deployment_backoff(namespace, name)
        # Spread the checks: keys created together would otherwise all be checked in the same second.
        watch = self.secret_watch
        interval = drift_check_interval(
            watched=watch is not None and watch.synced, keys=len(self._locks),
            resync_interval=self._settings.secret_resync_interval, check_interval=self._settings.drift_check_interval,
            checks_per_second=self._settings.drift_checks_per_second)
        drift = now + interval * random.uniform(0.8, 1.2)
        return ReconcileResult(drift if due is None else min(due, drift), deployment, status_write)

    @staticmethod
    def _own_token_claims(token: str | None, issuer: IssuerView | None, uid: str,
                          now: int) -> dict[str, Any] | None:
        """Claims of the Secret's token when this operator signed it for this key and has not revoked it."""
        if not token or issuer is None:
            return None
        claims = verified_claims(token, issuer.verification_keys, issuer=issuer.issuer, audience=issuer.audience,
                                 apikey_uid=uid, now=now)
        if claims is None or claims.get("jti") in issuer.revoked:
            return None
        return claims

    def _issue(
        self, apikey: dict[str, Any], status: dict[str, Any], issuer: IssuerView, reason: str,
        previous_revoke_at: int | None, secret_name: str, secret: dict[str, Any] | None, now: int,
        failure: SecretWriteFailure | None, *, rotation_request: str | None = None, secret_read: bool = True,
    ) -> tuple[dict[str, Any], dict[str, Any], SecretWriteFailure | None, str | None]:
        """Mint a token, write it to the Secret and make it current. Returns (status, apikey, write failure, the
        written Secret's resourceVersion).

        A token that replaces another is first recorded as `pendingToken`, so that a restart can tell whether the
        replacement reached the Secret. A first token needs no such record: found in the Secret, it verifies as
        ours and is adopted (see `plan_apikey`); not found, it never left the operator.

        A write the API server refuses (4xx: quota, immutable Secret, admission) is recorded and backed off: the
        token reached no one, so it is dropped rather than revoked, and no new one is minted before the retry time.
        Any other failure also backs off, and leaves `pendingToken` for the next reconcile to settle.
        """
        assert issuer.signing_key is not None
        namespace = apikey["metadata"]["namespace"]
        grant = build_grant(apikey, issuer, token_id=new_token_id(), now=now)
        token = sign_token(grant, issuer.signing_key)
        status = with_pending(status, grant=grant, token=token, signing_key_id=issuer.signing_key.kid, reason=reason,
                              binding=current_binding(apikey, issuer), previous_revoke_at=previous_revoke_at,
                              rotation_request=rotation_request)
        if status.get("tokenId"):
            apikey = self._write_status(apikey, status)
            failpoints.reached("apikey:after-pending", f"{namespace}/{apikey['metadata']['name']}")
        key = (namespace, apikey["metadata"]["name"])
        desired = build_apikey_secret(apikey=apikey, secret_name=secret_name, deployment=issuer.deployment,
                                      token=token, base_url=issuer.base_url)
        try:
            if secret_read:
                written = self._kube.write(SECRETS, namespace, desired, current=secret, up_to_date=secret_up_to_date)
            else:
                try:
                    written = self._kube.create(SECRETS, namespace, desired)
                except Conflict:
                    # Not read first, so never written over: the retry reads it (owner, a token to adopt).
                    raise _SecretNameInUse() from None
        except _SecretNameInUse:
            raise
        except Exception as exc:
            failure = secret_write_failed(failure, exc, secret_name=secret_name, now=now,
                                          retry_interval=self._settings.retry_interval)
            self._secret_failures[key] = failure
            if not write_landed_nowhere(exc):
                raise
            log.warning("ApiKey %s/%s: %s", namespace, key[1], failure.message)
            status.pop("pendingToken", None)
            return status, apikey, failure, None
        # Remembered at once, so that the Secret watch's event of this write is known as the operator's own.
        version = str(written["metadata"]["resourceVersion"])
        self._remember_secret(namespace, key[1], secret_name, version)
        self._secret_failures.pop(key, None)
        failpoints.reached("apikey:after-secret", f"{namespace}/{apikey['metadata']['name']}")
        return (promote_pending(status, parse_duration(apikey["spec"].get("renewBefore", "24h"))), apikey, None,
                version)

    def _missing_deployment_backoff(self, namespace: str, name: str) -> float:
        attempts = self._missing_deployment.get((namespace, name), 0) + 1
        self._missing_deployment[(namespace, name)] = attempts
        return min(MISSING_DEPLOYMENT_MAX_BACKOFF, self._settings.retry_interval * 2 ** (attempts - 1))

    def _secret_taken(self, apikey: dict[str, Any], status: dict[str, Any], secret: dict[str, Any],
                      now: int) -> ReconcileResult:
        generation = int(apikey["metadata"].get("generation", 1))
        owners = [f"{ref.get('kind')} {ref.get('name')}" for ref in secret["metadata"].get("ownerReferences") or []]
        conditions = [Condition("Ready", False, "SecretNameTaken",
                                f"Secret {secret['metadata']['name']} exists and is not owned by this ApiKey (its "
                                f"owner: {', '.join(owners) or 'none'}); delete it or set another spec.secretName "
                                "on a new ApiKey")]
        status = dict(status)
        status["conditions"] = merge_conditions(status.get("conditions"), conditions, now=format_timestamp(now),
                                                generation=generation, keep_others=True)
        status["observedGeneration"] = generation
        if status != (apikey.get("status") or {}):
            self._write_status(apikey, status)
        self._note_ready(apikey["metadata"]["namespace"], apikey["metadata"]["name"],
                         apikey["spec"]["deploymentRef"]["name"], False)
        return ReconcileResult(now + self._settings.retry_interval, apikey["spec"]["deploymentRef"]["name"])

    def _finalize(self, apikey: dict[str, Any]) -> None:
        """Deletion: revoke every live token of the key, drop its limits, delete its Secret."""
        namespace, name = apikey["metadata"]["namespace"], apikey["metadata"]["name"]
        status = apikey.get("status") or {}
        spec = apikey["spec"]
        uid = apikey["metadata"]["uid"]
        deployment = spec["deploymentRef"]["name"]
        dsd = self._kube.get(DEEPSEEKDEPLOYMENTS, namespace, deployment)
        live = live_tokens(status, self._clock())
        secret_name = apikey_secret_name(name, spec)
        secret = self._kube.get(SECRETS, namespace, secret_name)
        owned = secret is not None and owned_by(secret, uid)
        found = self._issuers.view_for(namespace, deployment, uid) if dsd is not None and owned else None
        claims = self._own_token_claims(secret_token(secret), found[0] if found else None, uid,
                                        int(self._clock()))
        if claims:  # a token in the Secret that status never recorded: revoke it too
            live[claims["jti"]] = int(claims["exp"])
        if dsd is not None:
            changes: list[AuthChange] = [SetKeyLimits(uid, None)]
            if live:
                changes.append(RevokeTokens(live))
            try:
                self._auth.commit(namespace, deployment, changes, owner=dsd)
            except KubeError as exc:
                if not namespace_terminating(exc):
                    raise
                # The namespace is being deleted and its auth ConfigMap already is: it cannot be made again, and the
                # servers that read it go with the namespace. Retrying would only hold the namespace in Terminating.
                log.info("ApiKey %s/%s: namespace is being deleted with its auth ConfigMap; no revocation to write",
                         namespace, name)
        failpoints.reached("apikey:finalize-after-auth-commit", f"{namespace}/{name}")
        if owned and secret is not None:
            self._kube.delete(SECRETS, namespace, secret_name, uid=secret["metadata"]["uid"])
        if live:
            self._events(apikey, [ApiKeyEvent("Normal", "Revoked",
                                              f"Revoked {len(live)} token(s) ({', '.join(sorted(live))}): "
                                              "the ApiKey is being deleted" if dsd is not None else
                                              revoked_with_deployment(live, deployment))])


def owned_by(obj: Mapping[str, Any], uid: str) -> bool:
    """Whether `obj` carries an owner reference to the object with `uid`."""
    return any(ref.get("uid") == uid for ref in obj["metadata"].get("ownerReferences") or [])


def finalizer_removed(apikey: Mapping[str, Any]) -> dict[str, Any]:
    """The merge patch that takes this operator's finalizer off the key, only from the version read."""
    meta = apikey["metadata"]
    return {"metadata": {"finalizers": [f for f in meta.get("finalizers") or [] if f != FINALIZER],
                         "resourceVersion": meta["resourceVersion"]}}


def revoked_with_deployment(live: Mapping[str, int], deployment: str) -> str:
    """The Revoked event of a deleted key whose deployment is gone: there is no revoked list to write, and none is
    needed, since its servers and signing keys (which alone verify these tokens) go with it."""
    return (f"Revoked {len(live)} token(s) ({', '.join(sorted(live))}) with their DeepSeekDeployment {deployment}, "
            "which is gone: its servers and signing keys, the only ones that accept them, go with it (no revoked list "
            "to write); the ApiKey is being deleted")


def release_keys_of_deleted_deployments(kube: KubeApi, namespaces: Sequence[str | None], now: float) -> list[str]:
    """While the DeepSeekDeployment CRD is not served (deleted, and every deployment with it) the operator does not
    reconcile, yet the ApiKeys being deleted with their own CRD wait for its finalizer. Let each go as its finalizer
    does for a key whose deployment is gone: delete the Secret the key owns, say so in a Revoked event, remove the
    finalizer. Returns the keys let go (`namespace/name`); one changed meanwhile waits for the next call."""
    released = []
    for scope in namespaces:
        for apikey in kube.list(APIKEYS, scope):
            meta = apikey["metadata"]
            finalizers = list(meta.get("finalizers") or [])
            if not meta.get("deletionTimestamp") or FINALIZER not in finalizers:
                continue
            namespace, name, spec = meta["namespace"], meta["name"], apikey.get("spec") or {}
            deployment = (spec.get("deploymentRef") or {}).get("name", "")
            if kube.get(DEEPSEEKDEPLOYMENTS, namespace, deployment) is not None:
                continue  # its deployment is there after all: its finalizer revokes the tokens (once kopf runs)
            secret_name = apikey_secret_name(name, spec)
            secret = kube.get(SECRETS, namespace, secret_name)
            if secret is not None and owned_by(secret, meta["uid"]):
                kube.delete(SECRETS, namespace, secret_name, uid=secret["metadata"]["uid"])
            try:
                kube.merge(APIKEYS, namespace, name, finalizer_removed(apikey))
            except Conflict:
                continue
            except KubeError as exc:
                if exc.status != 404:
                    raise
            live = live_tokens(apikey.get("status") or {}, now)
            if live:
                kube.post_event(apikey, type_="Normal", reason="Revoked",
                                message=revoked_with_deployment(live, deployment))
            released.append(f"{namespace}/{name}")
    return released
