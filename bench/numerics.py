"""Numerics of the paper family, measured: supersampling convergence, core-Sersic normalisation, COSMOS cleaning.

    .venv/bin/python -m bench.numerics --n 40 [--preset hst] [--fig docs/numerics_supersampling.png]

1. Supersampling: ``--n`` systems drawn from the paper family's priors (lens, source, lens light, PSF,
   noise sigma) are rendered noiseless at supersampling factors 1..8 and at 10 (the reference); the
   error of an image is max |img_s - img_10| over pixels, in units of that image's own noise sigma
   (noise_sigma x peak, as the simulator adds it; both images normalised to max 1). Printed: the
   fraction of images within 1 sigma, the 95th percentile and maximum error, and the cost of a render
   relative to factor 2 (measured side by side in this process).
   Then the adaptive rule against a uniform factor 16, in units of the image peak (``--n`` systems for each of
   seeds 0 and 1): plain 2, NUMERICS 2's rule (refine where the 2x2 sub-samples spread > 0.1 of the peak) and
   the default (NUMERICS 3: also the neighbours of refined pixels whose spread > 0.02, at 16 x 16 points where
   they are a peak, ridge or valley, else 8 x 8, and the pixels at the mass / light centre), and the default with
   every neighbour at 16 x 16; max and median error, and render cost vs factor 2 in alternating rounds
   (``--vs16-only``: only this part).
2. Core-Sersic normalisation: the true total flux (numerical radial integral of lenstronomy's
   CoreSersic) of ``--n`` prior draws normalised with the plain Sersic formula (the old way) and with
   the profile's own integral (``sources.core_sersic_amp_for_unit_flux``, now used).
3. COSMOS cleaning (needs ``../shared/data/cosmos_23.5_sample``): per accepted stamp, the fraction of
   stamp pixels carrying flux and the flux in pixels below k sigma of the noise, raw vs cleaned
   (pedestal = median of the stamp border subtracted, pixels below k sigma set to 0).
"""

from __future__ import annotations

import argparse
import os
import time
import warnings
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np

from .common import parse_quick, print_ratio

FACTORS = (1, 2, 4, 8, "2+a16@0.05/spread", "2+a16@0.1/spread", "2+a8@0.1/spread", "2+a16@0.1")
VS16 = (2, "2+a16@0.1/spread", "2+a16@0.1/nb16", "2+a16@0.1")  # error in units of the peak against a uniform factor 16
REFERENCE = 10
COSMOS = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "cosmos_23.5_sample"


def _sim(preset: str, factor, num_pix: int | None):
    """factor: an int (uniform) or "F+aA@T" (uniform F, adaptive A where the sub-sample spread > T x peak, with
    the neighbours of those pixels whose spread > 0.02 x peak and the pixels at the mass / light centre: the
    default rule, NUMERICS 3), "F+aA@T/spread" (the spread alone: NUMERICS 2's rule), "F+aA@T/nb16" (every
    neighbour at A x A points, not only the peaks, ridges and valleys among them)."""
    from hpc_lensiam.simulate.config import simulation_config
    from hpc_lensiam.simulate.simulator import LensSimulator

    rule = factor.partition("/")[2] if isinstance(factor, str) else ""
    if isinstance(factor, str):  # "2+a16@0.02": uniform 2, adaptive 16 above threshold 0.02
        base, rest = factor.partition("/")[0].split("+a")
        adaptive, threshold = rest.split("@")
        inst = {
            "supersampling_factor": int(base),
            "adaptive_supersampling_factor": int(adaptive),
            "adaptive_threshold": float(threshold),
        }
    else:
        inst = {"supersampling_factor": factor, "adaptive_supersampling_factor": 0}
    if num_pix:
        inst["num_pix"] = num_pix
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sim = LensSimulator(simulation_config(preset=preset, instrument=inst))
    if rule == "spread":
        sim.adaptive_neighbour_threshold = sim.adaptive_centre_radius_pix = None
    elif rule == "nb16":
        sim.adaptive_neighbour_factor = None
    return sim


def _systems(sim, n: int, seed: int) -> list:
    from hpc_lensiam.simulate.priors import draw_lens

    rng = np.random.default_rng(seed)
    systems = []
    for _ in range(n):
        lens = draw_lens(rng, sim.config.lens)
        systems.append((lens, sim._draw_view_nuisance(rng, lens)))
    return systems


def _render(sim, lens: dict, view: dict) -> np.ndarray:
    """The noiseless image (normalised to max 1) of one drawn system, as ``_sample`` composes it."""
    bx, by = sim.ray_shoot(lens)
    img, _ = sim._compose(bx, by, view["source"], dict(view["lens_light"]), view["psf_id"], 0.0, None, lens)
    return img.astype(np.float64)


