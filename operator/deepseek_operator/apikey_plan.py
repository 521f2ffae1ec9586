"""What an ApiKey reconcile should do, decided from a snapshot of the world (pure: `now` and inputs passed in).

The reconcile gathers (ApiKey, its Secret, its deployment's issuer), calls `plan_apikey`, then acts in a
crash-safe order: revocations reach the ConfigMap first, a new token is recorded in status as `pendingToken`
before it is written to the Secret, and only then does status make it current.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from .auth_config import TOKEN_LEEWAY_SECONDS, Limits, SetKeyLimits, limits_from_spec, revocation_prune_time
from .conditions import Condition, condition_status
from .durations import format_timestamp, parse_duration, parse_timestamp
from .signing_keys import SigningKey
from .tokens import TokenGrant, binding_hash, token_sha256

# A new value of this annotation asks for one rotation now (any value: the plugin writes a timestamp); the value
# is kept in status as `rotationRequest` once a token issued after it is in the Secret, so each value rotates once.
ROTATE_ANNOTATION = "deepseek.ai/rotate"
# The most tokens one key may have out at once, counting every token it was given (`status.recentTokens`) until the
# deployment's revoked list would have pruned it (`revocation_prune_time`). Each rotation, scope change or lost Secret
# leaves the token it replaces in that list until it expires; without a bound, anyone allowed to edit or annotate one
# ApiKey (or a spec renewing every second) could fill the list that every key of the deployment shares, and other
# keys would wait. A key renewing on its own schedule holds about (duration + 90 s) / (duration - renewBefore) + 1
# (2 or 3 with the defaults). Past the bound a renewal still goes ahead once the current token has lived half its
# lifetime, and an expired token is replaced, so that no key lapses on its own schedule: at most one token per half
# lifetime more, 52 at the very most (a 10 s duration).
TOKENS_PER_KEY = 32
# The Ready reasons of a key whose next token waits for TOKENS_PER_KEY (valid token kept / none left).
HELD_READY_REASONS = ("RotationHeld", "TokenLimitReached")
TOKEN_FIELDS = ("tokenId", "tokenSHA256", "signingKeyId", "issuedAt", "expiresAt", "renewalTime", "bindingHash",
                "tokenScopes")
ISSUE_EVENT = {"Initial": "Issued", "Unrevoked": "Issued"}
WARNING_REASONS = {"SecretMissing", "SecretAltered", "TokenRevoked"}
REASON_TEXT = {
    "Initial": "first token",
    "Unrevoked": "the key was un-revoked",
    "Renewal": "renewal time reached",
    "Expired": "the previous token had expired",
    "SecretMissing": "the Secret or its token was missing; the lost token is revoked",
    "SecretAltered": "the token in the Secret was altered; the replaced token is revoked",
    "TokenRevoked": "the current token was found in the deployment's revoked list",
    "BindingChanged": "subject, scopes or environment changed; the old token is revoked",
    "ScopesWidened": "scopes were added; the old token keeps its grace period",
    "SigningKeyRetired": "its signing key is no longer published",
    "Requested": f"rotation asked for with the {ROTATE_ANNOTATION} annotation",
}


@dataclass(frozen=True)
class IssuerView:
    """What an ApiKey reconcile sees of its deployment (None in place of this: the deployment does not exist)."""

    deployment: str
    issuer: str
    audience: str
    base_url: str
    signing_key: SigningKey | None
    published_kids: frozenset[str]
    default_scopes: tuple[str, ...]
    default_limits: Limits
    limits_entry: dict[str, Any] | None
    not_ready_message: str = ""
    # Published keys (to recognise our own tokens) and the revoked list, as last read.
    verification_keys: Mapping[str, SigningKey] = field(default_factory=dict)
    revoked: Mapping[str, int] = field(default_factory=dict)
    # Why the auth ConfigMap's content is unknown (missing, unreadable); empty when it was read.
    auth_unknown: str = ""


@dataclass(frozen=True)
class ApiKeyEvent:
    type: str
    reason: str
    message: str


@dataclass(frozen=True)
class ApiKeyPlan:
    """The decision: what to revoke, what limits to set, whether to issue, what status to keep."""

    status: dict[str, Any]
    revoke: dict[str, int] = field(default_factory=dict)
    limits: SetKeyLimits | None = None
    issue_reason: str | None = None
    previous_revoke_at: int | None = None
    delete_secret: bool = False
    repair_secret: bool = False
    events: tuple[ApiKeyEvent, ...] = ()
    # The rotate annotation's value that the token issued now answers (recorded with it; see `with_pending`).
    rotation_request: str | None = None
    # Why the token is issued, in words for its Event, when there is more to say than REASON_TEXT.
    issue_detail: str | None = None
    # A new token was due (`held_reason`) but the key has TOKENS_PER_KEY out: the first may be issued at this time.
    held_until: int | None = None
    held_reason: str | None = None


def _ts(value: Any) -> int:
    return int(parse_timestamp(str(value))) if value else 0


def effective_scopes(spec: Mapping[str, Any], issuer: IssuerView) -> tuple[str, ...]:
    return tuple(sorted(spec.get("scopes") or issuer.default_scopes))


def desired_limits(spec: Mapping[str, Any], issuer: IssuerView) -> dict[str, Any] | None:
    """The key's entry in the `limits` document: None when it has no own limits or they equal the defaults."""
    if spec.get("revoked") or not spec.get("rateLimit"):
        return None
    limits = limits_from_spec(spec["rateLimit"], issuer.default_limits)
    return None if limits == issuer.default_limits else limits.as_document()


