"""The `<deployment>-auth` ConfigMap's documents (docs/auth-contract.md): model, changes, and encoding (pure).

Each document is written as `data["<name>.json"]` while its compact JSON is at most 256 KiB, else as
`binaryData["<name>.json.gz"]`; that keeps 10,000 keys on one deployment well under the 1 MiB ConfigMap cap.

Past that cap the API server refuses the whole write, and with it every revocation batched into it, so the
ConfigMap is kept under a budget (`fit_changes`): once it holds more than `NEW_ENTRY_BUDGET`, changes that add an
entry for a key that has none (a new key's own limits) are left out and wait, while revocations, removals and edits
of existing entries are always applied; the rest of the cap is their reserve.
"""

from __future__ import annotations

import base64
import gzip
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

DOCUMENTS = ("config", "jwks", "revoked", "limits")
GZIP_THRESHOLD = 256 * 1024
CONFIGMAP_LIMIT = 1024 * 1024
# Above this size new entries wait; the remaining 256 KiB (about 10,000 revoked token ids) is kept for revocations.
NEW_ENTRY_BUDGET = 768 * 1024
# Servers accept a token up to this long past its `exp` (and before its `nbf`): the clock skew the contract allows
# (docs/auth-contract.md). A revocation must outlive it, plus a margin for the operator's clock running ahead.
TOKEN_LEEWAY_SECONDS = 30
REVOCATION_PRUNE_MARGIN_SECONDS = 60


@dataclass(frozen=True)
class Limits:
    """One key's limits: requests per second with a burst, tokens per minute and parallel requests (None = no cap)."""

    rps: float
    burst: int
    tpm: int | None = None
    parallel: int | None = None

    def as_document(self) -> dict[str, Any]:
        rps: float | int = int(self.rps) if float(self.rps).is_integer() else self.rps
        return {"rps": rps, "burst": self.burst, "tpm": self.tpm, "parallel": self.parallel}


def limits_from_spec(spec: Mapping[str, Any] | None, defaults: Limits | None = None) -> Limits:
    """Limits from a CRD `rateLimit` block; fields left out come from `defaults` (or the schema defaults 10/20)."""
    spec = spec or {}
    base = defaults or Limits(rps=10, burst=20)
    return Limits(
        rps=float(spec.get("requestsPerSecond", base.rps)),
        burst=int(spec.get("burst", base.burst)),
        tpm=spec.get("tokensPerMinute", base.tpm),
        parallel=spec.get("maxParallelRequests", base.parallel),
    )


@dataclass(frozen=True)
class AuthDocuments:
    """The four documents, as plain JSON-ready values."""

    config: dict[str, Any] = field(default_factory=dict)
    jwks: dict[str, Any] = field(default_factory=lambda: {"keys": []})
    revoked: dict[str, int] = field(default_factory=dict)
    limits: dict[str, dict[str, Any]] = field(default_factory=dict)

    def published_kids(self) -> frozenset[str]:
        return frozenset(str(key.get("kid")) for key in self.jwks.get("keys", []))


@dataclass(frozen=True)
class PublishIssuer:
    """Replace `config` and `jwks` (the issuer's part)."""

    config: dict[str, Any]
    jwks: dict[str, Any]


@dataclass(frozen=True)
class RevokeTokens:
    """Add token ids with their expiry to the revoked list."""

    entries: Mapping[str, int]


@dataclass(frozen=True)
class SetKeyLimits:
    """Set one ApiKey's limits (keyed by its uid); None removes the entry (the key uses `defaultLimits`)."""

    apikey_uid: str
    limits: dict[str, Any] | None


AuthChange = PublishIssuer | RevokeTokens | SetKeyLimits


def revocation_prune_time(expires: int) -> int:
    """When a revoked entry may leave the list: past the token's `exp`, the servers' leeway and a margin."""
    return int(expires) + TOKEN_LEEWAY_SECONDS + REVOCATION_PRUNE_MARGIN_SECONDS


def apply_changes(documents: AuthDocuments, changes: Iterable[AuthChange], *, now: float) -> AuthDocuments:
    """The documents after `changes`, with revoked entries pruned once no server accepts their token any more."""
    config, jwks = documents.config, documents.jwks
    revoked = dict(documents.revoked)
    limits = dict(documents.limits)
    for change in changes:
        if isinstance(change, PublishIssuer):
            config, jwks = change.config, change.jwks
        elif isinstance(change, RevokeTokens):
            for token_id, expires in change.entries.items():
                revoked[token_id] = max(int(expires), revoked.get(token_id, 0))
        elif isinstance(change, SetKeyLimits):
            if change.limits is None:
                limits.pop(change.apikey_uid, None)
            else:
                limits[change.apikey_uid] = change.limits
    revoked = {token_id: expires for token_id, expires in revoked.items() if now <= revocation_prune_time(expires)}
    return AuthDocuments(config=config, jwks=jwks, revoked=revoked, limits=limits)


