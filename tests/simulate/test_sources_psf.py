"""COSMOS real-galaxy catalog and PSF bank: real data when present, FITS files written here."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
from astropy.io import fits
from scipy.signal import fftconvolve

from hpc_lensiam.core.errors import UserError
from hpc_lensiam.simulate.config import InstrumentConfig, simulation_config
from hpc_lensiam.simulate.psf import PSFBank, convolve_same, fwhm_arcsec, resample_psf
from hpc_lensiam.simulate.simulator import LensSimulator
from hpc_lensiam.simulate.sources import CosmosCatalog


# ------------------------------------------------------------------------------------- helpers
def _moments(k: np.ndarray):
    """Centroid (row, col) and per-axis sigma, in pixels."""
    yy, xx = np.mgrid[: k.shape[0], : k.shape[1]]
    s = k.sum()
    cy, cx = (k * yy).sum() / s, (k * xx).sum() / s
    sy = math.sqrt((k * (yy - cy) ** 2).sum() / s)
    sx = math.sqrt((k * (xx - cx) ** 2).sum() / s)
    return cy, cx, sy, sx


def _check_kernel(k: np.ndarray, tol_pix: float = 0.25):
    assert k.ndim == 2 and k.shape[0] % 2 == 1 and k.shape[1] % 2 == 1
    assert abs(k.sum() - 1.0) < 1e-10
    c = k.shape[0] // 2
    # centred: the light centroid of the core sits on the centre pixel
    core = np.clip(k[c - 3 : c + 4, c - 3 : c + 4], 0, None)
    cy, cx, _, _ = _moments(core)
    assert abs(cy - 3) < tol_pix and abs(cx - 3) < tol_pix
    assert np.unravel_index(np.argmax(k), k.shape) == (c, c)


def _gauss(n: int, sigma_pix: float, cy: float | None = None, cx: float | None = None) -> np.ndarray:
    yy, xx = np.mgrid[:n, :n]
    cy = (n - 1) / 2 if cy is None else cy
    cx = (n - 1) / 2 if cx is None else cx
    return np.exp(-0.5 * ((yy - cy) ** 2 + (xx - cx) ** 2) / sigma_pix**2)


def _write(path, data, header=None):
    fits.PrimaryHDU(np.asarray(data, dtype=np.float32), header=header).writeto(path, overwrite=True)
    return str(path)


# ------------------------------------------------------------------------------------------ COSMOS
def test_cosmos_catalog_cuts_on_real_sample(cosmos_dir):
    cat = CosmosCatalog(cosmos_dir, min_size_pix=50, max_noise_frac=0.05)
    assert len(cat) == 10
    # the cuts, computed independently from the files
    table = fits.getdata(cosmos_dir / "real_galaxy_catalog_23.5.fits", 1)
    expected = []
    with fits.open(cosmos_dir / "real_galaxy_images_23.5_n1.fits") as hdul:
        for row, rec in enumerate(table):
            img = hdul[int(rec["GAL_HDU"])].data
            if min(img.shape) >= 50 and math.sqrt(rec["NOISE_VARIANCE"]) < 0.05 * img.max():
                expected.append(row)
    assert cat.accepted() == expected
    assert 0 < len(expected) < 10  # the sample has stamps below 50 px and noisy ones
    rng = np.random.default_rng(0)
    drawn = {cat.draw_row(rng) for _ in range(200)}
    assert drawn == set(expected)


def test_cosmos_sources_render_and_mix(cosmos_dir):
    sim = LensSimulator(simulation_config(cosmos_dir=str(cosmos_dir), instrument={"num_pix": 48}))
    ident = int(sim.catalog.ident[sim.catalog.accepted()[0]])
    img = sim.render(
        {"theta_E": 1.0, "gamma": 2.0},
        {"kind": "cosmos", "id": ident, "center_x": 0.05, "center_y": 0.0, "phi_G": 0.3, "scale": 0.02},
    )
    assert img.dtype == np.float32 and np.isfinite(img).all() and img.max() == 1.0
    rng = np.random.default_rng(1)
    kinds = []
    for _ in range(6):
        pair = sim.sample_pair(rng)
        assert np.isfinite(pair["view1"]).all() and pair["view2"].max() == 1.0
        kinds += [v["source"]["kind"] for v in pair["params"]["views"]]
    assert "cosmos" in kinds
    from hpc_lensiam.simulate.priors import draw_lens, draw_source

    lens = draw_lens(rng, sim.config.lens)
    srcs = [draw_source(rng, sim.config.source, lens, sim.catalog, sim.sources) for _ in range(400)]
    frac = np.mean([s["kind"] == "cosmos" for s in srcs])
    assert 0.68 < frac < 0.82  # paper: 75% COSMOS, 25% core-Sersic
    for s in srcs:
        if s["kind"] == "cosmos":
            assert sim.catalog.row_of(s["id"]) in sim.catalog.accepted()
            if s["merger"] and s["second"]["kind"] == "cosmos":
                assert s["second"]["id"] != s["id"]  # a merger of two different galaxies


def test_missing_cosmos_dir_and_catalog_raise_user_error(tmp_path):
    with pytest.raises(UserError, match="cosmos_dir"):
        LensSimulator(simulation_config(cosmos_dir=str(tmp_path / "nope")))
    with pytest.raises(UserError, match="real_galaxy_catalog"):
        CosmosCatalog(tmp_path)


def test_malformed_cosmos_catalog_raises_user_error(tmp_path):
    cols = [
        fits.Column(name="IDENT", format="K", array=np.array([1, 2])),
        fits.Column(name="GAL_HDU", format="K", array=np.array([0, 1])),
        fits.Column(name="PIXEL_SCALE", format="D", array=np.array([0.03, 0.03])),
        fits.Column(name="NOISE_VARIANCE", format="D", array=np.array([1e-6, 1e-6])),
    ]
    fits.BinTableHDU.from_columns(cols).writeto(tmp_path / "real_galaxy_catalog_23.5.fits")
    with pytest.raises(UserError, match="GAL_FILENAME"):
        CosmosCatalog(tmp_path)


def test_cosmos_catalog_written_here(tmp_path):
    """A tiny catalog in GalSim's layout: cuts by size and noise, images from a multi-HDU file."""
    rng = np.random.default_rng(0)
    stamps = [_gauss(60, 5.0), _gauss(40, 4.0), _gauss(64, 6.0) * 0.01]  # ok, too small, too noisy
    hdus = [fits.PrimaryHDU(stamps[0].astype(np.float32))] + [fits.ImageHDU(s.astype(np.float32)) for s in stamps[1:]]
    fits.HDUList(hdus).writeto(tmp_path / "real_galaxy_images_23.5_n1.fits")
    cols = [
        fits.Column(name="IDENT", format="K", array=np.array([10, 11, 12])),
        fits.Column(name="GAL_FILENAME", format="40A", array=np.array(["real_galaxy_images_23.5_n1.fits"] * 3)),
        fits.Column(name="GAL_HDU", format="K", array=np.array([0, 1, 2])),
        fits.Column(name="PIXEL_SCALE", format="D", array=np.array([0.03] * 3)),
        fits.Column(name="NOISE_VARIANCE", format="D", array=np.array([1e-4] * 3)),
    ]
    fits.BinTableHDU.from_columns(cols).writeto(tmp_path / "real_galaxy_catalog_23.5.fits")
    cat = CosmosCatalog(tmp_path)
    assert cat.accepted() == [0]
    assert {cat.draw_row(rng) for _ in range(20)} == {0}
    # a catalog where no stamp passes the cuts is reported on construction
    with pytest.raises(UserError, match="passes the cuts"):
        CosmosCatalog(tmp_path, min_size_pix=100)
    # a catalog whose image file is missing is reported on construction
    (tmp_path / "real_galaxy_images_23.5_n1.fits").unlink()
    with pytest.raises(UserError, match="GAL_FILENAME"):
        CosmosCatalog(tmp_path)


