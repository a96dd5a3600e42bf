"""The probe core: how much lens physics features hold, held-out R^2 of k-NN and ridge probes per parameter.

The quantitative version of the paper's UMAP claim. The split is by lens system (``pair_id``/key),
so both views of a pair fall on the same side, and it is a pure function of the sample key
(sha256 of it, below ``test_fraction`` -> test): the same keys split the same way in every file,
so a LenSiam and a baseline file made from the same shards are probed on identical splits.

- features standardised with the train split's mean and std;
- k-NN: ``KNeighborsRegressor(k=10)`` on the standardised, l2-normalised features (cosine);
- ridge: closed-form ridge over ``alphas`` (one eigendecomposition per fold), one alpha per
  parameter, chosen by 5-fold GroupKFold inside the train split only (never the test split, and
  never with the partner view on the other fold);
- R^2 (``sklearn.metrics.r2_score``) on the test split, per parameter, in its own units, with a
  95% bootstrap interval over the test lens systems (both views of a pair resampled together:
  :func:`hpc_lensiam.evaluation.stats.bootstrap_interval` with ``groups=pair_id``). It holds the fitted probe
  fixed: the test systems' sampling is in it, the pretraining seed is not (docs/statistics.md).
- where the file carries ``is_lens`` (survey family): lens finding from the same features, a k-NN
  classifier (k=10, cosine) and an l2 logistic regression (C chosen by GroupKFold inside the train
  split), scored on the test split with the lens finders' metrics (:mod:`hpc_lensiam.evaluation.classify`:
  ROC AUC with a bootstrap interval, TPR at FPR 1e-2 and 1e-3).
"""

from __future__ import annotations

import hashlib

import numpy as np

from ..core.errors import UserError

MODELS = ("knn", "ridge")


def split_by_key(keys: np.ndarray, test_fraction: float = 0.2, salt: str = "probe-split/1") -> np.ndarray:
    """Boolean test mask: a key goes to test iff sha256(salt + key) falls below ``test_fraction``."""
    uniq, inv = np.unique(np.asarray(keys).astype(str), return_inverse=True)
    u = np.array([int.from_bytes(hashlib.sha256((salt + k).encode()).digest()[:8], "big") / 2.0**64 for k in uniq])
    return (u < test_fraction)[inv]


def _ridge_path(x: np.ndarray, y: np.ndarray):
    """Everything ridge needs for any alpha, from one eigendecomposition of the (D, D) Gram matrix."""
    xm, ym = x.mean(0), y.mean(0)
    xc = x - xm
    s, v = np.linalg.eigh((xc.T @ xc).astype(np.float64))
    b = v.T @ (xc.T @ (y - ym)).astype(np.float64)
    return xm, ym, v, np.clip(s, 0, None), b


def _ridge_weights(path, alpha: np.ndarray) -> np.ndarray:
    """(D, T) weights; ``alpha`` is one value per target."""
    _, _, v, s, b = path
    return v @ (b / (s[:, None] + alpha[None, :]))


def _ridge_predict(path, w, xq):
    xm, ym = path[0], path[1]
    return (xq - xm) @ w + ym


def ridge_cv(x, y, groups, alphas, folds: int = 5):
    """Ridge with one alpha per target column, chosen by GroupKFold CV on (x, y) only."""
    from sklearn.model_selection import GroupKFold

    n_groups = len(np.unique(groups))
    sse = np.zeros((len(alphas), y.shape[1]))
    for tr, va in GroupKFold(n_splits=min(folds, n_groups)).split(x, groups=groups):
        path = _ridge_path(x[tr], y[tr])
        for i, a in enumerate(alphas):
            w = _ridge_weights(path, np.full(y.shape[1], a))
            sse[i] += ((_ridge_predict(path, w, x[va]) - y[va]) ** 2).sum(0)
    best = np.asarray(alphas)[sse.argmin(0)]
    path = _ridge_path(x, y)
    return path, _ridge_weights(path, best), best


