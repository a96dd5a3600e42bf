"""Uncertainty of the numbers the package reports: bootstrap intervals that resample what varies.

A downstream score moves for two reasons: which test systems were drawn (the test set is a sample
of a population) and which fine-tuning seed was used (split, head init, batch order). An interval
over test images alone says nothing about the second, and the second is not small here: two seeds
of one recipe differed by +0.028 R^2 on 1,000 test images. Each function says what it resamples;
docs/statistics.md says why, and tests/evaluation/test_stats.py measures the coverage of every interval on
synthetic predictions whose truth is known.

- :func:`bootstrap_r2`, :func:`paired_r2_difference`: test images only, one seed (the original
  fine-tuning intervals, unchanged numbers);
- :func:`bootstrap_interval`: R^2 or ROC AUC of one set of predictions, resampling test *systems*
  (``groups``: both views of a lens pair go in or out together, as in the probe);
- :func:`hierarchical_paired_difference`: metric(A) - metric(B) over S paired fine-tuning seeds,
  resampling seeds and test systems together (the same draws for both arms); ``levels`` says
  when the rows are pretraining x fine-tuning seeds, each level then resampled on its own;
- :func:`seed_summary`: mean and sample sd across seeds.

Everything is vectorised over bootstrap replicates as weighted metrics: a resample is a vector of
counts per test image, so no replicate copies the data.
"""

from __future__ import annotations

import math

import numpy as np

METRICS = ("r2", "auc")


# ---------------------------------------------------------------------------------------- metrics
def r2(y: np.ndarray, p: np.ndarray) -> float:
    ss_tot = float(((y - y.mean()) ** 2).sum())
    return 1.0 - float(((y - p) ** 2).sum()) / ss_tot if ss_tot > 0 else float("nan")


def roc_auc(y: np.ndarray, score: np.ndarray) -> float:
    """ROC AUC of ``score`` for binary labels ``y`` (ties count one half): P(score+ > score-)."""
    return float(_weighted_metric("auc", np.asarray(y), np.asarray(score, float)[None], np.ones((1, len(y))))[0, 0])


def _weighted_metric(metric: str, y: np.ndarray, preds: np.ndarray, w: np.ndarray) -> np.ndarray:
    """``metric`` of every prediction row (S, n) under every weight row (B, n): a (B, S) array.

    Integer weights are bootstrap counts, so row b is the metric on the b-th resampled test set.
    NaN where the metric is undefined (no variance in y; one class only).
    """
    y = np.asarray(y, np.float64)
    w = np.asarray(w, np.float64)
    if metric == "r2":
        sw = w.sum(1)
        ss_tot = (w @ y**2) - (w @ y) ** 2 / sw
        ss_tot = np.where(ss_tot > 1e-12 * np.maximum(w @ y**2, 1e-300), ss_tot, np.nan)
        sse = w @ ((preds - y[None]) ** 2).T
        return 1.0 - sse / ss_tot[:, None]
    if metric == "auc":
        pos = y > 0.5
        out = np.empty((w.shape[0], preds.shape[0]))
        for k, s in enumerate(np.asarray(preds, np.float64)):
            order = np.argsort(s, kind="stable")
            ss = s[order]
            starts = np.flatnonzero(np.r_[True, ss[1:] != ss[:-1]])  # one level per distinct score
            wp = np.add.reduceat(w[:, order] * pos[order], starts, axis=1)
            wn = np.add.reduceat(w[:, order] * ~pos[order], starts, axis=1)
            below = np.cumsum(wn, axis=1) - wn  # negatives scored lower
            den = wp.sum(1) * wn.sum(1)
            out[:, k] = np.where(den > 0, (wp * (below + 0.5 * wn)).sum(1) / np.where(den > 0, den, 1), np.nan)
        return out
    raise ValueError(f"unknown metric {metric!r} (expected one of {', '.join(METRICS)})")


def _counts(rng: np.random.Generator, n_boot: int, n: int) -> np.ndarray:
    """(n_boot, n) bootstrap counts: each row draws n of n items with replacement."""
    idx = rng.integers(0, n, size=(n_boot, n))
    return np.bincount((idx + n * np.arange(n_boot)[:, None]).ravel(), minlength=n_boot * n).reshape(n_boot, n)


def _image_weights(rng: np.random.Generator, n_boot: int, n: int, groups) -> np.ndarray:
    """Bootstrap counts per test image; with ``groups``, whole groups (lens systems) are drawn."""
    if groups is None:
        return _counts(rng, n_boot, n)
    _, inv = np.unique(np.asarray(groups).astype(str), return_inverse=True)
    if len(inv) != n:
        raise ValueError(f"groups: one label per test image expected, got {len(inv)} for {n}")
    return _counts(rng, n_boot, int(inv.max()) + 1)[:, inv]


# ---------------------------------------------------------------------------------------- one seed
def _resample(y: np.ndarray, n_boot: int, seed: int):
    """(indices, resampled y, their total sum of squares, NaN where 0): one seeded bootstrap draw."""
    idx = np.random.default_rng(seed).integers(0, len(y), size=(n_boot, len(y)))
    yy = y[idx]
    ss_tot = ((yy - yy.mean(1, keepdims=True)) ** 2).sum(1)
    return idx, yy, np.where(ss_tot > 0, ss_tot, np.nan)


