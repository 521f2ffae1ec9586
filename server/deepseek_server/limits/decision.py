"""What a limiter answers, and how that becomes OpenAI's `x-ratelimit-*` and `Retry-After` headers."""

from __future__ import annotations

import math
from typing import Literal, NamedTuple

from deepseek_server.limits.policy import KeyLimits

LimitKind = Literal["requests", "tokens", "parallel"]


# under a second, the common case: looked up, not formatted
_MILLISECONDS = [f"{millis}ms" for millis in range(1001)]
RESET_REQUESTS_HEADERS = [(b"x-ratelimit-reset-requests", text.encode()) for text in _MILLISECONDS]


def format_duration(seconds: float) -> str:
    """OpenAI's reset format: `1s`, `250ms`, `6m0s`."""
    if seconds < 1:
        return _MILLISECONDS[math.ceil(seconds * 1000)] if seconds > 0 else "0ms"
    whole = math.ceil(seconds * 1000) / 1000
    minutes, rest = divmod(whole, 60)
    rest_text = f"{rest:.3f}".rstrip("0").rstrip(".")
    return f"{int(minutes)}m{rest_text}s" if minutes else f"{rest_text}s"


def request_rate_headers(limits: KeyLimits, remaining: int, reset_s: float) -> list[tuple[bytes, bytes]]:
    """OpenAI's three `x-ratelimit-*-requests` headers, as ASGI sends them."""
    return [limits.limit_requests_header,
            (b"x-ratelimit-remaining-requests", b"%d" % remaining),
            RESET_REQUESTS_HEADERS[math.ceil(reset_s * 1000)] if 0 < reset_s < 1
            else (b"x-ratelimit-reset-requests", format_duration(reset_s).encode())]


class Decision(NamedTuple):
    """The outcome of one admission check (keys limited only by a request rate skip it when admitted in memory: see
    `MemoryLimitStore.admit_request`). A tuple, which the memory store builds with `tuple.__new__` (fields in this
    order)."""

    allowed: bool
    limits: KeyLimits
    kind: LimitKind | None = None
    retry_after_s: float = 0.0
    remaining_requests: int = 0
    reset_requests_s: float = 0.0
    remaining_tokens: int | None = None
    reset_tokens_s: float = 0.0
    backend: Literal["memory", "redis"] = "memory"
    lease_id: str = ""
    extra_headers: dict[str, str] | None = None

    def raw_headers(self) -> list[tuple[bytes, bytes]]:
        """The response headers as ASGI sends them (bytes go to the server as they are: a dict of text would be
        lowered and encoded again, header by header)."""
        limits = self.limits
        out = request_rate_headers(limits, self.remaining_requests, self.reset_requests_s)
        if limits.tpm is not None and self.remaining_tokens is not None:
            out += [(b"x-ratelimit-limit-tokens", b"%d" % limits.tpm),
                    (b"x-ratelimit-remaining-tokens", b"%d" % self.remaining_tokens),
                    (b"x-ratelimit-reset-tokens", format_duration(self.reset_tokens_s).encode())]
        if not self.allowed:
            out += [(b"retry-after", b"%d" % max(math.ceil(self.retry_after_s), 1)),
                    (b"retry-after-ms", b"%d" % max(math.ceil(self.retry_after_s * 1000), 1))]
        if self.extra_headers:
            out += [(name.encode(), value.encode()) for name, value in self.extra_headers.items()]
        return out

    def headers(self) -> dict[str, str]:
        """`raw_headers` as text."""
        return {name.decode(): value.decode() for name, value in self.raw_headers()}
