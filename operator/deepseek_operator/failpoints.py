"""Named crash points for tests: `DEEPSEEK_OPERATOR_FAILPOINT=<name>[@<n>][=<namespace>/<object>]` SIGKILLs the
operator the n-th time (default: first) a reconcile of that object (default: any) reaches step `<name>`, so crash
recovery is tested at exact steps, not by luck."""

from __future__ import annotations

import os
import signal
import threading

ENV = "DEEPSEEK_OPERATOR_FAILPOINT"
_hits: dict[str, int] = {}
_lock = threading.Lock()


def reached(name: str, obj: str = "") -> None:
    """Mark that a reconcile of `obj` ("namespace/name") reached step `name`; kills the process if targeted."""
    wanted = os.environ.get(ENV)
    if not wanted:
        return
    point, _, target = wanted.partition("=")
    point, _, count = point.partition("@")
    if point != name or (target and target != obj):
        return
    with _lock:
        _hits[name] = _hits.get(name, 0) + 1
        if _hits[name] >= int(count or 1):
            os.kill(os.getpid(), signal.SIGKILL)