# --------------------------------------------------------------------------------------------- PSF
def test_supersampled_gaussian_resampled_width_and_centre(tmp_path):
    """sigma = 0.1" at 0.01"/px, resampled to 0.05"/px: sigma^2 = (2 px)^2 + 1/12 (pixel box)."""
    path = _write(tmp_path / "g.fits", _gauss(201, 10.0))
    bank = PSFBank.from_files([path], pixel_scale_arcsec=0.05, size_pix=21, file_pixel_scale_arcsec=0.01)
    assert len(bank) == 1
    k = bank.kernels[0]
    _check_kernel(k)
    assert k.shape == (21, 21)
    cy, cx, sy, sx = _moments(k)
    expected = math.sqrt(2.0**2 + 1 / 12)
    assert abs(sy - expected) < 0.03 * expected and abs(sx - expected) < 0.03 * expected
    assert abs(cy - 10) < 1e-6 and abs(cx - 10) < 1e-6


def test_off_centre_psf_is_recentred_and_header_scale_used(tmp_path):
    header = fits.Header()
    header["PIXSCALE"] = 0.025
    path = _write(tmp_path / "off.fits", _gauss(81, 3.0, cy=37.3, cx=44.6), header)
    bank = PSFBank.from_files([path], pixel_scale_arcsec=0.05, size_pix=15)  # scale from the header
    k = bank.kernels[0]
    _check_kernel(k, tol_pix=0.05)
    _, _, sy, _ = _moments(k)
    assert abs(sy - math.sqrt(1.5**2 + 1 / 12)) < 0.05


