"""How every figure shows an image: a stretch set from the noise, a scale bar in arcsec, captions that fit.

Images here are normalised to a maximum of 1 (simulator and ingest alike), so a bright lens
galaxy at 1 and an arc a few noise sigmas above the sky (~0.01) are both on the same linear
0-1 scale, where the arc is invisible. The default display is therefore an asinh stretch whose
softening is set by the image's noise level (Lupton et al. 1999, 2004): linear within a few sigma
of the sky, logarithmic above, so structure a few sigma above the noise and the lens core are both
visible.

- noise sigma (:func:`noise_sigma`), in the image's units: the background RMS the sample records
  (``params["ingest"]["background_rms"]`` over its ``flux_scale``, times what the resampling to the
  target grid did to white noise), else the simulator's ``noise_sigma`` of the view (a fraction of
  the peak), else 1.4826 x the median distance to the median of the pixels below it (a one-sided
  MAD: sources only add flux, so that side is the sky);
- :func:`stretch`: ``lo`` = median - 0.5 sigma (the sky sits just above black, its noise visible
  but subdued), ``hi`` = the maximum; asinh: ``asinh((x - lo) / a) / asinh((hi - lo) / a)`` with
  ``a`` = 2 sigma (chosen by eye on simulated pairs and the Euclid Q1 lens: 1 sigma made the noise
  as bright as faint arcs); log: ``log10(1 + 1000 t) / log10(1001)`` of ``t = (x - lo) / (hi - lo)``
  (ds9's log); linear: ``t``;
- scale bar: the largest round length (0.05, 0.1, 0.2, 0.25, 0.5, 1, 2, 5 ... arcsec) up to a
  quarter of the field, from the data set's pixel scale;
- captions are shortened (middle ellipsis) until they fit their panel, measured with the renderer.

Torch-free; matplotlib is imported inside the drawing functions only.
"""

from __future__ import annotations

import csv
import math
import os
import sys
from pathlib import Path

import numpy as np

from ..core.errors import UserError

STRETCHES = ("asinh", "linear", "log")
DEFAULT_STRETCH = "asinh"
SOFTENING_SIGMA = 2.0  # asinh softening, in noise sigmas
BLACK_SIGMA = 0.5  # black level: the sky median minus this many sigmas
LOG_A = 1000.0  # ds9's log stretch exponent
NICE_ARCSEC = (0.05, 0.1, 0.2, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0)
CMAP = "magma"
STRETCH_HELP = "image display: asinh (default; softening 2 x the image's noise sigma), linear, or log"


def check_stretch(stretch: str, flag: str = "--stretch") -> str:
    if stretch not in STRETCHES:
        raise UserError(f"{flag}: unknown stretch {stretch!r} (expected one of: {', '.join(STRETCHES)})")
    return stretch


# ----------------------------------------------------------------------------------------- noise
def mad_sigma(image: np.ndarray) -> float:
    """Noise sigma from the pixels below the median: 1.4826 x their median distance to it (the
    Gaussian sigma for pure noise; sources only add flux, so this side is the sky's)."""
    x = np.asarray(image, np.float64)
    x = x[np.isfinite(x)]
    if x.size == 0:
        return 0.0
    m = np.median(x)
    below = m - x[x < m]
    return float(1.4826 * np.median(below)) if below.size else 0.0


def resampled_noise_factor(ingest: dict) -> float:
    """How ingest's flux-conserving resampling scaled per-pixel white noise: an output pixel ``r`` =
    out/in pixel scale times wider sums ~r^2 input pixels (noise x r) when ``r`` >= 1, and holds a
    fraction r^2 of one input pixel (noise x r^2) when upsampling. 1 when the scales are not recorded."""
    s_in, s_out = ingest.get("pixel_scale_arcsec"), ingest.get("target_pixel_scale_arcsec")
    if isinstance(s_in, (list, tuple)) and len(s_in) == 2:
        s_in = math.sqrt(float(s_in[0]) * float(s_in[1]))
    if not (isinstance(s_in, (int, float)) and isinstance(s_out, (int, float)) and s_in > 0 and s_out > 0):
        return 1.0
    r = float(s_out) / float(s_in)
    return r if r >= 1 else r * r


