"""Lens finding on a world another team simulated: train on the survey family, score their images.

    python -m bench.lens_finding --eval DIR --out OUT [--quick] [--set KEY=VALUE ...]
    python -m bench.lens_finding --real DIR --finder OUT --out OUT_REAL [--real-pixel-scale 0.186]

``--eval DIR``: ``DIR/images.npy`` (N, H, W) and ``DIR/params.csv`` with at least ``idx, is_lens,
pixel_scale, band`` (as in the slsim sets of the shared data: ``idx`` the row of the stack, one pixel
scale and one band for the set). The band chooses the survey preset (``LSST-i`` -> lsst, ``Euclid-VIS``
-> euclid: their PSF, noise and zero point), the set's pixel scale and image side its grid. Steps, each
the package's own CLI and resumable (``OUT/steps.json``, bench/ledger.py: a finished step whose outputs
exist is skipped on a rerun):

1. ``simulate --family survey --samples single`` a training set and a held-out test set (other seed) on
   that grid (``OUT/survey.yaml``, with ``--set`` population changes on top);
2. ``ingest`` the eval stack onto the same grid (sky-subtracted, divided by its maximum, as the
   simulator stores its images);
3. ``finetune --task classify --target is_lens`` (random-init resnet18 unless ``--backbone``), reporting
   on the held-out survey images, and ``--save-model``;
4. ``predict`` the eval set; ``OUT/scores.csv`` (``idx, score``: the lens probability) and
   ``OUT/metrics.json``: ROC AUC and TPR at FPR 1e-2 with 95% bootstrap intervals on both the held-out
   survey images and the eval set, their differences (the realism gap), and the eval set's recall and
   false-positive rate at the threshold chosen on the simulations (FPR 1e-2 there; Wilson intervals).

``--real DIR``: ``DIR/lenses/`` and ``DIR/non_lenses/`` of display images (PNG/JPEG), scored by the
finder of an earlier ``--eval`` run (``--finder``): ingested onto its grid (``--real-pixel-scale`` is
their arcsec/pixel), predicted, recall and false-positive rate at that run's simulation threshold and
the AUC. Display images are 8-bit, stretched, colour composites averaged to one channel: not the
calibrated single band the finder was trained on (docs/lens_finding.md says what that limits).

``--quick`` sizes the run to finish in under 25 minutes on this 2-core machine (the training set is
scaled down with the image area); the default sizes are for a GPU node. Bad input: one
``hpc-lensiam: error:`` line and exit 2 before anything is simulated.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml

from bench.common import print_ratio
from bench.ledger import BIN, Steps
from hpc_lensiam.core.errors import UserError
from hpc_lensiam.core.io import atomic_write_json, atomic_write_text

# band name (params.csv's ``band``, case-insensitive) -> the survey preset whose PSF and noise it has
BAND_PRESETS = {"lsst-i": "lsst", "euclid-vis": "euclid"}
FPR_THRESHOLD = 1e-2  # the operating point chosen on the simulations
EVAL_COLUMNS = ("idx", "is_lens", "pixel_scale", "band")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
N_BOOT = 1000


@dataclass
class Sizes:
    n_train: int
    n_test: int
    epochs: int
    batch_size: int
    freeze_backbone: bool


def run_sizes(num_pix: int, quick: bool) -> Sizes:
    """Training and test set sizes and the recipe. ``--quick``: 1600 training images at 64 px, scaled
    down with the image area (the simulation and a resnet18 pass cost ~ the pixel count), 400 held-out
    images (200 non-lenses: FPR 1e-2 resolved), and a frozen random resnet18 with a logistic head (30
    epochs of the head on features computed once): from random weights at lr 1e-4 full fine-tuning does
    not learn from so few images in a few epochs (AUC 0.511 with 500 images x 10 epochs in the project's
    protocol, where the frozen random network gave 0.717; here 560 x 1 epoch at 100 px: validation loss
    0.696, chance). The default: 8000 / 2000 images, full fine-tuning for 20 epochs (a GPU node's run)."""
    if not quick:
        return Sizes(8000, 2000, 20, 64, False)
    n_train = int(round(1600 * (64.0 / num_pix) ** 2, -2))
    return Sizes(max(n_train, 400), 400, 30, 32, True)


# ------------------------------------------------------------------------------------ the eval set
@dataclass
class EvalSet:
    images: Path
    params: Path
    n: int
    num_pix: int
    pixel_scale: float
    band: str
    preset: str
    idx: list[int]
    is_lens: list[int]


def preset_for_band(band: str, where: str) -> str:
    preset = BAND_PRESETS.get(band.strip().lower())
    if preset is None:
        known = ", ".join(sorted({"LSST-i", "Euclid-VIS"}))
        raise UserError(f"{where}: band {band!r} has no survey preset (expected one of: {known})")
    return preset


def read_eval_dir(d: str | Path) -> EvalSet:
    """The eval set's stack and table, checked (one error naming the file and what was expected)."""
    d = Path(d)
    images, params = d / "images.npy", d / "params.csv"
    for p in (images, params):
        if not p.is_file():
            raise UserError(f"--eval {d}: {p.name} not found (expected images.npy (N, H, W) and params.csv)")
    try:
        stack = np.load(images, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError) as exc:
        raise UserError(f"{images}: cannot read as a .npy array ({exc})") from None
    if stack.ndim != 3 or stack.shape[1] != stack.shape[2] or stack.shape[1] < 8:
        raise UserError(f"{images}: expected square images (N, H, H) with H >= 8, got shape {stack.shape}")
    with open(params, newline="") as fh:
        rows = list(csv.DictReader(fh))
    missing = [c for c in EVAL_COLUMNS if not rows or c not in rows[0]]
    if missing:
        raise UserError(f"{params}: missing column(s) {', '.join(missing)} (expected {', '.join(EVAL_COLUMNS)})")
    if len(rows) != stack.shape[0]:
        raise UserError(f"{params}: {len(rows)} rows but {images.name} holds {stack.shape[0]} images")
    try:
        idx = [int(r["idx"]) for r in rows]
        is_lens = [int(float(r["is_lens"])) for r in rows]
        scales = {float(r["pixel_scale"]) for r in rows}
    except ValueError as exc:
        raise UserError(f"{params}: idx, is_lens and pixel_scale must be numbers ({exc})") from None
    if sorted(idx) != list(range(len(rows))):
        raise UserError(f"{params}: idx must be the rows of images.npy, 0..{len(rows) - 1}, each once")
    if set(is_lens) != {0, 1}:
        raise UserError(f"{params}: is_lens must be 0 or 1 with both classes present, got {sorted(set(is_lens))}")
    bands = {r["band"] for r in rows}
    if len(scales) != 1 or len(bands) != 1:
        raise UserError(f"{params}: one pixel_scale and one band per set, got {sorted(scales)} and {sorted(bands)}")
    scale, band = scales.pop(), bands.pop()
    if not 0 < scale < 10:
        raise UserError(f"{params}: pixel_scale {scale} is not an arcsec/pixel in (0, 10)")
    if "num_pix" in rows[0] and {int(float(r["num_pix"])) for r in rows} != {stack.shape[1]}:
        raise UserError(f"{params}: num_pix does not match the images' side {stack.shape[1]}")
    return EvalSet(images, params, len(rows), int(stack.shape[1]), scale, band, preset_for_band(band, str(params)),
                   idx, is_lens)  # fmt: skip


# ------------------------------------------------------------------------------------- the config
def parse_set(items: list[str]) -> dict:
    """``--set section.key=value`` (value in YAML: 0.5, [0.3, 2.0], null) -> nested overrides."""
    out: dict = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        parts = key.strip().split(".")
        if not sep or not all(parts):
            raise UserError(f"--set {item!r}: expected SECTION.KEY=VALUE (e.g. selection.min_theta_E_fwhm=0.5)")
        try:
            parsed = yaml.safe_load(value)
        except yaml.YAMLError:
            raise UserError(f"--set {item!r}: the value is not YAML") from None
        node = out
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise UserError(f"--set {item!r}: {p} is set to a value above")
        node[parts[-1]] = parsed
    return out


def _merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def survey_yaml(ev: EvalSet, overrides: dict) -> dict:
    """The survey config of the eval set's preset on its grid, ``--set`` on top; validated here (the
    same resolution simulate does), so a bad key is refused before anything runs."""
    from hpc_lensiam.core.errors import ConfigError
    from hpc_lensiam.simulate.survey.config import survey_config

    grid = {"num_pix": ev.num_pix, "pixel_scale_arcsec": ev.pixel_scale}
    cfg = _merge({"family": "survey", "preset": ev.preset, "instrument": grid}, overrides)
    try:
        survey_config(**{k: v for k, v in cfg.items() if k not in ("family",)})
    except ConfigError as exc:
        raise UserError(f"--set: {exc}") from None
    except TypeError as exc:
        raise UserError(f"--set: {exc}") from None
    return cfg


# ------------------------------------------------------------------------------------- statistics
def threshold_at_fpr(y, score, fpr: float = FPR_THRESHOLD) -> float:
    """The score above which at most floor(fpr N_neg) non-lenses lie (``score > t`` is a detection):
    the operating point of evaluation.classify.tpr_at_fpr."""
    y, score = np.asarray(y, bool), np.asarray(score, float)
    neg = np.sort(score[~y])[::-1]
    allowed = int(np.floor(fpr * len(neg) + 1e-9))
    return float(neg[allowed]) if allowed < len(neg) else -math.inf


def wilson(k: int, n: int) -> list[float]:
    """95% Wilson interval of k / n."""
    if n == 0:
        return [float("nan"), float("nan")]
    from scipy.stats import binomtest

    ci = binomtest(int(k), int(n)).proportion_ci(0.95, method="wilson")
    return [float(ci.low), float(ci.high)]


def at_threshold(y, score, t: float) -> dict:
    """Recall and false-positive rate of ``score > t`` with Wilson intervals."""
    y, score = np.asarray(y, bool), np.asarray(score, float)
    det = score > t
    tp, fp = int((det & y).sum()), int((det & ~y).sum())
    return {
        "threshold": t,
        "recall": tp / max(int(y.sum()), 1),
        "recall_ci95": wilson(tp, int(y.sum())),
        "fpr": fp / max(int((~y).sum()), 1),
        "fpr_ci95": wilson(fp, int((~y).sum())),
        "n_lenses": int(y.sum()),
        "n_non_lenses": int((~y).sum()),
    }


def gap(sim: tuple, ev: tuple, n_boot: int = N_BOOT, seed: int = 0) -> dict:
    """sim - eval of ROC AUC and of TPR at FPR 1e-2, with 95% intervals from independent bootstraps of
    the two test sets (different images: resampled separately)."""
    from hpc_lensiam.evaluation.classify import roc_auc, tpr_at_fpr

    rng = np.random.default_rng(seed)
    (ys, ss), (ye, se) = (tuple(np.asarray(a) for a in sim)), (tuple(np.asarray(a) for a in ev))
    out = {}
    for name, fn in (("auc", roc_auc), ("tpr_at_fpr_0.01", lambda y, s: tpr_at_fpr(y, s, FPR_THRESHOLD))):
        d = []
        for _ in range(n_boot):
            i, j = rng.integers(0, len(ys), len(ys)), rng.integers(0, len(ye), len(ye))
            d.append(fn(ys[i], ss[i]) - fn(ye[j], se[j]))
        lo, hi = np.nanpercentile(d, [2.5, 97.5])
        out[name] = {"sim_minus_eval": fn(ys, ss) - fn(ye, se), "ci95": [float(lo), float(hi)]}
    return out


def summary(rep: dict) -> dict:
    """The numbers of a classification_report the tables show (no ROC curve)."""
    t = rep["tpr_at_fpr"]["0.01"]
    return {
        "auc": rep["auc"],
        "auc_ci95": rep["auc_ci95"],
        "tpr_at_fpr_0.01": t["tpr"],
        "tpr_at_fpr_0.01_ci95": t["ci95"],
        "tpr_at_fpr_0.01_resolvable": t["resolvable"],
        "n_lenses": rep["n_lenses"],
        "n_non_lenses": rep["n_non_lenses"],
    }


def read_scores(pred_csv: Path, column: str) -> dict:
    """predict's catalogue -> {value of ``column`` (the ingested catalogue's idx / file): p_lens}."""
    with open(pred_csv, newline="") as fh:
        return {r[column]: float(r["p_lens"]) for r in csv.DictReader(fh)}


# ---------------------------------------------------------------------------------------- --eval
def evaluate(out: Path, ev: EvalSet) -> dict:
    """scores.csv and metrics.json from the finished steps' files (no compute beyond statistics)."""
    from hpc_lensiam.evaluation.classify import classification_report

    ft = json.loads((out / "finetune.json").read_text())
    y_sim = np.asarray(ft["test_targets"], int)
    s_sim = np.asarray(ft["test_predictions"], float)
    by_idx = read_scores(out / "pred_eval.csv", "idx")
    missing = [i for i in ev.idx if str(i) not in by_idx]
    if missing:
        raise UserError(f"{out / 'pred_eval.csv'}: no score for idx {missing[:5]} (rerun without the old OUT)")
    s_eval = np.array([by_idx[str(i)] for i in ev.idx])
    y_eval = np.asarray(ev.is_lens, int)
    lines = ["idx,score"] + [f"{i},{s!r}" for i, s in zip(ev.idx, s_eval.tolist())]
    atomic_write_text(out / "scores.csv", "\n".join(lines) + "\n")
    t = threshold_at_fpr(y_sim, s_sim)
    rep_sim, rep_eval = classification_report(y_sim, s_sim, N_BOOT), classification_report(y_eval, s_eval, N_BOOT)
    metrics = {
        "eval_dir": str(ev.images.parent),
        "preset": ev.preset,
        "band": ev.band,
        "grid": {"num_pix": ev.num_pix, "pixel_scale_arcsec": ev.pixel_scale},
        "survey_config": yaml.safe_load((out / "survey.yaml").read_text()),
        "finetune": {
            k: ft.get(k) for k in ("backbone", "arch", "n_train", "n_test", "epochs", "seed", "lr", "freeze_backbone")
        },
        "sim_test": summary(rep_sim),
        "eval": summary(rep_eval),
        "gap": gap((y_sim, s_sim), (y_eval, s_eval)),
        "sim_threshold": {"fpr_on_sim": FPR_THRESHOLD, "threshold": t},
        "sim_test_at_threshold": at_threshold(y_sim, s_sim, t),
        "eval_at_threshold": at_threshold(y_eval, s_eval, t),
        "image_stats": image_stats(out),
        "steps_seconds": {k: v["seconds"] for k, v in json.loads((out / "steps.json").read_text()).items()},
    }
    atomic_write_json(out / "metrics.json", metrics)
    atomic_write_text(out / "report.md", report_md(metrics))
    return metrics


def image_stats(out: Path) -> dict:
    """Median noise / maximum and the theta_E quartiles of the simulated test set beside the eval set's
    noise / maximum (ingest's sigma-clipped sky noise of the max-1 image): how alike the pixels are."""
    from hpc_lensiam.shards.reader import iter_samples

    sim_nm, sim_te, ev_nm = [], [], []
    for s in iter_samples(out / "sim_test"):
        v = s["params"]["views"][0]
        if v.get("image_max_cps"):
            sim_nm.append(v["background_sigma_cps"] / v["image_max_cps"])
        if s["params"].get("is_lens"):
            sim_te.append(s["params"]["lens"]["theta_E"])
    for s in iter_samples(out / "eval_shards"):
        ev_nm.append(s["params"]["ingest"]["noise_rms"])
    q = lambda a: [float(v) for v in np.percentile(a, [25, 50, 75])] if len(a) else None  # noqa: E731
    return {"sim_noise_over_max_q25_50_75": q(sim_nm), "eval_noise_over_max_q25_50_75": q(ev_nm),
            "sim_lens_theta_E_q25_50_75": q(sim_te)}  # fmt: skip


def _fmt(v: float, ci: list) -> str:
    return f"{v:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]"


def report_md(m: dict) -> str:
    s, e, g = m["sim_test"], m["eval"], m["gap"]
    a, b = m["sim_test_at_threshold"], m["eval_at_threshold"]
    return "\n".join(
        [
            f"# Lens finding: {m['eval_dir']} ({m['band']}, {m['preset']} preset, "
            f'{m["grid"]["num_pix"]} px x {m["grid"]["pixel_scale_arcsec"]}")',
            "",
            "| test set | lenses / non-lenses | ROC AUC [95%] | TPR at FPR 1e-2 [95%] "
            "| recall at the sim threshold | FPR there |",
            "|---|---|---|---|---|---|",
            f"| held-out survey simulations | {s['n_lenses']} / {s['n_non_lenses']} | {_fmt(s['auc'], s['auc_ci95'])} "
            f"| {_fmt(s['tpr_at_fpr_0.01'], s['tpr_at_fpr_0.01_ci95'])} | {_fmt(a['recall'], a['recall_ci95'])} "
            f"| {_fmt(a['fpr'], a['fpr_ci95'])} |",
            f"| eval set | {e['n_lenses']} / {e['n_non_lenses']} | {_fmt(e['auc'], e['auc_ci95'])} "
            f"| {_fmt(e['tpr_at_fpr_0.01'], e['tpr_at_fpr_0.01_ci95'])}"
            f"{'' if e['tpr_at_fpr_0.01_resolvable'] else ' (unresolved)'} | {_fmt(b['recall'], b['recall_ci95'])} "
            f"| {_fmt(b['fpr'], b['fpr_ci95'])} |",
            f"| gap (sim - eval) | | {_fmt(g['auc']['sim_minus_eval'], g['auc']['ci95'])} "
            f"| {_fmt(g['tpr_at_fpr_0.01']['sim_minus_eval'], g['tpr_at_fpr_0.01']['ci95'])} | | |",
            "",
            f"Threshold {m['sim_threshold']['threshold']:.4g} (FPR 1e-2 on the simulations). Steps (s): "
            + ", ".join(f"{k} {v:.0f}" for k, v in m["steps_seconds"].items()),
            "",
        ]
    )


def run_eval(a) -> dict:
    ev = read_eval_dir(a.eval)
    overrides = parse_set(a.set)
    cfg = survey_yaml(ev, overrides)
    sizes = run_sizes(ev.num_pix, a.quick)
    if a.n_train:
        sizes.n_train = a.n_train
    if a.n_test:
        sizes.n_test = a.n_test
    if a.epochs:
        sizes.epochs = a.epochs
    if a.freeze_backbone is not None:
        sizes.freeze_backbone = a.freeze_backbone
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    cfg_path = out / "survey.yaml"
    if cfg_path.is_file() and yaml.safe_load(cfg_path.read_text()) != cfg:
        raise UserError(f"--out {out}: holds a run of another survey config ({cfg_path}); give a new --out")
    atomic_write_text(cfg_path, yaml.safe_dump(cfg, sort_keys=False))
    steps = Steps(out, tag="lens_finding")
    cli = [str(BIN / "hpc-lensiam")]
    mpi = [str(BIN / "mpiexec"), "-n", str(a.ranks)] if a.ranks > 1 else []
    sim = [*mpi, *cli, "simulate", "--family", "survey", "--samples", "single", "--physics", out / "survey.yaml"]
    steps.run("simulate_train", [*sim, "--pairs", sizes.n_train, "--seed", a.seed, "--out", out / "sim_train"],
              [out / "sim_train" / "manifest.json"])  # fmt: skip
    steps.run("simulate_test", [*sim, "--pairs", sizes.n_test, "--seed", a.seed + 1000, "--out", out / "sim_test"],
              [out / "sim_test" / "manifest.json"])  # fmt: skip
    labels = out / "eval_labels.csv"
    atomic_write_text(labels, "idx,is_lens\n" + "".join(f"{i},{y}\n" for i, y in zip(ev.idx, ev.is_lens)))
    steps.run(
        "ingest_eval",
        [*cli, "ingest", ev.images, "--labels", labels, "--input-pixel-scale", ev.pixel_scale, "--target-pixel-scale",
         ev.pixel_scale, "--num-pix", ev.num_pix, "--orientation", "asis", "--out", out / "eval_shards"],
        [out / "eval_shards" / "manifest.json"],
    )  # fmt: skip
    arch = [] if a.backbone != "none" else ["--arch", a.arch]
    steps.run(
        "finetune",
        [*cli, "finetune", "--task", "classify", "--target", "is_lens", "--backbone", a.backbone, *arch,
         "--train", out / "sim_train", "--test", out / "sim_test", "--n-train", sizes.n_train, "--n-test",
         sizes.n_test, "--epochs", sizes.epochs, "--batch-size", sizes.batch_size, "--seed", a.seed,
         *(["--freeze-backbone"] if sizes.freeze_backbone else []),
         "--json", out / "finetune.json", "--save-model", out / "finder.safetensors"],
        [out / "finetune.json", out / "finder.safetensors"],
    )  # fmt: skip
    steps.run(
        "predict_eval",
        [*cli, "predict", "--model", out / "finder.safetensors", "--data", out / "eval_shards", "--out",
         out / "pred_eval.csv"],
        [out / "pred_eval.csv"],
    )  # fmt: skip
    return evaluate(out, ev)


# ---------------------------------------------------------------------------------------- --real
def real_files(d: str | Path) -> dict[str, list[Path]]:
    """``DIR/lenses`` and ``DIR/non_lenses`` display images (PNG/JPEG), each folder non-empty."""
    d = Path(d)
    out = {}
    for sub in ("lenses", "non_lenses"):
        files = sorted(p for p in (d / sub).glob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise UserError(f"--real {d}: no PNG/JPEG images in {d / sub} (expected lenses/ and non_lenses/)")
        out[sub] = files
    return out


def run_real(a) -> dict:
    files = real_files(a.real)
    finder = Path(a.finder)
    need = [finder / "metrics.json", finder / "finder.safetensors"]
    if not all(p.is_file() for p in need):
        raise UserError(f"--finder {finder}: not a finished --eval run (expected metrics.json, finder.safetensors)")
    if not a.real_pixel_scale > 0:
        raise UserError(f"--real-pixel-scale: must be > 0, got {a.real_pixel_scale}")
    fm = json.loads((finder / "metrics.json").read_text())
    grid, t = fm["grid"], fm["sim_threshold"]["threshold"]
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    labels = out / "real_labels.csv"
    rows = [(p, int(sub == "lenses")) for sub in ("lenses", "non_lenses") for p in files[sub]]
    atomic_write_text(labels, "file,is_lens\n" + "".join(f"{p.resolve()},{y}\n" for p, y in rows))
    steps = Steps(out, tag="lens_finding")
    cli = [str(BIN / "hpc-lensiam")]
    steps.run(
        "ingest_real",
        [*cli, "ingest", *[p.resolve() for p, _ in rows], "--labels", labels, "--input-pixel-scale", a.real_pixel_scale,
         "--target-pixel-scale", grid["pixel_scale_arcsec"], "--num-pix", grid["num_pix"], "--orientation",
         "asis", "--out", out / "real_shards"],
        [out / "real_shards" / "manifest.json"],
    )  # fmt: skip
    steps.run(
        "predict_real",
        [*cli, "predict", "--model", finder / "finder.safetensors", "--data", out / "real_shards", "--out",
         out / "pred_real.csv"],
        [out / "pred_real.csv"],
    )  # fmt: skip
    by_file = read_scores(out / "pred_real.csv", "file")
    y = np.array([yy for _, yy in rows])
    s = np.array([by_file[str(p.resolve())] for p, _ in rows])
    lines = ["file,is_lens,score"] + [f"{p.name},{yy},{ss!r}" for (p, yy), ss in zip(rows, s.tolist())]
    atomic_write_text(out / "scores.csv", "\n".join(lines) + "\n")
    from hpc_lensiam.evaluation.classify import classification_report

    rep = summary(classification_report(y, s, N_BOOT))
    metrics = {
        "real_dir": str(Path(a.real)),
        "finder": str(finder),
        "finder_eval": fm["eval_dir"],
        "real_pixel_scale_arcsec": a.real_pixel_scale,
        "grid": grid,
        "at_sim_threshold": at_threshold(y, s, t),
        "real": rep,
        "finder_sim_test": fm["sim_test"],
        "non_lens_scores": {p.name: float(ss) for (p, yy), ss in zip(rows, s) if not yy},
    }
    atomic_write_json(out / "metrics.json", metrics)
    b = metrics["at_sim_threshold"]
    print(
        f"lens_finding --real: {rep['n_lenses']} lenses / {rep['n_non_lenses']} non-lenses; at the simulation "
        f"threshold {t:.4g}: recall {_fmt(b['recall'], b['recall_ci95'])}, FPR {_fmt(b['fpr'], b['fpr_ci95'])}; "
        f"AUC {_fmt(rep['auc'], rep['auc_ci95'])} -> {out / 'metrics.json'}",
        flush=True,
    )
    return metrics


# ---------------------------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bench.lens_finding", description=__doc__.split("\n\n")[0])
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--eval", metavar="DIR", help="images.npy + params.csv of another team's simulations")
    what.add_argument("--real", metavar="DIR", help="lenses/ and non_lenses/ display images (with --finder)")
    p.add_argument("--out", required=True, metavar="OUT")
    p.add_argument("--quick", action="store_true", help="sizes for < 25 minutes on 2 CPU cores")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="survey-config change (population, selection, ...), repeatable")  # fmt: skip
    p.add_argument("--backbone", default="none", help="finetune --backbone: an exported backbone or none")
    p.add_argument("--arch", default="resnet18", help="with --backbone none")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ranks", type=int, default=1, help="MPI ranks of the simulate steps")
    p.add_argument("--n-train", type=int, default=None, help="override the training set size")
    p.add_argument("--n-test", type=int, default=None, help="override the held-out simulation set size")
    p.add_argument("--epochs", type=int, default=None, help="override the epochs")
    p.add_argument("--freeze-backbone", action=argparse.BooleanOptionalAction, default=None,
                   help="train only a logistic head on the backbone's features (default: with --quick)")  # fmt: skip
    p.add_argument("--finder", metavar="OUT", help="--real: the --eval run whose model and threshold to use")
    p.add_argument("--real-pixel-scale", type=float, default=0.186, help="--real: arcsec/pixel (CFHTLS 0.186)")
    return p


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    t0 = time.perf_counter()
    try:
        if a.ranks < 1:
            raise UserError(f"--ranks: must be >= 1, got {a.ranks}")
        if a.real and not a.finder:
            raise UserError("--real: needs --finder OUT (a finished --eval run)")
        metrics = run_real(a) if a.real else run_eval(a)
    except UserError as exc:
        print(f"hpc-lensiam: error: {exc}", file=sys.stderr)
        return 2
    if a.eval:
        print(Path(a.out, "report.md").read_text(), flush=True)
        print_ratio(metrics["gap"]["auc"]["sim_minus_eval"], "held-out sims minus eval-set ROC AUC: the realism gap")
    print(f"lens_finding: {time.perf_counter() - t0:.0f} s wall", flush=True)
    return 0 if metrics else 1


if __name__ == "__main__":
    sys.exit(main())
