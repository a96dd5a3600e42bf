"""LensSimulator: lenstronomy lensing of a source by an EPL + shear mass, with lens light, PSF, noise.

One image = lens light (image plane) + source light at the ray-traced source-plane positions,
evaluated on the supersampled detector grid, averaged to detector pixels, convolved with a
detector-scale PSF, plus Gaussian noise, normalised to max 1 (float32).

Speed: every lenstronomy object (grid, LensModel, light profiles, PSF FFTs, the COSMOS index) is
built once per simulator; a LenSiam pair shares its mass model, so the grid is ray-shot ONCE per
pair and both views evaluate their own source on the same source-plane coordinates.
"""

from __future__ import annotations

import warnings

import numpy as np

from ..core.errors import UserError
from ..shards.manifest import LENS_PARAMS
from .config import SimulationConfig
from .instrument import (
    ADAPTIVE_CENTRE_RADIUS_PIX,
    ADAPTIVE_NEIGHBOUR_FACTOR,
    ADAPTIVE_NEIGHBOUR_THRESHOLD,
    DetectorGrid,
    SubpixelRays,
)
from .priors import draw_lens, draw_lens_light, draw_source, uniform
from .psf import PSFBank, convolve_same
from .sources import CosmosCatalog, SourceRenderer

LENS_MODEL_LIST = ("EPL_NUMBA", "SHEAR")
_LENS_DEFAULTS = {"gamma": 2.0, "e1": 0.0, "e2": 0.0, "center_x": 0.0, "center_y": 0.0, "gamma1": 0.0, "gamma2": 0.0}
_LENS_LIGHT_KEYS = ("R_sersic", "n_sersic", "e1", "e2", "center_x", "center_y")


def lens_kwargs(lens: dict) -> list[dict]:
    """8-parameter lens dict -> lenstronomy kwargs for ["EPL_NUMBA", "SHEAR"].

    The shear is centred on the lens (ra_0, dec_0 = centre), so it adds no constant deflection and
    the source position stays relative to the lens centre.
    """
    cx, cy = float(lens["center_x"]), float(lens["center_y"])
    return [
        {
            "theta_E": float(lens["theta_E"]),
            "gamma": float(lens["gamma"]),
            "e1": float(lens["e1"]),
            "e2": float(lens["e2"]),
            "center_x": cx,
            "center_y": cy,
        },
        {"gamma1": float(lens["gamma1"]), "gamma2": float(lens["gamma2"]), "ra_0": cx, "dec_0": cy},
    ]


def lens_light_kwargs(ll: dict, amp: float) -> dict:
    """Lens-light dict -> lenstronomy SERSIC_ELLIPSE kwargs."""
    kw = {k: float(ll[k]) for k in _LENS_LIGHT_KEYS}
    kw["amp"] = float(amp)
    return kw


class EPLShearRayShooter:
    """Ray shooting through EPL + external shear on a fixed grid, with lenstronomy's own kernels.

    Same physics and numbers as ``LensModel(["EPL_NUMBA", "SHEAR"]).ray_shooting`` (checked in the
    tests to ~1e-10 arcsec), about 2x faster, because ray shooting dominates the cost of an image:
    it calls lenstronomy's jitted EPL_NUMBA building blocks (``param_transform``, ``omega``,
    ``alpha``: Tessore & Metcalf 2015) directly instead of through the per-profile dispatch, and
    sums the angular hypergeometric series ``omega`` to a relative ``series_tol`` of 1e-10 instead
    of 1e-16 (float32 images cannot tell the difference).
    """

    def __init__(self, x_arcsec: np.ndarray, y_arcsec: np.ndarray, series_tol: float = 1e-10):
        from lenstronomy.LensModel.Profiles import epl_numba
        from lenstronomy.LensModel.Profiles.shear import Shear

        self._epl = epl_numba
        self._shear = Shear()
        self.x = np.ascontiguousarray(x_arcsec, dtype=np.float64)
        self.y = np.ascontiguousarray(y_arcsec, dtype=np.float64)
        self.series_tol = float(series_tol)

    def deflection(self, lens: dict, x=None, y=None) -> tuple[np.ndarray, np.ndarray]:
        """Deflection (arcsec) at the grid's points, or at the given (x, y)."""
        if x is None:
            x, y = self.x, self.y
        kw_epl, kw_shear = lens_kwargs(lens)
        e = self._epl
        z, b, t, q, ang = e.param_transform(x, y, **kw_epl)
        zx, zy = np.ascontiguousarray(z.real), np.ascontiguousarray(z.imag)
        omega = e.omega(np.arctan2(zy, zx * q), t, q, 200, self.series_tol)
        alpha = e.alpha(zx, zy, b, q, t, omega) * np.exp(1j * ang)
        sx, sy = self._shear.derivatives(x, y, **kw_shear)
        return alpha.real + sx, alpha.imag + sy

    def __call__(self, lens: dict) -> tuple[np.ndarray, np.ndarray]:
        """Source-plane (beta_x, beta_y) arcsec of every grid point: beta = theta - alpha(theta)."""
        ax, ay = self.deflection(lens)
        return self.x - ax, self.y - ay

    def points(self, lens: dict, x, y) -> tuple[np.ndarray, np.ndarray]:
        """Source-plane (x, y) of any image-plane points."""
        x = np.ascontiguousarray(x, dtype=np.float64)
        y = np.ascontiguousarray(y, dtype=np.float64)
        ax, ay = self.deflection(lens, x, y)
        return x - ax, y - ay


