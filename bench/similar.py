"""Vector search for `hpc-lensiam similar`: faiss flat and IVF against brute-force numpy, up to 10^6 x 2048.

    .venv/bin/python -m bench.similar --rows 100000 1000000 --dim 2048

The vectors (seeded synthetic unit vectors, a mixture of 1000 Gaussian clusters, like embeddings
of many kinds of image) are generated once per size, block by block, into a float32 file on disk
(``--dir``; 10^6 x 2048 is 8.2 GB) and every method reads it memory-mapped, in its own process, so
no process holds a second full copy and each peak RSS is that method's own:

- ``truth``: exact top-16 of ``--recall-queries`` rows by cosine (every similarity in float64, then
  a full sort, no block merging): the reference for recall;
- ``numpy``: brute force, streaming over blocks of the file (BLAS matrix product, running top-16);
- ``flat``, ``ivf``: the index ``hpc-lensiam similar`` builds (``build_index`` of
  :mod:`hpc_lensiam.embed.similar`, called on the memory map: faiss copies the vectors into the
  index and adds IVF vectors 65536 at a time, so the index is the only full copy in memory).
  ``similar --key/--image`` uses ``flat``; ``--anomaly`` uses ``ivf`` above ``IVF_MIN_ROWS``.

Recorded per method: index build time, the latency of 1 query and of a batch of 64 (best of
``--repeats``), recall@16 against ``truth``, the projected time of ``--anomaly`` (every row
queried at the 64-batch rate: projected, not run), peak RSS (which counts the pages of the vector
file the process has mapped; those are page cache, which the kernel can drop) and the peak of the
anonymous memory (sampled every 20 ms: the process's own allocations, i.e. the index), beside the
bytes of the vectors. Threads: OMP/OpenBLAS/MKL and faiss are set to ``--threads`` (1 by
default: per-core figures) in every child. The vector file is deleted at the end unless
``--keep-vectors``; an existing complete file of the same size and seed is reused.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

from hpc_lensiam.core.io import atomic_write_json

from .common import REPO, parse_quick, print_ratio

K = 16
CLUSTERS = 1000
GEN_BLOCK_ROWS = 16384  # generation block: fixes the random stream, so a size's vectors never change
METHODS = ("numpy", "flat", "ivf")


# ------------------------------------------------------------------------------------ vectors
def vector_path(directory: str, rows: int, dim: int, seed: int) -> Path:
    return Path(directory) / f"vectors_{rows}x{dim}_seed{seed}.f32"


def write_vectors(path: Path, rows: int, dim: int, seed: int = 0) -> float:
    """Unit vectors into a float32 file, GEN_BLOCK_ROWS at a time (no whole-set temporaries); seconds taken.

    Written under a temporary name and renamed when complete, so an existing file is a whole one."""
    t = time.perf_counter()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".part")
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((CLUSTERS, dim), dtype=np.float32)
    x = np.memmap(tmp, np.float32, "w+", shape=(rows, dim))
    for a in range(0, rows, GEN_BLOCK_ROWS):
        b = min(rows, a + GEN_BLOCK_ROWS)
        block = centres[rng.integers(0, CLUSTERS, b - a)] + rng.standard_normal((b - a, dim), dtype=np.float32)
        x[a:b] = block / np.linalg.norm(block, axis=1, keepdims=True)
    x.flush()
    del x
    os.replace(tmp, path)
    return time.perf_counter() - t


def open_vectors(path: Path, rows: int, dim: int) -> np.memmap:
    return np.memmap(path, np.float32, "r", shape=(rows, dim))


def query_rows(rows: int, n: int) -> np.ndarray:
    """Rows used as queries for recall: spread over the whole file."""
    return np.linspace(0, rows - 1, n).astype(np.int64)


# ------------------------------------------------------------------------------------- memory
def _status_gb(field: str) -> float:
    with open("/proc/self/status") as f:
        line = next(s for s in f if s.startswith(field + ":"))
    return int(line.split()[1]) * 1024 / 1e9  # kB -> GB


class AnonPeak:
    """Peak of this process's anonymous RSS (its own allocations, not mapped file pages), sampled."""

    def __init__(self, every_s: float = 0.02):
        self.peak, self._stop = _status_gb("RssAnon"), threading.Event()
        self._thread = threading.Thread(target=self._run, args=(every_s,), daemon=True)
        self._thread.start()

    def _run(self, every_s: float) -> None:
        while not self._stop.wait(every_s):
            self.peak = max(self.peak, _status_gb("RssAnon"))

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        return max(self.peak, _status_gb("RssAnon"))


