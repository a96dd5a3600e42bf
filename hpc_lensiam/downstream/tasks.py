"""What ``finetune`` learns: a task object = labels, head target encoding, loss, metrics.

- ``regress`` (default): one lens parameter; targets standardised with the train split's mean/std,
  MSE loss; test R^2 with a bootstrap interval, residual sigma, RMSE, bias.
- ``classify --target is_lens``: the lens-finding task on survey-family data (docs/survey.md); a
  logistic head (the same Linear(D, 1), its output a logit), binary cross-entropy; ROC AUC with a
  bootstrap interval, TPR at FPR 1e-2 and 1e-3, the ROC curve in the JSON and as a PNG.

The training loop (finetune.py) is the same for every task: same splits, seeds, epochs, model selection
on the validation loss. What a task class provides (``TASKS`` maps ``--task NAME`` to it):

- ``name``; ``__init__(target)`` refuses a ``--target`` the task cannot learn (UserError);
- ``labels(rows, what)``: its column of the (n, 9) label rows (the 8 lens parameters, then is_lens),
  refusing samples without that label; ``fit(y_train)``: anything learnt from the train split's labels;
- ``state()`` / ``load_state(d)``: what ``fit`` learnt, as plain numbers (saved with a fine-tuned model);
- ``encode(y)`` -> the head's float targets; ``loss(out, t)`` on the head's (B,) output (torch);
  ``decode(raw)`` -> the reported test predictions;
- ``report(y, p, n_boot, seed, out_json)`` -> (metrics dict merged into the JSON report, one summary line).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..core.errors import UserError
from ..shards.manifest import LENS_PARAMS, UNITS

IS_LENS_COLUMN = len(LENS_PARAMS)  # load_images labels: the 8 lens parameters, then is_lens


def check_target(target: str) -> int:
    """Column of a regression ``--target`` among the 8 lens parameters; a UserError naming them otherwise."""
    if target not in LENS_PARAMS:
        raise UserError(f"--target: unknown lens parameter {target!r} (expected one of: {', '.join(LENS_PARAMS)})")
    return LENS_PARAMS.index(target)


class RegressTask:
    name = "regress"

    def __init__(self, target: str):
        self.target, self.column = target, check_target(target)
        self.mu, self.sd = 0.0, 1.0

    def labels(self, rows: np.ndarray, what: str) -> np.ndarray:
        y = rows[:, self.column]
        if not np.isfinite(y).all():  # ingested real images carry only the labels they were given
            raise UserError(
                f"{what}: {int((~np.isfinite(y)).sum())} of {len(y)} samples have no "
                f"{self.target!r} label (ingest them with --labels)"
            )
        return y

    def fit(self, y_train: np.ndarray) -> None:
        self.mu, self.sd = float(y_train.mean()), float(y_train.std()) or 1.0

    def state(self) -> dict:
        """What ``fit`` learnt, saved with a model so ``predict`` decodes the head's output the same way."""
        return {"target_mean": self.mu, "target_std": self.sd}

    def load_state(self, state: dict) -> None:
        self.mu, self.sd = float(state["target_mean"]), float(state["target_std"])

    def encode(self, y: np.ndarray) -> np.ndarray:
        return (y - self.mu) / self.sd

    def loss(self, out, t):
        return ((out - t) ** 2).mean()

    def decode(self, raw: np.ndarray) -> np.ndarray:
        return raw.astype(np.float64) * self.sd + self.mu

    def report(self, y: np.ndarray, p: np.ndarray, n_boot: int, seed: int, out_json: str | None) -> tuple[dict, str]:
        from ..evaluation.stats import bootstrap_r2, r2

        resid = p - y
        score, ci = r2(y, p), bootstrap_r2(y, p, n_boot, seed)
        unit = UNITS.get(self.target, "")
        rep = {
            "unit": unit or "dimensionless",
            "r2": score,
            "r2_ci95": list(ci),
            "residual_sigma": float(resid.std(ddof=1)),
            "rmse": float(np.sqrt((resid**2).mean())),
            "bias": float(resid.mean()),
            "target_train_mean": self.mu,
            "target_train_std": self.sd,
        }
        u = f" {unit}" if unit else ""
        line = (
            f"{self.target} R^2 = {score:.3f} [{ci[0]:.3f}, {ci[1]:.3f}] (95% bootstrap), residual sigma = "
            f"{rep['residual_sigma']:.4f}{u}"
        )
        return rep, line


