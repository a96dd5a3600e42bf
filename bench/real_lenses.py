"""theta_E of real lenses from networks trained on matched simulations: LenSiam vs SimSiam vs random init.

    .venv/bin/python -m bench.real_lenses --real DIR --out runs/real-quick --quick
    .venv/bin/python -m bench.real_lenses --real DIR --out runs/real-full     # hours

``--real DIR``: a folder of real cutouts in the real-lens layout (lenstronomy HDF5 files, a ``psf_*.h5``
beside them, ``labels.csv`` with ``name,file,theta_E_arcsec``; rows without theta_E are predicted, not
scored). The protocol, every step the package's own CLI, resumable (``OUT/steps.json``, bench/ledger.py):

1. ``ingest`` the real files onto the simulations' grid (``--num-pix`` x the files' pixel scale);
2. ``simulate --match FILE`` (the instrument of one real file: pixel scale, PSF, noise, zero point,
   the matched priors; ``--correlated-noise`` as drizzled HST images have): LenSiam pairs to pretrain
   on, labelled single images to fine-tune on, and a held-out simulated test set;
3. pretrain LenSiam (``train --views lens``) and SimSiam (``--views standard``) with the same recipe,
   ``export`` each backbone;
4. ``finetune`` theta_E on the simulations with every seed (>= 3), for LenSiam, SimSiam and a network
   from random initialisation (``--backbone none``), saving every seed's model; the simulated test set
   scores the recipe (the real lenses are a development set: recipes are chosen on simulations);
5. ``predict`` every real lens with each arm's seed ensemble (sigma = sqrt(sd_seeds^2 + sigma_val^2));
6. ``OUT/real_lenses.json`` (every prediction, the scores with bootstrap intervals over lenses, paired
   arm differences, the recipe), a markdown report and a per-lens figure (``--report``).

Optional ablation arms (``--ablations``), each a random-init network fine-tuned on the same draws
with one step of the match undone, scored on the matched held-out simulations and on the real lenses
like the arms: ``white_noise`` (white background noise), ``gaussian_psf`` (a circular Gaussian PSF of
FWHM 0.18" instead of the file's kernel), ``paper_priors`` (the paper's lens prior: theta_E 0.8-1.8",
mass e1, e2 in [-0.5, 0.5]). Compared with ``random_init`` they say how much each step moves the error.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import math
import platform
import shutil
import sys
import time
from pathlib import Path

from bench.common import print_ratio, warmup_epochs
from bench.ledger import BIN, Steps, shown
from bench.methods import OverrideError, override_flags
from hpc_lensiam.core.io import atomic_path, atomic_write_json, atomic_write_text

ARMS = ("lensiam", "simsiam", "random_init")
ABLATIONS = {
    "white_noise": "white background noise (no --correlated-noise)",
    "gaussian_psf": 'a circular Gaussian PSF of FWHM 0.18" instead of the real kernel (--match-psf)',
    "paper_priors": "the paper's lens prior: theta_E 0.8-1.8\", e1, e2 in [-0.5, 0.5] (--config)",
}
GAUSSIAN_PSF_FWHM_ARCSEC = 0.18
GOALS = {  # the benchmark's targets: (score, bound, "<=" | ">=") per recipe
    "full": [("median_abs_rel_error", 0.10, "<="), ("median_rel_bias", 0.05, "|<=|"), ("outlier_fraction", 0.10, "<=")],
    "quick": [("median_abs_rel_error", 0.25, "<="), ("spearman", 0.6, ">=")],
}


@dataclasses.dataclass
class Recipe:
    """Everything that decides the result; recorded in real_lenses.json."""

    name: str
    pairs: int  # LenSiam pretraining pairs
    n_train: int  # labelled simulations to fine-tune on (80% train / 20% validation)
    n_test: int  # held-out simulations that score the recipe
    num_pix: int  # image side on the real files' pixel scale
    correlated_noise: float  # neighbour correlation of the simulated background noise
    arch: str
    pretrain_epochs: int
    pretrain_batch: int  # per process
    finetune_epochs: int
    finetune_batch: int
    finetune_lr: float
    seeds: tuple  # fine-tuning seeds (>= 3)
    pretrain_seed: int = 0
    data_seed: int = 0
    nproc: int = 2
    ablations: tuple = ()
    # "" = SimSiam's own SGD recipe; else a bench.methods optimizer override ("lars": SimCLR's LARS recipe,
    # "lr8x": the base lr times 8): at SimSiam's own step size 640 steps leave a resnet18 near its init
    # (docs/results.md, "Step size, not method")
    pretrain_optimizer: str = ""


RECIPES = {
    # the whole path end to end, ~20 min of an idle 2-core CPU (~0.1 s per 100 px image and resnet18 step)
    "quick": Recipe(
        name="quick",
        pairs=256,
        n_train=800,  # 256 sims x 3 epochs left the fine-tuned nets unconverged (held-out sims R^2 0.42 and less);
        n_test=100,  # 800 x 10 reach 0.94-0.95 and the whole recipe ran 21.3 min beside a niced job
        num_pix=100,
        correlated_noise=0.4,
        arch="resnet18",
        pretrain_epochs=3,
        pretrain_batch=16,
        finetune_epochs=10,
        finetune_batch=16,
        finetune_lr=1e-3,
        seeds=(0, 1, 2),
    ),
    # hours of 2 CPU cores (resumable; minutes of one GPU)
    "full": Recipe(
        name="full",
        pairs=8192,
        n_train=10000,
        n_test=1000,
        num_pix=100,
        correlated_noise=0.4,
        arch="resnet18",
        pretrain_epochs=20,
        pretrain_batch=32,
        finetune_epochs=20,
        finetune_batch=32,
        finetune_lr=1e-3,
        seeds=(0, 1, 2),
        ablations=tuple(ABLATIONS),
    ),
}
OVERRIDES = (  # flag -> Recipe field, type: change one number of a recipe (tiny test runs, studies)
    ("pairs", int),
    ("n_train", int),
    ("n_test", int),
    ("num_pix", int),
    ("correlated_noise", float),
    ("arch", str),
    ("pretrain_epochs", int),
    ("pretrain_batch", int),
    ("finetune_epochs", int),
    ("finetune_batch", int),
    ("finetune_lr", float),
    ("nproc", int),
    ("pretrain_optimizer", str),
)


class BadInput(Exception):
    """A flag or input file that cannot work: one line, exit 2, before anything runs."""


# ------------------------------------------------------------------------------------------ inputs
def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="bench/real_lenses.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--real", required=True, help="folder of real cutouts (h5 files, psf_*.h5, labels.csv)")
    ap.add_argument("--labels", help="name,file,theta_E_arcsec table (default: REAL/labels.csv)")
    ap.add_argument("--out", required=True, help="working folder; real_lenses.json is written here")
    ap.add_argument("--quick", action="store_true", help="the small recipe (~20 min of 2 CPU cores)")
    ap.add_argument("--match", help="the real file whose instrument the simulations take (default: the first labelled)")
    ap.add_argument("--report", help="markdown report (default: OUT/real_lenses.md); its figure beside it")
    ap.add_argument("--seeds", help="fine-tuning seeds, e.g. 0,1,2 (at least 3)")
    ap.add_argument("--ablations", help=f"comma list of ablation arms ({', '.join(ABLATIONS)}), or 'none'")
    ap.add_argument("--report-only", action="store_true", help="rewrite json + report from OUT, run nothing")
    for field, typ in OVERRIDES:
        ap.add_argument("--" + field.replace("_", "-"), type=typ, help=f"override the recipe's {field}")
    return ap.parse_args(argv)


def recipe_from(a: argparse.Namespace) -> Recipe:
    r = dataclasses.replace(RECIPES["quick" if a.quick else "full"])
    for field, _ in OVERRIDES:
        v = getattr(a, field)
        if v is not None:
            setattr(r, field, v)
    if a.seeds:
        try:
            r.seeds = tuple(int(s) for s in a.seeds.split(",") if s.strip())
        except ValueError:
            raise BadInput(f"--seeds {a.seeds}: expected comma-separated integers, e.g. 0,1,2") from None
    if a.ablations:
        r.ablations = () if a.ablations == "none" else tuple(s.strip() for s in a.ablations.split(",") if s.strip())
    if len(set(r.seeds)) < 3:
        raise BadInput(f"--seeds: at least 3 distinct fine-tuning seeds expected, got {list(r.seeds)}")
    for s in r.ablations:
        if s not in ABLATIONS:
            raise BadInput(f"--ablations: unknown {s!r} (expected {', '.join(ABLATIONS)} or none)")
    for field in ("pairs", "n_train", "n_test", "num_pix", "pretrain_epochs", "pretrain_batch", "nproc"):
        if getattr(r, field) < 1:
            raise BadInput(f"--{field.replace('_', '-')}: must be >= 1, got {getattr(r, field)}")
    if r.n_train < 10:
        raise BadInput(f"--n-train {r.n_train}: at least 10 (a validation split of 20% needs 2)")
    if r.pretrain_optimizer:
        try:
            override_flags("simsiam", r.arch, r.pretrain_optimizer)
        except OverrideError as e:
            raise BadInput(f"--pretrain-optimizer {r.pretrain_optimizer}: {e}") from None
    if not 0.0 <= r.correlated_noise <= 0.7:
        raise BadInput(f"--correlated-noise {r.correlated_noise}: expected 0 to 0.7")
    return r


def read_lenses(real: Path, labels: Path) -> list[dict]:
    """The labels table's rows: name, file (resolved), theta_E_true (None when unlabelled)."""
    if not real.is_dir():
        raise BadInput(f"--real {real}: not a folder")
    if not labels.is_file():
        raise BadInput(f"--labels {labels}: no such file (expected a name,file,theta_E_arcsec table)")
    with open(labels, newline="") as f:
        rows = list(csv.DictReader(f))
    need = {"name", "file", "theta_E_arcsec"}
    if not rows or not need <= set(rows[0]):
        raise BadInput(f"--labels {labels}: expected columns {', '.join(sorted(need))} and at least one row")
    lenses = []
    for i, row in enumerate(rows, start=2):
        path = (labels.parent / row["file"]) if not Path(row["file"]).is_absolute() else Path(row["file"])
        if not path.is_file():
            path = real / row["file"]
        if not path.is_file():
            raise BadInput(f"--labels {labels} line {i}: file {row['file']} not found in {real}")
        text = (row["theta_E_arcsec"] or "").strip()
        try:
            theta = float(text) if text else None
        except ValueError:
            raise BadInput(f"--labels {labels} line {i}: theta_E_arcsec {text!r} is not a number") from None
        if theta is not None and not (math.isfinite(theta) and theta > 0):
            raise BadInput(f"--labels {labels} line {i}: theta_E_arcsec must be > 0, got {text}")
        lenses.append({"name": row["name"], "file": str(path.resolve()), "theta_E_true": theta})
    names = [x["name"] for x in lenses]
    if len(set(names)) != len(names):
        raise BadInput(f"--labels {labels}: a name appears twice")
    return lenses


