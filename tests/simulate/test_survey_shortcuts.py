"""The survey simulator's shortcuts give the samples of the full path: the same bytes, the same params.

``SurveySimulator`` rejects a source try on its magnification before the PSF convolution and the S/N cuts,
and renders each unlensed light component once per sample. ``FullPath`` below is the simulator without them
(every rendered try measured in full, then judged; every component rendered whenever a scene needs it), as
the code was before they were added; both draw from the same Generator in the same order.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from hpc_lensiam.simulate.survey import survey_config
from hpc_lensiam.simulate.survey.selection import failed_cuts
from hpc_lensiam.simulate.survey.simulator import SurveySimulator

# a small field with the preset's supersampling 2 + adaptive 16: every code path, a second per sample or less
SMALL = {"instrument": {"num_pix": 48}}


class FullPath(SurveySimulator):
    """The simulator with every try measured in full before it is judged and no store of unlensed images."""

    def _unlensed_cps(self, comp, cps, render):
        return render(comp, cps)

    def _try_lensed_source(self, rng, d, rays, view, tally=None):
        cuts = self.config.selection
        r_max = self.config.population.source_radius_theta_E * d["defl"]["theta_E_sis"]
        theta_E = d["lens"]["theta_E"]
        fwhm = self.psf_fwhm[view["psf_id"]]
        for _ in range(cuts.source_tries):
            src = self._place(rng, self._draw_source(rng, d["defl"]["z_source"]), d, r_max)
            size = math.sqrt(src["R_sersic"] ** 2 + (fwhm / 2) ** 2)
            if not theta_E**2 > cuts.resolution_factor**2 * size**2:
                continue
            images = self._count_images(rays, src)
            if images[0] < cuts.min_images:
                continue
            m = self._measure(rays, src, view, images)
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
            if not failed:
                return src, m
        return None

    def _non_lens_source(self, rng, d, rays, view):
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
            m = self._measure(rays, moved, view)
            if m["n_images"] > 1 or not 0 < m["magnification"] < cfg.selection.min_magnification:
                continue
            if cfg.selection.edge_frame_pix and m["edge_snr"] > 1.0:
                continue
            return moved, m
        return None, None


def _draws(cls, mode: str, seed: int, n: int) -> tuple[list[dict], int, int]:
    """n samples of ``cls`` from seed ``seed``, how many tries were measured in full and light components
    rendered."""
    sim = cls(survey_config(preset="euclid", mode=mode, **SMALL))
    calls = {"measure": 0, "render": 0}

    def counted(name, method):
        def wrapper(*args, **kwargs):
            calls[name] += 1
            return method(*args, **kwargs)

        return wrapper

    sim._measure = counted("measure", sim._measure)
    sim._render_sersic = counted("render", sim._render_sersic)
    rng = np.random.default_rng(seed)
    samples = [sim.sample_pair(rng) if mode == "lensiam" else sim.sample_single(rng) for _ in range(n)]
    return samples, calls["measure"], calls["render"]


@pytest.mark.parametrize(("mode", "seeds", "n"), [("single", range(4), 6), ("lensiam", [8, 10], 3)])
def test_shortcuts_give_the_full_paths_samples(mode, seeds, n):
    kinds, saved = set(), {"measure": 0, "render": 0}
    for seed in seeds:
        (got, measured, rendered), (ref, measured_ref, rendered_ref) = (
            _draws(SurveySimulator, mode, seed, n),
            _draws(FullPath, mode, seed, n),
        )
        saved["measure"] += measured_ref - measured
        saved["render"] += rendered_ref - rendered
        for a, b in zip(got, ref, strict=True):
            assert a["params"] == b["params"]
            for key in ("image", "view1", "view2"):
                if key in a:
                    assert a[key].tobytes() == b[key].tobytes()
            kinds.add(a["params"]["is_lens"])
    assert saved["measure"] > 0 and saved["render"] > 0  # both shortcuts were taken (pairs: seeds with interlopers)
    if mode == "single":
        assert kinds == {0, 1}  # lenses and non-lenses both checked


def test_central_core_mask_is_numpys_hypot_comparison():
    """Rays' central-image core mask (compiled, hypot only near the circle) is numpy's hypot >= r, ties included."""
    from hpc_lensiam.simulate.survey.simulator import _outside_circle

    rng = np.random.default_rng(2)
    x, y = rng.uniform(-6, 6, 20000), rng.uniform(-6, 6, 20000)
    cx, cy = 0.0123, -0.0456
    for radius in [0.0, 1e-300, 0.07, 1.3, *np.hypot(x[:200] - cx, y[:200] - cy)]:  # the last: points on the circle
        out = np.empty_like(x)
        _outside_circle(x, y, cx, cy, float(radius), out)
        assert out.tobytes() == (np.hypot(x - cx, y - cy) >= radius).astype(np.float64).tobytes()


def test_source_redshift_draw_is_the_table_samplers():
    """Population._z_source (the whole table's trapezoids, sliced) draws what a sampler built from the table's
    points above z_l + gap draws, also where z_l + gap falls on a table point."""
    from hpc_lensiam.simulate.survey.population import Population, _table_sampler

    pop = Population(survey_config(preset="euclid", mode="single").population)
    zs, pdf = pop._nz_s
    gap = pop.prior.z_source_min_gap
    rng = np.random.default_rng(0)
    for z_l in [*rng.uniform(0.0, 3.5, 300), *(zs[rng.integers(0, 3000, 300)] - gap)]:
        keep = zs >= z_l + gap
        seed = int(rng.integers(1 << 30))
        want = _table_sampler(zs[keep], pdf[keep])(np.random.default_rng(seed).random())
        assert pop._z_source(np.random.default_rng(seed), z_l) == want


@pytest.mark.parametrize("m", [2, 3, 4, 5])
def test_vectorised_multipoles_are_the_per_point_arithmetic(m):
    """The composite deflection's multipole loops (constant m = 3, 4: vectorised; any other m: generic) give, to
    the bit, the per-point arithmetic they replaced (``_multipole_term`` evaluated point by point in Python,
    whose floats are the same IEEE doubles), the centre included."""
    from hpc_lensiam.simulate.survey.deflection import _multipole_block, _multipole_term

    rng = np.random.default_rng(m)
    x, y = rng.uniform(-6, 6, 700), rng.uniform(-6, 6, 700)
    mcx, mcy = 0.03, -0.07
    start = 300  # a block of the arrays, as the caller passes it
    x[start + 5], y[start + 5] = mcx, mcy  # r = 0: the unit vector (1, 0)
    amp, phi = rng.uniform(-0.01, 0.01) / (1 - m**2), rng.uniform(0, 2 * math.pi)
    tx, ty = rng.normal(size=256), rng.normal(size=256)
    want_x, want_y = tx.copy(), ty.copy()
    for j in range(256):
        dx, dy = _multipole_term.py_func(
            x[start + j], y[start + j], m, amp, math.cos(m * phi), math.sin(m * phi), mcx, mcy
        )
        want_x[j] += dx
        want_y[j] += dy
    _multipole_block(x, y, tx, ty, start, m, amp, math.cos(m * phi), math.sin(m * phi), mcx, mcy)
    assert tx.tobytes() == want_x.tobytes() and ty.tobytes() == want_y.tobytes()