class ClassifyTask:
    name = "classify"

    def __init__(self, target: str):
        if target != "is_lens":
            raise UserError(f"--target: --task classify takes --target is_lens, got {target!r}")
        self.target, self.column = target, IS_LENS_COLUMN

    def labels(self, rows: np.ndarray, what: str) -> np.ndarray:
        y = rows[:, self.column]
        if np.isnan(y).any():
            raise UserError(
                f"{what}: samples without is_lens labels (make the set with "
                "`hpc-lensiam simulate --family survey`, or ingest real images with --labels)"
            )
        if len(np.unique(y)) < 2:
            raise UserError(
                f"{what}: only one class (is_lens = {int(y[0])}) in the samples used; "
                "expected lenses and non-lenses (--lens-fraction between 0 and 1)"
            )
        return y

    def fit(self, y_train: np.ndarray) -> None:
        if len(np.unique(y_train)) < 2:
            raise UserError("--n-train: the training split holds one class only; use more samples")

    def state(self) -> dict:
        return {}

    def load_state(self, state: dict) -> None:
        pass

    def encode(self, y: np.ndarray) -> np.ndarray:
        return y.astype(np.float64)

    def loss(self, out, t):
        import torch.nn.functional as F

        return F.binary_cross_entropy_with_logits(out, t)

    def decode(self, raw: np.ndarray) -> np.ndarray:
        return 1.0 / (1.0 + np.exp(-raw.astype(np.float64)))  # lens probability

    def report(self, y: np.ndarray, p: np.ndarray, n_boot: int, seed: int, out_json: str | None) -> tuple[dict, str]:
        from ..evaluation.classify import FPR_POINTS, classification_report, plot_roc

        rep = classification_report(y, p, n_boot, seed)
        if out_json:
            png = str(Path(out_json).with_suffix("")) + "_roc.png"
            rep["roc_png"] = plot_roc(rep, png, title=f"lens finding: {Path(out_json).stem}")
        tprs = ", ".join(f"TPR@FPR={f:.0e}".replace("e-0", "e-") + f" = {_tpr_text(rep, f)}" for f in FPR_POINTS)
        line = (
            f"is_lens AUC = {rep['auc']:.3f} [{rep['auc_ci95'][0]:.3f}, {rep['auc_ci95'][1]:.3f}] "
            f"(95% bootstrap), {tprs}; {rep['n_lenses']} lenses / {rep['n_non_lenses']} non-lenses"
        )
        return rep, line


def _tpr_text(rep: dict, fpr: float) -> str:
    """TPR at ``fpr`` with its interval, or "unresolved" when the test set has fewer than 1/fpr
    non-lenses (then the number only says "no false positive at all", at any FPR below 1/N_neg)."""
    t = rep["tpr_at_fpr"][f"{fpr:g}"]
    if not t["resolvable"]:
        return f"unresolved (FPR floor 1/{rep['n_non_lenses']}: too few non-lenses)"
    return f"{t['tpr']:.2f} [{t['ci95'][0]:.2f}, {t['ci95'][1]:.2f}]"


# ``--task NAME`` -> its class: a new task is one class with the methods above plus one line here
TASKS = {"regress": RegressTask, "classify": ClassifyTask}


def make_task(task: str, target: str):
    """The task object for ``--task`` and ``--target``; a UserError naming the registered tasks otherwise."""
    if task not in TASKS:
        raise UserError(f"--task: {task!r} is not one of {', '.join(TASKS)}")
    return TASKS[task](target)
