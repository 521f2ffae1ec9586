"""The auth documents (docs/auth-contract.md): model, changes, layout over ConfigMaps, and encoding (pure).

Each document is written as `data["<name>.json"]` while its compact JSON is at most 256 KiB, else as
`binaryData["<name>.json.gz"]`.

Layout. A deployment starts with every document in one ConfigMap, `<deployment>-auth` (the inline layout, which
servers of every version read). Once that ConfigMap would pass `INLINE_BUDGET`, the entries move to `SHARD_COUNT`
shards, for good: the index `<deployment>-auth` keeps `config`, `jwks` and `shards` (`{"count": N}`; its
`revoked` becomes `[]`, which servers of earlier versions refuse rather than read as "nothing revoked"), and shard `i`
is the ConfigMap `<deployment>-auth-<i>` holding `revoked.<i>.json` and `limits.<i>.json` for the token ids and
ApiKey uids whose CRC-32 is `i` modulo N (`shard_of`). Readers take the union of all entries, so a misplaced entry
is still honoured, and the next write moves it. A shard's `limits` are stored as the distinct limits once each and
each uid's index into them (`encode_shard_limits`). With 16 shards, 100,000 keys with their own limits and 50,000
revoked tokens take about 4 MiB in all, about 260 KiB per shard (`bench/auth_size.py`): every object stays far
below the cap, and a revocation rewrites (and servers re-read) one shard instead of the whole set.

Past the 1 MiB cap the API server refuses the whole write, and with it every revocation batched into it, so every
object is kept under a budget (`fit_changes`): once the fullest object holds more than `NEW_ENTRY_BUDGET`, changes
that add an entry for a key that has none (a new key's own limits) are left out and wait, while revocations,
removals and edits of existing entries are always applied; the rest of the cap is their reserve. In the inline
layout that point is never reached: the entries move to shards first.
"""

from __future__ import annotations

import base64
import gzip
import json
import zlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .names import auth_configmap_name

DOCUMENTS = ("config", "jwks", "revoked", "limits")
GZIP_THRESHOLD = 256 * 1024
CONFIGMAP_LIMIT = 1024 * 1024
# Above this size new entries wait; the remaining 256 KiB (about 10,000 revoked token ids) is kept for revocations.
NEW_ENTRY_BUDGET = 768 * 1024
# Past this size the single ConfigMap's entries move to shards (where a deployment of an earlier version stopped
# taking new keys: up to it, the layout is the one every server version reads).
INLINE_BUDGET = NEW_ENTRY_BUDGET
SHARD_COUNT = 16
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
    # Inlined `now <= revocation_prune_time(expires)`: this runs over every revoked entry on every write.
    cutoff = now - TOKEN_LEEWAY_SECONDS - REVOCATION_PRUNE_MARGIN_SECONDS
    revoked = {token_id: expires for token_id, expires in revoked.items() if expires >= cutoff}
    return AuthDocuments(config=config, jwks=jwks, revoked=revoked, limits=limits)


Encoded = tuple[dict[str, str], dict[str, str]]


def _compact(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":"), sort_keys=True).encode()


def _encode(values: Mapping[str, Any]) -> Encoded:
    """(`data`, `binaryData`) holding each value as `<stem>.json`, or past GZIP_THRESHOLD as `<stem>.json.gz`."""
    data: dict[str, str] = {}
    binary: dict[str, str] = {}
    for stem, value in values.items():
        plain = _compact(value)
        if len(plain) <= GZIP_THRESHOLD:
            data[f"{stem}.json"] = plain.decode()
        else:
            # mtime=0 keeps the bytes a function of the content, so an unchanged document never rewrites.
            binary[f"{stem}.json.gz"] = base64.b64encode(gzip.compress(plain, compresslevel=9, mtime=0)).decode()
    return data, binary


def _decode(data: Mapping[str, str] | None, binary: Mapping[str, str] | None, stems: Iterable[str], *,
            complete: bool) -> dict[str, Any]:
    data = data or {}
    binary = binary or {}
    values: dict[str, Any] = {}
    for stem in stems:
        if f"{stem}.json" in data:
            values[stem] = json.loads(data[f"{stem}.json"])
        elif f"{stem}.json.gz" in binary:
            values[stem] = json.loads(gzip.decompress(base64.b64decode(binary[f"{stem}.json.gz"])))
        elif complete:
            raise ValueError(f"{stem}.json is missing")
    return values


def encode_documents(documents: AuthDocuments) -> Encoded:
    """(`data`, `binaryData`) of the single ConfigMap of the inline layout: each document in exactly one form."""
    return _encode({name: getattr(documents, name) for name in DOCUMENTS})


