"""2-D UMAP of the embeddings, one panel per lens parameter (paper Fig. 2), coordinates saved back.

``hpc-lensiam umap --embeddings emb.h5 --out umap.png [--color theta_E,e1,gamma] [--seed 0]``

umap-learn on the standardised features, ``random_state=seed`` (reproducible; umap-learn then runs
single-threaded), ``low_memory=True``. The 2-D coordinates go into the embeddings file as dataset
``umap`` (N, 2) with the settings as attributes; the file is rewritten through a temporary copy and
a rename, so a crash never leaves it half-written. The figure is written atomically too.
Cost on 100k+ points: see docs/evaluation.md ("umap").
"""

from __future__ import annotations

import resource
import shutil
import time
import warnings
from pathlib import Path

import numpy as np

from ..core.errors import UserError
from ..core.io import atomic_path, check_output_file
from ..shards.manifest import LENS_PARAMS, UNITS
from .extract import load_embeddings

LABELS = {
    "theta_E": r"$\theta_E$",
    "gamma": r"$\gamma$ (slope)",
    "e1": r"$e_1$",
    "e2": r"$e_2$",
    "center_x": r"$x_0$",
    "center_y": r"$y_0$",
    "gamma1": r"$\gamma_1$ (shear)",
    "gamma2": r"$\gamma_2$ (shear)",
}


def check_colors(color: list[str]) -> list[str]:
    names = [c.strip() for c in color if c and c.strip()]
    if not names:
        raise UserError(f"--color: give at least one of {', '.join(LENS_PARAMS)}")
    bad = [c for c in names if c not in LENS_PARAMS]
    if bad:
        raise UserError(f"--color: unknown parameter {bad[0]!r} (expected some of: {', '.join(LENS_PARAMS)})")
    return names


def fit_umap(
    features: np.ndarray, seed: int = 0, n_neighbors: int = 15, min_dist: float = 0.1, extra: np.ndarray | None = None
):
    """(N, D) -> (N, 2) float32 with umap-learn on standardised features, seeded.

    With ``extra`` (M, D) (real images to overlay), returns ``(coords, extra_coords)``: the extra
    points are standardised with the fitted set's statistics and placed by the fitted model's
    ``transform``, so they do not move the simulated map.
    """
    import umap

    x = np.asarray(features, np.float32)
    mean, std = x.mean(0), x.std(0)
    std = np.where(std > 0, std, 1.0)
    reducer = umap.UMAP(
        n_components=2,
        n_neighbors=min(n_neighbors, len(x) - 1),
        min_dist=min_dist,
        random_state=seed,
        low_memory=True,
        metric="euclidean",
    )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*n_jobs.*overridden.*")
        warnings.filterwarnings("ignore", message=".*k >= N.*")
        coords = reducer.fit_transform((x - mean) / std).astype(np.float32)
        if extra is None:
            return coords
        return coords, reducer.transform((np.asarray(extra, np.float32) - mean) / std).astype(np.float32)


def plot_panels(
    coords: np.ndarray,
    params: dict[str, np.ndarray],
    names: list[str],
    out: Path,
    title: str,
    overlay: tuple[np.ndarray, list[str]] | None = None,
):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(coords)
    size = float(np.clip(20000.0 / max(n, 1), 0.3, 12.0))
    fig, axes = plt.subplots(1, len(names), figsize=(4.4 * len(names), 4.2), squeeze=False)
    for ax, name in zip(axes[0], names):
        v = params[name]
        order = np.argsort(np.abs(v - np.median(v)))  # extremes drawn last, on top
        sc = ax.scatter(
            coords[order, 0],
            coords[order, 1],
            c=v[order],
            s=size,
            cmap="viridis",
            alpha=0.8,
            linewidths=0,
            rasterized=True,
        )
        if overlay is not None:  # real images: marked and labelled on top
            oc, labels = overlay
            ax.scatter(
                oc[:, 0],
                oc[:, 1],
                marker="*",
                s=160,
                c="red",
                edgecolors="white",
                linewidths=0.8,
                zorder=5,
                label="real images",
            )
            for (ox, oy), text in list(zip(oc, labels))[:20]:
                ax.annotate(text, (ox, oy), xytext=(4, 4), textcoords="offset points", fontsize=6.5, color="red")
            ax.legend(loc="lower right", fontsize=7)
        cb = fig.colorbar(sc, ax=ax, fraction=0.046, pad=0.03)
        cb.set_label(LABELS.get(name, name) + (f" [{UNITS[name]}]" if name in UNITS else ""))
        ax.set_title(f"coloured by {LABELS.get(name, name)}")
        ax.set_xticks([]), ax.set_yticks([])
        ax.set_xlabel("UMAP 1"), ax.set_ylabel("UMAP 2")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fmt = (out.suffix.lstrip(".") or "png").lower()
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format=fmt, dpi=150)
    plt.close(fig)


