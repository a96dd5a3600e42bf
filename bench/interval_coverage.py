"""Coverage of the seed-aware paired interval when pretraining seeds sit above fine-tuning seeds.

The protocol fine-tunes each of C pretrained backbones with the same F fine-tuning seeds: the C x F
runs are neither exchangeable nor simply nested. This prints, for C pretraining x 3 fine-tuning
seeds, a pretraining-seed effect tau_p and a fine-tuning-seed effect tau_f (nested: each run its
own; crossed: seed f shared by every backbone), how often the 95% interval of
``hierarchical_paired_difference`` holds the known truth when the runs are resampled flat (every
run a unit), by pretraining seed only, and by both levels (``levels``), with the mean widths.
Synthetic arms of tests/evaluation/test_stats.py (150 test images, 400 resamples, 200 replications: a
coverage's binomial sd is 0.015).

    .venv/bin/python -m bench.interval_coverage
    .venv/bin/python -m bench.interval_coverage --quick     # C = 2 only, 40 replications: a minute
"""

from __future__ import annotations

import argparse

import numpy as np

from hpc_lensiam.evaluation.stats import hierarchical_paired_difference
from tests.evaluation.test_stats import REPS, _grid_arms  # the one definition of the synthetic arms

from .common import parse_quick, print_ratio

KINDS = ("flat", "pretraining seed only", "both levels")


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=REPS, help="replications per cell")
    ap.add_argument("--cs", type=int, nargs="+", default=[2, 3, 5], help="pretraining seeds C")
    a = parse_quick(ap, argv, dict(reps=40, cs=[2]))  # C = 2 only, 40 replications: minutes
    reps, cs = a.reps, a.cs
    coverage = {}
    print("| C | tau_p | tau_f | fine-tuning seed | " + " | ".join(f"coverage, {k}" for k in KINDS) + " | widths |")
    print("|---|---|---|---|---|---|---|---|")
    for c in cs:
        for tau_p, tau_f, crossed in ((0.0, 0.0, True), (0.25, 0.03, False), (0.1, 0.1, True), (0.03, 0.25, True)):
            rng = np.random.default_rng(3)
            hits, width = dict.fromkeys(KINDS, 0), dict.fromkeys(KINDS, 0.0)
            for rep in range(reps):
                y, pa, pb, truth, labels = _grid_arms(rng, 150, c, 3, tau_p, tau_f, crossed)
                for kind, levels in zip(KINDS, (None, {"pretraining seed": labels["pretraining seed"]}, labels)):
                    r = hierarchical_paired_difference(y, pa, pb, n_boot=400, seed=rep, levels=levels)
                    hits[kind] += r["ci95"][0] <= truth <= r["ci95"][1]
                    width[kind] += (r["ci95"][1] - r["ci95"][0]) / reps
            print(
                f"| {c} | {tau_p} | {tau_f} | {'crossed' if crossed else 'nested'} | "
                + " | ".join(f"{hits[k] / reps:.3f}" for k in KINDS)
                + " | "
                + " / ".join(f"{width[k]:.3f}" for k in KINDS)
                + " |",
                flush=True,
            )
            coverage[(c, tau_p, tau_f, crossed)] = hits["both levels"] / reps
    print_ratio(min(coverage.values()), "lowest coverage of the two-level 95% interval")
    return coverage


if __name__ == "__main__":
    main()
