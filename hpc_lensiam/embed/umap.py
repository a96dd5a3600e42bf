"""2-D UMAP of the embeddings, one panel per column of the file (paper Fig. 2), coordinates to a CSV.

``hpc-lensiam umap --embeddings emb.h5 --out umap.png [--color theta_E,e1,gamma] [--seed 0]
[--coords umap.csv] [--overlay real.h5] [--stretch asinh]``

umap-learn on the standardised features, ``random_state=seed`` (reproducible; umap-learn then runs
single-threaded), ``low_memory=True``.

- ``--color``: any per-row column of the embeddings file: the lens parameters, ``is_lens``, any other
  ``params/`` column, ``source``, ``view``. Text columns and integer columns with few values
  (``is_lens``, ``source``, ``view``) are categorical: discrete colours and a legend with counts;
  the others get a colour bar. Rows whose value is unknown (``params_known``) are grey.
- The coordinates go to their own CSV (``--coords``, default the figure's name with ``.csv``):
  ``set`` (fitted / overlay), ``source``, ``key``, ``view``, ``umap_1``, ``umap_2`` and the coloured
  columns; the input files are only read (a read-only file works).
- ``--overlay``: a second embeddings file (real images, same backbone) placed on the fitted map with
  its ``transform``, numbered stars, and a strip of thumbnails of those images (read back from their
  shards, stretched as ``show`` draws them, with an arcsec scale bar).
- A line per phase on stderr (fitting, placing, drawing, writing). Figure and CSV are written
  atomically. Cost on 100k+ points: see docs/evaluation.md ("umap").
"""

from __future__ import annotations

import csv
import resource
import sys
import time
import warnings
from pathlib import Path

import numpy as np

from ..core.config import from_flags
from ..core.errors import UserError
from ..core.io import atomic_path, check_output_file
from ..shards.manifest import LENS_PARAMS, UNITS, read_manifest
from .config import UmapConfig
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


MAX_THUMBS = 8  # overlay images drawn as thumbnails (numbered on the map)
MAX_CATEGORIES = 12  # an integer column with at most this many values is categorical
PER_ROW = ("source", "view")  # per-row datasets of an embeddings file that can colour the map


def say(msg: str) -> None:
    """One progress line on stderr (stdout keeps the results)."""
    print(f"umap: {msg}", file=sys.stderr, flush=True)


def read_columns(path: str | Path, n: int) -> dict[str, tuple[np.ndarray, np.ndarray | None]]:
    """Every per-row column of an embeddings file: {name: (values, known mask or None)}, read-only.

    ``params/*`` (lens parameters, ``is_lens`` and any other), then ``source`` and ``view``."""
    import h5py

    cols: dict[str, tuple[np.ndarray, np.ndarray | None]] = {}
    with h5py.File(path, "r") as f:
        known = f["params_known"] if "params_known" in f else {}
        if "params" in f:
            for name, ds in f["params"].items():
                if isinstance(ds, h5py.Dataset) and ds.shape == (n,):
                    vals = ds.asstr()[...] if ds.dtype.kind in "SO" else ds[...]
                    cols[name] = (vals, known[name][...].astype(bool) if name in known else None)
        for name in PER_ROW:
            if name in f and isinstance(f[name], h5py.Dataset) and f[name].shape == (n,):
                ds = f[name]
                cols.setdefault(name, (ds.asstr()[...] if ds.dtype.kind in "SO" else ds[...], None))
    return cols


def is_categorical(values: np.ndarray) -> bool:
    """Text, bool, or integer-valued with at most MAX_CATEGORIES distinct values."""
    v = np.asarray(values)
    if v.dtype.kind in "SUOb":
        return True
    if v.dtype.kind in "iuf" and v.size:
        finite = v[np.isfinite(v)] if v.dtype.kind == "f" else v
        return bool(np.all(finite == np.round(finite))) and len(np.unique(finite)) <= MAX_CATEGORIES
    return False