def current_binding(apikey: Mapping[str, Any], issuer: IssuerView) -> str:
    spec = apikey["spec"]
    return binding_hash(subject=spec["subject"], scopes=effective_scopes(spec, issuer),
                        environment=spec["environment"], audience=issuer.audience)


def token_scopes(apikey: Mapping[str, Any], status: Mapping[str, Any], issuer: IssuerView) -> tuple[str, ...] | None:
    """The current token's scopes when status records them (`tokenScopes`) and that token binds the key's subject,
    environment and audience as they are now (its `bindingHash` says so); None otherwise, e.g. in a status written
    by an operator that did not record them."""
    scopes = status.get("tokenScopes")
    if not isinstance(scopes, list) or not all(isinstance(scope, str) for scope in scopes):
        return None
    spec = apikey["spec"]
    held = binding_hash(subject=spec["subject"], scopes=scopes, environment=spec["environment"],
                        audience=issuer.audience)
    return tuple(sorted(scopes)) if held == status.get("bindingHash") else None


def outlived_binding(item: Mapping[str, Any], apikey: Mapping[str, Any], issuer: IssuerView,
                     wanted: tuple[str, ...]) -> bool:
    """Whether a token in its grace period holds what the key no longer grants: another subject, environment or
    audience, or a scope taken away since. Judged from the `bindingHash` (and `tokenScopes`) recorded with it; a
    token recorded without them (by an older operator) cannot be judged and keeps its grace period."""
    recorded = item.get("bindingHash")
    if not recorded or recorded == current_binding(apikey, issuer):
        return False
    scopes = item.get("tokenScopes")
    if isinstance(scopes, list) and all(isinstance(scope, str) for scope in scopes):
        spec = apikey["spec"]
        if binding_hash(subject=spec["subject"], scopes=scopes, environment=spec["environment"],
                        audience=issuer.audience) == recorded:
            # The same subject, environment and audience: only scopes differ, and only added ones are harmless.
            return not set(scopes) <= set(wanted)
    return True


def scope_change_text(held: tuple[str, ...] | None, wanted: tuple[str, ...],
                      previous_revoke_at: int | None) -> str | None:
    """What a scope change did, in words for the Event (None: only the reason's own text can be said, the scopes
    of the current token being unknown or its subject, environment or audience having changed)."""
    if held is None:
        return None
    change = f"from {', '.join(held)} to {', '.join(wanted)}"
    if set(held) < set(wanted):
        fate = (f"the old token keeps working until {format_timestamp(previous_revoke_at)}" if previous_revoke_at
                else "the old token is revoked, gracePeriod being 0")
        return f"scopes widened {change}; {fate}"
    removed = sorted(set(held) - set(wanted))
    return f"scopes changed {change} ({', '.join(removed)} removed); the old token is revoked"


def recent_tokens(status: Mapping[str, Any], now: float) -> list[dict[str, Any]]:
    """`status.recentTokens` without the tokens the revoked list would have pruned by `now`."""
    return [item for item in status.get("recentTokens") or []
            if isinstance(item, dict) and revocation_prune_time(_ts(item.get("expiresAt"))) > now]