def probe_arrays(
    features: np.ndarray,
    targets: dict[str, np.ndarray],
    groups: np.ndarray,
    test: np.ndarray,
    k: int = 10,
    alphas=None,
    folds: int = 5,
    n_boot: int = 1000,
) -> dict:
    """R^2 of k-NN and ridge for each target; ``test`` is the held-out mask. Pure numpy in/out."""
    from sklearn.metrics import r2_score
    from sklearn.neighbors import KNeighborsRegressor

    from .stats import bootstrap_interval

    alphas = np.logspace(-3, 5, 17) if alphas is None else np.asarray(alphas, float)
    test = np.asarray(test, bool)
    train = ~test
    groups = np.asarray(groups)
    n_train_groups, n_test_groups = len(np.unique(groups[train])), len(np.unique(groups[test]))
    if n_train_groups < max(folds, 2) or n_test_groups < 2:
        raise UserError(
            f"too few lens systems to probe: {n_train_groups} train, {n_test_groups} test "
            f"(need >= {max(folds, 2)} and >= 2)"
        )
    x = np.asarray(features, np.float32)
    mean, std = x[train].mean(0), x[train].std(0)
    x = (x - mean) / np.where(std > 0, std, 1.0).astype(np.float32)
    names = list(targets)
    y = np.stack([np.asarray(targets[n], np.float64) for n in names], 1)

    xn = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    knn = KNeighborsRegressor(n_neighbors=min(k, int(train.sum())), algorithm="brute", n_jobs=-1)
    pred_knn = knn.fit(xn[train], y[train]).predict(xn[test])
    del xn

    y_mean, y_std = y[train].mean(0), y[train].std(0)
    y_std = np.where(y_std > 0, y_std, 1.0)
    path, w, best = ridge_cv(x[train], (y[train] - y_mean) / y_std, groups[train], alphas, folds)
    pred_ridge = _ridge_predict(path, w, x[test]) * y_std + y_mean

    out = {"knn": {}, "ridge": {}, "ridge_alpha": {}, "knn_ci95": {}, "ridge_ci95": {}}
    for j, name in enumerate(names):
        out["knn"][name] = float(r2_score(y[test, j], pred_knn[:, j]))
        out["ridge"][name] = float(r2_score(y[test, j], pred_ridge[:, j]))
        out["ridge_alpha"][name] = float(best[j])
        for m, pred in (("knn", pred_knn), ("ridge", pred_ridge)):
            out[f"{m}_ci95"][name] = list(bootstrap_interval(y[test, j], pred[:, j], "r2", groups[test], n_boot))
    # kept for paired comparisons of two feature sets on the same test systems (probe --against)
    out["test_targets"] = {name: y[test, j].tolist() for j, name in enumerate(names)}
    out["test_predictions"] = {
        m: {name: p[:, j].tolist() for j, name in enumerate(names)}
        for m, p in (("knn", pred_knn), ("ridge", pred_ridge))
    }
    return out


def probe_classify(
    features: np.ndarray,
    is_lens: np.ndarray,
    groups: np.ndarray,
    test: np.ndarray,
    k: int = 10,
    cs=(1e-3, 1e-2, 1e-1, 1.0, 10.0),
    folds: int = 5,
    seed: int = 0,
) -> dict:
    """Lens-finding metrics of k-NN and logistic-regression probes (see the module doc)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import GroupKFold
    from sklearn.neighbors import KNeighborsClassifier

    from .classify import classification_report, roc_auc

    test = np.asarray(test, bool)
    train = ~test
    y = np.asarray(is_lens, int)
    if len(np.unique(y[train])) < 2 or len(np.unique(y[test])) < 2:
        raise UserError("is_lens: the train and test splits need lenses and non-lenses")
    x = np.asarray(features, np.float64)
    mean, std = x[train].mean(0), x[train].std(0)
    x = (x - mean) / np.where(std > 0, std, 1.0)
    xn = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    knn = KNeighborsClassifier(n_neighbors=min(k, int(train.sum())), algorithm="brute")
    s_knn = knn.fit(xn[train], y[train]).predict_proba(xn[test])[:, 1]
    groups = np.asarray(groups)[train]
    auc = np.zeros(len(cs))
    for tr, va in GroupKFold(n_splits=min(folds, len(np.unique(groups)))).split(x[train], groups=groups):
        if len(np.unique(y[train][tr])) < 2:
            continue
        for i, c in enumerate(cs):
            m = LogisticRegression(C=c, max_iter=2000).fit(x[train][tr], y[train][tr])
            auc[i] += np.nan_to_num(roc_auc(y[train][va], m.decision_function(x[train][va])))
    best = float(cs[int(np.argmax(auc))])
    s_log = LogisticRegression(C=best, max_iter=2000).fit(x[train], y[train]).decision_function(x[test])
    out = {}
    for name, score in (("knn", s_knn), ("logistic", s_log)):
        rep = classification_report(y[test], score, seed=seed)
        rep.pop("roc")
        out[name] = rep
    out["logistic"]["C"] = best
    return out
