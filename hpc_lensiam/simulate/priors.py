"""Parameter draws from the config priors -> plain dicts in lenstronomy names (arcsec, radians).

Every function takes the numpy Generator explicitly and draws in a fixed order, so a data set is
reproducible from its seed. Config fields carry units in their names (``theta_E_arcsec``); the
returned dicts use lenstronomy's keyword names (``theta_E``), which is what params.json stores.
"""

from __future__ import annotations

import math

import numpy as np

from ..shards.manifest import LENS_PARAMS
from .config import LensLightPrior, LensPrior, SourcePrior


def uniform(rng: np.random.Generator, bounds) -> float:
    lo, hi = bounds
    return float(rng.uniform(lo, hi)) if hi > lo else float(lo)


def _width(bounds) -> float:
    return float(bounds[1] - bounds[0])


def draw_lens(rng: np.random.Generator, prior: LensPrior) -> dict:
    """The 8 mass parameters a LenSiam pair shares: EPL (theta_E, gamma, e1, e2, centre) + shear."""
    lens = {
        "theta_E": uniform(rng, prior.theta_E_arcsec),
        "gamma": uniform(rng, prior.gamma),
        "e1": uniform(rng, prior.e1),
        "e2": uniform(rng, prior.e2),
        "center_x": uniform(rng, prior.center_x_arcsec),
        "center_y": uniform(rng, prior.center_y_arcsec),
        "gamma1": uniform(rng, prior.gamma1),
        "gamma2": uniform(rng, prior.gamma2),
    }
    assert tuple(lens) == LENS_PARAMS
    return lens


def draw_lens_light(rng: np.random.Generator, prior: LensLightPrior, lens: dict, lens_prior: LensPrior) -> dict:
    """Sersic lens light that follows the mass: centre and (e1, e2) = mass value + Gaussian.

    The Gaussian sigma is ``follow_mass_sigma_frac`` x that parameter's prior range (paper: 2.5%).
    The amplitude is fixed later from ``peak_ratio`` (lens-light peak / lensed-source peak).
    """
    f = prior.follow_mass_sigma_frac
    ll = {
        "R_sersic": uniform(rng, prior.R_sersic_arcsec),
        "n_sersic": uniform(rng, prior.n_sersic),
        "e1": lens["e1"] + float(rng.normal(0.0, f * _width(lens_prior.e1))),
        "e2": lens["e2"] + float(rng.normal(0.0, f * _width(lens_prior.e2))),
        "center_x": lens["center_x"] + float(rng.normal(0.0, f * _width(lens_prior.center_x_arcsec))),
        "center_y": lens["center_y"] + float(rng.normal(0.0, f * _width(lens_prior.center_y_arcsec))),
        "peak_ratio": uniform(rng, prior.peak_ratio),
    }
    # keep the ellipticity modulus physical (|e| < 1) after the perturbation
    e = math.hypot(ll["e1"], ll["e2"])
    if e > 0.95:
        ll["e1"] *= 0.95 / e
        ll["e2"] *= 0.95 / e
    return ll


def _draw_component(
    rng: np.random.Generator,
    prior: SourcePrior,
    center_x: float,
    center_y: float,
    catalog=None,
    renderer=None,
    exclude_row: int | None = None,
) -> dict:
    """One source component centred at (center_x, center_y), normalised to unit total flux."""
    use_cosmos = rng.random() < prior.cosmos_fraction
    if catalog is not None and use_cosmos:
        row = catalog.draw_row(rng, exclude=exclude_row)
        scale = float(catalog.pixel_scale[row]) * uniform(rng, prior.cosmos_scale)
        return {
            "kind": "cosmos",
            "id": int(catalog.ident[row]),
            "row": int(row),
            "center_x": center_x,
            "center_y": center_y,
            "phi_G": float(rng.uniform(0.0, 2 * math.pi)),
            "scale": scale,
            "amp": 1.0 / scale**2,
        }
    src = {
        "kind": "core_sersic",
        "R_sersic": uniform(rng, prior.R_sersic_arcsec),
        "n_sersic": uniform(rng, prior.n_sersic),
        "e1": uniform(rng, prior.e1),
        "e2": uniform(rng, prior.e2),
        "Rb": uniform(rng, prior.R_b_arcsec),
        "gamma": uniform(rng, prior.core_gamma),
        "alpha": uniform(rng, prior.core_alpha),
        "center_x": center_x,
        "center_y": center_y,
    }
    if renderer is not None:  # unit total flux by the profile's own integral (bench/numerics.py)
        from .sources import core_sersic_amp_for_unit_flux

        src["amp"] = core_sersic_amp_for_unit_flux(
            renderer, src["R_sersic"], src["n_sersic"], src["Rb"], src["gamma"], src["alpha"]
        )
    else:
        src["amp"] = 1.0
    return src


def draw_source(rng: np.random.Generator, prior: SourcePrior, lens: dict, catalog=None, renderer=None) -> dict:
    """Source dict: COSMOS (``cosmos_fraction``, when a catalog is given) or core-Sersic; with
    probability ``merger_fraction`` a second, independently drawn source is added, offset by
    ``merger_offset_arcsec`` in a random direction, with ``merger_flux_ratio`` of the first's flux.
    The source centre is drawn relative to the lens centre (``center_arcsec``)."""
    cx = lens["center_x"] + uniform(rng, prior.center_arcsec)
    cy = lens["center_y"] + uniform(rng, prior.center_arcsec)
    src = _draw_component(rng, prior, cx, cy, catalog, renderer)
    src["merger"] = bool(rng.random() < prior.merger_fraction)
    if src["merger"]:
        r = uniform(rng, prior.merger_offset_arcsec)
        phi = float(rng.uniform(0.0, 2 * math.pi))
        second = _draw_component(
            rng, prior, cx + r * math.cos(phi), cy + r * math.sin(phi), catalog, renderer, exclude_row=src.get("row")
        )
        ratio = uniform(rng, prior.merger_flux_ratio)
        second["flux_ratio"] = ratio
        second["amp"] = second["amp"] * ratio
        src["second"] = second
    return src
