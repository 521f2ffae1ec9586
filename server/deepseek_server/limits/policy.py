"""A key's limits as the auth ConfigMap states them (`LIMITS` in docs/auth-contract.md)."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Any


@dataclass(frozen=True)
class KeyLimits:
    """`rps` requests per second with `burst` admitted at once; `tpm` tokens/minute and `parallel` (None: no limit)."""

    rps: float
    burst: int
    tpm: int | None = None
    parallel: int | None = None

    @classmethod
    def from_document(cls, doc: Any, where: str) -> KeyLimits:
        if not isinstance(doc, dict):
            raise ValueError(f"{where}: limits must be an object like {{\"rps\": 10, \"burst\": 20}}, got {doc!r}")
        rps, burst = doc.get("rps"), doc.get("burst")
        tpm, parallel = doc.get("tpm"), doc.get("parallel")
        if not isinstance(rps, int | float) or isinstance(rps, bool) or rps <= 0:
            raise ValueError(f"{where}: rps must be a positive number, got {rps!r}")
        if not isinstance(burst, int) or isinstance(burst, bool) or burst < 0:
            raise ValueError(f"{where}: burst must be a non-negative integer, got {burst!r}")
        for name, value in (("tpm", tpm), ("parallel", parallel)):
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value <= 0):
                raise ValueError(f"{where}: {name} must be a positive integer or null, got {value!r}")
        return cls(rps=float(rps), burst=burst, tpm=tpm, parallel=parallel)

    # Derived values are cached: they are read on every admission, and a key's limits change only with a new auth state.
    @cached_property
    def capacity(self) -> int:
        """How many requests an idle key may send at once."""
        return max(self.burst, 1)

    @cached_property
    def interval(self) -> float:
        """Seconds each request pushes the key's theoretical arrival time (1 / rps)."""
        return 1.0 / self.rps

    @cached_property
    def tolerance(self) -> float:
        """How far ahead of now the theoretical arrival time may run: `capacity` requests' worth."""
        return self.capacity * self.interval

    @cached_property
    def limit_requests_header(self) -> tuple[bytes, bytes]:
        """The `x-ratelimit-limit-requests` header (`capacity`), as ASGI sends it."""
        return b"x-ratelimit-limit-requests", b"%d" % self.capacity


UNLIMITED = KeyLimits(rps=1e9, burst=1_000_000_000)
