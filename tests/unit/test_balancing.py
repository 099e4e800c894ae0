"""The worker pool: load-based choice, cancel routing, adapter broadcast and replay, failures."""

import asyncio

import pytest

from hypergen.api.pool import WorkerPool
from hypergen.protocol import GenerationJob, GenerationResult, LoraCommand, LoraReply, ModelLimits, WorkerStatus

MODEL = ModelLimits(id="m", native_width=64, native_height=64, default_steps=4, default_guidance_scale=5.0)


def job(request_id: str, n: int = 1) -> GenerationJob:
    return GenerationJob(request_id=request_id, job_id=request_id, model="m", prompt="p", width=64, height=64, num_inference_steps=4,
                         guidance_scale=5.0, seeds=list(range(n)), admitted_at=0.0)  # fmt: skip


class FakeWorker:
    """Holds each call until released; records what it was asked."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.jobs: list[str] = []
        self.cancelled: list[str] = []
        self.loras: list[LoraCommand] = []
        self.release = asyncio.Event()
        self.ready = True
        self.broken = False

    async def generate(self, jobs):
        self.jobs += [j.request_id for j in jobs]
        await self.release.wait()
        if self.broken:
            raise ConnectionError("worker died")
        return [GenerationResult(request_id=j.request_id, images_b64=["x"] * j.n) for j in jobs]

    async def generate_stream(self, job, partial_images, progress=False):
        self.jobs.append(job.request_id)
        await self.release.wait()
        yield {"type": "final", "b64_json": "x"}

    async def cancel(self, request_id):
        self.cancelled.append(request_id)

    async def status(self):
        if self.broken:
            raise ConnectionError("worker died")
        return WorkerStatus(ready=self.ready, device="cpu", models=[MODEL], pid=hash(self.name) % 1000)

    async def manage_loras(self, command):
        self.loras.append(command)
        return LoraReply(adapters=[{"name": command.name}])


def run(scenario):
    asyncio.run(scenario())


async def started(pool) -> None:
    """Workers become ready after their first status check and warm-up."""
    await pool.status()
    await asyncio.sleep(0.01)
    status = await pool.status()
    assert status.ready and all(worker["ready"] for worker in status.workers)


def test_requests_go_to_the_least_loaded_worker_and_idle_workers_take_turns():
    async def scenario():
        a, b = FakeWorker("a"), FakeWorker("b")
        pool = WorkerPool([a, b], ["a", "b"])
        big = asyncio.create_task(pool.generate([job("big", n=4)]))
        await asyncio.sleep(0)
        small = [asyncio.create_task(pool.generate([job(f"s{i}")])) for i in range(3)]
        await asyncio.sleep(0.01)
        # a holds 4 images, so the three single images all go to b (1, 2, 3 < 4)
        assert a.jobs == ["big"] and b.jobs == ["s0", "s1", "s2"]
        assert [load.in_flight_images for load in pool.loads] == [4, 3]
        a.release.set()
        b.release.set()
        await asyncio.gather(big, *small)
        assert [load.in_flight_images for load in pool.loads] == [0, 0]
        assert [load.served for load in pool.loads] == [1, 3]
        # idle and equal: one call each, in turn
        for index in range(4):
            await pool.generate([job(f"t{index}")])
        assert a.jobs[1:] == ["t0", "t2"] and b.jobs[3:] == ["t1", "t3"]

    run(scenario)


def test_a_cancel_reaches_the_worker_running_the_request_only():
    async def scenario():
        a, b = FakeWorker("a"), FakeWorker("b")
        pool = WorkerPool([a, b], ["a", "b"])
        tasks = [asyncio.create_task(pool.generate([job(name)])) for name in ("r1", "r2")]
        await asyncio.sleep(0.01)
        owner = a if "r2" in a.jobs else b
        await pool.cancel("r2")
        await pool.cancel("never-dispatched")
        assert owner.cancelled == ["r2"] and (b if owner is a else a).cancelled == []
        a.release.set()
        b.release.set()
        await asyncio.gather(*tasks)

    run(scenario)


def test_a_request_given_up_by_its_caller_is_still_cancelled_on_its_worker():
    async def scenario():
        a, b = FakeWorker("a"), FakeWorker("b")
        pool = WorkerPool([a, b], ["a", "b"])
        task = asyncio.create_task(pool.generate([job("gone")]))
        await asyncio.sleep(0.01)
        task.cancel()  # what a timeout or a disconnect does to the API's call
        await asyncio.gather(task, return_exceptions=True)
        await pool.cancel("gone")
        assert a.cancelled == ["gone"] and [load.in_flight_images for load in pool.loads] == [0, 0]

    run(scenario)


def test_a_failed_worker_is_skipped_until_its_status_says_ready_and_gets_adapters_replayed():
    async def scenario():
        a, b = FakeWorker("a"), FakeWorker("b")
        pool = WorkerPool([a, b], ["a", "b"], warm_up_calls=2)
        await pool.manage_loras(LoraCommand(action="load", name="style", path="style"))
        assert [c.name for c in a.loras] == ["style"] and [c.name for c in b.loras] == ["style"]
        a.release.set()
        b.release.set()
        await started(pool)
        a.broken = True
        first = await asyncio.gather(*(pool.generate([job(f"r{i}")]) for i in range(2)), return_exceptions=True)
        assert sum(isinstance(result, ConnectionError) for result in first) == 1  # only a's request failed
        status = await pool.status()
        assert status.ready and [w["ready"] for w in status.workers] == [False, True]
        for index in range(3):  # everything goes to b meanwhile
            await pool.generate([job(f"later{index}")])
        assert b.jobs[-3:] == ["later0", "later1", "later2"]
        assert pool.loads[0].failed == 1 and pool.loads[1].served == 4
        a.broken = False  # BentoML restarted it: it has only its start-up adapters, a cold batcher
        a.loras.clear()
        a.jobs.clear()
        status = await pool.status()
        assert [w["ready"] for w in status.workers] == [False, True] and "warming up the batcher" in status.workers[0]["detail"]
        await asyncio.sleep(0.01)
        status = await pool.status()
        assert [w["ready"] for w in status.workers] == [True, True]
        assert [c.name for c in a.loras] == ["style"] and a.jobs == ["warmup-0", "warmup-1"]

    run(scenario)


def test_an_adapter_change_reaches_a_worker_that_is_catching_up():
    async def scenario():
        a, b = FakeWorker("a"), FakeWorker("b")
        b.release.set()
        pool = WorkerPool([a, b], ["a", "b"], warm_up_calls=1)
        await pool.status()  # both start catching up; a's warm-up call waits (release not set)
        await asyncio.sleep(0.01)
        assert pool.loads[0].catching_up is not None and pool.loads[1].ready
        await pool.manage_loras(LoraCommand(action="load", name="late", path="late"))
        assert [c.name for c in a.loras] == ["late"] and [c.name for c in b.loras] == ["late"]
        a.release.set()
        await asyncio.sleep(0.01)
        assert pool.loads[0].ready

    run(scenario)


def test_status_is_not_ready_only_when_no_worker_is_and_names_each():
    async def scenario():
        a, b = FakeWorker("a"), FakeWorker("b")
        a.ready = b.ready = False
        b.release.set()
        pool = WorkerPool([a, b], ["hypergen-worker", "hypergen-worker-2"])
        status = await pool.status()
        assert not status.ready and "hypergen-worker-2" in status.detail
        b.ready = True
        status = await pool.status()
        assert not status.ready and "warming up the batcher" in status.detail  # warming its batcher first
        await asyncio.sleep(0.01)
        status = await pool.status()
        assert status.ready and status.models == [MODEL] and [w["ready"] for w in status.workers] == [False, True]
        assert status.workers[1]["pid"] == hash("b") % 1000  # known from its first ready status

    run(scenario)


def test_a_stream_counts_as_load_until_it_ends():
    async def scenario():
        a, b = FakeWorker("a"), FakeWorker("b")
        pool = WorkerPool([a, b], ["a", "b"])
        events = []

        async def consume():
            async for event in pool.generate_stream(job("s", n=2), 0):
                events.append(event)

        task = asyncio.create_task(consume())
        await asyncio.sleep(0.01)
        assert sorted(load.in_flight_images for load in pool.loads) == [0, 2]
        a.release.set()
        b.release.set()
        await task
        assert events and [load.in_flight_images for load in pool.loads] == [0, 0]

    run(scenario)


def test_a_pool_needs_names_for_its_workers():
    with pytest.raises(ValueError):
        WorkerPool([FakeWorker("a")], [])
