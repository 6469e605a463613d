"""Contracts and packaging: buf lint, generated stubs in sync, and a detector install without torch."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_buf_lint_standard_passes():
    buf = REPO / "node_modules" / ".bin" / "buf"
    if not buf.exists():
        pytest.skip("buf not installed (run scripts/setup.sh with npm available)")
    proc = subprocess.run([str(buf), "lint"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"buf lint found problems:\n{proc.stdout}{proc.stderr}"


def test_generated_stubs_match_protos():
    proc = subprocess.run(["bash", "scripts/gen_protos.sh", "--check"], cwd=REPO, capture_output=True, text=True,
                          timeout=120, env={"PYTHON": sys.executable, "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, f"stubs drifted from protos/:\n{proc.stderr}"


def test_every_service_package_is_versioned_and_generated():
    for service in ("common", "detector", "embedder", "selector", "trainer", "orchestrator"):
        assert (REPO / "protos" / "trapline" / service / "v1" / f"{service}.proto").exists()
        assert (REPO / "src" / "trapline" / "api" / service / "v1" / f"{service}_pb2.py").exists()


def _resolve(extra: str) -> set[str]:
    """Names pip would install for trapline[extra] into an empty environment (dry run, nothing installed)."""
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet", "--report", "-",
         f"{REPO}[{extra}]"],
        capture_output=True, text=True, timeout=600,
    )
    if proc.returncode != 0 and ("Could not find" in proc.stderr or "connection" in proc.stderr.lower()):
        pytest.skip(f"package index unreachable: {proc.stderr.strip()[:200]}")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    return {item["metadata"]["name"].lower() for item in report["install"]}


@pytest.mark.slow
def test_detector_and_embedder_extras_do_not_install_torch():
    if shutil.which("git") is None:
        pytest.skip("git needed to build the sdist")
    names = _resolve("detector,embedder")
    assert "onnxruntime-gpu" in names, f"the detector extra should bring ONNX Runtime: {sorted(names)}"
    heavy = {"torch", "torchvision"} & names
    assert not heavy, f"installing the detector/embedder extras would pull {heavy}"