def pixel_scale_of(path: str) -> float:
    """The real file's arcsec/pixel, as ``simulate --match`` reads it (checks its PSF and noise too)."""
    from hpc_lensiam.core.errors import UserError
    from hpc_lensiam.simulate.match import read_instrument

    try:
        return round(float(read_instrument(path).pixel_scale_arcsec), 6)
    except UserError as exc:
        raise BadInput(f"--match {path}: {exc}") from None


# ------------------------------------------------------------------------------------------ the steps
def on_ranks(n: int, *args) -> list:
    return [BIN / "torchrun", "--standalone", "--nproc_per_node", n, "-m", "hpc_lensiam", *args]


def arm_names(r: Recipe) -> list[str]:
    return [*ARMS, *r.ablations]


def pretrain_args(r: Recipe, mode: str, pairs: Path, run_dir: Path) -> list:
    """``train`` arguments of one pretraining arm: LenSiam (lens pairs) or SimSiam (standard views of one
    image), the same recipe for both; ``r.pretrain_optimizer`` swaps SimSiam's SGD for another step size."""
    views = {"lensiam": "lens", "simsiam": "standard"}[mode]  # the arm -> train --views
    args = ["train", "--data", pairs, "--out", run_dir, "--views", views, "--arch", r.arch]
    args += ["--epochs", r.pretrain_epochs, "--batch-size", r.pretrain_batch, "--seed", r.pretrain_seed]
    args += ["--warmup-epochs", warmup_epochs(r.pretrain_epochs), "--no-zero-init-residual", "--workers", 1]
    args += ["--shuffle-buffer", min(1000, r.pairs), "--ckpt-every", 50, "--log-every", 10]
    if r.pretrain_optimizer:
        args += override_flags("simsiam", r.arch, r.pretrain_optimizer)
    return args


