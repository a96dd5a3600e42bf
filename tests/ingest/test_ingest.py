"""ingest: real cutouts -> shards. Flux, orientation and masks on synthetic FITS with a known WCS;
every bad input for real; MPI byte-identity and resume; the real Euclid Q1 lens."""

from __future__ import annotations

import csv
import subprocess
from pathlib import Path

import numpy as np
import pytest

import support
from hpc_lensiam.core.errors import UserError
from hpc_lensiam.core.io import sha256_file
from hpc_lensiam.ingest.config import IngestConfig
from hpc_lensiam.ingest.prepare import resample
from hpc_lensiam.ingest.run import ingest
from hpc_lensiam.shards.manifest import read_manifest
from support import only_error_line, params_of, run_cli, sky_image, write_fits

EUCLID = support.SHARED_DATA / "euclid_q1" / "102020532_NEG589257492489565961.fits"


# --------------------------------------------------------------------------------- physics
def test_resample_conserves_flux_exactly_when_the_field_is_covered():
    rng = np.random.default_rng(0)
    img = rng.random((90, 70))
    # rows: 90 x 0.03" = 2.7" = the output field; columns: 70 x 0.04" = 2.8", of which 0.05" per side
    # (1.25 input columns: column 0 and a quarter of column 1) falls outside the 27 x 0.1" field
    out = resample(img, 0.04, 0.03, 27, 0.1)
    inside = img.copy()
    inside[:, [0, -1]] = 0.0
    inside[:, [1, -2]] *= 0.75
    assert out.sum() == pytest.approx(inside.sum(), rel=1e-12)


def test_ingest_flux_conserved_and_normalised_like_the_simulator(tmp_path):
    scale, n = 0.03, 200
    blobs = [(0.4, -0.2, 1000.0, 0.15), (-0.8, 0.5, 300.0, 0.1)]
    write_fits(tmp_path / "a.fits", sky_image(n, scale, blobs), scale)
    out = tmp_path / "out"
    ingest(str(out), files=[str(tmp_path / "a.fits")], config=IngestConfig(preset="euclid", num_pix=48), progress=False)
    ((key, img, params),) = params_of(out)
    meta = params["ingest"]
    assert img.dtype == np.float32 and img.shape == (48, 48) and img.max() == 1.0
    assert meta["sky_level"] == 0.0 and meta["mask_fraction"] == 0.0 and meta["hdu"] == "SCI_FLUX"
    assert meta["pixel_scale_arcsec"] == pytest.approx(scale, rel=1e-9) and meta["pixel_scale_from"] == "wcs"
    # the shard's image x flux_scale gives back the file's total flux (the blobs lie inside the 4.8" field)
    total = img.astype(np.float64).sum() * meta["flux_scale"]
    assert total == pytest.approx(1300.0, rel=1e-6)
    assert params["lens"] == {} and key == "a" and params["name"] == "a"  # the key is the object's name
    m = read_manifest(out)
    assert m["mode"] == "single" and m["image_shape"] == [48, 48] and m["kind"] == "ingest"


def _peak_xy_arcsec(img: np.ndarray, num_pix: int, scale: float) -> tuple[float, float]:
    """Simulator-grid coordinates (lenstronomy x, y in arcsec) of the brightest pixel."""
    from hpc_lensiam.simulate.instrument import DetectorGrid

    grid = DetectorGrid(num_pix, scale)
    r, c = np.unravel_index(int(np.argmax(img)), img.shape)
    return float(grid.x_pix_arcsec[r, c]), float(grid.y_pix_arcsec[r, c])


