"""Parse the auth documents (config, jwks, revoked, limits) into one immutable `AuthState`; no I/O here."""

from __future__ import annotations

import base64
import gzip
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from deepseek_server.limits.policy import KeyLimits

DOCUMENTS = ("config", "jwks", "revoked", "limits")
REQUIRED_DOCUMENTS = ("config", "jwks")


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


def documents_from_configmap(data: Mapping[str, str] | None, binary_data: Mapping[str, str] | None) -> dict[str, Any]:
    """The documents of a ConfigMap: `data["<name>.json"]` or base64 `binaryData["<name>.json.gz"]`."""
    docs: dict[str, Any] = {}
    for name in DOCUMENTS:
        plain = (data or {}).get(f"{name}.json")
        packed = (binary_data or {}).get(f"{name}.json.gz")
        if plain is not None:
            docs[name] = decode_document(name, plain, gzipped=False)
        elif packed is not None:
            docs[name] = decode_document(name, base64.b64decode(packed), gzipped=True)
    return docs


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


def parse_auth_state(docs: Mapping[str, Any]) -> AuthState:
    """Build an `AuthState` from decoded documents; raises ValueError naming the document and field at fault."""
    missing = [name for name in REQUIRED_DOCUMENTS if name not in docs]
    if missing:
        raise ValueError(f"auth configuration lacks {', '.join(n + '.json' for n in missing)}")
    config = docs["config"]
    if not isinstance(config, dict):
        raise ValueError("config.json must be an object")
    issuer, audience = config.get("issuer"), config.get("audience")
    if not isinstance(issuer, str) or not issuer or not isinstance(audience, str) or not audience:
        raise ValueError("config.json needs non-empty string 'issuer' and 'audience'")
    default_limits = KeyLimits.from_document(config.get("defaultLimits"), "config.json defaultLimits")
    revoked_doc = docs.get("revoked", {})
    if not isinstance(revoked_doc, dict) or not all(
        isinstance(k, str) and isinstance(v, int) for k, v in revoked_doc.items()
    ):
        raise ValueError('revoked.json must map token ids to expiry seconds: {"<jti>": <exp>}')
    limits_doc = docs.get("limits", {})
    if not isinstance(limits_doc, dict):
        raise ValueError('limits.json must map ApiKey uids to limits: {"<uid>": {"rps": ..., "burst": ...}}')
    limits = {uid: KeyLimits.from_document(doc, f"limits.json[{uid}]") for uid, doc in limits_doc.items()}
    generation = config.get("generation", 0)
    return AuthState(
        issuer=issuer,
        audience=audience,
        keys=_public_keys(docs["jwks"]),
        revoked=dict(revoked_doc),
        default_limits=default_limits,
        limits=limits,
        generation=generation if isinstance(generation, int) else 0,
    )
