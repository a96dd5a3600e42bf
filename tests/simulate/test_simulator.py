"""LensSimulator physics: Einstein ring radius, LenSiam pairs, determinism, the render API, errors."""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest

from hpc_lensiam.core.errors import ConfigError, UserError
from hpc_lensiam.shards.manifest import LENS_PARAMS
from hpc_lensiam.simulate.config import simulation_config
from hpc_lensiam.simulate.priors import draw_lens, draw_lens_light, draw_source
from hpc_lensiam.simulate.simulator import LensSimulator, lens_kwargs

NUM_PIX = 64


def _sim(**overrides) -> LensSimulator:
    overrides.setdefault("instrument", {"num_pix": NUM_PIX})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "analytic sources only"
        return LensSimulator(simulation_config(**overrides))


@pytest.fixture(scope="module")
def sim() -> LensSimulator:
    return _sim()


def _ring_radius(sim: LensSimulator, img: np.ndarray, cx=0.0, cy=0.0) -> float:
    """Radius (arcsec) of the azimuthally averaged brightness peak, in half-pixel bins."""
    r = np.hypot(sim.grid.x_pix_arcsec - cx, sim.grid.y_pix_arcsec - cy).ravel()
    width = sim.grid.pixel_scale_arcsec / 2
    idx = (r / width).astype(int)
    sums = np.bincount(idx, weights=img.ravel().astype(np.float64))
    counts = np.bincount(idx)
    prof = np.where(counts > 0, sums / np.maximum(counts, 1), 0.0)
    k = int(np.argmax(prof))
    return (k + 0.5) * width


@pytest.mark.parametrize("theta_E", [0.8, 1.3])
def test_sis_einstein_ring_radius_equals_theta_E(sim, theta_E):
    """SIS + small centred source, no PSF/noise/lens light: a ring at r = theta_E (within 1 pixel)."""
    lens = {
        "theta_E": theta_E,
        "gamma": 2.0,
        "e1": 0.0,
        "e2": 0.0,
        "center_x": 0.0,
        "center_y": 0.0,
        "gamma1": 0.0,
        "gamma2": 0.0,
    }
    src = {"kind": "sersic", "amp": 1.0, "R_sersic": 0.05, "n_sersic": 1.0, "center_x": 0.0, "center_y": 0.0}
    img = sim.render(lens=lens, source=src)
    assert img.dtype == np.float32 and img.shape == (NUM_PIX, NUM_PIX)
    assert np.isfinite(img).all() and img.max() == 1.0
    assert abs(_ring_radius(sim, img) - theta_E) <= sim.grid.pixel_scale_arcsec
    # a ring, not a blob: the centre is dark compared with the ring
    c = NUM_PIX // 2
    assert img[c - 1 : c + 1, c - 1 : c + 1].max() < 0.05


def test_offset_lens_ring_follows_lens_centre(sim):
    lens = {"theta_E": 1.0, "gamma": 2.0, "center_x": 0.2, "center_y": -0.15}
    src = {"kind": "sersic", "R_sersic": 0.05, "n_sersic": 1.0, "center_x": 0.2, "center_y": -0.15}
    img = sim.render(lens=lens, source=src)
    assert abs(_ring_radius(sim, img, 0.2, -0.15) - 1.0) <= sim.grid.pixel_scale_arcsec


def test_ray_shooting_matches_lenstronomy_lensmodel(sim):
    """The fast ray shooter equals LensModel(["EPL_NUMBA", "SHEAR"]).ray_shooting."""
    rng = np.random.default_rng(3)
    for _ in range(10):
        lens = draw_lens(rng, sim.config.lens)
        bx, by = sim.ray_shoot(lens)
        rx, ry = sim.lens_model.ray_shooting(sim.grid.x_arcsec, sim.grid.y_arcsec, lens_kwargs(lens))
        assert np.abs(bx - rx).max() < 1e-8 and np.abs(by - ry).max() < 1e-8


def _check_image(img):
    assert img.dtype == np.float32 and img.shape == (NUM_PIX, NUM_PIX)
    assert np.isfinite(img).all()
    assert img.max() == 1.0


def test_pair_shares_lens_and_differs_in_pixels(sim):
    pair = sim.sample_pair(np.random.default_rng(0))
    for v in ("view1", "view2"):
        _check_image(pair[v])
    assert not np.array_equal(pair["view1"], pair["view2"])
    params = pair["params"]
    assert list(params["lens"]) == list(LENS_PARAMS)
    assert all(type(params["lens"][k]) is float for k in LENS_PARAMS)
    assert len(params["views"]) == 2
    for view in params["views"]:
        assert {"source", "psf_id", "noise_sigma", "lens_light"} <= set(view)
        assert view["source"]["kind"] in ("core_sersic", "cosmos")
        assert isinstance(view["source"]["merger"], bool)
        lens_light_keys = {"R_sersic", "n_sersic", "e1", "e2", "center_x", "center_y", "amp", "peak_ratio"}
        assert lens_light_keys <= set(view["lens_light"])
    json.loads(json.dumps(params))  # JSON-able, plain types


