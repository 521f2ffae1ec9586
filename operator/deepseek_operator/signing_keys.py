"""The Ed25519 signing-key ring of one deployment and its rotation schedule (pure: keys and `now` are passed in).

A key is published in the JWKS before it signs (`sign_from` lies `propagation_delay` ahead), signs for
`rotation_interval`, and once a newer key has taken over it stays published until no live token it signed remains.
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

KEY_RING_DATA_KEY = "keys.json"


def b64url(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def b64url_decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


@dataclass(frozen=True)
class SigningKey:
    """One Ed25519 key: `seed` is the private key (base64url), `x` the public key (base64url), `kid` its id."""

    kid: str
    seed: str = field(repr=False)
    x: str
    created_at: int
    sign_from: int

    def private_key(self) -> Ed25519PrivateKey:
        return Ed25519PrivateKey.from_private_bytes(b64url_decode(self.seed))

    def jwk(self) -> dict[str, str]:
        """The public JWK (never the private part)."""
        return {"kty": "OKP", "crv": "Ed25519", "x": self.x, "kid": self.kid, "use": "sig", "alg": "EdDSA"}


def signing_key_from_seed(seed: bytes, *, created_at: int, sign_from: int) -> SigningKey:
    """Derive the public key and a `kid` (RFC 7638 thumbprint, first 16 chars) from a 32-byte seed."""
    private = Ed25519PrivateKey.from_private_bytes(seed)
    public = private.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    x = b64url(public)
    thumbprint_input = json.dumps({"crv": "Ed25519", "kty": "OKP", "x": x}, separators=(",", ":"), sort_keys=True)
    kid = b64url(hashlib.sha256(thumbprint_input.encode()).digest())[:16]
    return SigningKey(kid=kid, seed=b64url(seed), x=x, created_at=created_at, sign_from=sign_from)


@dataclass(frozen=True)
class RotationPolicy:
    """When keys rotate (seconds)."""

    rotation_interval: float
    propagation_delay: float
    retire_margin: float


@dataclass(frozen=True)
class KeyRing:
    """All keys of one deployment, oldest first."""

    keys: tuple[SigningKey, ...] = ()

    def active(self, now: float, published: frozenset[str] | None = None) -> SigningKey | None:
        """The key that signs at `now`: the newest whose `sign_from` has passed (and, if given, is published)."""
        candidates = [k for k in self.keys if k.sign_from <= now and (published is None or k.kid in published)]
        return max(candidates, key=lambda k: (k.sign_from, k.created_at), default=None)

    def kids(self) -> frozenset[str]:
        return frozenset(k.kid for k in self.keys)

    def get(self, kid: str) -> SigningKey | None:
        return next((k for k in self.keys if k.kid == kid), None)


def _ordered(keys: list[SigningKey]) -> tuple[SigningKey, ...]:
    return tuple(sorted(keys, key=lambda k: (k.sign_from, k.created_at)))


def retired_at(ring: KeyRing, key: SigningKey) -> int | None:
    """When `key` stopped signing: the `sign_from` of the next key, or None while it is the newest."""
    later = [k.sign_from for k in ring.keys if (k.sign_from, k.created_at) > (key.sign_from, key.created_at)]
    return min(later) if later else None


def plan_key_ring(
    ring: KeyRing,
    *,
    now: int,
    policy: RotationPolicy,
    live_token_expiry: Mapping[str, int],
    fresh_key: SigningKey,
    published: frozenset[str] | None = None,
) -> KeyRing:
    """The ring after this reconcile: add a key when one is due (published ahead of signing), drop spent ones.

    `live_token_expiry` maps kid -> the latest expiry of a live (unrevoked) token it signed; `fresh_key` is used
    (with its `sign_from` set here) only when a new key is due. `published` is the kids the auth ConfigMap holds as
    last read (None: unknown): a key not among them yet signs no sooner than `propagation_delay` from now.
    """
    keys = list(ring.keys)
    if not keys:
        return KeyRing((replace(fresh_key, created_at=now, sign_from=now),))
    if published and published & ring.kids():
        # Servers load a key only once it is published: count its propagation delay from then, not from when it
        # was planned (the write that publishes it may have failed, or the operator stopped before it).
        earliest = int(now + policy.propagation_delay)
        keys = [replace(k, sign_from=earliest) if k.kid not in published and k.sign_from < earliest else k
                for k in keys]
        ring = KeyRing(_ordered(keys))
        keys = list(ring.keys)
    active = ring.active(now)
    pending = [k for k in keys if k.sign_from > now]
    if not pending and (active is None or active.sign_from + policy.rotation_interval <= now):
        keys.append(replace(fresh_key, created_at=now, sign_from=int(now + policy.propagation_delay)))
    current = KeyRing(_ordered(keys))
    active = current.active(now)
    kept = []
    for key in current.keys:
        stopped = retired_at(current, key)
        spent = (
            key is not active
            and key.sign_from <= now
            and stopped is not None
            and stopped <= now
            and stopped + policy.retire_margin <= now
            and live_token_expiry.get(key.kid, 0) <= now
        )
        if not spent:
            kept.append(key)
    return KeyRing(_ordered(kept))


def next_key_ring_change(
    ring: KeyRing, *, now: int, policy: RotationPolicy, live_token_expiry: Mapping[str, int]
) -> float | None:
    """The earliest time `plan_key_ring` would change the ring or the active key (None: nothing scheduled)."""
    if not ring.keys:
        return float(now)
    times: list[float] = []
    active = ring.active(now)
    pending = [k.sign_from for k in ring.keys if k.sign_from > now]
    times.extend(pending)
    if not pending and active is not None:
        times.append(active.sign_from + policy.rotation_interval)
    for key in ring.keys:
        stopped = retired_at(ring, key)
        if key is active or stopped is None:
            continue
        times.append(max(stopped + policy.retire_margin, live_token_expiry.get(key.kid, 0), stopped))
    return min(times) if times else None


def build_jwks(ring: KeyRing) -> dict[str, Any]:
    """The public JWKS of every key in the ring (pending ones included: publish before signing)."""
    return {"keys": [key.jwk() for key in ring.keys]}


def serialize_key_ring(ring: KeyRing) -> str:
    """The ring as the signing-key Secret stores it (JSON, private seeds included)."""
    return json.dumps(
        {"keys": [
            {"kid": k.kid, "seed": k.seed, "x": k.x, "createdAt": k.created_at, "signFrom": k.sign_from}
            for k in ring.keys
        ]},
        separators=(",", ":"),
        sort_keys=True,
    )


def parse_key_ring(text: str) -> KeyRing:
    """The ring from its Secret form; ValueError on a malformed Secret."""
    try:
        raw = json.loads(text)
        keys = [
            SigningKey(kid=str(item["kid"]), seed=str(item["seed"]), x=str(item["x"]),
                       created_at=int(item["createdAt"]), sign_from=int(item["signFrom"]))
            for item in raw["keys"]
        ]
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"malformed {KEY_RING_DATA_KEY} in the signing-key Secret: {exc}") from exc
    return KeyRing(_ordered(keys))
