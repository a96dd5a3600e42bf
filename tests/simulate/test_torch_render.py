"""TorchLensSimulator against LensSimulator: the same images for the same parameters, the same priors."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from scipy import stats

from hpc_lensiam.core.errors import UserError
from hpc_lensiam.shards.manifest import LENS_PARAMS
from hpc_lensiam.simulate import priors
from hpc_lensiam.simulate.config import SimulationConfig, simulation_config
from hpc_lensiam.simulate.simulator import LensSimulator
from hpc_lensiam.simulate.sources import SourceRenderer, core_sersic_amp_for_unit_flux
from hpc_lensiam.simulate.torch_physics import core_sersic_unit_flux_amp, epl_series_terms, epl_shear_deflection
from hpc_lensiam.simulate.torch_priors import COSMOS, NONE
from hpc_lensiam.simulate.torch_render import TorchLensSimulator

# the prior's extremes: |e| at the corner, both slopes, shear and centre at their bounds
CORNERS = [
    dict(e1=0.5, e2=0.5, gamma=2.5, gamma1=0.12, gamma2=0.12, center_x=0.15, center_y=0.15),
    dict(e1=-0.5, e2=0.5, gamma=1.5, gamma1=-0.12, gamma2=0.12, center_x=-0.15, center_y=0.15),
    dict(e1=0.5, e2=-0.5, gamma=2.5, gamma1=0.12, gamma2=-0.12, center_x=0.15, center_y=-0.15),
    dict(e1=-0.5, e2=-0.5, gamma=1.5, gamma1=-0.12, gamma2=-0.12, center_x=-0.15, center_y=-0.15),
    dict(theta_E=1.8, e1=0.5, e2=0.5, gamma=1.5),
    dict(theta_E=0.8, e1=-0.5, e2=-0.5, gamma=2.5),
]


def _quiet(cls, *a, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return cls(*a, **kw)


@pytest.fixture(scope="module")
def ref():
    return _quiet(LensSimulator, SimulationConfig())


@pytest.fixture(scope="module")
def t64():
    return _quiet(TorchLensSimulator, SimulationConfig(), dtype=torch.float64)


@pytest.fixture(scope="module")
def t32():
    return _quiet(TorchLensSimulator, SimulationConfig(), dtype=torch.float32)


def _systems(n: int, seed: int) -> list[dict]:
    """Prior draws (the numpy sampler), the first ones pushed to the prior's corners."""
    cfg = SimulationConfig()
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        lens = priors.draw_lens(rng, cfg.lens)
        lens.update(CORNERS[i] if i < len(CORNERS) else {})
        ll = priors.draw_lens_light(rng, cfg.lens_light, lens, cfg.lens)
        src = priors.draw_source(rng, cfg.source, lens)
        src.pop("merger")
        out.append({"lens": lens, "ll": ll, "src": src, "psf": int(rng.integers(cfg.instrument.psf_bank_size))})
    return out