def with_recent_token(status: dict[str, Any], token_id: str, expires_at: Any) -> None:
    """Count a token that went out (or may have) against TOKENS_PER_KEY, once."""
    recent = [item for item in status.get("recentTokens") or [] if item.get("tokenId") != token_id]
    status["recentTokens"] = [*recent, {"tokenId": token_id, "expiresAt": expires_at}]


def live_tokens(status: Mapping[str, Any], now: float) -> dict[str, int]:
    """Every token id of the key that may still verify (current, pending, in grace), with its expiry; servers
    accept a token up to TOKEN_LEEWAY_SECONDS past its `exp`, so those count too."""
    live: dict[str, int] = {}
    if status.get("tokenId"):
        live[status["tokenId"]] = _ts(status.get("expiresAt"))
    pending = status.get("pendingToken")
    if pending:
        live[pending["tokenId"]] = _ts(pending.get("expiresAt"))
    for item in status.get("previousTokens") or []:
        live[item["tokenId"]] = _ts(item.get("expiresAt"))
    return {token_id: exp for token_id, exp in live.items() if exp + TOKEN_LEEWAY_SECONDS > now}


def live_token_expiry_by_kid(apikeys: Iterable[Mapping[str, Any]], now: float) -> dict[str, int]:
    """kid -> the latest expiry of a live token it signed, over the given ApiKeys' status."""
    result: dict[str, int] = {}
    for apikey in apikeys:
        status = apikey.get("status") or {}
        entries = []
        if status.get("tokenId"):
            entries.append((status.get("signingKeyId"), _ts(status.get("expiresAt"))))
        if status.get("pendingToken"):
            entries.append((status["pendingToken"].get("signingKeyId"), _ts(status["pendingToken"].get("expiresAt"))))
        entries.extend((p.get("signingKeyId"), _ts(p.get("expiresAt"))) for p in status.get("previousTokens") or [])
        for kid, exp in entries:
            if kid and exp > now:
                result[kid] = max(result.get(kid, 0), exp)
    return result


def rotation_request(apikey: Mapping[str, Any]) -> str | None:
    """The rotate annotation's value when it asks for a rotation not done yet, else None."""
    value = ((apikey.get("metadata") or {}).get("annotations") or {}).get(ROTATE_ANNOTATION)
    if not value or value == (apikey.get("status") or {}).get("rotationRequest"):
        return None
    return str(value)


def resolve_pending(status: Mapping[str, Any], secret_sha: str | None, renew_before: float) -> tuple[dict, dict]:
    """Settle a `pendingToken` left by an interrupted reconcile.

    If the Secret holds it, it was delivered: make it current. Otherwise it never left the operator: revoke its id
    anyway (cheap, and safe even if a write we cannot see landed). Returns (status, revocations).
    """
    status = dict(status)
    pending = status.get("pendingToken")
    if not pending:
        return status, {}
    if secret_sha is not None and secret_sha == pending.get("tokenSHA256"):
        return promote_pending(status, renew_before), {}
    status.pop("pendingToken")
    with_recent_token(status, pending["tokenId"], pending.get("expiresAt"))
    return status, {pending["tokenId"]: _ts(pending.get("expiresAt"))}


def promote_pending(status: Mapping[str, Any], renew_before: float) -> dict[str, Any]:
    """Status once the pending token is in the Secret: it becomes current, the old one enters its grace period."""
    status = dict(status)
    pending = dict(status.pop("pendingToken"))
    previous = list(status.get("previousTokens") or [])
    if status.get("tokenId") and pending.get("previousRevokeAt"):
        entry = {
            "tokenId": status["tokenId"],
            "signingKeyId": status.get("signingKeyId"),
            "expiresAt": status.get("expiresAt"),
            "revokeAt": pending["previousRevokeAt"],
        }
        # What it binds goes with it, so that a later change can be judged against it even once no token is
        # current (a refused Secret write, no signing key): see `outlived_binding`.
        for name in ("bindingHash", "tokenScopes"):
            if status.get(name) is not None:
                entry[name] = status[name]
        previous.append(entry)
    expires = _ts(pending["expiresAt"])
    if pending.get("rotationRequest"):
        status["rotationRequest"] = pending["rotationRequest"]
    status.update({
        "tokenId": pending["tokenId"],
        "tokenSHA256": pending["tokenSHA256"],
        "signingKeyId": pending["signingKeyId"],
        "issuedAt": pending["issuedAt"],
        "expiresAt": pending["expiresAt"],
        "renewalTime": format_timestamp(expires - renew_before),
        "bindingHash": pending["bindingHash"],
        "revision": int(status.get("revision") or 0) + 1,
    })
    with_recent_token(status, pending["tokenId"], pending["expiresAt"])
    if "tokenScopes" in pending:
        status["tokenScopes"] = pending["tokenScopes"]
    else:  # recorded by an operator that did not record scopes: the old token's would be wrong
        status.pop("tokenScopes", None)
    if previous:
        status["previousTokens"] = previous
    else:
        status.pop("previousTokens", None)
    return status


