"""SurveySimulator: survey-realistic lenses and non-lenses (``simulate --family survey``).

One sample:
1. draw a deflector (sigma_v, z_l, z_s from the lensing-weighted population; Faber-Jackson light; axis
   ratio and misaligned composite mass), compute its numerical theta_E, ray-shoot the grid once;
2. per view (LenSiam pairs: two views of one mass; the source, the lens light within its scatter at
   fixed mass, the PSF and the noise differ): try up to ``source_tries`` sources, uniform within
   ``source_radius_theta_E`` x theta_E_SIS of the lens centre, until one passes the Collett-style cuts
   (selection.py); if a view finds none, the deflector is redrawn;
3. non-lenses (probability 1 - lens_fraction, decided first): the same selected deflector (so both
   classes share the deflector population exactly), with the source removed
   (``non_lens_source_absent_fraction``) or moved outside the caustics (singly imaged, not magnified
   past the cut); field interlopers are drawn for both classes alike;
4. image (e-/s) = PSF * (lens light + lensed source + interlopers) + noise (noise.py), stored divided by
   its maximum (float32), as the paper family's images are; the maximum is stored (``image_max_cps``).

``params.json``: ``is_lens``, ``lens`` (the 8 effective values, see mass.CompositeMass.effective),
``mass`` (the composite parameters and the population draw), ``views`` (per view: lens light, source,
measurements), ``interlopers``.
"""
from __future__ import annotations

import math

import numpy as np

from ...errors import UserError
from ...io import LENS_PARAMS
from ..instrument import DetectorGrid
from ..psf import PSFBank, fwhm_arcsec
from ..simulator import PairSampler
from .config import SurveySimulationConfig
from .mass import CompositeMass
from .noise import Observation
from .population import M_SUN_R, Population
from .selection import arc_snr, image_multiplicity, passes


