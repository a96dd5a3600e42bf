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
Every step is the package's own CLI, run through the resumable ledger of bench.ledger
(``OUT/steps.json``): a finished step is skipped on a rerun and an interrupted pretraining resumes.

    .venv/bin/python -m bench.methods                          # 2,048 pairs, 320 steps: hours on 2 cores
    .venv/bin/python -m bench.methods --pairs 128 --probe-pairs 64 --steps 4 --num-pix 40 \\
        --batch-size 16 --vit vit_tiny_p8 --out runs/methods-smoke --tag methods-smoke   # smoke test, minutes

Writes the report ``docs/science/<tag>.md`` (the table, the budget, the commands; ``--reports`` puts it
elsewhere) and ``OUT/methods.json`` after every run, so a run stopped part-way leaves whole rows for what
finished (marked partial); a method's paired lens - standard row is added as soon as both of its runs
exist. After the runs, each backbone's random weights (``embed --checkpoint none``, seed ``--seed``) and
the --arch runs' init with only its BatchNorm statistics fitted (one epoch at lr 1e-12) are embedded and
probed the same way, the no-pretraining references, and every run is paired against each; a run on
another backbone (the ViT) is paired against the same method and augmentation on ``--arch``.
``--report-only`` rewrites both from OUT and runs nothing.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import statistics
import sys
from pathlib import Path

from hpc_lensiam.core.io import atomic_write_json, atomic_write_text

from .common import (
    PARAMS,
    REPORTS,
    RunLayout,
    commands_table,
    embed_cmd,
    hl,
    interval,
    launcher,
    machine_line,
    made_by,
    out_dir,
    parse_quick,
    print_ratio,
    probe_cmd,
    ridge,
    table,
    warmup_epochs,
)
from .ledger import Steps

AUGS = {"lens": "lens", "standard": "standard"}  # augmentation -> train --views
OPT_FLAGS = {"optimizer": "--optimizer", "base_lr": "--base-lr", "weight_decay": "--weight-decay"}
OPT_FLAGS.update(momentum="--momentum", lr_scaling="--lr-scaling")
RECIPE_ALIASES = {"sgd": "simsiam", "lars": "simclr"}  # SimSiam's SGD recipe, SimCLR's LARS recipe


def _bad(flag: str, text: str) -> SystemExit:
    print(f"hpc-lensiam: error: {flag}: {text}", file=sys.stderr)
    return SystemExit(2)


def optimizer_recipe(method: str, arch: str) -> dict:
    """The optimizer part of a method's recipe on ``arch``: optimizer, base lr, weight decay, momentum, lr rule."""
    from hpc_lensiam.models.methods import lr_scaling_rule, recipe
    from hpc_lensiam.train.config import TrainConfig

    out = {k: getattr(TrainConfig(), k) for k in OPT_FLAGS} | {
        k: v for k, v in recipe(method, arch).items() if k in OPT_FLAGS
    }
    return out | {"lr_scaling": lr_scaling_rule(method, out["optimizer"])}


class OverrideError(ValueError):
    """An optimizer override that names no recipe; the caller names its flag."""


def override_flags(method: str, arch: str, override: str) -> list:
    """``train`` flags of an optimizer override: ``+``-joined parts, each another method's optimizer recipe
    (``simclr``, or ``lars`` = SimCLR's LARS, ``sgd`` = SimSiam's SGD) or ``lrNx`` (the base lr times N)."""
    from hpc_lensiam.models.methods import METHODS

    opt, factor = optimizer_recipe(method, arch), 1.0
    for part in override.split("+"):
        if part.startswith("lr") and part.endswith("x"):
            try:
                factor *= float(part[2:-1])
            except ValueError:
                raise OverrideError(f"{part!r}: lrNx with a number N expected (lr8x, lr0.5x)") from None
        elif RECIPE_ALIASES.get(part, part) in METHODS:
            opt = optimizer_recipe(RECIPE_ALIASES.get(part, part), arch)
        else:
            raise OverrideError(f"@{part}: a method ({', '.join(sorted(METHODS))}), sgd, lars or lrNx expected")
    opt["base_lr"] = opt["base_lr"] * factor
    return [x for k, flag in OPT_FLAGS.items() for x in (flag, f"{opt[k]:g}" if k == "base_lr" else opt[k])]