def versus_16(n: int, preset: str, num_pix: int | None, seeds=(0, 1), rounds: int = 3) -> dict:
    """Error of plain 2 and of the adaptive rules against a uniform factor 16, in units of the image peak
    (max |img - img_16| over pixels, images normalised to max 1), over ``n`` systems per seed; render cost
    relative to factor 2, side by side: one warm-up render each, then ``rounds`` alternating rounds."""
    sims = {f: _sim(preset, f, num_pix) for f in VS16 + (16,)}
    systems = [s for seed in seeds for s in _systems(sims[16], n, seed)]
    reference = [_render(sims[16], lens, view) for lens, view in systems]
    for f in VS16:
        _render(sims[f], *systems[0])
    cost = dict.fromkeys(VS16, 0.0)
    renders = {}
    for r in range(rounds):
        for f in VS16 if r % 2 == 0 else VS16[::-1]:
            t = time.perf_counter()
            renders[f] = [_render(sims[f], lens, view) for lens, view in systems]
            cost[f] += time.perf_counter() - t
    res = {}
    for f in VS16:
        err = np.array([np.abs(a - b).max() for a, b in zip(renders[f], reference)])
        res[f] = {
            "max": float(err.max()),
            "median": float(np.median(err)),
            "over_0.006": int(np.sum(err > 0.006)),
            "per_seed_max": [float(err[i * n : (i + 1) * n].max()) for i in range(len(seeds))],
            "cost_vs_2": cost[f] / cost[2],
        }
    return res


def supersampling(n: int, preset: str, num_pix: int | None, seed: int = 0) -> dict:
    sims = {f: _sim(preset, f, num_pix) for f in FACTORS + (REFERENCE,)}
    systems = _systems(sims[REFERENCE], n, seed)
    renders, cost = {}, {}
    for f, sim in sims.items():
        _render(sim, *systems[0])  # warm-up: compiled kernels, caches
        t = time.perf_counter()
        renders[f] = [_render(sim, lens, view) for lens, view in systems]
        cost[f] = (time.perf_counter() - t) / n
    sigma = np.array([v["noise_sigma"] for _, v in systems])
    res = {}
    for f in FACTORS:
        err = np.array([np.abs(a - b).max() for a, b in zip(renders[f], renders[REFERENCE])]) / sigma
        res[f] = {
            "within_sigma": float(np.mean(err <= 1.0)),
            "p95_sigma": float(np.percentile(err, 95)),
            "max_sigma": float(err.max()),
            "cost_vs_2": cost[f] / cost[2],
            "s_per_image": cost[f],
        }
    return res


def _quad_flux(renderer, amp: float, kw: dict) -> float:
    """Independent check: adaptive quadrature of 2 pi R I(R) (scipy quad), not the log-grid sum under test."""
    from scipy.integrate import quad

    def f(r):
        return (
            2
            * np.pi
            * r
            * float(renderer._core.function(np.array([r]), np.array([0.0]), amp=amp, e1=0.0, e2=0.0, **kw)[0])
        )

    R = kw["R_sersic"]
    pts = [kw["Rb"], R, 10 * R]
    return sum(quad(f, a, b, limit=200)[0] for a, b in zip([0.0] + pts, pts + [200 * R]))


def core_sersic(n: int, seed: int = 0) -> dict:
    from hpc_lensiam.simulate.config import SourcePrior
    from hpc_lensiam.simulate.priors import uniform
    from hpc_lensiam.simulate.sources import (
        SourceRenderer,
        analytic_amp_for_unit_flux,
        core_sersic_amp_for_unit_flux,
        core_sersic_total_flux,
    )

    r = SourceRenderer()
    p = SourcePrior()
    rng = np.random.default_rng(seed)
    old, new = [], []
    for _ in range(n):
        kw = {
            "R_sersic": uniform(rng, p.R_sersic_arcsec),
            "n_sersic": uniform(rng, p.n_sersic),
            "Rb": uniform(rng, p.R_b_arcsec),
            "gamma": uniform(rng, p.core_gamma),
            "alpha": uniform(rng, p.core_alpha),
        }
        old.append(core_sersic_total_flux(r, amp=analytic_amp_for_unit_flux(r, kw["R_sersic"], kw["n_sersic"]), **kw))
        new.append(_quad_flux(r, core_sersic_amp_for_unit_flux(r, **kw), kw))
    return {
        "old_min": float(np.min(old)),
        "old_median": float(np.median(old)),
        "old_max": float(np.max(old)),
        "new_max_abs_error": float(np.max(np.abs(np.array(new) - 1))),
    }


