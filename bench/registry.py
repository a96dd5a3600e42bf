"""``make bench``: every bench script's quick mode, one table of the ratios they print.

REGISTRY holds one line per script: its module under bench/, the arguments of its quick mode, and
what its ratio is. A script's quick run ends with a ``bench ratio: VALUE (WHAT)`` line
(:func:`bench.common.print_ratio`); a script with none shows ``-``. Adding a script: give it a
``--quick`` mode (:func:`bench.common.parse_quick`), print its ratio, add its line here.

    .venv/bin/python -m bench.registry                     # all of them (tens of minutes on 2 cores)
    .venv/bin/python -m bench.registry --only simulate train
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import time
from typing import NamedTuple

from .common import RATIO, REPO, table


class Bench(NamedTuple):
    module: str  # bench/<module>.py
    argv: tuple  # its quick mode
    what: str  # what the ratio is (the script's own line says it too)


QUICK_OUT = "runs/bench-quick"  # where quick runs that write files put them (git-ignored)

REGISTRY = [
    Bench("simulate", ("--quick",), "sample_pair speed-up over the naive per-view lenstronomy loop"),
    Bench("train", ("--quick",), "shard loader: our decode over webdataset .decode() pairs/s"),
    Bench("online", ("--quick",), "training pairs/s on the fly over from shards"),
    Bench("similar", ("--quick", "--dir", f"{QUICK_OUT}/similar"), "exact search: numpy blocks over faiss flat time"),
    Bench("survey", ("--quick",), "survey-family over paper-family single images/s"),
    Bench("numerics", ("--quick",), "render cost of the default supersampling over factor 2"),
    Bench("match", ("--quick",), "simulated over real PSF FWHM, median over files"),
    Bench("interval_coverage", ("--quick",), "lowest coverage of the two-level 95% interval"),
    Bench("gpu_check", ("--cpu-smoke",), "none: every case of the GPU path passes on the CPU (status)"),
    Bench("gpu_micro", ("--quick",), "DDP-wrapped over bare step time at world 1 (the wrapper's cost)"),
    Bench("science", ("--quick", "--out", f"{QUICK_OUT}/science"), "LenSiam over SimSiam probe theta_E R^2"),
    Bench("methods", ("--quick", "--out", f"{QUICK_OUT}/methods"), "SimSiam lens over standard probe theta_E R^2"),
    Bench("step_sizes", ("--quick",), "SimSiam backbone update/step: SimCLR's LARS recipe over its own SGD"),
    Bench(
        "real_lenses",
        ("--quick", "--real", "../shared/data/real_lenses/desi_hst", "--out", f"{QUICK_OUT}/real_lenses"),
        "LenSiam over random-init median |d|/theta_E on real HST lenses (needs the shared data beside the repo)",
    ),
    Bench(
        "lens_finding",
        ("--quick", "--eval", "../shared/data/slsim/lsst_i", "--out", f"{QUICK_OUT}/lens_finding"),
        "held-out sims minus slsim LSST ROC AUC (the realism gap; needs the shared data beside the repo)",
    ),
]


def run(entry: Bench, timeout: float) -> dict:
    """One quick run: its ratio (or None), wall seconds and exit status; its output goes to the terminal."""
    cmd = [sys.executable, "-m", f"bench.{entry.module}", *entry.argv]
    print(f"\n[bench] {' '.join(cmd[1:])}", flush=True)
    t0 = time.perf_counter()
    try:
        p = subprocess.run(cmd, cwd=REPO, stdout=subprocess.PIPE, text=True, timeout=timeout)
        out, status = p.stdout, ("ok" if p.returncode == 0 else f"exit {p.returncode}")
    except subprocess.TimeoutExpired as exc:
        out, status = exc.stdout or "", f"timed out after {timeout:.0f} s"
        out = out.decode() if isinstance(out, bytes) else out
    print(out, end="", flush=True)
    hits = re.findall(rf"^{re.escape(RATIO)} (\S+)", out, re.M)
    return {"ratio": hits[-1] if hits else None, "seconds": time.perf_counter() - t0, "status": status}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", nargs="+", default=None, help="these modules only")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds per script")
    a = ap.parse_args(argv)
    chosen = [b for b in REGISTRY if a.only is None or b.module in a.only]
    unknown = set(a.only or ()) - {b.module for b in REGISTRY}
    if unknown:
        print(f"hpc-lensiam: error: --only {' '.join(sorted(unknown))}: not in bench.registry", file=sys.stderr)
        return 2
    rows = []
    for b in chosen:
        r = run(b, a.timeout)
        rows.append([b.module, b.what, r["ratio"] or "-", f"{r['seconds']:.0f}", r["status"]])
    print("\n" + "\n".join(table(["script", "ratio", "value", "seconds", "status"], rows)), flush=True)
    return 0 if all(row[-1] == "ok" for row in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
