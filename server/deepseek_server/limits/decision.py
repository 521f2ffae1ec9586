"""What a limiter answers, and how that becomes OpenAI's `x-ratelimit-*` and `Retry-After` headers."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from deepseek_server.limits.policy import KeyLimits

LimitKind = Literal["requests", "tokens", "parallel"]


def format_duration(seconds: float) -> str:
    """OpenAI's reset format: `1s`, `250ms`, `6m0s`."""
    if seconds < 1:
        return f"{max(math.ceil(seconds * 1000), 0)}ms"
    whole = math.ceil(seconds * 1000) / 1000
    minutes, rest = divmod(whole, 60)
    rest_text = f"{rest:.3f}".rstrip("0").rstrip(".")
    return f"{int(minutes)}m{rest_text}s" if minutes else f"{rest_text}s"


@dataclass(slots=True)
class Decision:
    """The outcome of one admission check (fields in this order: the memory store passes them by position)."""

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

    def headers(self) -> dict[str, str]:
        out = {
            "x-ratelimit-limit-requests": self.limits.capacity_header,
            "x-ratelimit-remaining-requests": str(self.remaining_requests),
            "x-ratelimit-reset-requests": format_duration(self.reset_requests_s),
        }
        if self.limits.tpm is not None and self.remaining_tokens is not None:
            out["x-ratelimit-limit-tokens"] = str(self.limits.tpm)
            out["x-ratelimit-remaining-tokens"] = str(self.remaining_tokens)
            out["x-ratelimit-reset-tokens"] = format_duration(self.reset_tokens_s)
        if not self.allowed:
            out["retry-after"] = str(max(math.ceil(self.retry_after_s), 1))
            out["retry-after-ms"] = str(max(math.ceil(self.retry_after_s * 1000), 1))
        if self.extra_headers:
            out.update(self.extra_headers)
        return out