def test_orientation_default_puts_east_at_the_simulators_positive_x(tmp_path):
    """A source 1" east and 0.5" north of the centre lands where the simulator's grid has
    x = +1", y = +0.5" (x grows with RA): the default. ``sky`` keeps east on the left."""
    scale, n = 0.05, 120
    img = sky_image(n, scale, [(1.0, 0.5, 100.0, 0.05)])
    write_fits(tmp_path / "std.fits", img, scale)  # north up, east left
    write_fits(tmp_path / "mirror.fits", img[:, ::-1], scale, cd=[[scale, 0], [0, scale]])  # east right
    write_fits(tmp_path / "rot90.fits", np.ascontiguousarray(img.T), scale, cd=[[0, -scale], [scale, 0]])
    cfg = IngestConfig(preset="euclid", num_pix=40)
    images = {}
    for orient in ("simulator", "sky"):
        out = tmp_path / orient
        files = [str(tmp_path / f) for f in ("std.fits", "mirror.fits", "rot90.fits")]
        ingest(
            str(out), files=files, config=IngestConfig(preset="euclid", num_pix=40, orientation=orient), progress=False
        )
        images[orient] = params_of(out)
    std, mirror, rot = images["simulator"]
    x, y = _peak_xy_arcsec(std[1], 40, cfg.target_pixel_scale_arcsec)
    assert x == pytest.approx(1.0, abs=0.051) and y == pytest.approx(0.5, abs=0.051)
    assert std[2]["ingest"]["orientation_ops"] == ["flip_x"]
    np.testing.assert_allclose(mirror[1], std[1], atol=1e-6)  # the same sky, stored the other way round
    np.testing.assert_allclose(rot[1], std[1], atol=1e-6)
    assert rot[2]["ingest"]["orientation_ops"] == ["transpose", "flip_x"] and rot[2]["ingest"]["rotation_deg"] == 0
    x, y = _peak_xy_arcsec(images["sky"][0][1], 40, cfg.target_pixel_scale_arcsec)
    assert x == pytest.approx(-1.0, abs=0.051) and y == pytest.approx(0.5, abs=0.051)


def test_masks_nonfinite_and_rms_no_data_and_weight(tmp_path):
    scale, n = 0.1, 60
    img = sky_image(n, scale, [(0.0, 0.0, 50.0, 0.2)], background=5.0, noise=0.01, seed=3)
    rms = np.full((n, n), 0.01)
    img[:, :10] = 1e6  # junk where the RMS says "no data" (Euclid writes 1e16)
    rms[:, :10] = 1e16
    img[40:45, 40:45] = np.nan
    write_fits(tmp_path / "m.fits", img, scale, rms=rms)
    write_fits(tmp_path / "w.fits", img, scale, weight=(rms < 1).astype(float))
    out = tmp_path / "out"
    ingest(str(out), files=[str(tmp_path / "m.fits")], config=IngestConfig(preset="euclid", num_pix=48), progress=False)
    ((_, a, pa),) = params_of(out)
    meta = pa["ingest"]
    assert meta["mask_hdu"] == "SCI_RMS" and meta["sky_level"] == pytest.approx(5.0, abs=0.005)
    # 48 px field on 60 px: columns 0..5 of the field are input columns 6..11, i.e. 4 masked + 25 NaN
    field_bad = 48 * 4 + 25
    assert meta["mask_fraction"] == pytest.approx(field_bad / 48**2, rel=1e-6)
    # masked = sky = 0 after subtraction; the default orientation mirrors x, so they are the last columns
    assert np.all(a[:, -4:] == 0.0) and np.isfinite(a).all()
    r, c = np.unravel_index(int(np.argmax(a)), a.shape)
    assert abs(r - 23.5) < 2 and abs(c - 23.5) < 2  # the peak is the galaxy, not junk
    out_w = tmp_path / "outw"
    ingest(
        str(out_w),
        files=[str(tmp_path / "w.fits")],
        config=IngestConfig(preset="euclid", num_pix=48, weight_hdu="WHT"),
        progress=False,
    )
    ((_, b, pb),) = params_of(out_w)
    np.testing.assert_array_equal(a, b)
    assert pb["ingest"]["mask_fraction"] == meta["mask_fraction"]
    out_n = tmp_path / "outn"  # without the RMS: the junk wins
    ingest(
        str(out_n),
        files=[str(tmp_path / "m.fits")],
        config=IngestConfig(preset="euclid", num_pix=48, rms_hdu="none"),
        progress=False,
    )
    ((_, c_img, _),) = params_of(out_n)
    assert c_img[:, -4:].min() > 0.5