def _stack(dicts: list[dict], keys=None) -> dict:
    keys = keys or [k for k, v in dicts[0].items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
    return {k: torch.tensor([float(d[k]) for d in dicts], dtype=torch.float64) for k in keys}


def _compare(ref, sim, systems, kind: str, with_light: bool, with_psf: bool) -> float:
    """Max |torch - numpy| over a batch rendered in one call (images are max-normalised)."""
    lens = _stack([s["lens"] for s in systems], LENS_PARAMS)
    srcs = [dict(s["src"], kind=kind) for s in systems]
    src = {"kind": kind, **_stack(srcs)}
    ll = _stack([s["ll"] for s in systems]) if with_light else None
    psf = torch.tensor([s["psf"] for s in systems]) if with_psf else None
    got = sim.render(lens, src, lens_light=ll, psf=psf).cpu().numpy()
    assert got.shape == (len(systems), ref.num_pix, ref.num_pix)
    worst = 0.0
    for b, s in enumerate(systems):
        want = ref.render(
            s["lens"],
            dict(s["src"], kind=kind),
            lens_light=s["ll"] if with_light else None,
            psf=s["psf"] if with_psf else None,
        )
        assert want.max() == 1.0 and abs(got[b].max() - 1.0) < 1e-6
        worst = max(worst, float(np.abs(got[b] - want).max()))
    return worst


@pytest.mark.parametrize(
    "kind,with_light,with_psf", [("core_sersic", True, True), ("sersic", False, True), ("core_sersic", False, False)]
)
def test_float64_equals_lenstronomy_render(ref, t64, kind, with_light, with_psf):
    systems = _systems(7 if with_light else 4, seed=17)
    assert _compare(ref, t64, systems, kind, with_light, with_psf) < 1e-5


def test_float32_within_1e3_of_peak(ref, t32):
    systems = _systems(7, seed=18)
    assert _compare(ref, t32, systems, "core_sersic", True, True) < 1e-3


def test_merger_and_source_list_are_summed(ref, t64):
    s1, s2 = _systems(2, seed=3)
    first = dict(s1["src"], kind="core_sersic")
    second = dict(s2["src"], kind="sersic", center_x=0.2)
    want = ref.render(s1["lens"], [first, second], lens_light=s1["ll"], psf=1)
    got = t64.render(s1["lens"], [first, second], lens_light=s1["ll"], psf=1)[0].numpy()
    assert np.abs(got - want).max() < 1e-5
    merger = dict(first, merger=True, second=second)
    got_m = t64.render(s1["lens"], merger, lens_light=s1["ll"], psf=1)[0].numpy()
    assert np.abs(got_m - want).max() < 1e-5


def test_epl_series_terms_reach_the_stated_tolerance():
    """At the prior's corner (f = 0.707, t = 1.5) the chosen N meets tol; N - 1 does not."""
    f, t = math.hypot(0.5, 0.5), 1.5
    phi = np.linspace(0, np.pi, 997)
    terms = [np.exp(1j * phi)]
    for n in range(1, 2000):
        terms.append(terms[-1] * -f * (2 * n - (2 - t)) / (2 * n + (2 - t)) * np.exp(2j * phi))
    cums = np.cumsum(terms, axis=0)
    exact = cums[-1]
    for tol in (1e-6, 1e-10):
        n = epl_series_terms(f, (0.5, 1.5), tol)
        assert np.max(np.abs(cums[n - 1] - exact) / np.abs(exact)) <= tol * 1.01
        assert np.max(np.abs(cums[n - 2] - exact) / np.abs(exact)) > tol / 10
    assert epl_series_terms(f, (0.5, 1.5), 1e-6) < epl_series_terms(f, (0.5, 1.5), 1e-10)
    assert epl_series_terms(0.3, (0.5, 1.5), 1e-6) < epl_series_terms(f, (0.5, 1.5), 1e-6)


def test_deflection_matches_lenstronomy_lensmodel(ref):
    """EPL_NUMBA + SHEAR through lenstronomy's own LensModel (tol 1e-16) at the prior's corners."""
    x, y = ref.grid.x_arcsec[::5], ref.grid.y_arcsec[::5]  # every 5th point: ~10k, all of the field
    xt, yt = torch.as_tensor(x), torch.as_tensor(y)
    for corner in CORNERS:
        lens = {"theta_E": 1.3, **corner}
        lens = {k: lens.get(k, 0.0) for k in LENS_PARAMS}
        from hpc_lensiam.simulate.simulator import lens_kwargs

        bx, by = ref.lens_model.ray_shooting(x, y, lens_kwargs(lens))
        p = {k: torch.tensor([[float(lens[k])]], dtype=torch.float64) for k in LENS_PARAMS}
        ax, ay = epl_shear_deflection(xt, yt, n_terms=epl_series_terms(0.7072, (0.5, 1.5), 1e-12), **p)
        assert np.abs((xt - ax)[0].numpy() - bx).max() < 1e-9
        assert np.abs((yt - ay)[0].numpy() - by).max() < 1e-9


def test_unit_flux_amp_is_the_numpy_normalisation():
    """The sampler's source amplitude must follow the numpy sampler's (priors.py) normalisation."""
    renderer = _quiet(SourceRenderer)
    rng = np.random.default_rng(0)
    n = 20
    p = {
        "R_sersic": rng.uniform(0.08, 0.35, n),
        "n_sersic": rng.uniform(0.8, 4.0, n),
        "Rb": rng.uniform(0.01, 0.05, n),
        "gamma": rng.uniform(0.0, 0.5, n),
        "alpha": rng.uniform(2.0, 5.0, n),
    }
    got = core_sersic_unit_flux_amp(*(torch.as_tensor(p[k]) for k in ("R_sersic", "n_sersic", "Rb", "gamma", "alpha")))
    want = [
        core_sersic_amp_for_unit_flux(renderer, *(p[k][i] for k in ("R_sersic", "n_sersic", "Rb", "gamma", "alpha")))
        for i in range(n)
    ]
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-9)


