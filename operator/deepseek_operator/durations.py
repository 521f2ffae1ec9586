"""Go-style durations (`72h`, `1h30m`, `90s`) as the CRDs write them, and RFC 3339 timestamps as status writes them."""

from __future__ import annotations

import re
from datetime import UTC, datetime

_UNIT_SECONDS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_PART = re.compile(r"([0-9]+(?:\.[0-9]+)?)(ns|us|µs|ms|s|m|h)")


def parse_duration(text: str) -> float:
    """Seconds in a Go duration string such as `72h` or `1h30m`; ValueError names the bad value."""
    position = 0
    total = 0.0
    if not text:
        raise ValueError("empty duration: write it like 72h, 90m or 30s")
    while position < len(text):
        match = _PART.match(text, position)
        if match is None:
            raise ValueError(f"invalid duration {text!r}: write it like 72h, 90m or 30s")
        total += float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
        position = match.end()
    return total


def format_timestamp(epoch: float) -> str:
    """RFC 3339 UTC timestamp with whole seconds, as Kubernetes writes them."""
    return datetime.fromtimestamp(int(epoch), tz=UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_timestamp(text: str) -> float:
    """Epoch seconds of an RFC 3339 timestamp (`2026-01-02T03:04:05Z`)."""
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
