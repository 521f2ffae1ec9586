"""Polling for tests that wait on a real cluster: one `wait_for` that says what it waited for and what it saw."""

from __future__ import annotations

import signal
import time
from collections.abc import Callable
from typing import Any

from kubernetes import client


def wait_for(what: str, check: Callable[[], Any], timeout: float = 60, interval: float = 0.2) -> Any:
    """Poll `check` until it returns something truthy; fail saying what was awaited and what was last seen."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            result = check()
        except client.ApiException as exc:
            result, last = None, f"ApiException {exc.status}"
        else:
            last = result
        if result:
            return result
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}; last seen: {last!r}")


def exit_on_sigterm() -> None:
    """Make SIGTERM leave the script like Ctrl-C does, through its `with` blocks and `finally`s, so the devclusters,
    operators and servers it started are stopped (their processes run in sessions of their own, and Python's default
    SIGTERM ends the script without stopping them). Call from a script's main thread."""
    def leave(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)
    signal.signal(signal.SIGTERM, leave)