def test_psf_cube_gives_one_kernel_per_plane(tmp_path):
    cube = np.stack([_gauss(101, s) for s in (6.0, 8.0, 10.0)])
    path = _write(tmp_path / "cube.fits", cube)
    bank = PSFBank.from_files([path], pixel_scale_arcsec=0.05, size_pix=21, file_pixel_scale_arcsec=0.01)
    assert len(bank) == 3 and bank.names[2] == "cube.fits[2]"
    widths = []
    for k in bank.kernels:
        _check_kernel(k)
        widths.append(_moments(k)[2])
    assert widths[0] < widths[1] < widths[2]
    # through the config, as the writer uses it
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        sim = LensSimulator(
            simulation_config(psf_files=[path], psf_pixel_scale_arcsec=0.01, instrument={"num_pix": 32})
        )
    assert len(sim.psf_bank) == 3
    pair = sim.sample_pair(np.random.default_rng(0))
    assert all(0 <= v["psf_id"] < 3 for v in pair["params"]["views"])


def test_real_hst_psf_files(hst_psf_dir):
    emp = PSFBank.from_files(
        [str(hst_psf_dir / "emp_psf_f814w.fits")], pixel_scale_arcsec=0.05, size_pix=21, file_pixel_scale_arcsec=0.01
    )  # 4x supersampled 0.04"/px
    assert len(emp) == 56
    for k in emp.kernels[::11]:
        _check_kernel(k)
        assert 0.06 < fwhm_arcsec(k, 0.05) < 0.14
    single = PSFBank.from_files(
        [str(hst_psf_dir / "psf_101.fits")], pixel_scale_arcsec=0.05, size_pix=21, file_pixel_scale_arcsec=0.04
    )
    assert len(single) == 1
    _check_kernel(single.kernels[0])


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda p: str(p / "absent.fits"), "not found"),
        (lambda p: _write(p / "line.fits", np.ones(11)), "1 dimensions"),
        (lambda p: _write(p / "four.fits", np.ones((2, 2, 5, 5))), "4 dimensions"),
        (lambda p: _write(p / "neg.fits", -_gauss(21, 2.0)), "positive"),
        (lambda p: _write(p / "zero.fits", np.zeros((21, 21))), "positive"),
        (lambda p: (fits.PrimaryHDU().writeto(p / "empty.fits"), str(p / "empty.fits"))[1], "no image data"),
        (lambda p: ((p / "text.fits").write_text("not a fits file\n" * 10), str(p / "text.fits"))[1], "FITS"),
    ],
)
def test_bad_psf_file_raises_user_error(tmp_path, make, match):
    path = make(tmp_path)
    with pytest.raises(UserError, match=match):
        PSFBank.from_files([path], pixel_scale_arcsec=0.05, size_pix=21, file_pixel_scale_arcsec=0.01)


