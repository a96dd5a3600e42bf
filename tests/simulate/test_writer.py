"""The shard writer: MPI ranks, byte-for-byte determinism, resume after a kill, bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest

from hpc_lensiam.shards.manifest import LENS_PARAMS, read_manifest
from support import one_error_line

SMALL = "instrument:\n  num_pix: 40\n"


@pytest.fixture(scope="module")
def small_yaml(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("cfg") / "small.yaml"
    path.write_text(SMALL)
    return path


def cli(bin_dir, *args, ranks: int = 0, check: bool = True, **kw) -> subprocess.CompletedProcess:
    cmd = [str(bin_dir / "hpc-lensiam"), *map(str, args)]
    if ranks:
        cmd = [str(bin_dir / "mpiexec"), "-n", str(ranks), *cmd]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, **kw)
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def contents(out: Path) -> dict:
    """Everything that defines a data set: manifest and every shard's bytes."""
    manifest = json.loads((out / "manifest.json").read_text())
    return {"manifest": manifest, **{p.name: p.read_bytes() for p in sorted(out.glob("shard-*.tar"))}}


@pytest.fixture(scope="module")
def one_rank(bin_dir, small_yaml, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("one") / "ds"
    cli(bin_dir, "simulate", "--out", out, "--pairs", 10, "--shard-size", 3, "--seed", 7, "--physics", small_yaml)
    return out


def test_layout_and_manifest(one_rank):
    manifest = read_manifest(one_rank)
    assert [s["num_samples"] for s in manifest["shards"]] == [3, 3, 3, 1]
    assert manifest["num_samples"] == 10 and manifest["seed"] == 7 and manifest["mode"] == "lensiam"
    assert manifest["image_shape"] == [40, 40] and manifest["config"]["instrument"]["num_pix"] == 40
    keys = set()
    with tarfile.open(one_rank / "shard-000000.tar") as tar:
        names = tar.getnames()
        for name in names:
            keys.add(name.split(".", 1)[0])
        member = tar.extractfile("000000_000001.view1.npy").read()
        params = json.loads(tar.extractfile("000000_000001.params.json").read())
    assert len(keys) == 3 and len(names) == 9
    import io

    view = np.load(io.BytesIO(member))
    assert view.dtype == np.float32 and view.shape == (40, 40) and view.max() == pytest.approx(1.0)
    assert set(params["lens"]) == set(LENS_PARAMS) and len(params["views"]) == 2
    assert not list(one_rank.glob(".tmp-*"))


@pytest.mark.slow
def test_two_ranks_equal_one_rank_byte_for_byte(bin_dir, small_yaml, one_rank, tmp_path):
    out = tmp_path / "two"
    proc = cli(
        bin_dir,
        "simulate",
        "--out",
        out,
        "--pairs",
        10,
        "--shard-size",
        3,
        "--seed",
        7,
        "--physics",
        small_yaml,
        ranks=2,
    )
    assert "2 rank(s)" in proc.stdout
    assert contents(out) == contents(one_rank)


def test_rerun_is_a_noop(bin_dir, small_yaml, one_rank):
    before = {p.name: p.stat().st_mtime_ns for p in one_rank.glob("shard-*.tar")}
    proc = cli(
        bin_dir, "simulate", "--out", one_rank, "--pairs", 10, "--shard-size", 3, "--seed", 7, "--physics", small_yaml
    )
    assert "wrote 0 new samples (10 already done)" in proc.stdout
    assert {p.name: p.stat().st_mtime_ns for p in one_rank.glob("shard-*.tar")} == before


@pytest.mark.slow
def test_killed_run_resumes_to_identical_data(bin_dir, small_yaml, tmp_path):
    args = ["simulate", "--pairs", 40, "--shard-size", 2, "--seed", 3, "--physics", small_yaml]
    ref = tmp_path / "ref"
    cli(bin_dir, *args, "--out", ref)
    out = tmp_path / "killed"
    proc = subprocess.Popen(
        [str(bin_dir / "hpc-lensiam"), *map(str, args), "--out", str(out)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 300
    while time.time() < deadline and len(list(out.glob("shard-*.tar"))) < 2:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = sorted(p.name for p in out.glob("shard-*.tar"))
    assert 2 <= len(done) < 20, "the run should have been killed part-way"
    assert not (out / "manifest.json").exists()
    cli(bin_dir, *args, "--out", out)
    assert contents(out) == contents(ref)
    assert not list(out.glob(".tmp-*"))


def test_single_mode_and_show(bin_dir, small_yaml, tmp_path):
    out = tmp_path / "single"
    cli(
        bin_dir,
        "simulate",
        "--out",
        out,
        "--pairs",
        4,
        "--shard-size",
        4,
        "--samples",
        "single",
        "--preset",
        "euclid",
        "--physics",
        small_yaml,
    )
    manifest = read_manifest(out)
    assert manifest["mode"] == "single" and manifest["config"]["instrument"]["pixel_scale_arcsec"] == 0.1
    with tarfile.open(out / "shard-000000.tar") as tar:
        assert sorted(n.split(".", 1)[1] for n in tar.getnames())[:2] == ["image.npy", "image.npy"]
    png = tmp_path / "grid.png"
    cli(bin_dir, "show", out, "--out", png, "-n", 3)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _bad(bin_dir, tmp_path, *args) -> str:
    out = tmp_path / "bad"
    proc = cli(bin_dir, "simulate", "--out", out, "--pairs", 2, "--shard-size", 2, *args, check=False)
    line = one_error_line(proc)
    assert not out.exists(), "a rejected run must write nothing"
    return line


def test_bad_inputs_fail_with_one_line_and_write_nothing(bin_dir, tmp_path, small_yaml, one_rank):
    typo = tmp_path / "typo.yaml"
    typo.write_text("lens:\n  theta_e_arcsec: [1, 2]\n")
    assert "unknown key 'theta_e_arcsec'" in _bad(bin_dir, tmp_path, "--physics", typo)
    flipped = tmp_path / "flipped.yaml"
    flipped.write_text("lens:\n  gamma: [2.5, 1.5]\n")
    assert "min > max" in _bad(bin_dir, tmp_path, "--physics", flipped)
    negative = tmp_path / "negative.yaml"
    negative.write_text("lens:\n  theta_E_arcsec: [0.0, 1.0]\n")
    assert "theta_E_arcsec" in _bad(bin_dir, tmp_path, "--physics", negative)
    assert "cosmos" in _bad(bin_dir, tmp_path, "--cosmos-dir", tmp_path / "nowhere").lower()
    broken_psf = tmp_path / "psf.fits"
    broken_psf.write_bytes(b"not a fits file")
    assert "psf.fits" in _bad(bin_dir, tmp_path, "--psf", broken_psf)
    assert "--pairs" in _bad(bin_dir, tmp_path, "--pairs", 0)

    # A folder that holds another data set (other seed) is refused, and left untouched.
    before = contents(one_rank)
    proc = cli(
        bin_dir,
        "simulate",
        "--out",
        one_rank,
        "--pairs",
        10,
        "--shard-size",
        3,
        "--seed",
        8,
        "--physics",
        small_yaml,
        check=False,
    )
    assert proc.returncode == 2 and "different data set (seed: 7 there, 8 asked)" in proc.stderr
    assert contents(one_rank) == before


def test_singleton_trap_is_refused(bin_dir, tmp_path, small_yaml):
    """Two processes that each think they are 'rank 0 of 1' (plain srun) must not write shards."""
    env = {**os.environ, "SLURM_STEP_ID": "0", "SLURM_PROCID": "0", "SLURM_STEP_NUM_TASKS": "2", "SLURM_NTASKS": "2"}
    out = tmp_path / "trap"
    proc = cli(
        bin_dir,
        "simulate",
        "--out",
        out,
        "--pairs",
        2,
        "--shard-size",
        1,
        "--physics",
        small_yaml,
        check=False,
        env=env,
    )
    assert proc.returncode == 2 and "mpiexec" in proc.stderr, proc.stderr
    assert not out.exists()