def adopt_token(
    status: Mapping[str, Any], claims: Mapping[str, Any], sha: str, renew_before: float
) -> dict[str, Any]:
    """Status with a verified token of ours found in the Secret as the current token."""
    status = dict(status)
    binding = binding_hash(subject=claims["sub"], scopes=claims["scope"], environment=claims["env"],
                           audience=claims["aud"])
    status.update({
        "tokenId": claims["jti"],
        "tokenSHA256": sha,
        "signingKeyId": claims["kid"],
        "issuedAt": format_timestamp(claims["iat"]),
        "expiresAt": format_timestamp(claims["exp"]),
        "renewalTime": format_timestamp(claims["exp"] - renew_before),
        "bindingHash": binding,
        "tokenScopes": sorted(claims["scope"]),
        "revision": int(status.get("revision") or 0) + 1,
    })
    with_recent_token(status, claims["jti"], status["expiresAt"])
    return status


def build_grant(apikey: Mapping[str, Any], issuer: IssuerView, *, token_id: str, now: int) -> TokenGrant:
    """The token a reconcile at `now` issues for this key."""
    spec = apikey["spec"]
    return TokenGrant(
        issuer=issuer.issuer,
        audience=issuer.audience,
        subject=spec["subject"],
        scopes=effective_scopes(spec, issuer),
        environment=spec["environment"],
        apikey_uid=apikey["metadata"]["uid"],
        token_id=token_id,
        issued_at=now,
        expires_at=now + int(parse_duration(spec.get("duration", "72h"))),
    )


def with_pending(
    status: Mapping[str, Any], *, grant: TokenGrant, token: str, signing_key_id: str, reason: str,
    binding: str, previous_revoke_at: int | None, rotation_request: str | None = None,
) -> dict[str, Any]:
    """Status recording a token about to be written to the Secret (its id and hash, never the token), and the
    rotate annotation value it answers, so that the request counts as done exactly when the token is delivered."""
    status = dict(status)
    pending = {
        "tokenId": grant.token_id,
        "tokenSHA256": token_sha256(token),
        "signingKeyId": signing_key_id,
        "issuedAt": format_timestamp(grant.issued_at),
        "expiresAt": format_timestamp(grant.expires_at),
        "reason": reason,
        "bindingHash": binding,
        "tokenScopes": list(grant.scopes),
    }
    if previous_revoke_at is not None:
        pending["previousRevokeAt"] = format_timestamp(previous_revoke_at)
    if rotation_request:
        pending["rotationRequest"] = rotation_request
    status["pendingToken"] = pending
    return status


