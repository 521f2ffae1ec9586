"""What the operator logs when kopf has not stopped in time: where its thread and its tasks wait."""

from __future__ import annotations

import asyncio
import threading

from deepseek_operator.__main__ import describe_stuck


def test_describe_stuck_names_where_the_thread_and_its_loops_tasks_wait():
    release = threading.Event()
    started = threading.Event()
    holder: dict[str, asyncio.AbstractEventLoop] = {}

    async def waits_for_credentials_forever() -> None:
        await asyncio.Event().wait()

    def blocked_in_shutdown() -> None:
        release.wait()

    async def main() -> None:
        holder["loop"] = asyncio.get_running_loop()
        task = asyncio.get_running_loop().create_task(waits_for_credentials_forever(), name="watcher of apikeys")
        await asyncio.sleep(0)
        started.set()
        blocked_in_shutdown()  # blocks the loop, as a join of a worker thread would
        task.cancel()

    thread = threading.Thread(target=asyncio.run, args=(main(),), name="kopf", daemon=True)
    thread.start()
    assert started.wait(10)
    try:
        text = describe_stuck(thread, holder["loop"])
    finally:
        release.set()
        thread.join(10)
    thread_part = text.partition("\ntask ")[0]
    assert thread_part.startswith("thread kopf:"), text
    # innermost first: the wait itself, then the function that waits
    assert thread_part.splitlines()[1].endswith(" in wait"), text
    assert " in blocked_in_shutdown" in thread_part, text
    watcher = text.partition("\ntask watcher of apikeys:\n")[2].splitlines()
    assert watcher and watcher[0].endswith(" in waits_for_credentials_forever"), text


def test_describe_stuck_of_a_finished_thread_without_a_loop_says_so():
    thread = threading.Thread(target=lambda: None)
    thread.start()
    thread.join()
    assert describe_stuck(thread, None) == "(nothing to show)"
