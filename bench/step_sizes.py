"""The step each pretraining recipe really takes: the relative backbone update per optimizer step.

Why: the methods comparison (bench.methods) found that SimSiam's recipe moves its backbone ~10x less
per step than SimCLR's, and that this step size, not the method, set its probe score (issue 30,
docs/science/optimizer-swap.md). Runs made before the trainer logged ``rel_update``
(|W_t - W_t-1| / |W_t-1| of the backbone, metrics.csv) lack the number, and a full run per recipe
costs hours here. This measures it for any set of recipes in minutes: each run is the bench.methods
run's own ``train`` command (same shards, seed, schedule of ``--steps`` steps, warm-up of a tenth of
its epochs) stopped after ``--measure-steps``, which must pass the warm-up, so that the update is read
at the schedule's peak lr (the cosine then shrinks it: a full run's median over all steps is lower).

    .venv/bin/python -m bench.step_sizes --data runs/swap/shards/pretrain --steps 640 --measure-steps 80 \\
        --runs simsiam-lens,simclr-lens,simsiam-lens@lars,byol-lens,vicreg-lens --vit vit_small_p10

Writes ``docs/science/<tag>.md`` (``--reports``) and ``OUT/step_sizes.json`` after every run; resumable
through the ledger (``OUT/steps.json``): a finished run is skipped on a rerun.
"""

from __future__ import annotations

import argparse
import csv
import math
import statistics
from pathlib import Path

from hpc_lensiam.core.io import atomic_write_json, atomic_write_text

from .common import (
    REPORTS,
    RunLayout,
    commands_table,
    hl,
    launcher,
    machine_line,
    made_by,
    out_dir,
    parse_quick,
    print_ratio,
    table,
    warmup_epochs,
)
from .ledger import Steps
from .methods import _bad, optimizer_recipe, override_flags, parse_runs, pretrain_cmd, run_name, run_schedule


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="bench.step_sizes", description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default=None, help="pretraining shards (a bench.methods OUT/shards/pretrain)")
    ap.add_argument("--pairs", type=int, default=4096, help="pairs to simulate into OUT when no --data is given")
    ap.add_argument("--num-pix", type=int, default=110, help="image side of those pairs, hst preset")
    ap.add_argument("--out", default="runs/step-sizes", help="working folder (runs, steps.json, step_sizes.json)")
    ap.add_argument("--tag", default="step-sizes", help="names the report, <reports>/<tag>.md")
    ap.add_argument("--reports", default=None, help="folder of the report (default docs/science)")
    ap.add_argument("--steps", type=int, default=640, help="the full runs' optimizer steps (sets the schedule)")
    ap.add_argument("--measure-steps", type=int, default=96, help="steps actually run (past the warm-up)")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--arch", default="resnet18")
    ap.add_argument("--runs", default="simsiam-lens,byol-lens,vicreg-lens,simclr-lens", help="as bench.methods --runs")
    ap.add_argument("--vit", default="", help="a ViT whose SimSiam-lens run is measured too ('' for none)")
    ap.add_argument("--seed", type=int, default=0)
    quick = dict(pairs=256, num_pix=64, steps=40, measure_steps=12, batch_size=16)
    quick.update(runs="simsiam-lens,simsiam-lens@lars", out="runs/bench-quick/step-sizes", reports="runs/bench-quick")
    return parse_quick(ap, argv, quick)


def read_steps(run_dir: Path) -> list[dict]:
    """metrics.csv rows as numbers, the last row of a step that was logged twice (a resumed run) kept."""
    with open(run_dir / "metrics.csv", newline="") as f:
        rows = {int(r["step"]): {k: float(v) for k, v in r.items() if v not in ("", None)} for r in csv.DictReader(f)}
    return [rows[s] for s in sorted(rows)]


def summarise(rows: list[dict], warmup_steps: int, batch_size: int) -> dict:
    """Median update per step in the warm-up and after it, the lr reached, the loss, seconds per step."""

    def median(values):
        values = [v for v in values if math.isfinite(v)]
        return statistics.median(values) if values else float("nan")

    warm = [r["rel_update"] for r in rows if r["step"] <= warmup_steps]
    peak = [r["rel_update"] for r in rows if r["step"] > warmup_steps]
    return {
        "steps": int(rows[-1]["step"]),
        "rel_update_warmup": median(warm),
        "rel_update_peak": median(peak),
        "rel_update_peak_max": max(peak) if peak else float("nan"),
        "lr_peak": max(r["lr"] for r in rows),
        "loss_first": rows[0]["loss"],
        "loss_last": rows[-1]["loss"],
        "step_s": median(batch_size / r["pairs_per_s"] for r in rows[1:] if r["pairs_per_s"] > 0),
    }


def recipe_text(method: str, arch: str, override: str) -> str:
    if override:
        flags = override_flags(method, arch, override)
        opt = dict(zip(flags[::2], flags[1::2]))
        return f"{opt['--optimizer']}, base lr {opt['--base-lr']} ({opt['--lr-scaling']} rule)"
    r = optimizer_recipe(method, arch)
    return f"{r['optimizer']}, base lr {r['base_lr']:g} ({r['lr_scaling']} rule)"


