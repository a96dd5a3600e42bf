"""Batched torch draws from the config priors: the same distributions as ``priors.py``, on a device.

``priors.py`` draws one system at a time from a numpy Generator; these functions draw B systems
at once from a ``torch.Generator`` (so the random streams differ, the distributions do not: the
tests compare every marginal with two-sample KS tests). Parameters come back as dicts of (B,)
tensors under the same lenstronomy names; a source is a "component batch": ``kind`` codes plus
every profile's parameters, of which each system uses its kind's (see :data:`KIND_CODES`).
"""

from __future__ import annotations

import math

import torch

from ..shards.manifest import LENS_PARAMS
from .config import LensLightPrior, LensPrior, SourcePrior
from .torch_physics import core_sersic_unit_flux_amp

NONE, SERSIC, CORE_SERSIC, COSMOS = -1, 0, 1, 2
KIND_CODES = {"sersic": SERSIC, "core_sersic": CORE_SERSIC, "cosmos": COSMOS}
KIND_NAMES = {v: k for k, v in KIND_CODES.items()}
LENS_LIGHT_E_MAX = 0.95  # priors.draw_lens_light keeps |e| below this after the perturbation


def uniform(g: torch.Generator, bounds, n: int, like: torch.Tensor) -> torch.Tensor:
    """U(lo, hi) as numpy's ``rng.uniform`` (lo + (hi - lo) U[0, 1)); a point range gives lo."""
    lo, hi = float(bounds[0]), float(bounds[1])
    if hi > lo:
        return lo + (hi - lo) * torch.rand(n, generator=g, device=like.device, dtype=like.dtype)
    return torch.full((n,), lo, device=like.device, dtype=like.dtype)


def normal(g: torch.Generator, sigma: float, n: int, like: torch.Tensor) -> torch.Tensor:
    return sigma * torch.randn(n, generator=g, device=like.device, dtype=like.dtype)


def _width(bounds) -> float:
    return float(bounds[1] - bounds[0])


def draw_lens(g: torch.Generator, prior: LensPrior, n: int, like: torch.Tensor) -> dict:
    """The 8 mass parameters (``priors.draw_lens``)."""
    bounds = (
        prior.theta_E_arcsec,
        prior.gamma,
        prior.e1,
        prior.e2,
        prior.center_x_arcsec,
        prior.center_y_arcsec,
        prior.gamma1,
        prior.gamma2,
    )
    return {k: uniform(g, b, n, like) for k, b in zip(LENS_PARAMS, bounds)}


def draw_lens_light(g: torch.Generator, prior: LensLightPrior, lens: dict, lens_prior: LensPrior) -> dict:
    """Sersic lens light following the mass (``priors.draw_lens_light``); amp comes from peak_ratio."""
    like = lens["e1"]
    n = like.numel()
    f = prior.follow_mass_sigma_frac
    ll = {
        "R_sersic": uniform(g, prior.R_sersic_arcsec, n, like),
        "n_sersic": uniform(g, prior.n_sersic, n, like),
        "e1": lens["e1"] + normal(g, f * _width(lens_prior.e1), n, like),
        "e2": lens["e2"] + normal(g, f * _width(lens_prior.e2), n, like),
        "center_x": lens["center_x"] + normal(g, f * _width(lens_prior.center_x_arcsec), n, like),
        "center_y": lens["center_y"] + normal(g, f * _width(lens_prior.center_y_arcsec), n, like),
        "peak_ratio": uniform(g, prior.peak_ratio, n, like),
    }
    e = torch.hypot(ll["e1"], ll["e2"])
    shrink = torch.where(e > LENS_LIGHT_E_MAX, LENS_LIGHT_E_MAX / e, torch.ones_like(e))
    ll["e1"], ll["e2"] = ll["e1"] * shrink, ll["e2"] * shrink
    return ll


