"""The job runner: progress, cancel, resume, and recovery after a crash."""

from __future__ import annotations

import json
import threading
import time

from trapline.trainer.jobs import JobRunner, JobStopped


def _wait(runner, job_id, states, timeout=20.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = runner.get(job_id)
        if job.state in states:
            return job
        time.sleep(0.02)
    raise AssertionError(f"job {job_id} still {runner.get(job_id).state}")


def counting_job(steps=5, gate: threading.Event | None = None):
    def work(ctx):
        start = int((ctx.dir / "ckpt").read_text()) if (ctx.dir / "ckpt").is_file() else 0
        for i in range(start, steps):
            if gate is not None:
                gate.wait(5)
            if ctx.should_stop():
                raise JobStopped()
            (ctx.dir / "ckpt").write_text(str(i + 1))
            ctx.update(done=i + 1, total=steps, unit="steps", eta=0.01 * (steps - i), metrics={"loss": 1.0 / (i + 1)})
            time.sleep(0.01)
        return {"answer": start}
    return work


def test_a_job_runs_reports_progress_and_succeeds(tmp_path):
    runner = JobRunner(tmp_path, {"count": counting_job()})
    job_id, _ = runner.new_job_dir()
    runner.submit(job_id, "count", {})
    seen, rev = [], 0
    while True:
        job, rev = runner.wait_change(job_id, rev, 5)
        seen.append(job.done)
        if job.state == "SUCCEEDED":
            break
    assert job.done == 5 and job.metrics["loss"] == 0.2 and job.result == {"answer": "0"}
    assert seen == sorted(seen) and len(set(seen)) > 2, "progress must be observable while the job runs"
    assert json.loads((tmp_path / job_id / "job.json").read_text())["state"] == "SUCCEEDED"
    runner.close()


def test_cancel_then_resume_continues_from_the_checkpoint(tmp_path):
    gate = threading.Event()
    runner = JobRunner(tmp_path, {"count": counting_job(steps=50, gate=gate)})
    job_id, _ = runner.new_job_dir()
    runner.submit(job_id, "count", {})
    gate.set()
    _wait(runner, job_id, {"RUNNING"})
    while runner.get(job_id).done < 2:
        time.sleep(0.01)
    runner.cancel(job_id)
    job = _wait(runner, job_id, {"CANCELLED"})
    assert 2 <= job.done < 50
    runner.resume(job_id)
    job = _wait(runner, job_id, {"SUCCEEDED"})
    assert int(job.result["answer"]) >= 2, "the resumed job must start from its checkpoint, not from zero"
    runner.close()


def test_a_queued_job_is_cancelled_at_once_and_final_jobs_are_left_alone(tmp_path):
    gate = threading.Event()
    runner = JobRunner(tmp_path, {"count": counting_job(steps=3, gate=gate)})
    first, _ = runner.new_job_dir()
    runner.submit(first, "count", {})
    second, _ = runner.new_job_dir()
    runner.submit(second, "count", {})
    assert runner.cancel(second).state == "CANCELLED"
    gate.set()
    assert _wait(runner, first, {"SUCCEEDED"}).state == "SUCCEEDED"
    assert runner.cancel(first).state == "SUCCEEDED"
    runner.close()


def test_jobs_interrupted_by_a_crash_resume_at_the_next_start(tmp_path):
    runner = JobRunner(tmp_path, {"count": counting_job(steps=4)})
    job_id, d = runner.new_job_dir()
    runner.close()
    # What a crash leaves behind: a RUNNING job with a checkpoint after 3 of 4 steps.
    (d / "ckpt").write_text("3")
    (d / "job.json").write_text(json.dumps({"id": job_id, "kind": "count", "state": "RUNNING", "done": 3, "total": 4}))
    restarted = JobRunner(tmp_path, {"count": counting_job(steps=4)})
    assert restarted.recover() == [job_id]
    job = _wait(restarted, job_id, {"SUCCEEDED"})
    assert job.result == {"answer": "3"} and job.attempts == 1
    restarted.close()


def test_a_failing_job_is_failed_with_its_error_and_the_runner_goes_on(tmp_path):
    def boom(ctx):
        raise ValueError("out of crops")
    runner = JobRunner(tmp_path, {"boom": boom, "count": counting_job(steps=1)})
    bad, _ = runner.new_job_dir()
    runner.submit(bad, "boom", {})
    good, _ = runner.new_job_dir()
    runner.submit(good, "count", {})
    assert "out of crops" in _wait(runner, bad, {"FAILED"}).error
    assert _wait(runner, good, {"SUCCEEDED"}).state == "SUCCEEDED"
    runner.close()
