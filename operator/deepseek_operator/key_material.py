"""Fresh randomness for keys and token ids: the only place that draws it, so everything else stays pure."""

from __future__ import annotations

import os

from .signing_keys import SigningKey, b64url, signing_key_from_seed


def new_token_id() -> str:
    """A `jti`: 16 random bytes, base64url without padding (22 characters)."""
    return b64url(os.urandom(16))


def new_signing_key(now: int) -> SigningKey:
    """A fresh Ed25519 key; the key-ring plan sets when it starts signing."""
    return signing_key_from_seed(os.urandom(32), created_at=now, sign_from=now)