def test_labels_csv_and_catalog(tmp_path):
    scale = 0.05
    for name in ("a", "b", "c"):
        write_fits(tmp_path / f"{name}.fits", sky_image(100, scale, [(0, 0, 10.0, 0.2)]), scale)
    np.save(tmp_path / "d.npy", sky_image(100, scale, [(0, 0, 10.0, 0.2)]).astype(np.float32))
    with open(tmp_path / "cat.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["file", "hdu"])
        w.writerows([["a.fits", ""], ["b.fits", "SCI_FLUX"], ["c.fits", "1"], ["d.npy", ""]])
    (tmp_path / "labels.csv").write_text("file,theta_E,gamma,is_lens\na.fits,1.2,2.0,1\nc.fits,,,0\n")
    out = tmp_path / "out"
    cfg = IngestConfig(preset="euclid", num_pix=40, input_pixel_scale_arcsec=scale, shard_size=3)
    ingest(
        str(out),
        list_csv=str(tmp_path / "cat.csv"),
        labels_csv=str(tmp_path / "labels.csv"),
        config=cfg,
        progress=False,
    )
    rows = params_of(out)
    assert [k for k, _, _ in rows] == ["a", "b", "c", "d"]  # keys are the objects' names (file stems)
    p = [r[2] for r in rows]
    assert p[0]["lens"] == {"theta_E": 1.2, "gamma": 2.0} and p[0]["is_lens"] == 1
    assert p[1]["lens"] == {} and "is_lens" not in p[1]
    assert p[2]["is_lens"] == 0 and p[2]["ingest"]["hdu"] == "SCI_FLUX"
    assert p[3]["ingest"]["hdu"] == "" and p[3]["ingest"]["pixel_scale_from"] == "flag"
    np.testing.assert_array_equal(rows[3][1], rows[0][1])  # .npy = the FITS layout (north up, east left)


def test_angle_labels_with_their_unit_in_the_column_name(tmp_path):
    """Lens-model tables (the real DESI-HST labels) write ``theta_E_arcsec``: it is the theta_E label (not
    only a kept column), so predict can score against it; both spellings that disagree are refused."""
    scale = 0.05
    for name in ("a", "b"):
        write_fits(tmp_path / f"{name}.fits", sky_image(100, scale, [(0, 0, 10.0, 0.2)]), scale)
    (tmp_path / "labels.csv").write_text("name,file,theta_E_arcsec,q_mass\nA,a.fits,1.55,0.66\nB,b.fits,,\n")
    out = tmp_path / "out"
    files = [str(tmp_path / "a.fits"), str(tmp_path / "b.fits")]
    cfg = IngestConfig(preset="euclid", num_pix=40, shard_size=3)
    ingest(str(out), files=files, labels_csv=str(tmp_path / "labels.csv"), config=cfg, progress=False)
    p = [r[2] for r in params_of(out)]
    assert p[0]["lens"] == {"theta_E": 1.55} and p[0]["catalog"]["q_mass"] == 0.66
    assert p[1]["lens"] == {}
    (tmp_path / "bad.csv").write_text("file,theta_E,theta_E_arcsec\na.fits,1.2,1.55\n")
    with pytest.raises(UserError, match="theta_E='1.2' but theta_E_arcsec='1.55'"):
        ingest(str(tmp_path / "o2"), files=files, labels_csv=str(tmp_path / "bad.csv"), config=cfg, progress=False)


# ------------------------------------------------------------------------------- bad input
@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("bad")
    good = sky_image(100, 0.05, [(0, 0, 10.0, 0.2)])
    files = {"good": write_fits(d / "good.fits", good, 0.05), "good2": write_fits(d / "good2.fits", good, 0.05)}
    (d / "junk.fits").write_bytes(b"this is not a FITS file at all\n" * 200)
    files["unreadable"] = d / "junk.fits"
    files["missing"] = d / "nothere.fits"
    from astropy.io import fits

    fits.HDUList([fits.PrimaryHDU(np.zeros((3, 100, 100), np.float32))]).writeto(d / "cube.fits")
    files["not_2d"] = d / "cube.fits"
    files["no_scale"] = write_fits(d / "nowcs.fits", good, None)
    files["too_small"] = write_fits(d / "small.fits", good[:30, :30], 0.05)
    raw = files["good"].read_bytes()
    (d / "trunc.fits").write_bytes(raw[: len(raw) - 20000])
    files["truncated"] = d / "trunc.fits"
    return files


@pytest.mark.parametrize(
    "case,expect",
    [
        ("missing", "no such file"),
        ("unreadable", "cannot read as FITS"),
        ("not_2d", "2-D image HDU (found: PRIMARY (3, 100, 100))"),
        ("no_scale", "no pixel scale"),
        ("too_small", "smaller than the target field"),
        ("truncated", "truncated"),
    ],
)
def test_bad_input_is_one_error_line_naming_the_file_and_writes_nothing(bad_inputs, tmp_path, capsys, case, expect):
    out = tmp_path / "out"
    rc, _, err = run_cli(
        capsys, "ingest", bad_inputs["good"], bad_inputs[case], "--out", out, "--preset", "euclid", "--num-pix", 48
    )
    assert rc == 2 and err.count("\n") == 1 and err.startswith("hpc-lensiam: error: ")
    assert str(bad_inputs[case]) in err and expect in err
    assert not out.exists()


def test_bad_labels_and_catalog(bad_inputs, tmp_path, capsys):
    out = tmp_path / "out"
    (tmp_path / "labels.csv").write_text("file,theta_E\ngood.fits,1.0\nother.fits,1.1\n")
    rc, _, err = run_cli(capsys, "ingest", bad_inputs["good"], "--out", out, "--labels", tmp_path / "labels.csv")
    assert rc == 2 and err.count("\n") == 1 and "'other.fits' matches no input file" in err
    assert str(tmp_path / "labels.csv") in err
    (tmp_path / "typo.csv").write_text("file,theta_e\ngood.fits,1.0\n")
    rc, _, err = run_cli(capsys, "ingest", bad_inputs["good"], "--out", out, "--labels", tmp_path / "typo.csv")
    assert rc == 2 and "unknown column 'theta_e'" in err
    rc, _, err = run_cli(capsys, "ingest", "--out", out, "--list", tmp_path / "nolist.csv")
    assert rc == 2 and "no such file" in err and "nolist.csv" in err
    assert not out.exists()


def test_python_api_checks_its_config_like_the_flags_before_reading(tmp_path):
    """ingest() with an IngestConfig built directly (never validated) checked nothing: a 4 px grid went on to
    read the inputs. Its arguments are checked as the command's config, naming the flag, before any file."""
    out, missing = tmp_path / "out", str(tmp_path / "missing.fits")
    with pytest.raises(UserError, match=r"^--num-pix: 4 is too small \(expected >= 8\)$"):
        ingest(str(out), files=[missing], config=IngestConfig(num_pix=4), progress=False)
    with pytest.raises(UserError, match=r"^--target-pixel-scale: must be > 0, got -0.1$"):
        ingest(str(out), files=[missing], config=IngestConfig(pixel_scale_arcsec=-0.1), progress=False)
    with pytest.raises(UserError, match=r"^--list: give input files or --list catalog.csv \(one of the two\)$"):
        ingest(str(out), files=[missing], list_csv=str(tmp_path / "cat.csv"), progress=False)
    with pytest.raises(UserError, match=r"^ingest: give input files or --list catalog.csv \(one of the two\)$"):
        ingest(str(out), progress=False)
    assert not out.exists()


def test_skip_bad_warns_counts_and_writes_the_rest(bad_inputs, tmp_path, capsys):
    out = tmp_path / "out"
    rc, text, err = run_cli(
        capsys,
        "ingest",
        bad_inputs["good"],
        bad_inputs["missing"],
        bad_inputs["not_2d"],
        bad_inputs["good2"],  # another file: one file twice is a duplicate object name
        "--out",
        out,
        "--preset",
        "euclid",
        "--num-pix",
        48,
        "--skip-bad",
    )
    assert rc == 0
    warnings = [line for line in err.splitlines() if "warning: skipping" in line]
    assert len(warnings) == 2 and str(bad_inputs["missing"]) in warnings[0]
    assert "2 of 4 input(s)" in text and "2 skipped as bad" in text
    m = read_manifest(out)
    assert m["num_samples"] == 2 and m["skipped_inputs"] == 2


# ------------------------------------------------------------------------- MPI and resume
@pytest.mark.slow
def test_two_ranks_same_bytes_and_resume(tmp_path, bin_dir):
    scale = 0.05
    files = []
    for i in range(5):
        files.append(
            write_fits(
                tmp_path / f"f{i}.fits", sky_image(100, scale, [(0.1 * i, 0, 10.0, 0.2)], noise=0.01, seed=i), scale
            )
        )

    def run(out, ranks):
        cmd = [
            str(bin_dir / "hpc-lensiam"),
            "ingest",
            *map(str, files),
            "--out",
            str(out),
            "--preset",
            "euclid",
            "--num-pix",
            "40",
            "--shard-size",
            "2",
        ]
        if ranks > 1:
            cmd = [str(bin_dir / "mpiexec"), "-n", str(ranks), *cmd]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]
        return r.stdout

    run(tmp_path / "one", 1)
    assert "with 2 rank(s)" in run(tmp_path / "two", 2)
    one = {p.name: p.read_bytes() for p in sorted((tmp_path / "one").glob("shard-*"))}
    two = {p.name: p.read_bytes() for p in sorted((tmp_path / "two").glob("shard-*"))}
    assert list(one) == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"] and one == two
    assert read_manifest(tmp_path / "one")["shards"] == read_manifest(tmp_path / "two")["shards"]
    (tmp_path / "two" / "shard-000001.tar").unlink()  # as if killed before it was written
    assert "wrote 2 new samples (3 already done)" in run(tmp_path / "two", 2)
    assert {p.name: p.read_bytes() for p in sorted((tmp_path / "two").glob("shard-*"))} == one
    assert "wrote 0 new samples" in run(tmp_path / "two", 1)