def bootstrap_r2(y: np.ndarray, p: np.ndarray, n_boot: int = 1000, seed: int = 0) -> tuple[float, float]:
    """95% percentile interval of R^2 over resampled test images (one seed: training noise not in it)."""
    idx, yy, ss_tot = _resample(y, n_boot, seed)
    vals = 1.0 - ((yy - p[idx]) ** 2).sum(1) / ss_tot
    lo, hi = np.nanpercentile(vals, [2.5, 97.5])
    return float(lo), float(hi)


def paired_r2_difference(
    y: np.ndarray, p_a: np.ndarray, p_b: np.ndarray, n_boot: int = 1000, seed: int = 0
) -> tuple[float, float, float]:
    """R^2(a) - R^2(b) on the same test images, with a paired bootstrap 95% interval.

    Resampling the images once for both models cancels the test set's own variance, so two models
    whose separate intervals overlap can still differ significantly (or not). It holds one
    fine-tuning seed per model fixed: with seed-to-seed variation it under-covers (measured in
    tests/evaluation/test_stats.py); use :func:`hierarchical_paired_difference` over several seeds instead.
    """
    y, p_a, p_b = (np.asarray(v, dtype=np.float64) for v in (y, p_a, p_b))
    if not (len(y) == len(p_a) == len(p_b)) or len(y) < 2:
        raise ValueError("paired comparison needs predictions for the same >= 2 test images")
    idx, yy, ss_tot = _resample(y, n_boot, seed)
    diff = (((yy - p_b[idx]) ** 2).sum(1) - ((yy - p_a[idx]) ** 2).sum(1)) / ss_tot
    lo, hi = np.nanpercentile(diff, [2.5, 97.5])
    return r2(y, p_a) - r2(y, p_b), float(lo), float(hi)


def bootstrap_interval(
    y: np.ndarray, p: np.ndarray, metric: str = "r2", groups=None, n_boot: int = 1000, seed: int = 0
) -> tuple[float, float]:
    """95% percentile interval of ``metric`` (r2 | auc) over resampled test systems.

    ``groups`` (one label per image, e.g. the probe's ``pair_id``) makes a lens system the unit:
    both views of a pair share their target and most of their error, so resampling them as
    independent images would count each system twice and give too narrow an interval.
    """
    y, p = np.asarray(y, np.float64), np.asarray(p, np.float64)
    if len(y) != len(p) or len(y) < 2:
        raise ValueError("an interval needs predictions for the same >= 2 test images")
    w = _image_weights(np.random.default_rng(seed), n_boot, len(y), groups)
    lo, hi = np.nanpercentile(_weighted_metric(metric, y, p[None], w)[:, 0], [2.5, 97.5])
    return float(lo), float(hi)


def bootstrap_auc(y: np.ndarray, score: np.ndarray, n_boot: int = 1000, seed: int = 0) -> tuple[float, float]:
    """95% percentile interval of ROC AUC over resampled test images."""
    return bootstrap_interval(y, score, "auc", None, n_boot, seed)


# ---------------------------------------------------------------------------------------- seeds
def seed_summary(values) -> dict:
    """Mean and sample standard deviation (ddof 1) across seeds; sd is None for one seed."""
    v = np.asarray(list(values), np.float64)
    if len(v) == 0:
        raise ValueError("seed_summary needs at least one value")
    return {
        "mean": float(v.mean()),
        "sd": float(v.std(ddof=1)) if len(v) > 1 else None,
        "n": len(v),
        "values": [float(x) for x in v],
    }


