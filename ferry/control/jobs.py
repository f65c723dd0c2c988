"""The runner of the control plane's long jobs (migrations, relocations): one asyncio task
per job, each with its cancel flag.

What a job does lives with its kind (`control/migration.py` and its steps, and
`control/storage.py`): a persisted record with an enum phase moved only along the arrows
of its domain module, and a resume table from the stored phase to the next action, run
when a replica starts leading. This module holds what every kind shares: at most one task
per job id (a second start of a running job is a no-op, so a leader that resumes twice
never drives one job from two tasks), a cancel flag a request can set before or while the
task runs, a bounded wait for a job, and a shutdown that stops every task and leaves the
jobs persisted for the next leader.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Coroutine
from typing import Any

log = logging.getLogger("ferry.jobs")

JobBody = Callable[[], Coroutine[Any, Any, None]]


class JobRunner:
    def __init__(self, kind: str) -> None:
        self.kind = kind  # "migration", "relocation": names the tasks
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._cancel: dict[str, asyncio.Event] = {}

    def start(self, job_id: str, body: JobBody) -> bool:
        """Run `body` as the job's task; False (nothing started) if one already runs."""
        if job_id in self._tasks:
            log.info("%s %s already runs here: not started twice", self.kind, job_id)
            return False
        task = asyncio.create_task(body(), name=f"{self.kind}-{job_id}")
        self._tasks[job_id] = task

        def ended(_: asyncio.Task[None]) -> None:
            if self._tasks.get(job_id) is task:
                del self._tasks[job_id]
                self._cancel.pop(job_id, None)
        task.add_done_callback(ended)
        return True

    def running(self, job_id: str) -> bool:
        return job_id in self._tasks

    def cancel_flag(self, job_id: str) -> asyncio.Event:
        """The job's cancel flag (made on first use): its steps look at it, waits end on
        it. The stored record's cancel request is what survives a restart."""
        return self._cancel.setdefault(job_id, asyncio.Event())

    def request_cancel(self, job_id: str) -> None:
        self.cancel_flag(job_id).set()

    async def wait(self, job_id: str, timeout_s: float) -> None:
        """Until the job's task ends, for at most timeout_s (the task is not cancelled)."""
        task = self._tasks.get(job_id)
        if task is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(task), timeout_s)

    async def shutdown(self) -> None:
        """Stop every task (each job stays persisted for resume) and wait for them."""
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