def _numpy_draws(cfg, n: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    cols: dict[str, list] = {}
    for _ in range(n):
        lens = priors.draw_lens(rng, cfg.lens)
        ll = priors.draw_lens_light(rng, cfg.lens_light, lens, cfg.lens)
        src = priors.draw_source(rng, cfg.source, lens)
        row = {
            **{f"lens.{k}": v for k, v in lens.items()},
            **{f"ll.{k}": v for k, v in ll.items()},
            **{f"src.{k}": src[k] for k in ("R_sersic", "n_sersic", "e1", "e2", "Rb", "gamma", "alpha")},
            "src.dx": src["center_x"] - lens["center_x"],
            "src.merger": float(src["merger"]),
            "psf_id": float(rng.integers(cfg.instrument.psf_bank_size)),
            "noise_sigma": priors.uniform(rng, cfg.instrument.noise_sigma),
        }
        for k, v in row.items():
            cols.setdefault(k, []).append(v)
    return {k: np.asarray(v) for k, v in cols.items()}


def test_prior_marginals_match_the_numpy_sampler(t32):
    """Two-sample KS test per marginal: torch draws vs priors.py draws (4000 systems each)."""
    n = 4000
    theirs = _numpy_draws(t32.config, n, seed=5)
    p = t32.draw_params(n, torch.Generator().manual_seed(5), 1)
    lens, view = p["lens"], p["views"][0]
    first, second = view["source"]
    ours = {
        **{f"lens.{k}": v for k, v in lens.items()},
        **{f"ll.{k}": v for k, v in view["lens_light"].items()},
        **{f"src.{k}": first[k] for k in ("R_sersic", "n_sersic", "e1", "e2", "Rb", "gamma", "alpha")},
        "src.dx": first["center_x"] - lens["center_x"],
        "src.merger": first["merger"].float(),
        "psf_id": view["psf_id"].float(),
        "noise_sigma": view["noise_sigma"],
    }
    assert set(ours) == set(theirs)
    pvalues = {k: stats.ks_2samp(ours[k].double().numpy(), theirs[k]).pvalue for k in ours}
    assert min(pvalues.values()) > 1e-4, sorted(pvalues.items(), key=lambda kv: kv[1])[:3]
    # the merger partner: present in merger_fraction of systems, at the prior's offset and flux ratio
    has = (second["kind"] != NONE).numpy()
    assert np.array_equal(has, first["merger"].numpy())
    offset = torch.hypot(second["center_x"] - first["center_x"], second["center_y"] - first["center_y"])[has]
    assert offset.min() >= 0.1 - 1e-6 and offset.max() <= 0.4 + 1e-6
    assert stats.ks_2samp(second["flux_ratio"].numpy(), np.random.default_rng(1).uniform(0.3, 1.0, n)).pvalue > 1e-4


def test_sampled_pairs_are_what_lenstronomy_renders_from_their_records():
    """No-noise config: every sampled view equals LensSimulator.render of its params.json record."""
    cfg = simulation_config(instrument={"num_pix": 48, "noise_sigma": [0.0, 0.0]}, source={"merger_fraction": 0.5})
    ref = _quiet(LensSimulator, cfg)
    sim = _quiet(TorchLensSimulator, cfg, dtype=torch.float64, chunk_systems=3)
    out = sim.sample_pairs(6, torch.Generator().manual_seed(0))
    recs = sim.records(out["params"])
    assert len(recs) == 6 and any(r["views"][0]["source"]["merger"] for r in recs)
    for b, rec in enumerate(recs):
        assert rec["views"][0]["lens_light"]["amp"] > 0 and rec["views"][1]["psf_name"].startswith("builtin:")
        for v, name in enumerate(("view1", "view2")):
            view = rec["views"][v]
            want = ref.render(rec["lens"], view["source"], lens_light=view["lens_light"], psf=view["psf_id"])
            assert np.abs(out[name][b].numpy() - want).max() < 1e-5
    assert not torch.equal(out["view1"], out["view2"])


def test_pairs_share_the_mass_and_are_reproducible():
    t32 = _quiet(TorchLensSimulator, simulation_config(instrument={"num_pix": 48}))
    a = t32.sample_pairs(4, torch.Generator().manual_seed(7))
    b = t32.sample_pairs(4, torch.Generator().manual_seed(7))
    assert torch.equal(a["view1"], b["view1"]) and torch.equal(a["view2"], b["view2"])
    assert a["view1"].shape == (4, 48, 48) and a["view1"].dtype == torch.float32
    assert torch.allclose(a["view1"].amax(dim=(1, 2)), torch.ones(4))
    assert len(a["params"]["views"]) == 2  # one lens dict for both views: one ray-trace per pair
    single = t32.sample_singles(3, torch.Generator().manual_seed(7))
    assert single["image"].shape == (3, 48, 48) and len(single["params"]["views"]) == 1


def test_noise_is_gaussian_at_the_asked_sigma(t64):
    s = _systems(1, seed=9)[0]
    g = torch.Generator().manual_seed(0)
    clean = t64.render(s["lens"], dict(s["src"], kind="core_sersic"), psf=0)
    noisy = t64.render(s["lens"], dict(s["src"], kind="core_sersic"), psf=0, noise_sigma=0.05, generator=g)
    # corner pixels hold no light: what is there is noise of 0.05 x the clean peak, divided by the
    # noisy maximum (1 to ~1.2 x the clean peak), so its std is 0.042-0.05 (400 pixels: +-4%)
    assert float(clean[0, :20, :20].max()) < 1e-3
    assert 0.04 < float(noisy[0, :20, :20].std()) < 0.053


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(lens={"theta_E": 1.0, "bogus": 1}), "unknown key 'bogus'"),
        (dict(lens={"gamma": 2.0}), "theta_E"),
        (dict(source={"kind": "blob"}), "unknown source kind 'blob'"),
        (dict(source={"kind": "sersic", "n_sersic": 1.0}), "needs key 'R_sersic'"),
        (dict(psf=99), "out of range"),
        (dict(noise_sigma=0.1), "needs a generator"),
        (dict(lens={"theta_E": torch.ones(3), "gamma": torch.ones(2) * 2}), r"expected a float or a \(3,\) tensor"),
        (dict(source={"kind": "cosmos", "id": 1}), "needs cosmos_dir"),
        (dict(lens_light={"R_sersic": 1.0, "n_sersic": 4.0}), "'amp' or a 'peak_ratio'"),
    ],
)
def test_render_bad_input_raises_user_error(t32, kwargs, match):
    args = dict(lens={"theta_E": 1.0}, source={"kind": "sersic", "R_sersic": 0.2, "n_sersic": 1.0})
    args.update(kwargs)
    with pytest.raises(UserError, match=match):
        t32.render(**args)


