"""Selector benchmark: k-Center greedy at a million crops, and the vector store's throughput.

Prints a markdown table. Every k-Center figure is measured in its own subprocess (time and peak resident
memory, VmHWM) on the same vectors, with the baseline measured in the same run:

* baseline: the textbook greedy as google/active-learning's ``kcenter_greedy.py`` runs it: sklearn
  ``pairwise_distances`` from every point to all labelled points, then to each new centre at every step
  (vectors loaded in memory). It runs 2 x ``select`` steps: steps 1..k are the cold round's reference
  picks, steps k+1..2k the warm round's (the greedy only depends on the current centre set).
* cold: :class:`trapline.selector.kcenter.KCenter` on a memory-mapped ``.npy`` with no kept state.
* warm: the next round after the cold round's picks were labelled, with the state kept.

Data: ``embedding`` (default) draws L2-normalised vectors with the structure of CNN embeddings (a mixture of
clusters in a low-dimensional latent space mapped to ``dim`` dimensions plus isotropic noise); ``isotropic``
draws uniformly on the sphere, the worst case for any pruning (no structure: every distance is alike).

    OMP_NUM_THREADS=2 python benchmarks/bench_selector.py                  # the issue's table (slow: minutes)
    python benchmarks/bench_selector.py --n 100000 --store-sizes 10000     # a quick look
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def peak_rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def make_vectors(path: Path, n: int, dim: int, kind: str, seed: int = 0, chunk: int = 100_000) -> None:
    """Write ``n`` float32 vectors to ``path`` (.npy) chunk by chunk (never all in memory twice)."""
    rng = np.random.default_rng(seed)
    latent, clusters = 24, 60
    mix = rng.standard_normal((latent, dim)).astype(np.float32)
    centres = rng.standard_normal((clusters, latent)).astype(np.float32) * 2
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(n, dim))
    for a in range(0, n, chunk):
        m = min(chunk, n - a)
        if kind == "isotropic":
            x = rng.standard_normal((m, dim), dtype=np.float32)
        else:
            z = centres[rng.integers(0, clusters, m)] + rng.standard_normal((m, latent), dtype=np.float32)
            x = z @ mix + 0.3 * rng.standard_normal((m, dim), dtype=np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        out[a: a + m] = x
    out.flush()
    del out


# ----------------------------------------------------------------------------- children (one per figure)
def child_baseline(vectors: Path, labelled: np.ndarray, k: int) -> dict:
    from sklearn.metrics import pairwise_distances

    x = np.load(vectors)
    t0 = time.perf_counter()
    c0 = time.process_time()
    dist = pairwise_distances(x, x[labelled], metric="euclidean")
    min_d = np.min(dist, axis=1).reshape(-1, 1)
    del dist
    picks, t_round1 = [], 0.0
    for step in range(2 * k):
        ind = int(np.argmax(min_d))
        picks.append(ind)
        d = pairwise_distances(x, x[[ind]], metric="euclidean")
        min_d = np.minimum(min_d, d)
        if step == k - 1:
            t_round1, c_round1 = time.perf_counter() - t0, time.process_time() - c0
    return {"seconds": t_round1, "cpu": c_round1, "seconds_2k": time.perf_counter() - t0, "picks": picks,
            "peak": peak_rss_bytes()}


def child_kcenter(vectors: Path, labelled: np.ndarray, k: int, warm: bool) -> dict:
    from trapline.selector.kcenter import KCenter

    x = np.load(vectors, mmap_mode="r")
    lab = np.zeros(len(x), bool)
    lab[labelled] = True
    engine = KCenter(x)
    t0, c0 = time.perf_counter(), time.process_time()
    picks, _ = engine.select(lab, k)
    cold = time.perf_counter() - t0
    out = {"seconds": cold, "cpu": time.process_time() - c0, "picks": picks.tolist(),
           "stats": vars(engine.last).copy()}
    if warm:
        lab[picks] = True
        t0, c0 = time.perf_counter(), time.process_time()
        picks2, _ = engine.select(lab, k)
        out = {"seconds": time.perf_counter() - t0, "cpu": time.process_time() - c0, "cold_seconds": cold,
               "picks": picks2.tolist(), "stats": vars(engine.last).copy()}
    out["peak"] = peak_rss_bytes()
    return out


def child_store(kind: str, n: int, dim: int, vectors: Path, workdir: Path) -> dict:
    from trapline.selector.store import open_store, point_id

    x = np.load(vectors, mmap_mode="r")
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        store = open_store(kind, path=Path(tmp) / "q")
        store.create("bench", dim)
        t0 = time.perf_counter()
        batch = 1000
        for a in range(0, n, batch):
            rows = np.asarray(x[a % len(x): a % len(x) + batch][: n - a])
            ids = [point_id(f"c{i}") for i in range(a, a + len(rows))]
            payloads = [{"crop_id": f"c{i}", "row": i, "labelled": 0, "location": "L1", "sequence_id": f"s{i // 3}"}
                        for i in range(a, a + len(rows))]
            store.upsert("bench", ids, rows, payloads)
        upsert = time.perf_counter() - t0
        t0 = time.perf_counter()
        got = sum(len(b) for b in store.scroll("bench", with_vectors=True))
        scan = time.perf_counter() - t0
        assert got == n, (got, n)
        store.close()
    return {"upsert_per_s": n / upsert, "scan_per_s": n / scan, "upsert_s": upsert, "scan_s": scan}


def compare(vectors: Path, labelled: np.ndarray, ours: list[int], theirs: list[int], earlier: list[int]) -> str:
    """'True', or where the picks first differ and both points' exact (float64) distance to the centres then."""
    if ours == theirs:
        return "True"
    i = next(j for j, (a, b) in enumerate(zip(ours, theirs)) if a != b)
    x = np.load(vectors, mmap_mode="r")
    centres = np.asarray(x[np.concatenate([labelled, earlier, ours[:i]]).astype(np.int64)], dtype=np.float64)

    def exact(p: int) -> float:
        return float(np.sqrt(((centres - np.asarray(x[p], dtype=np.float64)) ** 2).sum(1).min()))

    a, b = exact(ours[i]), exact(theirs[i])
    verdict = "ours is the exact argmax" if a >= b else "BASELINE FARTHER: a real error"
    return (f"False: first differs at pick {i + 1}: exact distance ours {a:.9f}, baseline's {b:.9f} "
            f"(gap {a - b:.1e}; {verdict}; the baseline ranks float32 distances)")