def plan_apikey(
    apikey: Mapping[str, Any], *, secret_exists: bool, secret_token: str | None, secret_current: bool,
    issuer: IssuerView | None, now: int, secret_claims: Mapping[str, Any] | None = None,
    secret_sha: str | None = None,
) -> ApiKeyPlan:
    """Decide one reconcile of a live (not deleting) ApiKey.

    `secret_token` is the token found in the Secret (None: no Secret or no token), `secret_current` whether the
    Secret's other fields, labels and owner are as they should be, `secret_claims` the claims of that token when
    this operator signed it for this key (see `tokens.verified_claims`) and it is not revoked. `secret_sha` stands
    for the token's hash when the token was not read, the Secret being at the version last seen holding it.
    """
    spec = apikey["spec"]
    status = dict(apikey.get("status") or {})
    if issuer is None:
        # Without its deployment there is no revoked list to write to; leave token bookkeeping untouched. A revoked
        # key's Secret goes all the same (spec.revoked deletes it; its token is of no use without the deployment).
        return ApiKeyPlan(status=status, delete_secret=bool(spec.get("revoked")) and secret_exists)
    if issuer.auth_unknown and not spec.get("revoked"):
        # Which keys are published and which tokens are revoked is unknown, not empty: deciding on it would retire
        # valid tokens. Change nothing until the ConfigMap reads again (a revocation by spec needs none of it).
        return ApiKeyPlan(status=status)
    renew_before = parse_duration(spec.get("renewBefore", "24h"))
    grace = parse_duration(spec.get("gracePeriod", "1h"))
    secret_sha = token_sha256(secret_token) if secret_token else secret_sha

    status, revoke = resolve_pending(status, secret_sha, renew_before)
    if not status.get("tokenId") and secret_claims and secret_token:
        # A first token reached the Secret but not status (the operator stopped in between): it is ours, so it
        # becomes current instead of being issued again.
        status = adopt_token(status, secret_claims, token_sha256(secret_token), renew_before)
    events: list[ApiKeyEvent] = []

    kept = []
    for item in status.get("previousTokens") or []:
        exp = _ts(item.get("expiresAt"))
        if exp + TOKEN_LEEWAY_SECONDS <= now:
            continue  # no server accepts it any more
        # A grace period that ends at the token's expiry (gracePeriod equal to renewBefore, or an operator that was
        # down) still ends with a revocation: servers accept a token up to TOKEN_LEEWAY_SECONDS past its `exp`.
        if _ts(item.get("revokeAt")) <= now:
            revoke[item["tokenId"]] = exp
            events.append(ApiKeyEvent("Normal", "Revoked", f"Revoked token {item['tokenId']}: grace period ended"))
            continue
        kept.append(item)
    if kept:
        status["previousTokens"] = kept
    else:
        status.pop("previousTokens", None)
    recent = recent_tokens(status, now)
    if recent:
        status["recentTokens"] = recent
    else:
        status.pop("recentTokens", None)

    wanted_limits = desired_limits(spec, issuer)
    limits = SetKeyLimits(apikey["metadata"]["uid"], wanted_limits) if issuer.limits_entry != wanted_limits else None

    if spec.get("revoked"):
        revoked_now = dict(live_tokens(status, now))
        revoke.update(revoked_now)
        for name in (*TOKEN_FIELDS, "previousTokens", "pendingToken"):
            status.pop(name, None)
        if revoked_now:
            events.append(ApiKeyEvent("Normal", "Revoked",
                                      f"Revoked {len(revoked_now)} token(s) ({', '.join(sorted(revoked_now))}): "
                                      "spec.revoked is true"))
        return ApiKeyPlan(status=status, revoke=revoke, limits=limits, delete_secret=secret_exists,
                          events=tuple(events))

    current_id = status.get("tokenId")
    expires = _ts(status.get("expiresAt"))
    # A token issued under a longer spec.duration is rotated as if it had been issued under the current one: a
    # shortened duration bounds the live token too, not only the next.
    issued = _ts(status.get("issuedAt"))
    lifetime_end = min(expires, issued + int(parse_duration(spec.get("duration", "72h")))) if issued else expires
    requested = rotation_request({"metadata": apikey.get("metadata") or {}, "status": status})
    reason: str | None = None
    detail: str | None = None
    previous_revoke_at: int | None = None
    # A rotated-out token keeps working this long, never past its own expiry (`gracePeriod` 0: revoked at once).
    grace_end = min(int(now + grace), expires) if grace > 0 else None
    # Judged apart from the reason for a new token: a binding change seen together with a lost or altered Secret
    # (or an expired token) is issued for that reason, yet still takes the old binding from the tokens in grace.
    binding_changed = bool(current_id) and status.get("bindingHash") != current_binding(apikey, issuer)
    held = token_scopes(apikey, status, issuer) if binding_changed else None
    wanted = effective_scopes(spec, issuer)
    # Scopes only added grant nothing the old tokens lack: the current one is rotated out with its grace period, as
    # at a renewal. Any other change (a scope removed, another subject) must stop every old token at once.
    widened = binding_changed and held is not None and set(held) < set(wanted)
    if not current_id:
        reason = "Unrevoked" if condition_status(status.get("conditions"), "Revoked") == "True" else "Initial"
    elif expires <= now:
        reason = "Expired"
    elif secret_sha is None:
        reason = "SecretMissing"
    elif secret_sha != status.get("tokenSHA256"):
        reason = "SecretAltered"
    elif current_id in issuer.revoked:
        # Every server refuses it, whoever put it there (an operator of another version, a hand edit): a key that is
        # not revoked gets a token that works instead of staying Ready with this one.
        reason, detail = "TokenRevoked", f"token {current_id} was found in the deployment's revoked list"
    elif binding_changed:
        if widened:
            reason, previous_revoke_at = "ScopesWidened", grace_end
        else:
            reason = "BindingChanged"
        detail = scope_change_text(held, wanted, previous_revoke_at)
    elif status.get("signingKeyId") not in issuer.published_kids:
        reason = "SigningKeyRetired"
    elif now >= lifetime_end - renew_before or requested:
        # A requested rotation is an early renewal: the old token keeps its grace period.
        reason = "Renewal" if now >= lifetime_end - renew_before else "Requested"
        previous_revoke_at = grace_end
    at_bound = reason is not None and len(recent) >= TOKENS_PER_KEY and not (
        reason == "Expired" or (reason == "Renewal" and now >= lifetime_end - (lifetime_end - issued) / 2))
    if reason and current_id and expires + TOKEN_LEEWAY_SECONDS > now and previous_revoke_at is None and not (
            at_bound and reason in ("Renewal", "Requested", "ScopesWidened")):
        # (A rotation held back replaces nothing yet: with gracePeriod 0 its token would be revoked only for being
        # replaced. A lost, altered or narrowed token goes all the same.)
        revoke[current_id] = expires
    early: dict[str, int] = {}
    if binding_changed and not widened:
        # Tokens still in their grace period carry the old binding too (or a narrower one, from before scopes were
        # added): what the change took away must stop working with every token of the key, not only the current.
        early = {item["tokenId"]: _ts(item.get("expiresAt")) for item in status.pop("previousTokens", None) or []}
    elif status.get("previousTokens"):
        # Each token in grace is also judged by the binding recorded with it: with no token current (its Secret
        # write refused, say) there is nothing else to compare a change with.
        kept = []
        for item in status["previousTokens"]:
            if outlived_binding(item, apikey, issuer, wanted):
                early[item["tokenId"]] = _ts(item.get("expiresAt"))
            else:
                kept.append(item)
        if kept:
            status["previousTokens"] = kept
        else:
            status.pop("previousTokens")
    if early:
        revoke.update(early)
        events.append(ApiKeyEvent("Normal", "Revoked",
                                  f"Revoked {len(early)} token(s) ({', '.join(sorted(early))}) before the end of "
                                  "their grace period: subject, scopes or environment changed"))
    if reason == "SecretAltered" and secret_claims and secret_claims.get("jti") != current_id:
        # The Secret holds a token this operator signed for this key but never recorded: it is replaced, so revoke
        # it too rather than leave it valid and unknown.
        revoke[str(secret_claims["jti"])] = int(secret_claims["exp"])
    if at_bound or (reason is not None and issuer.signing_key is None):
        # No new token now (too many out: it waits for the oldest to age out; or nothing to sign with yet): revoke
        # what must go all the same and stop pointing at a revoked token.
        if current_id in revoke:
            for name in TOKEN_FIELDS:
                status.pop(name, None)
        if not at_bound:
            return ApiKeyPlan(status=status, revoke=revoke, limits=limits, events=tuple(events))
        return ApiKeyPlan(status=status, revoke=revoke, limits=limits, events=tuple(events), held_reason=reason,
                          held_until=min(revocation_prune_time(_ts(item.get("expiresAt"))) for item in recent))
    if reason is None and status.get("renewalTime") != format_timestamp(lifetime_end - renew_before):
        status["renewalTime"] = format_timestamp(lifetime_end - renew_before)
    return ApiKeyPlan(
        status=status, revoke=revoke, limits=limits, issue_reason=reason, previous_revoke_at=previous_revoke_at,
        repair_secret=reason is None and not secret_current, events=tuple(events),
        rotation_request=requested if reason is not None else None, issue_detail=detail,
    )


