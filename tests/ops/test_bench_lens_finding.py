"""bench/lens_finding.py: lens finding on another team's simulations (an images.npy + params.csv set)
and on display PNGs, end to end on tiny sets; its parsing and statistics; the lsst survey preset."""

from __future__ import annotations

import csv
import json
import subprocess
import sys

import numpy as np
import pytest

import support
from bench import lens_finding as lf
from hpc_lensiam.core.errors import UserError

pytestmark = pytest.mark.timeout(900)
SLSIM = support.SHARED_DATA / "slsim"


def _write_eval(d, images, is_lens, band="LSST-i", scale=0.2, extra=None):
    d.mkdir(parents=True, exist_ok=True)
    np.save(d / "images.npy", np.asarray(images, np.float32))
    with open(d / "params.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["idx", "is_lens", "theta_E", "pixel_scale", "band", "num_pix"])
        for i, y in enumerate(is_lens):
            w.writerow([i, y, 0.7 * y, scale, band, np.shape(images)[1]])
    return d


# ----------------------------------------------------------------------------------- parsing
def test_parse_set_nests_yaml_values_and_refuses_malformed_items():
    got = lf.parse_set(
        ["selection.min_theta_E_fwhm=0.5", "population.z_lens=[0.1, 1.5]", "selection.max_deflector_mag=null"]
    )
    assert got == {
        "selection": {"min_theta_E_fwhm": 0.5, "max_deflector_mag": None},
        "population": {"z_lens": [0.1, 1.5]},
    }
    for bad in ("selection.min_theta_E_fwhm", "=3", "a..b=1", "x=[1, "):
        with pytest.raises(UserError, match="--set"):
            lf.parse_set([bad])


def test_band_chooses_the_preset_case_insensitively():
    assert lf.preset_for_band("LSST-i", "p") == "lsst" and lf.preset_for_band("euclid-vis", "p") == "euclid"
    with pytest.raises(UserError, match="band 'HSC-i' has no survey preset"):
        lf.preset_for_band("HSC-i", "p")


def test_read_eval_dir_checks_the_stack_and_the_table(tmp_path):
    img = np.zeros((4, 16, 16))
    ev = lf.read_eval_dir(_write_eval(tmp_path / "ok", img, [1, 1, 0, 0]))
    assert (ev.preset, ev.num_pix, ev.pixel_scale, ev.is_lens) == ("lsst", 16, 0.2, [1, 1, 0, 0])
    with pytest.raises(UserError, match="images.npy not found"):
        lf.read_eval_dir(tmp_path / "none")
    with pytest.raises(UserError, match="both classes"):
        lf.read_eval_dir(_write_eval(tmp_path / "one", img, [1, 1, 1, 1]))
    with pytest.raises(UserError, match="4 rows but images.npy holds 3"):
        d = _write_eval(tmp_path / "n", img, [1, 1, 0, 0])
        np.save(d / "images.npy", img[:3])
        lf.read_eval_dir(d)
    with pytest.raises(UserError, match="square images"):
        lf.read_eval_dir(_write_eval(tmp_path / "sq", np.zeros((4, 16, 12)), [1, 1, 0, 0]))
    d = _write_eval(tmp_path / "mixed", img, [1, 1, 0, 0])
    text = (d / "params.csv").read_text().replace("LSST-i", "Euclid-VIS", 1)
    (d / "params.csv").write_text(text)
    with pytest.raises(UserError, match="one pixel_scale and one band"):
        lf.read_eval_dir(d)


def test_survey_config_of_the_eval_grid_with_changes_validated(tmp_path):
    ev = lf.read_eval_dir(_write_eval(tmp_path / "e", np.zeros((2, 100, 100)), [1, 0], "Euclid-VIS", 0.101))
    cfg = lf.survey_yaml(ev, lf.parse_set(["selection.min_theta_E_fwhm=0.5"]))
    assert cfg["preset"] == "euclid" and cfg["instrument"] == {"num_pix": 100, "pixel_scale_arcsec": 0.101}
    assert cfg["selection"] == {"min_theta_E_fwhm": 0.5}
    with pytest.raises(UserError, match="min_theta_E_fwhm"):
        lf.survey_yaml(ev, lf.parse_set(["selection.min_theta_E_fwhm=99"]))
    with pytest.raises(UserError, match="--set"):
        lf.survey_yaml(ev, lf.parse_set(["selection.no_such_cut=1"]))


# -------------------------------------------------------------------------------- statistics
def test_threshold_at_fpr_one_percent_and_rates_there():
    neg = np.arange(200.0)  # 200 non-lenses: FPR 1e-2 lets the top 2 through
    pos = np.array([150.0, 197.5, 198.5, 500.0])
    y = np.r_[np.zeros(200), np.ones(4)]
    s = np.r_[neg, pos]
    t = lf.threshold_at_fpr(y, s)
    assert t == 197.0
    r = lf.at_threshold(y, s, t)
    assert r["fpr"] == 2 / 200 and r["recall"] == 3 / 4
    assert r["recall_ci95"][0] < 0.75 < r["recall_ci95"][1] and r["fpr_ci95"][0] < 0.01 < r["fpr_ci95"][1]
    assert lf.threshold_at_fpr(y[:50], s[:50]) == 49.0  # 50 non-lenses: no false positive allowed


def test_gap_is_zero_for_the_same_scores_and_positive_for_a_worse_set():
    rng = np.random.default_rng(1)
    y = np.r_[np.ones(300), np.zeros(300)].astype(int)
    good = rng.normal(size=600) + 3 * y
    g = lf.gap((y, good), (y, good), n_boot=200)
    assert g["auc"]["sim_minus_eval"] == 0 and g["auc"]["ci95"][0] < 0 < g["auc"]["ci95"][1]
    g = lf.gap((y, good), (y, rng.normal(size=600) + 0.5 * y), n_boot=200)
    assert g["auc"]["ci95"][0] > 0.1 and g["tpr_at_fpr_0.01"]["sim_minus_eval"] > 0.3


# ----------------------------------------------------------------------------- the lsst preset
def test_lsst_preset_psf_and_noise_are_lenstronomys_lsst_i():
    """The lsst survey preset: 0.2"/px, a 0.71" FWHM PSF (lenstronomy's LSST i seeing, as the slsim set's
    Gaussian), the 10-year i-band coadd's sky, zero point and exposure from lenstronomy's config."""
    from lenstronomy.SimulationAPI.ObservationConfig.LSST import LSST

    from hpc_lensiam.simulate.psf import PSFBank, fwhm_arcsec, nyquist_oversampling
    from hpc_lensiam.simulate.survey.config import survey_config
    from hpc_lensiam.simulate.survey.noise import observation_kwargs

    for preset in ("euclid", "hst"):  # their banks keep the 5x oversampling (unchanged kernels)
        i = survey_config(preset).instrument
        assert nyquist_oversampling(i.aperture_diameter_m, i.wavelength_nm, i.pixel_scale_arcsec) == 5
    cfg = survey_config("lsst")
    inst = cfg.instrument
    # lambda / 2D at 755 nm, 8.36 m is 0.0093": 0.2" / 23 = 0.0087" samples it, 0.2" / 21 would not
    assert nyquist_oversampling(inst.aperture_diameter_m, inst.wavelength_nm, inst.pixel_scale_arcsec) == 23
    assert (inst.num_pix, inst.pixel_scale_arcsec) == (64, 0.2)
    bank = PSFBank.builtin(inst, 0)
    fw = [fwhm_arcsec(k, inst.pixel_scale_arcsec) for k in bank.kernels]
    assert np.median(fw) == pytest.approx(0.71, abs=0.01) and np.ptp(fw) < 0.01
    kw, ref = observation_kwargs("lsst", 0.2, cfg.observation), LSST(band="i", coadd_years=10).kwargs_single_band()
    for k in ("exposure_time", "num_exposures", "sky_brightness", "magnitude_zero_point", "read_noise"):
        assert kw[k] == ref[k], k
    # the paper family has no lsst preset: one error line
    r = subprocess.run(
        [sys.executable, "-m", "hpc_lensiam", "simulate", "--preset", "lsst", "--pairs", "1", "--out", "x"],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "lsst" in r.stderr, r.stderr


# ------------------------------------------------------------------------------------ end to end
@pytest.fixture(scope="module")
def tiny_eval(tmp_path_factory):
    """16 survey images (lsst, 32 px) in counts, as another team would hand them over: images.npy
    (N, H, W) not normalised, params.csv with idx, is_lens, pixel_scale, band."""
    from hpc_lensiam.shards.reader import iter_samples
    from hpc_lensiam.simulate.writer import simulate_shards

    root = tmp_path_factory.mktemp("lensfind")
    simulate_shards(
        out_dir=str(root / "shards"),
        num_samples=16,
        shard_size=16,
        mode="single",
        preset="lsst",
        seed=7,
        family="survey",
        overrides={"instrument": {"num_pix": 32, "supersampling_factor": 1}},
        progress=False,
    )
    samples = list(iter_samples(root / "shards"))
    imgs = [s["image"] * s["params"]["views"][0]["image_max_cps"] for s in samples]
    y = [int(s["params"]["is_lens"]) for s in samples]
    assert 0 < sum(y) < len(y)
    return _write_eval(root / "eval", imgs, y)


def _bench(*args, cwd=support.REPO):
    return subprocess.run(
        [sys.executable, "-m", "bench.lens_finding", *map(str, args)], capture_output=True, text=True, cwd=cwd
    )


@pytest.mark.slow  # the bench's whole chain in subprocesses (~26 s): an end-to-end run
def test_eval_end_to_end_scores_every_image_and_resumes(tiny_eval, tmp_path):
    out = tmp_path / "out"
    args = ["--eval", tiny_eval, "--out", out, "--n-train", 24, "--n-test", 12, "--epochs", 1,
            "--set", "instrument.supersampling_factor=1"]  # fmt: skip
    r = _bench(*args)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = list(csv.DictReader(open(out / "scores.csv")))
    assert [int(r["idx"]) for r in rows] == list(range(16))
    s = np.array([float(r["score"]) for r in rows])
    assert ((s > 0) & (s < 1)).all()
    m = json.loads((out / "metrics.json").read_text())
    assert m["preset"] == "lsst" and m["grid"] == {"num_pix": 32, "pixel_scale_arcsec": 0.2}
    assert (
        m["eval"]["n_lenses"] + m["eval"]["n_non_lenses"] == 16
        and m["sim_test"]["n_lenses"] + m["sim_test"]["n_non_lenses"] == 12
    )
    for key in ("sim_test", "eval"):
        lo, hi = m[key]["auc_ci95"]
        assert lo <= m[key]["auc"] <= hi
    assert set(m["gap"]) == {"auc", "tpr_at_fpr_0.01"}
    assert m["eval_at_threshold"]["n_lenses"] == m["eval"]["n_lenses"]
    # the simulations are on the eval grid, with the eval band's preset
    man = json.loads((out / "sim_train" / "manifest.json").read_text())
    assert man["family"] == "survey" and "lsst" in json.dumps(man)
    assert "| eval set |" in (out / "report.md").read_text()
    # a rerun skips every finished step and rewrites the same scores
    r2 = _bench(*args)
    assert r2.returncode == 0 and r2.stdout.count("done before") == 5, r2.stdout[-2000:]
    assert list(csv.DictReader(open(out / "scores.csv"))) == rows
    # another config into the same OUT is refused, before anything runs
    r3 = _bench(*args[:-1], "instrument.supersampling_factor=2")
    assert r3.returncode == 2 and r3.stderr.count("\n") == 1 and "another survey config" in r3.stderr

    # --real: display PNGs in lenses/ and non_lenses/, scored by that finder at its threshold
    from PIL import Image

    real = tmp_path / "real"
    stack = np.load(tiny_eval / "images.npy")
    labels = [int(r["is_lens"]) for r in csv.DictReader(open(tiny_eval / "params.csv"))]
    for i, (img, yy) in enumerate(zip(stack, labels)):
        d = real / ("lenses" if yy else "non_lenses")
        d.mkdir(parents=True, exist_ok=True)
        u8 = np.clip(255 * np.arcsinh(img / img.max() * 10) / np.arcsinh(10), 0, 255).astype(np.uint8)
        Image.fromarray(np.stack([u8] * 3, -1)).save(d / f"obj{i}.png")
    r4 = _bench("--real", real, "--finder", out, "--out", tmp_path / "real_out", "--real-pixel-scale", 0.2)
    assert r4.returncode == 0, r4.stderr[-3000:]
    mr = json.loads((tmp_path / "real_out" / "metrics.json").read_text())
    assert mr["real"]["n_lenses"] + mr["real"]["n_non_lenses"] == 16
    assert mr["at_sim_threshold"]["threshold"] == m["sim_threshold"]["threshold"]
    assert len(list(csv.DictReader(open(tmp_path / "real_out" / "scores.csv")))) == 16


def test_bad_input_is_one_line_before_any_compute(tmp_path):
    r = _bench("--eval", tmp_path / "missing", "--out", tmp_path / "o")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "images.npy not found" in r.stderr
    assert not (tmp_path / "o").exists()
    d = _write_eval(tmp_path / "hsc", np.zeros((2, 16, 16)), [1, 0], band="HSC-i")
    r = _bench("--eval", d, "--out", tmp_path / "o")
    assert r.returncode == 2 and "band 'HSC-i' has no survey preset" in r.stderr and not (tmp_path / "o").exists()
    r = _bench("--real", tmp_path, "--out", tmp_path / "o")
    assert r.returncode == 2 and "--finder" in r.stderr


# -------------------------------------------------------------------------------- real data
@pytest.mark.skipif(not SLSIM.is_dir(), reason="shared slsim data absent")
@pytest.mark.parametrize(
    "name,preset,num_pix,scale", [("lsst_i", "lsst", 64, 0.2), ("euclid_vis", "euclid", 100, 0.101)]
)
def test_slsim_sets_read_as_their_preset_and_grid(name, preset, num_pix, scale):
    ev = lf.read_eval_dir(SLSIM / name)
    assert (ev.preset, ev.num_pix, ev.pixel_scale, ev.n) == (preset, num_pix, scale, 200)
    assert sum(ev.is_lens) == 100


def test_quick_sizes_scale_with_the_image_area_and_freeze_the_backbone():
    assert lf.run_sizes(64, True) == lf.Sizes(1600, 400, 30, 32, True)
    assert lf.run_sizes(100, True).n_train == 700 and lf.run_sizes(100, True).n_test == 400
    assert lf.run_sizes(200, True).n_train == 400  # never below 400
    assert not lf.run_sizes(64, False).freeze_backbone and lf.run_sizes(64, False).n_train == 8000