# ------------------------------------------------------------------------------------- search
def numpy_topk(x: np.ndarray, q: np.ndarray, k: int = K, block_rows: int = 65536) -> np.ndarray:
    """Exact top-k rows of ``x`` by inner product with each row of ``q``, streaming over blocks of ``x``."""
    best_s = np.full((len(q), k), -np.inf, np.float32)
    best_i = np.zeros((len(q), k), np.int64)
    for a in range(0, len(x), block_rows):
        sims = q @ x[a : a + block_rows].T
        kk = min(k, sims.shape[1])
        top = np.argpartition(-sims, kk - 1, axis=1)[:, :kk]
        cand_s = np.concatenate([best_s, np.take_along_axis(sims, top, 1)], 1)
        cand_i = np.concatenate([best_i, top + a], 1)
        keep = np.argpartition(-cand_s, k - 1, axis=1)[:, :k]
        best_s, best_i = np.take_along_axis(cand_s, keep, 1), np.take_along_axis(cand_i, keep, 1)
    order = np.argsort(-best_s, axis=1, kind="stable")
    return np.take_along_axis(best_i, order, 1)


def exact_topk(x: np.ndarray, q: np.ndarray, k: int = K, block_rows: int = 65536) -> np.ndarray:
    """Reference: every similarity of each query (float64), then a full sort: no block merging."""
    sims = np.empty((len(q), len(x)), np.float64)
    q64 = q.astype(np.float64)
    for a in range(0, len(x), block_rows):
        sims[:, a : a + block_rows] = q64 @ x[a : a + block_rows].astype(np.float64).T
    return np.argsort(-sims, axis=1, kind="stable")[:, :k]