def check_colors(color: list[str], columns: dict | None = None, path: str = "") -> list[str]:
    """The ``--color`` names, each a column of the file (``columns``, from :func:`read_columns`)."""
    names = [c.strip() for c in color if c and c.strip()]
    have = ", ".join(columns) if columns else "none"
    if not names:
        raise UserError(f"--color: give at least one column (columns of {path}: {have})")
    for c in names if columns is not None else []:
        if c not in columns:
            if c in LENS_PARAMS:
                raise UserError(
                    f"{path}: no lens parameter {c!r} to colour by (--color: columns of this file: {have}; "
                    "expected an embeddings file written by `hpc-lensiam embed`)"
                )
            raise UserError(f"--color: unknown column {c!r} (columns of {path}: {have})")
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


def _label(name: str) -> str:
    return LABELS.get(name, name) + (f" [{UNITS[name]}]" if name in UNITS else "")


def _category_name(name: str, value) -> str:
    if name == "source":
        return Path(str(value)).name or "(none)"
    if isinstance(value, (float, np.floating)) and float(value).is_integer():
        value = int(value)
    return f"{name}={value}"


def _draw_column(fig, ax, coords, name, values, known, size):
    """One panel: categorical columns get discrete colours and a legend, numbers a colour bar; rows
    with no value are grey."""
    import matplotlib.pyplot as plt

    known = np.ones(len(coords), bool) if known is None else known
    if (~known).any():
        ax.scatter(
            *coords[~known].T, s=size, c="0.75", linewidths=0, rasterized=True, label=f"no value ({(~known).sum()})"
        )
    if is_categorical(values[known]):
        cats = list(np.unique(values[known]))
        cmap = plt.get_cmap("tab10" if len(cats) <= 10 else "tab20")
        for i, cat in enumerate(cats):
            rows = known & (values == cat)
            ax.scatter(
                *coords[rows].T,
                s=max(size, 4.0),
                color=cmap(i % cmap.N),
                alpha=0.85,
                linewidths=0,
                rasterized=True,
                label=f"{_category_name(name, cat)} ({rows.sum()})",
            )
        ax.legend(loc="best", fontsize=7, markerscale=2, framealpha=0.8)
        return
    v = values.astype(np.float64)
    idx = np.nonzero(known)[0]
    idx = idx[np.argsort(np.abs(v[idx] - np.median(v[idx])))]  # extremes drawn last, on top
    sc = ax.scatter(*coords[idx].T, c=v[idx], s=size, cmap="viridis", alpha=0.8, linewidths=0, rasterized=True)
    cb = fig.colorbar(sc, ax=ax, fraction=0.046, pad=0.03)
    cb.set_label(_label(name))
    if (~known).any():
        ax.legend(loc="best", fontsize=7, markerscale=2, framealpha=0.8)