def check_lens(lens) -> None:
    """A ``render`` lens argument: a dict of ``LENS_PARAMS`` names with theta_E; a UserError otherwise."""
    if not isinstance(lens, dict):
        raise UserError(f"lens: expected a dict with keys {', '.join(LENS_PARAMS)}")
    unknown = sorted(set(lens) - set(LENS_PARAMS))
    if unknown:
        raise UserError(f"lens: unknown key {unknown[0]!r} (expected {', '.join(LENS_PARAMS)})")
    if "theta_E" not in lens:
        raise UserError("lens: 'theta_E' (Einstein radius, arcsec) is required")


class PairSampler:
    """``sample_pair`` / ``sample_single`` from a family's ``_sample(rng, n_views) -> (images, params)``:
    the writer's interface, the same for every simulation family."""

    def sample_pair(self, rng: np.random.Generator) -> dict:
        """A LenSiam positive pair: one shared mass model, independent source/lens light/PSF/noise."""
        (v1, v2), params = self._sample(rng, 2)
        return {"view1": v1, "view2": v2, "params": params}

    def sample_single(self, rng: np.random.Generator) -> dict:
        """One lens image (params["views"] has one entry)."""
        (img,), params = self._sample(rng, 1)
        return {"image": img, "params": params}


class LensSimulator(PairSampler):
    """Simulates LenSiam pairs (``sample_pair``), single images (``sample_single``) or a chosen
    system (``render``). All randomness comes from the Generator passed in; the built-in PSF bank
    comes from ``config.psf_bank_seed``."""

    # Revision of the images' numbers, recorded in the manifest ("numerics") and checked on a rerun, so shards
    # of two revisions never make one data set. 2: adaptive sub-pixels ray-shot through the grid's interpolated
    # deflection (SubpixelRays; images within 1e-4 of the peak of revision 1's). 3: adaptive refinement also of the
    # neighbours of refined pixels whose spread exceeds 0.02 of the peak (16 x 16 points at a peak, ridge or valley,
    # else 8 x 8) and of the pixels at the mass / light centre (max 0.0018 of the peak from a uniform factor 16 on
    # 48 hst systems, revision 2: 0.0315; docs/survey.md).
    NUMERICS = 3
    # adaptive refinement beyond the spread threshold (instrument.py); None: off (NUMERICS 2's rule, bench/numerics.py)
    adaptive_neighbour_threshold: float | None = ADAPTIVE_NEIGHBOUR_THRESHOLD
    adaptive_centre_radius_pix: float | None = ADAPTIVE_CENTRE_RADIUS_PIX
    adaptive_neighbour_factor: int | None = ADAPTIVE_NEIGHBOUR_FACTOR

    def __init__(self, config: SimulationConfig | None = None):
        from lenstronomy.LightModel.Profiles.sersic import SersicElliptic

        self.config = config if config is not None else SimulationConfig()
        inst = self.config.instrument
        self.grid = DetectorGrid.from_config(inst)
        self.ray_shooter = EPLShearRayShooter(self.grid.x_arcsec, self.grid.y_arcsec)
        self._lens_light = SersicElliptic()
        if self.config.cosmos_dir:
            sp = self.config.source
            self.catalog: CosmosCatalog | None = CosmosCatalog(
                self.config.cosmos_dir,
                min_size_pix=sp.cosmos_min_size_pix,
                max_noise_frac=sp.cosmos_max_noise_frac,
                clean_k_sigma=sp.cosmos_clean_k_sigma,
            )
        else:
            self.catalog = None
        self.sources = SourceRenderer(self.catalog)
        self.psf_bank = PSFBank.from_config(self.config)
        if self.catalog is None:  # said once per simulator (process), after all inputs were checked
            warnings.warn(
                "no cosmos_dir given: simulating analytic core-Sersic sources only "
                "(set cosmos_dir to a GalSim COSMOS real-galaxy catalog for the paper's mix)",
                UserWarning,
                stacklevel=2,
            )

    # ------------------------------------------------------------------------------ building blocks
    @property
    def lens_model(self):
        """lenstronomy ``LensModel(["EPL_NUMBA", "SHEAR"])``: the reference that ``ray_shoot`` matches
        (built on first use: importing it pulls in astropy.cosmology, ~3 s per process)."""
        if getattr(self, "_lens_model", None) is None:
            from lenstronomy.LensModel.lens_model import LensModel

            self._lens_model = LensModel(list(LENS_MODEL_LIST))
        return self._lens_model

    @property
    def num_pix(self) -> int:
        return self.grid.num_pix

    def ray_shoot(self, lens: dict) -> tuple[np.ndarray, np.ndarray]:
        """Source-plane coordinates (arcsec) of every supersampled image-plane grid point."""
        return self.ray_shooter(lens)

    def _adaptive(self, sb: np.ndarray, evaluate, centre: tuple[float, float]) -> np.ndarray:
        """Binned image of ``sb`` with the instrument's adaptive supersampling (DetectorGrid.bin_adaptive),
        ``evaluate(x, y)`` giving the surface brightness at sub-pixel points (arcsec): pixels whose sub-samples
        spread by more than ``adaptive_threshold`` x the peak, their neighbours whose spread exceeds
        ADAPTIVE_NEIGHBOUR_THRESHOLD x the peak, and the pixels within ADAPTIVE_CENTRE_RADIUS_PIX of ``centre``
        (the mass centre for the lensed source, the light centre for lens light: their cusps)."""
        inst = self.config.instrument
        factor = inst.adaptive_supersampling_factor
        if factor <= 0 or self.grid.supersampling_factor < 2:
            return self.grid.bin(sb)
        r = self.adaptive_centre_radius_pix
        return self.grid.bin_adaptive(
            sb,
            lambda mask, f=factor: evaluate(*self.grid.subpixel_points(mask, f)),
            factor,
            inst.adaptive_threshold,
            self.adaptive_neighbour_threshold,
            None if r is None else self.grid.near(float(centre[0]), float(centre[1]), r),
            self.adaptive_neighbour_factor,
        )

    def _lens_light_unit(self, ll: dict) -> np.ndarray:
        """Lens light with amp=1, binned to detector pixels."""
        kw = lens_light_kwargs(ll, 1.0)
        sb = self._lens_light.function(self.grid.x_arcsec, self.grid.y_arcsec, **kw)
        centre = (kw["center_x"], kw["center_y"])
        return self._adaptive(sb, lambda x, y: self._lens_light.function(x, y, **kw), centre)

    def subpixel_rays(self, beta_x, beta_y, lens: dict) -> SubpixelRays:
        """Ray shooting of adaptive sub-pixel points for the mass whose grid rays are ``beta_x, beta_y``: built
        once per mass (the views of a pair share it and its spline), exact near the centre (exact_radius)."""
        last = getattr(self, "_last_rays", None)
        if last is not None and last[0] is beta_x and last[1] is beta_y and last[2] == lens:
            return last[3]
        rays = SubpixelRays(
            self.grid,
            beta_x,
            beta_y,
            lambda x, y: self.ray_shooter.points(lens, x, y),
            (float(lens["center_x"]), float(lens["center_y"])),
            SubpixelRays.exact_radius(self.grid, float(lens["theta_E"])),
        )
        self._last_rays = (beta_x, beta_y, dict(lens), rays)
        return rays

    def _source_image(self, beta_x, beta_y, source, lens: dict | None) -> np.ndarray:
        """Lensed source binned to detector pixels (adaptive refinement needs the ``lens`` to ray-shoot)."""
        sb = self.sources(beta_x, beta_y, source)
        if lens is None:
            return self.grid.bin(sb)
        if self.config.instrument.adaptive_supersampling_factor <= 0 or self.grid.supersampling_factor < 2:
            return self.grid.bin(sb)  # nothing is refined
        rays = self.subpixel_rays(beta_x, beta_y, lens)
        centre = (float(lens["center_x"]), float(lens["center_y"]))
        return self._adaptive(sb, lambda x, y: self.sources(*rays(x, y), source), centre)

    def _compose(
        self,
        beta_x,
        beta_y,
        source,
        lens_light: dict | None,
        psf,
        noise_sigma: float,
        rng: np.random.Generator | None,
        lens: dict | None = None,
    ) -> tuple[np.ndarray, float | None]:
        """One image from source-plane coordinates; returns (float32 image, lens-light amp)."""
        image = self._source_image(beta_x, beta_y, source, lens)
        amp = None
        if lens_light is not None:
            unit = self._lens_light_unit(lens_light)
            if lens_light.get("amp") is not None:
                amp = float(lens_light["amp"])
            elif lens_light.get("peak_ratio") is not None:
                src_peak, ll_peak = float(image.max()), float(unit.max())
                amp = (
                    float(lens_light["peak_ratio"]) * src_peak / ll_peak
                    if src_peak > 0 and ll_peak > 0
                    else float(lens_light["peak_ratio"])
                )
            else:
                raise UserError("lens_light: expected an 'amp' or a 'peak_ratio' key")
            image = image + amp * unit
        if psf is not None:
            if isinstance(psf, (int, np.integer)):
                if not 0 <= int(psf) < len(self.psf_bank):
                    raise UserError(f"psf: index {psf} out of range (the bank has {len(self.psf_bank)} PSFs)")
                image = self.psf_bank.convolve(image, int(psf))
            else:
                k = np.asarray(psf, dtype=np.float64)
                if k.ndim != 2 or k.shape[0] % 2 == 0 or k.shape[1] % 2 == 0 or not k.sum() > 0:
                    raise UserError(
                        f"psf: expected a PSF-bank index or a 2-D odd-sized kernel with "
                        f"positive sum, got shape {k.shape}"
                    )
                image = convolve_same(image, k / k.sum())
        peak = float(image.max())
        if noise_sigma > 0:
            if rng is None:
                raise UserError("noise_sigma > 0 needs an rng (numpy Generator) for the noise draw")
            image = image + rng.normal(0.0, noise_sigma * peak, size=image.shape)
        top = float(image.max())
        if not (np.isfinite(top) and top > 0):
            raise UserError("render: the image has no positive flux (is the source inside the field?)")
        return (image / top).astype(np.float32), amp

    # ----------------------------------------------------------------------------- random samples
    def _draw_view_nuisance(self, rng: np.random.Generator, lens: dict) -> dict:
        cfg = self.config
        return {
            "lens_light": draw_lens_light(rng, cfg.lens_light, lens, cfg.lens),
            "source": draw_source(rng, cfg.source, lens, self.catalog, self.sources),
            "psf_id": int(rng.integers(len(self.psf_bank))),
            "noise_sigma": uniform(rng, cfg.instrument.noise_sigma),
        }

    def _sample(self, rng: np.random.Generator, n_views: int) -> tuple[list[np.ndarray], dict]:
        lens = draw_lens(rng, self.config.lens)
        beta_x, beta_y = self.ray_shoot(lens)  # once for all views: they share the mass model
        images, views = [], []
        for _ in range(n_views):
            view = self._draw_view_nuisance(rng, lens)
            ll = dict(view["lens_light"])
            img, amp = self._compose(beta_x, beta_y, view["source"], ll, view["psf_id"], view["noise_sigma"], rng, lens)
            view["lens_light"]["amp"] = float(amp)
            view["psf_name"] = self.psf_bank.names[view["psf_id"]]
            images.append(img)
            views.append(view)
        return images, {"lens": {k: float(lens[k]) for k in LENS_PARAMS}, "views": views}

    # ----------------------------------------------------------------------------- chosen system
    def render(
        self,
        lens: dict,
        source,
        lens_light: dict | None = None,
        psf=None,
        noise_sigma: float = 0.0,
        rng: np.random.Generator | None = None,
    ) -> np.ndarray:
        """Render a chosen system; returns a float32 (num_pix, num_pix) image normalised to max 1.

        lens: the 8 names of ``hpc_lensiam.shards.manifest.LENS_PARAMS`` (theta_E required; gamma defaults to 2,
        the rest to 0). source: a dict with ``kind`` ("sersic" | "core_sersic" | "cosmos") and that
        profile's lenstronomy kwargs (a cosmos source takes "id" = IDENT or "image" = a 2-D stamp
        with "pixel_scale"), or a list of such dicts (summed). lens_light: SERSIC_ELLIPSE kwargs with
        "amp" or "peak_ratio", or None. psf: None (no convolution), a PSF-bank index or a 2-D odd
        kernel. noise_sigma: Gaussian noise sigma as a fraction of the noiseless peak.
        """
        check_lens(lens)
        full = {**_LENS_DEFAULTS, **lens}
        beta_x, beta_y = self.ray_shoot(full)
        if lens_light is not None:
            missing = [k for k in ("R_sersic", "n_sersic") if k not in lens_light]
            if missing:
                raise UserError(f"lens_light: missing key {missing[0]!r} (SERSIC_ELLIPSE kwargs)")
            lens_light = {
                "e1": 0.0,
                "e2": 0.0,
                "center_x": full["center_x"],
                "center_y": full["center_y"],
                **lens_light,
            }
        img, _ = self._compose(beta_x, beta_y, source, lens_light, psf, float(noise_sigma), rng, full)
        return img
