"""ingest of the formats real lens data come in (lenstronomy HDF5, multi-HDU FITS stamps, .npy stacks
with a per-row CSV, 8-bit display PNGs), object names as keys, catalogue columns kept; then the shared
real data (skipped when absent)."""

from __future__ import annotations

import csv
import hashlib
import json

import numpy as np
import pytest

import support
from hpc_lensiam.ingest.config import IngestConfig
from hpc_lensiam.ingest.run import ingest, shard_key
from hpc_lensiam.shards.manifest import read_manifest
from support import params_of, run_cli, sky_image, write_fits

REAL = support.SHARED_DATA / "real_lenses"
SLSIM = support.SHARED_DATA / "slsim"


def write_h5(path, image, scale=0.08, rms=0.02, exposure=None, transform=None, psf=None):
    """A lenstronomy-layout cutout (image stored the FITS way: RA flipped in transform_pix2angle)."""
    import h5py

    with h5py.File(path, "w") as f:
        f["image_data"] = image
        f["background_rms"] = rms
        f["exposure_time"] = exposure if exposure is not None else np.full(image.shape, 500.0, np.float32)
        f["transform_pix2angle"] = np.array(transform if transform is not None else [[-scale, 0.0], [0.0, scale]])
        n = image.shape[0]
        f["ra_at_xy_0"], f["dec_at_xy_0"] = (n - 1) / 2 * scale, -(n - 1) / 2 * scale
    if psf is not None:
        with h5py.File(psf[0], "w") as f:
            f["kernel_point_source"] = psf[1]
    return path


def gaussian_psf(n=21, sigma=2.0):
    yy, xx = np.mgrid[:n, :n] - (n - 1) / 2
    k = np.exp(-(xx**2 + yy**2) / (2 * sigma**2))
    return k / k.sum()


# ---------------------------------------------------------------------------------- HDF5
def test_hdf5_cutout_scale_noise_exposure_psf_and_same_image_as_fits(tmp_path, capsys):
    scale, n = 0.08, 120
    img = sky_image(n, scale, [(0.5, -0.3, 50.0, 0.15), (-1.0, 0.6, 20.0, 0.1)], noise=0.0)
    exp = np.full((n, n), 600.0, np.float32)
    exp[:3] = 0.0  # no exposure: no data
    psf = gaussian_psf()
    write_h5(tmp_path / "LENS_F140W.h5", img, scale, rms=0.02, exposure=exp, psf=(tmp_path / "psf_F140W.h5", psf))
    write_fits(tmp_path / "same.fits", np.where(exp > 0, img, np.nan), scale)  # the same pixels, a FITS WCS
    out = tmp_path / "out"
    rc, _, err = run_cli(capsys, "ingest", tmp_path / "LENS_F140W.h5", tmp_path / "same.fits", "--out", out)
    assert rc == 0
    (k1, a, p), (k2, b, q) = params_of(out)
    assert (k1, p["name"], k2) == ("LENS_F140W", "LENS_F140W", "same")
    m = p["ingest"]
    assert m["format"] == "hdf5" and m["pixel_scale_from"] == "transform_pix2angle"
    assert m["pixel_scale_arcsec"] == pytest.approx(0.08, rel=1e-12)
    assert m["orientation_ops"] == q["ingest"]["orientation_ops"] == ["flip_x"]
    np.testing.assert_allclose(a, b, atol=1e-6)  # HDF5 read exactly as the FITS file of the same pixels
    # noise: background_rms kept in file units and in the stored image's units (pixel x flux_scale)
    assert m["background_rms"] == 0.02 and m["noise_from"] == "background_rms"
    assert m["noise_rms"] == pytest.approx(0.02 / m["flux_scale"], rel=1e-12)
    # upsampled 0.08 -> 0.05: a target pixel is (5/8)^2 of an input pixel, white noise scales alike
    assert m["noise_rms_target_pixel"] == pytest.approx(m["noise_rms"] * (0.05 / 0.08) ** 2, rel=0.05)
    assert m["exposure_time_s"] == 600.0 and m["mask_hdu"] == "exposure_time" and m["mask_fraction"] == 0.0
    assert m["ra_at_xy_0"] == pytest.approx((n - 1) / 2 * scale)
    sha = hashlib.sha256((tmp_path / "psf_F140W.h5").read_bytes()).hexdigest()
    assert m["psf"]["sha256"] == sha and m["psf"]["shape"] == [21, 21] and m["psf"]["dataset"] == "kernel_point_source"
    assert m["psf"]["sum"] == pytest.approx(1.0) and m["psf"]["from"] == "found beside the file"
    assert "psf" not in q["ingest"]  # a FITS input gets a PSF only by --psf or a psf column
    assert read_manifest(out)["inputs"]["psfs"] == {str((tmp_path / "psf_F140W.h5").resolve()): sha}
    warn = [line for line in err.splitlines() if "upsampled" in line]
    assert len(warn) == 1 and "2 of 2 input(s) upsampled 1.6x" in warn[0] and '0.05"/px' in warn[0]