def noise_sigma(image: np.ndarray, params: dict | None = None, view: int = 1) -> tuple[float, str]:
    """(noise sigma in the image's units, where it came from): see the module doc."""
    params = params or {}
    ing = params.get("ingest") or {}
    rms, scale = ing.get("background_rms"), ing.get("flux_scale")
    if isinstance(rms, (int, float)) and isinstance(scale, (int, float)) and rms > 0 and scale > 0:
        return float(rms) / float(scale) * resampled_noise_factor(ing), "background_rms"
    views = params.get("views") or []
    if 1 <= view <= len(views) and isinstance(views[view - 1], dict):
        s = views[view - 1].get("noise_sigma")
        if isinstance(s, (int, float)) and s > 0:
            return float(s), "simulated noise_sigma"
    return mad_sigma(image), "MAD"


def stretch(image: np.ndarray, kind: str = DEFAULT_STRETCH, sigma: float | None = None) -> np.ndarray:
    """``image`` -> display values in [0, 1] (float32, NaN -> 0) under ``kind``; ``sigma``: the noise
    (default: :func:`mad_sigma`)."""
    check_stretch(kind)
    x = np.asarray(image, np.float64)
    finite = np.isfinite(x)
    if not finite.any():
        return np.zeros(x.shape, np.float32)
    vals = x[finite]
    hi = float(vals.max())
    sig = mad_sigma(vals) if sigma is None else float(sigma)
    if not (math.isfinite(sig) and sig > 0):  # noise-free (or flat) image: 0.1% of the range
        sig = max(1e-3 * (hi - float(vals.min())), 1e-12)
    lo = float(np.median(vals)) - BLACK_SIGMA * sig
    if hi <= lo:
        hi = lo + sig
    t = np.where(finite, x, lo) - lo
    if kind == "asinh":
        a = SOFTENING_SIGMA * sig
        y = np.arcsinh(t / a) / np.arcsinh((hi - lo) / a)
    elif kind == "log":
        y = np.log10(1.0 + LOG_A * np.clip(t / (hi - lo), 0, None)) / np.log10(1.0 + LOG_A)
    else:
        y = t / (hi - lo)
    return np.clip(y, 0.0, 1.0).astype(np.float32)


def describe(kind: str) -> str:
    """A short line for a figure: which stretch it shows."""
    if kind == "asinh":
        return f"asinh stretch, softening {SOFTENING_SIGMA:g} x noise sigma"
    return f"{kind} stretch"


# ------------------------------------------------------------------------------------- scale bar
def pixel_scale_of(manifest: dict) -> float | None:
    """arcsec/pixel of a shard set (ingested: top level; simulated: the instrument config)."""
    s = manifest.get("pixel_scale_arcsec")
    if s is None:
        s = ((manifest.get("config") or {}).get("instrument") or {}).get("pixel_scale_arcsec")
    return float(s) if isinstance(s, (int, float)) and s > 0 else None


def scale_bar_arcsec(field_arcsec: float) -> float:
    """The largest round length <= a quarter of the field (the smallest round one if none fits)."""
    fits = [n for n in NICE_ARCSEC if n <= field_arcsec / 4 + 1e-9]
    return fits[-1] if fits else NICE_ARCSEC[0]


def scale_bar(pixel_scale_arcsec: float, num_pix: int) -> tuple[float, float]:
    """(length in arcsec, length in pixels) of the scale bar for a field of ``num_pix`` pixels."""
    arcsec = scale_bar_arcsec(pixel_scale_arcsec * num_pix)
    return arcsec, arcsec / pixel_scale_arcsec


def arcsec_label(arcsec: float) -> str:
    return f'{arcsec:g}"'


