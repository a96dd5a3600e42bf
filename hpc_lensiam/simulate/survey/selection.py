"""Survey selection in the style of Collett (2015, ApJ 811, 20), and the measurements it needs.

A system is labelled lens when (thresholds in ``SelectionCuts``):
- it is multiply imaged: >= ``min_images`` images of the source centre with |mu| >= ``min_image_mag``
  (a demagnified central image does not count);
- total magnification of the extended source >= ``min_magnification`` (Collett: 3);
- arc signal-to-noise >= ``min_arc_snr`` (Collett: 20), summed over the pixels where the PSF-convolved
  arc exceeds the noise sigma (lens light perfectly subtracted, its Poisson noise kept);
- the source is resolved inside the Einstein radius: theta_E^2 > f^2 (r_source^2 + (FWHM/2)^2);
- its light lies in the cutout: no pixel of the PSF-convolved arcs in the outer ``edge_frame_pix`` pixels
  of the field above the background noise sigma (a search's cutout is centred on the deflector and holds
  its arcs). Non-lenses' background galaxies obey the same rule (simulator.py), so neither class has a
  glow at the field's edge that the other lacks (issue 28 (1): 19% of hst non-lenses had one, no lens).

Before any source, a deflector is a survey target only when it is bright enough (apparent magnitude <=
``max_deflector_mag``, VIS 22.5 like Euclid's lens searches) and its theta_E is resolvable (>=
``min_theta_E_fwhm`` x the median PSF FWHM of the bank and >= ``min_theta_E_arcsec``): ``min_theta_E_arcsec``.

Images are counted on the ray-shot grid with the triangle test (Schneider, Ehlers & Falco 1992, sec.
11.2): every grid cell is split in two triangles; a triangle whose source-plane image contains the
source point holds an image there; touching hits are one image, whose magnification is the ratio
of the triangles' image- and source-plane areas.
"""

from __future__ import annotations

import numba
import numpy as np

from .config import SelectionCuts


@numba.njit(cache=True, nogil=True, error_model="numpy")
def _triangle_hits(beta_x, beta_y, xs, ys, hit, area):  # pragma: no cover - compiled
    """Per grid cell (i, j) with corners a = (i, j), b = (i, j+1), c = (i+1, j), d = (i+1, j+1), triangles
    abc and dcb: ``hit`` where one contains the source point (xs, ys) (the three edge cross products, relative
    to it, of one sign, zero included), ``area`` the smallest such triangle's source-plane area. One pass over
    the cells, the same arithmetic as the array expressions it replaced (same numbers, ~20x faster); the
    corners are taken relative to (xs, ys) as they are read (no shifted copies of the grid per source)."""
    n0, n1 = hit.shape
    for i in range(n0):
        for j in range(n1):
            for t in range(2):
                if t == 0:
                    px, py = beta_x[i, j] - xs, beta_y[i, j] - ys
                    qx, qy = beta_x[i, j + 1] - xs, beta_y[i, j + 1] - ys
                    rx, ry = beta_x[i + 1, j] - xs, beta_y[i + 1, j] - ys
                else:
                    px, py = beta_x[i + 1, j + 1] - xs, beta_y[i + 1, j + 1] - ys
                    qx, qy = beta_x[i + 1, j] - xs, beta_y[i + 1, j] - ys
                    rx, ry = beta_x[i, j + 1] - xs, beta_y[i, j + 1] - ys
                s1 = (qx - px) * -py - (qy - py) * -px
                s2 = (rx - qx) * -qy - (ry - qy) * -qx
                s3 = (px - rx) * -ry - (py - ry) * -rx
                if (s1 >= 0 and s2 >= 0 and s3 >= 0) or (s1 <= 0 and s2 <= 0 and s3 <= 0):
                    hit[i, j] = True
                    tri = 0.5 * abs((qx - px) * (ry - py) - (qy - py) * (rx - px))
                    if tri < area[i, j]:
                        area[i, j] = tri


def kept_cells(keep: np.ndarray, n_side: int) -> np.ndarray:
    """Grid cells (n_side - 1 square) whose four corners all have ``keep`` > 0 (``image_multiplicity``)."""
    k = np.asarray(keep).reshape(n_side, n_side) > 0
    return k[:-1, :-1] & k[:-1, 1:] & k[1:, :-1] & k[1:, 1:]