def write_report(path: Path, a, pairs: int, epochs: int, warmup: int, results: dict, done: dict) -> None:
    rows = [
        [
            name,
            r["recipe"],
            f"{r['lr_peak']:.4g}",
            f"{r['rel_update_warmup']:.2e}",
            f"**{r['rel_update_peak']:.2e}**",
            f"{r['rel_update_peak_max']:.2e}",
            f"{r['loss_first']:.4g} -> {r['loss_last']:.4g}",
            f"{r['step_s']:.2f}",
        ]
        for name, r in results.items()
    ]
    head = ["run", "optimizer recipe", "peak lr", "update/step, warm-up", "update/step, after warm-up"]
    head += ["max after warm-up", f"loss step 1 -> {a.measure_steps}", "s/step"]
    lines = [
        "# The step each pretraining recipe takes: relative backbone update per optimizer step",
        "",
        machine_line(),
        "",
        f"Each run is the first {a.measure_steps} optimizer steps of the bench.methods run of the same name: "
        f"{pairs} pairs, global batch {a.batch_size}, the schedule of {a.steps} steps ({epochs} epochs, linear "
        f"warm-up over the first {warmup} steps, then half-cosine), seed {a.seed}, zero_init_residual off. "
        "Update/step: the median over steps of |W_t - W_t-1| / |W_t-1| of the backbone (the trainer's "
        "metrics.csv `rel_update`), in the warm-up and in the steps after it (the schedule's peak lr, where a "
        "recipe's step size shows; over a full run the cosine makes the median smaller). Peak lr: the largest "
        "lr the schedule reached (after the lr rule's batch scaling; for LARS, the trust ratio scales it per "
        "layer, which is why the update, not the lr, compares recipes).",
        "",
        *table(head, rows),
        "",
        f"Made by {made_by('step_sizes')}; {len(results)} run(s).",
        *commands_table("Commands (wall seconds of the invocation that ran them)", done),
    ]
    atomic_write_text(path, "\n".join(lines) + "\n")


def main(argv=None) -> None:
    a = parse_args(argv)
    from hpc_lensiam.shards.manifest import read_manifest

    out = out_dir(a.out)
    lay = RunLayout(out)
    shards = out_dir(a.data) if a.data else lay.shards("pretrain")
    if a.data and not (shards / "manifest.json").is_file():
        raise _bad("--data", f"{a.data}: a shard folder with manifest.json expected")
    runs = parse_runs(a.runs, a.arch) + ([("simsiam", "lens", a.vit, "")] if a.vit else [])
    pairs = int(read_manifest(shards)["num_samples"]) if a.data else a.pairs
    if pairs < a.batch_size:
        raise _bad("--data", f"{a.data}: {pairs} pairs, fewer than one batch of {a.batch_size}")
    steps_per_epoch, epochs = run_schedule(pairs, a.batch_size, a.steps)
    warmup = warmup_epochs(epochs) * steps_per_epoch
    if not warmup < a.measure_steps <= a.steps:
        raise _bad("--measure-steps", f"{a.measure_steps}: more than the warm-up's {warmup} steps, at most --steps")
    out.mkdir(parents=True, exist_ok=True)
    steps = Steps(out, "step_sizes")
    if not a.data:
        sim = hl("simulate", "--physics", lay.sim_yaml(a.num_pix), "--shard-size", 128, "--out", shards)
        sim += ["--pairs", a.pairs, "--seed", a.seed]
        steps.run("simulate pretraining pairs", sim, [shards / "manifest.json"])
    report = (out_dir(a.reports) if a.reports else REPORTS) / f"{a.tag}.md"
    report.parent.mkdir(parents=True, exist_ok=True)
    results = {}
    for run in runs:
        name = run_name(run)
        run_dir = lay.run(name)
        ckpt = lay.last(name)
        cmd = pretrain_cmd(shards, run_dir, run, a.batch_size, epochs, a.measure_steps, a.seed, ["--ckpt-every", 10**6])
        steps.run(f"first {a.measure_steps} steps of {name}", launcher(1) + cmd, [ckpt], ckpt.exists())
        measured = summarise(read_steps(run_dir), warmup, a.batch_size)
        results[name] = {"recipe": recipe_text(run[0], run[2], run[3]), **measured}
        atomic_write_json(out / "step_sizes.json", {"args": vars(a), "warmup_steps": warmup, "results": results})
        write_report(report, a, pairs, epochs, warmup, results, steps.done)
    print(f"\n[step_sizes] done: {len(results)} run(s) of {a.measure_steps} steps; table in {report}", flush=True)
    if len(runs) > 1:
        first, last = (results[run_name(r)]["rel_update_peak"] for r in (runs[0], runs[-1]))
        print_ratio(last / first, f"{run_name(runs[-1])} over {run_name(runs[0])}: backbone update/step after warm-up")


if __name__ == "__main__":
    main()