def test_pair_views_are_the_same_lens(sim):
    """Re-rendering each view from its stored params reproduces it (noiseless check of the lens)."""
    pair = sim.sample_pair(np.random.default_rng(11))
    p = pair["params"]
    for name, view in zip(("view1", "view2"), p["views"]):
        clean = sim.render(p["lens"], view["source"], lens_light=view["lens_light"], psf=view["psf_id"])
        resid = pair[name] - clean
        # what is left is the noise only, at the stored level (image normalised to ~1)
        assert abs(resid.std() - view["noise_sigma"]) < 0.35 * view["noise_sigma"] + 2e-3


def test_determinism_same_seed_same_pair(sim):
    a = sim.sample_pair(np.random.default_rng(42))
    b = sim.sample_pair(np.random.default_rng(42))
    assert a["view1"].tobytes() == b["view1"].tobytes() and a["view2"].tobytes() == b["view2"].tobytes()
    assert json.dumps(a["params"], sort_keys=True) == json.dumps(b["params"], sort_keys=True)
    c = sim.sample_pair(np.random.default_rng(43))
    assert c["params"]["lens"] != a["params"]["lens"]
    # a fresh simulator (new process in the writer) gives the same bytes
    d = _sim().sample_pair(np.random.default_rng(42))
    assert d["view1"].tobytes() == a["view1"].tobytes()


def test_views_draw_independent_nuisances(sim):
    rng = np.random.default_rng(5)
    views = [sim.sample_pair(rng)["params"]["views"] for _ in range(8)]
    assert any(v1["psf_id"] != v2["psf_id"] for v1, v2 in views)
    assert all(v1["noise_sigma"] != v2["noise_sigma"] for v1, v2 in views)
    assert all(v1["source"]["center_x"] != v2["source"]["center_x"] for v1, v2 in views)
    assert all(v1["lens_light"]["R_sersic"] != v2["lens_light"]["R_sersic"] for v1, v2 in views)
    lo, hi = sim.config.instrument.noise_sigma
    assert all(lo <= v["noise_sigma"] <= hi for pair in views for v in pair)


def test_sample_single(sim):
    out = sim.sample_single(np.random.default_rng(1))
    _check_image(out["image"])
    assert len(out["params"]["views"]) == 1 and set(out["params"]["lens"]) == set(LENS_PARAMS)


def test_priors_source_mix_and_lens_light_follows_mass(sim):
    cfg = sim.config
    rng = np.random.default_rng(7)
    lens = draw_lens(rng, cfg.lens)
    srcs = [draw_source(rng, cfg.source, lens, None, sim.sources) for _ in range(1000)]
    assert all(s["kind"] == "core_sersic" for s in srcs)  # no catalog: analytic only
    mergers = [s for s in srcs if s["merger"]]
    assert 0.06 < len(mergers) / len(srcs) < 0.14
    for m in mergers[:20]:
        off = math.hypot(m["second"]["center_x"] - m["center_x"], m["second"]["center_y"] - m["center_y"])
        assert cfg.source.merger_offset_arcsec[0] - 1e-9 <= off <= cfg.source.merger_offset_arcsec[1] + 1e-9
    lls = [draw_lens_light(rng, cfg.lens_light, lens, cfg.lens) for _ in range(2000)]
    de1 = np.array([ll["e1"] - lens["e1"] for ll in lls])
    dcx = np.array([ll["center_x"] - lens["center_x"] for ll in lls])
    frac = cfg.lens_light.follow_mass_sigma_frac
    assert abs(de1.std() - frac * (cfg.lens.e1[1] - cfg.lens.e1[0])) < 0.1 * frac
    assert abs(dcx.std() - frac * 0.3) < 0.1 * frac * 0.3
    assert abs(de1.mean()) < 0.005


