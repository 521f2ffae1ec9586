"""The Secret an ApiKey's token lives in (pure builder), shaped so a workload can `envFrom` it."""

from __future__ import annotations

import base64
import binascii
from typing import Any

from .names import apikey_secret_labels, owner_reference

TOKEN_KEY = "api-key"


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def build_apikey_secret(
    *, apikey: dict[str, Any], secret_name: str, deployment: str, token: str, base_url: str
) -> dict[str, Any]:
    """The whole Secret: `api-key`, `base-url` and their OpenAI-client twins, owned by the ApiKey."""
    meta = apikey["metadata"]
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "type": "Opaque",
        "metadata": {
            "name": secret_name,
            "namespace": meta["namespace"],
            "labels": apikey_secret_labels(deployment, meta["uid"]),
            "ownerReferences": [owner_reference(apikey)],
        },
        "data": {
            TOKEN_KEY: _b64(token),
            "base-url": _b64(base_url),
            "OPENAI_API_KEY": _b64(token),
            "OPENAI_BASE_URL": _b64(base_url),
        },
    }


def secret_token(secret: dict[str, Any] | None) -> str | None:
    """The token in a Secret's `api-key`, or None when absent or unreadable."""
    if not secret:
        return None
    raw = (secret.get("data") or {}).get(TOKEN_KEY)
    if not raw:
        return None
    try:
        return base64.b64decode(raw, validate=True).decode("ascii")
    except (binascii.Error, UnicodeDecodeError):
        return None


def secret_up_to_date(actual: dict[str, Any], desired: dict[str, Any]) -> bool:
    """Whether the Secret holds exactly the desired data, labels and owner."""
    labels = actual.get("metadata", {}).get("labels") or {}
    owners = {ref.get("uid") for ref in actual.get("metadata", {}).get("ownerReferences") or []}
    return (
        (actual.get("data") or {}) == desired["data"]
        and all(labels.get(k) == v for k, v in desired["metadata"]["labels"].items())
        and desired["metadata"]["ownerReferences"][0]["uid"] in owners
    )