def _compact(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":"), sort_keys=True).encode()


def encode_documents(documents: AuthDocuments) -> tuple[dict[str, str], dict[str, str]]:
    """(`data`, `binaryData`) of the ConfigMap: each document in exactly one form."""
    data: dict[str, str] = {}
    binary: dict[str, str] = {}
    for name in DOCUMENTS:
        plain = _compact(getattr(documents, name))
        if len(plain) <= GZIP_THRESHOLD:
            data[f"{name}.json"] = plain.decode()
        else:
            # mtime=0 keeps the bytes a function of the content, so an unchanged document never rewrites.
            binary[f"{name}.json.gz"] = base64.b64encode(gzip.compress(plain, compresslevel=9, mtime=0)).decode()
    return data, binary


def decode_documents(data: Mapping[str, str] | None, binary: Mapping[str, str] | None, *,
                     complete: bool = False) -> AuthDocuments:
    """The documents of a ConfigMap, reading either form; missing ones are empty.

    With `complete`, a missing document raises ValueError: in a ConfigMap this operator wrote, an absent `jwks` means
    the content is unknown, not that no key is published.
    """
    data = data or {}
    binary = binary or {}
    values: dict[str, Any] = {}
    for name in DOCUMENTS:
        if f"{name}.json" in data:
            values[name] = json.loads(data[f"{name}.json"])
        elif f"{name}.json.gz" in binary:
            values[name] = json.loads(gzip.decompress(base64.b64decode(binary[f"{name}.json.gz"])))
        elif complete:
            raise ValueError(f"{name}.json is missing")
    return AuthDocuments(
        config=values.get("config", {}),
        jwks=values.get("jwks", {"keys": []}),
        revoked={str(k): int(v) for k, v in values.get("revoked", {}).items()},
        limits=values.get("limits", {}),
    )


def configmap_size(data: Mapping[str, str], binary: Mapping[str, str]) -> int:
    """Bytes the API server counts against the 1 MiB cap (keys plus values; binaryData decoded)."""
    size = sum(len(k) + len(v.encode()) for k, v in data.items())
    size += sum(len(k) + len(base64.b64decode(v)) for k, v in binary.items())
    return size


def documents_size(documents: AuthDocuments) -> int:
    """Bytes of the ConfigMap these documents make, as the API server counts them (in the form they are written)."""
    return configmap_size(*encode_documents(documents))


def adds_entry(documents: AuthDocuments, change: AuthChange) -> bool:
    """Whether `change` adds an entry that `documents` lacks: the only kind of change that may wait for room."""
    return (isinstance(change, SetKeyLimits) and change.limits is not None
            and change.apikey_uid not in documents.limits)


@dataclass(frozen=True)
class FittedChanges:
    """The documents after the changes that fit, their size, and which change groups had a change left out."""

    documents: AuthDocuments
    size: int
    refused: tuple[int, ...] = ()


def fit_changes(documents: AuthDocuments, groups: Sequence[Sequence[AuthChange]], *, now: float,
                new_entry_budget: int = NEW_ENTRY_BUDGET) -> FittedChanges:
    """Apply every group of changes, leaving out new entries when the result would exceed `new_entry_budget`.

    Revocations, removals and edits of existing entries are never left out: a revocation that waits is a token
    that stays valid. The caller refuses a write whose size still exceeds `CONFIGMAP_LIMIT`.
    """
    changes = [change for group in groups for change in group]
    updated = apply_changes(documents, changes, now=now)
    size = documents_size(updated)
    if size <= new_entry_budget:
        return FittedChanges(updated, size)
    refused = tuple(i for i, group in enumerate(groups) if any(adds_entry(documents, c) for c in group))
    if not refused:
        return FittedChanges(updated, size)
    updated = apply_changes(documents, [c for c in changes if not adds_entry(documents, c)], now=now)
    return FittedChanges(updated, documents_size(updated), refused)


def build_auth_configmap(
    *, name: str, namespace: str, labels: Mapping[str, str], owner_references: list[dict[str, Any]],
    documents: AuthDocuments,
) -> dict[str, Any]:
    """The whole ConfigMap object."""
    data, binary = encode_documents(documents)
    body: dict[str, Any] = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": name, "namespace": namespace, "labels": dict(labels),
                     "ownerReferences": owner_references},
        "data": data,
    }
    if binary:
        body["binaryData"] = binary
    return body


def build_issuer_config(*, issuer: str, audience: str, default_limits: Limits, generation: int) -> dict[str, Any]:
    """The `config` document."""
    return {"issuer": issuer, "audience": audience, "defaultLimits": default_limits.as_document(),
            "generation": generation}
