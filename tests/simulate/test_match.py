"""simulate --match FILE / --preset hst-f140w (issue 28): a real image's instrument, in its units.

Acceptance (issue 28): on each shared HST lens file the simulated images have the file's pixel
scale (to 1e-6), the PSF FWHM of the file's kernel (every kernel of the bank within 5%) and its
background noise (within 10% of ``background_rms``, measured in source-free pixels of a rendering).
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

import support
from hpc_lensiam.core.errors import UserError
from support import only_error_line

REAL = support.SHARED_DATA / "real_lenses"
EUCLID = support.SHARED_DATA / "euclid_q1" / "102020532_NEG589257492489565961.fits"
HST_FILES = (
    sorted((REAL / "desi_hst").glob("DESIJ*_F140W.h5"))
    + sorted((REAL / "desj0408_hst").glob("data_*.hdf5"))
    + sorted((REAL / "dolphin_hst").glob("**/image_*.h5"))
)
FWHM_TOL = 0.05
NOISE_TOL = 0.10


def _needs(path: Path):
    if not path.is_file():
        pytest.skip(f"shared data not present at {path}")


def _cli(*args, ranks: int = 0):
    cmd = [str(support.BIN / "hpc-lensiam"), *map(str, args)]
    if ranks:
        cmd = [str(support.BIN / "mpiexec"), "-n", str(ranks), *cmd]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600)


def _samples(out: Path) -> list[dict]:
    """Every sample of a shard set (params, image), through the package's one sample reader."""
    from hpc_lensiam.shards.reader import iter_samples

    return list(iter_samples(out))


# ----------------------------------------------------------------------------------- physics units
def test_sersic_total_flux_matches_the_profile_integral():
    """The analytic total of lenstronomy's Sersic: a radial integral of its own profile, and (the
    elliptical radius keeps the area) the same total for an elliptical one."""
    from lenstronomy.LightModel.Profiles.sersic import Sersic, SersicElliptic
    from scipy.integrate import quad

    from hpc_lensiam.simulate.match import sersic_total_flux

    prof = Sersic()
    for r, n in ((0.3, 4.0), (1.5, 1.0), (0.8, 2.5)):

        def ring(t, r=r, n=n):
            return 2 * np.pi * t * prof.function(t, 0.0, amp=2.0, R_sersic=r, n_sersic=n)

        radial = quad(ring, 0, np.inf)
        assert sersic_total_flux(2.0, r, n) == pytest.approx(radial[0], rel=1e-4)
    ell, d = SersicElliptic(), 0.02
    x, y = np.meshgrid((np.arange(2000) - 999.5) * d, (np.arange(2000) - 999.5) * d)
    round_, flat = (ell.function(x, y, amp=1.0, R_sersic=1.0, n_sersic=1.0, e1=e, e2=0.0).sum() for e in (0.0, 0.3))
    assert flat == pytest.approx(round_, rel=1e-3) and round_ * d * d == pytest.approx(
        sersic_total_flux(1.0, 1.0, 1.0), rel=1e-3
    )


def test_correlated_noise_has_the_asked_neighbour_correlation_and_rms():
    from hpc_lensiam.simulate.match import background_noise, neighbour_correlation

    rng = np.random.default_rng(1)
    for rho in (0.0, 0.28, 0.5):
        noise = background_noise(rng, (400, 400), 0.02, rho)
        assert noise.std() == pytest.approx(0.02, rel=0.02)
        assert neighbour_correlation(noise) == pytest.approx(rho, abs=0.01)


