"""The metrics lens finders report: ROC curve, ROC AUC with a bootstrap interval, TPR at fixed FPR.

Used by ``finetune --task classify`` and by the probe where embeddings carry ``is_lens``.

- ROC AUC: the Mann-Whitney probability that a random lens scores above a random non-lens (ties
  count one half); 95% interval from a seeded bootstrap over the test images (resampling lenses and
  non-lenses together, as the test set was drawn).
- TPR at FPR = f: the largest true-positive rate of any threshold whose false-positive rate is <= f,
  i.e. a threshold above all but floor(f N_neg) non-lens scores. With N_neg non-lenses the smallest
  resolvable FPR is 1/N_neg: below it the number means "no false positive at all", and the report
  says so (``resolvable``: f >= 1/N_neg).
"""

from __future__ import annotations

import numpy as np

from .stats import bootstrap_auc, roc_auc  # one AUC for the package (Mann-Whitney, ties one half)

__all__ = ["FPR_POINTS", "roc_auc", "roc_curve", "tpr_at_fpr", "bootstrap", "classification_report", "plot_roc"]

FPR_POINTS = (1e-2, 1e-3)


def roc_curve(y: np.ndarray, score: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(fpr, tpr, thresholds), from (0, 0) to (1, 1), one point per distinct score (sklearn's)."""
    from sklearn.metrics import roc_curve as _roc

    fpr, tpr, thr = _roc(np.asarray(y, int), np.asarray(score, float), drop_intermediate=False)
    return fpr, tpr, thr


def tpr_at_fpr(y: np.ndarray, score: np.ndarray, fpr_max: float) -> float:
    """Largest TPR over thresholds with FPR <= fpr_max."""
    y = np.asarray(y, bool)
    neg = np.sort(np.asarray(score, float)[~y])[::-1]
    pos = np.asarray(score, float)[y]
    if len(neg) == 0 or len(pos) == 0:
        return float("nan")
    allowed = int(np.floor(fpr_max * len(neg) + 1e-9))  # non-lenses that may score above the threshold
    if allowed >= len(neg):
        return 1.0
    return float((pos > neg[allowed]).mean())


def bootstrap(y: np.ndarray, score: np.ndarray, fn, n_boot: int = 1000, seed: int = 0) -> tuple[float, float]:
    """95% percentile interval of ``fn(y, score)`` over seeded bootstrap resamples of the images."""
    y, score = np.asarray(y), np.asarray(score)
    idx = np.random.default_rng(seed).integers(0, len(y), size=(n_boot, len(y)))
    vals = np.array([fn(y[i], score[i]) for i in idx])
    lo, hi = np.nanpercentile(vals, [2.5, 97.5])
    return float(lo), float(hi)


def classification_report(
    y: np.ndarray, score: np.ndarray, n_boot: int = 1000, seed: int = 0, curve_points: int = 200
) -> dict:
    """AUC [95% CI], TPR at FPR 1e-2 and 1e-3 [95% CI], class counts and the ROC curve (thinned)."""
    y = np.asarray(y, int)
    score = np.asarray(score, float)
    n_pos, n_neg = int(y.sum()), int(len(y) - y.sum())
    out = {
        "auc": roc_auc(y, score),
        "auc_ci95": list(bootstrap_auc(y, score, n_boot, seed)),
        "n_lenses": n_pos,
        "n_non_lenses": n_neg,
        "min_resolvable_fpr": 1.0 / n_neg if n_neg else None,
        "tpr_at_fpr": {},
    }
    for f in FPR_POINTS:
        fn = lambda yy, ss, f=f: tpr_at_fpr(yy, ss, f)  # noqa: E731
        out["tpr_at_fpr"][f"{f:g}"] = {
            "tpr": tpr_at_fpr(y, score, f),
            "ci95": list(bootstrap(y, score, fn, n_boot, seed)),
            "resolvable": bool(n_neg and f >= 1.0 / n_neg),
        }
    fpr, tpr, thr = roc_curve(y, score)
    if len(fpr) > curve_points:  # keep the ends and an even spread of points
        keep = np.unique(np.linspace(0, len(fpr) - 1, curve_points).round().astype(int))
        fpr, tpr, thr = fpr[keep], tpr[keep], thr[keep]
    out["roc"] = {
        "fpr": [float(v) for v in fpr],
        "tpr": [float(v) for v in tpr],
        "threshold": [float(v) if np.isfinite(v) else None for v in thr],
    }
    return out


def plot_roc(report: dict, out_png: str, title: str = "") -> str:
    """The ROC curve of a ``classification_report`` as a PNG (log FPR axis, the FPR points marked)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..core.io import atomic_path

    fpr = np.asarray(report["roc"]["fpr"])
    tpr = np.asarray(report["roc"]["tpr"])
    fig, ax = plt.subplots(figsize=(4.2, 3.6))
    floor = report["min_resolvable_fpr"] or 1e-4
    ax.plot(
        np.clip(fpr, floor / 2, 1),
        tpr,
        color="C0",
        label=f"AUC {report['auc']:.3f} [{report['auc_ci95'][0]:.3f}, {report['auc_ci95'][1]:.3f}]",
    )
    for f, v in report["tpr_at_fpr"].items():
        ax.axvline(float(f), color="0.7", lw=0.8, ls=":")
        ax.plot(
            [float(f)],
            [v["tpr"]],
            "o",
            ms=4,
            label=f"TPR@FPR={f}: {v['tpr']:.2f}" + ("" if v["resolvable"] else " (unresolved)"),
        )
    ax.set_xscale("log")
    ax.set_xlim(floor / 2, 1)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("false-positive rate")
    ax.set_ylabel("true-positive rate")
    ax.set_title(title, fontsize=8)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    with atomic_path(out_png) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    return str(out_png)