# --------------------------------------------------------------------------- real Euclid lens
@pytest.fixture(scope="module")
def euclid_file() -> Path:
    if not EUCLID.is_file():
        pytest.skip(f"Euclid Q1 lens not present at {EUCLID}")
    return EUCLID


@pytest.mark.parametrize("preset,num_pix,scale", [("euclid", 110, 0.1), ("hst", 110, 0.05)])
def test_euclid_q1_lens_at_both_grids(euclid_file, tmp_path, preset, num_pix, scale):
    out = tmp_path / preset
    ingest(str(out), files=[str(euclid_file)], config=IngestConfig(preset=preset), progress=False)
    ((_, img, params),) = params_of(out)
    meta = params["ingest"]
    assert img.shape == (num_pix, num_pix) and img.dtype == np.float32 and img.max() == 1.0
    assert np.isfinite(img).all() and meta["hdu"] == "VIS_FLUX" and meta["mask_hdu"] == "VIS_RMS"
    assert meta["pixel_scale_arcsec"] == pytest.approx(0.1, rel=1e-6) and meta["target_pixel_scale_arcsec"] == scale
    assert meta["orientation_ops"] == ["flip_x"] and meta["mask_fraction"] == 0.0
    assert abs(meta["sky_level"]) < 0.01  # VIS background, flux units of the file
    r, c = np.unravel_index(int(np.argmax(img)), img.shape)  # the lens galaxy is centred
    assert abs(r - (num_pix - 1) / 2) <= 2 and abs(c - (num_pix - 1) / 2) <= 2
    # the field's flux in file units: the cutout's central (num_pix x scale)" box, sky subtracted
    from astropy.io import fits

    with fits.open(euclid_file) as h:
        raw = h["VIS_FLUX"].data.astype(np.float64) - meta["sky_level"]
    half = num_pix * scale / 0.1 / 2  # in input pixels, around the centre 149.5
    j = np.arange(300)
    w = np.clip(np.minimum(149.5 + half, j + 0.5) - np.maximum(149.5 - half, j - 0.5), 0, 1)
    assert img.astype(np.float64).sum() * meta["flux_scale"] == pytest.approx(w @ raw @ w, rel=1e-5)


