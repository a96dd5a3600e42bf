"""``hpc-lensiam predict``: apply fine-tuned models to shard sets and write a catalogue.

``hpc-lensiam predict --model M [M ...] --data DIR [DIR ...] --out catalogue.csv|.fits``

- ``--model``: one or more ``finetune --save-model`` files of one task and target (the seeds of one
  recipe: an ensemble). Each is loaded with safetensors (no code in a weights file ever runs).
- Uncertainty. Regression (theta_E in arcsec, ...): the prediction is the ensemble mean and its
  1-sigma uncertainty ``sqrt(sd_seeds^2 + sigma_val^2)``: the spread over the fine-tuning seeds (what
  the fit does not pin down) plus the models' residual sd on their validation split (the scatter
  of a single model around the truth, which a seed ensemble alone does not see: with 3 seeds the
  spread alone covered 32% of held-out truths, the sum 76%; docs/evaluation.md). It is one number per model, so it
  does not grow for an unusual image; a heteroscedastic head would, at the cost of a second output
  and a Gaussian-NLL loss (not built). Calibration is measured, not assumed: with labels the
  metrics give the fraction of truths within 1 and 2 sigma (0.68 / 0.95 when calibrated).
  Lens finding: the mean lens probability over the models and their sd.
- The pixel grid: a model records the grid it was trained on (pixel scale, image size). A data set
  on another grid is refused (a theta_E regressor reads arcsec through pixels: on a 2x coarser grid
  every radius would be read 2x too large), unless ``--allow-grid-mismatch`` (then a warning).
- Output: one row per image: ``name`` (the sample's name when the set has one, else its key),
  ``key``, ``source`` (the data folder), the source file of an ingested image, the prediction,
  its uncertainty, each model's prediction, and the true value when the set is labelled. With labels
  also ``<out>.metrics.json`` and ``<out>_pred_vs_true.png`` (the 1:1 line drawn).
- One process, or every rank of ``torchrun`` (``torchrun --nproc_per_node N -m hpc_lensiam predict
  ...``): every rank reads each folder (whole, into memory: ~48 kB per 110 px image), predicts every
  N-th image from its rank on with every model, and rank 0 gathers the shares and writes the outputs.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np

from ..core.config import from_flags
from ..core.errors import UserError
from ..core.io import atomic_path, atomic_write_json, check_output_file
from ..shards.manifest import data_grid
from .config import PredictConfig
from .model_file import load_model, read_meta
from .tasks import make_task

TABLE_SUFFIXES = (".csv", ".fits")
GRID_TOLERANCE = 0.01  # relative pixel-scale difference taken as the same grid


def check_args(models: list[str], data_dirs: list[str], out: str, batch_size: int) -> list[dict]:
    """Every flag and every model's metadata, before an image is read; the models' metadata."""
    if Path(out).suffix not in TABLE_SUFFIXES:
        raise UserError(f"--out {out}: expected a catalogue file ending in {' or '.join(TABLE_SUFFIXES)}")
    check_output_file(out, "--out")
    metas = [read_meta(m) for m in models]
    first = metas[0]
    for m, meta in zip(models[1:], metas[1:]):
        for key in ("task", "target"):
            if meta.get(key) != first.get(key):
                raise UserError(
                    f"--model {m}: {key} {meta.get(key)!r}, but {models[0]} has {first.get(key)!r} "
                    "(an ensemble is models of one task and target)"
                )
    for d in data_dirs:
        if not Path(d).is_dir():
            raise UserError(f"--data {d}: no such folder")
    return metas


def check_grid(data_dir: str, models: list[str], metas: list[dict], allow: bool) -> str | None:
    """None when ``data_dir`` is on every model's training grid; else a refusal, or with ``allow`` the
    warning to print."""
    grid = data_grid(data_dir)
    for m, meta in zip(models, metas):
        want = meta.get("input") or {}
        problems = []
        a, b = grid["pixel_scale_arcsec"], want.get("pixel_scale_arcsec")
        if a is not None and b is not None and abs(a - b) > GRID_TOLERANCE * b:
            problems.append(f'pixel scale {a:g}"/px, the model was trained on {b:g}"/px')
        if grid["image_shape"] and want.get("image_shape") and list(grid["image_shape"]) != list(want["image_shape"]):
            if meta.get("img_size"):  # a ViT is bound to its size: never
                raise UserError(
                    f"--data {data_dir}: images are {grid['image_shape']} px but the {meta['arch']} in {m} "
                    f"takes {want['image_shape']} (a ViT at its training size)"
                )
            problems.append(f"images {grid['image_shape']} px, trained on {want['image_shape']}")
        if problems:
            text = f"--data {data_dir}: another pixel grid than {m}'s ({'; '.join(problems)})"
            if not allow:
                raise UserError(
                    text + ": predictions would read angles through the wrong pixels; ingest or simulate the data "
                    "on the model's grid, or pass --allow-grid-mismatch"
                )
            return "predict: warning: " + text
    return None


def _name_and_columns(key: str, params: dict) -> tuple[str, dict]:
    """A catalogue row's name and the columns a sample carries besides its labels (an ingested
    image's source file; a catalogue's own columns when the set kept them)."""
    cols = {}
    kept = params.get("catalog") if isinstance(params.get("catalog"), dict) else {}
    for k, v in kept.items():
        if isinstance(v, (str, int, float, bool)) or v is None:
            cols[k] = v
    ingest = params.get("ingest") if isinstance(params.get("ingest"), dict) else {}
    if ingest.get("file"):
        cols["file"] = ingest["file"]
    name = str(params.get("name") or kept.get("name") or kept.get("id") or key)
    return name, cols


def regression_metrics(y: np.ndarray, p: np.ndarray, sigma: np.ndarray, n_boot: int = 1000, seed: int = 0) -> dict:
    """Point and calibration metrics of predictions ``p`` +- ``sigma`` against truths ``y``."""
    from scipy.stats import spearmanr

    from ..evaluation.stats import r2

    d = p - y
    rel = np.abs(d) / np.abs(y)
    out = {
        "n": int(len(y)),
        "median_abs_rel_error": float(np.median(rel)),
        "median_bias": float(np.median(d)),
        "median_rel_bias": float(np.median(d / np.abs(y))),
        "rmse": float(np.sqrt(np.mean(d**2))),
        "outlier_fraction": float(np.mean(rel > 0.3)),
        "within_1sigma": float(np.mean(np.abs(d) <= sigma)),
        "within_2sigma": float(np.mean(np.abs(d) <= 2 * sigma)),
    }
    if len(y) >= 3:
        out["r2"] = float(r2(y, p))
        out["spearman"] = float(spearmanr(y, p).statistic)
    if len(y) >= 2 and n_boot:  # bootstrap intervals over objects
        rng = np.random.default_rng(seed)
        idx = rng.integers(0, len(y), size=(n_boot, len(y)))
        out["median_abs_rel_error_ci95"] = [float(v) for v in np.percentile(np.median(rel[idx], axis=1), [2.5, 97.5])]
        out["within_1sigma_ci95"] = [
            float(v) for v in np.percentile(np.mean(np.abs(d)[idx] <= sigma[idx], axis=1), [2.5, 97.5])
        ]
    return out


def plot_pred_vs_true(y, p, sigma, path: str, title: str, unit: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.2, 4.0), dpi=120)
    lo, hi = float(min(y.min(), p.min())), float(max(y.max(), p.max()))
    pad = 0.05 * (hi - lo or 1.0)
    ax.plot([lo - pad, hi + pad], [lo - pad, hi + pad], "k--", lw=1, label="1:1")
    ax.errorbar(y, p, yerr=sigma, fmt="o", ms=3, lw=0.8, alpha=0.8, label="prediction +- 1 sigma")
    u = f" [{unit}]" if unit else ""
    ax.set(xlabel=f"true{u}", ylabel=f"predicted{u}", title=title, xlim=(lo - pad, hi + pad), ylim=(lo - pad, hi + pad))
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return path


def write_table(rows: list[dict], path: str) -> None:
    """The catalogue as CSV or FITS (astropy Table; missing values masked), written atomically."""
    from astropy.table import MaskedColumn, Table

    names: list[str] = []
    for r in rows:
        names.extend(k for k in r if k not in names)
    cols = []
    for n in names:
        vals = [r.get(n) for r in rows]
        mask = [v is None or (isinstance(v, float) and math.isnan(v)) for v in vals]
        kinds = {type(v) for v, m in zip(vals, mask) if not m}
        if kinds <= {int, np.int64} and kinds:  # counts, ranks, flags, ids: integers stay integers
            data = [0 if m else int(v) for v, m in zip(vals, mask)]
        elif kinds <= {int, float, bool, np.float64, np.float32} and kinds:
            data = [np.nan if m else float(v) for v, m in zip(vals, mask)]
        else:
            data = ["" if m else str(v) for v, m in zip(vals, mask)]
        cols.append(MaskedColumn(data, name=n, mask=mask))
    table = Table(cols)
    fmt = "ascii.csv" if path.endswith(".csv") else "fits"
    with atomic_path(path) as tmp:
        table.write(str(tmp), format=fmt, overwrite=True)


def predict(
    models: list[str] | None = None,
    data_dirs: list[str] | None = None,
    out: str | None = None,
    batch_size: int | None = None,
    allow_grid_mismatch: bool | None = None,
    verify: bool | None = None,
    n_boot: int | None = None,
    config: PredictConfig | None = None,
) -> dict:
    """Predict every image of ``data_dirs`` with the ensemble ``models``; write the catalogue ``out``
    (and metrics + a plot where the sets are labelled); return the metrics dict."""
    from ..core.runtime import ControlGroup, device_for
    from ..shards.reader import load_images

    if config is None:  # the Python API's arguments (None: the config's default), validated once
        config = from_flags(
            PredictConfig,
            dict(
                model=None if models is None else [str(m) for m in models],
                data=None if data_dirs is None else [str(d) for d in data_dirs],
                out=None if out is None else str(out),
                batch_size=batch_size,
                allow_grid_mismatch=allow_grid_mismatch,
                verify=verify,
                n_boot=n_boot,
            ),
        )
    c = config
    models, data_dirs, out, batch_size, allow_grid_mismatch = (
        c.model,
        c.data,
        c.out,
        c.batch_size,
        c.allow_grid_mismatch,
    )
    verify, n_boot = c.verify, c.n_boot
    world = ControlGroup(command="predict")  # one process, or every rank of torchrun
    try:
        metas = check_args(models, data_dirs, out, batch_size)
        warnings = [w for w in (check_grid(d, models, metas, allow_grid_mismatch) for d in data_dirs) if w]
        for w in warnings if world.rank == 0 else ():
            print(w, file=sys.stderr, flush=True)
        device = device_for(world.rt)
        if device.type == "cuda":
            import torch

            torch.cuda.set_device(device)
        nets, tasks = [], []
        for m, meta in zip(models, metas):
            net, _ = load_model(m)
            nets.append(net.to(device))
            t = make_task(meta["task"], meta["target"])
            t.load_state(meta["task_state"])
            tasks.append(t)
        rows, truths = [], []
        for d in data_dirs:
            keys, xs, labels, params = load_images(d, what="--data", verify=verify, with_params=True)
            each = _predict_share(world, nets, tasks, xs, batch_size, device)
            if world.rank == 0:
                truths.append(labels[:, tasks[0].column])
                rows.extend(_rows(d, keys, params, each, truths[-1], metas))
        result = _write_outputs(rows, truths, metas, models, data_dirs, out, n_boot) if world.rank == 0 else None
        # nobody leaves before rank 0 has written, as in `embed` (see also exit_torchrun_rank)
        world.barrier()
        return result if world.rank == 0 else {"rank": world.rank}
    finally:
        world.close()


def _predict_share(world, nets, tasks, xs: np.ndarray, batch_size: int, device) -> np.ndarray | None:
    """Every model's decoded prediction (M, N) of the images ``xs``: this rank predicts every
    ``world.size``-th image from its rank on, rank 0 gathers the shares (None on other ranks)."""
    from .finetune import predict as run_net

    mine = np.arange(world.rank, len(xs), world.size)
    part = np.stack([t.decode(run_net(net, xs[mine], batch_size, device)) for net, t in zip(nets, tasks)])
    shares = world.gather((mine, part))
    if shares is None:
        return None
    each = np.empty((len(nets), len(xs)))
    for idx, pred in shares:
        each[:, idx] = pred
    return each


def columns(meta: dict) -> tuple[str, str]:
    """The catalogue's prediction and uncertainty columns for a model's task."""
    if meta["task"] == "classify":
        return "p_lens", "p_lens_sd"
    return f"{meta['target']}_pred", f"{meta['target']}_sigma"


def _rows(data_dir: str, keys, params, each: np.ndarray, truth: np.ndarray, metas: list[dict]) -> list[dict]:
    """Catalogue rows of one folder: the ensemble's mean and sigma (see the module docstring)."""
    task, target = metas[0]["task"], metas[0]["target"]
    pred_col, sig_col = columns(metas[0])
    mean = each.mean(axis=0)
    spread = each.std(axis=0, ddof=1) if len(each) > 1 else np.zeros_like(mean)
    if task == "regress":
        aleatoric = np.sqrt(np.mean([meta["val_residual_sigma"] ** 2 for meta in metas]))
        sigma = np.sqrt(spread**2 + aleatoric**2)
    else:
        sigma = spread
    rows = []
    for i, key in enumerate(keys):
        name, cols = _name_and_columns(key, params[i])
        row = {"name": name, "key": key, "source": str(Path(data_dir).resolve()), **cols}
        row[pred_col], row[sig_col] = float(mean[i]), float(sigma[i])
        for j in range(len(each)):
            row[f"{pred_col}_m{j}"] = float(each[j, i])
        row[f"{target}_true"] = float(truth[i]) if np.isfinite(truth[i]) else None
        rows.append(row)
    return rows