def run_name(run: tuple) -> str:
    """``simsiam_lens_resnet18_lars_lr2x`` for (simsiam, lens, resnet18, lars+lr2x): its files' name."""
    method, aug, arch, override = run
    return f"{method}_{aug}_{arch}" + (f"_{override.replace('+', '_')}" if override else "")


def run_schedule(pairs: int, global_batch: int, steps: int) -> tuple[int, int]:
    """(steps per epoch, epochs) of a run of ``steps`` optimizer steps on ``pairs`` pairs (at least one step
    per epoch): the schedule spans the epochs, ``--max-steps`` cuts it."""
    steps_per_epoch = pairs // global_batch
    return steps_per_epoch, math.ceil(steps / steps_per_epoch)


def pretrain_cmd(
    shards, run_dir, run: tuple, batch_size: int, epochs: int, max_steps: int, seed: int, extra: list = ()
) -> list:
    """``train`` arguments of one run (method, augmentation, arch, override): the method's recipe (or the
    override's optimizer), ``epochs`` of schedule (warm-up a tenth, at least one epoch) cut at
    ``max_steps``, every step logged, ``extra`` flags before the override's. bench.step_sizes runs the first
    steps of the same command."""
    method, aug, arch, override = run
    train = ["train", "--data", shards, "--out", run_dir, "--method", method, "--views", AUGS[aug]]
    train += ["--arch", arch, "--batch-size", batch_size, "--epochs", epochs, "--max-steps", max_steps]
    train += ["--warmup-epochs", warmup_epochs(epochs), "--seed", seed, "--workers", 1]
    train += ["--no-zero-init-residual", "--log-every", 1, *extra]
    return train + (override_flags(method, arch, override) if override else [])


def parse_runs(text: str, arch: str) -> list[tuple]:
    """``--runs simsiam-lens@lars,simclr-lens@sgd,simsiam-standard@lars,simclr-standard``: (method, augmentation,
    arch, override); without ``@OVERRIDE`` a run takes its method's own recipe (e.g. the standard-augmentation
    twin of a lens run at a method's best step size, which pairs with it lens - standard)."""
    from hpc_lensiam.models.methods import METHODS

    runs = []
    for spec in (s.strip() for s in text.split(",") if s.strip()):
        head, _, override = spec.partition("@")
        method, _, aug = head.partition("-")
        if method not in METHODS or aug not in AUGS or (not override and "@" in spec):
            raise _bad("--runs", f"{spec!r}: METHOD-AUG[@OVERRIDE] expected (simsiam-lens@lars, simclr-standard)")
        if override:
            try:
                override_flags(method, arch, override)  # checked before anything runs
            except OverrideError as e:
                raise _bad("--runs", str(e)) from None
        runs.append((method, aug, arch, override))
    return runs


def planned_runs(a: argparse.Namespace, extra: list[tuple]) -> list[tuple]:
    """The runs in order: the --methods x --augs grid (none when --augs is ''), the ViT run(s), then
    --runs and --lr-sweep; a run named twice runs once."""
    runs = [(m, aug, a.arch, "") for m in a.methods.split(",") for aug in a.augs.split(",") if aug]
    if a.vit:
        runs += [("simsiam", aug, a.vit, "") for aug in a.vit_augs.split(",")]
    return list(dict.fromkeys(runs + extra))  # --runs may name a run --methods/--augs already make


def update_size(run_dir: Path) -> dict:
    """The relative backbone update per logged step (metrics.csv ``rel_update``): median and last, or None."""
    with open(run_dir / "metrics.csv", newline="") as f:
        vals = [float(r["rel_update"]) for r in csv.DictReader(f) if r.get("rel_update") not in (None, "", "nan")]
    vals = [v for v in vals if math.isfinite(v)]
    return {"median": statistics.median(vals), "last": vals[-1]} if vals else None