def test_hdf5_psf_rules_and_bad_files(tmp_path, capsys):
    img = sky_image(100, 0.08, [(0, 0, 10.0, 0.2)])
    d = tmp_path / "two"
    d.mkdir()
    write_h5(d / "image_A_F814W.h5", img, psf=(d / "psf_A_F814W.h5", gaussian_psf(11)))
    write_h5(d / "image_A_F555W.h5", img, psf=(d / "psf_A_F555W.h5", gaussian_psf(15)))
    write_h5(d / "other.h5", img)
    out = tmp_path / "out"
    ingest(str(out), files=[str(p) for p in sorted(d.glob("*.h5")) if "psf" not in p.name], progress=False)
    psf = {k: p["ingest"].get("psf", {}).get("shape") for k, _, p in params_of(out)}
    assert psf == {"image_A_F555W": [15, 15], "image_A_F814W": [11, 11], "other": None}  # by name; none: ambiguous
    rc, _, err = run_cli(capsys, "ingest", d / "other.h5", "--out", tmp_path / "o2", "--psf", d / "psf_A_F555W.h5")
    assert rc == 0 and params_of(tmp_path / "o2")[0][2]["ingest"]["psf"]["from"] == "--psf"
    # bad: a PSF file without the kernel, an HDF5 without image_data (e.g. the PSF file given as an image)
    rc, _, err = run_cli(capsys, "ingest", d / "other.h5", "--out", tmp_path / "o3", "--psf", d / "other.h5")
    assert rc == 2 and err.count("\n") == 1 and "--psf" in err and "kernel_point_source" in err
    rc, _, err = run_cli(capsys, "ingest", d / "psf_A_F555W.h5", "--out", tmp_path / "o4")
    assert rc == 2 and err.count("\n") == 1 and "psf_A_F555W.h5: no 'image_data' dataset" in err
    assert not (tmp_path / "o3").exists() and not (tmp_path / "o4").exists()


# ------------------------------------------------------------------- multi-object files
def test_multi_hdu_stamps_each_hdu_an_object(tmp_path):
    from astropy.io import fits

    stamps = [sky_image(60 + 10 * i, 0.03, [(0, 0, 5.0 + i, 0.1)]).astype(np.float32) for i in range(3)]
    fits.HDUList([fits.PrimaryHDU(stamps[0])] + [fits.ImageHDU(s) for s in stamps[1:]]).writeto(tmp_path / "st.fits")
    cfg = IngestConfig(preset="hst", num_pix=30, input_pixel_scale_arcsec=0.03, each_hdu=True)
    ingest(str(tmp_path / "out"), files=[str(tmp_path / "st.fits")], config=cfg, progress=False)
    rows = params_of(tmp_path / "out")
    assert [k for k, _, _ in rows] == ["st_hdu0", "st_hdu1", "st_hdu2"]
    assert [p["ingest"]["hdu"] for _, _, p in rows] == ["0", "1", "2"]
    assert [p["ingest"]["shape"] for _, _, p in rows] == [[60, 60], [70, 70], [80, 80]]
    # a --list naming HDUs of one file (and rows of a stack): each an object, named by its member
    np.save(tmp_path / "stack.npy", np.stack(stamps[2:] * 2))
    (tmp_path / "cat.csv").write_text("file,hdu\nst.fits,1\nst.fits,2\nstack.npy,1\n")
    ingest(str(tmp_path / "listed"), list_csv=str(tmp_path / "cat.csv"), config=cfg, progress=False)
    assert [k for k, _, _ in params_of(tmp_path / "listed")] == ["st_hdu1", "st_hdu2", "stack_1"]
    # without --each-hdu: the first 2-D image HDU only, as before
    ingest(
        str(tmp_path / "one"),
        files=[str(tmp_path / "st.fits")],
        config=IngestConfig(num_pix=30, input_pixel_scale_arcsec=0.03),
        progress=False,
    )
    assert [k for k, _, _ in params_of(tmp_path / "one")] == ["st"]