def plot_panels(
    coords: np.ndarray,
    columns: dict[str, tuple[np.ndarray, np.ndarray | None]],
    names: list[str],
    out: Path,
    title: str,
    overlay: tuple[np.ndarray, list[str], list[dict | None]] | None = None,
    stretch: str = "asinh",
):
    """One panel per column in ``names``; ``overlay``: (coords, labels, thumbnail panels or None)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..shards.display import describe, draw_image, shorten

    n = len(coords)
    size = float(np.clip(20000.0 / max(n, 1), 0.3, 12.0))
    thumbs = [] if overlay is None else [t for t in overlay[2][:MAX_THUMBS] if t is not None]
    width = max(4.6 * len(names), 1.45 * len(thumbs))
    fig = plt.figure(figsize=(width, 4.4 + (1.95 if thumbs else 0)), layout="constrained")
    grid = fig.add_gridspec(2 if thumbs else 1, 1, height_ratios=[4.4, 1.95] if thumbs else None)
    axes = grid[0].subgridspec(1, len(names)).subplots(squeeze=False)[0]
    for ax, name in zip(axes, names):
        values, known = columns[name]
        _draw_column(fig, ax, coords, name, np.asarray(values), known, size)
        if overlay is not None:  # real images: numbered (thumbnails below) or labelled stars on top
            oc, labels, _ = overlay
            ax.scatter(*oc.T, marker="*", s=160, c="red", edgecolors="white", linewidths=0.8, zorder=5)
            for i, ((ox, oy), text) in enumerate(list(zip(oc, labels))[:20]):
                tag = str(i + 1) if i < len(thumbs) else shorten(text, 20)
                ax.annotate(tag, (ox, oy), xytext=(4, 4), textcoords="offset points", fontsize=7, color="red")
        ax.set_title(f"coloured by {LABELS.get(name, name)}", fontsize=10)
        ax.set_xticks([]), ax.set_yticks([])
        ax.set_xlabel("UMAP 1"), ax.set_ylabel("UMAP 2")
    if thumbs:
        cols = max(len(thumbs), int(width // 1.45))
        taxes = grid[1].subgridspec(1, cols, wspace=0.08).subplots(squeeze=False)[0]
        for ax in taxes[len(thumbs) :]:
            ax.remove()
        for i, (ax, t) in enumerate(zip(taxes, thumbs)):
            draw_image(ax, t["image"], stretch, t.get("sigma"), t.get("pixel_scale"), fontsize=6)
            ax.set_title(shorten(f"{i + 1} {overlay[1][i]}", 24), fontsize=6.5, loc="left", color="red")
    fig.suptitle(title + (f"\nreal images: red stars, thumbnails {describe(stretch)}" if thumbs else ""), fontsize=9)
    fmt = (out.suffix.lstrip(".") or "png").lower()
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format=fmt, dpi=150)
    plt.close(fig)


def write_coords(
    path: str | Path, sets: list[tuple[str, dict, np.ndarray]], names: list[str], columns: list[dict]
) -> None:
    """The coordinates as CSV (atomic): one row per embedded image, ``set`` naming its file's role, and
    the coloured columns (empty where a row has no value)."""
    names = [c for c in names if c not in ("source", "view")]  # always there
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["set", "source", "key", "view", "umap_1", "umap_2", *names])
        for (role, emb, xy), cols in zip(sets, columns):
            for i in range(len(xy)):
                row = [
                    role,
                    emb["source"][i],
                    emb["keys"][i],
                    int(emb["view"][i]),
                    f"{xy[i, 0]:.6g}",
                    f"{xy[i, 1]:.6g}",
                ]
                for name in names:
                    v, known = cols.get(name, (None, None))
                    row.append("" if v is None or (known is not None and not known[i]) else _cell(v[i]))
                w.writerow(row)


def _cell(v) -> str:
    if isinstance(v, (float, np.floating)):
        return f"{float(v):.6g}"
    if isinstance(v, (bytes, np.bytes_)):
        return v.decode()
    return str(v.item() if hasattr(v, "item") else v)


def _overlay_items(emb: dict) -> tuple[list[str], list[dict | None]]:
    """File names of ingested images (read back from their shards), else source/key; and a thumbnail
    panel (image, noise sigma, pixel scale) for the first MAX_THUMBS rows, None where unreadable."""
    from ..shards.display import noise_sigma, pixel_scale_of
    from .similar import ShardImages, source_dirs

    dirs, shards, labels, thumbs, scales = source_dirs(emb), ShardImages(), [], [], {}
    for i, (key, src, view) in enumerate(zip(emb["keys"], emb["source"], emb["view"])):
        try:
            img, params = shards.get(dirs[src], key, int(view))
        except (UserError, KeyError):
            labels.append(f"{Path(src).name}/{key}" if src else str(key))
            thumbs.append(None)
            continue
        name = (params.get("ingest") or {}).get("file")
        labels.append(Path(name).stem[:28] if name else f"{Path(src).name}/{key}")
        if i < MAX_THUMBS:
            if src not in scales:
                try:
                    scales[src] = pixel_scale_of(read_manifest(dirs[src]))
                except UserError:
                    scales[src] = None
            sigma = noise_sigma(img, params, int(view))[0]
            thumbs.append({"image": img, "sigma": sigma, "pixel_scale": scales[src]})
    return labels, thumbs


def run_umap(
    embeddings: str | None = None,
    out: str | None = None,
    color: list[str] | None = None,
    seed: int | None = None,
    n_neighbors: int | None = None,
    min_dist: float | None = None,
    overlay: str | None = None,
    coords_out: str | None = None,
    stretch: str | None = None,
    config: UmapConfig | None = None,
) -> dict:
    """Fit a seeded 2-D UMAP, draw one panel per column in ``color``, write the coordinates to
    ``coords_out`` (default: ``out`` with suffix ``.csv``). The input files are only read.

    ``overlay``: a second embeddings file (real images, same backbone) placed on the fitted map,
    marked, numbered and drawn as thumbnails; its rows go into the same CSV (``set`` = overlay).
    """
    if config is None:  # the Python API's arguments (None: the config's default), validated once
        config = from_flags(
            UmapConfig,
            dict(
                embeddings=None if embeddings is None else str(embeddings),
                out=None if out is None else str(out),
                color=None if color is None else ",".join(color),
                seed=seed,
                n_neighbors=n_neighbors,
                min_dist=min_dist,
                overlay=None if overlay is None else str(overlay),
                coords=None if coords_out is None else str(coords_out),
                stretch=stretch,
            ),
        )
    c = config
    embeddings, out, seed, n_neighbors, min_dist, overlay = (
        c.embeddings,
        c.out,
        c.seed,
        c.n_neighbors,
        c.min_dist,
        c.overlay,
    )
    color, coords_out, stretch = [x for x in c.color.split(",") if x.strip()], c.coords, c.stretch
    check_output_file(out, "--out")
    coords_path = Path(coords_out) if coords_out else Path(out).with_suffix(".csv")
    check_output_file(coords_path, "--coords")
    if coords_path.resolve() in {Path(out).resolve(), Path(embeddings).resolve()} | (
        {Path(overlay).resolve()} if overlay else set()
    ):
        raise UserError(f"--coords {coords_path}: the same file as --out, --embeddings or --overlay")
    emb = load_embeddings(embeddings, need_params=False)
    n, d = emb["features"].shape
    columns = read_columns(embeddings, n)
    names = check_colors(color or ["theta_E", "e1", "gamma"], columns, str(embeddings))
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
    say(f"fitting UMAP on {n} points of {d}-d features (seed {seed}, {n_neighbors} neighbours)")
    t0 = time.perf_counter()
    if over is None:
        coords = fit_umap(emb["features"], seed, n_neighbors, min_dist)
    else:
        say(f"placing {len(over['features'])} overlay point(s) from {overlay} with the fitted map")
        coords, over_coords = fit_umap(emb["features"], seed, n_neighbors, min_dist, extra=over["features"])
    fit_s = time.perf_counter() - t0
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20

    a = emb["attrs"]
    title = (
        f"{Path(embeddings).name}: {a.get('arch', '?')} {a.get('train_mode', '?')} step {a.get('step', '?')}, "
        f"{n} images, {d}-d features -> UMAP (seed {seed})"
    )
    out = Path(out)
    say(f"drawing {out} ({', '.join(names)})")
    over_cols = {}
    ov = None
    if over is not None:
        over_cols = read_columns(overlay, len(over["features"]))
        ov = (over_coords, *_overlay_items(over))
    plot_panels(coords, columns, names, out, title, ov, stretch)
    say(f"writing coordinates to {coords_path}")
    sets = [("fitted", emb, coords)] + ([("overlay", over, over_coords)] if over is not None else [])
    write_coords(coords_path, sets, names, [columns, over_cols][: len(sets)])
    if over is not None:
        for key, (ux, uy) in zip(over["keys"], over_coords):
            print(f"umap: overlay {key}: ({ux:.3f}, {uy:.3f})", flush=True)
    print(
        f"umap: {n} points, {d}-d -> 2-D in {fit_s:.1f} s (process peak RSS {peak_gb:.2f} GB); "
        f"figure ({', '.join(names)}) -> {out}; coordinates -> {coords_path}",
        flush=True,
    )
    return {
        "points": n,
        "dim": d,
        "fit_seconds": fit_s,
        "peak_rss_gb": peak_gb,
        "figure": str(out),
        "coords": str(coords_path),
        "coordinates": coords,
        "overlay": None if over is None else over_coords,
        "settings": {"seed": seed, "n_neighbors": n_neighbors, "min_dist": min_dist},
    }
