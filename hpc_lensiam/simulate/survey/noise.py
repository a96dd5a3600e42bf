"""Noise in physical units: Euclid VIS (lenstronomy's SimulationAPI config) and HST ACS/WFC F814W (below).

The exposure time, number of exposures, sky brightness (mag/arcsec^2), read noise, CCD gain and
magnitude zero point of euclid come from ``lenstronomy.SimulationAPI.ObservationConfig.Euclid`` (VIS);
those of hst from ``ACS_F814W`` below: one band for the preset's sky, zero point, noise and its
814 nm PSF (lenstronomy ships HST only as WFC3/F160W, which the hst preset used to mix with an
814 nm PSF: issue 28 (4)). The pixel scale is the preset's detector grid (euclid 0.1"/px ~ VIS's
0.101"; hst 0.05"/px, ACS/WFC's drizzled scale). Images are in electrons per second.

The noise sigma per pixel is lenstronomy's ``SingleBand.estimate_noise`` (background: sky + read noise
over all exposures; Poisson: Gaussian approximation of the source counts); the draw uses the numpy
Generator of the sample (lenstronomy's own ``noise_for_model`` draws from the global numpy state).
"""

from __future__ import annotations

import importlib

import numpy as np

from .config import OBSERVATIONS, ObservationSettings

# HST ACS/WFC F814W, a one-orbit image like the SLACS lenses' (Bolton et al. 2008: ~2100-2200 s in F814W):
# AB zero point 25.94 (ACS zero points, Bohlin 2016, AJ 152, 60: 25.937 for F814W), sky 22.1 AB mag/arcsec^2
# (~0.085 e-/s per 0.05" pixel, average zodiacal + earthshine, ACS Instrument Handbook), read noise 4.5 e-
# and gain 2 e-/ADU (ACS/WFC), PSF FWHM ~0.09-0.1" at 0.05"/px (the preset's 814 nm built-in bank).
ACS_F814W = {
    "exposure_time": 2200.0,
    "sky_brightness": 22.1,
    "magnitude_zero_point": 25.94,
    "num_exposures": 1,
    "read_noise": 4.5,
    "ccd_gain": 2.0,
    "pixel_scale": 0.05,
    "seeing": 0.095,
    "psf_type": "GAUSSIAN",
}


def observation_kwargs(preset: str, pixel_scale_arcsec: float, settings: ObservationSettings) -> dict:
    """SingleBand kwargs of the preset's observation config (module doc), on our pixel grid."""
    module, band = OBSERVATIONS[preset]
    if band == "ACS_F814W":
        kw = dict(ACS_F814W)
    else:
        cls = getattr(importlib.import_module(f"lenstronomy.SimulationAPI.ObservationConfig.{module}"), module)
        kw = cls(band=band).kwargs_single_band()
    kw["pixel_scale"] = float(pixel_scale_arcsec)
    if settings.num_exposures is not None:
        kw["num_exposures"] = int(settings.num_exposures)
    if settings.exposure_time_s is not None:
        kw["exposure_time"] = float(settings.exposure_time_s)
    return kw


class Observation:
    """One preset's observing conditions; ``band(sky_offset_mag)`` gives a lenstronomy SingleBand."""

    def __init__(self, preset: str, pixel_scale_arcsec: float, settings: ObservationSettings):
        self.kwargs = observation_kwargs(preset, pixel_scale_arcsec, settings)
        self.settings = settings
        self.zero_point = float(self.kwargs["magnitude_zero_point"])
        self.nominal = self.band(0.0)

    def band(self, sky_offset_mag: float):
        from lenstronomy.SimulationAPI.observation_api import SingleBand

        kw = dict(self.kwargs)
        kw["sky_brightness"] = float(kw["sky_brightness"]) + float(sky_offset_mag)
        return SingleBand(**kw)

    def magnitude_to_cps(self, mag: float) -> float:
        return float(10 ** (-0.4 * (mag - self.zero_point)))

    def draw_conditions(self, rng: np.random.Generator) -> float:
        """Sky brightness offset (mag) for one view."""
        j = self.settings.sky_brightness_jitter_mag
        return float(rng.uniform(-j, j)) if j > 0 else 0.0

    @staticmethod
    def sigma(band, model_cps: np.ndarray) -> np.ndarray:
        """Per-pixel noise sigma (e-/s) for a noiseless model (lenstronomy's estimate_noise)."""
        return band.estimate_noise(np.clip(model_cps, 0.0, None))

    @staticmethod
    def add_noise(rng: np.random.Generator, model_cps: np.ndarray, sigma: np.ndarray) -> np.ndarray:
        return model_cps + rng.standard_normal(model_cps.shape) * sigma