def image_multiplicity(
    beta_x: np.ndarray,
    beta_y: np.ndarray,
    n_side: int,
    cell_area_arcsec2: float,
    xs: float,
    ys: float,
    min_abs_mag: float,
    keep: np.ndarray | None = None,
    keep_cells: np.ndarray | None = None,
) -> tuple[int, list[float]]:
    """(number of images with |mu| >= min_abs_mag, their |mu|) of the point (xs, ys).

    ``beta_x, beta_y``: source-plane coordinates of an ``n_side`` x ``n_side`` regular image grid
    (lenstronomy order, row = y); ``cell_area_arcsec2``: the image-plane area of one grid cell; ``keep``:
    1/0 per grid point, cells with any 0 corner hold no image (the central-image core, simulator.py);
    ``keep_cells``: ``kept_cells(keep, n_side)``, for a caller that counts many sources on one grid.
    """
    from scipy import ndimage

    bx = np.ascontiguousarray(np.asarray(beta_x, dtype=np.float64).reshape(n_side, n_side))
    by = np.ascontiguousarray(np.asarray(beta_y, dtype=np.float64).reshape(n_side, n_side))
    hit = np.zeros((n_side - 1, n_side - 1), bool)
    area = np.full(hit.shape, np.inf)
    _triangle_hits(bx, by, float(xs), float(ys), hit, area)
    if keep_cells is None and keep is not None:
        keep_cells = kept_cells(keep, n_side)
    if keep_cells is not None:
        hit &= keep_cells
    rows, cols = np.flatnonzero(hit.any(axis=1)), np.flatnonzero(hit.any(axis=0))
    if rows.size == 0:
        return 0, []
    box = np.s_[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]  # the hits' bounding box: the same components
    hit, area = hit[box], area[box]
    labels, n = ndimage.label(hit, structure=np.ones((3, 3)))
    mags = []
    for i in range(1, n + 1):
        src_area = float(area[labels == i].min())
        mags.append(0.5 * cell_area_arcsec2 / max(src_area, 1e-300))
    kept = sorted((m for m in mags if m >= min_abs_mag), reverse=True)
    return len(kept), kept


def min_theta_E_arcsec(cuts: SelectionCuts, psf_fwhm_arcsec: float) -> float:
    """Smallest theta_E a lens may have: resolvable (``min_theta_E_fwhm`` x the PSF FWHM, default 1.5 FWHM =
    3 PSF half-widths) and at least ``min_theta_E_arcsec``. Below it the images merge with the deflector's
    core into one blob and the label is noise (issue 28 (3): 18% of lenses had theta_E < 0.3")."""
    return max(cuts.min_theta_E_arcsec, cuts.min_theta_E_fwhm * psf_fwhm_arcsec)


def edge_snr(conv_cps: np.ndarray, background_sigma_cps: float, frame_pix: int) -> float:
    """Brightest pixel of a PSF-convolved source image in the outer ``frame_pix`` pixels, in units of the
    background noise sigma (0 with no frame)."""
    if frame_pix <= 0:
        return 0.0
    frame = np.ones(conv_cps.shape, bool)
    frame[frame_pix:-frame_pix, frame_pix:-frame_pix] = False
    return float(conv_cps[frame].max() / background_sigma_cps)


def arc_snr(arc_cps: np.ndarray, sigma_cps: np.ndarray) -> float:
    """Collett (2015) arc S/N: sum of arc flux over pixels where it exceeds the noise, over that noise."""
    mask = arc_cps > sigma_cps
    if not mask.any():
        return 0.0
    return float(arc_cps[mask].sum() / np.sqrt((sigma_cps[mask] ** 2).sum()))