def test_npy_stack_with_per_row_csv_keeps_every_column(tmp_path):
    stack = np.stack([sky_image(64, 0.2, [(0.4 * i, 0, 10.0, 0.3)]) for i in range(4)]).astype(np.float32)
    np.save(tmp_path / "images.npy", stack)
    with open(tmp_path / "params.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["idx", "is_lens", "theta_E", "z_lens", "band", "pixel_scale"])
        w.writerows([[i, i % 2, 0.5 + i / 10, 0.3 + i / 10, "LSST-i", 0.2] for i in (3, 1, 0, 2)])  # any row order
    out = tmp_path / "out"
    ingest(
        str(out),
        files=[str(tmp_path / "images.npy")],
        labels_csv=str(tmp_path / "params.csv"),
        config=IngestConfig(preset="euclid", num_pix=100),
        progress=False,
    )
    rows = params_of(out)
    assert [k for k, _, _ in rows] == ["images_0", "images_1", "images_2", "images_3"]
    for i, (_, _, p) in enumerate(rows):
        assert p["ingest"]["row"] == i and p["ingest"]["pixel_scale_from"] == "catalogue column"
        assert p["ingest"]["pixel_scale_arcsec"] == 0.2 and p["ingest"]["shape"] == [64, 64]
        assert p["is_lens"] == i % 2 and p["lens"] == {"theta_E": pytest.approx(0.5 + i / 10)}
        assert p["catalog"] == {"idx": i, "z_lens": pytest.approx(0.3 + i / 10), "band": "LSST-i", "pixel_scale": 0.2}
    # each row is its own image: the source moves east with the row (0.4" per row at 0.1"/px: 4 px)
    peaks = [np.unravel_index(np.argmax(img), img.shape)[1] for _, img, _ in rows]
    assert np.diff(peaks).tolist() == [4, 4, 4]


# ------------------------------------------------------------------------------- display
def test_rgb_png_one_channel_by_the_documented_rule_with_a_warning(tmp_path, capsys):
    from PIL import Image

    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 60, (100, 100, 3)).astype(np.uint8)
    rgb[10:20, 60:70] = [250, 120, 30]  # a bright patch near the top right of the displayed picture
    Image.fromarray(rgb).save(tmp_path / "cut.png")
    out = tmp_path / "out"
    rc, _, err = run_cli(
        capsys,
        "ingest",
        tmp_path / "cut.png",
        "--out",
        out,
        "--input-pixel-scale",
        0.1,
        "--preset",
        "euclid",
        "--num-pix",
        100,
        "--orientation",
        "sky",
    )
    assert rc == 0
    ((key, img, p),) = params_of(out)
    m = p["ingest"]
    assert key == "cut" and m["format"] == "display" and m["display_image"] is True
    assert m["channel_rule"].startswith("mean of the R, G, B channels")
    expect = rgb.astype(np.float64).mean(axis=2)[::-1]  # row 0 of a display image is its top
    expect = expect - m["sky_level"]
    np.testing.assert_allclose(img * m["flux_scale"], expect, atol=1e-4)
    assert np.unravel_index(np.argmax(img), img.shape)[0] > 75  # the patch stays at the top (north up)
    warn = [line for line in err.splitlines() if "display images" in line]
    assert len(warn) == 1 and "not calibrated flux" in warn[0] and "cut.png" in warn[0]


# ---------------------------------------------------------------------------------- names
def test_names_from_csv_sanitised_keys_and_catalog_columns(tmp_path):
    scale = 0.05
    for name in ("a", "b"):
        write_fits(tmp_path / f"{name}.fits", sky_image(100, scale, [(0, 0, 10.0, 0.2)]), scale)
    (tmp_path / "cat.csv").write_text("file,name,ra,dec\na.fits,SDSS J1234.5+0101,188.6,1.02\nb.fits,B 2,10.5,-3\n")
    (tmp_path / "labels.csv").write_text("name,theta_E,mag_i,flag\nSDSS J1234.5+0101,1.1,19.5,good\n")
    out = tmp_path / "out"
    ingest(
        str(out),
        list_csv=str(tmp_path / "cat.csv"),
        labels_csv=str(tmp_path / "labels.csv"),
        config=IngestConfig(preset="euclid", num_pix=40),
        progress=False,
    )
    rows = {k: p for k, _, p in params_of(out)}
    assert sorted(rows) == ["B_2", "SDSS_J1234_5+0101"] == sorted(shard_key(n) for n in ("B 2", "SDSS J1234.5+0101"))
    a = rows["SDSS_J1234_5+0101"]
    assert a["name"] == "SDSS J1234.5+0101" and a["lens"] == {"theta_E": 1.1}
    assert a["catalog"] == {"name": "SDSS J1234.5+0101", "ra": 188.6, "dec": 1.02, "mag_i": 19.5, "flag": "good"}
    assert rows["B_2"]["catalog"] == {"name": "B 2", "ra": 10.5, "dec": -3}


