"""The CLI's commands against running services (every service as its own process), and the demo at CI size."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from trapline.local import ORDER, LocalStack, free_ports

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

REPO = Path(__file__).resolve().parents[2]
FRAMES = REPO / "tests" / "data" / "frames"
MISSING = [s for s in ORDER if importlib.util.find_spec(f"trapline.{s}.server") is None]
needs_all = pytest.mark.skipif(bool(MISSING), reason=f"server modules not there yet: {MISSING}")
QUIET = {"TRAPLINE_TRAINER_EPOCHS": "1", "TRAPLINE_TRAINER_THREADS": "1", "TRAPLINE_EMBEDDER_THREADS": "1",
         "TRAPLINE_DETECTOR_THREADS": "1", "OMP_NUM_THREADS": "1"}


def cli(*args: str, stdin: str = "", timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "trapline.cli", *args], input=stdin, capture_output=True,
                          text=True, timeout=timeout, cwd=REPO)


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    if MISSING:
        pytest.skip(f"server modules not there yet: {MISSING}")
    root = tmp_path_factory.mktemp("cli")
    st = LocalStack(data_dir=root, ports=free_ports(),
                    extra_env={**QUIET, "TRAPLINE_ORCHESTRATOR_IMAGE_ROOTS": str(FRAMES)})
    st.start()
    import asyncio

    try:
        asyncio.run(st.wait_serving(timeout=300))
        yield st
    finally:
        st.stop()


@needs_all
def test_health_lists_every_service_serving(stack):
    proc = cli("health", *(stack.address(s) for s in ORDER))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = {cols[1]: cols[2] for cols in (line.split() for line in proc.stdout.splitlines()[1:])}
    for name in ("DetectorService", "EmbedderService", "SelectorService", "TrainerService", "OrchestratorService"):
        assert rows.get(f"trapline.{name.removesuffix('Service').lower()}.v1.{name}") == "SERVING", proc.stdout


@needs_all
def test_ingest_status_label_export_against_the_orchestrator(stack, tmp_path):
    address = ["--address", stack.address("orchestrator")]
    md = FRAMES / "cct_sample" / "megadetector.json"
    proc = cli("ingest", "cli-proj", str(md), "--create", "--seed-labels", "2", "--batch-size", "2",
               "--finetune-every", "-1", *address)
    assert proc.returncode == 0, proc.stderr
    assert "created project cli-proj" in proc.stdout
    summary = proc.stdout.splitlines()[-1]
    assert summary.startswith("frames 16 "), summary

    proc = cli("status", "cli-proj", *address)
    assert proc.returncode == 0 and "images               16" in proc.stdout, proc.stdout

    # Label one batch: first crop by name, second by number from the list, then quit.
    proc = cli("label", "cli-proj", "--labeller", "tester", *address, stdin="deer\n1\nq\n")
    assert proc.returncode == 0, proc.stderr
    assert "stored 2 new" in proc.stdout, proc.stdout

    out = tmp_path / "md.json"
    proc = cli("export", "cli-proj", "--format", "megadetector", "-o", str(out), *address)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(out.read_text())
    assert len(doc["images"]) == 16 and "classification_categories" in doc


@needs_all
def test_commands_explain_errors_without_tracebacks(stack):
    proc = cli("status", "no-such-project", "--address", stack.address("orchestrator"))
    assert proc.returncode == 1 and "not found" in proc.stderr and "Traceback" not in proc.stderr
    proc = cli("status", "--address", "127.0.0.1:1")
    assert proc.returncode == 1 and "trapline up" in proc.stderr and "Traceback" not in proc.stderr


@needs_all
def test_demo_runs_end_to_end_at_ci_size(tmp_path):
    out = tmp_path / "demo"
    proc = subprocess.run(
        [sys.executable, "-m", "trapline.cli", "demo", "-o", str(out), "--data-dir", str(tmp_path / "state"),
         "--seed-labels", "6", "--batch-size", "6", "--finetune-every", "12", "--max-labels", "24"],
        capture_output=True, text=True, timeout=900, cwd=REPO, env={**__import__("os").environ, **QUIET})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["frames"] == 36 + 16 and summary["crops"] > 0
    empties = summary["empty_flag_vs_truth"]
    assert empties["frames"] == 52 and empties["correct"] >= 0.75 * 52, empties
    assert summary["labels"] >= 24
    assert (out / "learning_curve.png").stat().st_size > 10_000
    md = json.loads((out / "megadetector.json").read_text())
    assert md["info"]["format_version"] >= "1.4" and md["classification_categories"]
    assert "| labels | picked by |" in proc.stdout