def test_euclid_nir_band_with_no_data_pixels(euclid_file, tmp_path):
    out = tmp_path / "nir"
    ingest(
        str(out),
        files=[str(euclid_file)],
        config=IngestConfig(preset="euclid", hdu="NIR_Y_FLUX", num_pix=300),
        progress=False,
    )
    ((_, _, params),) = params_of(out)
    # 14 NIR_Y RMS pixels are 1e16 (no data): masked
    assert params["ingest"]["mask_hdu"] == "NIR_Y_RMS"
    assert params["ingest"]["mask_fraction"] == pytest.approx(14 / 300**2, rel=1e-6)


def test_finetune_and_show_read_ingested_shards_unchanged(tmp_path):
    """Labelled real images train a regressor like simulated ones; unlabelled ones are refused."""
    from hpc_lensiam.core.errors import UserError
    from hpc_lensiam.downstream.finetune import finetune
    from hpc_lensiam.shards.show import show_pairs

    scale, rows = 0.1, ["file,theta_E,is_lens"]
    files = []
    for i in range(8):
        theta = 0.8 + 0.1 * i
        img = sky_image(60, scale, [(0, 0, 10.0, 0.2), (theta, 0, 5.0, 0.1), (-theta, 0, 5.0, 0.1)], noise=0.01, seed=i)
        files.append(str(write_fits(tmp_path / f"l{i}.fits", img, scale)))
        rows.append(f"l{i}.fits,{theta},1")
    (tmp_path / "labels.csv").write_text("\n".join(rows) + "\n")
    out = tmp_path / "real"
    ingest(
        str(out),
        files=files,
        labels_csv=str(tmp_path / "labels.csv"),
        config=IngestConfig(preset="euclid", num_pix=48, shard_size=4),
        progress=False,
    )
    rep = finetune(
        "none",
        str(out),
        str(out),
        target="theta_E",
        n_train=6,
        n_test=2,
        epochs=1,
        arch="resnet18",
        batch_size=4,
        progress=False,
    )
    assert rep["n_test"] == 2 and rep["test_targets"] == pytest.approx([1.4, 1.5])
    png = show_pairs(str(out), str(tmp_path / "show.png"), n=2)
    assert Path(png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    bare = tmp_path / "bare"
    ingest(str(bare), files=files, config=IngestConfig(preset="euclid", num_pix=48), progress=False)
    with pytest.raises(UserError, match="samples have no 'theta_E' label"):
        finetune(
            "none",
            str(bare),
            str(bare),
            target="theta_E",
            n_train=6,
            n_test=2,
            epochs=1,
            arch="resnet18",
            progress=False,
        )


def test_rerun_after_an_input_was_edited_is_refused_naming_it(tmp_path, bin_dir):
    """Issue 25: kill after 2 of 3 shards, edit an input, rerun: exit 0, verify clean, shard 0 still
    held the old image (only the input paths were hashed). The inputs' sha256 are in the plan now:
    the rerun is one error line naming the edited file, and the folder is left as it was."""
    scale = 0.05
    files = [
        write_fits(tmp_path / f"f{i}.fits", sky_image(100, scale, [(0.1 * i, 0, 10.0, 0.2)], seed=i), scale)
        for i in range(3)
    ]
    out = tmp_path / "out"
    cmd = [str(bin_dir / "hpc-lensiam"), "ingest", *map(str, files), "--out", str(out)]
    cmd += ["--preset", "euclid", "--num-pix", "40", "--shard-size", "1"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    (out / "manifest.json").unlink()  # as if killed after 2 of the 3 shards
    (out / "shard-000002.tar").unlink()
    before = {p.name: p.read_bytes() for p in out.glob("shard-*.tar")}
    files[0].unlink()
    write_fits(files[0], sky_image(100, scale, [(-0.6, 0.4, 10.0, 0.2)], seed=9), scale)
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert f"other input files (sha256 of {files[0].resolve()} changed)" in only_error_line(r)
    assert {p.name: p.read_bytes() for p in out.glob("shard-*.tar")} == before and not (out / "manifest.json").exists()
    # restored: the rerun completes the data set
    files[0].unlink()
    write_fits(files[0], sky_image(100, scale, [(0.0, 0, 10.0, 0.2)], seed=0), scale)
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "wrote 1 new samples (2 already done)" in r.stdout, r.stderr[-2000:]
    m = read_manifest(out)
    assert m["inputs"]["cutouts"] == {str(f.resolve()): sha256_file(f) for f in files}


@pytest.mark.parametrize(
    "case,expect",
    [
        (
            "npy_50",
            ["--input-pixel-scale 50: ", 'input pixel scale 50"/px (from --input-pixel-scale) would be upsampled 500x'],
        ),
        ("wcs_1deg", ['input pixel scale 3600"/px (from its WCS) would be upsampled 3.6e+04x', "within 20x"]),
        ("wcs_tiny", ['would be downsampled 40x onto the target grid of 0.1"/px', '0.005 to 2"/px']),
        ("plateau", ["is constant on the target grid (no structure"]),
    ],
)
def test_implausible_resampling_or_a_constant_result_is_refused(tmp_path, capsys, case, expect):
    """Issue 25: --input-pixel-scale 50 (or a WCS of 1 deg/px) gave exit 0 and a constant image. The input
    scale must be within 20x of the target's either way, and a result with no structure is refused."""
    img = sky_image(100, 0.05, [(0, 0, 10.0, 0.2)])
    extra = []
    if case == "npy_50":
        path = tmp_path / "cut.npy"
        np.save(path, img)
        extra = ["--input-pixel-scale", 50]
    elif case == "wcs_1deg":
        path = write_fits(tmp_path / "cut.fits", img, 3600.0)
    elif case == "wcs_tiny":
        path = write_fits(tmp_path / "cut.fits", sky_image(1000, 0.0025, [(0, 0, 10.0, 0.2)]), 0.0025)
    else:  # a flat plateau over the field, zeros (the sky) around it: positive but constant in the field
        img = np.zeros((200, 200))
        img[40:160, 40:160] = 5.0
        path = write_fits(tmp_path / "cut.fits", img, 0.05)
    out = tmp_path / "out"
    rc, _, err = run_cli(capsys, "ingest", path, "--out", out, "--preset", "euclid", "--num-pix", 40, *extra)
    assert rc == 2 and err.count("\n") == 1 and err.startswith("hpc-lensiam: error: "), err
    assert str(path) in err and all(e in err for e in expect), err
    assert not out.exists()
