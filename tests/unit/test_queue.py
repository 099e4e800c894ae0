import asyncio

import pytest

from hypergen.api.queue import AdmissionQueue, QueueClosed, QueueFull


async def hold(queue, name, order, release: asyncio.Event):
    async with queue.slot():
        order.append(name)
        await release.wait()


def test_requests_get_slots_in_arrival_order_and_the_queue_is_bounded():
    async def scenario():
        queue = AdmissionQueue(max_waiting=3, max_in_flight=1)
        order, release = [], asyncio.Event()
        tasks = [asyncio.create_task(hold(queue, name, order, release)) for name in "abcd"]
        await asyncio.sleep(0.01)
        assert order == ["a"] and queue.in_flight == 1 and queue.depth == 3
        with pytest.raises(QueueFull):
            async with queue.slot():
                pass
        release.set()
        await asyncio.gather(*tasks)
        assert order == ["a", "b", "c", "d"]
        assert queue.in_flight == 0 and queue.depth == 0

    asyncio.run(scenario())


def test_zero_waiting_allowed_means_only_free_slots_admit():
    async def scenario():
        queue = AdmissionQueue(max_waiting=0, max_in_flight=2)
        order, release = [], asyncio.Event()
        tasks = [asyncio.create_task(hold(queue, name, order, release)) for name in "ab"]
        await asyncio.sleep(0.01)
        with pytest.raises(QueueFull):
            async with queue.slot():
                pass
        release.set()
        await asyncio.gather(*tasks)

    asyncio.run(scenario())


def test_a_cancelled_waiter_frees_its_place_and_does_not_leak_a_slot():
    async def scenario():
        queue = AdmissionQueue(max_waiting=5, max_in_flight=1)
        order, release = [], asyncio.Event()
        first = asyncio.create_task(hold(queue, "a", order, release))
        abandoned = asyncio.create_task(hold(queue, "b", order, release))
        last = asyncio.create_task(hold(queue, "c", order, release))
        await asyncio.sleep(0.01)
        abandoned.cancel()
        await asyncio.sleep(0.01)
        assert queue.depth == 1
        release.set()
        await asyncio.gather(first, last)
        assert order == ["a", "c"] and queue.in_flight == 0

    asyncio.run(scenario())


def test_closing_turns_the_waiting_away_at_once_and_lets_the_running_finish():
    async def scenario():
        queue = AdmissionQueue(max_waiting=5, max_in_flight=1)
        order, release = [], asyncio.Event()
        tasks = [asyncio.create_task(hold(queue, name, order, release)) for name in "abc"]
        await asyncio.sleep(0.01)
        queue.close()
        await asyncio.sleep(0.01)
        assert [type(task.exception()) for task in tasks[1:]] == [QueueClosed, QueueClosed]  # not left waiting for "a"
        assert queue.depth == 0 and not tasks[0].done()
        with pytest.raises(QueueClosed):
            async with queue.slot():
                pass
        release.set()
        await tasks[0]
        assert order == ["a"] and queue.in_flight == 0

    asyncio.run(scenario())
