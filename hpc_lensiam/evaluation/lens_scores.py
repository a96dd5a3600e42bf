"""Scores of a regressor on a handful of real lenses, each with a bootstrap interval over lenses.

A real-lens benchmark has few labelled objects (five, a few hundred at most), predictions with a
1-sigma uncertainty, and several arms (pretraining methods) predicting the same lenses. For such a set
the mean and R^2 are dominated by one outlier, so the scores are robust ones:

- ``median_abs_rel_error``: median of |pred - true| / true (the "~10% scatter" of the literature);
- ``median_rel_bias``: median of (pred - true) / true, and ``median_bias`` in the target's unit;
- ``spearman``: rank correlation of pred with true (does the net order the lenses);
- ``outlier_fraction``: fraction with |pred - true| / true > ``outlier`` (0.3);
- ``coverage_1sigma``: fraction with |pred - true| <= sigma (0.68 when sigma is calibrated);
- ``response_slope``: least-squares slope of pred on true (1 when the predictions follow the truths;
  below 1 when they are compressed towards the middle, as a network does on images unlike its
  training set: the number that separates "ordered right but squeezed" from "biased").

:func:`lens_scores` gives each with a 95% percentile interval over resampled *lenses* (with five
lenses the interval is wide, and says so). :func:`paired_differences` gives score(A) - score(B) on the
same lenses with the same resamples for both arms, so what the lenses have in common (one lens hard
for every arm) cancels. NaN marks a score undefined on a resample (a Spearman of a resample whose
truths are all the same lens); percentiles skip NaN.
"""

from __future__ import annotations

import numpy as np

SCORES = (
    "median_abs_rel_error",
    "median_rel_bias",
    "median_bias",
    "spearman",
    "outlier_fraction",
    "coverage_1sigma",
    "response_slope",
)
OUTLIER = 0.3


def _arrays(y, p, sigma=None):
    y, p = np.asarray(y, np.float64), np.asarray(p, np.float64)
    if y.shape != p.shape or y.ndim != 1:
        raise ValueError(f"truths and predictions must be 1-D of one length, got {y.shape} and {p.shape}")
    if sigma is None:
        return y, p, None
    s = np.asarray(sigma, np.float64)
    if s.shape != y.shape:
        raise ValueError(f"sigma must have one value per lens, got {s.shape} for {y.shape}")
    return y, p, s


def median_abs_rel_error(y, p) -> float:
    y, p, _ = _arrays(y, p)
    return float(np.median(np.abs(p - y) / np.abs(y)))


def median_rel_bias(y, p) -> float:
    y, p, _ = _arrays(y, p)
    return float(np.median((p - y) / np.abs(y)))


def median_bias(y, p) -> float:
    y, p, _ = _arrays(y, p)
    return float(np.median(p - y))


def _ranks(x: np.ndarray) -> np.ndarray:
    """Ranks 1..n, ties sharing their average rank (as Spearman's definition wants)."""
    order = np.argsort(x, kind="stable")
    ranks = np.empty(len(x))
    xs = x[order]
    starts = np.flatnonzero(np.r_[True, xs[1:] != xs[:-1]])
    ends = np.r_[starts[1:], len(x)]
    for a, b in zip(starts, ends):
        ranks[order[a:b]] = (a + b + 1) / 2  # mean of ranks a+1 .. b
    return ranks


def spearman(y, p) -> float:
    """Spearman rank correlation; NaN with < 2 distinct truths or predictions."""
    y, p, _ = _arrays(y, p)
    ry, rp = _ranks(y), _ranks(p)
    ry, rp = ry - ry.mean(), rp - rp.mean()
    den = np.sqrt((ry**2).sum() * (rp**2).sum())
    return float((ry * rp).sum() / den) if den > 0 else float("nan")


def outlier_fraction(y, p, threshold: float = OUTLIER) -> float:
    y, p, _ = _arrays(y, p)
    return float(np.mean(np.abs(p - y) / np.abs(y) > threshold))


def coverage(y, p, sigma, k: float = 1.0) -> float:
    """Fraction of truths within k sigma of the prediction."""
    y, p, s = _arrays(y, p, sigma)
    return float(np.mean(np.abs(p - y) <= k * s))


def response_slope(y, p) -> float:
    """Least-squares slope of the predictions on the truths, cov(y, p) / var(y); NaN with one distinct truth."""
    y, p, _ = _arrays(y, p)
    dy = y - y.mean()
    var = float((dy**2).sum())
    return float((dy * (p - p.mean())).sum() / var) if var > 0 else float("nan")