def decode_documents(data: Mapping[str, str] | None, binary: Mapping[str, str] | None, *,
                     complete: bool = False) -> AuthDocuments:
    """The documents of an inline-layout ConfigMap, reading either form; missing ones are empty.

    With `complete`, a missing document raises ValueError: in a ConfigMap this operator wrote, an absent `jwks` means
    the content is unknown, not that no key is published.
    """
    values = _decode(data, binary, DOCUMENTS, complete=complete)
    return AuthDocuments(
        config=values.get("config", {}),
        jwks=values.get("jwks", {"keys": []}),
        revoked={str(k): int(v) for k, v in values.get("revoked", {}).items()},
        limits=values.get("limits", {}),
    )


def shard_of(key: str, count: int) -> int:
    """The shard of a token id or ApiKey uid: CRC-32 of its UTF-8 bytes modulo the shard count."""
    return zlib.crc32(key.encode()) % count


def shard_configmap_name(index_name: str, shard: int) -> str:
    """The ConfigMap of shard `shard` of the index ConfigMap `index_name`."""
    return f"{index_name}-{shard}"


def auth_configmap_names(deployment: str) -> list[str]:
    """Every auth ConfigMap a deployment can have (the index and `SHARD_COUNT` shards): what its servers may read."""
    index = auth_configmap_name(deployment)
    return [index, *(shard_configmap_name(index, shard) for shard in range(SHARD_COUNT))]


@dataclass(frozen=True)
class ShardEntries:
    """One shard's revoked token ids and per-key limits."""

    revoked: dict[str, int] = field(default_factory=dict)
    limits: dict[str, dict[str, Any]] = field(default_factory=dict)


def split_entries(documents: AuthDocuments, count: int) -> tuple[ShardEntries, ...]:
    """The entries of `documents` spread over `count` shards by `shard_of`."""
    shards = tuple(ShardEntries() for _ in range(count))
    for token_id, expires in documents.revoked.items():
        shards[shard_of(token_id, count)].revoked[token_id] = expires
    for uid, limits in documents.limits.items():
        shards[shard_of(uid, count)].limits[uid] = limits
    return shards


def encode_index(documents: AuthDocuments, shards: int) -> Encoded:
    """The index ConfigMap's content: the whole inline layout (`shards=0`), else config, jwks and the shard count."""
    if shards == 0:
        return encode_documents(documents)
    # `revoked: []` is no list of revocations: a server of an earlier version (which reads only this ConfigMap)
    # refuses it and keeps its last state, instead of reading "nothing is revoked".
    return _encode({"config": documents.config, "jwks": documents.jwks, "shards": {"count": shards},
                    "revoked": []})


def encode_shard_limits(limits: Mapping[str, dict[str, Any]]) -> dict[str, Any]:
    """A shard's `limits` document: the distinct LIMITS once each (`profiles`, sorted) and every uid's index into
    them (`keys`). Keys share a handful of distinct limits, so this halves the JSON and lets a server build each
    distinct limit once instead of once per key."""
    # Limits documents are built field by field in one order, so their items identify them cheaply (an equal
    # document in another order only adds a duplicate profile).
    distinct = {tuple(value.items()): value for value in limits.values()}
    ordered = sorted(distinct, key=lambda key: (_compact(distinct[key]), repr(key)))
    position = {key: index for index, key in enumerate(ordered)}
    return {"profiles": [distinct[key] for key in ordered],
            "keys": {uid: position[tuple(value.items())] for uid, value in limits.items()}}


def decode_shard_limits(document: Any) -> dict[str, dict[str, Any]]:
    """{uid: LIMITS} of a shard's `limits` document; ValueError when it is not one."""
    if not isinstance(document, dict) or not isinstance(document.get("profiles"), list) or not isinstance(
            document.get("keys"), dict):
        raise ValueError('a shard\'s limits must be {"profiles": [LIMITS, ...], "keys": {"<uid>": index}}')
    profiles = document["profiles"]
    try:
        return {str(uid): profiles[index] for uid, index in document["keys"].items()}
    except (IndexError, TypeError) as exc:
        raise ValueError(f"a shard's limits name a profile that does not exist: {exc}") from exc


def encode_shard(shard: int, entries: ShardEntries) -> Encoded:
    """Shard `shard`'s content: `revoked.<i>.json` and `limits.<i>.json` (names unique across the set, so every
    object can be mounted into one directory)."""
    return _encode({f"revoked.{shard}": entries.revoked, f"limits.{shard}": encode_shard_limits(entries.limits)})