def test_psf_without_pixel_scale_raises_user_error(tmp_path):
    path = _write(tmp_path / "g.fits", _gauss(41, 3.0))
    with pytest.raises(UserError, match="psf_pixel_scale_arcsec"):
        PSFBank.from_files([path], pixel_scale_arcsec=0.05, size_pix=21)


@pytest.mark.parametrize("preset, lo, hi", [("hst", 0.08, 0.10), ("euclid", 0.15, 0.20)])
def test_builtin_psf_fwhm(preset, lo, hi):
    inst = simulation_config(preset=preset).instrument
    bank = PSFBank.builtin(inst, seed=0)
    assert len(bank) == inst.psf_bank_size
    for k in bank.kernels:
        _check_kernel(k, tol_pix=0.3)
        assert k.shape == (inst.psf_size_pix, inst.psf_size_pix)
        assert lo <= fwhm_arcsec(k, inst.pixel_scale_arcsec) <= hi
    # aberrations differ between PSFs; the bank is reproducible from its seed
    assert not np.allclose(bank.kernels[0], bank.kernels[1])
    again = PSFBank.builtin(inst, seed=0)
    assert all(np.array_equal(a, b) for a, b in zip(bank.kernels, again.kernels))


def test_builtin_psf_scales_with_wavelength_over_aperture():
    """Diffraction: FWHM grows with lambda / D (no detector blur, 4x finer pixels to resolve it)."""
    base = dict(
        pixel_scale_arcsec=0.0125,
        psf_size_pix=41,
        psf_bank_size=1,
        aberration_rms_waves=0.0,
        detector_blur_sigma_pix=0.0,
    )
    w = [
        fwhm_arcsec(PSFBank.builtin(InstrumentConfig(**base, aperture_diameter_m=d), 0).kernels[0], 0.0125, 6)
        for d in (2.4, 1.2)
    ]
    lam_over_d = 814e-9 / 2.4 * 206265
    assert 0.9 * lam_over_d < w[0] < 1.2 * lam_over_d  # Airy core FWHM ~1.03 lambda/D (+ pixel)
    assert 1.8 < w[1] / w[0] < 2.2


def test_convolve_same_matches_scipy():
    rng = np.random.default_rng(0)
    img = rng.random((37, 37))
    k = _gauss(9, 1.3)
    k /= k.sum()
    assert np.allclose(convolve_same(img, k), fftconvolve(img, k, mode="same"), atol=1e-12)


def test_resample_rejects_bad_arrays():
    with pytest.raises(UserError):
        resample_psf(np.zeros((0, 0)), 0.01, 0.05, 21)
    with pytest.raises(UserError):
        resample_psf(-np.ones((5, 5)), 0.01, 0.05, 21)


def test_bad_psf_in_config_fails_at_construction(tmp_path):
    with pytest.raises(UserError, match="not found"):
        LensSimulator(simulation_config(psf_files=[str(tmp_path / "missing.fits")], psf_pixel_scale_arcsec=0.01))


def test_render_user_stamp_as_cosmos_source():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        sim = LensSimulator(simulation_config(instrument={"num_pix": 32}))
    stamp = _gauss(60, 6.0)
    img = sim.render({"theta_E": 0.6}, {"kind": "cosmos", "image": stamp, "pixel_scale": 0.03, "center_x": 0.02})
    assert img.dtype == np.float32 and np.isfinite(img).all() and img.max() == 1.0