def _all(y, p, s) -> dict:
    return {
        "median_abs_rel_error": median_abs_rel_error(y, p),
        "median_rel_bias": median_rel_bias(y, p),
        "median_bias": median_bias(y, p),
        "spearman": spearman(y, p),
        "outlier_fraction": outlier_fraction(y, p),
        "coverage_1sigma": coverage(y, p, s),
        "response_slope": response_slope(y, p),
    }


def _resamples(n: int, n_boot: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, n, size=(n_boot, n))


def _interval(values) -> list:
    v = np.asarray(values, np.float64)
    v = v[np.isfinite(v)]
    if len(v) == 0:
        return [None, None]
    lo, hi = np.percentile(v, [2.5, 97.5])
    return [float(lo), float(hi)]


def bootstrap_score_interval(fn, arrays, n_boot: int = 2000, seed: int = 0) -> list:
    """95% percentile interval of ``fn(*arrays)`` over resampled objects (rows of every array together)."""
    arrays = [np.asarray(a, np.float64) for a in arrays]
    idx = _resamples(len(arrays[0]), n_boot, seed)
    return _interval([fn(*(a[i] for a in arrays)) for i in idx])


def lens_scores(y, p, sigma, n_boot: int = 2000, seed: int = 0) -> dict:
    """Every score of :data:`SCORES`: ``{name: {"value": v, "ci95": [lo, hi]}}``, plus ``n``.

    Only lenses with a finite truth are scored; with fewer than two there is nothing to score."""
    y, p, s = _arrays(y, p, sigma)
    keep = np.isfinite(y)
    y, p, s = y[keep], p[keep], s[keep]
    out = {"n": int(len(y))}
    if len(y) < 2:
        return out
    point = _all(y, p, s)
    boots = [_all(y[i], p[i], s[i]) for i in _resamples(len(y), n_boot, seed)]
    for name in SCORES:
        v = point[name]
        out[name] = {"value": v if np.isfinite(v) else None, "ci95": _interval([b[name] for b in boots])}
    return out


def paired_differences(y, p_a, s_a, p_b, s_b, n_boot: int = 2000, seed: int = 0) -> dict:
    """score(A) - score(B) on the same lenses, each with a 95% interval from the same resamples.

    ``{name: {"value": d, "ci95": [lo, hi], "a_better_fraction": f}}`` where ``f`` is the fraction of
    resamples in which A is better (lower |error|, |bias|, outliers; higher Spearman; coverage nearer
    0.683; slope nearer 1): the paired bootstrap's answer to "is A better than B on lenses like these"."""
    y, p_a, s_a = _arrays(y, p_a, s_a)
    _, p_b, s_b = _arrays(y, p_b, s_b)
    keep = np.isfinite(y)
    y, p_a, s_a, p_b, s_b = y[keep], p_a[keep], s_a[keep], p_b[keep], s_b[keep]
    out = {"n": int(len(y))}
    if len(y) < 2:
        return out
    a0, b0 = _all(y, p_a, s_a), _all(y, p_b, s_b)
    boots = [(_all(y[i], p_a[i], s_a[i]), _all(y[i], p_b[i], s_b[i])) for i in _resamples(len(y), n_boot, seed)]
    for name in SCORES:
        d = a0[name] - b0[name]
        diffs = [a[name] - b[name] for a, b in boots]
        better = [_better(name, a[name], b[name]) for a, b in boots]
        better = [x for x in better if x is not None]
        out[name] = {
            "value": d if np.isfinite(d) else None,
            "ci95": _interval(diffs),
            "a_better_fraction": float(np.mean(better)) if better else None,
        }
    return out


def _better(name: str, a: float, b: float):
    """1.0 if A beats B on score ``name``, 0.5 on a tie, 0.0 if worse; None where undefined."""
    if not (np.isfinite(a) and np.isfinite(b)):
        return None
    if name == "spearman":
        ka, kb = -a, -b
    elif name == "coverage_1sigma":
        ka, kb = abs(a - 0.6827), abs(b - 0.6827)
    elif name == "response_slope":
        ka, kb = abs(a - 1.0), abs(b - 1.0)
    else:
        ka, kb = abs(a), abs(b)
    return 0.5 if ka == kb else float(ka < kb)