def index_shard_count(data: Mapping[str, str] | None, binary: Mapping[str, str] | None) -> int:
    """How many shards an index ConfigMap lists (0: inline layout); ValueError when `shards.json` is malformed."""
    shards = _decode(data, binary, ("shards",), complete=False).get("shards")
    if shards is None:
        return 0
    count = shards.get("count") if isinstance(shards, dict) else None
    if not isinstance(count, int) or isinstance(count, bool) or count < 0:
        raise ValueError(f"shards.json must be {{\"count\": N}}, got {shards!r}")
    return count


def decode_shard(shard: int, data: Mapping[str, str] | None, binary: Mapping[str, str] | None) -> ShardEntries:
    """Shard `shard`'s entries; ValueError when a document is missing (a shard always holds both)."""
    values = _decode(data, binary, (f"revoked.{shard}", f"limits.{shard}"), complete=True)
    return ShardEntries(revoked={str(k): int(v) for k, v in values[f"revoked.{shard}"].items()},
                        limits=decode_shard_limits(values[f"limits.{shard}"]))


def decode_layout(index: tuple[Mapping[str, str] | None, Mapping[str, str] | None],
                  shards: Sequence[tuple[Mapping[str, str] | None, Mapping[str, str] | None]] = ()) -> AuthDocuments:
    """The documents of an index ConfigMap and its shards' (in order), as written by this operator; ValueError when
    one is missing, so a reader never takes an unreadable set for an empty one."""
    count = index_shard_count(*index)
    if len(shards) != count:
        raise ValueError(f"shards.json lists {count} shards, {len(shards)} were read")
    if count == 0:
        return decode_documents(*index, complete=True)
    values = _decode(*index, ("config", "jwks"), complete=True)
    revoked: dict[str, int] = {}
    limits: dict[str, dict[str, Any]] = {}
    for number, (data, binary) in enumerate(shards):
        entries = decode_shard(number, data, binary)
        for token_id, expires in entries.revoked.items():
            revoked[token_id] = max(expires, revoked.get(token_id, 0))
        limits.update(entries.limits)
    return AuthDocuments(config=values["config"], jwks=values["jwks"], revoked=revoked, limits=limits)


def configmap_size(data: Mapping[str, str], binary: Mapping[str, str]) -> int:
    """Bytes the API server counts against the 1 MiB cap (keys plus values; binaryData decoded)."""
    size = sum(len(k) + len(v.encode()) for k, v in data.items())
    size += sum(len(k) + len(base64.b64decode(v)) for k, v in binary.items())
    return size


@dataclass(frozen=True)
class Layout:
    """The documents as written: the shard count (0: inline), each shard's entries, and every object's content and
    size (index first, then shard 0, 1, ...)."""

    shards: int
    entries: tuple[ShardEntries, ...]
    contents: tuple[Encoded, ...]
    sizes: tuple[int, ...]

    @property
    def size(self) -> int:
        """The fullest object's size: what the cap and the new-entry budget apply to."""
        return max(self.sizes)

    def names(self, index_name: str) -> tuple[str, ...]:
        """The ConfigMap names, in the order of `contents`."""
        return (index_name, *(shard_configmap_name(index_name, i) for i in range(self.shards)))

    def fullest(self, index_name: str) -> str:
        return self.names(index_name)[self.sizes.index(self.size)]


def _respread(documents: AuthDocuments, previous: Layout, changed: Iterable[str]) -> tuple[ShardEntries, ...]:
    """`previous.entries` with only the shards of the `changed` keys brought in line with `documents`."""
    entries = list(previous.entries)
    touched: dict[int, ShardEntries] = {}
    for key in changed:
        number = shard_of(key, previous.shards)
        shard = touched.get(number)
        if shard is None:
            shard = touched[number] = ShardEntries(dict(entries[number].revoked), dict(entries[number].limits))
        if key in documents.revoked:
            shard.revoked[key] = documents.revoked[key]
        else:
            shard.revoked.pop(key, None)
        if key in documents.limits:
            shard.limits[key] = documents.limits[key]
        else:
            shard.limits.pop(key, None)
    for number, shard in touched.items():
        entries[number] = shard
    return tuple(entries)


