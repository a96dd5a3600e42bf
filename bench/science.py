"""The paper's experiment with seeds and intervals, at the scale this machine allows: docs/science/<tag>.md.

Arms, each fine-tuned with every ``--finetune-seeds`` seed on the same downstream split:
  LenSiam, baseline SimSiam     pretrained with every ``--pretrain-seeds`` seed (same pairs, same recipe)
  random init                   the same arch from random weights, full fine-tuning
  frozen random                 random weights frozen, only the head trained (how much is architecture)
  LenSiam (survey pretraining)  with ``--survey-pretraining``: LenSiam pairs of the survey family
ImageNet-supervised weights (the paper's third row) cannot be downloaded here: that row is not run.

Downstream sets (``--downstream-family``): ``paper`` = the same simulator family at the euclid preset
(another instrument; theta_E regression), ``survey`` = the independent survey family (``simulate --family survey``)
(another world; theta_E regression on lenses and lens finding, ``finetune --task classify --target
is_lens``).

The probe (ridge/k-NN on a held-out paper-family set, intervals over lens systems) compares LenSiam and
SimSiam of each pretraining seed, and over all pretraining seeds together. Fine-tuning differences use
the hierarchical paired bootstrap of :mod:`hpc_lensiam.evaluation.stats` with pretraining and fine-tuning seeds
as two resampled levels (a backbone's fine-tunings share its luck), with the test images.

Every step is the package's own CLI, so the report's commands are what a user runs, and every step is
resumable: a step whose command already succeeded (``OUT/steps.json``) and whose outputs exist is
skipped; training resumes from its last checkpoint; ``finetune --seeds --resume`` keeps finished seeds.
The report is rewritten after every probe and fine-tuning step from whatever has finished, so the
protocol may be run in parts (``--report-only`` rewrites it from OUT without running anything).

    .venv/bin/python -m bench.science --tag protocol            # the defaults: hours of 2 CPU cores
    .venv/bin/python -m bench.science --pairs 64 --probe-pairs 64 --n-train 40 --n-test 40 --num-pix 48 \\
        --steps 2 --finetune-epochs 1 --out runs/science-smoke --tag smoke   # smoke test, minutes
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import NamedTuple

from hpc_lensiam.core.io import atomic_write_text
from hpc_lensiam.evaluation.stats import hierarchical_paired_difference, seed_summary
from hpc_lensiam.simulate.config import FAMILIES

from .common import (
    BIN,
    REPO,
    REPORTS,
    RunLayout,
    commands_table,
    hl,
    load,
    machine_line,
    made_by,
    on_ranks,
    out_dir,
    parse_quick,
    print_ratio,
    probe_cmd,
    warmup_epochs,
)
from .ledger import Steps

NPROC = 2
# name -> (pretraining run kind or None for random weights, frozen backbone)
ARMS = {
    "LenSiam": ("lensiam", False),
    "SimSiam": ("simsiam", False),
    "random init": (None, False),
    "frozen random": (None, True),
    "LenSiam (survey pretraining)": ("lensiam-survey", False),
}
PAPER = {"LenSiam": "0.586", "SimSiam": "0.426", "random init": "0.360 was ImageNet-supervised (not downloadable here)"}
DIFFERENCES = [
    ("LenSiam", "SimSiam"),
    ("LenSiam", "random init"),
    ("SimSiam", "random init"),
    ("random init", "frozen random"),
    ("LenSiam (survey pretraining)", "LenSiam"),
]


def parse_ints(text: str) -> list[int]:
    return [int(s) for s in text.split(",") if s.strip()]


def tasks(families: list[str]) -> list[dict]:
    """Downstream tasks: (family, task, target, train/test shard names, simulate flags)."""
    out = []
    if "paper" in families:
        out.append(
            dict(
                key="paper_theta_E",
                family="paper",
                task="regress",
                target="theta_E",
                sim=["--preset", "euclid"],
                title="theta_E regression, same simulator family at the euclid preset (another instrument)",
            )
        )
    if "survey" in families:
        out.append(
            dict(
                key="survey_theta_E",
                family="survey",
                task="regress",
                target="theta_E",
                sim=["--preset", "euclid", "--family", "survey", "--lens-fraction", "1"],
                title="theta_E regression on lenses of the independent survey family (another world)",
            )
        )
        out.append(
            dict(
                key="survey_is_lens",
                family="survey",
                task="classify",
                target="is_lens",
                sim=["--preset", "euclid", "--family", "survey", "--lens-fraction", "0.5"],
                title="lens finding (is_lens) on the independent survey family, half non-lenses",
            )
        )
    return out


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/science-protocol", help="working folder (shards, runs, embeddings)")
    ap.add_argument("--tag", default="protocol", help="names docs/science/<tag>.md and its figures")
    ap.add_argument("--reports", default=None, help="folder of the report and figures (docs/science; --quick: OUT)")
    ap.add_argument("--pairs", type=int, default=4096, help="LenSiam pretraining pairs")
    ap.add_argument("--probe-pairs", type=int, default=1024, help="held-out pairs for embeddings/probe")
    ap.add_argument("--n-train", type=int, default=1000)
    ap.add_argument("--n-test", type=int, default=1000)
    ap.add_argument("--arch", default="resnet18")
    ap.add_argument("--num-pix", type=int, default=110, help='image side (0.05"/px hst; 0.1"/px euclid)')
    ap.add_argument("--epochs", type=int, default=10, help="pretraining epochs")
    ap.add_argument("--steps", type=int, default=None, help="stop pretraining after N steps (smoke tests)")
    ap.add_argument("--batch-size", type=int, default=32, help="per process; 2 processes")
    ap.add_argument("--finetune-epochs", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0, help="data seed: every simulated set derives from it")
    ap.add_argument("--pretrain-seeds", default="0,1", help="pretraining seeds per method (>= 2)")
    ap.add_argument("--finetune-seeds", default="0,1,2", help="fine-tuning seeds per backbone (>= 3)")
    ap.add_argument(
        "--downstream-family",
        nargs="+",
        choices=FAMILIES,
        default=["paper"],
        help="paper: the euclid set of the pretraining simulator; survey: the independent survey family",
    )
    ap.add_argument("--survey-pretraining", action="store_true", help="add LenSiam pretrained on survey pairs")
    ap.add_argument(
        "--precision",
        choices=("fp32", "bf16", "auto"),
        default="fp32",
        help="pretraining precision; auto: bf16 if --precision-check finds it within seed noise",
    )
    ap.add_argument(
        "--precision-check",
        type=int,
        default=0,
        metavar="STEPS",
        help="first pretrain LenSiam for STEPS steps in fp32 (seed 0) and bf16 (seeds 0, 1) and probe: "
        "is the bf16 - fp32 difference within the seed-to-seed difference?",
    )
    ap.add_argument(
        "--zero-init-residual",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="pretraining init (off: torchvision's; see docs/results.md for why)",
    )
    ap.add_argument("--ckpt-every", type=int, default=0, help="periodic checkpoints every N steps (0: none)")
    ap.add_argument("--curve", action="store_true", help="embed + probe every periodic checkpoint (first seed)")
    ap.add_argument("--report-only", action="store_true", help="rewrite the report from OUT, run nothing")
    quick = dict(pairs=64, probe_pairs=64, n_train=40, n_test=40, num_pix=48, steps=2, finetune_epochs=1)
    a = parse_quick(ap, argv, dict(quick, out="runs/bench-quick/science", tag="quick"))
    a.pretrain_seeds, a.finetune_seeds = parse_ints(a.pretrain_seeds), parse_ints(a.finetune_seeds)
    if a.precision == "auto" and not a.precision_check:
        ap.error("--precision auto needs --precision-check STEPS")
    return a


def main(argv=None) -> None:
    a = parse_args(argv)
    out = out_dir(a.out)
    a.reports = a.reports or str(out if a.quick else REPORTS)
    report = Path(a.reports) / f"{a.tag}.md"
    if a.report_only:
        write_report(report, a, out, Steps(out, "science").done)
        return
    out.mkdir(parents=True, exist_ok=True)
    steps = Steps(out, "science")
    t_start = time.perf_counter()
    lay = RunLayout(out)
    sim = [BIN / "mpiexec", "-n", NPROC, *hl("simulate", "--physics", lay.sim_yaml(a.num_pix))]

    def simulate(name: str, n: int, seed_offset: int, flags: list) -> Path:
        d = lay.shards(name)
        shard = 128 if n >= 256 else max(8, n // 8)  # 128 as in runs A-C (same bytes); small sets: >= 8 shards
        steps.run(
            f"simulate {name}",
            sim + ["--shard-size", shard, "--out", d, "--pairs", n, "--seed", a.seed + seed_offset, *flags],
            [d / "manifest.json"],
        )
        return d

    # ---- data: pretraining pairs, the held-out probe set, the downstream sets
    shards = {"lensiam": simulate("lensiam", a.pairs, 0, []), "probe": simulate("probe", a.probe_pairs, 1000, [])}
    if a.survey_pretraining:
        shards["lensiam-survey"] = simulate("lensiam_survey", a.pairs, 4000, ["--family", "survey"])
    downstream = tasks(a.downstream_family)
    for i, t in enumerate(downstream):
        single = ["--samples", "single", *t["sim"]]
        t["train"] = simulate(f"{t['key']}_train", int(a.n_train * 1.25), 2000 + 10 * i, single)
        t["test"] = simulate(f"{t['key']}_test", a.n_test, 3000 + 10 * i, single)

    # ---- bf16 autocast is 1.78x faster on this CPU: use it only if it measures the same as fp32
    zi = [] if a.zero_init_residual else ["--no-zero-init-residual"]
    if a.precision_check:
        check = precision_check(steps, a, out, shards, zi)
        if a.precision == "auto":
            a.precision = "bf16" if check["within_seed_noise"] else "fp32"
            print(
                f"[science] precision check: bf16-fp32 {check['max_precision_diff']:.3f} vs seed-to-seed "
                f"{check['max_seed_diff']:.3f}: pretraining in {a.precision}",
                flush=True,
            )
        write_report(report, a, out, steps.done)

    # ---- per pretraining seed: pretrain every method, embed, probe, UMAP, export, then fine-tune its
    # backbones (random-weight arms with the first seed), so a partial run already has whole tables
    ms = (["--max-steps", a.steps] if a.steps else []) + (["--ckpt-every", a.ckpt_every] if a.ckpt_every else [])
    kinds = ["lensiam", "simsiam"] + (["lensiam-survey"] if a.survey_pretraining else [])
    seeds = ",".join(map(str, a.finetune_seeds))
    for ps in a.pretrain_seeds:
        for kind in kinds:
            run_dir, ckpt = lay.run(f"{kind}_s{ps}"), lay.last(f"{kind}_s{ps}")
            steps.run(
                f"pretrain {kind} seed {ps}",
                pretrain_cmd(
                    a,
                    shards["lensiam-survey" if kind == "lensiam-survey" else "lensiam"],
                    run_dir,
                    kind.split("-")[0],
                    ps,
                    a.precision,
                    [*zi, *ms],
                ),
                [ckpt],
                resume_flag=ckpt.exists(),
            )
            emb = lay.emb(f"{kind}_s{ps}")
            steps.run(
                f"embed {kind} seed {ps}",
                embed_cmd(ckpt, shards["probe"], emb),
                [emb],
            )
            if ps == a.pretrain_seeds[0] and a.curve:
                learning_curve(steps, run_dir, shards["probe"], out, kind)
            if ps == a.pretrain_seeds[0]:
                png = Path(a.reports) / f"umap_{kind}_{a.tag}.png"
                coords = out / f"umap_{kind}.csv"  # the coordinates beside the run, not in docs/
                cmd = hl("umap", "--embeddings", emb, "--out", png, "--seed", 0, "--coords", coords)
                steps.run(f"umap {kind} seed {ps}", cmd, [png])
            backbone = out / f"backbone_{kind}_s{ps}.pt"
            steps.run(f"export {kind} seed {ps}", hl("export", "--checkpoint", ckpt, "--out", backbone), [backbone])
        pj = lay.probe(f"s{ps}")
        steps.run(
            f"probe LenSiam vs SimSiam seed {ps}",
            probe_cmd(lay.emb(f"lensiam_s{ps}"), pj, lay.emb(f"simsiam_s{ps}")),
            [pj],
        )
        write_report(report, a, out, steps.done)

        # fine-tuning: every task x arm, all fine-tuning seeds in one resumable call
        for t in downstream:
            for arm, (kind, frozen) in ARMS.items():
                if (kind is not None and kind not in kinds) or (kind is None and ps != a.pretrain_seeds[0]):
                    continue
                backbone = out / f"backbone_{kind}_s{ps}.pt" if kind else "none"
                fj = finetune_json(out, t["key"], arm, ps if kind else None)
                task_flags = ["--task", "classify"] if t["task"] == "classify" else []
                steps.run(
                    f"finetune {t['key']} {arm}" + (f" pretrain seed {ps}" if kind else ""),
                    [
                        *hl("finetune"),
                        "--backbone",
                        backbone,
                        "--arch",
                        a.arch,
                        "--train",
                        t["train"],
                        "--test",
                        t["test"],
                        *task_flags,
                        "--target",
                        t["target"],
                        "--n-train",
                        a.n_train,
                        "--n-test",
                        a.n_test,
                        "--epochs",
                        a.finetune_epochs,
                        "--seeds",
                        seeds,
                        *(["--freeze-backbone"] if frozen else []),
                        "--json",
                        fj,
                    ],
                    [fj],
                    resume_flag=True,
                )
                write_report(report, a, out, steps.done)
    first = load(lay.probe(f"s{a.pretrain_seeds[0]}"))
    if first:
        lensiam, simsiam = (r["ridge"]["theta_E"] for r in first["results"].values())
        print_ratio(
            lensiam / simsiam, f"LenSiam over SimSiam probe theta_E R^2, pretraining seed {a.pretrain_seeds[0]}"
        )
    shown_report = report.relative_to(REPO) if report.is_relative_to(REPO) else report
    print(
        f"\n[science] done in {(time.perf_counter() - t_start) / 60:.1f} min; results in {shown_report}",
        flush=True,
    )


VIEWS = {"lensiam": "lens", "simsiam": "standard"}  # the protocol's run kinds -> train --views


def pretrain_cmd(a, data: Path, run_dir: Path, kind: str, seed: int, precision: str, extra: list) -> list:
    """One pretraining run of the protocol (the protocol's arch, epochs, batch and warm-up); ``kind``
    lensiam (the stored lens pairs, ``--views lens``) or simsiam (standard augmentations)."""
    train = ["train", "--data", data, "--out", run_dir, "--views", VIEWS[kind], "--arch", a.arch, "--epochs", a.epochs]
    train += ["--batch-size", a.batch_size, "--seed", seed, "--precision", precision]
    return on_ranks(NPROC, *train, "--warmup-epochs", warmup_epochs(a.epochs), *extra)


def embed_cmd(ckpt: Path, data: Path, emb: Path) -> list:
    """``hpc-lensiam embed`` of ``data`` with checkpoint ``ckpt`` on NPROC torchrun processes."""
    return on_ranks(NPROC, "embed", "--checkpoint", ckpt, "--data", data, "--out", emb)


def precision_check(steps: Steps, a, out: Path, shards: dict, zi: list) -> dict:
    """LenSiam for ``--precision-check`` steps: fp32 seed 0, bf16 seeds 0 and 1, probed on the held-out set.

    bf16 is used when the largest |bf16 - fp32| probe difference (same seed) is no larger than the
    largest |seed 0 - seed 1| difference (both bf16): precision then changes the numbers less than a seed."""
    probes = {}
    for prec, ps in (("fp32", 0), ("bf16", 0), ("bf16", 1)):
        run_dir = out / f"check_{prec}_s{ps}"
        ckpt = run_dir / "checkpoints" / "last.pt"
        steps.run(
            f"precision check: pretrain lensiam {prec} seed {ps}",
            pretrain_cmd(a, shards["lensiam"], run_dir, "lensiam", ps, prec, [*zi, "--max-steps", a.precision_check]),
            [ckpt],
            resume_flag=ckpt.exists(),
        )
        emb, pj = out / f"check_{prec}_s{ps}.h5", out / f"check_{prec}_s{ps}.json"
        steps.run(
            f"precision check: embed {prec} seed {ps}",
            embed_cmd(ckpt, shards["probe"], emb),
            [emb],
        )
        steps.run(f"precision check: probe {prec} seed {ps}", probe_cmd(emb, pj), [pj])
        probes[(prec, ps)] = next(iter(load(pj)["results"].values()))["ridge"]
    return precision_verdict(probes)


def precision_verdict(probes: dict) -> dict:
    """Compare the (fp32, 0), (bf16, 0) and (bf16, 1) ridge R^2 dictionaries."""
    prec = {p: probes[("bf16", 0)][p] - probes[("fp32", 0)][p] for p in probes[("fp32", 0)]}
    seed = {p: probes[("bf16", 1)][p] - probes[("bf16", 0)][p] for p in probes[("fp32", 0)]}
    mp, msd = max(abs(v) for v in prec.values()), max(abs(v) for v in seed.values())
    return {
        "probes": probes,
        "precision_diff": prec,
        "seed_diff": seed,
        "max_precision_diff": mp,
        "max_seed_diff": msd,
        "within_seed_noise": mp <= msd,
    }


def learning_curve(steps: Steps, run_dir: Path, probe_shards: Path, out: Path, kind: str) -> None:
    """Embed and probe every periodic checkpoint: lens physics in the features vs pretraining step."""
    for ck in sorted((run_dir / "checkpoints").glob("step_*.pt")):
        step = int(ck.stem.split("_")[1])
        emb, pj = out / f"curve_{kind}_{step}.h5", out / f"curve_{kind}_{step}.json"
        steps.run(
            f"embed {kind} step {step}",
            embed_cmd(ck, probe_shards, emb),
            [emb],
        )
        steps.run(f"probe {kind} step {step}", probe_cmd(emb, pj), [pj])


def finetune_json(out: Path, task_key: str, arm: str, ps) -> Path:
    """Where the multi-seed fine-tuning report of one arm (and pretraining seed) on one task lives."""
    slug = arm.lower().replace(" ", "-").replace("(", "").replace(")", "")
    return out / (f"finetune_{task_key}_{slug}" + (f"_s{ps}.json" if ps is not None else ".json"))


# ---------------------------------------------------------------------------------------- the report
class Unit(NamedTuple):
    """One fine-tuning run of an arm: what the report tables and the paired differences read."""

    value: float  # the task's metric (R^2 or ROC AUC)
    targets: list  # test targets
    scores: list  # test predictions (or scores)
    test_sha: str | None  # the test set's manifest hash: runs pair only on the same test set
    metric: str  # "r2" | "auc"
    tpr_1e2: float | None  # lens finding: TPR at FPR 1e-2


def collect_units(out: Path, task_key: str, arm: str, pretrain_seeds: list[int]) -> dict:
    """{(pretraining seed or None, fine-tuning seed): :class:`Unit`}."""
    kind = ARMS[arm][0]
    units = {}
    for ps in pretrain_seeds if kind else [None]:
        rep = load(finetune_json(out, task_key, arm, ps))
        if rep is None:
            continue
        metric = rep.get("metric", "r2")
        for r in rep["runs"]:
            scores = r.get("test_scores", r.get("test_predictions"))
            tpr = (r.get("tpr_at_fpr") or {}).get("0.01", {}).get("tpr")
            sha = rep.get("test_manifest_sha256")
            units[(ps, r["seed"])] = Unit(r[metric], rep["test_targets"], scores, sha, metric, tpr)
    return units


def paired(units_a: dict, units_b: dict):
    """Unit keys both arms have; a random-weights arm (pretraining seed None) pairs by fine-tuning seed."""
    keys = []
    for ps, fs in units_a:
        kb = (ps, fs) if (ps, fs) in units_b else (None, fs)
        if kb in units_b and units_a[(ps, fs)].test_sha == units_b[kb].test_sha:
            keys.append(((ps, fs), kb))
    return keys


def pooled_probe_difference(probe_reports: list) -> dict | None:
    """LenSiam - SimSiam ridge R^2 over all pretraining seeds, the seeds resampled with the test systems.

    Each seed's probe report holds both methods' held-out predictions on the same test systems;
    stacked, the pretraining seeds are the seed level of :func:`hierarchical_paired_difference`.
    None with fewer than 2 seeds or if the seeds' test systems differ.
    """
    import numpy as np

    if len(probe_reports) < 2:
        return None
    pairs = [list(pr["results"].values()) for pr in probe_reports]
    first = pairs[0][0]
    if any(r["test_keys"] != first["test_keys"] for pair in pairs for r in pair):
        return None
    out = {}
    for p in ("theta_E", "e1", "gamma"):
        pa = np.asarray([a["test_predictions"]["ridge"][p] for a, _ in pairs])
        pb = np.asarray([b["test_predictions"]["ridge"][p] for _, b in pairs])
        y = first["test_targets"][p]
        out[p] = hierarchical_paired_difference(y, pa, pb, "r2", first["test_pair_id"], n_boot=2000, seed=0)
    return out


def write_report(path: Path, a, out: Path, done: dict) -> None:
    """The whole report from the files in OUT: finished parts filled in, the rest marked not run yet."""
    import numpy as np

    ps_list = a.pretrain_seeds
    checks = {
        (prec, ps): load(out / f"check_{prec}_s{ps}.json") for prec, ps in (("fp32", 0), ("bf16", 0), ("bf16", 1))
    }
    verdict = (
        precision_verdict({k: next(iter(c["results"].values()))["ridge"] for k, c in checks.items()})
        if all(checks.values())
        else None
    )
    if a.precision == "auto" and verdict:  # --report-only: the check decided
        a.precision = "bf16" if verdict["within_seed_noise"] else "fp32"
    lines = [
        "# LenSiam vs SimSiam vs random init, with seeds and intervals",
        "",
        machine_line(),
        "",
        f"Set-up: {a.pairs} LenSiam pairs ({a.num_pix}x{a.num_pix} px, hst preset), {a.arch}, {a.epochs} epochs"
        + (f" (stopped at {a.steps} steps)" if a.steps else "")
        + f", batch {a.batch_size} x {NPROC} processes, "
        f"{a.precision}, zero_init_residual={'on' if a.zero_init_residual else 'off'}; pretraining seeds "
        f"{ps_list}, fine-tuning seeds {a.finetune_seeds}; probe on {a.probe_pairs} held-out pairs; "
        f"downstream {a.n_train} train (80/20 train/validation) / {a.n_test} test images, "
        f"{a.finetune_epochs} epochs. ImageNet-supervised weights cannot be downloaded here: the paper's "
        f"third row is not reproduced; 'random init' and 'frozen random' stand beside it.",
        "",
        "## Probe: held-out ridge R^2 [95% interval over test lens systems] from frozen features",
        "",
    ]
    if verdict:
        v = verdict
        head = lines[-2:]
        del lines[-2:]
        lines += [
            f"## bf16 or fp32: a {a.precision_check}-step LenSiam check on the same pairs",
            "",
            "Held-out ridge R^2 of the three short runs, the bf16 - fp32 difference (same seed) and the "
            "seed 1 - seed 0 difference (both bf16):",
            "",
            "| parameter | fp32 s0 | bf16 s0 | bf16 s1 | bf16 - fp32 | s1 - s0 |",
            "|---|---|---|---|---|---|",
        ]
        for p in v["precision_diff"]:
            lines.append(
                f"| {p} | {v['probes'][('fp32', 0)][p]:.3f} | {v['probes'][('bf16', 0)][p]:.3f} | "
                f"{v['probes'][('bf16', 1)][p]:.3f} | {v['precision_diff'][p]:+.3f} | "
                f"{v['seed_diff'][p]:+.3f} |"
            )
        lines += [
            "",
            f"Largest |bf16 - fp32| {v['max_precision_diff']:.3f} vs largest |s1 - s0| "
            f"{v['max_seed_diff']:.3f}: bf16 is "
            + ("" if v["within_seed_noise"] else "NOT ")
            + "within seed noise; the protocol pretrains in "
            + a.precision
            + ".",
            "",
        ] + head
    probes = {ps: load(out / f"probe_s{ps}.json") for ps in ps_list}
    if not any(probes.values()):
        lines.append("(not run yet)")
    else:
        lines += ["| pretraining seed | method | theta_E | e1 | gamma | mean of 8 |", "|---|---|---|---|---|---|"]
        for ps, pr in probes.items():
            for lab, r in (pr or {}).get("results", {}).items():
                ci = r.get("ridge_ci95", {})
                cell = [
                    f"{r['ridge'][p]:.3f} [{ci[p][0]:.3f}, {ci[p][1]:.3f}]" if p in ci else f"{r['ridge'][p]:.3f}"
                    for p in ("theta_E", "e1", "gamma")
                ]
                lines.append(f"| {ps} | {lab} | " + " | ".join(cell) + f" | {np.mean(list(r['ridge'].values())):.3f} |")
        probe_diff = {ps: pr["paired_difference"] for ps, pr in probes.items() if pr and pr.get("paired_difference")}
        if probe_diff:
            lines += [
                "",
                "Paired ridge R^2 difference LenSiam - SimSiam on the same test systems (95% interval over "
                "systems, one pretraining seed per row: pretraining-seed noise is not in it; the last row "
                "resamples the pretraining seeds too):",
                "",
                "| pretraining seed | theta_E | e1 | gamma |",
                "|---|---|---|---|",
            ]
            for ps, d in probe_diff.items():
                lines.append(
                    f"| {ps} | "
                    + " | ".join(
                        "{:+.3f} [{:+.3f}, {:+.3f}]".format(d["ridge"][p]["delta"], *d["ridge"][p]["ci95"])
                        for p in ("theta_E", "e1", "gamma")
                    )
                    + " |"
                )
            pooled = pooled_probe_difference([probes[ps] for ps in probe_diff])
            if pooled:
                lines.append(
                    f"| all {len(probe_diff)} (pretraining seeds resampled) | "
                    + " | ".join(
                        "{:+.3f} [{:+.3f}, {:+.3f}] (df {})".format(
                            r["delta"], *r["ci95"], f"{r['df']:.1f}" if r["df"] and r["df"] < 1000 else "> 999"
                        )
                        for r in pooled.values()
                    )
                    + " |"
                )
    for t in tasks(a.downstream_family):
        lines += ["", f"## Downstream: {t['title']}", ""]
        units = {arm: collect_units(out, t["key"], arm, ps_list) for arm in ARMS}
        units = {arm: u for arm, u in units.items() if u}
        if not units:
            lines.append("(not run yet)")
            continue
        metric = next(iter(next(iter(units.values())).values())).metric
        name = {"r2": "R^2", "auc": "ROC AUC"}.get(metric, metric)
        with_tpr = metric == "auc"  # lens finding: the TPR a survey would get at 1% false positives, beside AUC
        lines += [
            f"| arm | runs (pretraining x fine-tuning seeds) | test {name} mean +- sd | per pretraining seed "
            f"(mean over fine-tuning seeds) | " + ("TPR at FPR 1e-2 mean +- sd | " if with_tpr else "") + "paper R^2 |",
            "|---|---|---|---|---|" + ("---|" if with_tpr else ""),
        ]
        for arm, u in units.items():
            s = seed_summary(v.value for v in u.values())
            per = {}
            for (ps, _), v in u.items():
                per.setdefault(ps, []).append(v.value)
            per_txt = ", ".join(f"s{ps}: {np.mean(v):.3f}" for ps, v in per.items() if ps is not None) or "-"
            sd = f"{s['sd']:.3f}" if s["sd"] is not None else "n/a"
            tpr_txt = ""
            if with_tpr:
                tprs = [v.tpr_1e2 for v in u.values() if v.tpr_1e2 is not None]
                st = seed_summary(tprs) if len(tprs) > 1 else None
                tpr_txt = f"{st['mean']:.2f} +- {st['sd']:.2f} | " if st else "- | "
            lines.append(
                f"| {arm} | {s['n']} | {s['mean']:.3f} +- {sd} | {per_txt} | {tpr_txt}"
                f"{PAPER.get(arm, '-') if t['key'] == 'paper_theta_E' else '-'} |"
            )
        lines += [
            "",
            f"Paired differences of test {name} (hierarchical bootstrap, 2000 resamples: pretraining seeds "
            f"and fine-tuning seeds resampled as two levels (a backbone's fine-tunings share its luck; a "
            f"fine-tuning seed's split is shared by every backbone), with the test images; estimate +- "
            f"t(df) x se; the test-images-only interval, which ignores seed noise, for reference; per run: "
            f"each (pretraining, fine-tuning) seed pair):",
            "",
            "| difference | runs (resampled units) | delta | 95% interval | df | test-images-only interval | per run |",
            "|---|---|---|---|---|---|---|",
        ]
        for x, z in DIFFERENCES:
            if x not in units or z not in units:
                continue
            keys = paired(units[x], units[z])
            if len(keys) < 1:
                continue
            y = np.asarray(units[x][keys[0][0]].targets)
            pa = np.asarray([units[x][ka].scores for ka, _ in keys])
            pb = np.asarray([units[z][kb].scores for _, kb in keys])
            levels = {"pretraining": [ka[0] for ka, _ in keys], "fine-tuning": [ka[1] for ka, _ in keys]}
            r = hierarchical_paired_difference(y, pa, pb, metric, n_boot=2000, seed=0, levels=levels)
            df = "-" if not r["df"] else f"{r['df']:.1f}" if r["df"] < 1000 else "> 999"
            resampled = " x ".join(f"{n} {name}" for name, n in r["levels"].items()) + " seeds"
            lines.append(
                f"| {x} - {z} | {len(keys)} ({resampled}) | {r['delta']:+.3f} | "
                f"[{r['ci95'][0]:+.3f}, {r['ci95'][1]:+.3f}] | {df} | "
                f"[{r['ci95_images_only'][0]:+.3f}, {r['ci95_images_only'][1]:+.3f}] | "
                + " ".join(f"{v:+.3f}" for v in r["per_seed"])
                + " |"
            )
    curve = sorted(out.glob("curve_*.json"), key=lambda f: (f.stem.split("_")[1], int(f.stem.split("_")[2])))
    if curve:
        lines += [
            "",
            "## Probe ridge R^2 vs pretraining step (first pretraining seed, same held-out set)",
            "",
            "| method | step | theta_E | e1 | gamma | mean of 8 |",
            "|---|---|---|---|---|---|",
        ]
        for f in curve:
            r = next(iter(json.loads(f.read_text())["results"].values()))["ridge"]
            lines.append(
                f"| {f.stem.split('_')[1]} | {f.stem.split('_')[2]} | {r['theta_E']:.3f} | {r['e1']:.3f} | "
                f"{r['gamma']:.3f} | {np.mean(list(r.values())):.3f} |"
            )
    figs = sorted(Path(a.reports).glob(f"umap_*_{a.tag}.png"))
    if figs:
        lines += ["", "## UMAP of the held-out embeddings (first pretraining seed)", ""]
        lines += [f"![{f.stem}]({f.name})" for f in figs]
    lines += commands_table("Commands and wall times (steps finished so far)", done)
    total = sum(s["seconds"] for s in done.values())
    lines += ["", f"Total step time so far: {total / 60:.1f} min. Made by {made_by('science')}.", ""]
    atomic_write_text(path, "\n".join(lines))


if __name__ == "__main__":
    main()
