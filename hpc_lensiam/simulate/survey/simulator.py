"""SurveySimulator: survey-realistic lenses and non-lenses (``simulate --family survey``).

One sample:
1. draw a deflector (sigma_v, z_l, z_s from the lensing-weighted population; Faber-Jackson light; axis
   ratio and misaligned composite mass), compute its numerical theta_E, ray-shoot the grid once;
2. per view (LenSiam pairs: two views of one mass; the source, the lens light within its scatter at
   fixed mass, the PSF and the noise differ): try up to ``source_tries`` sources, uniform within
   ``source_radius_theta_E`` x theta_E_SIS of the lens centre, until one passes the Collett-style cuts
   (selection.py); if a view finds none, the deflector is redrawn;
3. non-lenses (probability 1 - lens_fraction, decided first): the same selected deflector (so both
   classes share the deflector population exactly), without a background galaxy
   (``non_lens_source_absent_fraction``) or with a new one drawn like any unlensed source (physical
   magnitude, size-luminosity relation, never rescaled) outside the caustics and inside the field
   (``_non_lens_source``); a look-alike kind (``negatives``: elliptical, ring, spiral, merger, group;
   ``_lookalike``) recorded as ``negative_kind``; field interlopers are drawn for both classes alike;
4. image (e-/s) = PSF * (lens light + lensed source + interlopers) + noise (noise.py), stored divided by
   its maximum (float32), as the paper family's images are; the maximum is stored (``image_max_cps``).
   Light is binned with the paper family's adaptive supersampling (DetectorGrid.bin_adaptive; the
   lensed source's sub-pixel points are ray-shot once per pixel and sample, ``Rays``).

Sources are analytic Sersics or, with ``cosmos_dir``, COSMOS stamps scaled to the population's magnitude and
half-light radius (``_draw_source``; docs/survey.md "COSMOS sources").

``params.json``: ``is_lens``, ``lens`` (the 8 effective values, see mass.CompositeMass.effective),
``mass`` (the composite parameters and the population draw), ``views`` (per view: lens light, source,
measurements), ``interlopers``.
"""

from __future__ import annotations

import math

import numba
import numpy as np

from ...core.errors import UserError
from ...shards.manifest import LENS_PARAMS
from ..instrument import DetectorGrid, SubpixelRays
from ..psf import PSFBank, fwhm_arcsec
from ..simulator import PairSampler
from ..sources import CosmosCatalog, CosmosStamp, rebin_stamp
from .config import NEGATIVE_KINDS, SurveySimulationConfig
from .light import SersicLight
from .mass import CompositeMass
from .noise import Observation
from .population import M_SUN_R, Population
from .selection import (
    Rejections,
    arc_snr,
    edge_snr,
    failed_cuts,
    image_multiplicity,
    kept_cells,
    min_theta_E_arcsec,
)

# No sample accepted in the first this-many deflector draws of a simulator: stop at once, naming the cut
# that rejected them (defaults need 1-3 draws per sample; selection.max_tries (2000) x ~0.5 s per draw at
# the preset's grid would be ~20 minutes before the same error). Later samples keep max_tries.
FAIL_FAST_DRAWS = 100


def ring_sb(x, y, comp: dict, flux: float) -> np.ndarray:
    """Surface brightness of an elliptical Gaussian ring (radius, width, axis ratio q, angle phi) of total
    ``flux``; with ``arc_center_rad`` / ``arc_sigma_rad`` only a Gaussian-windowed segment of it (a tidal
    tail). Normalised exactly: in the circularised frame (x', y'/q) the profile separates into a radial
    Gaussian ring and an angular window, so the flux is q x the two integrals."""
    from scipy.special import erf

    c, s = math.cos(comp["phi"]), math.sin(comp["phi"])
    dx, dy = np.asarray(x) - comp["center_x"], np.asarray(y) - comp["center_y"]
    u, v = c * dx + s * dy, (-s * dx + c * dy) / comp["q"]
    r, ang = np.hypot(u, v), np.arctan2(v, u)
    R, w = comp["radius"], comp["width"]
    radial = w**2 * math.exp(-(R**2) / (2 * w**2)) + R * w * math.sqrt(math.pi / 2) * (1 + erf(R / (math.sqrt(2) * w)))
    sb = np.exp(-((r - R) ** 2) / (2 * w**2))
    angular = 2 * math.pi
    if comp.get("arc_sigma_rad"):
        sig = comp["arc_sigma_rad"]
        d = (ang - comp["arc_center_rad"] + math.pi) % (2 * math.pi) - math.pi
        sb = sb * np.exp(-(d**2) / (2 * sig**2))
        angular = sig * math.sqrt(2 * math.pi) * erf(math.pi / (math.sqrt(2) * sig))
    return flux / (comp["q"] * radial * angular) * sb


def spiral_sb(x, y, comp: dict, flux: float) -> np.ndarray:
    """Surface brightness of an exponential disk (scale length h, axis ratio q) of total ``flux`` with two
    logarithmic spiral arms: I = I0 exp(-r/h) (1 + A cos(2 (phi - ln(r/h) / tan(pitch)) - phase)). The arms
    average to zero on every circle of the circularised frame, so the flux is the disk's, 2 pi q h^2 I0."""
    c, s = math.cos(comp["phi"]), math.sin(comp["phi"])
    dx, dy = np.asarray(x) - comp["center_x"], np.asarray(y) - comp["center_y"]
    u, v = c * dx + s * dy, (-s * dx + c * dy) / comp["q"]
    r, ang = np.hypot(u, v), np.arctan2(v, u)
    h = comp["scale_length"]
    arms = np.cos(2 * (ang - np.log(np.maximum(r, 1e-6) / h) / math.tan(comp["pitch_rad"])) - comp["arm_phase"])
    return flux / (2 * math.pi * comp["q"] * h**2) * np.exp(-r / h) * (1 + comp["arm_amplitude"] * arms)