def test_preset_hst_f140w_without_the_file_renders_its_magnitudes_in_e_per_s():
    """The stored preset needs no shared data; a lens light of magnitude m gives 10^(-0.4 (m - ZP)) e-/s."""
    from hpc_lensiam.simulate.families import resolve_family
    from hpc_lensiam.simulate.match import mag_to_e_per_s
    from hpc_lensiam.simulate.psf import fwhm_arcsec

    cfg, make = resolve_family("paper", "single", preset="hst-f140w", match={"num_pix": 160})
    assert cfg.instrument.pixel_scale_arcsec == 0.08 and cfg.instrument.num_pix == 160
    assert cfg.lens.theta_E_arcsec == (0.5, 3.5) and cfg.zero_point_mag == 26.45
    assert cfg.instrument.num_pix * 0.08 / 2 >= 3.3 + 2 * 0.12  # arcs at 3.3" stay inside the field
    sim = make(cfg)
    assert fwhm_arcsec(sim.psf_bank.kernels[0], 0.08) == pytest.approx(0.123, abs=0.003)  # F140W + pixel
    comp = {"R_sersic": 0.3, "n_sersic": 4.0, "e1": 0.1, "e2": 0.0, "center_x": 0.0, "center_y": 0.0}
    flux_image = sim._lens_light_unit(comp) * sim.grid.pixel_area_arcsec2
    from hpc_lensiam.simulate.match import sersic_total_flux

    amp = mag_to_e_per_s(19.0, 26.45) / sersic_total_flux(1.0, 0.3, 4.0)
    assert (amp * flux_image).sum() == pytest.approx(mag_to_e_per_s(19.0, 26.45), rel=0.03)
    s = sim.sample_single(np.random.default_rng(3))
    view = s["params"]["views"][0]
    assert len(view["lens_light"]["components"]) == 2 and 17.0 <= view["lens_light"]["mag"] <= 20.0
    assert s["image"].shape == (160, 160) and s["image"].max() == 1.0 and view["flux_units"] == "e-/s"


