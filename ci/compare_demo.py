"""Did a change alter what `make demo` produces? Compare two checkouts' demo outputs.

    python ci/compare_demo.py OLD_CHECKOUT NEW_CHECKOUT

Each checkout has run `make demo` (shards/ and demo_out/ in it). Compared: every sample file in the
three shard sets (tar members, not tar headers, which hold write times), the training losses step by
step, the embeddings, and every number of the probe and both fine-tuning reports except timings.
Exit 0 when all are identical, 1 otherwise; one line per item says which.

To separate the simulation from the rest, copy the old checkout's shards/ into the new one before its
demo (a rerun of `simulate` refuses shards of another numerics revision, so run the demo's later
commands: `make -n demo` lists them).
"""

from __future__ import annotations

import csv
import json
import sys
import tarfile
from pathlib import Path

import h5py
import numpy as np

SHARD_SETS = ("shards/demo", "shards/demo_euclid_train", "shards/demo_euclid_test")
REPORTS = ("probe.json", "finetune_lensiam.json", "finetune_none.json")
TIMING_WORDS = ("second", "time", "wall", "_s")


def sample_files(shard_dir: Path) -> dict[tuple[str, str], bytes]:
    """(shard, member) -> bytes of every sample file of a shard set."""
    out = {}
    for path in sorted(shard_dir.glob("shard-*.tar")):
        with tarfile.open(path) as tar:
            out.update({(path.name, m.name): tar.extractfile(m).read() for m in tar if m.isfile()})
    return out


def losses(run: Path) -> list[tuple[str, str]]:
    with open(run / "metrics.csv", newline="") as f:
        return [(row["step"], row["loss"]) for row in csv.DictReader(f)]


def numbers(obj, path: str = ""):
    """(path, value) of every number in a JSON document."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from numbers(v, f"{path}.{k}")
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from numbers(v, f"{path}[{i}]")
    elif isinstance(obj, (int, float)) and not isinstance(obj, bool):
        yield path, obj


def umap_coords(demo_out: Path) -> np.ndarray:
    """The UMAP coordinates: umap.csv beside the figure, or (older checkouts) the ``umap`` dataset that
    `umap` once wrote back into the embeddings file."""
    if (demo_out / "umap.csv").is_file():
        with open(demo_out / "umap.csv", newline="") as f:
            return np.array([[float(r["umap_1"]), float(r["umap_2"])] for r in csv.DictReader(f)])
    with h5py.File(demo_out / "emb.h5") as f:
        return f["umap"][()].astype(float)


def single_result(report: dict) -> dict:
    """A probe report's one embeddings entry under a fixed name: its label followed the run's name
    (``lensiam`` before `--views`, ``lens`` after), which is a name, not a result."""
    results = report.get("results")
    if isinstance(results, dict) and len(results) == 1:
        return {**report, "results": {"run": next(iter(results.values()))}}
    return report


def compare(old: Path, new: Path) -> bool:
    same = True

    def say(what: str, equal: bool, detail: str = "") -> None:
        nonlocal same
        same &= equal
        print(f"{what}: {'identical' if equal else 'DIFFERENT'}{detail}")

    for d in SHARD_SETS:
        a, b = sample_files(old / d), sample_files(new / d)
        say(f"{d} ({len(a)} sample files)", a.keys() == b.keys() and all(a[k] == b[k] for k in a))
    la, lb = losses(old / "demo_out/run"), losses(new / "demo_out/run")
    say(f"training losses ({len(la)} steps)", la == lb, f"; last {la[-1][1]} vs {lb[-1][1]}" if la and lb else "")
    with h5py.File(old / "demo_out/emb.h5") as fa, h5py.File(new / "demo_out/emb.h5") as fb:
        for k in sorted(k for k in fa if isinstance(fa[k], h5py.Dataset) and k != "umap"):
            x, y = fa[k][()], fb[k][()] if k in fb else None
            say(f"emb.h5 {k} {x.shape}", y is not None and x.shape == y.shape and np.array_equal(x, y))
    ua, ub = umap_coords(old / "demo_out"), umap_coords(new / "demo_out")
    same_umap = ua.shape == ub.shape and np.allclose(ua, ub, atol=6e-5)
    say(f"UMAP coordinates {ua.shape} (to umap.csv's 4 decimals)", same_umap)
    for name in REPORTS:
        na = dict(numbers(single_result(json.loads((old / "demo_out" / name).read_text()))))
        nb = dict(numbers(single_result(json.loads((new / "demo_out" / name).read_text()))))
        keys = [k for k in na if not any(w in k.lower() for w in TIMING_WORDS)]
        differ = [k for k in keys if na[k] != nb.get(k)]
        say(f"{name} ({len(keys)} numbers, timings left out)", not differ, f": {differ[:5]}" if differ else "")
    return same


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    sys.exit(0 if compare(Path(sys.argv[1]), Path(sys.argv[2])) else 1)