def _draw_component(
    g: torch.Generator, prior: SourcePrior, center_x, center_y, bank=None, exclude: torch.Tensor | None = None
) -> dict:
    """One source component per system (``priors._draw_component``), unit total flux.

    Both kinds' parameters are drawn for every system and ``kind`` picks one: the same
    distribution as drawing only the chosen kind's. COSMOS stamps are uniform over the bank
    (= uniform over the accepted catalog rows), excluding ``exclude`` (a merger's first stamp)
    when the bank has more than one.
    """
    like = center_x
    n = like.numel()
    use_cosmos = torch.rand(n, generator=g, device=like.device, dtype=like.dtype) < prior.cosmos_fraction
    src = {
        "R_sersic": uniform(g, prior.R_sersic_arcsec, n, like),
        "n_sersic": uniform(g, prior.n_sersic, n, like),
        "e1": uniform(g, prior.e1, n, like),
        "e2": uniform(g, prior.e2, n, like),
        "Rb": uniform(g, prior.R_b_arcsec, n, like),
        "gamma": uniform(g, prior.core_gamma, n, like),
        "alpha": uniform(g, prior.core_alpha, n, like),
        "center_x": center_x,
        "center_y": center_y,
    }
    src["amp"] = core_sersic_unit_flux_amp(src["R_sersic"], src["n_sersic"], src["Rb"], src["gamma"], src["alpha"])
    kind = torch.full((n,), CORE_SERSIC, dtype=torch.long, device=like.device)
    if bank is not None:
        size = len(bank)
        stamp = torch.randint(size, (n,), generator=g, device=like.device)
        if exclude is not None and size > 1:  # exclude < 0: nothing to exclude for that system
            other = torch.randint(size - 1, (n,), generator=g, device=like.device)
            other = other + (other >= exclude).long()
            stamp = torch.where(exclude >= 0, other, stamp)
        scale = bank.pixel_scales_arcsec[stamp] * uniform(g, prior.cosmos_scale, n, like)
        phi_G = 2 * math.pi * torch.rand(n, generator=g, device=like.device, dtype=like.dtype)
        src["stamp"], src["scale"], src["phi_G"] = stamp, scale, phi_G
        src["amp"] = torch.where(use_cosmos, 1.0 / scale**2, src["amp"])
        kind = torch.where(use_cosmos, COSMOS, kind)
    src["kind"] = kind
    return src


def draw_source(g: torch.Generator, prior: SourcePrior, lens: dict, bank=None) -> tuple[dict, dict]:
    """(first, second) components (``priors.draw_source``): the second is the merger partner,
    ``kind`` NONE where there is no merger; its amp already carries ``flux_ratio``."""
    like = lens["center_x"]
    n = like.numel()
    cx = lens["center_x"] + uniform(g, prior.center_arcsec, n, like)
    cy = lens["center_y"] + uniform(g, prior.center_arcsec, n, like)
    first = _draw_component(g, prior, cx, cy, bank)
    merger = torch.rand(n, generator=g, device=like.device, dtype=like.dtype) < prior.merger_fraction
    r = uniform(g, prior.merger_offset_arcsec, n, like)
    phi = 2 * math.pi * torch.rand(n, generator=g, device=like.device, dtype=like.dtype)
    exclude = None
    if bank is not None:  # only a COSMOS first component excludes its stamp
        exclude = torch.where(first["kind"] == COSMOS, first["stamp"], torch.full_like(first["stamp"], -1))
    second = _draw_component(g, prior, cx + r * torch.cos(phi), cy + r * torch.sin(phi), bank, exclude)
    ratio = uniform(g, prior.merger_flux_ratio, n, like)
    second["flux_ratio"] = ratio
    second["amp"] = second["amp"] * ratio
    second["kind"] = torch.where(merger, second["kind"], NONE)
    first["merger"] = merger
    return first, second


def draw_view_nuisance(g: torch.Generator, config, lens: dict, bank, num_psfs: int) -> dict:
    """What each view of a pair draws on its own (``LensSimulator._draw_view_nuisance``)."""
    like = lens["e1"]
    n = like.numel()
    lens_light = draw_lens_light(g, config.lens_light, lens, config.lens)
    first, second = draw_source(g, config.source, lens, bank)
    return {
        "lens_light": lens_light,
        "source": [first, second],
        "psf_id": torch.randint(num_psfs, (n,), generator=g, device=like.device),
        "noise_sigma": uniform(g, config.instrument.noise_sigma, n, like),
    }