def _best_ms(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1e3 * min(times)


def _log(msg: str) -> None:
    print(f"  [{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def run_method(
    method: str, path: Path, rows: int, dim: int, recall_queries: int, repeats: int, block_rows: int
) -> dict:
    """One method in this process: build, latency, recall against ``truth.npy`` beside the vectors."""
    x = open_vectors(path, rows, dim)
    qr = query_rows(rows, recall_queries)
    truth_file = path.with_name(path.stem + f"_truth{recall_queries}.npy")
    res: dict = {"method": method, "rows": rows, "dim": dim, "vectors_gb": rows * dim * 4 / 1e9}
    anon = AnonPeak()
    base_anon = _status_gb("RssAnon")
    if method == "truth":
        t = time.perf_counter()
        np.save(truth_file, exact_topk(x, np.array(x[qr]), K, block_rows))
        res["seconds"] = time.perf_counter() - t
        res["peak_anon_gb"], res["peak_rss_gb"] = anon.stop(), _status_gb("VmHWM")
        return res
    if method == "numpy":
        res["build_s"] = 0.0

        def search(q):
            return numpy_topk(x, q, K, block_rows)
    else:
        from hpc_lensiam.embed.similar import IVF_TRAIN_PER_LIST, build_index, import_faiss

        faiss = import_faiss()  # as `similar` imports it: on this CPU's OpenBLAS kernel unless told otherwise

        res["faiss_threads"] = faiss.omp_get_max_threads()
        _log(f"{method}: building the index (faiss {faiss.__version__}, {res['faiss_threads']} thread(s))")
        t = time.perf_counter()
        index = build_index(x, method)
        res["build_s"] = time.perf_counter() - t
        if method == "ivf":
            res["nlist"], res["nprobe"] = index.nlist, index.nprobe
            res["train_rows"] = min(rows, IVF_TRAIN_PER_LIST * index.nlist)

        def search(q):
            return index.search(q, K)[1]

    res["index_gb"] = _status_gb("RssAnon") - base_anon
    _log(f"{method}: built in {res['build_s']:.1f} s, index {res['index_gb']:.2f} GB; timing queries")
    q1, q64 = np.array(x[:1]), np.array(x[1000 % rows : 1000 % rows + 64])
    res["query1_ms"] = _best_ms(lambda: search(q1), repeats)
    res["query64_ms"] = _best_ms(lambda: search(q64), repeats)
    res["anomaly_projected_s"] = res["query64_ms"] / 1e3 * rows / 64
    got = search(np.array(x[qr]))
    truth = np.load(truth_file)
    res["recall_at_16"] = float(np.mean([len(set(a) & set(b)) / K for a, b in zip(truth, got)]))
    res["recall_queries"] = recall_queries
    res["peak_anon_gb"], res["peak_rss_gb"] = anon.stop(), _status_gb("VmHWM")
    return res


# --------------------------------------------------------------------------------------- main
def _child_env(threads: int, coretype: str | None) -> dict:
    env = {**os.environ, **{v: str(threads) for v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")}}
    if coretype:
        env["OPENBLAS_CORETYPE"] = coretype
    return env


def table(results: list[dict]) -> str:
    head = (
        "rows x dim",
        "method",
        "build s",
        "1 query ms",
        "64 queries ms",
        "recall@16",
        "--anomaly s (projected)",
        "vectors GB",
        "index GB",
        "peak anon GB",
        "peak RSS GB (incl. mapped file)",
        "1 query vs numpy",
    )
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        if r["method"] == "truth":
            continue
        ref = next((x for x in results if x["rows"] == r["rows"] and x["method"] == "numpy"), None)
        name = {
            "flat": "faiss IndexFlatIP",
            "ivf": f"faiss IndexIVFFlat ({r.get('nlist')} lists, nprobe "
            f"{r.get('nprobe')}, trained on {r.get('train_rows')})",
        }.get(r["method"], "numpy brute force")
        speed = f"{ref['query1_ms'] / r['query1_ms']:.2f}x" if ref else "-"
        out.append(
            f"| {r['rows']:,} x {r['dim']} | {name} | {r['build_s']:.1f} | {r['query1_ms']:.1f} | "
            f"{r['query64_ms']:.1f} | {r['recall_at_16']:.3f} | {r['anomaly_projected_s']:,.0f} | "
            f"{r['vectors_gb']:.2f} | {r['index_gb']:.2f} | {r['peak_anon_gb']:.2f} | "
            f"{r['peak_rss_gb']:.2f} | {speed} |"
        )
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, nargs="+", default=[100_000])
    ap.add_argument("--dim", type=int, default=2048)
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--threads", type=int, default=1, help="OMP/OpenBLAS/MKL/faiss threads per method process")
    ap.add_argument(
        "--openblas-coretype",
        default=None,
        help="OPENBLAS_CORETYPE for the method processes (default: the kernel `similar` picks from the CPU "
        "flags for faiss-cpu's bundled OpenBLAS, which may not know a recent CPU; e.g. Prescott for the old fallback)",
    )
    ap.add_argument("--dir", default="runs/bench_similar", help="where the vector file (and its truth) go")
    ap.add_argument("--keep-vectors", action="store_true", help="keep the vector file (default: delete it)")
    ap.add_argument("--recall-queries", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=5, help="latency: best of this many")
    ap.add_argument("--block-rows", type=int, default=65536, help="rows per block of the numpy/truth scans")
    ap.add_argument("--json", default=None, help="also write the results here")
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)  # child process: METHOD
    quick = dict(rows=[3000], dim=32, block_rows=700, recall_queries=40, repeats=1, methods=["numpy", "flat"])
    a = parse_quick(ap, None, quick)
    if a.one:
        path = vector_path(a.dir, a.rows[0], a.dim, 0)
        print(json.dumps(run_method(a.one, path, a.rows[0], a.dim, a.recall_queries, a.repeats, a.block_rows)))
        return
    results = []
    print(
        f"# threads per method process: {a.threads} (OMP_NUM_THREADS, OPENBLAS_NUM_THREADS, MKL_NUM_THREADS, "
        f"faiss omp); OPENBLAS_CORETYPE={a.openblas_coretype or os.environ.get('OPENBLAS_CORETYPE', '(unset)')}; "
        f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}",
        flush=True,
    )
    for rows in a.rows:
        path = vector_path(a.dir, rows, a.dim, 0)
        print(f"# {rows} x {a.dim} float32 = {rows * a.dim * 4 / 1e9:.2f} GB of vectors in {path}", flush=True)
        try:
            if not path.is_file():
                print(f"# generated in {write_vectors(path, rows, a.dim):.1f} s", flush=True)
            for m in ("truth", *a.methods):
                cmd = [
                    sys.executable,
                    "-m",
                    "bench.similar",
                    "--one",
                    m,
                    "--rows",
                    str(rows),
                    "--dim",
                    str(a.dim),
                    "--dir",
                    a.dir,
                    "--recall-queries",
                    str(a.recall_queries),
                    "--repeats",
                    str(a.repeats),
                    "--block-rows",
                    str(a.block_rows),
                ]
                env = _child_env(a.threads, a.openblas_coretype)
                r = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, env=env, cwd=REPO)
                if r.returncode != 0:
                    raise SystemExit(f"bench.similar: {m} at {rows} rows failed (exit {r.returncode})")
                results.append(json.loads(r.stdout.strip().splitlines()[-1]))
                print(json.dumps(results[-1]), flush=True)
        finally:
            if not a.keep_vectors:
                for f in (
                    path,
                    path.with_name(path.name + ".part"),
                    path.with_name(path.stem + f"_truth{a.recall_queries}.npy"),
                ):
                    f.unlink(missing_ok=True)
        if a.json:
            atomic_write_json(a.json, results)
    print("\n" + table(results))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9
    print(f"\n# this driver's own peak RSS (vector generation, incl. the file's dirty pages): {peak:.2f} GB")
    ms = {r["method"]: r["query1_ms"] for r in results if r["rows"] == a.rows[-1] and "query1_ms" in r}
    if "numpy" in ms and "flat" in ms:
        print_ratio(ms["numpy"] / ms["flat"], f"1-query time numpy blocks over faiss flat, {a.rows[-1]} rows")


if __name__ == "__main__":
    main()