def _write_outputs(rows, truths, metas, models, data_dirs, out: str, n_boot: int) -> dict:
    """Rank 0: the catalogue, and where objects are labelled the metrics file and the plot."""
    task, target, unit = metas[0]["task"], metas[0]["target"], metas[0].get("unit", "")
    pred_col, sig_col = columns(metas[0])
    write_table(rows, out)
    y = np.concatenate(truths)
    p = np.array([r[pred_col] for r in rows])
    s = np.array([r[sig_col] for r in rows])
    labelled = np.isfinite(y)
    result = {"n": len(rows), "n_labelled": int(labelled.sum()), "models": [str(m) for m in models], "out": out}
    stem = str(Path(out).with_suffix(""))
    line = f"predict: {len(rows)} image(s) from {len(data_dirs)} folder(s) x {len(models)} model(s) -> {out}"
    if labelled.sum() >= 2:
        yl, pl, sl = y[labelled], p[labelled], s[labelled]
        if task == "regress":
            metrics = regression_metrics(yl, pl, sl, n_boot)
            result["plot"] = plot_pred_vs_true(yl, pl, sl, stem + "_pred_vs_true.png", f"predict: {target}", unit)
            line += (
                f"; {labelled.sum()} labelled: median |d|/true {metrics['median_abs_rel_error']:.3f}, "
                f"median bias {metrics['median_bias']:+.3f}{' ' + unit if unit else ''}, outliers "
                f"{metrics['outlier_fraction']:.0%}, within 1/2 sigma {metrics['within_1sigma']:.0%}/"
                f"{metrics['within_2sigma']:.0%}"
            )
        else:
            from ..evaluation.classify import classification_report

            metrics = classification_report(yl.astype(int), pl, n_boot, 0) if len(np.unique(yl)) == 2 else {}
            if metrics:
                line += f"; AUC {metrics['auc']:.3f} [{metrics['auc_ci95'][0]:.3f}, {metrics['auc_ci95'][1]:.3f}]"
        result["metrics"] = metrics
        atomic_write_json(stem + ".metrics.json", result)
        line += f"; metrics {stem}.metrics.json"
    print(line, flush=True)
    return result
