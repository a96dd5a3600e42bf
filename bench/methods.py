"""Does lens augmentation help every SSL method? Probe R^2 per method x augmentation, same data and budget.

For each method (SimSiam, BYOL, VICReg, SimCLR) x {lens augmentation (LenSiam pairs, ``--views
lens``), standard augmentation (two SimSiam augmentations of view 1, ``--views standard``)} on a
resnet18, plus a LenSiam run of a ViT-small at native resolution (``--vit-augs lens,standard``: and
its standard-augmentation run): pretrain on the SAME shards
for the SAME number of optimizer steps with each method's recipe (``train --method M``), embed the
SAME held-out pairs, and probe them (ridge, split by lens system, as ``hpc-lensiam probe``). The
table gives the held-out R^2 of theta_E, e1 and gamma with a 95% bootstrap interval over the test
lens systems, the median step time (seconds per optimizer step, measured by the trainer, first step
excluded) and the final loss. Lens minus standard augmentation per method is a paired difference on
the same test lens systems (``hpc-lensiam probe --against``), with its 95% interval over systems.
Every step is the package's own CLI, run through the resumable ledger of bench/ledger.py
(``OUT/steps.json``): a finished step is skipped on a rerun and an interrupted pretraining resumes.

    .venv/bin/python bench/methods.py                          # 2,048 pairs, 320 steps: hours on 2 cores
    .venv/bin/python bench/methods.py --pairs 128 --probe-pairs 64 --steps 4 --num-pix 40 \\
        --batch-size 16 --vit vit_tiny_p8 --out runs/methods-smoke    # smoke test, minutes

Writes ``OUT/methods.md`` (the table, the budget, the commands) and ``OUT/methods.json`` after every
run, so a run stopped part-way leaves whole rows for what finished (marked partial); a method's paired
lens - standard row is added as soon as both of its runs exist. After the runs, each backbone's random
weights (``embed --checkpoint none``, seed ``--seed``) and the --arch runs' init with only its
BatchNorm statistics fitted (one epoch at lr 1e-12) are embedded and probed the same way, the
no-pretraining references, and every run is paired against each; a run on another backbone (the ViT)
is paired against the same method and augmentation on ``--arch``. ``--report-only`` rewrites both from
OUT and runs nothing.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import platform
import statistics
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
from ledger import BIN, Steps  # noqa: E402

from hpc_lensiam.core.io import atomic_write_json, atomic_write_text  # noqa: E402

PARAMS = ("theta_E", "e1", "gamma")
AUGS = {"lens": "lens", "standard": "standard"}  # augmentation -> train --views


def ridge(probe_json: Path) -> dict:
    """The ridge probe's R^2 and 95% interval per parameter, from ``hpc-lensiam probe --json``."""
    res = next(iter(json.loads(probe_json.read_text())["results"].values()))
    params = {p: {"r2": res["ridge"][p], "ci95": res["ridge_ci95"][p], "knn_r2": res["knn"][p]} for p in PARAMS}
    return {"params": params, "n_test_systems": res.get("systems_test")}


