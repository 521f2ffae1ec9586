"""Keyed digests of requests: what audit records, history and response-cache keys hold instead of a plain hash.

A plain sha256 of a short prompt can be reversed by hashing guesses; an HMAC under the deployment's record key
(`--record-key`, which the operator keeps in a Secret per DeepSeekDeployment) cannot be computed without the key.
A request's fingerprint is keyed where it is computed (`request_fingerprint`, once per request): no plain hash of a
request exists, not even in the process's memory.
"""

from __future__ import annotations

import hashlib
import json
import logging
import secrets
from typing import Any

import orjson

log = logging.getLogger(__name__)

SHA256_BLOCK = 64
# what a request's fingerprint leaves out: how the answer is delivered, and who asked, not what it is
TRANSPORT_FIELDS = ("stream", "stream_options", "user")


def _part(text: str) -> bytes:
    """One part of a digest's message: its length in characters, a colon, the text."""
    return f"{len(text)}:{text}".encode()


class RequestKeys:
    """HMAC-SHA256 under one secret: `request_fingerprint` for audit and history (and inside cache keys),
    `cache_key` for the response cache. Safe to call from several threads: each digest works on copies of the key's
    hash states, which nothing changes after construction."""

    def __init__(self, secret: bytes, deployment: str = "", revision: str = "") -> None:
        # HMAC-SHA256 (RFC 2104) from the key's two padded SHA-256 states, computed once: a digest from copies of
        # them takes about half the instructions of `hmac.digest`, which sets up OpenSSL's MAC context every time.
        key = hashlib.sha256(secret).digest() if len(secret) > SHA256_BLOCK else secret
        key = key.ljust(SHA256_BLOCK, b"\0")
        self._inner = hashlib.sha256(bytes(byte ^ 0x36 for byte in key))
        self._outer = hashlib.sha256(bytes(byte ^ 0x5C for byte in key))
        # every request takes a fingerprint: its message's first part is fed once, here
        self._fingerprint_inner = self._inner.copy()
        self._fingerprint_inner.update(_part("fingerprint"))
        self.deployment = deployment
        self.revision = revision

    @classmethod
    def from_settings(cls, record_key: str | None, deployment: str, revision: str) -> RequestKeys:
        if record_key is None:
            log.warning("no --record-key given: request fingerprints and cache keys use a random key of this process, "
                        "so replicas share no cache entries and their audit fingerprints differ")
            return cls(secrets.token_bytes(32), deployment, revision)
        return cls(record_key.encode(), deployment, revision)

    def _mac(self, *parts: str) -> str:
        # length-prefixed, so that no two different part lists give the same message
        message = "".join(f"{len(part)}:{part}" for part in parts).encode()
        inner = self._inner.copy()
        inner.update(message)
        outer = self._outer.copy()
        outer.update(inner.digest())
        return outer.hexdigest()

    def request_fingerprint(self, route: str, body: dict[str, Any]) -> str:
        """What determines a request's answer (route, model, prompt or messages, sampling parameters): the HMAC of
        `11:fingerprint` followed by `canonical`, the route and the body without `TRANSPORT_FIELDS` as compact JSON
        with sorted keys (the message's last part, so it needs no length). Equal requests get equal fingerprints
        under one key (one deployment's replicas agree); nobody without the key can test a guessed prompt."""
        document = {"route": route, "body": {k: v for k, v in body.items() if k not in TRANSPORT_FIELDS}}
        try:
            canonical = orjson.dumps(document, option=orjson.OPT_SORT_KEYS)
        except TypeError:  # what orjson refuses (an integer beyond 64 bits): the standard library's sorted JSON
            canonical = json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
        inner = self._fingerprint_inner.copy()
        inner.update(canonical)
        outer = self._outer.copy()
        outer.update(inner.digest())
        return outer.hexdigest()

    def cache_key(self, fingerprint: str, env: str, scope: str) -> str:
        """The response-cache key: this deployment and revision, the caller's environment and scope, the request (its
        `request_fingerprint`)."""
        return self._mac("cache", self.deployment, self.revision, env, scope, fingerprint)
