"""The shared job runner (ferry/control/jobs.py): one task per job, cancel flags, bounded
waits, shutdown."""

from __future__ import annotations

import asyncio

from ferry.control.jobs import JobRunner


async def test_a_job_runs_in_one_task_however_often_it_is_started() -> None:
    runner = JobRunner("test")
    release = asyncio.Event()
    runs: list[str] = []

    async def body() -> None:
        runs.append("ran")
        await release.wait()

    assert runner.start("j1", body)
    assert not runner.start("j1", body)  # a second resume of a running job
    await asyncio.sleep(0)
    assert runs == ["ran"] and runner.running("j1")
    release.set()
    await runner.wait("j1", 5.0)
    await asyncio.sleep(0)
    assert not runner.running("j1")
    assert runner.start("j1", body)  # ended: may run again (a later resume)
    await runner.wait("j1", 5.0)
    assert runs == ["ran", "ran"]


async def test_a_cancel_set_before_the_task_starts_is_seen_by_it() -> None:
    runner = JobRunner("test")
    runner.request_cancel("j1")
    seen: list[bool] = []

    async def body() -> None:
        seen.append(runner.cancel_flag("j1").is_set())

    runner.start("j1", body)
    await runner.wait("j1", 5.0)
    assert seen == [True]


async def test_wait_is_bounded_and_shutdown_stops_every_task() -> None:
    runner = JobRunner("test")
    stopped: list[str] = []

    async def forever(name: str) -> None:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            stopped.append(name)
            raise

    runner.start("a", lambda: forever("a"))
    runner.start("b", lambda: forever("b"))
    await asyncio.sleep(0)
    await runner.wait("a", 0.05)  # returns after the bound; the task goes on
    assert runner.running("a")
    await runner.shutdown()
    assert sorted(stopped) == ["a", "b"]
    await asyncio.sleep(0)
    assert not runner.running("a") and not runner.running("b")