def issue_event(reason: str, token_id: str, expires_at: str, secret_name: str,
                detail: str | None = None) -> ApiKeyEvent:
    """The Event for a token issued for `reason` (never the token itself); `detail` says more than the reason."""
    kind = ISSUE_EVENT.get(reason, "Rotated")
    return ApiKeyEvent(
        "Warning" if reason in WARNING_REASONS else "Normal",
        kind,
        f"{kind} token {token_id} into Secret {secret_name}, expires {expires_at} "
        f"({reason}: {detail or REASON_TEXT.get(reason, reason)})",
    )


def apikey_conditions(
    apikey: Mapping[str, Any], status: Mapping[str, Any], issuer: IssuerView | None, *, now: int, deployment: str,
    secret_write_error: str | None = None, auth_config_full: str = "", held_reason: str | None = None,
    held_until: int | None = None,
) -> list[Condition]:
    """Ready and Revoked, derived from the status a reconcile ends with (a refused Secret write, a full auth
    ConfigMap, a new token held back by TOKENS_PER_KEY, if any)."""
    spec = apikey["spec"]
    revoked = bool(spec.get("revoked"))
    revoked_condition = (
        Condition("Revoked", True, "RevokedBySpec", "spec.revoked is true: every token of this key is revoked")
        if revoked else Condition("Revoked", False, "Active", "the key is not revoked")
    )
    namespace = apikey["metadata"]["namespace"]
    if revoked:
        ready = Condition("Ready", False, "Revoked", "the key is revoked; set spec.revoked to false for a new token")
    elif issuer is None:
        ready = Condition("Ready", False, "DeploymentNotFound",
                          f"DeepSeekDeployment {deployment!r} not found in namespace {namespace!r}; "
                          "the key is issued as soon as it exists")
    elif held_reason and held_until:
        wait = (f"a new token ({held_reason}: {REASON_TEXT.get(held_reason, held_reason)}) waits until "
                f"{format_timestamp(held_until)}: {TOKENS_PER_KEY} tokens of this key are out, the most one key may "
                "have until the oldest expires (each rotation, scope change or lost Secret gives one; a new ApiKey "
                "starts afresh)")
        if status.get("tokenId") and _ts(status.get("expiresAt")) > now:
            ready = Condition("Ready", True, HELD_READY_REASONS[0],
                              f"token {status['tokenId']} is in Secret {status.get('secretName')}, expires "
                              f"{status.get('expiresAt')}; {wait}")
        else:
            ready = Condition("Ready", False, HELD_READY_REASONS[1], f"no valid token: {wait}")
    elif secret_write_error:
        ready = Condition("Ready", False, "SecretWriteFailed",
                          f"{secret_write_error}; retrying with backoff, no new token is issued meanwhile")
    elif auth_config_full and not (status.get("tokenId") and _ts(status.get("expiresAt")) > now):
        ready = Condition("Ready", False, "AuthConfigFull", f"no token is issued yet: {auth_config_full}")
    elif issuer.auth_unknown:
        ready = Condition("Ready", None, "AuthConfigUnknown",
                          f"{issuer.auth_unknown}: which signing keys are published and which tokens are revoked is "
                          "unknown, so nothing is rotated or revoked until it can be read again")
    elif status.get("tokenId") and _ts(status.get("expiresAt")) > now:
        ready = Condition("Ready", True, "TokenIssued",
                          f"token {status['tokenId']} is in Secret {status.get('secretName')}, expires "
                          f"{status.get('expiresAt')}, rotates at {status.get('renewalTime')}"
                          + (f"; its new rate limits are not applied yet: {auth_config_full}" if auth_config_full
                             else ""))
    else:
        ready = Condition("Ready", False, "IssuerNotReady",
                          issuer.not_ready_message or "the deployment's signing key is not published yet")
    return [ready, revoked_condition]


def next_due(
    status: Mapping[str, Any], *, ready: bool, revoked: bool, now: float, retry_interval: float,
    held_until: int | None = None,
) -> float | None:
    """When this key next needs a reconcile on its own (rotation, end of a grace period, expiry, a new token held
    back by TOKENS_PER_KEY, or a retry)."""
    if revoked:
        return None
    if not ready:
        return float(held_until) if held_until else now + retry_interval
    renewal = _ts(status.get("renewalTime"))
    if held_until and renewal and renewal <= now:
        renewal = 0  # the renewal that is due is the one held back: it waits for `held_until`, not again at once
    times = [renewal, _ts(status.get("expiresAt")), held_until or 0]
    for item in status.get("previousTokens") or []:
        times.extend([_ts(item.get("revokeAt")), _ts(item.get("expiresAt"))])
    return float(min(t for t in times if t))