def run_child(args: list[str], workdir: Path, timeout: float = 3600) -> dict:
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "2")
    proc = subprocess.run([sys.executable, __file__, "--workdir", str(workdir), "--child", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"child {args[:2]} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------- main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--labelled", type=int, default=1000)
    ap.add_argument("--select", type=int, default=100)
    ap.add_argument("--data", default="embedding,isotropic", help="comma-separated: embedding, isotropic")
    ap.add_argument("--store-sizes", default="100000,1000000", help="comma-separated point counts ('' skips)")
    ap.add_argument("--local-max", type=int, default=100_000,
                    help="largest size for qdrant-client's local mode (~1.3k points/s: 1M would take ~13 min)")
    ap.add_argument("--workdir", type=Path, default=REPO / "var" / "selector" / "bench")
    ap.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.child:
        what, path = args.child[0], Path(args.child[1])
        if what == "store":
            print(json.dumps(child_store(args.child[2], int(args.child[3]), args.dim, path, args.workdir)))
            return
        labelled = np.load(args.child[2])
        k = int(args.child[3])
        res = child_baseline(path, labelled, k) if what == "baseline" else \
            child_kcenter(path, labelled, k, warm=(what == "warm"))
        print(json.dumps(res))
        return

    args.workdir.mkdir(parents=True, exist_ok=True)
    vec_bytes = args.n * args.dim * 4
    print(f"# Selector benchmark\n\nN = {args.n:,} float32 vectors of {args.dim} dimensions "
          f"({vec_bytes / 2**30:.2f} GiB), {args.labelled:,} labelled, select {args.select}; "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '2')}, {os.cpu_count()} CPUs.\n", flush=True)
    print("| data | method | seconds (CPU s) | vs baseline | peak RSS | peak / vector bytes | same ids as baseline | notes |")
    print("|---|---|---|---|---|---|---|---|", flush=True)
    for kind in [d for d in args.data.split(",") if d]:
        path = args.workdir / f"vectors_{kind}_{args.n}_{args.dim}.npy"
        if not path.exists():
            make_vectors(path, args.n, args.dim, kind)
        lab_path = args.workdir / f"labelled_{args.n}_{args.labelled}.npy"
        np.save(lab_path, np.sort(np.random.default_rng(1).choice(args.n, args.labelled, replace=False)))
        base = run_child(["baseline", str(path), str(lab_path), str(args.select)], args.workdir)
        cold = run_child(["cold", str(path), str(lab_path), str(args.select)], args.workdir)
        warm = run_child(["warm", str(path), str(lab_path), str(args.select)], args.workdir)
        k = args.select
        lab = np.load(lab_path)
        same_cold = compare(path, lab, cold["picks"], base["picks"][:k], [])
        same_warm = compare(path, lab, warm["picks"], base["picks"][k:], base["picks"][:k])
        gib = 2**30
        print(f"| {kind} | baseline (sklearn pairwise_distances) | {base['seconds']:.2f} ({base['cpu']:.1f}) | 1.0x | "
              f"{base['peak'] / gib:.2f} GiB | {base['peak'] / vec_bytes:.2f} | - | {2 * k} steps took "
              f"{base['seconds_2k']:.1f} s |")
        print(f"| {kind} | k-Center cold | {cold['seconds']:.2f} ({cold['cpu']:.1f}) | {base['seconds'] / cold['seconds']:.1f}x faster | "
              f"{cold['peak'] / gib:.2f} GiB | {cold['peak'] / vec_bytes:.2f} | {same_cold} | "
              f"exact pool {cold['stats']['pool']:,} points |")
        print(f"| {kind} | k-Center warm (previous picks labelled) | {warm['seconds']:.3f} ({warm['cpu']:.2f}) | "
              f"{base['seconds'] / warm['seconds']:.0f}x faster; {warm['cold_seconds'] / warm['seconds']:.1f}x "
              f"faster than cold | {warm['peak'] / gib:.2f} GiB | {warm['peak'] / vec_bytes:.2f} | {same_warm} | "
              f"same ids as baseline steps {k + 1}..{2 * k} |", flush=True)

    sizes = [int(s) for s in args.store_sizes.split(",") if s]
    if sizes:
        path = args.workdir / f"vectors_embedding_{args.n}_{args.dim}.npy"
        if not path.exists():
            make_vectors(path, args.n, args.dim, "embedding")
        print("\n| store | points | upsert points/s | full scan with vectors, points/s |")
        print("|---|---|---|---|", flush=True)
        for kind in ("edge", "local"):
            for n in sizes:
                if kind == "local" and n > args.local_max:
                    print(f"| {kind} (qdrant-client local mode) | {n:,} | not run (see --local-max) | |")
                    continue
                r = run_child(["store", str(path), kind, str(n)], args.workdir)
                name = "edge (qdrant-edge-py)" if kind == "edge" else "local (qdrant-client local mode)"
                print(f"| {name} | {n:,} | {r['upsert_per_s']:,.0f} | {r['scan_per_s']:,.0f} |", flush=True)


if __name__ == "__main__":
    main()