def test_render_options(sim):
    lens = {
        "theta_E": 1.0,
        "gamma": 2.1,
        "e1": 0.1,
        "e2": -0.05,
        "center_x": 0.0,
        "center_y": 0.0,
        "gamma1": 0.03,
        "gamma2": 0.0,
    }
    src = {
        "kind": "core_sersic",
        "R_sersic": 0.2,
        "Rb": 0.02,
        "n_sersic": 2.0,
        "gamma": 0.2,
        "center_x": 0.05,
        "center_y": 0.0,
    }
    plain = sim.render(lens, src)
    with_ll = sim.render(lens, src, lens_light={"R_sersic": 0.8, "n_sersic": 4.0, "peak_ratio": 2.0})
    blurred = sim.render(lens, src, psf=0)
    gauss = np.exp(-0.5 * (np.arange(-4, 5)[:, None] ** 2 + np.arange(-4, 5)[None, :] ** 2) / 1.5**2)
    blurred2 = sim.render(lens, src, psf=gauss)
    noisy = sim.render(lens, src, noise_sigma=0.05, rng=np.random.default_rng(0))
    merged = sim.render(lens, [src, {"kind": "sersic", "R_sersic": 0.1, "n_sersic": 1, "center_x": -0.2}])
    for img in (plain, with_ll, blurred, blurred2, noisy, merged):
        _check_image(img)
    c = NUM_PIX // 2
    assert with_ll[c, c] > 0.5 > plain[c, c]  # lens light brightens the centre
    # blurring lowers the peak relative to the total flux: the max-1 images grow in sum
    assert plain.sum() < blurred.sum() < blurred2.sum()
    assert (noisy - plain).std() > 0.01


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(lens={"theta_E": 1.0}, source={"kind": "blob"}), "unknown source kind"),
        (dict(lens={"theta_E": 1.0, "kappa": 1}, source={"kind": "sersic", "R_sersic": 0.1, "n_sersic": 1}), "kappa"),
        (dict(lens={"gamma": 2.0}, source={"kind": "sersic", "R_sersic": 0.1, "n_sersic": 1}), "theta_E"),
        (dict(lens={"theta_E": 1.0}, source={"kind": "sersic", "n_sersic": 1}), "R_sersic"),
        (dict(lens={"theta_E": 1.0}, source={"kind": "cosmos", "id": 1}), "cosmos_dir"),
        (dict(lens={"theta_E": 1.0}, source={"kind": "sersic", "R_sersic": 0.1, "n_sersic": 1}, psf=99), "psf"),
        (
            dict(lens={"theta_E": 1.0}, source={"kind": "sersic", "R_sersic": 0.1, "n_sersic": 1}, psf=np.ones((4, 4))),
            "odd",
        ),
        (
            dict(lens={"theta_E": 1.0}, source={"kind": "sersic", "R_sersic": 0.1, "n_sersic": 1}, noise_sigma=0.1),
            "rng",
        ),
    ],
)
def test_render_bad_input_raises_user_error(sim, kwargs, match):
    with pytest.raises(UserError, match=match):
        sim.render(**kwargs)


def test_no_cosmos_warns_once_at_construction():
    with pytest.warns(UserWarning, match="analytic"):
        s = LensSimulator(simulation_config(instrument={"num_pix": 32}))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        s.sample_pair(np.random.default_rng(0))
        s.sample_single(np.random.default_rng(1))


@pytest.mark.parametrize(
    "overrides",
    [
        {"lens": {"theta_E_arcsec": [0.0, 1.0]}},  # theta_E must be > 0
        {"lens": {"theta_E_arcsec": [1.5, 1.0]}},  # min > max
        {"instrument": {"psf_size_pix": 20}},  # even PSF
        {"source": {"merger_flux_ratio": [0.0, 1.0]}},
    ],
)
def test_impossible_config_raises_config_error(overrides):
    with pytest.raises(ConfigError):
        simulation_config(**overrides)


def test_euclid_preset_renders():
    s = _sim(preset="euclid", instrument={"num_pix": 32})
    assert s.grid.pixel_scale_arcsec == 0.1
    view = s.sample_pair(np.random.default_rng(0))["view1"]
    assert view.shape == (32, 32) and view.dtype == np.float32 and view.max() == 1.0


@pytest.mark.parametrize("n,d,s", [(48, 0.1, 1), (110, 0.101, 2), (45, 0.05, 3), (64, 0.2, 4)])
def test_numpy_grid_is_lenstronomys(n, d, s):
    """The detector grid without lenstronomy (the GPU machine's image has none; the torch renderer
    needs only its coordinates) is lenstronomy's grid to rounding, in the same order."""
    from hpc_lensiam.simulate.instrument import DetectorGrid, numpy_grid

    g = DetectorGrid(n, d, s)
    x, y, x_pix, y_pix = numpy_grid(n, d, s)
    for ours, theirs in ((x, g.x_arcsec), (y, g.y_arcsec), (x_pix, g.x_pix_arcsec), (y_pix, g.y_pix_arcsec)):
        assert ours.shape == theirs.shape
        np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-14 * d * n)