def cosmos_cleaning(k_sigma: float = 1.0) -> dict | None:
    if not (COSMOS / "real_galaxy_catalog_23.5.fits").is_file():
        return None
    from hpc_lensiam.simulate.sources import CosmosCatalog, clean_stamp

    cat = CosmosCatalog(COSMOS)
    rows = cat.accepted()
    raw_cover, clean_cover, raw_neg, flux_kept = [], [], [], []
    for row in rows:
        img = cat._read(row)
        noise = float(cat.noise_rms[row])
        cleaned = clean_stamp(img, noise, k_sigma)
        raw_cover.append(float(np.mean(np.abs(img) > 0)))
        clean_cover.append(float(np.mean(cleaned > 0)))
        raw_neg.append(float(-img[img < 0].sum() / img[img > 0].sum()))
        flux_kept.append(float(cleaned.sum() / img.sum()))
    return {
        "stamps": len(rows),
        "k_sigma": k_sigma,
        "raw_nonzero_frac": float(np.median(raw_cover)),
        "clean_nonzero_frac": float(np.median(clean_cover)),
        "raw_negative_flux_frac": float(np.median(raw_neg)),
        "clean_flux_over_raw": [float(np.min(flux_kept)), float(np.median(flux_kept)), float(np.max(flux_kept))],
    }


def plot(res: dict, out: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    f = list(res)
    fig, ax = plt.subplots(figsize=(5.6, 3.4))
    pos = np.arange(len(f))
    ax.plot(pos, [res[k]["within_sigma"] for k in f], "o-", label="images within their noise sigma")
    ax.axhline(0.95, color="0.6", ls=":")
    ax.set_xticks(pos, [str(k) for k in f], fontsize=7, rotation=30, ha="right")  # long adaptive names
    ax2 = ax.twinx()
    ax2.plot(pos, [res[k]["cost_vs_2"] for k in f], "s--", color="C1", label="cost / cost(factor 2)")
    ax.set_xlabel("supersampling: uniform factor, or 2 + adaptive (reference: uniform 10)")
    ax.set_ylabel("fraction within 1 sigma")
    ax2.set_ylabel("render cost vs factor 2", color="C1")
    lines = [ax.get_lines()[0], ax2.get_lines()[0]]
    ax.legend(lines, [ln.get_label() for ln in lines], fontsize=7, loc="center right")
    fig.tight_layout()
    fig.savefig(out, dpi=80)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=40)
    ap.add_argument("--preset", default="hst")
    ap.add_argument("--num-pix", type=int, default=None, help="smaller grid for a quick run")
    ap.add_argument("--fig", default=None)
    ap.add_argument("--vs16-only", action="store_true", help="only the adaptive rules against uniform factor 16")
    a = parse_quick(ap, None, dict(n=4, num_pix=40))
    vs = versus_16(a.n, a.preset, a.num_pix)
    print(f"adaptive rules vs uniform factor 16 ({a.preset}, 2 x {a.n} systems, error in units of the image peak):")
    for f, r in vs.items():
        print(
            f"  {f}: max {r['max']:.4f} (per seed {', '.join(f'{m:.4f}' for m in r['per_seed_max'])}), median "
            f"{r['median']:.4f}, {r['over_0.006']} images over 0.006; render {r['cost_vs_2']:.2f}x factor 2"
        )
    print_ratio(vs["2+a16@0.1"]["cost_vs_2"], "render cost of the default adaptive supersampling over factor 2")
    if a.vs16_only:
        return
    res = supersampling(a.n, a.preset, a.num_pix)
    print(
        f"supersampling ({a.preset}, {a.n} systems, error vs factor {REFERENCE} in units of each image's noise sigma):"
    )
    for f, r in res.items():
        print(
            f"  factor {f}: {r['within_sigma']:.0%} within 1 sigma, p95 {r['p95_sigma']:.2f}, max "
            f"{r['max_sigma']:.2f} sigma; render {r['s_per_image'] * 1e3:.0f} ms = {r['cost_vs_2']:.2f}x factor 2"
        )
    if a.fig:
        plot(res, a.fig)
    cs = core_sersic(max(a.n, 200))
    print(
        f"core-Sersic total flux with the Sersic formula: min {cs['old_min']:.3f}, median {cs['old_median']:.3f}, "
        f"max {cs['old_max']:.3f}; with its own integral: max |flux - 1| = {cs['new_max_abs_error']:.1e} "
        f"(scipy quad)"
    )
    cc = cosmos_cleaning()
    if cc:
        print(
            f"COSMOS cleaning (k = {cc['k_sigma']} sigma, {cc['stamps']} stamps, medians): non-zero pixels "
            f"{cc['raw_nonzero_frac']:.0%} -> {cc['clean_nonzero_frac']:.0%}; negative flux (noise) "
            f"{cc['raw_negative_flux_frac']:.1%} of the positive in the raw stamp; cleaned/raw flux "
            f"min/median/max {cc['clean_flux_over_raw'][0]:.3f}/{cc['clean_flux_over_raw'][1]:.3f}/"
            f"{cc['clean_flux_over_raw'][2]:.3f}"
        )


if __name__ == "__main__":
    main()