def failed_cuts(
    cuts: SelectionCuts,
    *,
    n_images: int,
    magnification: float,
    snr: float,
    theta_E: float,
    source_R_arcsec: float,
    psf_fwhm_arcsec: float,
    edge_snr: float = 0.0,
) -> list[str]:
    """The ``SelectionCuts`` keys a measured source fails (empty: it passes)."""
    resolved = theta_E**2 > cuts.resolution_factor**2 * (source_R_arcsec**2 + (psf_fwhm_arcsec / 2) ** 2)
    checks = (
        ("resolution_factor", resolved),
        ("min_images", n_images >= cuts.min_images),
        ("min_magnification", magnification >= cuts.min_magnification),
        ("min_arc_snr", snr >= cuts.min_arc_snr),
        ("edge_frame_pix", cuts.edge_frame_pix == 0 or edge_snr <= 1.0),
    )
    return [name for name, ok in checks if not ok]


def passes(cuts: SelectionCuts, **measured) -> bool:
    return not failed_cuts(cuts, **measured)


class Rejections:
    """Why the systems drawn so far failed the selection: per cut, how many sources it saw and rejected and
    the best value any of them reached. Feeds the error when no deflector passes (simulator.py), so that
    error names the cut to loosen instead of "loosen selection". The simulator checks the cheap cuts first
    (resolution, then image count, then the magnification of the unconvolved render) and measures the others
    only for sources that pass them, so a cut "sees" the sources that reached it."""

    WHAT = {
        "resolution_factor": "theta_E / sqrt(r_source^2 + (FWHM/2)^2)",
        "min_images": "image count",
        "min_magnification": "magnification",
        "min_arc_snr": "arc S/N",
        "edge_frame_pix": "peak arc S/N per pixel in the edge frame",
    }

    DEFLECTOR = {
        "max_deflector_mag": ("selection.max_deflector_mag", "lowest deflector magnitude", min),
        "min_theta_E": ("selection.min_theta_E_fwhm / min_theta_E_arcsec", "highest theta_E", max),
    }

    def __init__(self) -> None:
        self.deflector_rejected = dict.fromkeys(self.DEFLECTOR, 0)
        self.deflector_best: dict[str, float] = {}
        self.draws = 0
        self.subcritical = 0  # deflectors without an Einstein radius
        self.sources = 0
        self.seen = dict.fromkeys(self.WHAT, 0)
        self.rejected = dict.fromkeys(self.WHAT, 0)
        self.best = dict.fromkeys(self.WHAT, float("-inf"))

    def deflector(self, key: str, value: float) -> None:
        """One deflector rejected by a deflector-level cut (``DEFLECTOR``) at measured ``value``."""
        self.deflector_rejected[key] += 1
        pick = self.DEFLECTOR[key][2]
        self.deflector_best[key] = pick(self.deflector_best.get(key, value), float(value))

    def source(self, values: dict[str, float], failed: list[str]) -> None:
        """One source: ``values`` of the cuts it was checked against (key -> measured value), ``failed``
        the keys it failed."""
        self.sources += 1
        for key, value in values.items():
            self.seen[key] += 1
            self.best[key] = max(self.best[key], float(value))
        for key in failed:
            self.rejected[key] += 1

    def summary(self, cuts: SelectionCuts) -> str:
        """One sentence: the cut that rejected the largest share of the sources it saw, with its threshold
        and the best value reached (or: every deflector was subcritical)."""
        head = f"{self.draws} deflector draws ({self.sources} sources tried)"
        if self.sources == 0 and any(self.deflector_rejected.values()):
            key = max(self.deflector_rejected, key=self.deflector_rejected.get)
            name, what, _ = self.DEFLECTOR[key]
            return (
                f"{head}: {name} rejected {self.deflector_rejected[key]} of them (the {what} reached was "
                f"{self.deflector_best[key]:.3g}); loosen it or widen the priors"
            )
        if self.sources == 0:
            return (
                f"{head}: no deflector had an Einstein radius ({self.subcritical} subcritical); "
                f"raise population.sigma_v_km_s or the mass"
            )
        key = max(self.WHAT, key=lambda k: (self.rejected[k] / max(self.seen[k], 1), self.rejected[k]))
        threshold = getattr(cuts, key)
        return (
            f"{head}: selection.{key} = {threshold:g} rejected {self.rejected[key]} of the {self.seen[key]} "
            f"sources it saw (the highest {self.WHAT[key]} reached was {self.best[key]:.3g}); loosen it or "
            f"widen the priors"
        )