def save_coords(path: str | Path, coords: np.ndarray, attrs: dict) -> None:
    """Add/replace dataset ``umap`` in an embeddings file: copy, edit the copy, rename (atomic)."""
    import h5py

    path = Path(path)
    with atomic_path(path) as tmp:
        shutil.copyfile(path, tmp)
        with h5py.File(tmp, "r+") as f:
            if "umap" in f:
                del f["umap"]
            ds = f.create_dataset("umap", data=coords.astype(np.float32))
            for k, v in attrs.items():
                ds.attrs[k] = v


def _overlay_labels(emb: dict) -> list[str]:
    """File names of ingested images (read back from their shards), else source/key."""
    from .similar import ShardImages, source_dirs

    dirs, shards, labels = source_dirs(emb), ShardImages(), []
    for key, src, view in zip(emb["keys"], emb["source"], emb["view"]):
        try:
            params = shards.get(dirs[src], key, int(view))[1]
            labels.append(Path(params["ingest"]["file"]).stem[:28])
        except (UserError, KeyError):
            labels.append(f"{Path(src).name}/{key}" if src else str(key))
    return labels


def run_umap(
    embeddings: str,
    out: str,
    color: list[str] | None = None,
    seed: int = 0,
    n_neighbors: int = 15,
    min_dist: float = 0.1,
    overlay: str | None = None,
) -> dict:
    """Fit a seeded 2-D UMAP, draw one panel per parameter in ``color``, store coordinates.

    ``overlay``: a second embeddings file (real images, same backbone) placed on the fitted map,
    marked and labelled; its coordinates are stored in it as ``umap`` too (attribute ``fitted_on``).
    """
    names = check_colors(color or ["theta_E", "e1", "gamma"])
    if seed < 0:
        raise UserError(f"--seed: must be >= 0, got {seed}")
    check_output_file(out, "--out")
    emb = load_embeddings(embeddings, need_params=False)
    missing = [c for c in names if c not in emb["params"]]
    if missing:
        raise UserError(
            f"{embeddings}: no lens parameter {missing[0]!r} to colour by "
            "(expected an embeddings file written by `hpc-lensiam embed`)"
        )
    n, d = emb["features"].shape
    if n < 4:
        raise UserError(f"{embeddings}: {n} points; UMAP needs at least 4")
    over = None
    if overlay is not None:
        over = load_embeddings(overlay, need_params=False)
        if over["features"].shape[1] != d or over["attrs"].get("weights_sha256") != emb["attrs"].get("weights_sha256"):
            raise UserError(
                f"--overlay {overlay}: not embedded with the backbone of {embeddings} "
                f"({over['features'].shape[1]}-d, weights sha256 "
                f"{str(over['attrs'].get('weights_sha256'))[:12]} vs "
                f"{str(emb['attrs'].get('weights_sha256'))[:12]})"
            )
    t0 = time.perf_counter()
    if over is None:
        coords = fit_umap(emb["features"], seed, n_neighbors, min_dist)
    else:
        coords, over_coords = fit_umap(emb["features"], seed, n_neighbors, min_dist, extra=over["features"])
    fit_s = time.perf_counter() - t0
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20

    a = emb["attrs"]
    title = (
        f"{Path(embeddings).name}: {a.get('arch', '?')} {a.get('train_mode', '?')} step {a.get('step', '?')}, "
        f"{n} images, {d}-d features -> UMAP (seed {seed})"
    )
    out = Path(out)
    settings = {
        "seed": seed,
        "n_neighbors": n_neighbors,
        "min_dist": min_dist,
        "metric": "euclidean on standardised features",
        "fit_seconds": round(fit_s, 2),
    }
    plot_panels(
        coords, emb["params"], names, out, title, None if over is None else (over_coords, _overlay_labels(over))
    )
    save_coords(embeddings, coords, settings)
    if over is not None:
        save_coords(overlay, over_coords, {**settings, "fitted_on": str(Path(embeddings).resolve())})
        for key, (ux, uy) in zip(over["keys"], over_coords):
            print(f"umap: overlay {key}: ({ux:.3f}, {uy:.3f})", flush=True)
    print(
        f"umap: {n} points, {d}-d -> 2-D in {fit_s:.1f} s (process peak RSS {peak_gb:.2f} GB); "
        f"figure ({', '.join(names)}) -> {out}; coordinates -> {embeddings}:/umap",
        flush=True,
    )
    return {
        "points": n,
        "dim": d,
        "fit_seconds": fit_s,
        "peak_rss_gb": peak_gb,
        "figure": str(out),
        "overlay": None if over is None else over_coords,
    }
