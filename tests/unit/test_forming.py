"""Batches formed in the API: requests that wait leave together, closed-loop clients are not
split 1 + 3, a lone client never waits, a caller that leaves is skipped, a failure reaches all."""

import asyncio

import pytest

from hypergen.api.forming import BatchFormer
from hypergen.api.pool import WorkerPool
from hypergen.protocol import GenerationJob, GenerationResult


def job(request_id: str, n: int = 1) -> GenerationJob:
    return GenerationJob(request_id=request_id, job_id=request_id, model="m", prompt="p", width=64, height=64, num_inference_steps=4,
                         guidance_scale=5.0, seeds=list(range(n)), admitted_at=0.0)  # fmt: skip


class SteppedWorker:
    """Each call takes `call_s` (event-loop time) and is recorded as the request ids it carried."""

    def __init__(self, call_s: float = 0.05, broken: bool = False) -> None:
        self.calls: list[list[str]] = []
        self.call_s = call_s
        self.broken = broken

    async def generate(self, jobs):
        self.calls.append([j.request_id for j in jobs])
        await asyncio.sleep(self.call_s)
        if self.broken:
            raise ConnectionError("worker died")
        return [GenerationResult(request_id=j.request_id, images_b64=["x"] * j.n) for j in jobs]


def former(worker, max_images=8, max_wait_s=0.1):
    pool = WorkerPool([worker], ["w"], warm_up_calls=0)
    pool.loads[0].ready = True
    return BatchFormer(pool, max_images, max_wait_s)


def test_closed_loop_clients_end_up_in_one_call_each_round():
    worker = SteppedWorker(call_s=0.4)  # the wait for company: 5 % of that, 20 ms
    batches = former(worker)

    async def client(index: int) -> None:
        for round_ in range(6):
            await batches.generate(job(f"c{index}-r{round_}"))
            await asyncio.sleep(0.001 * index)  # each client comes back a little later than the last

    async def scenario():
        await asyncio.gather(*(client(index) for index in range(4)))

    asyncio.run(scenario())
    sizes = [len(call) for call in worker.calls]
    assert sizes[0] == 1  # before any call has finished there is no company to expect
    assert sizes[1:-1] == [4] * (len(sizes) - 2)  # then the first client's return is waited for
    assert sizes[-1] == 3  # the first client, a round ahead, has finished


def test_a_lone_client_is_sent_at_once():
    worker = SteppedWorker(call_s=0.05)
    batches = former(worker, max_wait_s=10.0)

    async def scenario():
        for round_ in range(3):
            task = asyncio.ensure_future(batches.generate(job(f"r{round_}")))
            for _ in range(3):  # a few turns of the loop (the call is a task): no timer involved
                await asyncio.sleep(0)
            assert worker.calls[-1] == [f"r{round_}"]
            await task

    asyncio.run(scenario())


def test_requests_waiting_for_a_busy_worker_leave_together_up_to_the_batch_limit():
    worker = SteppedWorker(call_s=0.05)
    batches = former(worker, max_images=4)

    async def scenario():
        return await asyncio.gather(*(batches.generate(job(f"r{index}", n=2 if index == 1 else 1)) for index in range(7)))

    results = asyncio.run(scenario())
    assert [result.request_id for result in results] == [f"r{index}" for index in range(7)]
    assert worker.calls == [["r0"], ["r1", "r2", "r3"], ["r4", "r5", "r6"]]  # 4 images at most, FIFO


def test_a_caller_that_leaves_is_skipped_and_a_worker_failure_reaches_every_caller():
    worker = SteppedWorker(call_s=0.05)
    batches = former(worker)

    async def scenario():
        first = asyncio.ensure_future(batches.generate(job("first")))
        await asyncio.sleep(0)
        gone = asyncio.ensure_future(batches.generate(job("gone")))
        stays = asyncio.ensure_future(batches.generate(job("stays")))
        await asyncio.sleep(0)
        gone.cancel()
        await asyncio.gather(first, stays)

    asyncio.run(scenario())
    assert worker.calls == [["first"], ["stays"]]

    broken = former(SteppedWorker(call_s=0.01, broken=True))

    async def failing():
        return await asyncio.gather(*(broken.generate(job(f"r{index}")) for index in range(3)), return_exceptions=True)

    assert all(isinstance(outcome, ConnectionError) for outcome in asyncio.run(failing()))


@pytest.mark.parametrize("recent, expected", [(0.0, 0.005), (1.0, 0.05), (10.0, 0.1)])
def test_the_wait_for_company_is_a_small_share_of_a_call_and_bounded(recent, expected):
    batches = former(SteppedWorker())
    batches.recent_call_s = recent
    assert batches.window() == pytest.approx(expected)


def test_with_two_workers_each_call_takes_a_fair_share():
    workers = [SteppedWorker(call_s=0.05), SteppedWorker(call_s=0.08)]
    pool = WorkerPool(workers, ["a", "b"], warm_up_calls=0)
    for load in pool.loads:
        load.ready = True
    batches = BatchFormer(pool, 8, 0.1)

    async def scenario():
        await asyncio.gather(*(batches.generate(job(f"r{index}")) for index in range(8)))

    asyncio.run(scenario())
    served = [sum(len(call) for call in worker.calls) for worker in workers]
    assert sum(served) == 8 and min(served) >= 3, served
