"""A small persistent job runner: one worker thread, jobs on disk, progress, cancel, resume.

Each job lives in ``<root>/<job id>/`` with ``job.json`` (its state, rewritten via a temporary name) and
whatever its work function keeps there (inputs, checkpoints). Jobs run one at a time, in order: they are
CPU/GPU-bound, and two would only slow each other down.

* ``cancel``: a queued job is cancelled at once; a running one is asked to stop (its work function checks
  ``ctx.should_stop()`` between steps) and ends CANCELLED with its last checkpoint kept.
* ``resume``: a CANCELLED or FAILED job is queued again; its work function continues from its checkpoint.
* Crash recovery: :meth:`JobRunner.recover` (called at start) re-queues jobs that were QUEUED or RUNNING
  when the process died. A graceful shutdown leaves a running job QUEUED so that it resumes the same way.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from trapline.runtime.errors import FailedPrecondition, InvalidArgument, NotFound

log = logging.getLogger("trapline.trainer.jobs")

QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED = "QUEUED", "RUNNING", "SUCCEEDED", "FAILED", "CANCELLED"
FINAL = frozenset({SUCCEEDED, FAILED, CANCELLED})


class JobStopped(Exception):
    """Raised by a work function when ``ctx.should_stop()`` turned true."""


@dataclass
class Job:
    id: str
    kind: str
    state: str = QUEUED
    done: int = 0
    total: int = 0
    unit: str = ""
    message: str = ""
    error: str = ""
    created_at: float = field(default_factory=time.time)
    updated_at: float = field(default_factory=time.time)
    elapsed_seconds: float = 0.0
    eta_seconds: float = 0.0
    metrics: dict[str, float] = field(default_factory=dict)
    result: dict[str, str] = field(default_factory=dict)
    params: dict = field(default_factory=dict)
    attempts: int = 0

    def copy(self) -> "Job":
        return Job(**{**asdict(self), "metrics": dict(self.metrics), "result": dict(self.result),
                      "params": dict(self.params)})


class JobContext:
    """What a work function sees: its job's folder, progress reporting and the stop flag."""

    def __init__(self, runner: "JobRunner", job_id: str) -> None:
        self.runner = runner
        self.job_id = job_id
        self.dir = runner.root / job_id
        self._stop = threading.Event()
        self.started = time.perf_counter()

    @property
    def params(self) -> dict:
        return self.runner.get(self.job_id).params

    def should_stop(self) -> bool:
        return self._stop.is_set()

    def update(self, *, done: int | None = None, total: int | None = None, unit: str | None = None,
               message: str | None = None, eta: float | None = None, metrics: dict[str, float] | None = None) -> None:
        def apply(job: Job) -> None:
            if done is not None:
                job.done = done
            if total is not None:
                job.total = total
            if unit is not None:
                job.unit = unit
            if message is not None:
                job.message = message
            if eta is not None:
                job.eta_seconds = eta
            if metrics:
                job.metrics.update(metrics)
            job.elapsed_seconds = time.perf_counter() - self.started

        self.runner._mutate(self.job_id, apply, persist=False)


WorkFn = Callable[[JobContext], dict[str, str]]