def done_before(steps: Steps, name: str, cmd: list, outputs: list) -> bool:
    """Whether ``steps.run`` will skip this step (the same command succeeded and its outputs exist)."""
    prev = steps.done.get(name)
    return bool(prev) and prev["command"] == shown([str(c) for c in cmd]) and all(Path(o).exists() for o in outputs)


def stale(steps: Steps, name: str, cmd: list, paths: list) -> None:
    """Remove a step's outputs when another command made them (a changed recipe): the CLI refuses to
    write a data set over a different one, and stale models or predictions must not be scored."""
    prev = steps.done.get(name)
    if prev is None or prev["command"] == shown([str(c) for c in cmd]):
        return
    for p in map(Path, paths):
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()
    print(f"[real_lenses] {name}: the command changed, its old outputs are removed", flush=True)


def run_protocol(a, r: Recipe, lenses: list[dict], match: str, scale: float, out: Path, report: Path) -> None:
    steps = Steps(out, "real_lenses")
    hl, mpiexec = BIN / "hpc-lensiam", BIN / "mpiexec"
    real_shards = out / "real"
    cmd = [hl, "ingest", *[x["file"] for x in lenses], "--labels", a.labels, "--num-pix", r.num_pix]
    cmd += ["--target-pixel-scale", scale, "--pad", "--out", real_shards]
    stale(steps, "ingest real", cmd, [real_shards])
    real_changed = not done_before(steps, "ingest real", cmd, [real_shards / "manifest.json"])
    steps.run("ingest real", cmd, [real_shards / "manifest.json"])

    def simulate(name: str, n: int, seed_offset: int, single: bool, rho: float, extra: tuple = ()) -> Path:
        d = out / "shards" / name
        cmd = [
            mpiexec,
            "-n",
            r.nproc,
            hl,
            "simulate",
            "--out",
            d,
            "--pairs",
            n,
            "--shard-size",
            max(8, min(256, n // 8)),
        ]
        cmd += [
            "--match",
            match,
            "--num-pix",
            r.num_pix,
            "--correlated-noise",
            rho,
            "--seed",
            r.data_seed + seed_offset,
        ]
        cmd += (["--samples", "single"] if single else []) + list(extra)
        stale(steps, f"simulate {name}", cmd, [d])
        steps.run(f"simulate {name}", cmd, [d / "manifest.json"])
        return d

    rho = r.correlated_noise
    pairs = simulate("pairs", r.pairs, 0, False, rho)
    train = simulate("train", r.n_train, 1000, True, rho)
    test = simulate("test", r.n_test, 2000, True, rho)
    sets = {arm: (train, test) for arm in ARMS}
    # ablations: the same seeds with one step of the match undone; scored on the matched test set
    if "white_noise" in r.ablations:
        sets["white_noise"] = (simulate("train_white_noise", r.n_train, 1000, True, 0.0), test)
    if "gaussian_psf" in r.ablations:
        psf = write_gaussian_psf(out / "psf_gaussian.h5", scale, GAUSSIAN_PSF_FWHM_ARCSEC)
        sets["gaussian_psf"] = (simulate("train_gaussian_psf", r.n_train, 1000, True, rho, ("--match-psf", psf)), test)
    if "paper_priors" in r.ablations:
        cfg = out / "paper_priors.yaml"
        atomic_write_text(cfg, "lens:\n  theta_E_arcsec: [0.8, 1.8]\n  e1: [-0.5, 0.5]\n  e2: [-0.5, 0.5]\n")
        sets["paper_priors"] = (simulate("train_paper_priors", r.n_train, 1000, True, rho, ("--physics", cfg)), test)

    backbones = {"random_init": "none", **{abl: "none" for abl in r.ablations}}
    for mode in ("lensiam", "simsiam"):
        run_dir = out / f"pretrain_{mode}"
        ckpt = run_dir / "checkpoints" / "last.pt"
        train_args = pretrain_args(r, mode, pairs, run_dir)
        steps.run(f"pretrain {mode}", on_ranks(r.nproc, *train_args), [ckpt], resume_flag=ckpt.exists())
        bb = out / f"backbone_{mode}.pt"
        steps.run(f"export {mode}", [hl, "export", "--checkpoint", ckpt, "--out", bb], [bb])
        backbones[mode] = bb

    seeds = ",".join(map(str, r.seeds))
    for arm in arm_names(r):
        tr, te = sets[arm]
        fj, model = out / f"finetune_{arm}.json", out / "models" / f"{arm}.safetensors"
        model.parent.mkdir(parents=True, exist_ok=True)
        cmd = [hl, "finetune", "--backbone", backbones[arm], "--arch", r.arch, "--train", tr, "--test", te]
        cmd += ["--target", "theta_E", "--n-train", r.n_train, "--n-test", r.n_test, "--epochs", r.finetune_epochs]
        cmd += ["--batch-size", r.finetune_batch, "--lr", r.finetune_lr, "--seeds", seeds, "--json", fj]
        cmd += ["--save-model", model]
        seed_models = [model_file(out, arm, s) for s in r.seeds]
        stale(steps, f"finetune {arm}", cmd, [fj, *model.parent.glob(f"{arm}.seed*.safetensors")])
        pred = out / f"predict_{arm}.csv"
        if real_changed or not done_before(steps, f"finetune {arm}", cmd, [fj, *seed_models]):
            pred.unlink(missing_ok=True)  # new models or new real shards: predict again
        steps.run(f"finetune {arm}", cmd, [fj, *seed_models], resume_flag=fj.exists())
        cmd = [hl, "predict", "--model", *seed_models, "--data", real_shards, "--out", pred]
        steps.run(f"predict {arm}", cmd, [pred])
        write_outputs(r, lenses, out, report, steps.done)


def write_gaussian_psf(path: Path, pixel_scale: float, fwhm_arcsec: float) -> Path:
    """A circular Gaussian kernel (41 x 41, sum 1) in lenstronomy's PSF layout, for ``--match-psf``."""
    import h5py
    import numpy as np

    sigma = fwhm_arcsec / (2 * math.sqrt(2 * math.log(2))) / pixel_scale
    yy, xx = np.mgrid[-20:21, -20:21]
    k = np.exp(-(xx**2 + yy**2) / (2 * sigma**2))
    if not path.is_file():
        with atomic_path(path) as tmp:
            with h5py.File(tmp, "w") as f:
                f["kernel_point_source"] = k / k.sum()
    return path


def model_file(out: Path, arm: str, seed: int) -> Path:
    return out / "models" / f"{arm}.seed{seed}.safetensors"


# ------------------------------------------------------------------------------------------ results
def read_predictions(path: Path) -> dict:
    """{name: (theta_E_pred, theta_E_sigma)} from a ``predict`` catalogue."""
    with open(path, newline="") as f:
        return {row["name"]: (float(row["theta_E_pred"]), float(row["theta_E_sigma"])) for row in csv.DictReader(f)}


def collect(r: Recipe, lenses: list[dict], out: Path, steps_done: dict) -> dict:
    """real_lenses.json's content from whatever has finished in OUT."""
    import numpy as np

    from hpc_lensiam.evaluation.lens_scores import lens_scores, paired_differences

    arms, preds = {}, {}
    y = np.array([np.nan if x["theta_E_true"] is None else x["theta_E_true"] for x in lenses])
    for arm in arm_names(r):
        path = out / f"predict_{arm}.csv"
        if not path.is_file():
            continue
        got = read_predictions(path)
        missing = [x["name"] for x in lenses if x["name"] not in got]
        if missing:
            raise RuntimeError(f"{path}: no prediction for {', '.join(missing)}")
        p = np.array([got[x["name"]][0] for x in lenses])
        s = np.array([got[x["name"]][1] for x in lenses])
        preds[arm] = (p, s)
        ft = json.loads((out / f"finetune_{arm}.json").read_text()) if (out / f"finetune_{arm}.json").is_file() else {}
        arms[arm] = {
            "lenses": [
                {
                    "name": x["name"],
                    "theta_E_true": x["theta_E_true"],
                    "theta_E_pred": float(p[i]),
                    "theta_E_sigma": float(s[i]),
                }
                for i, x in enumerate(lenses)
            ],
            "metrics": lens_scores(y, p, s, n_boot=2000, seed=0),
            "simulated_test": sim_scores(ft),
        }
    pairs = {}
    names = list(preds)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            pairs[f"{a} - {b}"] = paired_differences(y, *preds[a], *preds[b], n_boot=2000, seed=0)
    return {
        "arms": arms,
        "reference": prior_reference(out, y),
        "paired_differences": pairs,
        "recipe": dataclasses.asdict(r),
        "steps": {k: round(v["seconds"], 1) for k, v in steps_done.items()},
        "goals": {f"{s} {op} {b}": None for s, b, op in GOALS[r.name]} if r.name in GOALS else {},
    }


def prior_reference(out: Path, y) -> dict:
    """The score of knowing nothing: every lens predicted at the middle of the simulations' theta_E prior
    (sigma = the prior's sd). An arm that does not beat it has not learned theta_E from the image."""
    import numpy as np

    from hpc_lensiam.evaluation.lens_scores import lens_scores

    manifest = out / "shards" / "train" / "manifest.json"
    if not manifest.is_file():
        return {}
    lo, hi = json.loads(manifest.read_text())["config"]["lens"]["theta_E_arcsec"]
    p = np.full(len(y), (lo + hi) / 2)
    s = np.full(len(y), (hi - lo) / math.sqrt(12))
    return {"prior_mean": {"theta_E_pred": (lo + hi) / 2, "metrics": lens_scores(y, p, s, n_boot=2000, seed=0)}}


def sim_scores(ft: dict) -> dict:
    """The recipe's score on held-out simulations (finetune's report): R^2 and the response slope (pred on
    true) per seed and their means; the slope there beside the real lenses' says how much of a compression
    on the real images the simulations show too."""
    from hpc_lensiam.evaluation.lens_scores import response_slope

    runs = ft.get("runs") or []
    if not runs:
        return {}
    vals = [run.get("r2") for run in runs if run.get("r2") is not None]
    # a multi-seed report keeps the shared test targets once, at its top level; a one-seed run keeps its own
    slopes = [
        response_slope(run.get("test_targets") or ft["test_targets"], run["test_predictions"])
        for run in runs
        if run.get("test_predictions")
    ]
    return {
        "r2_per_seed": vals,
        "r2_mean": float(sum(vals) / len(vals)) if vals else None,
        "slope_per_seed": slopes,
        "slope_mean": float(sum(slopes) / len(slopes)) if slopes else None,
        "n_test": ft.get("n_test"),
    }


def goal_verdicts(result: dict, recipe_name: str) -> dict:
    out = {}
    for arm, rec in result["arms"].items():
        m = rec["metrics"]
        verdict = {}
        for score, bound, op in GOALS.get(recipe_name, []):
            v = (m.get(score) or {}).get("value")
            ok = None if v is None else (abs(v) <= bound if op == "|<=|" else v <= bound if op == "<=" else v >= bound)
            verdict[f"{score} {op} {bound}"] = ok
        out[arm] = verdict
    return out


def write_outputs(r: Recipe, lenses: list[dict], out: Path, report: Path, steps_done: dict) -> dict:
    result = collect(r, lenses, out, steps_done)
    result["goals"] = goal_verdicts(result, r.name)
    atomic_write_json(out / "real_lenses.json", result)
    if report.parent != out:  # a copy beside the report, so the predictions travel with it
        atomic_write_json(report.with_suffix(".json"), result)
    if result["arms"]:
        fig = report.with_suffix(".png")
        figure(lenses, out / "real", result, fig)
        atomic_write_text(report, report_text(r, lenses, result, out, fig, report))
    return result


def _fmt(m: dict, name: str, digits: int = 2) -> str:
    x = m.get(name) or {}
    v, ci = x.get("value"), x.get("ci95") or [None, None]
    if v is None:
        return "n/a"
    if ci[0] is None:
        return f"{v:.{digits}f}"
    return f"{v:.{digits}f} [{ci[0]:.{digits}f}, {ci[1]:.{digits}f}]"


def report_text(r: Recipe, lenses, result: dict, out: Path, fig: Path, report: Path) -> str:
    arms = result["arms"]
    lines = [
        f"# Real-lens theta_E benchmark: {r.name} recipe",
        "",
        f"Written by `bench/real_lenses.py` from `{out.name}/real_lenses.json` ({len(lenses)} real lenses, "
        f"{sum(x['theta_E_true'] is not None for x in lenses)} labelled). Intervals: 95% bootstrap over lenses.",
        "",
        "## Scores per arm (labelled lenses)",
        "",
        "| arm | median abs(d)/theta_E | median bias / theta_E | median bias (arcsec) | Spearman | outliers (>0.3) "
        "| 1-sigma coverage | slope pred on true (1: no compression) | sims R^2, slope (mean of seeds) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for arm, rec in arms.items():
        m, sim = rec["metrics"], rec.get("simulated_test") or {}
        r2, slope = sim.get("r2_mean"), sim.get("slope_mean")
        lines.append(
            f"| {arm} | {_fmt(m, 'median_abs_rel_error')} | {_fmt(m, 'median_rel_bias')} | {_fmt(m, 'median_bias')} "
            f"| {_fmt(m, 'spearman')} | {_fmt(m, 'outlier_fraction')} | {_fmt(m, 'coverage_1sigma')} "
            f"| {_fmt(m, 'response_slope')} | {'n/a' if r2 is None else f'{r2:.3f}'}, "
            f"{'n/a' if slope is None else f'{slope:.2f}'} |"
        )
    for name, ref in (result.get("reference") or {}).items():
        m = ref["metrics"]
        lines.append(
            f'| *{name}* (every lens at {ref["theta_E_pred"]:.2f}") | {_fmt(m, "median_abs_rel_error")} '
            f"| {_fmt(m, 'median_rel_bias')} | {_fmt(m, 'median_bias')} | n/a | {_fmt(m, 'outlier_fraction')} "
            f"| {_fmt(m, 'coverage_1sigma')} | {_fmt(m, 'response_slope')} | n/a |"
        )
    lines += ["", "Goals (" + r.name + " recipe): " + "; ".join(f"{s} {op} {b}" for s, b, op in GOALS[r.name]), ""]
    for arm, verdict in result["goals"].items():
        lines.append(f"- {arm}: " + ", ".join(f"{k}: {'met' if v else 'NOT met'}" for k, v in verdict.items()))
    lines += ["", "## Per lens (theta_E in arcsec, prediction +- 1 sigma)", ""]
    names = list(arms)
    lines += ["| lens | lens-model theta_E | " + " | ".join(names) + " |", "|---" * (2 + len(names)) + "|"]
    for i, x in enumerate(lenses):
        t = "unlabelled" if x["theta_E_true"] is None else f"{x['theta_E_true']:.2f}"
        cells = [
            f"{arms[a]['lenses'][i]['theta_E_pred']:.2f} +- {arms[a]['lenses'][i]['theta_E_sigma']:.2f}" for a in names
        ]
        lines.append(f"| {x['name']} | {t} | " + " | ".join(cells) + " |")
    if result["paired_differences"]:
        lines += ["", "## Paired differences between arms (same lenses, same resamples)", ""]
        lines += [
            "| A - B | median abs(d)/theta_E | Spearman | outliers | P(A better), median error |",
            "|---|---|---|---|---|",
        ]
        for k, d in result["paired_differences"].items():
            pb = (d.get("median_abs_rel_error") or {}).get("a_better_fraction")
            lines.append(
                f"| {k} | {_fmt(d, 'median_abs_rel_error')} | {_fmt(d, 'spearman')} | {_fmt(d, 'outlier_fraction')} "
                f"| {'n/a' if pb is None else f'{pb:.2f}'} |"
            )
    rel = fig.name if fig.parent == report.parent else str(fig)
    lines += ["", f"![each lens and each arm's prediction]({rel})", "", "## Recipe", "", "```"]
    lines += [f"{k}: {v}" for k, v in dataclasses.asdict(r).items()]
    lines += ["```", "", "## Steps (seconds)", ""]
    lines += [f"- {k}: {v:.0f}" for k, v in result["steps"].items()]
    lines += [
        "",
        f"Machine: {platform.machine()}, Python {platform.python_version()}; steps total {_minutes(result):.1f} min.",
        "",
    ]
    return "\n".join(lines)


def _minutes(result: dict) -> float:
    return sum(result["steps"].values()) / 60


def _ring(ax, centre, radius_pix: float, **kw) -> None:
    import numpy as np

    t = np.linspace(0, 2 * np.pi, 100)
    ax.plot(centre[0] + radius_pix * np.cos(t), centre[1] + radius_pix * np.sin(t), lw=1, **kw)


def figure(lenses, real_shards: Path, result: dict, path: Path) -> None:
    """One panel per lens (the ingested image, true and predicted Einstein rings) and a pred-vs-true panel."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from hpc_lensiam.shards.reader import iter_samples

    images, scale = {}, None
    for s in iter_samples(real_shards):
        name = s["params"].get("name") or s["key"]
        images[name] = s["image"]
        scale = scale or (s["params"].get("ingest") or {}).get("target_pixel_scale_arcsec")
    arms = result["arms"]
    colours = dict(zip(arms, plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    n = len(lenses) + 1
    cols = min(n, 6)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.6 * cols, 3.0 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for i, x in enumerate(lenses):
        ax = axes.flat[i]
        img = images.get(x["name"])
        if img is not None:
            img = np.asarray(img, np.float64)
            noise = np.median(np.abs(img - np.median(img))) * 1.4826 or 1e-3
            ax.imshow(np.arcsinh(img / (2 * noise)), cmap="gray", origin="lower")
            centre = (np.array(img.shape[::-1]) - 1) / 2

            if scale and x["theta_E_true"] is not None:
                _ring(ax, centre, x["theta_E_true"] / scale, color="w", ls="--")
            for arm in arms:
                if scale:
                    _ring(ax, centre, arms[arm]["lenses"][i]["theta_E_pred"] / scale, color=colours[arm], alpha=0.9)
            ax.set(xlim=(-0.5, img.shape[1] - 0.5), ylim=(-0.5, img.shape[0] - 0.5))
        t = "?" if x["theta_E_true"] is None else f"{x['theta_E_true']:.2f}"
        ax.set_title(f'{x["name"]}\ntrue {t}"', fontsize=7)
    ax = axes.flat[len(lenses)]
    ax.axis("on")
    y = np.array([np.nan if x["theta_E_true"] is None else x["theta_E_true"] for x in lenses])
    lab = np.isfinite(y)
    for k, arm in enumerate(arms):
        p = np.array([e["theta_E_pred"] for e in arms[arm]["lenses"]])
        s = np.array([e["theta_E_sigma"] for e in arms[arm]["lenses"]])
        ax.errorbar(y[lab] + 0.03 * (k - 1), p[lab], yerr=s[lab], fmt="o", ms=3, color=colours[arm], label=arm)
    lo, hi = 0.3, 4.0
    ax.plot([lo, hi], [lo, hi], "k:", lw=0.8)
    ax.set(xlim=(lo, hi), ylim=(lo, hi), xlabel='lens-model theta_E (")', ylabel='predicted (")')
    ax.legend(fontsize=6)
    fig.suptitle("real lenses: dashed white = lens-model theta_E, coloured = each arm's prediction", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=80)
    plt.close(fig)


# ------------------------------------------------------------------------------------------ main
def main(argv=None) -> int:
    a = parse_args(argv)
    try:
        r = recipe_from(a)
        real = Path(a.real).resolve()
        a.labels = str(Path(a.labels).resolve()) if a.labels else str(real / "labels.csv")
        lenses = read_lenses(real, Path(a.labels))
        labelled = [x for x in lenses if x["theta_E_true"] is not None]
        match = str(Path(a.match).resolve()) if a.match else (labelled or lenses)[0]["file"]
        if a.match and not Path(match).is_file():
            raise BadInput(f"--match {a.match}: no such file")
        scale = pixel_scale_of(match)
        out = Path(a.out).resolve()
        if out.exists() and not out.is_dir():
            raise BadInput(f"--out {a.out}: exists and is not a folder")
    except BadInput as exc:
        print(f"hpc-lensiam: error: {exc}", file=sys.stderr)
        return 2
    report = Path(a.report).resolve() if a.report else out / "real_lenses.md"
    if a.report_only:
        write_outputs(r, lenses, out, report, Steps(out, "real_lenses").done)
        return 0
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    run_protocol(a, r, lenses, match, scale, out, report)
    result = write_outputs(r, lenses, out, report, Steps(out, "real_lenses").done)
    print(f"\n[real_lenses] done in {(time.perf_counter() - t0) / 60:.1f} min: {out / 'real_lenses.json'}, {report}")
    for arm, rec in result["arms"].items():
        m = rec["metrics"]
        print(
            f"[real_lenses] {arm}: median |d|/theta_E {_fmt(m, 'median_abs_rel_error')}, Spearman {_fmt(m, 'spearman')}"
        )
    err = {arm: (rec["metrics"].get("median_abs_rel_error") or {}).get("value") for arm, rec in result["arms"].items()}
    if err.get("lensiam") and err.get("random_init"):
        print_ratio(err["lensiam"] / err["random_init"], "LenSiam over random-init median |d|/theta_E, real lenses")
    return 0


if __name__ == "__main__":
    sys.exit(main())