# ------------------------------------------------------------------------------------------ COSMOS
@pytest.fixture(scope="module")
def cosmos_pair(cosmos_dir):
    cfg = SimulationConfig(cosmos_dir=str(cosmos_dir))
    return LensSimulator(cfg), TorchLensSimulator(cfg, dtype=torch.float64), TorchLensSimulator(cfg)


@pytest.mark.slow
def test_cosmos_stamps_match_lenstronomy_interpol(cosmos_pair):
    ref, t64, t32 = cosmos_pair
    systems = _systems(len(t64.stamp_rows), seed=23)
    for i, s in enumerate(systems):
        row = t64.stamp_rows[i % len(t64.stamp_rows)]
        scale = 0.03 * (0.5 + 0.5 * (i % 3) / 2)
        s["src"] = {
            "id": int(ref.catalog.ident[row]),
            "center_x": s["src"]["center_x"],
            "center_y": s["src"]["center_y"],
            "phi_G": 0.9 * i,
            "scale": scale,
            "amp": 1 / scale**2,
        }
    for sim, tol in ((t64, 1e-5), (t32, 1e-3)):
        lens = _stack([s["lens"] for s in systems], LENS_PARAMS)
        src = {
            "kind": "cosmos",
            "id": torch.tensor([s["src"]["id"] for s in systems]),
            **_stack([s["src"] for s in systems], ["center_x", "center_y", "phi_G", "scale", "amp"]),
        }
        got = sim.render(
            lens, src, lens_light=_stack([s["ll"] for s in systems]), psf=torch.tensor([s["psf"] for s in systems])
        ).numpy()
        for b, s in enumerate(systems):
            want = ref.render(s["lens"], dict(s["src"], kind="cosmos"), lens_light=s["ll"], psf=s["psf"])
            assert np.abs(got[b] - want).max() < tol


