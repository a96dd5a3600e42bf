"""Source-plane light: real COSMOS galaxies (lenstronomy INTERPOL), analytic core-Sersic, mergers.

A source is a plain dict (JSON-able, stored in params.json) with ``kind`` in {"cosmos",
"core_sersic", "sersic"} and that profile's lenstronomy keyword arguments (arcsec); a merger carries
``"merger": True`` and its second component under ``"second"``. :class:`SourceRenderer` turns such a
dict into surface brightness at given source-plane coordinates.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from pathlib import Path

import numpy as np

from ..core.errors import UserError

CATALOG_NAMES = ("real_galaxy_catalog_25.2.fits", "real_galaxy_catalog_23.5.fits")
REQUIRED_COLUMNS = ("IDENT", "GAL_FILENAME", "GAL_HDU", "PIXEL_SCALE", "NOISE_VARIANCE")
SOURCE_KINDS = ("cosmos", "core_sersic", "sersic")

# keyword arguments each analytic lenstronomy profile takes (everything else in a dict is metadata)
_SERSIC_KEYS = ("amp", "R_sersic", "n_sersic", "e1", "e2", "center_x", "center_y")
_CORE_SERSIC_KEYS = ("amp", "R_sersic", "Rb", "n_sersic", "gamma", "alpha", "e1", "e2", "center_x", "center_y")


class CosmosStamp:
    """One accepted COSMOS stamp, normalised to unit pixel sum, with its INTERPOL instance.

    lenstronomy's ``Interpol`` caches its interpolator for the first image it sees, so each stamp
    gets its own instance, kept in the catalog's LRU cache.
    """

    def __init__(self, image: np.ndarray, pixel_scale_arcsec: float):
        from lenstronomy.LightModel.Profiles.interpolation import Interpol

        self.image = image
        self.pixel_scale_arcsec = float(pixel_scale_arcsec)
        self.interp = Interpol()
        self.half_light_radius_pix = half_light_radius_pix(image)

    def surface_brightness(self, x, y, *, amp, center_x, center_y, phi_G, scale):
        """lenstronomy INTERPOL, evaluated only where the rotated, scaled stamp lies.

        Outside the stamp (and its one-pixel zero border) INTERPOL returns exactly 0, so skipping
        those points changes nothing but the run time (most ray-shot points miss a small stamp).
        """
        x = np.asarray(x, dtype=np.float64)
        y = np.asarray(y, dtype=np.float64)
        xp, yp = self.interp.coord2image_pixel(x, y, center_x, center_y, phi_G, scale)
        ny, nx = self.image.shape
        inside = (np.abs(yp) < (ny + 1) / 2.0) & (np.abs(xp) < (nx + 1) / 2.0)
        out = np.zeros(np.shape(x), dtype=np.float64)
        if inside.any():
            out[inside] = amp * self.interp.image_interp(xp[inside], yp[inside], self.image)
        return out


class CosmosCatalog:
    """GalSim "real galaxy catalog" reader (``galsim_download_cosmos`` layout).

    The catalog table is indexed once (constructor). Stamps are read lazily and cached; the paper's
    cuts (stamp side >= ``min_size_pix``; noise RMS = sqrt(NOISE_VARIANCE) < ``max_noise_frac`` of
    the stamp's peak) need the pixels, so they are applied when a stamp is first read: ``draw``
    rejection-samples uniformly over the catalog rows, which is uniform over the accepted stamps and
    deterministic given the rng (whatever the cache holds). ``accepted()`` evaluates every row.
    """

    def __init__(
        self,
        cosmos_dir: str | Path,
        min_size_pix: int = 50,
        max_noise_frac: float = 0.05,
        cache_size: int = 256,
        clean_k_sigma: float | None = None,
    ):
        from astropy.io import fits

        d = Path(cosmos_dir)
        if not d.is_dir():
            raise UserError(
                f"cosmos_dir: {d} is not a directory (expected a GalSim real-galaxy-catalog "
                f"folder with {' or '.join(CATALOG_NAMES)})"
            )
        cat = next((d / n for n in CATALOG_NAMES if (d / n).is_file()), None)
        if cat is None:
            raise UserError(f"cosmos_dir: {d} has no {' or '.join(CATALOG_NAMES)} (the catalog table)")
        try:
            table = fits.getdata(cat, 1)
        except Exception as exc:
            raise UserError(f"{cat}: cannot read the catalog table ({type(exc).__name__}: {exc})") from None
        names = [c.upper() for c in getattr(getattr(table, "columns", None), "names", []) or []]
        missing = [c for c in REQUIRED_COLUMNS if c not in names]
        if missing:
            raise UserError(
                f"{cat}: malformed COSMOS catalog, missing column(s) {', '.join(missing)} "
                f"(expected {', '.join(REQUIRED_COLUMNS)})"
            )
        if len(table) == 0:
            raise UserError(f"{cat}: the COSMOS catalog has no rows")
        self.dir = d
        self.catalog_path = cat
        self.ident = np.asarray(table["IDENT"]).astype(np.int64)
        self.gal_filename = [str(s).strip() for s in table["GAL_FILENAME"]]
        self.gal_hdu = np.asarray(table["GAL_HDU"]).astype(np.int64)
        self.pixel_scale = np.asarray(table["PIXEL_SCALE"], dtype=np.float64)
        self.noise_rms = np.sqrt(np.clip(np.asarray(table["NOISE_VARIANCE"], dtype=np.float64), 0, None))
        for fname in sorted(set(self.gal_filename)):
            if not (d / fname).is_file():
                raise UserError(f"{cat}: GAL_FILENAME {fname!r} not found in {d}")
        self.min_size_pix = int(min_size_pix)
        self.max_noise_frac = float(max_noise_frac)
        self.clean_k_sigma = clean_k_sigma  # None: stamps lensed as they are (the paper's way)
        self._row_of_ident = {int(i): r for r, i in enumerate(self.ident)}
        self._accepted: dict[int, bool] = {}  # row -> passes the cuts (filled lazily)
        self._cache: OrderedDict[int, CosmosStamp] = OrderedDict()
        self._cache_size = int(cache_size)
        self._files: dict = {}
        # fail now, not mid-run, if no stamp passes the cuts (stops at the first that does)
        if not any(self.passes_cuts(r) for r in range(len(self))):
            raise UserError(
                f"{cat}: no COSMOS stamp passes the cuts (side >= {self.min_size_pix} px, "
                f"noise RMS < {self.max_noise_frac:g} of the peak)"
            )

    def __len__(self) -> int:
        return len(self.ident)

    # ---- pixels
    def _read(self, row: int) -> np.ndarray:
        from astropy.io import fits

        fname = self.gal_filename[row]
        hdul = self._files.get(fname)
        if hdul is None:
            hdul = self._files[fname] = fits.open(self.dir / fname, memmap=True, lazy_load_hdus=True)
        try:
            data = hdul[int(self.gal_hdu[row])].data
        except (IndexError, KeyError):
            raise UserError(
                f"{self.catalog_path}: row {row} (IDENT {self.ident[row]}) names HDU "
                f"{self.gal_hdu[row]} that {fname} does not have"
            ) from None
        if data is None or np.ndim(data) != 2:
            raise UserError(f"{self.dir / fname}: HDU {self.gal_hdu[row]} is not a 2-D galaxy stamp")
        return np.array(data, dtype=np.float64)

    def passes_cuts(self, row: int) -> bool:
        ok = self._accepted.get(row)
        if ok is None:
            img = self._read(row)
            peak = float(np.nanmax(img)) if img.size else 0.0
            ok = (
                min(img.shape) >= self.min_size_pix
                and peak > 0
                and self.noise_rms[row] < self.max_noise_frac * peak
                and img.sum() > 0
            )
            self._accepted[row] = bool(ok)
        return ok

    def accepted(self) -> list[int]:
        """Rows that pass the paper's cuts (reads every stamp once)."""
        return [r for r in range(len(self)) if self.passes_cuts(r)]

    def stamp(self, row: int) -> CosmosStamp:
        hit = self._cache.get(row)
        if hit is not None:
            self._cache.move_to_end(row)
            return hit
        img = self._read(row)
        img = np.where(np.isfinite(img), img, 0.0)
        if self.clean_k_sigma is not None:
            img = clean_stamp(img, float(self.noise_rms[row]), self.clean_k_sigma)
        hit = CosmosStamp(img / img.sum(), self.pixel_scale[row])
        self._cache[row] = hit
        if len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return hit

    def row_of(self, ident: int) -> int:
        try:
            return self._row_of_ident[int(ident)]
        except KeyError:
            raise UserError(f"{self.catalog_path}: no galaxy with IDENT {ident}") from None

    def draw_row(self, rng: np.random.Generator, exclude: int | None = None, max_tries: int = 10000) -> int:
        """A uniformly random row that passes the cuts (and is not ``exclude``)."""
        for _ in range(max_tries):
            row = int(rng.integers(len(self)))
            if row != exclude and self.passes_cuts(row):
                return row
        accepted = self.accepted()
        good = [r for r in accepted if r != exclude] or accepted  # a 1-galaxy catalog: allow a repeat
        if not good:
            raise UserError(
                f"{self.catalog_path}: no COSMOS stamp passes the cuts (side >= "
                f"{self.min_size_pix} px, noise < {self.max_noise_frac:g} of peak)"
            )
        return good[int(rng.integers(len(good)))]  # pragma: no cover - astronomically unlikely

    def close(self) -> None:
        for h in self._files.values():
            h.close()
        self._files.clear()


class SourceRenderer:
    """Surface brightness of a source dict at source-plane coordinates (arcsec).

    Profile classes are built once. Analytic amplitudes are lenstronomy's (surface brightness at
    R_sersic); a COSMOS stamp is stored with unit pixel sum, so ``amp = 1 / scale**2`` gives it unit
    total flux.
    """

    def __init__(self, catalog: CosmosCatalog | None = None):
        from lenstronomy.LightModel.Profiles.sersic import CoreSersic, SersicElliptic

        self.catalog = catalog
        self._sersic = SersicElliptic()
        self._core = CoreSersic()

    def sersic_total_flux(self, amp: float, R_sersic: float, n_sersic: float) -> float:
        """Analytic total flux of a Sersic profile (also used for core-Sersic: the core is tiny)."""
        return float(self._sersic.total_flux(amp=amp, R_sersic=R_sersic, n_sersic=n_sersic))

    def component(self, x, y, src: dict) -> np.ndarray:
        kind = src.get("kind")
        if kind == "core_sersic":
            return self._core.function(x, y, **_pick(src, _CORE_SERSIC_KEYS, "core_sersic"))
        if kind == "sersic":
            return self._sersic.function(x, y, **_pick(src, _SERSIC_KEYS, "sersic"))
        if kind == "cosmos":
            stamp = self._cosmos_stamp(src)
            scale = float(src.get("scale", stamp.pixel_scale_arcsec))
            amp = float(src.get("amp", 1.0 / scale**2))
            return stamp.surface_brightness(
                x,
                y,
                amp=amp,
                center_x=float(src.get("center_x", 0.0)),
                center_y=float(src.get("center_y", 0.0)),
                phi_G=float(src.get("phi_G", 0.0)),
                scale=scale,
            )
        raise UserError(f"source.kind: unknown source kind {kind!r} (expected one of: {', '.join(SOURCE_KINDS)})")

    def __call__(self, x, y, src) -> np.ndarray:
        """A source dict (with an optional merger ``second``) or a list of dicts, summed."""
        if isinstance(src, (list, tuple)):
            out = 0.0
            for s in src:
                out = out + self(x, y, s)
            return out
        if not isinstance(src, dict):
            raise UserError(f"source: expected a dict with a 'kind' key, got {type(src).__name__}")
        out = self.component(x, y, src)
        if src.get("merger") and src.get("second") is not None:
            out = out + self.component(x, y, src["second"])
        return out

    def _cosmos_stamp(self, src: dict) -> CosmosStamp:
        if src.get("image") is not None:  # a user-given stamp (render API)
            img = np.asarray(src["image"], dtype=np.float64)
            if img.ndim != 2 or not img.sum() > 0:
                raise UserError("source.image: expected a 2-D stamp with positive total flux")
            key = ("image", id(src["image"]))
            stamp = getattr(self, "_user_stamp", None)
            if stamp is None or stamp[0] != key:
                stamp = (key, CosmosStamp(img / img.sum(), float(src.get("pixel_scale", 0.03))))
                self._user_stamp = stamp
            return stamp[1]
        if self.catalog is None:
            raise UserError("source.kind 'cosmos' needs cosmos_dir in the config (or an 'image' array)")
        if "row" in src:
            row = int(src["row"])
        elif "id" in src:
            row = self.catalog.row_of(src["id"])
        else:
            raise UserError("source: a 'cosmos' source needs an 'id' (IDENT) or an 'image'")
        return self.catalog.stamp(row)


def _pick(src: dict, keys, kind: str) -> dict:
    out = {}
    for k in keys:
        if k in src:
            out[k] = float(src[k])
        elif k in ("center_x", "center_y", "e1", "e2"):
            out[k] = 0.0
        elif k == "amp":
            out[k] = 1.0
        elif k == "alpha":
            out[k] = 3.0
        elif k == "gamma":
            out[k] = 0.0
        else:
            raise UserError(f"source: {kind} source needs key {k!r} (lenstronomy {kind.upper()} kwargs)")
    return out


def analytic_amp_for_unit_flux(renderer: SourceRenderer, R_sersic: float, n_sersic: float) -> float:
    """Amplitude that gives a Sersic profile unit total flux (mergers are mixed in flux ratio)."""
    f = renderer.sersic_total_flux(1.0, R_sersic, n_sersic)
    return 1.0 / f if f > 0 and math.isfinite(f) else 1.0


def core_sersic_total_flux(
    renderer: SourceRenderer, amp: float, R_sersic: float, n_sersic: float, Rb: float, gamma: float, alpha: float
) -> float:
    """Total flux of lenstronomy's CoreSersic, by its own radial integral (2 pi R^2 I(R) dlnR, 4000 log steps
    from 1e-6 to 100 R_sersic; relative accuracy ~1e-6). lenstronomy's elliptical radius sqrt(q x^2 + y^2/q)
    preserves area, so the circular integral holds for any ellipticity. The plain Sersic formula, used before,
    misses the core: 0.83-1.00 of the flux (bench/numerics.py)."""
    lnr = np.linspace(math.log(1e-6 * R_sersic), math.log(100.0 * R_sersic), 4000)
    r = np.exp(lnr)
    sb = renderer._core.function(
        r,
        np.zeros_like(r),
        amp=amp,
        R_sersic=R_sersic,
        Rb=Rb,
        n_sersic=n_sersic,
        gamma=gamma,
        alpha=alpha,
        e1=0.0,
        e2=0.0,
    )
    return float(np.trapezoid(2 * math.pi * r**2 * sb, lnr))


def core_sersic_amp_for_unit_flux(
    renderer: SourceRenderer, R_sersic: float, n_sersic: float, Rb: float, gamma: float, alpha: float
) -> float:
    """Amplitude that gives a core-Sersic profile unit total flux, normalised by its own integral."""
    f = core_sersic_total_flux(renderer, 1.0, R_sersic, n_sersic, Rb, gamma, alpha)
    return 1.0 / f if f > 0 and math.isfinite(f) else 1.0


def half_light_radius_pix(image: np.ndarray) -> float:
    """Half-light radius of a stamp in pixels: sqrt(A / pi), A the area of the brightest pixels that hold half
    the flux (interpolated within the last pixel).

    For any profile whose isophotes are ellipses (a Sersic in lenstronomy's area-preserving convention) those
    pixels fill the half-light ellipse, of area pi R_sersic^2, so this is the radius an analytic source of the
    same size has; it needs no centre and no shape fit, so it holds for irregular galaxies too.
    """
    v = np.sort(np.asarray(image, dtype=np.float64).ravel())[::-1]
    half = 0.5 * float(v.sum())
    if not half > 0:
        raise UserError("half_light_radius_pix: the stamp has no positive flux")
    c = np.cumsum(v)
    i = int(np.searchsorted(c, half))
    before = float(c[i - 1]) if i > 0 else 0.0
    area = i + (half - before) / float(v[i])
    return math.sqrt(area / math.pi)


def rebin_stamp(image: np.ndarray, block: int) -> np.ndarray:
    """Block-sum a stamp by ``block`` x ``block`` pixels (zero-padded evenly, so its centre stays): the flux
    is kept exactly, structure finer than the new pixel is averaged away."""
    if block <= 1:
        return image
    ny, nx = image.shape
    py, px = (-ny) % block, (-nx) % block
    img = np.pad(image, ((py // 2, py - py // 2), (px // 2, px - px // 2)))
    return img.reshape(img.shape[0] // block, block, img.shape[1] // block, block).sum(axis=(1, 3))


def clean_stamp(image: np.ndarray, noise_rms: float, k_sigma: float) -> np.ndarray:
    """A COSMOS stamp without its sky pedestal and noise floor: subtract the median of the stamp's border
    (one pixel wide), then set every pixel below ``k_sigma`` x the catalog noise RMS to 0. Lensed raw,
    a stamp's noise and pedestal cover the whole stamp footprint (bench/numerics.py measures both)."""
    img = np.asarray(image, dtype=np.float64)
    border = np.concatenate([img[0], img[-1], img[1:-1, 0], img[1:-1, -1]])
    out = img - float(np.median(border))
    out[out < k_sigma * noise_rms] = 0.0
    return out