def hierarchical_paired_difference(
    y: np.ndarray,
    preds_a: np.ndarray,
    preds_b: np.ndarray,
    metric: str = "r2",
    groups=None,
    n_boot: int = 2000,
    seed: int = 0,
    levels: dict | None = None,
) -> dict:
    """metric(A) - metric(B) averaged over S paired seeds, with an interval that includes seed noise.

    ``preds_a``/``preds_b`` are (S, n): row s is the fine-tuning run with seed s on the same n test
    images (targets ``y``). Each bootstrap replicate draws the test systems (``groups``, else images)
    and S seeds, both with replacement, and applies the *same* draws to both arms: the test set's
    shared difficulty cancels as in the paired test, while the seed-to-seed spread of the
    difference enters the interval. The seed level is rescaled by sqrt(S / (S - 1)) (Rao & Wu 1988)
    because resampling S values with replacement shrinks their variance by (S - 1) / S. With S = 3
    the seed term has 2 degrees of freedom, so the interval is the estimate +- t(df) x the
    bootstrap standard error, df by Welch-Satterthwaite from the image and seed components (a
    normal quantile under-covers: 0.855 at 3 seeds, docs/statistics.md). With S = 1 the seed term cannot be
    estimated; the interval is then the images-only one and ``seed_variance`` is None.

    ``levels`` names what the rows are when they are not S exchangeable seeds: ``{name: one label
    per row}``, e.g. ``{"pretraining seed": [0, 0, 0, 1, 1, 1], "fine-tuning seed": [0, 1, 2, 0, 1,
    2]}`` for C pretrained backbones each fine-tuned with the same F seeds. Those runs are not C x F
    independent units: the F fine-tunings of one backbone inherit its luck, and fine-tuning seed f
    (its split, head init, batch order) is shared by every backbone, so resampling the rows flat
    counts either spread too often as independent evidence and under-covers (tests/evaluation/test_stats.py
    measures it). Each level with >= 2 labels is resampled on its own, its unit the mean over the
    other levels (the same draws for both arms), Rao-Wu-rescaled by sqrt(L / (L - 1)), and enters
    df with L - 1: with 2 pretraining seeds the interval is wide, as it should be. Two levels must
    form a full grid (every combination once). Like images x seeds, crossed levels are resampled
    independently, so their interaction is counted by both: conservative, not under-covering.
    Default: every row its own label (one level, "seed").

    Returns a dict: ``delta`` (mean over seeds of the per-seed differences), ``per_seed`` (per row),
    ``ci95`` (hierarchical), ``se``, ``df``, ``se_images_only`` and ``ci95_images_only`` (the
    paired test-images-only percentile interval, seeds held fixed, for reference), ``seed_variance``
    (the seed components of se^2, summed), ``seeds`` (rows), ``levels`` ({name: labels} of each
    level resampled), ``n_test``, ``n_boot``, ``metric``.
    """
    from scipy import stats as sps

    y = np.asarray(y, np.float64)
    pa, pb = (np.atleast_2d(np.asarray(v, np.float64)) for v in (preds_a, preds_b))
    if pa.shape != pb.shape or pa.shape[1] != len(y) or len(y) < 2:
        raise ValueError(
            f"paired comparison needs predictions of the same seeds on the same >= 2 test images: "
            f"A {pa.shape}, B {pb.shape}, targets {len(y)}"
        )
    s = pa.shape[0]
    means = _level_means(levels if levels is not None else {"seed": range(s)}, s)  # {name: (S, L)}
    ones = np.ones((1, len(y)))
    per_seed = (_weighted_metric(metric, y, pa, ones) - _weighted_metric(metric, y, pb, ones))[0]
    delta = float(per_seed.mean())

    rng = np.random.default_rng(seed)
    w = _image_weights(rng, n_boot, len(y), groups)
    d = _weighted_metric(metric, y, pa, w) - _weighted_metric(metric, y, pb, w)  # (B, S)
    d_img = d.mean(1)  # seeds fixed
    lo_i, hi_i = np.nanpercentile(d_img, [2.5, 97.5])
    se_img = float(np.nanstd(d_img, ddof=1))
    out = {
        "metric": metric,
        "delta": delta,
        "per_seed": [float(v) for v in per_seed],
        "seeds": int(s),
        "levels": {name: m.shape[1] for name, m in means.items()},
        "n_test": len(y),
        "n_boot": int(n_boot),
        "se_images_only": se_img,
        "ci95_images_only": [float(lo_i), float(hi_i)],
    }
    if not means:
        return {**out, "se": se_img, "df": None, "seed_variance": None, "ci95": [float(lo_i), float(hi_i)]}
    d_star, v_levels = d_img.copy(), []
    for m in means.values():
        n_lab = m.shape[1]
        pick = rng.integers(0, n_lab, size=(n_boot, n_lab))
        d_level = np.take_along_axis(d @ m, pick, axis=1).mean(1)
        d_star += math.sqrt(n_lab / (n_lab - 1)) * (d_level - d_img)  # Rao-Wu rescaling
        v_levels.append((float((per_seed @ m).var(ddof=1)) / n_lab, n_lab - 1))
    se = float(np.nanstd(d_star, ddof=1))
    v_seed = sum(v for v, _ in v_levels)
    den = sum(v**2 / dof for v, dof in v_levels)
    df = (se_img**2 + v_seed) ** 2 / den if den > 0 else float("inf")
    half = float(sps.t.ppf(0.975, df)) * se if math.isfinite(df) else 1.959963984540054 * se
    return {
        **out,
        "se": se,
        "df": float(df) if math.isfinite(df) else None,
        "seed_variance": v_seed,
        "ci95": [delta - half, delta + half],
    }


def _level_means(levels: dict, rows: int) -> dict:
    """{name: (rows, L) matrix averaging the rows of each label} for every level with >= 2 labels."""
    coded = {}
    for name, labels in levels.items():
        labels = [str(v) for v in labels]
        if len(labels) != rows:
            raise ValueError(f"levels[{name!r}]: one label per seed row expected, got {len(labels)} for {rows}")
        coded[name] = np.unique(labels, return_inverse=True)[1]
    if len(coded) > 1:
        combos = set(zip(*coded.values()))
        full = math.prod(int(c.max()) + 1 for c in coded.values())
        if len(combos) != rows or full != rows:
            raise ValueError(f"levels {list(coded)}: the rows must form a full grid, each combination once")
    out = {}
    for name, code in coded.items():
        if code.max() >= 1:
            out[name] = np.eye(code.max() + 1)[code] / np.bincount(code)
    return out
