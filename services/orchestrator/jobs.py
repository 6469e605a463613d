"""Jobs: durable rows in the database, plus in-memory wake-ups so WatchJob streams changes as they happen."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

from trapline.runtime.errors import Unavailable

from .db import Database, Job

log = logging.getLogger("trapline.orchestrator.jobs")
T = TypeVar("T")


class JobBoard:
    """Updates jobs in the database and wakes whoever watches them."""

    def __init__(self, db: Database) -> None:
        self.db = db
        self._changed: dict[str, asyncio.Event] = {}
        self.tasks: dict[str, asyncio.Task[Any]] = {}

    def _event(self, job_id: str) -> asyncio.Event:
        return self._changed.setdefault(job_id, asyncio.Event())

    async def get(self, job_id: str) -> Job:
        return await asyncio.to_thread(self.db.job, job_id)

    async def update(self, job_id: str, **values: Any) -> Job:
        job = await asyncio.to_thread(self.db.update_job, job_id, **values)
        event = self._changed.pop(job_id, None)
        if event is not None:
            event.set()
        return job

    async def start(self, job_id: str) -> Job:
        return await self.update(job_id, state="RUNNING", started_at=time.time(), error="")

    async def watch(self, job_id: str, heartbeat: float = 5.0) -> AsyncIterator[Job]:
        """The job now, then at every change, until it ends."""
        job = await self.get(job_id)
        yield job
        while not job.final:
            event = self._event(job_id)
            try:
                await asyncio.wait_for(event.wait(), timeout=heartbeat)
            except TimeoutError:
                pass
            latest = await self.get(job_id)
            if latest.updated_at != job.updated_at or latest.state != job.state:
                yield latest
            job = latest

    def spawn(self, job_id: str, work: Callable[[], Awaitable[None]]) -> None:
        """Run ``work`` for a job in the background; an error marks the job FAILED (cancellation leaves it
        RUNNING, so that the next start resumes it)."""

        async def runner() -> None:
            try:
                await work()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - the job records it
                log.exception("job %s failed", job_id)
                await self.update(job_id, state="FAILED", error=str(exc) or type(exc).__name__)
            finally:
                self.tasks.pop(job_id, None)

        self.tasks[job_id] = asyncio.create_task(runner(), name=f"job {job_id}")

    async def stop_all(self) -> None:
        tasks = list(self.tasks.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def patiently(call: Callable[[], Awaitable[T]], what: str, attempts: int = 6, first_wait: float = 0.5) -> T:
    """Retry a call while its service is unavailable (a background job outlives short outages)."""
    wait = first_wait
    for attempt in range(attempts):
        try:
            return await call()
        except Unavailable:
            if attempt == attempts - 1:
                raise
            log.info("%s unavailable; retrying in %.1fs", what, wait)
            await asyncio.sleep(wait)
            wait *= 2
    raise AssertionError("unreachable")