def train_stats(run_dir: Path, global_batch: int) -> dict:
    """Median seconds per optimizer step and final loss, from the trainer's metrics.csv (logged every step).

    A row's ``pairs_per_s`` is the global batch (in pairs: two images each) over that step's wall
    time, so a step took ``global_batch / pairs_per_s`` seconds; the first step (start-up) is left
    out, and the median, not the mean, is reported: a run paused or crowded for a while on a shared
    machine (SIGSTOP while CI ran, here) shows as a few huge steps that would dominate a mean.
    """
    with open(run_dir / "metrics.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f)]
    rates = [float(r["pairs_per_s"]) for r in rows[1:] or rows if float(r["pairs_per_s"]) > 0]
    step_s = float(statistics.median(global_batch / r for r in rates)) if rates else float("nan")
    return {
        "step_s": step_s,
        "final_loss": float(rows[-1]["loss"]),
        "z_std": float(rows[-1]["z_std"]),
        "steps": int(rows[-1]["step"]),
    }


def paired_probe(steps: Steps, name: str, emb: Path, against: Path, pj: Path, run: bool) -> dict | None:
    """``hpc-lensiam probe --embeddings emb --against against`` as ledger step ``name`` (when ``run``
    and both files exist): the paired ridge R^2 differences on the same test systems, or None yet."""
    if run and emb.is_file() and against.is_file():
        steps.run(name, [BIN / "hpc-lensiam", "probe", "--embeddings", emb, "--against", against, "--json", pj], [pj])
    return json.loads(pj.read_text())["paired_difference"]["ridge"] if pj.is_file() else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/methods", help="working folder (shards, runs, embeddings, report)")
    ap.add_argument("--pairs", type=int, default=2048, help="pretraining pairs (the same for every run)")
    ap.add_argument("--probe-pairs", type=int, default=512, help="held-out pairs to embed and probe")
    ap.add_argument("--steps", type=int, default=320, help="optimizer steps per run (the fixed budget)")
    ap.add_argument("--batch-size", type=int, default=64, help="per process")
    ap.add_argument("--nproc", type=int, default=1, help="torchrun processes per run (1: plain process)")
    ap.add_argument("--num-pix", type=int, default=110, help="image side, hst preset")
    ap.add_argument("--arch", default="resnet18")
    ap.add_argument("--vit", default="vit_small_p10", help="the ViT of the extra SimSiam-loss run(s) ('' for none)")
    ap.add_argument("--vit-augs", default="lens", help="augmentations of the ViT runs: lens, or lens,standard")
    ap.add_argument("--methods", default="simsiam,byol,vicreg,simclr")
    ap.add_argument("--augs", default="lens,standard")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--report-only", action="store_true", help="rewrite the report from OUT, run nothing")
    a = ap.parse_args()

    out = (REPO / a.out) if not Path(a.out).is_absolute() else Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    hl = BIN / "hpc-lensiam"
    steps = Steps(out, "methods")
    sim_yaml = out / "sim.yaml"
    shards, probe_shards = out / "shards" / "pretrain", out / "shards" / "probe"
    sim = [hl, "simulate", "--config", sim_yaml, "--shard-size", 128]
    if not a.report_only:
        sim_yaml.write_text(f"instrument:\n  num_pix: {a.num_pix}\n")
        for what, d, n, seed in (
            ("pretraining", shards, a.pairs, a.seed),
            ("held-out probe", probe_shards, a.probe_pairs, a.seed + 1000),
        ):
            steps.run(f"simulate {what} pairs", sim + ["--out", d, "--pairs", n, "--seed", seed], [d / "manifest.json"])

    global_batch = a.batch_size * a.nproc
    steps_per_epoch = a.pairs // global_batch
    if steps_per_epoch < 1:
        sys.exit(f"bench/methods.py: error: --pairs {a.pairs} < global batch {global_batch}")
    epochs = math.ceil(a.steps / steps_per_epoch)
    launch = (
        [BIN / "torchrun", "--standalone", "--nproc_per_node", a.nproc, "-m", "hpc_lensiam"] if a.nproc > 1 else [hl]
    )
    runs = [(m, aug, a.arch) for m in a.methods.split(",") for aug in a.augs.split(",")]
    if a.vit:
        runs += [("simsiam", aug, a.vit) for aug in a.vit_augs.split(",")]
    results, paired = {}, {}
    for method, aug, arch in runs:
        name = f"{method}_{aug}_{arch}"
        run_dir = out / f"run_{name}"
        ckpt = run_dir / "checkpoints" / "last.pt"
        emb, pj = out / f"emb_{name}.h5", out / f"probe_{name}.json"
        if not a.report_only:
            train = ["train", "--data", shards, "--out", run_dir, "--method", method, "--views", AUGS[aug]]
            train += ["--arch", arch, "--batch-size", a.batch_size, "--epochs", epochs, "--max-steps", a.steps]
            train += ["--warmup-epochs", max(1, epochs // 10), "--seed", a.seed, "--workers", 1]
            train += ["--no-zero-init-residual", "--log-every", 1, "--ckpt-every", 10**6]
            steps.run(f"pretrain {name}", launch + train, [ckpt], resume_flag=ckpt.exists())
            embed = ["embed", "--checkpoint", run_dir, "--data", probe_shards, "--out", emb]
            steps.run(f"embed {name}", launch + embed, [emb])
            steps.run(f"probe {name}", [hl, "probe", "--embeddings", emb, "--json", pj], [pj])
        if pj.is_file():
            stats = train_stats(run_dir, global_batch)
            results[name] = {"method": method, "augmentation": aug, "arch": arch, **stats, **ridge(pj)}
        key = method if arch == a.arch else f"{method}, {arch}"
        if key not in paired:  # as soon as both runs exist
            lens, std = out / f"emb_{method}_lens_{arch}.h5", out / f"emb_{method}_standard_{arch}.h5"
            step, pj_pair = f"paired probe {key}: lens - standard", out / f"paired_{method}_{arch}.json"
            d = paired_probe(steps, step, lens, std, pj_pair, not a.report_only)
            if d is not None:
                paired[key] = d
        # the report after every run, so a run stopped part-way has whole rows for what finished
        atomic_write_json(out / "methods.json", {"args": vars(a), "results": results, "paired": paired})
        write_report(out / "methods.md", a, epochs, results, paired, steps.done, len(runs))

    # The no-pretraining references on the same probe pairs, and every run minus each on the same test
    # systems ("learned little" vs "learned nothing"): "random" is each backbone's random weights as
    # drawn (``embed --checkpoint none``, BatchNorm statistics at their init); "init" is the --arch
    # runs' own init (seed --seed, the SimSiam recipe), weights unmoved (lr 1e-12, no weight decay)
    # for one epoch so that only the BatchNorm statistics are fitted to the pretraining images.
    reference, over_reference, refs = {}, {}, []  # refs: (file prefix, kind, arch, embeddings, probe)
    for arch in dict.fromkeys(arch for _, _, arch in runs):
        emb, pj = out / f"emb_random_{arch}.h5", out / f"probe_random_{arch}.json"
        if not a.report_only:
            embed = ["embed", "--checkpoint", "none", "--arch", arch, "--seed", a.seed]
            steps.run(f"embed random-weight {arch}", launch + embed + ["--data", probe_shards, "--out", emb], [emb])
            steps.run(f"probe random-weight {arch}", [hl, "probe", "--embeddings", emb, "--json", pj], [pj])
        refs.append(("random", "random weights", arch, emb, pj))
    init_dir = out / f"run_init_{a.arch}"
    emb, pj = out / f"emb_init_{a.arch}.h5", out / f"probe_init_{a.arch}.json"
    if not a.report_only:
        init = ["train", "--data", shards, "--out", init_dir, "--method", "simsiam", "--views", "lens"]
        init += ["--arch", a.arch, "--batch-size", a.batch_size, "--epochs", 1, "--max-steps", steps_per_epoch]
        init += ["--base-lr", "1e-12", "--weight-decay", 0, "--seed", a.seed, "--workers", 1]
        init += ["--no-zero-init-residual", "--log-every", 1, "--ckpt-every", 10**6]
        steps.run(
            f"fit BatchNorm statistics of the {a.arch} init", launch + init, [init_dir / "checkpoints" / "last.pt"]
        )
        embed = ["embed", "--checkpoint", init_dir, "--data", probe_shards, "--out", emb]
        steps.run(f"embed {a.arch} init", launch + embed, [emb])
        steps.run(f"probe {a.arch} init", [hl, "probe", "--embeddings", emb, "--json", pj], [pj])
    refs.append(("init", "init, BatchNorm fitted", a.arch, emb, pj))
    for prefix, kind, arch, emb, pj in refs:
        if pj.is_file():
            label = f"{kind} (seed {a.seed})"
            reference[f"{prefix}_{arch}"] = {"method": "none", "augmentation": label, "arch": arch, **ridge(pj)}
        for name in (name for name, r in results.items() if r["arch"] == arch):
            step, pj_pair = f"paired probe {name} - {kind}", out / f"over_{prefix}_{name}.json"
            d = paired_probe(steps, step, out / f"emb_{name}.h5", emb, pj_pair, not a.report_only)
            if d is not None:
                over_reference[f"{name} - {kind}"] = d
    # a run on another backbone (the ViT) against the same method and augmentation on --arch
    across = {}
    for name, r in results.items():
        if r["arch"] == a.arch:
            continue
        base = f"{r['method']}_{r['augmentation']}_{a.arch}"
        step, pj_pair = f"paired probe {name} - {a.arch}", out / f"across_{name}.json"
        d = paired_probe(steps, step, out / f"emb_{name}.h5", out / f"emb_{base}.h5", pj_pair, not a.report_only)
        if d is not None:
            across[f"{name} - {base}"] = d
    report = {"args": vars(a), "results": results, "paired": paired, "reference": reference}
    report.update(over_reference=over_reference, across=across)
    atomic_write_json(out / "methods.json", report)
    write_report(
        out / "methods.md", a, epochs, results, paired, steps.done, len(runs), reference, over_reference, across
    )
    print(
        f"\n[methods] done: {len(results)} of {len(runs)} runs, {len(paired)} lens-standard pairs, "
        f"{len(reference)} no-pretraining reference(s); table in {out / 'methods.md'}",
        flush=True,
    )


def _r2_cells(r: dict) -> str:
    """The R^2 [95% interval] cells of one probe result, one per parameter of PARAMS."""
    return " | ".join(
        f"{r['params'][p]['r2']:.3f} [{r['params'][p]['ci95'][0]:.3f}, {r['params'][p]['ci95'][1]:.3f}]" for p in PARAMS
    )


def _delta_table(caption: str, first: str, rows: dict) -> list[str]:
    """A caption and a table of paired differences (delta [95% interval] per parameter), one row per entry."""
    lines = [caption, "", f"| {first} | " + " | ".join(f"delta {p}" for p in PARAMS) + " |", "|---|---|---|---|"]
    return lines + [
        f"| {label} | "
        + " | ".join(f"{d[p]['delta']:+.3f} [{d[p]['ci95'][0]:+.3f}, {d[p]['ci95'][1]:+.3f}]" for p in PARAMS)
        + " |"
        for label, d in rows.items()
    ]


def write_report(
    path: Path,
    a,
    epochs: int,
    results: dict,
    paired: dict,
    done: dict,
    n_runs: int,
    reference: dict | None = None,
    over_reference: dict | None = None,
    across: dict | None = None,
) -> None:
    gb = a.batch_size * a.nproc
    lines = [
        "# Lens augmentation x SSL method: held-out probe R^2 at a fixed budget",
        "",
        *([f"**Partial: {len(results)} of {n_runs} runs finished so far.**", ""] if len(results) < n_runs else []),
        f"Machine: {platform.machine()}, {os.cpu_count()} CPU cores; Python {platform.python_version()}.",
        "",
        f"Budget: {a.pairs} pretraining pairs ({a.num_pix}x{a.num_pix} px, hst preset), {a.steps} optimizer "
        f"steps of global batch {gb} ({epochs} epoch(s) of the schedule), seed {a.seed}, each method with its "
        f"recipe (docs/methods.md), zero_init_residual off. Probe: ridge on the frozen backbone features of "
        f"{a.probe_pairs} held-out pairs (both views), split by lens system; 95% bootstrap interval over the "
        f"test lens systems (1000 resamples, `hpc-lensiam probe`). Step time: seconds per "
        "optimizer step (median over steps, start-up excluded) measured by the trainer.",
        "",
        "| method | augmentation | backbone | theta_E R^2 | e1 R^2 | gamma R^2 | s/step | final loss |",
        "|---|---|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['method']} | {r['augmentation']} | {r['arch']} | {_r2_cells(r)} | "
        f"{r['step_s']:.2f} | {r['final_loss']:.4f} |"
        for r in results.values()
    ]
    lines += [
        f"| none | {r['augmentation']} | {r['arch']} | {_r2_cells(r)} | - | - |" for r in (reference or {}).values()
    ]
    lines += [""] + _delta_table(
        "Lens minus standard augmentation per method: paired ridge R^2 difference on the same test lens "
        "systems, 95% interval over systems (`hpc-lensiam probe --against`; one pretraining seed each, so "
        "training noise is not in the interval):",
        "method",
        paired,
    )
    if over_reference:
        lines += [""] + _delta_table(
            "Each run minus the no-pretraining references of its backbone, paired on the same test lens systems: "
            "what pretraining added over what the architecture alone gives a ridge probe. Random weights: "
            "`hpc-lensiam embed --checkpoint none` (BatchNorm statistics at their init); init, BatchNorm fitted: "
            "the SimSiam runs' own init, trained one epoch at lr 1e-12 so that only the BatchNorm statistics "
            "move:",
            "run",
            over_reference,
        )
    if across:
        lines += [""] + _delta_table(
            f"Across backbones: a run minus the same method and augmentation on {a.arch}, paired on the same "
            "test lens systems:",
            "runs",
            across,
        )
    lines += [
        "",
        "## Commands (wall seconds of the invocation that ran them)",
        "",
        "| step | seconds | command |",
        "|---|---|---|",
    ]
    lines += [f"| {name} | {s['seconds']:.0f} | `{s['command']}` |" for name, s in sorted(done.items())]
    argv = " ".join(x for x in sys.argv[1:] if x != "--report-only")
    lines += ["", f"Made by `.venv/bin/python bench/methods.py {argv}`.", ""]
    atomic_write_text(path, "\n".join(lines))


if __name__ == "__main__":
    main()
