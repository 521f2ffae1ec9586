"""Parse the auth documents into one immutable `AuthState`; no I/O here.

Layout (docs/auth-contract.md): the index documents `config`, `jwks` and, once a deployment outgrows one ConfigMap,
`shards` (`{"count": N}`); the entries (`revoked` token ids, per-key `limits`) live either inline next to the index
(`revoked.json`, `limits.json`) or in N shards, shard `i` holding `revoked.<i>.json` and `limits.<i>.json` (each
document plain or gzip, `.json.gz`). A shard's limits are stored compactly, as the distinct limits once each
(`profiles`) and each uid's index into them (`keys`); they are read in place (`ProfileLimits`). A sharded index
carries `revoked.json: []`, which a server of an earlier version refuses (keeping its last state rather than
reading "nothing revoked"); readers of this version ignore inline entries once `shards` is present. A reader takes
the union of every shard's entries, so it never depends on how the writer spread them, and it accepts no state
until every listed shard is loaded: a half-loaded set of shards would forget revocations. Parsed shards are kept by
their source, so a change to one shard re-parses only that shard (a revocation re-parses about 1/N of the entries),
and the state merges the parsed pieces without copying them.
"""

from __future__ import annotations

import base64
import gzip
import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import jwt
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from deepseek_server.limits.policy import KeyLimits

DOCUMENTS = ("config", "jwks", "revoked", "limits", "shards")
ENTRY_DOCUMENTS = ("revoked", "limits")
REQUIRED_DOCUMENTS = ("config", "jwks")
# More shards than this is not a layout the operator writes: refuse it rather than watch thousands of objects.
MAX_SHARDS = 256

V = TypeVar("V")


class MergedEntries(Mapping[str, V]):
    """Read-only union of several mappings (the inline entries and each shard's), without copying them."""

    __slots__ = ("_length", "_parts")

    def __init__(self, parts: Sequence[Mapping[str, V]]) -> None:
        self._parts = tuple(part for part in parts if part)
        self._length: int | None = None

    def __getitem__(self, key: str) -> V:
        for part in self._parts:
            if key in part:
                return part[key]
        raise KeyError(key)

    def get(self, key: str, default: Any = None) -> Any:
        for part in self._parts:
            if key in part:
                return part[key]
        return default

    def __contains__(self, key: object) -> bool:
        return any(key in part for part in self._parts)

    def __iter__(self) -> Iterator[str]:
        seen: set[str] = set()
        for part in self._parts:
            for key in part:
                if key not in seen:
                    seen.add(key)
                    yield key

    def __len__(self) -> int:
        if self._length is None:
            self._length = len(set().union(*self._parts)) if len(self._parts) > 1 else sum(map(len, self._parts))
        return self._length


def merged(parts: Sequence[Mapping[str, V]]) -> Mapping[str, V]:
    """One mapping over `parts`: the part itself when there is only one (the single-ConfigMap layout)."""
    non_empty = [part for part in parts if part]
    if not non_empty:
        return {}
    if len(non_empty) == 1:
        return non_empty[0]
    return MergedEntries(non_empty)


@dataclass(frozen=True)
class AuthEntries:
    """The parsed entries of one place (the inline documents or one shard)."""

    revoked: Mapping[str, int] = field(default_factory=dict)
    limits: Mapping[str, KeyLimits] = field(default_factory=dict)


@dataclass(frozen=True)
class AuthState:
    """Everything needed to verify a token and find its key's limits."""

    issuer: str
    audience: str
    keys: Mapping[str, Ed25519PublicKey]
    revoked: Mapping[str, int]
    default_limits: KeyLimits
    limits: Mapping[str, KeyLimits] = field(default_factory=dict)
    generation: int = 0

    def limits_for(self, uid: str) -> KeyLimits:
        return self.limits.get(uid, self.default_limits)


def entry_file(name: str, shard: int | None) -> str:
    """File stem of an entry document: `revoked` inline, `revoked.3` in shard 3."""
    return name if shard is None else f"{name}.{shard}"