class JobRunner:
    """Runs jobs of registered kinds, one at a time, on a worker thread."""

    def __init__(self, root: str | Path, kinds: dict[str, WorkFn]) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.kinds = kinds
        self._jobs: dict[str, Job] = {}
        self._rev: dict[str, int] = {}
        self._cond = threading.Condition()
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._running: JobContext | None = None
        self._shutting_down = False
        self._thread = threading.Thread(target=self._work, name="trainer-jobs", daemon=True)
        self._thread.start()

    # -- bookkeeping -------------------------------------------------------------------------------
    def _persist(self, job: Job) -> None:
        d = self.root / job.id
        d.mkdir(parents=True, exist_ok=True)
        tmp = d / "job.json.tmp"
        tmp.write_text(json.dumps(asdict(job), indent=1))
        tmp.replace(d / "job.json")

    def _mutate(self, job_id: str, fn: Callable[[Job], None], persist: bool = True) -> Job:
        with self._cond:
            job = self._jobs[job_id]
            fn(job)
            job.updated_at = time.time()
            self._rev[job_id] = self._rev.get(job_id, 0) + 1
            if persist:
                self._persist(job)
            self._cond.notify_all()
            return job.copy()

    def new_job_dir(self) -> tuple[str, Path]:
        job_id = f"job-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
        d = self.root / job_id
        d.mkdir(parents=True)
        return job_id, d

    def submit(self, job_id: str, kind: str, params: dict, *, total: int = 0, unit: str = "") -> Job:
        """Queue a job whose folder ``new_job_dir`` made (and the caller filled with inputs)."""
        if kind not in self.kinds:
            raise InvalidArgument(f"unknown job kind {kind!r}", field="kind")
        job = Job(job_id, kind, params=params, total=total, unit=unit, message="queued")
        with self._cond:
            self._jobs[job_id] = job
            self._rev[job_id] = 1
            self._persist(job)
        self._queue.put(job_id)
        return job.copy()

    def get(self, job_id: str) -> Job:
        with self._cond:
            job = self._jobs.get(job_id)
            if job is None:
                raise NotFound(f"no job {job_id!r}", field="job_id")
            return job.copy()

    def jobs(self) -> list[Job]:
        with self._cond:
            return [j.copy() for j in sorted(self._jobs.values(), key=lambda j: j.created_at)]

    def wait_change(self, job_id: str, seen: int, timeout: float = 1.0) -> tuple[Job, int]:
        """Block until the job's revision passes ``seen`` (or ``timeout``); returns (job, revision)."""
        with self._cond:
            if job_id not in self._jobs:
                raise NotFound(f"no job {job_id!r}", field="job_id")
            self._cond.wait_for(lambda: self._rev.get(job_id, 0) > seen, timeout=timeout)
            return self._jobs[job_id].copy(), self._rev[job_id]

    def cancel(self, job_id: str) -> Job:
        job = self.get(job_id)
        if job.state in FINAL:
            return job
        with self._cond:
            running = self._running
        if running is not None and running.job_id == job_id:
            running._stop.set()
            return self._mutate(job_id, lambda j: setattr(j, "message", "cancelling at the next step"))

        def mark(j: Job) -> None:
            j.state, j.message = CANCELLED, "cancelled before it started"
        return self._mutate(job_id, mark)

    def resume(self, job_id: str) -> Job:
        job = self.get(job_id)
        if job.state not in (CANCELLED, FAILED):
            raise FailedPrecondition(f"job {job_id} is {job.state}; only CANCELLED or FAILED jobs can be resumed",
                                     field="resume_job_id")

        def requeue(j: Job) -> None:
            j.state, j.error, j.message = QUEUED, "", "queued to resume from its last checkpoint"
        job = self._mutate(job_id, requeue)
        self._queue.put(job_id)
        return job

    def recover(self) -> list[str]:
        """Load every job from disk; re-queue those that were QUEUED or RUNNING (a crash or a shutdown)."""
        requeued = []
        for d in sorted(self.root.iterdir()):
            f = d / "job.json"
            if not f.is_file():
                continue
            try:
                job = Job(**json.loads(f.read_text()))
            except (ValueError, TypeError):
                log.warning("ignoring unreadable job file %s", f)
                continue
            with self._cond:
                if job.id in self._jobs:
                    continue
                if job.state in (QUEUED, RUNNING):
                    job.state, job.message = QUEUED, "recovered after a restart; resumes from its last checkpoint"
                    requeued.append(job.id)
                self._jobs[job.id] = job
                self._rev[job.id] = 1
                self._persist(job)
        for job_id in requeued:
            self._queue.put(job_id)
        return requeued

    def close(self, timeout: float = 30.0) -> None:
        """Stop the running job at its next step (it stays QUEUED on disk and resumes at the next start)."""
        with self._cond:
            self._shutting_down = True
            running = self._running
        if running is not None:
            running._stop.set()
        self._queue.put(None)
        self._thread.join(timeout)

    # -- the worker --------------------------------------------------------------------------------
    def _work(self) -> None:
        while True:
            job_id = self._queue.get()
            if job_id is None:
                return
            with self._cond:
                job = self._jobs.get(job_id)
                if job is None or job.state != QUEUED or self._shutting_down:
                    continue
                ctx = JobContext(self, job_id)
                self._running = ctx

            def start(j: Job) -> None:
                j.state, j.message, j.attempts = RUNNING, "running", j.attempts + 1
            self._mutate(job_id, start)
            try:
                result = self.kinds[job.kind](ctx)
            except JobStopped:
                if self._shutting_down:
                    self._mutate(job_id, lambda j: (setattr(j, "state", QUEUED),
                                                    setattr(j, "message", "interrupted by shutdown; resumes at next start")))
                else:
                    self._mutate(job_id, lambda j: (setattr(j, "state", CANCELLED),
                                                    setattr(j, "message", "cancelled; resumable from its last checkpoint")))
            except Exception as exc:  # the job fails, the runner lives on
                log.exception("job %s failed", job_id)
                message = getattr(exc, "message", None) or f"{type(exc).__name__}: {exc}"
                self._mutate(job_id, lambda j: (setattr(j, "state", FAILED), setattr(j, "error", message),
                                                setattr(j, "message", "failed")))
            else:
                def finish(j: Job) -> None:
                    j.state, j.message, j.eta_seconds = SUCCEEDED, "done", 0.0
                    j.result = {k: str(v) for k, v in result.items()}
                    j.elapsed_seconds = time.perf_counter() - ctx.started
                self._mutate(job_id, finish)
            finally:
                with self._cond:
                    self._running = None
