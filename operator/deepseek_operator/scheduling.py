"""When each object next needs a reconcile on its own: rotations, grace periods, drift checks, retries.

One in-memory schedule and one loop for all objects, instead of a kopf timer per object (timers would put a
finalizer on every DeepSeekDeployment and wake 10,000 keys every few seconds for nothing).
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import logging
import threading
import time
from collections.abc import Callable, Coroutine, Hashable
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)


@dataclass(frozen=True, order=True)
class ObjectKey:
    kind: str
    namespace: str
    name: str


class DueSchedule:
    """A thread-safe map object -> due time, with groups (e.g. all keys of one deployment) that can be woken."""

    def __init__(self) -> None:
        self._due: dict[ObjectKey, float] = {}
        self._groups: dict[ObjectKey, Hashable] = {}
        self._heap: list[tuple[float, ObjectKey]] = []
        self._lock = threading.Lock()
        self.changed: Callable[[], None] = lambda: None

    def __len__(self) -> int:
        return len(self._due)

    def set(self, key: ObjectKey, due: float, *, group: Hashable | None = None) -> None:
        """Reconcile `key` at `due` (replacing an earlier plan)."""
        with self._lock:
            self._due[key] = due
            if group is not None:
                self._groups[key] = group
            heapq.heappush(self._heap, (due, key))
        self.changed()

    def forget(self, key: ObjectKey) -> None:
        with self._lock:
            self._due.pop(key, None)
            self._groups.pop(key, None)

    def wake_group(self, group: Hashable, now: float) -> int:
        """Make every object of `group` due now; returns how many."""
        with self._lock:
            members = [key for key, value in self._groups.items() if value == group and key in self._due]
            for key in members:
                self._due[key] = now
                heapq.heappush(self._heap, (now, key))
        if members:
            self.changed()
        return len(members)

    def pop_due(self, now: float) -> list[ObjectKey]:
        """Objects due at `now`, removed from the schedule (their reconcile sets the next time)."""
        due: list[ObjectKey] = []
        with self._lock:
            while self._heap and self._heap[0][0] <= now:
                when, key = heapq.heappop(self._heap)
                if self._due.get(key) == when:
                    del self._due[key]
                    due.append(key)
        return due

    def next_time(self) -> float | None:
        with self._lock:
            while self._heap and self._due.get(self._heap[0][1]) != self._heap[0][0]:
                heapq.heappop(self._heap)
            return self._heap[0][0] if self._heap else None


async def run_schedule(
    schedule: DueSchedule, dispatch: Callable[[ObjectKey], Coroutine[Any, Any, None]], *, max_sleep: float = 1.0,
    clock: Callable[[], float] = time.time,
) -> None:
    """Dispatch due objects until cancelled; wakes early when the schedule changes."""
    loop = asyncio.get_running_loop()
    wakeup = asyncio.Event()
    def changed() -> None:
        loop.call_soon_threadsafe(wakeup.set)

    schedule.changed = changed
    tasks: set[asyncio.Task[None]] = set()
    try:
        while True:
            for key in schedule.pop_due(clock()):
                task = asyncio.create_task(dispatch(key))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            upcoming = schedule.next_time()
            delay = max_sleep if upcoming is None else min(max_sleep, max(0.0, upcoming - clock()))
            wakeup.clear()
            # asyncio.timeout, not wait_for: on 3.11 wait_for returns the wake-up that came together with a
            # cancellation and drops the cancellation, and this loop would run on after the operator stopped it
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await wakeup.wait()
    finally:
        schedule.changed = lambda: None
        for task in tasks:
            task.cancel()
