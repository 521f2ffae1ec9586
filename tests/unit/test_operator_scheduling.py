import asyncio

from deepseek_operator.scheduling import DueSchedule, ObjectKey, run_schedule

A, B, C = (ObjectKey("ApiKey", "ns", n) for n in "abc")


def test_due_objects_pop_in_time_order_and_replanning_replaces():
    schedule = DueSchedule()
    schedule.set(A, 10)
    schedule.set(B, 5)
    schedule.set(A, 20)
    assert schedule.next_time() == 5
    assert schedule.pop_due(15) == [B]
    assert schedule.pop_due(19) == [] and schedule.pop_due(20) == [A] and len(schedule) == 0


def test_waking_a_group_makes_its_members_due_now():
    schedule = DueSchedule()
    schedule.set(A, 100, group="chat")
    schedule.set(B, 100, group="other")
    assert schedule.wake_group("chat", 1) == 1
    assert schedule.pop_due(1) == [A]
    schedule.forget(B)
    assert schedule.pop_due(1000) == []


async def test_loop_dispatches_due_objects_and_wakes_on_new_entries():
    schedule = DueSchedule()
    seen: list[ObjectKey] = []

    async def dispatch(key: ObjectKey) -> None:
        seen.append(key)

    loop_task = asyncio.create_task(run_schedule(schedule, dispatch, max_sleep=5))
    await asyncio.sleep(0.05)
    schedule.set(C, 0)
    for _ in range(50):
        if seen:
            break
        await asyncio.sleep(0.01)
    loop_task.cancel()
    assert seen == [C], "a new entry must wake the loop well before max_sleep"


async def test_cancelling_the_loop_as_the_schedule_changes_stops_it():
    """The loop sleeps until the next due time or a change; a cancellation that arrives together with a change (an
    operator stopping while ApiKeys are still being scheduled) must end it, not be taken for the wake-up."""
    schedule = DueSchedule()

    async def dispatch(key: ObjectKey) -> None:
        pass

    loop_task = asyncio.create_task(run_schedule(schedule, dispatch, max_sleep=30))
    await asyncio.sleep(0.05)  # the loop sleeps: nothing is due
    schedule.set(A, 10**12)  # wakes the loop (scheduled through call_soon_threadsafe)...
    await asyncio.sleep(0)  # ...and the wake-up has run when the cancellation comes
    loop_task.cancel()
    finished, _ = await asyncio.wait({loop_task}, timeout=5)
    loop_task.cancel()
    assert finished == {loop_task} and loop_task.cancelled(), "the loop went on after it was cancelled"
