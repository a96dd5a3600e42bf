"""Vector search for `hpc-lensiam similar`: faiss flat and IVF against brute-force numpy.

    .venv/bin/python bench/similar.py --rows 100000 250000 --dim 2048

For each size, each method runs in its own process (so its peak RSS is its own): the same seeded
synthetic unit vectors (a mixture of 1000 Gaussian clusters, like embeddings of many kinds of
image), then index build time, the latency of 1 query and of a batch of 64 (best of 5), the
recall@16 against exact search, the projected time of `--anomaly` (every row queried) and the
peak RSS next to the size of the vectors themselves. 10^6 x 2048 float32 is 8.2 GB of vectors
alone: run it only on a machine with ~20 GB free.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import numpy as np

K = 16


def vectors(rows: int, dim: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((1000, dim), dtype=np.float32)
    x = np.empty((rows, dim), np.float32)
    for a in range(0, rows, 16384):  # in blocks: no float64 temporaries of the whole set
        b = min(rows, a + 16384)
        x[a:b] = centres[rng.integers(0, 1000, b - a)] + rng.standard_normal((b - a, dim), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def _best(fn, repeats: int = 5) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def _rss_gb() -> float:
    """Peak RSS of this process so far."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20


def _current_rss_gb() -> float:
    """RSS now (the peak would include the data generator's temporaries)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 30


def run_method(method: str, rows: int, dim: int) -> dict:
    from hpc_lensiam.embed.similar import build_index

    x = vectors(rows, dim)
    q1, q64 = x[:1].copy(), x[1000:1064].copy()
    base = _current_rss_gb()
    t = time.perf_counter()
    if method == "numpy":
        def search(q):
            sims = q @ x.T
            top = np.argpartition(-sims, K, axis=1)[:, :K]
            return np.take_along_axis(top, np.argsort(-np.take_along_axis(sims, top, 1), 1), 1)
        build_s = 0.0
    else:
        index = build_index(x, method)
        build_s = time.perf_counter() - t

        def search(q):
            return index.search(q, K)[1]
    res = {"method": method, "rows": rows, "dim": dim, "build_s": build_s,
           "query1_ms": 1e3 * _best(lambda: search(q1)), "query64_ms": 1e3 * _best(lambda: search(q64))}
    res["anomaly_projected_s"] = res["query64_ms"] / 1e3 * rows / 64
    exact = np.argsort(-(q64 @ x.T), axis=1)[:, :K]
    got = search(q64)
    res["recall_at_16"] = float(np.mean([len(set(a) & set(b)) / K for a, b in zip(exact, got)]))
    res["vectors_gb"] = x.nbytes / 1e9
    res["rss_vectors_gb"], res["index_extra_gb"], res["peak_rss_gb"] = base, _current_rss_gb() - base, _rss_gb()
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, nargs="+", default=[100_000, 250_000])
    ap.add_argument("--dim", type=int, default=2048)
    ap.add_argument("--methods", nargs="+", default=["numpy", "flat", "ivf"])
    ap.add_argument("--threads", type=int, default=1,
                    help="OpenMP/BLAS threads per method (1 on a shared machine: faiss's OpenMP spins under load)")
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)  # child process: METHOD
    a = ap.parse_args()
    if a.one:
        print(json.dumps(run_method(a.one, a.rows[0], a.dim)))
        return
    results = []
    for rows in a.rows:
        need = rows * a.dim * 4 / 1e9
        print(f"# {rows} x {a.dim} float32 = {need:.2f} GB of vectors per process, {a.threads} thread(s)", flush=True)
        for m in a.methods:
            threads = str(a.threads)
            env = {**os.environ, **{v: threads for v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")}}
            r = subprocess.run([sys.executable, __file__, "--one", m, "--rows", str(rows), "--dim", str(a.dim)],
                               capture_output=True, text=True, env=env)
            if r.returncode != 0:
                print(r.stderr[-2000:], file=sys.stderr)
                raise SystemExit(r.returncode)
            results.append(json.loads(r.stdout.strip().splitlines()[-1]))
            print(json.dumps(results[-1]), flush=True)
    head = ("rows", "method", "build s", "1 query ms", "64 queries ms", "recall@16", "anomaly s (proj.)",
            "vectors GB", "index memory GB", "peak RSS GB", "vs numpy 1q")
    print("\n| " + " | ".join(head) + " |\n|" + "---|" * len(head))
    for r in results:
        ref = next(x for x in results if x["rows"] == r["rows"] and x["method"] == "numpy")
        print(f"| {r['rows']:,} | {r['method']} | {r['build_s']:.2f} | {r['query1_ms']:.1f} | {r['query64_ms']:.1f} | "
              f"{r['recall_at_16']:.3f} | {r['anomaly_projected_s']:.0f} | {r['vectors_gb']:.2f} | "
              f"{r.get('index_extra_gb', float('nan')):.2f} | {r['peak_rss_gb']:.2f} | "
              f"{ref['query1_ms'] / r['query1_ms']:.2f}x |")
    print(f"\n10^6 x {a.dim}: {1e6 * a.dim * 4 / 1e9:.1f} GB of vectors alone (x2 with faiss's copy)")


if __name__ == "__main__":
    main()