@numba.njit(cache=True, nogil=True, error_model="numpy")
def _outside_circle(x, y, cx, cy, radius, out):  # pragma: no cover - compiled
    """out = 1.0 where hypot(x - cx, y - cy) >= radius, else 0.0: numpy's answer, ~10x faster. The C library's
    hypot (~15 ns a point) decides only the points whose squared distance lies within 1e-9 of radius^2; anywhere
    else that square (relative error < 4e-16) already settles the comparison of the correctly rounded hypot."""
    r2 = radius * radius
    above, below = r2 * (1.0 + 1e-9), r2 * (1.0 - 1e-9)
    for i in range(x.shape[0]):
        dx, dy = x[i] - cx, y[i] - cy
        d2 = dx * dx + dy * dy
        if d2 > above:
            out[i] = 1.0
        elif d2 < below:
            out[i] = 0.0
        else:
            out[i] = 1.0 if math.hypot(dx, dy) >= radius else 0.0


class Rays:
    """Source-plane positions of the detector grid's evaluation points (``beta``) for one mass model, and of
    the adaptive sub-pixel points of any pixel (``subpixel(mask)``), found lazily and once per pixel (the source
    tries and views of a sample share the mass, and their refined pixels overlap: the arcs) from the grid's
    interpolated deflection, ray-shot exactly near the centre and the edge (instrument.SubpixelRays).
    ``lens_model=None``: unlensed (source plane = image plane)."""

    def __init__(
        self,
        grid: DetectorGrid,
        factor: int,
        lens_model=None,
        kwargs: list[dict] | None = None,
        core: tuple[float, float, float] | None = None,
        theta_E_scale: float = 0.0,
    ):
        self.grid, self.factor, self.lens_model, self.kwargs = grid, int(factor), lens_model, kwargs
        self.core = core  # (centre x, centre y, radius): no lensed light from image-plane points inside
        x, y = grid.x_arcsec, grid.y_arcsec
        self.beta = lens_model.ray_shooting(x, y, kwargs) if lens_model is not None else (x, y)
        self._shoot = None
        if lens_model is not None and factor > 0:  # sub-points: the grid's deflection interpolated (SubpixelRays)
            centre = (float(kwargs[1]["center_x"]), float(kwargs[1]["center_y"]))
            self._shoot = SubpixelRays(
                grid,
                *self.beta,
                lambda px, py: lens_model.ray_shooting(px, py, kwargs),
                centre,
                SubpixelRays.exact_radius(grid, theta_E_scale),
            )
        self.outside_core = self._outside(x, y)
        self._kept_cells = None
        # rays of the pixels done so far, one row each (a few hundred: the arcs), and each pixel's row (-1: none);
        # rows appended, not a (num_pix^2, factor^2) table whose 50 MB were page-faulted in per mass
        self._row = np.full(grid.num_pix**2, -1, np.int64)
        self._bx = self._by = np.empty((0, self.factor**2))

    def _outside(self, x, y):
        """1 where image-plane (x, y) lies outside the central-image core, else 0 (all 1 without a core)."""
        if self.core is None:
            return 1.0
        cx, cy, r = self.core
        x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
        out = np.empty(x.size)
        _outside_circle(x.ravel(), y.ravel(), float(cx), float(cy), float(r), out)
        return out.reshape(x.shape)

    def kept_cells(self) -> np.ndarray | None:
        """Grid cells outside the core, where images are counted (selection.kept_cells; once per mass), or None
        without a core."""
        if self.core is None:
            return None
        if self._kept_cells is None:
            self._kept_cells = kept_cells(self.outside_core, self.grid.num_pix * self.grid.supersampling_factor)
        return self._kept_cells

    def subpixel_outside_core(self, mask: np.ndarray):
        """``_outside`` at the sub-pixel points of the pixels in ``mask`` (``subpixel``'s order)."""
        return self._outside(*self.grid.subpixel_points(mask, self.factor)) if self.core is not None else 1.0

    def subpixel(self, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Source-plane (x, y) of the factor x factor points of each pixel in ``mask``, in grid.subpixel_points
        order."""
        if self.lens_model is None:
            return self.grid.subpixel_points(mask, self.factor)
        idx = np.flatnonzero(mask)
        todo = idx[self._row[idx] < 0]
        if todo.size:
            new = np.zeros(self._row.shape, bool)
            new[todo] = True
            x, y = self.grid.subpixel_points(new.reshape(mask.shape), self.factor)
            bx, by = self._shoot(x, y)
            self._row[todo] = len(self._bx) + np.arange(todo.size)
            self._bx = np.concatenate([self._bx, bx.reshape(todo.size, -1)])
            self._by = np.concatenate([self._by, by.reshape(todo.size, -1)])
        rows = self._row[idx]
        return self._bx[rows].ravel(), self._by[rows].ravel()


class SurveySimulator(PairSampler):
    """Same interface as the paper family's LensSimulator: ``sample_single``, ``sample_pair``."""

    # Revision of the generator's numbers, recorded in the plan/manifest ("numerics") and checked on a rerun, so
    # shards of another revision are never resumed into one set. 2: the fused composite deflection
    # (deflection.py) and Sersic light (light.py), whose theta_E and images differ from lenstronomy's in the last
    # digits. 3: the Sersic light's power and exponential and the stellar deflection's logarithm are numpy's
    # vectorised ones (light.py, deflection.py: within 2.2e-15 of a profile's peak, 1e-15" of the C library's).
    NUMERICS = 3

    def __init__(self, config: SurveySimulationConfig | None = None):
        from lenstronomy.LightModel.Profiles.sersic import Sersic

        self.config = cfg = config if config is not None else SurveySimulationConfig()
        if cfg.lens_fraction is None:
            raise ValueError("SurveySimulator: lens_fraction must be resolved (survey_config does it)")
        inst = cfg.instrument
        self.grid = DetectorGrid.from_config(inst)
        self.population = Population(cfg.population)
        self.mass = CompositeMass(cfg.mass, self.population.cosmo, h=cfg.population.H0_km_s_Mpc / 100.0)
        self.observation = Observation(cfg.preset, inst.pixel_scale_arcsec, cfg.observation)
        self.psf_bank = PSFBank.from_config(cfg)
        self.psf_fwhm = [fwhm_arcsec(k, inst.pixel_scale_arcsec) for k in self.psf_bank.kernels]
        self.min_theta_E_arcsec = min_theta_E_arcsec(cfg.selection, float(np.median(self.psf_fwhm)))
        self._light = SersicLight()  # lenstronomy's SersicElliptic, compiled (light.py)
        self._sersic = Sersic()
        if cfg.cosmos_dir:
            sp = cfg.source
            self.catalog: CosmosCatalog | None = CosmosCatalog(
                cfg.cosmos_dir,
                min_size_pix=sp.cosmos_min_size_pix,
                max_noise_frac=sp.cosmos_max_noise_frac,
                clean_k_sigma=sp.cosmos_clean_k_sigma,
            )
        else:
            self.catalog = None
        self._accepted = 0  # samples that passed the selection (none yet: FAIL_FAST_DRAWS applies)
        self._binned: dict[tuple[int, int], CosmosStamp] = {}  # (row, block) -> block-summed stamp
        self._unlensed: dict[tuple, np.ndarray] = {}  # this sample's unlensed light images (``_unlensed_cps``)
        self.n_side = inst.num_pix * inst.supersampling_factor
        self.cell_area = (inst.pixel_scale_arcsec / inst.supersampling_factor) ** 2
        self.field_arcsec = inst.num_pix * inst.pixel_scale_arcsec

    @property
    def num_pix(self) -> int:
        return self.grid.num_pix

    # ------------------------------------------------------------------------------ light on the grid
    def _bin(self, sb: np.ndarray, evaluate) -> np.ndarray:
        """Supersampled surface brightness -> e-/s per detector pixel, with the instrument's adaptive
        supersampling (the paper family's scheme and keys); ``evaluate(mask)``: the surface brightness at the
        sub-pixel points of the pixels in ``mask``."""
        inst = self.config.instrument
        return (
            self.grid.bin_adaptive(sb, evaluate, inst.adaptive_supersampling_factor, inst.adaptive_threshold)
            * self.grid.pixel_area_arcsec2
        )

    def _unlensed_cps(self, comp: dict, cps: float, render) -> np.ndarray:
        """``render(comp, cps)``, the detector image of unlensed light, computed once per sample for each
        (component, count rate): a sample renders the same light again and again (the interlopers in every view
        and in a non-lens's or companion-carrying lens's second scene, the deflector's light at bulge fraction 1
        there). The key holds every number the image depends on, so a hit is the same bytes; ``_sample`` clears
        the store (a few images)."""
        read = self._SERSIC_KEYS if render == self._render_sersic else sorted(comp)  # not a view's bulge_fraction
        key = (render.__name__, float(cps), *((k, comp[k]) for k in read))
        image = self._unlensed.get(key)
        if image is None:
            image = self._unlensed[key] = render(comp, cps)
            image.flags.writeable = False  # shared: callers add, never write in place
        return image

    _SERSIC_KEYS = ("R_sersic", "n_sersic", "e1", "e2", "center_x", "center_y")  # what _render_sersic reads

    def _sersic_cps(self, prof: dict, cps: float) -> np.ndarray:
        """Detector image (e-/s per pixel) of an unlensed elliptical Sersic of total count rate ``cps``."""
        return self._unlensed_cps(prof, cps, self._render_sersic)

    def _render_sersic(self, prof: dict, cps: float) -> np.ndarray:
        """``_sersic_cps`` without the store."""
        unit = self._sersic.total_flux(amp=1.0, R_sersic=prof["R_sersic"], n_sersic=prof["n_sersic"])
        kw = {"amp": cps / unit, **{k: prof[k] for k in self._SERSIC_KEYS}}
        factor = self.config.instrument.adaptive_supersampling_factor
        return self._bin(
            self._light.function(self.grid.x_arcsec, self.grid.y_arcsec, **kw),
            lambda mask: self._light.function(*self.grid.subpixel_points(mask, factor), **kw),
        )

    def _source_sb(self, x, y, src: dict) -> np.ndarray:
        """Surface brightness (e-/s/arcsec^2) of a source at source-plane (x, y), scaled to its magnitude."""
        cps = self.observation.magnitude_to_cps(src["mag"])
        if src["kind"] == "cosmos":  # unit-sum stamp: amp = 1 / pixel^2 is unit total flux (sources.py)
            stamp = self._stamp(src["row"], src["stamp_block"])
            pixel = src["scale"] * src["stamp_block"]
            return stamp.surface_brightness(
                x,
                y,
                amp=cps / pixel**2,
                center_x=src["center_x"],
                center_y=src["center_y"],
                phi_G=src["phi_G"],
                scale=pixel,
            )
        unit = self._sersic.total_flux(amp=1.0, R_sersic=src["R_sersic"], n_sersic=src["n_sersic"])
        return self._light.function(
            x,
            y,
            amp=cps / unit,
            R_sersic=src["R_sersic"],
            n_sersic=src["n_sersic"],
            e1=src["e1"],
            e2=src["e2"],
            center_x=src["center_x"],
            center_y=src["center_y"],
        )

    def stamp_block(self, scale_arcsec: float) -> int:
        """Stamp pixels summed per side so a stamp at ``scale_arcsec`` per pixel is no finer than
        ``source.cosmos_min_stamp_pixel`` detector pixels. Scaled to survey sizes (r_half ~ 0.1-0.3"), COSMOS
        stamps get ~0.005" pixels; point-sampled at the grid's sub-pixel spacing, such fine structure aliases
        (unlensed flux off by 4-10%, docs/survey.md) while block-summed stamps keep their flux to < 1%; what
        is averaged away lies below the PSF's resolution once lensed."""
        finest = self.config.source.cosmos_min_stamp_pixel * self.grid.pixel_scale_arcsec
        return max(1, math.ceil(finest / scale_arcsec - 1e-9))

    def _stamp(self, row: int, block: int) -> CosmosStamp:
        """COSMOS stamp ``row`` block-summed by ``block`` (cached: a few blocks per galaxy)."""
        stamp = self._binned.get((row, block))
        if stamp is None:
            raw = self.catalog.stamp(row)
            stamp = self._binned[(row, block)] = CosmosStamp(
                rebin_stamp(raw.image, block), raw.pixel_scale_arcsec * block
            )
        return stamp

    def _source_cps(self, rays: Rays, src: dict | None) -> np.ndarray:
        """Lensed (or, with unlensed ``rays``, plain) detector image of a source, e-/s per pixel."""
        if src is None:
            return np.zeros(self.grid.shape)
        return self._bin(
            self._source_sb(*rays.beta, src) * rays.outside_core,
            lambda mask: self._source_sb(*rays.subpixel(mask), src) * rays.subpixel_outside_core(mask),
        )

    def unlensed_rays(self) -> Rays:
        """Rays of an empty sky (source plane = image plane): a source's own image, for checks."""
        return Rays(self.grid, self.config.instrument.adaptive_supersampling_factor)

    def rays(self, mass: dict, theta_E: float | None = None) -> Rays:
        """Rays of a composite mass (a ``params["mass"]`` dict); with ``theta_E``, no lensed light from inside
        the central-image core (``central_image_core_radius``)."""
        core = None
        if theta_E is not None:
            core = (mass["center_x"], mass["center_y"], self.central_image_core_radius(theta_E))
        return Rays(
            self.grid,
            self.config.instrument.adaptive_supersampling_factor,
            self.mass.deflection,
            self.mass.kwargs(mass),
            core,
            theta_E if theta_E is not None else mass.get("theta_E_sis", 0.0),
        )

    def central_image_core_radius(self, theta_E: float) -> float:
        """Radius (arcsec) inside which lensed light is dropped and images are not counted: the central image.

        The composite's stellar Sersic has a finite central surface density (every Sersic does), so with the
        NFW's weak cusp its central (odd, positive-parity) image reached |mu| 0.05-0.57 (issue 28 (6)), where
        real lenses' central images are below ~0.01 or absent (Keeton 2003, ApJ 582, 17; Winn, Rusin &
        Kochanek 2004, Nature 427, 613: |mu| ~ 0.004 in PMN J1632-0033), demagnified by stellar cusps
        and the central black hole (Mao, Witt & Keeton 2001), which the mass model includes (mass.py) but
        whose Einstein radius (~0.01-0.05") is below the grid's sampling. The central image of the composite
        lies within 0.1 theta_E of the centre while the saddle image of a double stays beyond ~0.15 theta_E
        (measured on 40 euclid lenses); ``mass.central_image_radius_theta_E`` (0.12) x theta_E separates them."""
        return self.config.mass.central_image_radius_theta_E * theta_E

    # ------------------------------------------------------------------------------ the deflector
    def _draw_deflector(self, rng: np.random.Generator) -> dict:
        """A deflector, or ``{"rejected": key}`` when it fails a deflector-level cut (the magnitude limit
        ``selection.max_deflector_mag``, checked before the costly mass; the resolvability cut on theta_E)."""
        pop = self.population
        cuts = self.config.selection
        defl = pop.draw_redshifts_sigma(rng)
        light = pop.draw_lens_light(rng, defl)
        if cuts.max_deflector_mag is not None and light["mag"] > cuts.max_deflector_mag:
            return {"rejected": "max_deflector_mag", "value": light["mag"]}
        q = pop.draw_q_light(rng)
        phi = float(rng.uniform(0.0, math.pi))
        cx, cy = pop.draw_center(rng)
        kpc = pop.cosmo.kpc_per_arcsec(defl["z_lens"])
        mass = self.mass.draw(rng, defl, light, q, phi, (cx, cy), kpc)
        lens = self.mass.effective(mass, guess=defl["theta_E_sis"])
        if 0 < lens["theta_E"] < self.min_theta_E_arcsec:
            return {"rejected": "min_theta_E", "value": lens["theta_E"]}
        sigma_crit = pop.cosmo.sigma_crit_msun_arcsec2(defl["z_lens"], defl["z_source"])
        s = mass["stellar"]
        m_star = self._sersic.total_flux(amp=s["k_eff"], R_sersic=s["R_sersic"], n_sersic=s["n_sersic"]) * sigma_crit
        lum = 10 ** (-0.4 * (light["abs_mag"] - M_SUN_R))
        mass.update({k: float(defl[k]) for k in ("sigma_v_km_s", "z_lens", "z_source", "theta_E_sis")})
        mass.update(
            stellar_mass_msun=float(m_star),
            stellar_mass_to_light_r=float(m_star / lum),
            sigma_crit_msun_arcsec2=float(sigma_crit),
        )
        return {
            "defl": defl,
            "light": light,
            "q_light": q,
            "phi_light": phi,
            "center": (cx, cy),
            "mass": mass,
            "lens": lens,
        }

    def _view_light(self, rng: np.random.Generator, d: dict, first: bool) -> dict:
        """Lens light of a view: the deflector's own draw for the first, redrawn within the scatter after."""
        light = d["light"] if first else self.population.draw_lens_light(rng, d["defl"])
        e1, e2 = (lambda q, p: ((1 - q) / (1 + q) * math.cos(2 * p), (1 - q) / (1 + q) * math.sin(2 * p)))(
            d["q_light"], d["phi_light"]
        )
        return {
            "mag": float(light["mag"]),
            "abs_mag": float(light["abs_mag"]),
            "R_sersic": float(light["R_sersic"]),
            "n_sersic": float(light["n_sersic"]),
            "e1": e1,
            "e2": e2,
            "center_x": d["center"][0],
            "center_y": d["center"][1],
        }

    # ------------------------------------------------------------------------------ one view
    def _count_images(self, rays: Rays, src) -> tuple[int, list[float]]:
        """(image count, their |mu|) of the source centre: the cheap cut, checked before the source is rendered."""
        return image_multiplicity(
            rays.beta[0],
            rays.beta[1],
            self.n_side,
            self.cell_area,
            src["center_x"],
            src["center_y"],
            self.config.selection.min_image_mag,
            keep_cells=rays.kept_cells(),
        )

    def _lensed_arc(self, rays: Rays, src) -> tuple[np.ndarray, float]:
        """(unconvolved detector image of the lensed source, e-/s per pixel; its total magnification). The
        magnification needs no PSF, noise or S/N: most rendered tries fail it (``_try_lensed_source``)."""
        arc = self._source_cps(rays, src)
        return arc, float(arc.sum() / self.observation.magnitude_to_cps(src["mag"]))

    def _measure(
        self,
        rays: Rays,
        src,
        view: dict,
        images: tuple[int, list[float]] | None = None,
        arc: tuple[np.ndarray, float] | None = None,
    ) -> dict:
        """Magnification, image count, arc S/N and flux fraction of a source in a prepared view (``images``:
        ``_count_images``' answer, ``arc``: ``_lensed_arc``'s, when already known)."""
        arc, magnification = arc if arc is not None else self._lensed_arc(rays, src)
        arc_conv = self.psf_bank.convolve(arc, view["psf_id"])
        total = view["scene_conv"] + arc_conv
        sigma = self.observation.sigma(view["band"], total)
        n_img, mags = images if images is not None else self._count_images(rays, src)
        return {
            "magnification": magnification,
            "n_images": n_img,
            "image_magnifications": [float(m) for m in mags],
            "arc_snr": arc_snr(arc_conv, sigma),
            "edge_snr": edge_snr(arc_conv, view["band"].background_noise, self.config.selection.edge_frame_pix),
            "arc_flux_fraction": float(arc_conv.sum() / total.sum()),
            "_arc_conv": arc_conv,
        }

    def _draw_source(self, rng, z_source: float) -> dict:
        """A source with the population's magnitude and half-light radius for ``z_source``: an analytic Sersic,
        or (with a COSMOS catalog, ``source.cosmos_fraction`` of the time) a random accepted COSMOS galaxy
        whose stamp is scaled so its half-light radius is the drawn ``R_sersic`` (radius of the area of its
        brightest pixels that hold half the flux, which is R_sersic for a Sersic: sources.half_light_radius_pix)
        and its flux is the drawn magnitude's; rotated at random, placed with lenstronomy's INTERPOL."""
        src = self.population.draw_source(rng, z_source)
        if self.catalog is None or not rng.random() < self.config.source.cosmos_fraction:
            return src
        row = self.catalog.draw_row(rng)
        stamp = self.catalog.stamp(row)
        scale = src["R_sersic"] / stamp.half_light_radius_pix  # source-plane arcsec per stamp pixel
        return {
            "kind": "cosmos",
            "id": int(self.catalog.ident[row]),
            "row": row,
            "abs_mag": src["abs_mag"],
            "mag": src["mag"],
            "R_sersic": src["R_sersic"],
            "scale": scale,
            "stamp_block": self.stamp_block(scale),
            "stamp_R_half_arcsec": stamp.half_light_radius_pix * stamp.pixel_scale_arcsec,
            "phi_G": float(rng.uniform(0.0, 2 * math.pi)),
        }

    @staticmethod
    def _place(rng, src: dict, d: dict, r_max: float, r_min: float = 0.0) -> dict:
        """``src`` centred uniformly in the annulus r_min..r_max (arcsec) around the lens centre."""
        r = math.sqrt(rng.uniform(r_min**2, r_max**2))
        phi = float(rng.uniform(0.0, 2 * math.pi))
        return {**src, "center_x": d["center"][0] + r * math.cos(phi), "center_y": d["center"][1] + r * math.sin(phi)}

    def _try_lensed_source(self, rng, d: dict, rays: Rays, view: dict, tally: Rejections | None = None):
        """First source of ``source_tries`` that passes the cuts, with its measurements, or None. ``tally``:
        records why each source failed."""
        cuts = self.config.selection
        r_max = self.config.population.source_radius_theta_E * d["defl"]["theta_E_sis"]
        theta_E = d["lens"]["theta_E"]
        fwhm = self.psf_fwhm[view["psf_id"]]
        for _ in range(cuts.source_tries):
            src = self._place(rng, self._draw_source(rng, d["defl"]["z_source"]), d, r_max)
            size = math.sqrt(src["R_sersic"] ** 2 + (fwhm / 2) ** 2)
            resolved = theta_E**2 > cuts.resolution_factor**2 * size**2
            if not resolved:
                if tally is not None:
                    tally.source({"resolution_factor": theta_E / size}, ["resolution_factor"])
                continue
            images = self._count_images(rays, src)
            if images[0] < cuts.min_images:  # half the tries: rejected before the costly render (same samples)
                if tally is not None:
                    tally.source({"resolution_factor": theta_E / size, "min_images": images[0]}, ["min_images"])
                continue
            arc = self._lensed_arc(rays, src)
            if arc[1] < cuts.min_magnification:  # 87% of failed renders: no PSF, S/N (same samples)
                if tally is not None:
                    tally.source(
                        {"resolution_factor": theta_E / size, "min_images": images[0], "min_magnification": arc[1]},
                        ["min_magnification"],
                    )
                continue
            m = self._measure(rays, src, view, images, arc)
            failed = failed_cuts(
                cuts,
                n_images=m["n_images"],
                magnification=m["magnification"],
                snr=m["arc_snr"],
                theta_E=theta_E,
                source_R_arcsec=src["R_sersic"],
                psf_fwhm_arcsec=fwhm,
                edge_snr=m["edge_snr"],
            )
            if tally is not None:
                values = {
                    "resolution_factor": theta_E / size,
                    "min_images": m["n_images"],
                    "min_magnification": m["magnification"],
                    "min_arc_snr": m["arc_snr"],
                    "edge_frame_pix": m["edge_snr"],
                }
                tally.source(values, failed)
            if not failed:
                return src, m
        return None

    def _non_lens_source(self, rng, d: dict, rays: Rays, view: dict):
        """A non-lens's background galaxy, or (None, None) (``non_lens_source_absent_fraction``).

        Drawn like any unlensed source (issue 28 (1)): a new galaxy at the deflector's source redshift, with the
        population's magnitude and size-luminosity relation, never rescaled (the arcs' flux used to be given to
        it: magnitudes reached -139 when its image fell off the field and only a wing was left). It is placed
        outside the caustics (one image, magnified less than the lens cut) where its image stays in the field:
        the source within ``r_max`` = field half-width - theta_E - 3 R_e - FWHM of the lens centre (its image
        lies ~theta_E further out), and its PSF-convolved light in the outer ``selection.edge_frame_pix``
        pixels below the background noise sigma, as lenses' arcs (selection.py). Where no such place is found
        in ``source_tries``, the non-lens has no galaxy.
        """
        cfg = self.config
        if rng.random() < cfg.non_lens_source_absent_fraction:
            return None, None
        src = self._draw_source(rng, d["defl"]["z_source"])
        theta = d["lens"]["theta_E"]
        fwhm = self.psf_fwhm[view["psf_id"]]
        r_min = max(theta, d["defl"]["theta_E_sis"])
        r_max = min(4.0 * r_min, self.field_arcsec / 2 - theta - 3.0 * src["R_sersic"] - fwhm)
        if r_max <= r_min:
            return None, None
        for _ in range(cfg.selection.source_tries):
            moved = self._place(rng, src, d, r_max=r_max, r_min=r_min)
            images = self._count_images(rays, moved)
            if images[0] > 1:  # a lensed galaxy: no render needed to reject it
                continue
            arc = self._lensed_arc(rays, moved)
            if not 0 < arc[1] < cfg.selection.min_magnification:  # magnified like a lens: no PSF needed to reject it
                continue
            m = self._measure(rays, moved, view, images, arc)
            if cfg.selection.edge_frame_pix and m["edge_snr"] > 1.0:
                continue
            return moved, m
        return None, None

    # ------------------------------------------------------------------------------ look-alike negatives
    def _lookalike(self, rng, d: dict, kind: str) -> tuple[float, list[dict]]:
        """(bulge fraction of the deflector's light, extra light components) of a non-lens of ``kind``
        (config.NegativeMix). The central galaxy keeps the deflector's total magnitude (its bulge Sersic
        carries ``bulge_fraction`` of it, a ring or a spiral disk the rest), so deflector magnitudes are
        distributed as the lenses'; companions and tidal tails are added light."""
        mix = self.config.negatives
        light = d["light"]
        mag = float(light["mag"])
        cx, cy = d["center"]
        q, phi = d["q_light"], d["phi_light"]
        theta = d["lens"]["theta_E"]
        if kind == "ring":
            f = float(rng.uniform(*mix.ring_flux_fraction))
            radius = theta * float(rng.uniform(*mix.ring_radius_theta_E))
            width = radius * float(rng.uniform(0.08, 0.2))
            ring = {"kind": "ring", "mag": mag - 2.5 * math.log10(f), "radius": radius, "width": width}
            return 1.0 - f, [{**ring, "q": q, "phi": phi, "center_x": cx, "center_y": cy}]
        if kind == "spiral":
            bulge = float(rng.uniform(*mix.spiral_bulge_fraction))
            disk = {
                "kind": "spiral",
                "mag": mag - 2.5 * math.log10(1.0 - bulge),
                "scale_length": light["R_sersic"] * float(rng.uniform(1.0, 2.0)) / 1.678,  # R_e = 1.678 h
                "arm_amplitude": float(rng.uniform(*mix.spiral_arm_amplitude)),
                "pitch_rad": math.radians(float(rng.uniform(10.0, 30.0))),
                "arm_phase": float(rng.uniform(0.0, 2 * math.pi)),
            }
            return bulge, [{**disk, "q": q, "phi": phi, "center_x": cx, "center_y": cy}]
        if kind == "merger":
            comp = self._companion(rng, d, n_range=(1.0, 4.0))
            sep = math.hypot(comp["center_x"] - cx, comp["center_y"] - cy)
            angle = math.atan2(comp["center_y"] - cy, comp["center_x"] - cx)
            pair_flux = 10 ** (-0.4 * mag) + 10 ** (-0.4 * comp["mag"])
            tail = {
                "kind": "ring",
                "mag": -2.5 * math.log10(float(rng.uniform(*mix.tail_flux_fraction)) * pair_flux),
                "radius": sep * float(rng.uniform(0.8, 1.5)),
                "width": float(rng.uniform(0.05, 0.15)),
                "q": 1.0,
                "phi": 0.0,
                "arc_center_rad": angle + float(rng.uniform(-math.pi / 2, math.pi / 2)),
                "arc_sigma_rad": float(rng.uniform(0.3, 0.8)),
                "center_x": cx,
                "center_y": cy,
            }
            return 1.0, [comp, tail]
        if kind == "group":
            return 1.0, [self._companion(rng, d, n_range=(3.0, 5.0)) for _ in range(int(rng.integers(1, 4)))]
        return 1.0, []

    def _companion(self, rng, d: dict, n_range: tuple[float, float]) -> dict:
        """A galaxy near the deflector: fainter by ``companion_dmag``, size from the early-type R ~ L^0.65."""
        mix = self.config.negatives
        dmag = float(rng.uniform(*mix.companion_dmag))
        r = float(rng.uniform(*mix.companion_distance_arcsec))
        ang = float(rng.uniform(0.0, 2 * math.pi))
        q = float(rng.uniform(0.5, 1.0))
        e = (1 - q) / (1 + q)
        pa = float(rng.uniform(0.0, math.pi))
        return {
            "kind": "sersic",
            "mag": float(d["light"]["mag"]) + dmag,
            "R_sersic": float(d["light"]["R_sersic"]) * 10 ** (-0.4 * 0.65 * dmag),
            "n_sersic": float(rng.uniform(*n_range)),
            "e1": e * math.cos(2 * pa),
            "e2": e * math.sin(2 * pa),
            "center_x": d["center"][0] + r * math.cos(ang),
            "center_y": d["center"][1] + r * math.sin(ang),
        }

    def _component_cps(self, comp: dict) -> np.ndarray:
        """Detector image (e-/s per pixel) of a look-alike light component (its ``mag`` is its total flux)."""
        cps = self.observation.magnitude_to_cps(comp["mag"])
        if comp["kind"] == "sersic":
            return self._sersic_cps(comp, cps)
        return self._unlensed_cps(comp, cps, self._render_lookalike)

    def _render_lookalike(self, comp: dict, cps: float) -> np.ndarray:
        """Detector image of a ring or spiral component of count rate ``cps`` (``_component_cps``, no store)."""
        sb = ring_sb if comp["kind"] == "ring" else spiral_sb
        factor = self.config.instrument.adaptive_supersampling_factor
        return self._bin(
            sb(self.grid.x_arcsec, self.grid.y_arcsec, comp, cps),
            lambda mask: sb(*self.grid.subpixel_points(mask, factor), comp, cps),
        )

    def _scene_conv(
        self, lens_light: dict, interlopers: list[dict], psf_id: int, lookalike: list[dict] | None = None
    ) -> np.ndarray:
        """PSF-convolved unlensed light of a view (e-/s per pixel): the deflector (its bulge, ``bulge_fraction``
        of its light), look-alike components (non-lenses) and the field interlopers."""
        cps = self.observation.magnitude_to_cps(lens_light["mag"]) * lens_light.get("bulge_fraction", 1.0)
        scene = self._sersic_cps(lens_light, cps)
        for comp in lookalike or ():
            scene = scene + self._component_cps(comp)
        for g in interlopers:
            scene = scene + self._sersic_cps(g, self.observation.magnitude_to_cps(g["mag"]))
        return self.psf_bank.convolve(scene, psf_id)

    def _prepare_view(self, rng, d: dict, first: bool, interlopers: list[dict]) -> dict:
        ll = self._view_light(rng, d, first)
        psf_id = int(rng.integers(len(self.psf_bank)))
        sky = self.observation.draw_conditions(rng)
        return {
            "lens_light": ll,
            "psf_id": psf_id,
            "sky_offset_mag": sky,
            "band": self.observation.band(sky),
            "scene_conv": self._scene_conv(ll, interlopers, psf_id),
        }

    def render_model(self, params: dict, view: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """(noiseless image, its noise sigma), e-/s per pixel, of view ``view`` of a recorded sample
        (``params`` as in params.json), with this simulator's grid and numerics: a data set's samples
        re-rendered at other settings (supersampling convergence, tests/simulate/test_survey.py)."""
        v = params["views"][view]
        self._unlensed.clear()
        model = self._scene_conv(v["lens_light"], params["interlopers"], v["psf_id"], v.get("lookalike"))
        rays = self.rays(params["mass"], params["lens"]["theta_E"] if "black_hole" in params["mass"] else None)
        model = model + self.psf_bank.convolve(self._source_cps(rays, v["source"]), v["psf_id"])
        return model, Observation.sigma(self.observation.band(v["sky_offset_mag"]), model)

    # ------------------------------------------------------------------------------ samples
    def _sample(self, rng: np.random.Generator, n_views: int) -> tuple[list[np.ndarray], dict]:
        cfg = self.config
        is_lens = bool(rng.random() < cfg.lens_fraction)
        tally = Rejections()
        self._unlensed.clear()
        for attempt in range(1, cfg.selection.max_tries + 1):
            if not self._accepted and attempt > FAIL_FAST_DRAWS:
                raise UserError(
                    f"survey simulation: no sample passed the selection in the first {tally.summary(cfg.selection)}"
                )
            tally.draws = attempt
            d = self._draw_deflector(rng)
            if "rejected" in d:
                tally.deflector(d["rejected"], d["value"])
                continue
            if d["lens"]["theta_E"] <= 0:
                tally.subcritical += 1
                continue
            rays = self.rays(d["mass"], d["lens"]["theta_E"])
            interlopers = self.population.draw_interlopers(rng, self.field_arcsec)
            views = []
            for v in range(n_views):
                view = self._prepare_view(rng, d, v == 0, interlopers)
                found = self._try_lensed_source(rng, d, rays, view, tally)
                if found is None:
                    break
                view["source"], view["measure"] = found
                views.append(view)
            if len(views) == n_views:
                break
        else:
            raise UserError(
                f"survey simulation: no deflector passed the selection in selection.max_tries = "
                f"{tally.summary(cfg.selection)}"
            )
        self._accepted += 1
        kind, companions, lens_bulge = None, [], 1.0
        if not is_lens:
            kind = NEGATIVE_KINDS[int(rng.choice(len(NEGATIVE_KINDS), p=cfg.negatives.fractions()))]
        else:  # a lens's environment and light type, shared by its views (config.NegativeMix)
            if rng.random() < cfg.negatives.lens_spiral_fraction:
                lens_bulge, companions = self._lookalike(rng, d, "spiral")
            if rng.random() < cfg.negatives.lens_companion_fraction:
                companions = companions + [
                    self._companion(rng, d, n_range=(3.0, 5.0)) for _ in range(int(rng.integers(1, 4)))
                ]
        images, out_views = [], []
        for view in views:
            src, m = view["source"], view["measure"]
            lookalike: list[dict] = companions
            if companions:
                view["lens_light"] = {**view["lens_light"], "bulge_fraction": lens_bulge}
                view["scene_conv"] = self._scene_conv(view["lens_light"], interlopers, view["psf_id"], companions)
                arc_conv = view["measure"]["_arc_conv"]
                view["measure"]["arc_flux_fraction"] = float(arc_conv.sum() / (view["scene_conv"] + arc_conv).sum())
            if not is_lens:
                src, m = self._non_lens_source(rng, d, rays, view)
                bulge, lookalike = self._lookalike(rng, d, kind)
                view["lens_light"] = {**view["lens_light"], "bulge_fraction": bulge}
                view["scene_conv"] = self._scene_conv(view["lens_light"], interlopers, view["psf_id"], lookalike)
            arc_conv = m.pop("_arc_conv") if m is not None else np.zeros(self.grid.shape)
            model = view["scene_conv"] + arc_conv
            noisy = Observation.add_noise(rng, model, Observation.sigma(view["band"], model))
            top = float(noisy.max())
            images.append((noisy / top).astype(np.float32))
            rec = {
                "lens_light": view["lens_light"],
                "source": src,
                "psf_id": view["psf_id"],
                "psf_name": self.psf_bank.names[view["psf_id"]],
                "sky_offset_mag": view["sky_offset_mag"],
                "image_max_cps": top,
                "background_sigma_cps": float(view["band"].background_noise),
                "lens_light_max_cps": float(view["scene_conv"].max()),
                "lookalike": lookalike,
            }
            if m is None:
                m = {
                    "magnification": 0.0,
                    "n_images": 0,
                    "image_magnifications": [],
                    "arc_snr": 0.0,
                    "arc_flux_fraction": 0.0,
                }
            rec.update(m)
            out_views.append(rec)
        params = {
            "family": "survey",
            "is_lens": int(is_lens),
            "negative_kind": kind,
            "lens": {k: float(d["lens"][k]) for k in LENS_PARAMS},
            "mass": d["mass"],
            "views": out_views,
            "interlopers": interlopers,
            "deflector_draws": attempt,
        }
        return images, params
