"""trapline simulate: the paper's experiment harness on features files."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from trapline import simulate
from trapline.cli import experiments, main


def tiny_features(path: Path, with_locations: bool = True) -> Path:
    """Four well separated classes in 16-d with a little noise, at four locations."""
    rng = np.random.default_rng(3)
    centers = rng.normal(size=(4, 16)) * 3
    labels = np.repeat(np.array(["zebra", "impala", "lion", "buffalo"]), 60)
    vectors = centers[np.repeat(np.arange(4), 60)] + rng.normal(size=(240, 16))
    arrays = {"vectors": vectors.astype(np.float32), "labels": labels}
    if with_locations:
        arrays["locations"] = np.array([f"L{i % 4}" for i in range(240)])
        arrays["sequences"] = np.array([f"s{i // 3}" for i in range(240)])
    np.savez(path, **arrays)
    return path


def read_curve(path: Path) -> list[tuple]:
    with open(path) as fh:
        return [tuple(row.values()) for row in csv.DictReader(fh)]


def test_same_seed_gives_the_same_curve_twice(tmp_path):
    feats = tiny_features(tmp_path / "tiny.npz")
    args = ["simulate", str(feats), "--strategies", "kcenter", "random", "margin", "--seeds", "2",
            "--seed-size", "8", "--batch-size", "8", "--budget", "40"]
    assert main([*args, "-o", str(tmp_path / "a")]) == 0
    assert main([*args, "-o", str(tmp_path / "b")]) == 0
    first, second = read_curve(tmp_path / "a" / "simulate.csv"), read_curve(tmp_path / "b" / "simulate.csv")
    assert first == second, "one seed must give one curve"
    assert len(first) == 3 * 2 * 5  # strategies x seeds x rounds (8, 16, 24, 32, 40 labels)
    assert (tmp_path / "a" / "simulate.png").stat().st_size > 10_000


def test_learning_happens_on_separable_classes(tmp_path):
    feats = simulate.Features.load(tiny_features(tmp_path / "tiny.npz"))
    config = simulate.Config(strategies=("kcenter",), seeds=(0,), seed_size=8, batch_size=8, budget=40)
    points = simulate.run([feats], config, experiments._train_predict, experiments._select)
    assert points[-1].labels == 40
    assert points[-1].accuracy > 0.95, f"4 separable classes should be learnt with 40 labels: {points[-1]}"


def test_holdout_locations_keeps_test_locations_out_of_the_pool(tmp_path):
    feats = simulate.Features.load(tiny_features(tmp_path / "tiny.npz"))
    config = simulate.Config(test_fraction=0.25, holdout_locations=True)
    pool, test = simulate.split(feats, config, seed=1)
    assert set(feats.locations[pool]).isdisjoint(feats.locations[test])
    assert len(set(feats.locations[test])) == 1


def test_a_sequence_is_never_split_between_pool_and_test(tmp_path):
    feats = simulate.Features.load(tiny_features(tmp_path / "tiny.npz"))
    pool, test = simulate.split(feats, simulate.Config(test_fraction=0.25), seed=2)
    assert set(feats.sequences[pool]).isdisjoint(feats.sequences[test])
    assert 0.15 < len(test) / len(feats.labels) < 0.35


def test_holdout_locations_without_locations_is_a_clear_error(tmp_path, capsys):
    feats = tiny_features(tmp_path / "noloc.npz", with_locations=False)
    code = main(["simulate", str(feats), "--holdout-locations", "--seeds", "1", "-o", str(tmp_path / "o")])
    assert code == 1
    assert "needs a 'locations' array" in capsys.readouterr().err


def test_bad_features_files_are_refused_with_the_reason(tmp_path, capsys):
    np.savez(tmp_path / "bad.npz", vectors=np.zeros((3, 2), np.float32))
    assert main(["simulate", str(tmp_path / "bad.npz"), "-o", str(tmp_path / "o")]) == 1
    assert "needs arrays 'vectors' and 'labels'" in capsys.readouterr().err
    assert main(["simulate", str(tmp_path / "missing.npz"), "-o", str(tmp_path / "o")]) == 1


def test_proxy_digits_is_named_as_a_proxy():
    feats = simulate.Features.proxy("sklearn:digits")
    assert "proxy" in feats.name and feats.vectors.shape == (1797, 64)
    with pytest.raises(ValueError):
        simulate.Features.proxy("sklearn:nope")


def test_cli_prints_a_table_and_labels_to_target(tmp_path):
    feats = tiny_features(tmp_path / "tiny.npz")
    proc = subprocess.run([sys.executable, "-m", "trapline.cli", "simulate", str(feats), "--seeds", "1",
                           "--seed-size", "8", "--batch-size", "8", "--budget", "24", "--target", "0.9",
                           "-o", str(tmp_path / "o")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "| tiny | kcenter |" in proc.stdout and "target 0.90" in proc.stdout