def test_cosmos_mix_sampled_and_rerendered(cosmos_pair, cosmos_dir):
    cfg = simulation_config(
        cosmos_dir=str(cosmos_dir),
        instrument={"num_pix": 48, "noise_sigma": [0.0, 0.0]},
        source={"merger_fraction": 0.5},
    )
    ref = LensSimulator(cfg)
    sim = TorchLensSimulator(cfg, dtype=torch.float64)
    out = sim.sample_singles(8, torch.Generator().manual_seed(2))
    first, second = out["params"]["views"][0]["source"]
    kinds = first["kind"].tolist()
    assert COSMOS in kinds
    both = (first["kind"] == COSMOS) & (second["kind"] == COSMOS)
    assert not bool((first["stamp"][both] == second["stamp"][both]).any())  # a merger pairs two galaxies
    for b, rec in enumerate(sim.records(out["params"])):
        view = rec["views"][0]
        want = ref.render(rec["lens"], view["source"], lens_light=view["lens_light"], psf=view["psf_id"])
        assert np.abs(out["image"][b].numpy() - want).max() < 1e-5


def test_cosmos_mix_fraction_and_uniform_stamps(cosmos_pair):
    """With a catalog, cosmos_fraction of the components are COSMOS, uniform over the accepted stamps."""
    _, _, t32 = cosmos_pair
    n = 4000
    first, second = t32.draw_params(n, torch.Generator().manual_seed(4), 1)["views"][0]["source"]
    is_cosmos = (first["kind"] == COSMOS).numpy()
    assert abs(is_cosmos.mean() - t32.config.source.cosmos_fraction) < 0.03
    counts = np.bincount(first["stamp"].numpy()[is_cosmos], minlength=len(t32.stamps))
    assert stats.chisquare(counts).pvalue > 1e-4
    scale = (first["scale"] / t32.stamps.pixel_scales_arcsec[first["stamp"]]).numpy()[is_cosmos]
    assert stats.ks_2samp(scale, np.random.default_rng(0).uniform(0.5, 1.0, 3000)).pvalue > 1e-4