# ---------------------------------------------------------------------------------------- drawing
def draw_image(
    ax,
    image: np.ndarray,
    kind: str = DEFAULT_STRETCH,
    sigma: float | None = None,
    pixel_scale_arcsec: float | None = None,
    fontsize: float = 7.0,
):
    """Stretched ``image`` on ``ax`` (origin lower, no ticks), with an arcsec scale bar when the pixel
    scale is known. Returns the AxesImage."""
    from mpl_toolkits.axes_grid1.anchored_artists import AnchoredSizeBar

    img = np.asarray(image)
    shown = ax.imshow(stretch(img, kind, sigma), origin="lower", cmap=CMAP, vmin=0, vmax=1, interpolation="nearest")
    ax.set_xticks([]), ax.set_yticks([])
    if pixel_scale_arcsec:
        arcsec, pix = scale_bar(pixel_scale_arcsec, img.shape[1])
        bar = AnchoredSizeBar(
            ax.transData,
            pix,
            arcsec_label(arcsec),
            loc="lower right",
            color="white",
            frameon=False,
            size_vertical=max(img.shape[0] / 100, 0.5),
            pad=0.3,
            sep=2,
            fontproperties={"size": fontsize},
        )
        ax.add_artist(bar)
    return shown


def shorten(line: str, keep: int) -> str:
    """``line`` cut to ``keep`` characters with an ellipsis in the middle (both ends carry meaning)."""
    if len(line) <= keep:
        return line
    if keep <= 1:
        return "…"[:keep]
    head = keep // 2
    tail = keep - 1 - head
    return line[:head] + "…" + (line[-tail:] if tail else "")


def _shorten_longest(lines: list[str]) -> bool:
    """Shorten the longest line by two characters, in its longest double-space-separated field (so a
    long file name gives way before the numbers beside it); False when nothing is left to shorten."""
    i = max(range(len(lines)), key=lambda j: len(lines[j]))
    fields = lines[i].split("  ")
    k = max(range(len(fields)), key=lambda j: len(fields[j]))
    if len(fields[k]) <= 4:
        return False
    fields[k] = shorten(fields[k], len(fields[k]) - 2)
    lines[i] = "  ".join(fields)
    return True


def fit_title(ax, text: str, fontsize: float, renderer, loc: str = "left") -> str:
    """Set ``ax``'s title to ``text``, lines shortened (middle ellipsis) until it fits the axes' width."""
    lines = text.split("\n")
    width = ax.get_window_extent(renderer).width
    title = ax.set_title(text, fontsize=fontsize, loc=loc)
    for _ in range(300):
        if title.get_window_extent(renderer).width <= width or not _shorten_longest(lines):
            break
        title.set_text("\n".join(lines))
    return title.get_text()


def fit_suptitle(fig, text: str, fontsize: float, renderer) -> str:
    """The figure's title, broken at '; ' and then shortened until it fits the figure's width."""
    width = fig.get_window_extent(renderer).width * 0.98
    title = fig.suptitle(text, fontsize=fontsize)
    if title.get_window_extent(renderer).width > width:
        title.set_text(text.replace("; ", "\n"))
    lines = title.get_text().split("\n")
    for _ in range(300):
        if title.get_window_extent(renderer).width <= width or not _shorten_longest(lines):
            break
        title.set_text("\n".join(lines))
    return title.get_text()