def train_stats(run_dir: Path, global_batch: int) -> dict:
    """Median seconds per optimizer step, the run's training minutes and final loss, from the trainer's
    metrics.csv (logged every step).

    A row's ``pairs_per_s`` is the global batch (in pairs: two images each) over that step's wall
    time, so a step took ``global_batch / pairs_per_s`` seconds; the first step (start-up) is left
    out, and the median, not the mean, is reported: a run paused or crowded for a while on a shared
    machine (SIGSTOP while CI ran, here) shows as a few huge steps that would dominate a mean.
    ``train_min`` sums every step's time (the first included) over all the parts of a resumed run (the
    ledger times only the part that finished it); a process's start-up and checkpoint saves are not in it.
    """
    with open(run_dir / "metrics.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f)]
    rates = [float(r["pairs_per_s"]) for r in rows[1:] or rows if float(r["pairs_per_s"]) > 0]
    step_s = float(statistics.median(global_batch / r for r in rates)) if rates else float("nan")
    last_rate = {r["step"]: float(r["pairs_per_s"]) for r in rows}  # a step redone after a resume: its last row
    return {
        "step_s": step_s,
        "train_min": sum(global_batch / r for r in last_rate.values() if r > 0) / 60,
        "final_loss": float(rows[-1]["loss"]),
        "z_std": float(rows[-1]["z_std"]),
        "steps": int(rows[-1]["step"]),
    }


def no_pretraining_rows(refs: list, seed: int) -> dict:
    """The report rows of the no-pretraining references whose probe exists: {prefix_arch: row}."""
    rows = {}
    for prefix, kind, arch, _, pj in refs:
        if pj.is_file():
            rows[f"{prefix}_{arch}"] = {"method": "none", "augmentation": f"{kind} (seed {seed})", "arch": arch}
            rows[f"{prefix}_{arch}"].update(ridge(pj))
    return rows


def paired_probe(steps: Steps, name: str, emb: Path, against: Path, pj: Path, run: bool) -> dict | None:
    """``hpc-lensiam probe --embeddings emb --against against`` as ledger step ``name`` (when ``run``
    and both files exist): the paired ridge R^2 differences on the same test systems, or None yet."""
    if run and emb.is_file() and against.is_file():
        steps.run(name, probe_cmd(emb, pj, against), [pj])
    return json.loads(pj.read_text())["paired_difference"]["ridge"] if pj.is_file() else None


def probe_curve(steps: Steps, lay: RunLayout, launch: list, name: str, probe_shards: Path, run: bool) -> list:
    """Embed and probe every periodic checkpoint of run ``name`` (``step_*.pt``, kept by ``--keep-last 0``):
    [{step, params: {p: {r2, ci95}}}] in step order, for what has been probed."""
    curve = []
    for ck in sorted((lay.run(name) / "checkpoints").glob("step_*.pt")):
        step = int(ck.stem.split("_")[1])
        emb, pj = lay.emb(f"curve_{name}_{step}"), lay.probe(f"curve_{name}_{step}")
        if run:
            steps.run(f"embed {name} step {step}", embed_cmd(launch, ck, probe_shards, emb), [emb])
            steps.run(f"probe {name} step {step}", probe_cmd(emb, pj), [pj])
        if pj.is_file():
            curve.append({"step": step, "params": ridge(pj)["params"]})
    return curve


def plot_curves(path: Path, results: dict, reference: dict) -> None:
    """Ridge R^2 (95% interval bars) vs pretraining step per run, one panel per parameter; the
    no-pretraining references as horizontal lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(PARAMS), figsize=(5 * len(PARAMS), 4), sharex=True)
    for ax, p in zip(axes, PARAMS):
        for name, r in results.items():
            if not r.get("curve"):
                continue
            x = [c["step"] for c in r["curve"]]
            y = [c["params"][p]["r2"] for c in r["curve"]]
            err = [[v - c["params"][p]["ci95"][0] for v, c in zip(y, r["curve"])]]
            err += [[c["params"][p]["ci95"][1] - v for v, c in zip(y, r["curve"])]]
            ax.errorbar(x, y, yerr=err, marker="o", ms=3, capsize=2, label=name)
        for (key, ref), style in zip(reference.items(), ("--", ":", "-.")):
            ax.axhline(ref["params"][p]["r2"], color="k", ls=style, lw=1, label=f"no pretraining: {key}")
        ax.set(title=f"ridge R^2 of {p} (held-out)", xlabel="pretraining step")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/methods", help="working folder (shards, runs, embeddings, methods.json)")
    ap.add_argument("--tag", default="methods", help="names the report, docs/science/<tag>.md")
    ap.add_argument("--reports", default=None, help="folder of the report (docs/science; --quick: OUT)")
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
    ap.add_argument("--augs", default="lens,standard", help="the grid's augmentations ('': no grid, only --runs)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--data", default=None, help="pretraining shards to use instead of simulating (--pairs: theirs)")
    ap.add_argument("--probe-data", default=None, help="held-out shards to use instead of simulating")
    ap.add_argument(
        "--runs",
        default="",
        help="extra runs on --arch: METHOD-AUG[@OVERRIDE],... where OVERRIDE is another method's optimizer recipe "
        "(simclr; lars = SimCLR's LARS, sgd = SimSiam's SGD) or lrNx, joined by +; without it the method's own "
        "recipe. A lens and a standard run at the same override pair lens - standard",
    )
    ap.add_argument("--lr-sweep", default="", help="lr factors (0.5,2): each --methods lens run again at lr x N")
    ap.add_argument("--curve-every", type=int, default=0, help="probe a checkpoint every N steps (0: final only)")
    ap.add_argument("--report-only", action="store_true", help="rewrite the report from OUT, run nothing")
    quick = dict(pairs=64, probe_pairs=48, steps=3, num_pix=40, batch_size=16, vit="", methods="simsiam")
    return parse_quick(ap, argv, dict(quick, out="runs/bench-quick/methods", tag="quick"))


def main(argv=None) -> None:
    a = parse_args(argv)
    out = out_dir(a.out)
    out.mkdir(parents=True, exist_ok=True)
    a.reports = a.reports or str(out if a.quick else REPORTS)
    report_md = Path(a.reports) / f"{a.tag}.md"
    lay = RunLayout(out)
    steps = Steps(out, "methods")
    shards, probe_shards = lay.shards("pretrain"), lay.shards("probe")
    for flag, given in (("--data", a.data), ("--probe-data", a.probe_data)):
        if given and not (out_dir(given) / "manifest.json").is_file():
            raise _bad(flag, f"{given}: a shard folder with manifest.json expected")
    if a.data:
        from hpc_lensiam.shards.manifest import read_manifest

        shards, a.pairs = out_dir(a.data), int(read_manifest(out_dir(a.data))["num_samples"])
    if a.probe_data:
        from hpc_lensiam.shards.manifest import read_manifest

        probe_shards, a.probe_pairs = out_dir(a.probe_data), int(read_manifest(out_dir(a.probe_data))["num_samples"])
    extra = parse_runs(a.runs, a.arch)
    try:
        sweep = [float(f) for f in a.lr_sweep.split(",") if f.strip()]
    except ValueError:
        raise _bad("--lr-sweep", f"{a.lr_sweep!r}: comma-separated lr factors expected (0.5,2)") from None
    extra += [(m, "lens", a.arch, f"lr{f:g}x") for m in a.methods.split(",") for f in sweep]
    sim = hl("simulate", "--physics", lay.sim_yaml(a.num_pix, write=not a.report_only), "--shard-size", 128)
    if not a.report_only:
        for what, d, n, seed, given in (
            ("pretraining", shards, a.pairs, a.seed, a.data),
            ("held-out probe", probe_shards, a.probe_pairs, a.seed + 1000, a.probe_data),
        ):
            if not given:
                cmd = sim + ["--out", d, "--pairs", n, "--seed", seed]
                steps.run(f"simulate {what} pairs", cmd, [d / "manifest.json"])

    global_batch = a.batch_size * a.nproc
    if a.pairs < global_batch:
        sys.exit(f"bench.methods: error: --pairs {a.pairs} < global batch {global_batch}")
    steps_per_epoch, epochs = run_schedule(a.pairs, global_batch, a.steps)
    launch = launcher(a.nproc)
    runs = planned_runs(a, extra)
    ckpt_every = ["--ckpt-every", a.curve_every, "--keep-last", 0] if a.curve_every else ["--ckpt-every", 10**6]
    # The no-pretraining references on the same probe pairs, and every run minus each on the same test
    # systems ("learned little" vs "learned nothing"): "random" is each backbone's random weights as
    # drawn (``embed --checkpoint none``, BatchNorm statistics at their init); "init" is the --arch
    # runs' own init (seed --seed, the SimSiam recipe), weights unmoved (lr 1e-12, no weight decay)
    # for one epoch so that only the BatchNorm statistics are fitted to the pretraining images.
    # They are cheap and come first, so that a partial report already has them.
    refs = []  # (file prefix, kind, arch, embeddings, probe)
    for arch in dict.fromkeys(arch for _, _, arch, _ in runs):
        emb, pj = lay.emb(f"random_{arch}"), lay.probe(f"random_{arch}")
        if not a.report_only:
            embed = embed_cmd(launch, "none", probe_shards, emb, "--arch", arch, "--seed", a.seed)
            steps.run(f"embed random-weight {arch}", embed, [emb])
            steps.run(f"probe random-weight {arch}", probe_cmd(emb, pj), [pj])
        refs.append(("random", "random weights", arch, emb, pj))
    init_dir = lay.run(f"init_{a.arch}")
    emb, pj = lay.emb(f"init_{a.arch}"), lay.probe(f"init_{a.arch}")
    if not a.report_only:
        init = ["train", "--data", shards, "--out", init_dir, "--method", "simsiam", "--views", "lens"]
        init += ["--arch", a.arch, "--batch-size", a.batch_size, "--epochs", 1, "--max-steps", steps_per_epoch]
        init += ["--base-lr", "1e-12", "--weight-decay", 0, "--seed", a.seed, "--workers", 1]
        init += ["--no-zero-init-residual", "--log-every", 1, "--ckpt-every", 10**6]
        steps.run(f"fit BatchNorm statistics of the {a.arch} init", launch + init, [lay.last(f"init_{a.arch}")])
        steps.run(f"embed {a.arch} init", embed_cmd(launch, init_dir, probe_shards, emb), [emb])
        steps.run(f"probe {a.arch} init", probe_cmd(emb, pj), [pj])
    refs.append(("init", "init, BatchNorm fitted", a.arch, emb, pj))
    reference = no_pretraining_rows(refs, a.seed)
    results, paired, curves = {}, {}, {}
    for method, aug, arch, override in runs:
        suffix = f"_{override.replace('+', '_')}" if override else ""
        name = run_name((method, aug, arch, override))
        run_dir, ckpt = lay.run(name), lay.last(name)
        emb, pj = lay.emb(name), lay.probe(name)
        if not a.report_only:
            run = (method, aug, arch, override)
            train = pretrain_cmd(shards, run_dir, run, a.batch_size, epochs, a.steps, a.seed, ckpt_every)
            steps.run(f"pretrain {name}", launch + train, [ckpt], resume_flag=ckpt.exists())
            steps.run(f"embed {name}", embed_cmd(launch, run_dir, probe_shards, emb), [emb])
            steps.run(f"probe {name}", probe_cmd(emb, pj), [pj])
        curves[name] = probe_curve(steps, lay, launch, name, probe_shards, not a.report_only) if a.curve_every else []
        if pj.is_file():
            stats = train_stats(run_dir, global_batch)
            results[name] = {"method": method, "augmentation": aug, "arch": arch, "override": override, **stats}
            results[name].update(rel_update=update_size(run_dir), curve=curves[name], **ridge(pj))
        # lens - standard as soon as both runs exist, at the same recipe (an override pairs with its twin)
        key = (method if arch == a.arch else f"{method}, {arch}") + (f" @{override}" if override else "")
        if key not in paired:
            lens, std = (lay.emb(run_name((method, aug, arch, override))) for aug in ("lens", "standard"))
            step, pj_pair = f"paired probe {key}: lens - standard", out / f"paired_{method}_{arch}{suffix}.json"
            d = paired_probe(steps, step, lens, std, pj_pair, not a.report_only)
            if d is not None:
                paired[key] = d
        # the report after every run, swaps included, so a stopped bench has whole rows for what finished
        atomic_write_json(out / "methods.json", {"args": vars(a), "results": results, "paired": paired})
        write_report(report_md, a, epochs, results, paired, steps.done, len(runs), reference)

    over_reference = {}
    for prefix, kind, arch, emb, _pj in refs:
        for name in (name for name, r in results.items() if r["arch"] == arch):
            step, pj_pair = f"paired probe {name} - {kind}", out / f"over_{prefix}_{name}.json"
            d = paired_probe(steps, step, lay.emb(name), emb, pj_pair, not a.report_only)
            if d is not None:
                over_reference[f"{name} - {kind}"] = d
    # a run on another backbone (the ViT) against the same method and augmentation on --arch
    across = {}
    for name, r in results.items():
        if r["arch"] == a.arch:
            continue
        if r.get("override"):
            continue
        base = f"{r['method']}_{r['augmentation']}_{a.arch}"
        step, pj_pair = f"paired probe {name} - {a.arch}", out / f"across_{name}.json"
        d = paired_probe(steps, step, lay.emb(name), lay.emb(base), pj_pair, not a.report_only)
        if d is not None:
            across[f"{name} - {base}"] = d
    report = {"args": vars(a), "results": results, "paired": paired, "reference": reference}
    report.update(over_reference=over_reference, across=across)
    atomic_write_json(out / "methods.json", report)
    write_report(report_md, a, epochs, results, paired, steps.done, len(runs), reference, over_reference, across)
    print(
        f"\n[methods] done: {len(results)} of {len(runs)} runs, {len(paired)} lens-standard pairs, "
        f"{len(reference)} no-pretraining reference(s); table in {report_md}",
        flush=True,
    )
    m = a.methods.split(",")[0]
    lens, std = (results.get(f"{m}_{aug}_{a.arch}") for aug in ("lens", "standard"))
    if lens and std:
        r2 = lens["params"]["theta_E"]["r2"] / std["params"]["theta_E"]["r2"]
        print_ratio(r2, f"{m} lens over standard augmentation, probe theta_E R^2")


def _r2_cells(r: dict) -> str:
    """The R^2 [95% interval] cells of one probe result, one per parameter of PARAMS."""
    return " | ".join(interval(r["params"][p]["r2"], r["params"][p]["ci95"]) for p in PARAMS)


def _delta_table(caption: str, first: str, rows: dict) -> list[str]:
    """A caption and a table of paired differences (delta [95% interval] per parameter), one row per entry."""
    cells = [
        [label, *(interval(d[p]["delta"], d[p]["ci95"], signed=True) for p in PARAMS)] for label, d in rows.items()
    ]
    return [caption, "", *table([first, *(f"delta {p}" for p in PARAMS)], cells)]


def _swap_section(a, results: dict, done: dict) -> list[str]:
    """The optimizer swaps and the lr sweep: each run's override and its cost (pretraining: the sum of its
    step times in metrics.csv, over every resumed part; embedding and probing: ledger wall seconds)."""
    swaps = {n: r for n, r in results.items() if r.get("override")}
    if not swaps:
        return []
    sweep = {f"lr{float(f):g}x" for f in str(getattr(a, "lr_sweep", "") or "").split(",") if f.strip()}

    def cost(name: str) -> tuple[float, float]:
        pre = 60 * results[name].get("train_min", 0.0)
        probe = sum(s["seconds"] for k, s in done.items() if k != f"pretrain {name}" and k.split(" ")[1:2] == [name])
        return pre, probe

    rows, total = [], [0.0, 0.0]
    for name, r in swaps.items():
        pre, probe = cost(name)
        flags = " ".join(str(x) for x in override_flags(r["method"], r["arch"], r["override"]))
        rows.append([name, f"`{flags}`", f"{pre / 60:.1f}", f"{probe / 60:.1f}"])
        if r["override"] in sweep:
            total[0], total[1] = total[0] + pre, total[1] + probe
    lines = ["", "## Optimizer swaps and lr sweep", ""]
    lines += table(["run", "train flags of the override", "pretraining min (steps)", "embed + probe min"], rows)
    if sweep:
        lines += [
            "",
            f"Cost of the lr sweep ({', '.join(sorted(sweep))} per method): {total[0] / 60:.1f} min of pretraining "
            f"and {total[1] / 60:.1f} min of embedding and probing on this machine (pretraining: the sum of its "
            "step times; embedding and probing: wall time of the ledger steps).",
        ]
    return lines


def _curve_section(path: Path, a, results: dict, reference: dict) -> list[str]:
    """Probe R^2 vs pretraining step for every run with a curve, beside the no-pretraining references; the PNG."""
    with_curve = {n: r for n, r in results.items() if r.get("curve")}
    if not with_curve:
        return []
    png = path.with_name(f"{path.stem}_curve.png")
    plot_curves(png, with_curve, reference)
    rows = [
        [n, c["step"], *(interval(c["params"][p]["r2"], c["params"][p]["ci95"]) for p in PARAMS)]
        for n, r in with_curve.items()
        for c in r["curve"]
    ]
    rows += [[f"no pretraining: {r['augmentation']}", "-", *_r2_cells(r).split(" | ")] for r in reference.values()]
    lines = ["", "## Probe R^2 vs pretraining step (same held-out pairs; 95% interval over test lens systems)", ""]
    lines += table(["run", "step", *(f"{p} R^2" for p in PARAMS)], rows)
    return lines + ["", f"![probe R^2 vs step]({png.name})"]


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
        machine_line(),
        "",
        f"Budget: {a.pairs} pretraining pairs ({a.num_pix}x{a.num_pix} px, hst preset), {a.steps} optimizer "
        f"steps of global batch {gb} ({epochs} epoch(s) of the schedule), seed {a.seed}, each method with its "
        f"recipe (docs/methods.md), zero_init_residual off. Probe: ridge on the frozen backbone features of "
        f"{a.probe_pairs} held-out pairs (both views), split by lens system; 95% bootstrap interval over the "
        f"test lens systems (1000 resamples, `hpc-lensiam probe`). Step time: seconds per "
        "optimizer step (median over steps, start-up excluded) measured by the trainer.",
        "",
    ]
    header = ["method", "augmentation", "backbone", *(f"{p} R^2" for p in PARAMS), "s/step", "final loss"]
    header.append("rel. update/step: median, last")
    rows = [
        [
            r["method"] + (f" @{r['override']}" if r.get("override") else ""),
            r["augmentation"],
            r["arch"],
            _r2_cells(r),
            f"{r['step_s']:.2f}",
            f"{r['final_loss']:.4f}",
            "{:.2e}, {:.2e}".format(r["rel_update"]["median"], r["rel_update"]["last"]) if r.get("rel_update") else "-",
        ]
        for r in results.values()
    ]
    rows += [["none", r["augmentation"], r["arch"], _r2_cells(r), "-", "-", "-"] for r in (reference or {}).values()]
    lines += table(header, rows)
    lines += [
        "",
        "rel. update/step: the relative backbone update |W_t - W_t-1| / |W_t-1| per optimizer step (the "
        "trainer's metrics.csv `rel_update`), the step size each recipe really takes; an optimizer swap "
        "(`@lars`: SimCLR's LARS recipe, `@sgd`: SimSiam's SGD recipe, `@lrNx`: the run's base lr times N) "
        "is named after its method.",
    ]
    lines += _swap_section(a, results, done) + _curve_section(path, a, results, reference or {})
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
    lines += commands_table("Commands (wall seconds of the invocation that ran them)", done, sort=True)
    lines += ["", f"Made by {made_by('methods')}.", ""]
    atomic_write_text(path, "\n".join(lines))


if __name__ == "__main__":
    main()