def build_layout(documents: AuthDocuments, shards: int, previous: Layout | None = None,
                 changed: Iterable[str] | None = None) -> Layout:
    """Encode `documents` over the index and `shards` shards; shards whose entries equal `previous`'s keep its
    encoding (a write that touches one shard encodes one shard). With `changed` (every token id and uid whose entry
    may differ from `previous`'s), only their shards are spread again instead of all entries."""
    if shards and previous is not None and previous.shards == shards and changed is not None:
        entries = _respread(documents, previous, changed)
    else:
        entries = split_entries(documents, shards) if shards else ()
    index = encode_index(documents, shards)
    contents, sizes = [index], [configmap_size(*index)]
    reuse = previous is not None and previous.shards == shards
    for number, shard in enumerate(entries):
        if reuse and previous is not None and previous.entries[number] == shard:
            contents.append(previous.contents[number + 1])
            sizes.append(previous.sizes[number + 1])
        else:
            encoded = encode_shard(number, shard)
            contents.append(encoded)
            sizes.append(configmap_size(*encoded))
    return Layout(shards, entries, tuple(contents), tuple(sizes))


def documents_size(documents: AuthDocuments, shards: int = 0) -> int:
    """Bytes of the fullest ConfigMap these documents make in a layout, as the API server counts them."""
    return build_layout(documents, shards).size


def adds_entry(documents: AuthDocuments, change: AuthChange) -> bool:
    """Whether `change` adds an entry that `documents` lacks: the only kind of change that may wait for room."""
    return (isinstance(change, SetKeyLimits) and change.limits is not None
            and change.apikey_uid not in documents.limits)


@dataclass(frozen=True)
class FittedChanges:
    """The documents after the changes that fit, their fullest object's size, which change groups had a change left
    out, and the layout they are written in."""

    documents: AuthDocuments
    size: int
    refused: tuple[int, ...] = ()
    layout: Layout | None = None


def fit_changes(documents: AuthDocuments, groups: Sequence[Sequence[AuthChange]], *, now: float,
                new_entry_budget: int = NEW_ENTRY_BUDGET, shards: int = 0,
                previous: Layout | None = None) -> FittedChanges:
    """Apply every group of changes in a layout of `shards` shards, leaving out new entries when the fullest object
    would exceed `new_entry_budget`.

    Revocations, removals and edits of existing entries are never left out: a revocation that waits is a token
    that stays valid. The caller refuses a write whose size still exceeds `CONFIGMAP_LIMIT`.
    """
    changes = [change for group in groups for change in group]
    updated = apply_changes(documents, changes, now=now)
    layout = build_layout(updated, shards, previous, _changed_keys(documents, updated, changes))
    if layout.size <= new_entry_budget:
        return FittedChanges(updated, layout.size, (), layout)
    refused = tuple(i for i, group in enumerate(groups) if any(adds_entry(documents, c) for c in group))
    if not refused:
        return FittedChanges(updated, layout.size, (), layout)
    kept = [c for c in changes if not adds_entry(documents, c)]
    updated = apply_changes(documents, kept, now=now)
    layout = build_layout(updated, shards, previous, _changed_keys(documents, updated, kept))
    return FittedChanges(updated, layout.size, refused, layout)


def _changed_keys(before: AuthDocuments, after: AuthDocuments, changes: Iterable[AuthChange]) -> set[str]:
    """Every token id and uid whose entry `changes` may have changed, pruned revocations included."""
    keys = {token_id for token_id in before.revoked if token_id not in after.revoked}
    for change in changes:
        if isinstance(change, RevokeTokens):
            keys.update(change.entries)
        elif isinstance(change, SetKeyLimits):
            keys.add(change.apikey_uid)
    return keys


def outgrows_inline(fitted: FittedChanges, shards: int) -> bool:
    """Whether an inline layout (`shards == 0`) must move its entries to shards to take these changes."""
    return shards == 0 and (fitted.size > INLINE_BUDGET or bool(fitted.refused))


def build_auth_object(
    *, name: str, namespace: str, labels: Mapping[str, str], owner_references: list[dict[str, Any]],
    content: Encoded,
) -> dict[str, Any]:
    """One ConfigMap object of the layout (the index or a shard)."""
    data, binary = content
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


def build_auth_configmap(
    *, name: str, namespace: str, labels: Mapping[str, str], owner_references: list[dict[str, Any]],
    documents: AuthDocuments,
) -> dict[str, Any]:
    """The whole ConfigMap object of the inline layout."""
    return build_auth_object(name=name, namespace=namespace, labels=labels, owner_references=owner_references,
                             content=encode_documents(documents))


def build_issuer_config(*, issuer: str, audience: str, default_limits: Limits, generation: int) -> dict[str, Any]:
    """The `config` document."""
    return {"issuer": issuer, "audience": audience, "defaultLimits": default_limits.as_document(),
            "generation": generation}