# ------------------------------------------------------------------------------ acceptance (shared)
@pytest.mark.parametrize("path", HST_FILES, ids=lambda p: p.name)
def test_match_gives_the_files_pixel_scale_psf_and_noise(path, tmp_path):
    from hpc_lensiam.simulate.families import resolve_family
    from hpc_lensiam.simulate.match import central_flux_e_per_s, read_instrument
    from hpc_lensiam.simulate.psf import fwhm_arcsec
    from hpc_lensiam.simulate.writer import simulate_shards

    real = read_instrument(str(path))
    manifest = simulate_shards(tmp_path / "ds", 2, mode="single", seed=1, match={"file": str(path)}, progress=False)
    inst = manifest["config"]["instrument"]
    assert inst["pixel_scale_arcsec"] == pytest.approx(real.pixel_scale_arcsec, rel=1e-6)
    assert manifest["image_shape"] == [max(real.shape)] * 2
    assert manifest["matched"]["file"] == str(path.resolve())
    assert manifest["inputs"]["match_file"][str(path.resolve())]  # sha256 recorded
    cfg, make = resolve_family("paper", "single", match={"file": str(path)})
    sim = make(cfg)
    scale = real.pixel_scale_arcsec
    fwhm_real = fwhm_arcsec(real.psf_kernel, scale)
    for sample in _samples(tmp_path / "ds"):
        view = sample["params"]["views"][0]
        fwhm_used = fwhm_arcsec(sim.psf_bank.kernels[view["psf_id"]], scale)
        assert abs(fwhm_used / fwhm_real - 1) <= FWHM_TOL, (fwhm_used, fwhm_real)
        assert np.isfinite(sample["image"]).all() and sample["image"].max() == 1.0
    bank = [fwhm_arcsec(k, scale) for k in sim.psf_bank.kernels]  # a bank around the file's PSF, not copies
    assert bank[0] == pytest.approx(fwhm_real, rel=1e-4) and max(bank) > 1.01 * fwhm_real
    assert all(abs(f / fwhm_real - 1) <= FWHM_TOL for f in bank)
    # a point source through the simulator's own convolution has the file's FWHM
    delta = np.zeros(sim.grid.shape)
    delta[sim.num_pix // 2, sim.num_pix // 2] = 1.0
    assert fwhm_arcsec(sim.psf_bank.convolve(delta, 0), scale) == pytest.approx(fwhm_real, rel=1e-4)
    # noise, for a lens as bright as this one: background_rms in the faintest quarter of the pixels (the
    # lens light's wings add a little Poisson noise there: within NOISE_TOL), and background + Poisson
    # everywhere (whitened std 1)
    rng = np.random.default_rng(5)
    lens = {"theta_E": 1.2, "gamma": 2.0, "e1": 0.1, "e2": 0.0, "center_x": 0, "center_y": 0}
    lens.update(gamma1=0.0, gamma2=0.0)
    view = sim._draw_view_nuisance(rng, lens)
    real_flux = central_flux_e_per_s(real.image, scale, 0.3 * max(real.shape) * scale)  # this lens's brightness
    for comp in view["lens_light"]["components"]:
        comp["amp"] *= real_flux / sum(c["flux_e_per_s"] for c in view["lens_light"]["components"])
    clean = sim._physical_image(*sim.ray_shoot(lens), view, lens)
    noise = sim.add_noise(clean, rng) - clean
    quiet = clean <= np.quantile(clean, 0.25)
    assert noise[quiet].std() == pytest.approx(real.background_rms_e_per_s, rel=NOISE_TOL)
    t = cfg.noise.exposure_time_s
    var = real.background_rms_e_per_s**2 + (np.clip(clean, 0, None) / t if t else 0.0)
    assert (noise / np.sqrt(var)).std() == pytest.approx(1.0, abs=0.03)


def test_match_euclid_fits_takes_its_psf_hdu_zero_point_and_correlated_noise(tmp_path):
    _needs(EUCLID)
    from hpc_lensiam.simulate.families import resolve_family
    from hpc_lensiam.simulate.match import neighbour_correlation
    from hpc_lensiam.simulate.psf import fwhm_arcsec

    cfg, make = resolve_family("paper", "single", match={"file": str(EUCLID), "correlated_noise_rho": 0.28})
    assert cfg.instrument.pixel_scale_arcsec == pytest.approx(0.1, rel=1e-6) and cfg.zero_point_mag == 24.6
    assert cfg.match_psf_file.endswith("[VIS_PSF]") and cfg.noise.exposure_time_s is None
    sim = make(cfg)
    assert fwhm_arcsec(sim.psf_bank.kernels[0], 0.1) == pytest.approx(0.207, abs=0.01)  # the real VIS PSF
    noise = sim.add_noise(np.zeros(sim.grid.shape), np.random.default_rng(0))
    assert neighbour_correlation(noise) == pytest.approx(0.28, abs=0.02)
    assert noise.std() == pytest.approx(cfg.noise.background_rms_e_per_s, rel=0.03)


# --------------------------------------------------------------------------- CLI, MPI, provenance
def _copy_desi(tmp_path: Path) -> Path:
    src = REAL / "desi_hst" / "DESIJ0201-2739_F140W.h5"
    _needs(src)
    d = tmp_path / "in"
    d.mkdir()
    shutil.copy(src, d / src.name)
    shutil.copy(REAL / "desi_hst" / "psf_F140W.h5", d / "psf_F140W.h5")
    return d / src.name


@pytest.mark.slow
def test_match_same_bytes_for_one_and_two_ranks_and_an_edited_file_is_refused(tmp_path):
    path = _copy_desi(tmp_path)
    args = ["--pairs", 5, "--shard-size", 2, "--samples", "pairs", "--seed", 3, "--match", path, "--num-pix", 64]
    one, two = tmp_path / "one", tmp_path / "two"
    for out, ranks in ((one, 0), (two, 2)):
        proc = _cli("simulate", "--out", out, *args, ranks=ranks)
        assert proc.returncode == 0, proc.stderr[-2000:]
    shards = sorted(p.name for p in one.glob("shard-*.tar"))
    assert len(shards) == 3 and shards == sorted(p.name for p in two.glob("shard-*.tar"))
    assert all((one / s).read_bytes() == (two / s).read_bytes() for s in shards)
    import h5py

    with h5py.File(path, "r+") as f:  # an edited image (same noise, PSF): the inputs' sha256 differ
        f["image_data"][0, 0] = f["image_data"][0, 0] + 1.0
    (one / shards[-1]).unlink()
    proc = _cli("simulate", "--out", one, *args)
    assert proc.returncode == 2 and "other input files" in proc.stderr and path.name in proc.stderr, proc.stderr
    assert not (one / shards[-1]).exists()


def _h5(path: Path, **datasets):
    import h5py

    with h5py.File(path, "w") as f:
        for k, v in datasets.items():
            f[k] = v
    return path


@pytest.mark.parametrize("case", ["no_image", "no_psf", "psf_sum", "no_rms"])
def test_bad_match_file_is_one_error_line_before_rendering(case, tmp_path):
    img = np.random.default_rng(0).normal(0, 0.01, (40, 40))
    t = np.array([[-0.08, 0], [0, 0.08]])
    kernel = np.outer(*(2 * [np.exp(-0.5 * (np.arange(-5, 6) / 1.2) ** 2)]))
    kernel /= kernel.sum()
    data = {"image_data": img, "transform_pix2angle": t, "background_rms": 0.01, "exposure_time": 400.0}
    want = {"no_image": "no 'image_data'", "no_psf": "no PSF found", "psf_sum": "PSF sums to 0.5", "no_rms": "noise"}
    if case == "no_image":
        data.pop("image_data")
    if case == "no_rms":
        data.pop("background_rms")
    path = _h5(tmp_path / "cut.h5", **data)
    if case != "no_psf":
        _h5(tmp_path / "psf_cut.h5", kernel_point_source=kernel * (0.5 if case == "psf_sum" else 1.0))
    with pytest.raises(UserError, match=want[case]):
        from hpc_lensiam.simulate.families import resolve_family

        resolve_family("paper", "single", match={"file": str(path)})
    out = tmp_path / "out"
    proc = _cli("simulate", "--out", out, "--pairs", 1, "--match", path)
    line = only_error_line(proc)
    assert "cut.h5" in line and want[case] in line
    assert not out.exists() or not any(out.iterdir())


def test_match_flags_need_a_matched_instrument():
    from hpc_lensiam.simulate.families import resolve_family

    with pytest.raises(UserError, match="need --match FILE"):
        resolve_family("paper", "single", match={"correlated_noise_rho": 0.2})
    with pytest.raises(UserError, match="paper family only"):
        resolve_family("survey", "single", preset="hst-f140w")
    with pytest.raises(Exception, match="correlated_noise_rho"):
        resolve_family("paper", "single", preset="hst-f140w", match={"correlated_noise_rho": 0.9})


def test_preset_hst_f140w_holds_the_desi_hst_files_numbers():
    """The stored preset is the DESI-HST F140W files' instrument: their PSF (FWHM within 1%), pixel scale,
    background RMS and exposure within the files' ranges, a field that holds their arcs."""
    files = sorted((REAL / "desi_hst").glob("DESIJ*_F140W.h5"))
    if not files:
        pytest.skip(f"shared data not present at {REAL / 'desi_hst'}")
    from hpc_lensiam.simulate.families import resolve_family
    from hpc_lensiam.simulate.match import read_instrument
    from hpc_lensiam.simulate.psf import fwhm_arcsec

    real = [read_instrument(str(f)) for f in files]
    cfg, make = resolve_family("paper", "single", preset="hst-f140w")
    assert all(r.pixel_scale_arcsec == pytest.approx(cfg.instrument.pixel_scale_arcsec, rel=1e-6) for r in real)
    rms = [r.background_rms_e_per_s for r in real]
    assert min(rms) <= cfg.noise.background_rms_e_per_s <= max(rms)
    assert cfg.noise.background_rms_e_per_s == pytest.approx(float(np.median(rms)), rel=0.03)
    exposure = [r.exposure_time_s for r in real]
    assert min(exposure) <= cfg.noise.exposure_time_s <= max(exposure)
    stored = make(cfg).psf_bank.kernels[0]
    assert fwhm_arcsec(stored, 0.08) == pytest.approx(fwhm_arcsec(real[0].psf_kernel, 0.08), rel=0.01)
    assert min(r.shape[0] for r in real) <= cfg.instrument.num_pix <= max(r.shape[0] for r in real)