def decode_document(name: str, raw: bytes | str, gzipped: bool) -> Any:
    """JSON of one document, from its plain or gzip form."""
    data = raw.encode() if isinstance(raw, str) else raw
    if gzipped:
        try:
            data = gzip.decompress(data)
        except OSError as exc:
            raise ValueError(f"{name}.json.gz is not valid gzip: {exc}") from exc
    try:
        return json.loads(data)
    except ValueError as exc:
        raise ValueError(f"{name}.json is not valid JSON: {exc}") from exc


def _from_configmap(data: Mapping[str, str] | None, binary_data: Mapping[str, str] | None,
                    files: Mapping[str, str]) -> dict[str, Any]:
    docs: dict[str, Any] = {}
    for name, stem in files.items():
        plain = (data or {}).get(f"{stem}.json")
        packed = (binary_data or {}).get(f"{stem}.json.gz")
        if plain is not None:
            docs[name] = decode_document(stem, plain, gzipped=False)
        elif packed is not None:
            docs[name] = decode_document(stem, base64.b64decode(packed), gzipped=True)
    return docs


def documents_from_configmap(data: Mapping[str, str] | None, binary_data: Mapping[str, str] | None) -> dict[str, Any]:
    """The index ConfigMap's documents: `data["<name>.json"]` or base64 `binaryData["<name>.json.gz"]`."""
    return _from_configmap(data, binary_data, {name: name for name in DOCUMENTS})


def shard_documents_from_configmap(shard: int, data: Mapping[str, str] | None,
                                   binary_data: Mapping[str, str] | None) -> dict[str, Any]:
    """Shard `shard`'s entry documents (`revoked.<i>.json`, `limits.<i>.json`, either form)."""
    return _from_configmap(data, binary_data, {name: entry_file(name, shard) for name in ENTRY_DOCUMENTS})


def shard_count(docs: Mapping[str, Any]) -> int:
    """How many shards the index lists (0: the entries are inline)."""
    if "shards" not in docs:
        return 0
    count = docs["shards"].get("count") if isinstance(docs["shards"], dict) else None
    if not isinstance(count, int) or isinstance(count, bool) or not 0 <= count <= MAX_SHARDS:
        raise ValueError(f'shards.json must be {{"count": 0..{MAX_SHARDS}}}, got {docs["shards"]!r}')
    return count


def _limits_parser() -> Any:
    # Keys share a handful of distinct limits: validate and build each distinct one once (types are part of the key,
    # so `true` never passes for `1`).
    seen: dict[tuple[Any, ...], KeyLimits] = {}

    def parse(doc: Any, where: str) -> KeyLimits:
        if isinstance(doc, dict):
            key = tuple((type(doc.get(f)), doc.get(f)) for f in ("rps", "burst", "tpm", "parallel"))
            found = seen.get(key)
            if found is None:
                found = seen[key] = KeyLimits.from_document(doc, where)
            return found
        return KeyLimits.from_document(doc, where)

    return parse


class ProfileLimits(Mapping[str, KeyLimits]):
    """A shard's limits as stored (`keys`: uid -> index into `profiles`), read in place: loading builds one
    `KeyLimits` per distinct profile, none per key."""

    __slots__ = ("_keys", "_profiles")

    def __init__(self, keys: dict[str, int], profiles: Sequence[KeyLimits]) -> None:
        self._keys = keys
        self._profiles = profiles

    def __getitem__(self, uid: str) -> KeyLimits:
        return self._profiles[self._keys[uid]]

    def __contains__(self, uid: object) -> bool:
        return uid in self._keys

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)


def _shard_limits(doc: Any, name: str) -> ProfileLimits:
    if not isinstance(doc, dict) or not isinstance(doc.get("profiles"), list) or not isinstance(doc.get("keys"),
                                                                                                dict):
        raise ValueError(f'{name}.json must be {{"profiles": [LIMITS, ...], "keys": {{"<uid>": <index>}}}}')
    profiles = [KeyLimits.from_document(profile, f"{name}.json profiles[{i}]")
                for i, profile in enumerate(doc["profiles"])]
    keys = doc["keys"]
    indexes = set(keys.values())
    if not all(type(i) is int and 0 <= i < len(profiles) for i in indexes):
        raise ValueError(f"{name}.json: every key must name one of its {len(profiles)} profiles by index")
    return ProfileLimits(keys, profiles)