class SurveySimulator(PairSampler):
    """Same interface as the paper family's LensSimulator: ``sample_single``, ``sample_pair``."""

    def __init__(self, config: SurveySimulationConfig | None = None):
        from lenstronomy.LightModel.Profiles.sersic import Sersic, SersicElliptic

        self.config = cfg = config if config is not None else SurveySimulationConfig()
        if cfg.lens_fraction is None:
            raise ValueError("SurveySimulator: lens_fraction must be resolved (survey_config does it)")
        inst = cfg.instrument
        self.grid = DetectorGrid.from_config(inst)
        self.population = Population(cfg.population)
        self.mass = CompositeMass(cfg.mass)
        self.observation = Observation(cfg.preset, inst.pixel_scale_arcsec, cfg.observation)
        self.psf_bank = PSFBank.from_config(cfg)
        self.psf_fwhm = [fwhm_arcsec(k, inst.pixel_scale_arcsec) for k in self.psf_bank.kernels]
        self._light = SersicElliptic()
        self._sersic = Sersic()
        self.n_side = inst.num_pix * inst.supersampling_factor
        self.cell_area = (inst.pixel_scale_arcsec / inst.supersampling_factor) ** 2
        self.field_arcsec = inst.num_pix * inst.pixel_scale_arcsec

    @property
    def num_pix(self) -> int:
        return self.grid.num_pix

    # ------------------------------------------------------------------------------ light on the grid
    def _sersic_cps(self, x, y, prof: dict, cps: float) -> np.ndarray:
        """Binned detector image (e-/s per pixel) of an elliptical Sersic of total count rate ``cps``."""
        unit = self._sersic.total_flux(amp=1.0, R_sersic=prof["R_sersic"], n_sersic=prof["n_sersic"])
        sb = self._light.function(x, y, amp=cps / unit, R_sersic=prof["R_sersic"], n_sersic=prof["n_sersic"],
                                  e1=prof["e1"], e2=prof["e2"], center_x=prof["center_x"],
                                  center_y=prof["center_y"])
        return self.grid.bin(sb) * self.grid.pixel_area_arcsec2

    def _source_cps(self, beta, src: dict | None) -> np.ndarray:
        if src is None:
            return np.zeros(self.grid.shape)
        return self._sersic_cps(beta[0], beta[1], src, self.observation.magnitude_to_cps(src["mag"]))

    # ------------------------------------------------------------------------------ the deflector
    def _draw_deflector(self, rng: np.random.Generator) -> dict:
        pop = self.population
        defl = pop.draw_redshifts_sigma(rng)
        light = pop.draw_lens_light(rng, defl)
        q = pop.draw_q_light(rng)
        phi = float(rng.uniform(0.0, math.pi))
        cx, cy = pop.draw_center(rng)
        kpc = pop.cosmo.kpc_per_arcsec(defl["z_lens"])
        mass = self.mass.draw(rng, defl, light, q, phi, (cx, cy), kpc)
        lens = self.mass.effective(mass, guess=defl["theta_E_sis"])
        sigma_crit = pop.cosmo.sigma_crit_msun_arcsec2(defl["z_lens"], defl["z_source"])
        s = mass["stellar"]
        m_star = self._sersic.total_flux(amp=s["k_eff"], R_sersic=s["R_sersic"], n_sersic=s["n_sersic"]) * sigma_crit
        lum = 10 ** (-0.4 * (light["abs_mag"] - M_SUN_R))
        mass.update({k: float(defl[k]) for k in ("sigma_v_km_s", "z_lens", "z_source", "theta_E_sis")})
        mass.update(stellar_mass_msun=float(m_star), stellar_mass_to_light_r=float(m_star / lum),
                    sigma_crit_msun_arcsec2=float(sigma_crit))
        return {"defl": defl, "light": light, "q_light": q, "phi_light": phi, "center": (cx, cy),
                "mass": mass, "lens": lens}

    def _view_light(self, rng: np.random.Generator, d: dict, first: bool) -> dict:
        """Lens light of a view: the deflector's own draw for the first, redrawn within the scatter after."""
        light = d["light"] if first else self.population.draw_lens_light(rng, d["defl"])
        e1, e2 = (lambda q, p: ((1 - q) / (1 + q) * math.cos(2 * p), (1 - q) / (1 + q) * math.sin(2 * p)))(
            d["q_light"], d["phi_light"])
        return {"mag": float(light["mag"]), "abs_mag": float(light["abs_mag"]), "R_sersic": float(light["R_sersic"]),
                "n_sersic": float(light["n_sersic"]), "e1": e1, "e2": e2,
                "center_x": d["center"][0], "center_y": d["center"][1]}

    # ------------------------------------------------------------------------------ one view
    def _measure(self, beta, src, view: dict) -> dict:
        """Magnification, image count, arc S/N and flux fraction of a source in a prepared view."""
        arc = self._source_cps(beta, src)
        arc_conv = self.psf_bank.convolve(arc, view["psf_id"])
        total = view["scene_conv"] + arc_conv
        sigma = self.observation.sigma(view["band"], total)
        cps = self.observation.magnitude_to_cps(src["mag"])
        n_img, mags = image_multiplicity(beta[0], beta[1], self.n_side, self.cell_area, src["center_x"],
                                         src["center_y"], self.config.selection.min_image_mag)
        return {"magnification": float(arc.sum() / cps), "n_images": n_img,
                "image_magnifications": [float(m) for m in mags],
                "arc_snr": arc_snr(arc_conv, sigma), "arc_flux_fraction": float(arc_conv.sum() / total.sum()),
                "_arc_conv": arc_conv}

    def _draw_source_at(self, rng, d: dict, r_max: float, r_min: float = 0.0) -> dict:
        src = self.population.draw_source(rng, d["defl"]["z_source"])
        r = math.sqrt(rng.uniform(r_min ** 2, r_max ** 2))
        phi = float(rng.uniform(0.0, 2 * math.pi))
        src["center_x"] = d["center"][0] + r * math.cos(phi)
        src["center_y"] = d["center"][1] + r * math.sin(phi)
        return src

    def _try_lensed_source(self, rng, d: dict, beta, view: dict):
        """First source of ``source_tries`` that passes the cuts, with its measurements, or None."""
        cuts = self.config.selection
        r_max = self.config.population.source_radius_theta_E * d["defl"]["theta_E_sis"]
        theta_E = d["lens"]["theta_E"]
        for _ in range(cuts.source_tries):
            src = self._draw_source_at(rng, d, r_max)
            resolved = theta_E ** 2 > cuts.resolution_factor ** 2 * (
                src["R_sersic"] ** 2 + (self.psf_fwhm[view["psf_id"]] / 2) ** 2)
            if not resolved:
                continue
            m = self._measure(beta, src, view)
            if passes(cuts, n_images=m["n_images"], magnification=m["magnification"], snr=m["arc_snr"],
                      theta_E=theta_E, source_R_arcsec=src["R_sersic"],
                      psf_fwhm_arcsec=self.psf_fwhm[view["psf_id"]]):
                return src, m
        return None

    def _non_lens_source(self, rng, d: dict, beta, view: dict, src: dict, lensed: dict):
        """The view's source moved outside the caustics (one image, below the magnification cut) with the
        observed flux the lensed arcs had (so flux is no tell), or dropped."""
        cuts = self.config.selection
        if rng.random() < self.config.non_lens_source_absent_fraction:
            return None, None
        theta = d["defl"]["theta_E_sis"]
        for _ in range(cuts.source_tries):
            moved = self._draw_source_at(rng, d, r_max=4.0 * theta, r_min=1.0 * theta)
            for k in ("abs_mag", "R_sersic", "n_sersic", "e1", "e2"):
                moved[k] = src[k]
            moved["mag"] = src["mag"]
            m = self._measure(beta, moved, view)
            if m["n_images"] > 1 or m["magnification"] >= cuts.min_magnification or m["magnification"] <= 0:
                continue
            moved["mag"] = src["mag"] - 2.5 * math.log10(lensed["magnification"] / m["magnification"])
            return moved, self._measure(beta, moved, view)
        return None, None

    def _prepare_view(self, rng, d: dict, first: bool, interlopers: list[dict]) -> dict:
        ll = self._view_light(rng, d, first)
        x, y = self.grid.x_arcsec, self.grid.y_arcsec
        scene = self._sersic_cps(x, y, ll, self.observation.magnitude_to_cps(ll["mag"]))
        for g in interlopers:
            scene = scene + self._sersic_cps(x, y, g, self.observation.magnitude_to_cps(g["mag"]))
        psf_id = int(rng.integers(len(self.psf_bank)))
        sky = self.observation.draw_conditions(rng)
        return {"lens_light": ll, "psf_id": psf_id, "sky_offset_mag": sky, "band": self.observation.band(sky),
                "scene_conv": self.psf_bank.convolve(scene, psf_id)}

    # ------------------------------------------------------------------------------ samples
    def _sample(self, rng: np.random.Generator, n_views: int) -> tuple[list[np.ndarray], dict]:
        cfg = self.config
        is_lens = bool(rng.random() < cfg.lens_fraction)
        for attempt in range(1, cfg.selection.max_tries + 1):  # noqa: B007 (read after the loop)
            d = self._draw_deflector(rng)
            if d["lens"]["theta_E"] <= 0:
                continue
            beta = self.mass.lens_model.ray_shooting(self.grid.x_arcsec, self.grid.y_arcsec,
                                                     self.mass.kwargs(d["mass"]))
            interlopers = self.population.draw_interlopers(rng, self.field_arcsec)
            views = []
            for v in range(n_views):
                view = self._prepare_view(rng, d, v == 0, interlopers)
                found = self._try_lensed_source(rng, d, beta, view)
                if found is None:
                    break
                view["source"], view["measure"] = found
                views.append(view)
            if len(views) == n_views:
                break
        else:
            raise UserError(f"survey simulation: no deflector passed the selection in "
                               f"{cfg.selection.max_tries} draws (loosen selection or widen the priors)")
        images, out_views = [], []
        for view in views:
            src, m = view["source"], view["measure"]
            if not is_lens:
                src, m = self._non_lens_source(rng, d, beta, view, src, m)
            arc_conv = m.pop("_arc_conv") if m is not None else np.zeros(self.grid.shape)
            model = view["scene_conv"] + arc_conv
            noisy = Observation.add_noise(rng, model, Observation.sigma(view["band"], model))
            top = float(noisy.max())
            images.append((noisy / top).astype(np.float32))
            rec = {"lens_light": view["lens_light"], "source": src, "psf_id": view["psf_id"],
                   "psf_name": self.psf_bank.names[view["psf_id"]], "sky_offset_mag": view["sky_offset_mag"],
                   "image_max_cps": top, "background_sigma_cps": float(view["band"].background_noise),
                   "lens_light_max_cps": float(view["scene_conv"].max())}
            if m is None:
                m = {"magnification": 0.0, "n_images": 0, "image_magnifications": [], "arc_snr": 0.0,
                     "arc_flux_fraction": 0.0}
            rec.update(m)
            out_views.append(rec)
        params = {"family": "survey", "is_lens": int(is_lens),
                  "lens": {k: float(d["lens"][k]) for k in LENS_PARAMS},
                  "mass": d["mass"], "views": out_views, "interlopers": interlopers,
                  "deflector_draws": attempt}
        return images, params