@pytest.mark.parametrize(
    "files,csv_text,expect",
    [
        (("a", "a2"), "file,name\na.fits,X\na2.fits,X\n", "duplicate object name 'X'"),
        (("a", "a2"), "file,name\na.fits,X.1\na2.fits,X_1\n", "duplicate object key 'X_1'"),
        (("a",), "file,theta_E,ra\na.fits,abc,1\n", "theta_E='abc' is not a number"),
    ],
)
def test_duplicate_names_and_bad_cells_are_one_line(tmp_path, capsys, files, csv_text, expect):
    for name in files:
        write_fits(tmp_path / f"{name}.fits", sky_image(100, 0.05, [(0, 0, 10.0, 0.2)]), 0.05)
    (tmp_path / "cat.csv").write_text(csv_text)
    out = tmp_path / "out"
    rc, _, err = run_cli(
        capsys, "ingest", "--list", tmp_path / "cat.csv", "--out", out, "--preset", "euclid", "--num-pix", 40
    )
    assert rc == 2 and err.count("\n") == 1 and err.startswith("hpc-lensiam: error: ") and expect in err
    assert str(tmp_path) in err and not out.exists()


# ------------------------------------------------------------------------ the shared data
def _need(path):
    if not path.exists():
        pytest.skip(f"{path} absent (the shared real-lens data)")
    return path


def test_real_desi_hst_lenses(tmp_path, capsys):
    import h5py

    d = _need(REAL / "desi_hst")
    files = sorted(d.glob("DESI*.h5"))
    out = tmp_path / "desi"
    rc, _, err = run_cli(capsys, "ingest", *files, "--out", out, "--labels", d / "labels.csv")
    assert rc == 0 and len(files) == 10
    rows = params_of(out)
    names = sorted(p["name"] for _, _, p in rows)
    assert names == sorted(f.name.split("_")[0] for f in files)  # renamed by labels.csv's name column
    psf_sha = hashlib.sha256((d / "psf_F140W.h5").read_bytes()).hexdigest()
    labelled = 0
    for key, img, p in rows:
        m = p["ingest"]
        with h5py.File(m["file"]) as f:
            rms = float(f["background_rms"][()])
        assert key == p["name"] and m["pixel_scale_arcsec"] == pytest.approx(0.08, rel=1e-9)
        assert m["pixel_scale_from"] == "transform_pix2angle" and m["orientation_ops"] == ["flip_x"]
        assert m["background_rms"] == rms and m["noise_rms"] == pytest.approx(rms / m["flux_scale"], rel=1e-12)
        assert m["psf"]["sha256"] == psf_sha and m["psf"]["shape"] == [61, 61]
        assert 400 < m["exposure_time_s"] < 500 and img.shape == (110, 110)
        labelled += p["catalog"]["theta_E_arcsec"] is not None
    assert labelled == 5
    assert sum("upsampled 1.6x" in line for line in err.splitlines()) == 1


@pytest.mark.slow
def test_real_aegis_stamps_slsim_stack_and_spacewarps_png(tmp_path):
    aegis = _need(REAL / "aegis_galaxies" / "AEGIS_F814w_images_01.fits")
    cfg = IngestConfig(input_pixel_scale_arcsec=0.03, each_hdu=True, pad=True)
    ingest(str(tmp_path / "aegis"), files=[str(aegis)], config=cfg, progress=False)
    assert [k for k, _, _ in params_of(tmp_path / "aegis")] == [f"AEGIS_F814w_images_01_hdu{i}" for i in range(3)]

    stack = _need(SLSIM / "lsst_i" / "images.npy")
    table = list(csv.DictReader(open(SLSIM / "lsst_i" / "params.csv")))
    ingest(
        str(tmp_path / "lsst"),
        files=[str(stack)],
        labels_csv=str(SLSIM / "lsst_i" / "params.csv"),
        config=IngestConfig(preset="euclid", num_pix=110, shard_size=1000),
        progress=False,
    )
    rows = {k: p for k, _, p in params_of(tmp_path / "lsst")}
    assert len(rows) == len(table) == np.load(stack, mmap_mode="r").shape[0]
    r = table[7]
    p = rows[f"images_{r['idx']}"]
    assert p["lens"]["theta_E"] == pytest.approx(float(r["theta_E"])) and p["is_lens"] == int(r["is_lens"])
    assert p["catalog"]["z_source"] == pytest.approx(float(r["z_source"])) and p["catalog"]["band"] == "LSST-i"
    assert p["ingest"]["pixel_scale_arcsec"] == 0.2 and p["ingest"]["row"] == int(r["idx"])

    pngs = sorted((_need(REAL / "cfhtls_spacewarps" / "lenses")).glob("*.png"))[:3]
    cfg = IngestConfig(preset="euclid", input_pixel_scale_arcsec=0.186)
    ingest(str(tmp_path / "sw"), files=[str(p) for p in pngs], config=cfg, progress=False)
    rows = params_of(tmp_path / "sw")
    assert [k for k, _, _ in rows] == [p.stem for p in pngs]
    assert all(p["ingest"]["display_image"] and json.dumps(p).count("channel_rule") == 1 for _, _, p in rows)