def parse_entries(docs: Mapping[str, Any], shard: int | None = None) -> AuthEntries:
    """The revoked and limits entries of the inline documents (`shard=None`) or of one shard."""
    revoked_name, limits_name = entry_file("revoked", shard), entry_file("limits", shard)
    revoked_doc = docs.get("revoked", {})
    if not isinstance(revoked_doc, dict) or not all(
        type(k) is str and type(v) is int for k, v in revoked_doc.items()
    ):
        raise ValueError(f'{revoked_name}.json must map token ids to expiry seconds: {{"<jti>": <exp>}}')
    limits_doc = docs.get("limits", {})
    if shard is not None:
        return AuthEntries(revoked=revoked_doc, limits=_shard_limits(limits_doc, limits_name))
    if not isinstance(limits_doc, dict):
        raise ValueError(f'{limits_name}.json must map ApiKey uids to limits: '
                         '{"<uid>": {"rps": ..., "burst": ...}}')
    parse = _limits_parser()
    limits = {uid: parse(doc, f"{limits_name}.json[{uid}]") for uid, doc in limits_doc.items()}
    return AuthEntries(revoked=revoked_doc, limits=limits)


def _public_keys(jwks: Any) -> dict[str, Ed25519PublicKey]:
    if not isinstance(jwks, dict) or not isinstance(jwks.get("keys"), list):
        raise ValueError('jwks.json must be {"keys": [...]}')
    keys: dict[str, Ed25519PublicKey] = {}
    for index, jwk in enumerate(jwks["keys"]):
        if not isinstance(jwk, dict) or jwk.get("kty") != "OKP" or jwk.get("crv") != "Ed25519":
            raise ValueError(f"jwks.json keys[{index}]: only OKP/Ed25519 keys are accepted")
        if "d" in jwk:
            raise ValueError(f"jwks.json keys[{index}]: holds a private key ('d'); publish public keys only")
        kid = jwk.get("kid")
        if not isinstance(kid, str) or not kid:
            raise ValueError(f"jwks.json keys[{index}]: missing 'kid'")
        try:
            key = jwt.PyJWK(jwk, algorithm="EdDSA").key
        except jwt.PyJWKError as exc:
            raise ValueError(f"jwks.json keys[{index}] (kid {kid}): {exc}") from exc
        if not isinstance(key, Ed25519PublicKey):
            raise ValueError(f"jwks.json keys[{index}] (kid {kid}): not an Ed25519 public key")
        keys[kid] = key
    return keys


def assemble_auth_state(docs: Mapping[str, Any], inline: AuthEntries, shards: Sequence[AuthEntries]) -> AuthState:
    """An `AuthState` from the index documents, the inline entries and every listed shard's entries (in order)."""
    missing = [name for name in REQUIRED_DOCUMENTS if name not in docs]
    if missing:
        raise ValueError(f"auth configuration lacks {', '.join(n + '.json' for n in missing)}")
    count = shard_count(docs)
    if len(shards) != count:
        raise ValueError(f"shards.json lists {count} shards, {len(shards)} are loaded")
    config = docs["config"]
    if not isinstance(config, dict):
        raise ValueError("config.json must be an object")
    issuer, audience = config.get("issuer"), config.get("audience")
    if not isinstance(issuer, str) or not issuer or not isinstance(audience, str) or not audience:
        raise ValueError("config.json needs non-empty string 'issuer' and 'audience'")
    default_limits = KeyLimits.from_document(config.get("defaultLimits"), "config.json defaultLimits")
    generation = config.get("generation", 0)
    return AuthState(
        issuer=issuer,
        audience=audience,
        keys=_public_keys(docs["jwks"]),
        revoked=merged([inline.revoked, *(shard.revoked for shard in shards)]),
        default_limits=default_limits,
        limits=merged([inline.limits, *(shard.limits for shard in shards)]),
        generation=generation if isinstance(generation, int) else 0,
    )


def parse_auth_state(docs: Mapping[str, Any], shards: Sequence[Mapping[str, Any]] = ()) -> AuthState:
    """Build an `AuthState` from decoded documents (and each listed shard's decoded documents, in order); raises
    ValueError naming the document and field at fault."""
    inline = parse_entries(docs) if shard_count(docs) == 0 else AuthEntries()
    return assemble_auth_state(docs, inline, [parse_entries(shard, index) for index, shard in enumerate(shards)])
