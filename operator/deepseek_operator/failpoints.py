"""Named crash points for tests: `DEEPSEEK_OPERATOR_FAILPOINT=<name>[@<n>][=<namespace>/<object>]` SIGKILLs the
operator the n-th time (default: first) a reconcile of that object (default: any) reaches step `<name>`, so crash
recovery is tested at exact steps, not by luck. With `DEEPSEEK_OPERATOR_FAILPOINT_SLEEP=<seconds>` that reconcile
is held there that long instead (logged), so that a test can change the world while a reconcile is mid-way."""

from __future__ import annotations

import logging
import os
import signal
import threading
import time

ENV = "DEEPSEEK_OPERATOR_FAILPOINT"
SLEEP_ENV = "DEEPSEEK_OPERATOR_FAILPOINT_SLEEP"
_hits: dict[str, int] = {}
_lock = threading.Lock()
log = logging.getLogger(__name__)


def reached(name: str, obj: str = "") -> None:
    """Mark that a reconcile of `obj` ("namespace/name") reached step `name`; kills the process if targeted."""
    wanted = os.environ.get(ENV)
    if not wanted:
        return
    point, _, target = wanted.partition("=")
    point, _, count = point.partition("@")
    if point != name or (target and target != obj):
        return
    with _lock:  # counted per setting: a process that is given another one counts afresh
        _hits[wanted] = _hits.get(wanted, 0) + 1
        if _hits[wanted] != int(count or 1):
            return
    sleep = os.environ.get(SLEEP_ENV)
    if sleep:
        log.warning("failpoint %s reached by %s: holding it for %s s", name, obj or "a reconcile", sleep)
        time.sleep(float(sleep))
        log.warning("failpoint %s: going on", name)
        return
    os.kill(os.getpid(), signal.SIGKILL)