def grid_shape(n: int, max_cols: int, step: int = 1) -> tuple[int, int]:
    """(rows, cols) for ``n`` panels: one row up to ``max_cols``, columns a multiple of ``step``
    (2 keeps a pair's views side by side); never more panels than needed plus a partial row."""
    cols = min(max_cols, n)
    cols = max(step, cols - cols % step)
    return -(-n // cols), cols


def panel_figure(panels: list[dict], title: str = "", kind: str = DEFAULT_STRETCH, max_cols: int = 6, step: int = 1):
    """The matplotlib figure of :func:`draw_panels` (for tests and callers that add to it)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(panels)
    rows, cols = grid_shape(n, max_cols, step)
    side = 3.0 if n <= 2 else 2.3  # inches per image
    cap_lines = max((p.get("caption", "").count("\n") + 1 for p in panels if p.get("caption")), default=0)
    fontsize = 8.0 if n <= 2 else 6.5
    cap_h = cap_lines * fontsize * 1.35 / 72 + 0.12
    label_h = 0.2 if any(p.get("label") for p in panels) else 0.0
    body_h = rows * (side + cap_h + label_h)
    fig, axes = plt.subplots(rows, cols, figsize=(side * cols + 0.2, body_h + 0.6), squeeze=False)
    for ax in axes.flat[n:]:
        ax.remove()
    for ax, p in zip(axes.flat, panels):
        draw_image(ax, p["image"], kind, p.get("sigma"), p.get("pixel_scale"), fontsize=fontsize)
        if p.get("label"):
            ax.set_xlabel(p["label"], fontsize=fontsize)
    renderer = fig.canvas.get_renderer()
    if title:  # the figure's height follows the title's lines once it fits the width
        lines = fit_suptitle(fig, title, 9 if n > 2 else 8.5, renderer).count("\n") + 1
        fig.set_size_inches(fig.get_size_inches()[0], body_h + 0.18 * lines + 0.2)
    else:
        fig.set_size_inches(fig.get_size_inches()[0], body_h + 0.1)
    for _ in range(2):  # the layout sets the axes' widths, the captions must fit them: twice settles it
        for ax, p in zip(axes.flat, panels):
            if p.get("caption"):
                fit_title(ax, p["caption"], fontsize, renderer)
        fig.tight_layout(h_pad=0.6, w_pad=0.6)
    return fig


def draw_panels(
    panels: list[dict],
    out: str | os.PathLike,
    title: str = "",
    kind: str = DEFAULT_STRETCH,
    max_cols: int = 6,
    step: int = 1,
    dpi: int = 110,
) -> str:
    """A PNG of image panels: dicts with ``image`` and optional ``caption``, ``label`` (under the image),
    ``sigma`` (noise, see :func:`noise_sigma`), ``pixel_scale`` (arcsec/px, for the scale bar).

    One or two panels get large panels in one row; more fill rows of up to ``max_cols`` (a multiple
    of ``step``), unused cells removed. Captions and the title are shortened to fit. Atomic write."""
    import matplotlib.pyplot as plt

    from ..core.io import atomic_path

    fig = panel_figure(panels, title, kind, max_cols, step)
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi)
    plt.close(fig)
    return str(out)


# ------------------------------------------------------------------------------------ loss curve
def plot_loss(metrics_csv: str | os.PathLike, out: str | os.PathLike, z_std_ref: float | None = None) -> str | None:
    """``RUN/loss.png`` from ``RUN/metrics.csv``: loss (lr on a twin axis) and z_std against step.
    None (nothing written) when the file has no rows. ``z_std_ref``: the non-collapsed level
    1/sqrt(dim) of l2-normalised outputs, drawn dashed."""
    rows = []
    with open(metrics_csv, newline="") as f:
        for r in csv.DictReader(f):
            try:
                rows.append({k: float(r[k]) for k in ("step", "loss", "lr", "z_std")})
            except (KeyError, TypeError, ValueError):
                continue
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..core.io import atomic_path

    step = np.array([r["step"] for r in rows])
    col = {k: np.array([r[k] for r in rows]) for k in ("loss", "lr", "z_std")}
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(6.4, 5.2), sharex=True)
    marker = "o" if len(rows) < 30 else None
    ax1.plot(step, col["loss"], color="C0", marker=marker, ms=3, label="loss")
    ax1.set_ylabel("loss", color="C0")
    lr_ax = ax1.twinx()
    lr_ax.plot(step, col["lr"], color="C1", lw=1, ls="--", label="lr")
    lr_ax.set_ylabel("learning rate", color="C1")
    lr_ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
    ax2.plot(step, col["z_std"], color="C2", marker=marker, ms=3, label="z_std")
    if z_std_ref:
        ax2.axhline(z_std_ref, color="0.5", ls=":", lw=1, label=f"1/sqrt(dim) = {z_std_ref:.3g}")
    ax2.axhline(0, color="0.8", lw=0.8)
    ax2.set_ylabel("z_std (0 = collapsed)")
    ax2.set_xlabel("optimizer step")
    ax2.legend(fontsize=8, loc="best")
    ax1.set_title(f"{Path(metrics_csv).parent.name}: {len(rows)} logged steps, last loss {col['loss'][-1]:.4f}")
    fig.tight_layout()
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    return str(out)


def plot_loss_safely(metrics_csv: str | os.PathLike, out: str | os.PathLike, z_std_ref: float | None = None) -> bool:
    """:func:`plot_loss` that never raises: a failure is one warning line on stderr."""
    try:
        return plot_loss(metrics_csv, out, z_std_ref) is not None
    except Exception as exc:  # a picture must never fail a finished training run
        print(f"train: warning: loss plot {out} not written ({type(exc).__name__}: {exc})", file=sys.stderr, flush=True)
        return False
