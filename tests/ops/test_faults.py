"""Faults and bad input, each produced for real (issue 12's table, one test per row, plus the cases
that already held). Nothing lost, nothing silently corrupted, one `hpc-lensiam: error:` line.

Sizes are tiny (32 px, resnet18 with small heads, 2-3 steps); the slow ones run subprocesses.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest

from hpc_lensiam.core.errors import ConfigError, UserError
from hpc_lensiam.core.io import sha256_file
from hpc_lensiam.shards.manifest import read_manifest
from hpc_lensiam.simulate.config import simulation_config
from support import (
    BIN,
    REPO,
    launcher_env,
    one_error_line,
    rerecord_shard,
    simulate_into,
    tiny_config,
    torchrun_cmd,
    train_tiny,
)

SMALL = {"instrument": {"num_pix": 32}}


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


def cli(*args, timeout: int = 300, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(BIN / "hpc-lensiam"), *map(str, args)], capture_output=True, text=True, timeout=timeout, env=_env(), **kw
    )


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """24 pairs in 6 shards of 4, 32 px."""
    return simulate_into(
        tmp_path_factory.mktemp("faults") / "data",
        num_samples=24,
        shard_size=4,
        mode="lensiam",
        seed=3,
        overrides=SMALL,
    )


@pytest.fixture
def copy(data, tmp_path) -> Path:
    return Path(shutil.copytree(data, tmp_path / "copy"))


def _flip(path: Path, offset_from_end: int = 2000) -> None:
    """Flip one byte inside the last sample's image data (same size, valid tar)."""
    raw = bytearray(path.read_bytes())
    with tarfile.open(path) as tar:
        member = [m for m in tar.getmembers() if m.name.endswith("view1.npy")][-1]
    raw[member.offset_data + 200] ^= 0x40
    path.write_bytes(bytes(raw))


def _member_boundary(path: Path) -> int:
    """Byte offset of the start of the last sample's first member (a clean cut between samples)."""
    with tarfile.open(path) as tar:
        members = tar.getmembers()
    last_key = members[-1].name.split(".", 1)[0]
    return next(m.offset for m in members if m.name.startswith(last_key + "."))


# ---------------------------------------------------------------------------------- integrity
def test_manifest_records_size_and_inputs(data):
    manifest = read_manifest(data)
    for entry in manifest["shards"]:
        path = data / entry["name"]
        assert entry["size"] == path.stat().st_size and entry["sha256"] == sha256_file(path)
    assert manifest["inputs"] == {"psf_files": {}} and manifest["inputs_sha256"]


def test_flipped_byte_found_by_verify_and_train_verify_embed_finetune(copy, tmp_path):
    """Row: bytes flipped inside a shard's image were used by train, embed and finetune."""
    from hpc_lensiam.data.loader import ShardError
    from hpc_lensiam.shards.integrity import check_shards, verify_dataset
    from hpc_lensiam.shards.reader import load_images

    _flip(copy / "shard-000002.tar")
    bad = verify_dataset(copy, progress=False)
    assert len(bad) == 1 and "shard-000002.tar" in bad[0] and "sha256" in bad[0]
    with pytest.raises(ShardError, match=r"shard-000002\.tar.*sha256"):
        train_tiny(copy, tmp_path / "run", verify=True)
    assert not (tmp_path / "run" / "checkpoints").exists()
    with pytest.raises(UserError, match=r"shard-000002\.tar.*sha256"):
        load_images(copy, 4, verify=True)  # finetune's reader
    with pytest.raises(UserError, match=r"shard-000002\.tar.*sha256"):
        check_shards(copy, verify=True)  # embed's check
    line = one_error_line(cli("verify", copy))
    assert "1 bad shard(s): shard-000002.tar" in line


def test_verify_names_every_bad_shard(copy):
    _flip(copy / "shard-000001.tar")
    (copy / "shard-000003.tar").write_bytes((copy / "shard-000003.tar").read_bytes()[:5000])
    (copy / "shard-000005.tar").unlink()
    proc = cli("verify", copy)
    assert proc.returncode == 2
    for name, why in (("shard-000001.tar", "sha256"), ("shard-000003.tar", "size"), ("shard-000005.tar", "missing")):
        assert any(name in line and why in line for line in proc.stderr.splitlines()), proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("hpc-lensiam: error: ")
    assert cli("verify", copy.parent.parent / "absent").returncode == 2


def test_shard_cut_at_a_member_boundary(copy):
    """Row: a shard cut between two samples trained on half the shard without a warning."""
    from hpc_lensiam.data.loader import ShardError, ShardLoader
    from hpc_lensiam.shards.tar import read_shard

    path = copy / "shard-000004.tar"
    path.write_bytes(path.read_bytes()[: _member_boundary(path)])
    with pytest.raises(EOFError, match="end-of-archive"):
        list(read_shard(str(path)))
    with pytest.raises(ShardError, match=r"shard-000004\.tar.*size"):
        ShardLoader(str(copy), "lens", 4, workers=0)
    # a manifest without sizes (older data sets): the read itself still refuses the cut shard
    manifest = json.loads((copy / "manifest.json").read_text())
    for entry in manifest["shards"]:
        entry.pop("size")
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ShardError, match=r"shard-000004\.tar.*end-of-archive"):
        for _ in ShardLoader(str(copy), "lens", 4, workers=0).epoch(0):
            pass


def test_simulate_rerun_redoes_truncated_and_flipped_shards(copy):
    """Row: the rerun only checked that files exist and rehashed corrupt files into the manifest."""
    before = {p.name: p.read_bytes() for p in copy.glob("shard-*.tar")}
    manifest = read_manifest(copy)
    _flip(copy / "shard-000001.tar")
    (copy / "shard-000002.tar").write_bytes(before["shard-000002.tar"][:7000])
    again = simulate_into(copy, num_samples=24, shard_size=4, mode="lensiam", seed=3, overrides=SMALL)
    assert {p.name: p.read_bytes() for p in copy.glob("shard-*.tar")} == before
    assert read_manifest(again) == manifest
    # a killed run (no manifest yet): the records made when each shard was written decide
    (copy / "manifest.json").unlink()
    _flip(copy / "shard-000003.tar")
    simulate_into(copy, num_samples=24, shard_size=4, mode="lensiam", seed=3, overrides=SMALL)
    assert {p.name: p.read_bytes() for p in copy.glob("shard-*.tar")} == before
    assert read_manifest(copy) == manifest


def test_nan_pixel_named_at_write_and_read(copy, tmp_path):
    """Row: one NaN pixel: training stopped without naming the sample; embed wrote a NaN row."""
    import webdataset as wds

    from hpc_lensiam.data.loader import ShardError, ShardLoader
    from hpc_lensiam.shards.integrity import IntegrityError
    from hpc_lensiam.shards.manifest import npy_bytes
    from hpc_lensiam.shards.reader import load_images
    from hpc_lensiam.shards.tar import read_shard
    from hpc_lensiam.shards.writer import encode_sample

    image = np.ones((4, 4), np.float32)
    image[1, 2] = np.nan
    with pytest.raises(IntegrityError, match=r"x\.tar sample 'k1': 1 non-finite pixel\(s\) in view2\.npy"):
        encode_sample("k1", {"params": {}, "view1": np.ones((4, 4)), "view2": image}, "x.tar")

    path = copy / "shard-000000.tar"
    samples = list(read_shard(str(path)))
    nan_image = np.load(__import__("io").BytesIO(samples[2]["view1.npy"]))
    nan_image[5, 5] = np.nan
    samples[2]["view1.npy"] = npy_bytes(nan_image)
    with wds.TarWriter(str(path), encoder=False) as tar:
        for s in samples:
            tar.write({k: v for k, v in s.items() if k != "__url__"})
    rerecord_shard(copy, path.name)  # written that way: the manifest vouches for the shard
    key = samples[2]["__key__"]
    with pytest.raises(ShardError, match=rf"shard-000000\.tar sample '{key}': 1 non-finite pixel"):
        for _ in ShardLoader(str(copy), "lens", 4, workers=0).epoch(0):
            pass
    with pytest.raises(UserError, match=rf"sample '{key}': 1 non-finite"):
        load_images(copy, 8)
    line = one_error_line(cli("show", copy, "--out", tmp_path / "grid.png", "-n", 8))
    assert key in line and not (tmp_path / "grid.png").exists()


def test_embed_never_writes_nan_rows_and_probe_umap_refuse_them(copy, tmp_path):
    import h5py
    import torch

    from hpc_lensiam.embed.extract import extract_embeddings
    from hpc_lensiam.embed.probe import probe
    from hpc_lensiam.embed.umap import run_umap
    from hpc_lensiam.models.weights import load_checkpoint
    from hpc_lensiam.train.checkpoint import save_checkpoint

    run = train_tiny(copy, tmp_path / "run", batch_size=4)
    ckpt = load_checkpoint(run / "checkpoints" / "last.pt")
    ckpt["model"] = {
        k: (torch.full_like(v, float("nan")) if k == "encoder.bn1.weight" else v) for k, v in ckpt["model"].items()
    }
    save_checkpoint(tmp_path / "nan.pt", ckpt)
    with pytest.raises(UserError, match="non-finite features for sample"):
        extract_embeddings(str(tmp_path / "nan.pt"), str(copy), str(tmp_path / "emb.h5"), progress=False)
    assert not (tmp_path / "emb.h5").exists()

    extract_embeddings(str(run / "checkpoints" / "last.pt"), str(copy), str(tmp_path / "emb.h5"), progress=False)
    with h5py.File(tmp_path / "emb.h5", "r+") as f:
        f["features"][5, 3] = np.nan
        key = f["keys"].asstr()[5]
    with pytest.raises(UserError, match=rf"1 row\(s\) with non-finite features \(first: key '{key}'\)"):
        probe(str(tmp_path / "emb.h5"))
    with pytest.raises(UserError, match="non-finite features"):
        run_umap(str(tmp_path / "emb.h5"), str(tmp_path / "u.png"))
    one_error_line(cli("probe", "--embeddings", tmp_path / "emb.h5"))


# ------------------------------------------------------------------------------------- locks
def test_second_simulate_into_a_locked_folder_fails_at_once_naming_the_holder(data, tmp_path):
    """Row: two simulate jobs into one --out gave a mixed data set."""
    from hpc_lensiam.core.lock import DirLock

    out = tmp_path / "sim"
    with DirLock(out, "simulate"):
        line = one_error_line(cli("simulate", "--out", out, "--pairs", 4, "--shard-size", 2, "--seed", 1))
    assert f"in use by another job, host {os.uname().nodename} pid {os.getpid()} (simulate, since" in line
    assert not list(out.glob("shard-*")) and not (out / ".plan.json").exists()


def test_two_simulate_jobs_started_one_second_apart(tmp_path):
    """The real race: job B (another seed) starts while job A writes; B is refused, A completes."""
    out = tmp_path / "race"
    yaml_path = tmp_path / "small.yaml"
    yaml_path.write_text("instrument:\n  num_pix: 32\n")
    a = subprocess.Popen(
        [
            str(BIN / "hpc-lensiam"),
            "simulate",
            "--out",
            str(out),
            "--pairs",
            "40",
            "--shard-size",
            "2",
            "--seed",
            "0",
            "--physics",
            str(yaml_path),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(),
    )
    deadline = time.time() + 120
    while time.time() < deadline and not (out / ".lock").is_file():
        time.sleep(0.05)
    time.sleep(1)
    b = cli("simulate", "--out", out, "--pairs", 40, "--shard-size", 2, "--seed", 1, "--physics", yaml_path)
    a_out, a_err = a.communicate(timeout=600)
    assert a.returncode == 0, a_err[-2000:]
    line = one_error_line(b)
    assert "in use by another job" in line or "different data set (seed: 0 there, 1 asked)" in line
    manifest = read_manifest(out)
    assert manifest["seed"] == 0 and json.loads((out / ".plan.json").read_text())["seed"] == 0
    from hpc_lensiam.shards.integrity import verify_dataset

    assert verify_dataset(out, progress=False) == []


def test_lock_is_released_when_its_holder_is_killed(tmp_path):
    code = (
        f"from hpc_lensiam.core.lock import DirLock; import time; DirLock({str(tmp_path)!r}, 'train').acquire(); "
        f"print('held', flush=True); time.sleep(600)"
    )
    from hpc_lensiam.core.lock import DirLock

    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=_env())
    assert proc.stdout.readline().strip() == "held"
    with pytest.raises(UserError, match=rf"in use by another job, host .* pid {proc.pid} \(train, since"):
        DirLock(tmp_path, "simulate").acquire()
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    DirLock(tmp_path, "simulate").acquire().release()


def test_second_train_into_a_locked_run_fails_naming_the_holder(data, tmp_path):
    """Row: two train runs into one --out both exited 0, run A's checkpoints overwritten."""
    from hpc_lensiam.core.lock import DirLock

    run = tmp_path / "run"
    with DirLock(run, "train"):
        with pytest.raises(UserError, match=rf"{run}: in use by another job, host .* pid {os.getpid()} \(train"):
            train_tiny(data, run, batch_size=4)
    assert sorted(p.name for p in run.iterdir()) == [".lock"]  # nothing written


# ------------------------------------------------------------------------------------ resume
@pytest.fixture(scope="module")
def run_a(data, tmp_path_factory) -> Path:
    return train_tiny(data, tmp_path_factory.mktemp("runs") / "a", batch_size=4, ckpt_every=1)


@pytest.fixture
def run_copy(run_a, tmp_path) -> Path:
    run = Path(shutil.copytree(run_a, tmp_path / "run"))
    (run / ".lock").unlink(missing_ok=True)
    return run


def _resume(data, run, **kw):
    """--resume of the tiny recipe with 4 per rank, to step 3, a checkpoint every step."""
    from hpc_lensiam.train.loop import train

    allow = kw.pop("allow_config_change", False)
    cfg = tiny_config(data, run, **{"batch_size": 4, "max_steps": 3, "ckpt_every": 1, **kw})
    return train(cfg, resume=True, allow_config_change=allow)


def test_checkpoint_records_config_hash_and_data(run_a, data):
    from hpc_lensiam.models.weights import load_checkpoint
    from hpc_lensiam.train.rundir import config_hash

    ckpt = load_checkpoint(run_a / "checkpoints" / "last.pt")
    assert ckpt["data_manifest_sha256"] == sha256_file(data / "manifest.json")
    assert ckpt["config_hash"] == config_hash(ckpt["config"])


@pytest.mark.parametrize(
    "change, named",
    [
        ({"seed": 1}, "seed 0 -> 1"),
        ({"base_lr": 0.06}, "base_lr 0.03 -> 0.06"),
        ({"views": "standard"}, "views 'lens' -> 'standard'"),
        ({"batch_size": 2}, "batch_size 4 -> 2"),
    ],
)
def test_resume_with_changed_settings_is_refused(run_copy, data, change, named):
    """Row: --resume with another --seed/--base-lr/--views continued silently, config.yaml rewritten."""
    first = (run_copy / "config.yaml").read_text()
    with pytest.raises(
        UserError,
        match="--resume: .*last.pt \\(step 2\\) was trained with other settings: "
        + named.replace("(", r"\(").replace(")", r"\)"),
    ):
        _resume(data, run_copy, **change)
    assert (run_copy / "config.yaml").read_text() == first


def test_resume_with_other_data_is_refused_then_allowed_and_recorded(run_copy, data, tmp_path):
    other = simulate_into(tmp_path / "other", num_samples=24, shard_size=4, mode="lensiam", seed=4, overrides=SMALL)
    first = (run_copy / "config.yaml").read_text()
    with pytest.raises(UserError, match=r"other settings: data .*manifest sha256"):
        _resume(other, run_copy)
    assert _resume(other, run_copy, seed=5, allow_config_change=True)["step"] == 3
    assert (run_copy / "config.1.yaml").read_text() == first  # config.yaml is now the config used
    import yaml

    history = yaml.safe_load((run_copy / "config_history.yaml").read_text())
    assert len(history) == 1 and history[0]["resumed_at_step"] == 2
    assert set(history[0]["changed"]) == {"data", "seed"} and history[0]["changed"]["seed"] == {"before": 0, "after": 5}


def test_refusal_advice_works_after_an_allowed_change(run_copy, data):
    """Row (issue 25): after --allow-config-change, the refusal's advice (resume with RUN/config.yaml)
    failed: that file kept the first config. Now it is the config used, the first kept as config.1.yaml."""
    import yaml

    from hpc_lensiam.train.loop import train, train_config

    first = (run_copy / "config.yaml").read_text()
    assert _resume(data, run_copy, seed=5, allow_config_change=True)["step"] == 3
    with pytest.raises(UserError, match=r"seed 5 -> 0; use the run's own settings \(RUN/config\.yaml\)"):
        _resume(data, run_copy, max_steps=4)
    assert train(train_config(str(run_copy / "config.yaml"), max_steps=4), resume=True)["step"] == 4  # the advice
    assert (run_copy / "config.1.yaml").read_text() == first
    assert train_config(str(run_copy / "config.yaml")).seed == 5
    history = yaml.safe_load((run_copy / "config_history.yaml").read_text())
    assert history[0]["previous_config"] == "config.1.yaml" and history[0]["changed"]["seed"]["after"] == 5


@pytest.mark.slow  # a long end-to-end run (12-14 s): make test, not test-fast
def test_resume_through_a_copied_run_folders_config_trains_the_copy(data, tmp_path):
    """Row (issue 25): `--config copy/config.yaml --resume` trained the ORIGINAL run (the copied
    config.yaml's `out:` names it). A run folder's own config.yaml trains the folder it sits in."""
    import yaml

    from hpc_lensiam.models.weights import load_checkpoint
    from hpc_lensiam.train.loop import train, train_config

    orig = train_tiny(data, tmp_path / "orig", batch_size=4)
    copy_run = Path(shutil.copytree(orig, tmp_path / "copy"))
    assert yaml.safe_load((copy_run / "config.yaml").read_text())["out"] == str(orig)  # as copied
    before = {p.name: p.read_bytes() for p in (orig / "checkpoints").iterdir()}
    metrics = (orig / "metrics.csv").read_text()
    assert train(train_config(str(copy_run / "config.yaml"), max_steps=3), resume=True)["step"] == 3
    assert load_checkpoint(copy_run / "checkpoints" / "last.pt")["step"] == 3
    assert {p.name: p.read_bytes() for p in (orig / "checkpoints").iterdir()} == before
    assert (orig / "metrics.csv").read_text() == metrics
    # an explicit --out still wins over the folder the config sits in
    assert train_config(str(copy_run / "config.yaml"), out=str(tmp_path / "new")).out == str(tmp_path / "new")


def test_refusals_before_training_leave_nothing_behind(data, run_copy, tmp_path):
    """Row (issue 25): data-shape refusals left an empty run folder holding a .lock."""
    for kw, named in (({"batch_size": 100}, "batch larger than the data"), ({"arch": "vit_tiny_p10"}, "patch size")):
        with pytest.raises(UserError, match=named):
            train_tiny(data, tmp_path / "new" / "run", **kw)
        assert not (tmp_path / "new").exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserError, match="batch larger than the data"):
        train_tiny(data, empty, batch_size=100)
    assert list(empty.iterdir()) == []
    files = sorted(p.relative_to(run_copy) for p in run_copy.rglob("*"))  # a copy without its .lock
    with pytest.raises(UserError, match="other settings: seed 0 -> 1"):
        _resume(data, run_copy, seed=1)
    assert sorted(p.relative_to(run_copy) for p in run_copy.rglob("*")) == files


def test_resume_from_a_moved_copy_of_the_same_data_is_allowed(run_copy, data, tmp_path):
    moved = Path(shutil.copytree(data, tmp_path / "moved"))
    assert _resume(moved, run_copy)["step"] == 3


def test_resume_refusal_is_one_line_from_the_cli(run_copy, data):
    line = one_error_line(
        cli(
            "train",
            "--data",
            data,
            "--out",
            run_copy,
            "--arch",
            "resnet18",
            "--batch-size",
            4,
            "--max-steps",
            3,
            "--epochs",
            1,
            "--workers",
            0,
            "--proj-dim",
            64,
            "--pred-dim",
            16,
            "--seed",
            7,
            "--resume",
        )
    )
    assert "seed 0 -> 7" in line and "--allow-config-change" in line


def test_damaged_metrics_tail_and_leftover_temp_files_do_not_break_resume(run_copy, data):
    """Row: a damaged metrics.csv tail made --resume fail with a traceback."""
    with open(run_copy / "metrics.csv", "a") as f:
        f.write("3,0.75,-0.1\x00\x00garbage\n4,1.0,nan")  # a torn write, then a cut line
    stale = run_copy / "checkpoints" / ".tmp-last.pt.abc123"
    stale.write_bytes(b"partial")
    assert _resume(data, run_copy)["step"] == 3
    lines = (run_copy / "metrics.csv").read_text().splitlines()
    from hpc_lensiam.train.monitor import METRICS

    assert lines[0] == ",".join(METRICS) and lines[0].startswith("step,epoch,loss,lr,z_std,pairs_per_s,images_per_s")
    assert [int(r.split(",")[0]) for r in lines[1:]] == [1, 2, 3]
    assert not stale.exists()


# -------------------------------------------------------------------------------- provenance
def _psf_fits(path: Path, sigma_pix: float) -> Path:
    from astropy.io import fits

    y, x = np.mgrid[-10:11, -10:11]
    fits.PrimaryHDU((np.exp(-(x**2 + y**2) / (2 * sigma_pix**2))).astype(np.float32)).writeto(path)
    return path


def test_psf_file_changed_between_killed_run_and_rerun_is_refused(tmp_path):
    """Row: the data set mixed two PSFs (only the path was recorded)."""
    from hpc_lensiam.simulate.writer import simulate_shards

    psf = _psf_fits(tmp_path / "psf.fits", 1.5)
    kw = dict(
        num_samples=4,
        shard_size=2,
        mode="lensiam",
        seed=0,
        overrides=SMALL,
        psf_files=[str(psf)],
        psf_pixel_scale_arcsec=0.05,
        progress=False,
    )
    out = tmp_path / "ds"
    manifest = simulate_shards(out_dir=str(out), **kw)
    assert manifest["inputs"]["psf_files"] == {str(psf.resolve()): sha256_file(psf)}
    (out / "manifest.json").unlink()  # as if killed before the end
    (out / "shard-000001.tar").unlink()
    psf.unlink()
    _psf_fits(psf, 2.5)
    with pytest.raises(UserError, match=rf"other input files \(sha256 of {re.escape(str(psf.resolve()))} changed\)"):
        simulate_shards(out_dir=str(out), **kw)
    assert not (out / "shard-000001.tar").exists()


def test_finetune_same_seed_train_and_test_is_flagged(tmp_path, capfd):
    """Row: train and test simulated with the same seed: identical shards, test_from_train_set false."""
    from hpc_lensiam.downstream.finetune import finetune

    kw = dict(num_samples=16, shard_size=8, mode="single", preset="euclid", seed=0, overrides=SMALL)
    train_dir = simulate_into(tmp_path / "train", **kw)
    test_dir = simulate_into(tmp_path / "test", **kw)
    assert (train_dir / "shard-000000.tar").read_bytes() == (test_dir / "shard-000000.tar").read_bytes()
    common = dict(
        backbone="none",
        arch="resnet18",
        n_train=8,
        n_test=4,
        epochs=1,
        batch_size=8,
        freeze_backbone=True,
        progress=False,
        n_boot=50,
    )
    report = finetune(train_dir=str(train_dir), test_dir=str(test_dir), **common)
    assert report["test_from_train_set"] is True and report["test_images_in_train"] == 0
    # the same seed with another shard size: no identical shard, but identical images
    other = simulate_into(tmp_path / "test4", **{**kw, "shard_size": 4})
    report = finetune(train_dir=str(train_dir), test_dir=str(other), **common)
    assert report["test_from_train_set"] is False and report["test_images_in_train"] == 4
    assert "4 of 4 test images also appear in the training samples" in capfd.readouterr().err


# -------------------------------------------------------------------------- validation at the door
@pytest.mark.parametrize(
    "yaml_text, named",
    [
        ("lens:\n  theta_E_arcsec: [.nan, 1]\n", "lens.theta_E_arcsec: expected a finite number"),
        ("instrument:\n  noise_sigma: [0.01, .inf]\n", "instrument.noise_sigma: expected a finite number"),
        ("lens:\n  center_x_arcsec: [49, 51]\n", "lens.center_x_arcsec: range [49.0, 51.0] reaches outside the field"),
        ("source:\n  center_arcsec: [-2.7, 2.7]\n", "source.center_arcsec: range [-2.7, 2.7] around a lens"),
    ],
)
def test_simulation_config_out_of_domain(tmp_path, yaml_text, named):
    path = tmp_path / "c.yaml"
    path.write_text(yaml_text)
    with pytest.raises(ConfigError, match=named.replace("[", r"\[").replace("]", r"\]")):
        simulation_config(config_path=path)


@pytest.mark.parametrize(
    "flags, named",
    [
        ({"seed": -1}, "seed: must be >= 0"),
        ({"momentum": -1.0}, r"momentum: -1.0 is not in \[0, 1\)"),
        ({"momentum": 1.0}, "momentum: 1.0 is not in"),
        ({"warmup_epochs": float("inf")}, "warmup_epochs: expected a finite"),
        ({"base_lr": float("nan")}, "base_lr: expected a finite"),
        ({"weight_decay": -1e-4}, "weight_decay: must be >= 0"),
    ],
)
def test_train_config_out_of_domain(flags, named):
    from hpc_lensiam.train.loop import train_config

    with pytest.raises(ConfigError, match=named):
        train_config(**flags)


def test_bad_values_fail_at_the_door_in_one_line_writing_nothing(tmp_path, data):
    nan_yaml = tmp_path / "nan.yaml"
    nan_yaml.write_text("lens:\n  theta_E_arcsec: [.nan, 1]\n")
    assert "theta_E_arcsec" in one_error_line(
        cli("simulate", "--out", tmp_path / "s", "--pairs", 2, "--physics", nan_yaml)
    )
    assert "--seed: must be >= 0" in one_error_line(
        cli("simulate", "--out", tmp_path / "s", "--pairs", 2, "--seed", -1)
    )
    assert "--warmup-epochs: expected a finite" in one_error_line(
        cli("train", "--data", data, "--out", tmp_path / "r", "--warmup-epochs", "inf")
    )
    assert "momentum" in one_error_line(cli("train", "--data", data, "--out", tmp_path / "r", "--momentum", -1))
    assert not (tmp_path / "s").exists() and not (tmp_path / "r").exists()


def test_existing_file_where_a_folder_goes(tmp_path, data):
    """Row: an existing file where a folder goes gave a traceback after the compute."""
    blocker = tmp_path / "taken"
    blocker.write_text("x")
    assert "exists and is not a folder" in one_error_line(cli("simulate", "--out", blocker, "--pairs", 2))
    assert "exists and is not a folder" in one_error_line(
        cli("train", "--data", data, "--out", blocker, "--arch", "resnet18")
    )
    assert "is not a folder" in one_error_line(cli("show", data, "--out", blocker / "grid.png"))
    assert blocker.read_text() == "x"


def test_png_given_as_a_checkpoint(tmp_path, data):
    """Row: a PNG as a checkpoint: a traceback advising weights_only=False (code execution)."""
    png = tmp_path / "pairs.png"
    png.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(100))
    for args in (
        ("embed", "--checkpoint", png, "--data", data, "--out", tmp_path / "e.h5"),
        ("export", "--checkpoint", png, "--out", tmp_path / "b.pt"),
        ("finetune", "--backbone", png, "--train", data, "--test", data, "--arch", "resnet18"),
    ):
        line = one_error_line(cli(*args))
        assert "not a PyTorch checkpoint" in line and "weights_only" not in line, line


@pytest.fixture
def tiny_fs(tmp_path):
    """A 160 kB tmpfs (root only): a real full disk, then remounted read-only."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    if (
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=160k", "tmpfs", str(mnt)], capture_output=True).returncode
        != 0
    ):
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_disk_full_and_read_only_output(tiny_fs):
    """Row: disk full and read-only output gave tracebacks, some only after the compute.
    (A disk that fills while shards are written: test_disk_full_while_writing_shards_...)"""
    out = tiny_fs / "ds"
    line = one_error_line(cli("simulate", "--out", out, "--pairs", 40, "--shard-size", 20, "--seed", 0))
    # issue 25: the planned size is checked against the free space before anything is written
    assert (
        f"--pairs 40: the data set needs about 3.97 MB (99328 bytes per sample x 40 samples), but --out {out}" in line
    )
    assert not out.exists()  # nothing written at all, not even .plan.json
    subprocess.run(["mount", "-o", "remount,ro", str(tiny_fs)], check=True)
    line = one_error_line(cli("simulate", "--out", tiny_fs / "ro", "--pairs", 2, "--shard-size", 2))
    assert "Read-only file system" in line and "ro" in line
    line = one_error_line(cli("show", out, "--out", tiny_fs / "grid.png"))  # checked before reading data
    assert "not writable" in line


def test_disk_full_while_saving_a_checkpoint_is_one_line(tiny_fs, data):
    """Row (disk full), at the checkpoint: torch.save reports a full disk as a bare RuntimeError
    ("enforce fail ... unexpected pos"), which was a traceback; now one line naming last.pt."""
    run = tiny_fs / "run"
    proc = cli(
        "train",
        "--data",
        data,
        "--out",
        run,
        "--arch",
        "resnet18",
        "--batch-size",
        4,
        "--max-steps",
        1,
        "--epochs",
        1,
        "--workers",
        0,
        "--proj-dim",
        64,
        "--pred-dim",
        16,
    )
    line = one_error_line(proc)
    assert "No space left on device" in line and "last.pt" in line, line
    assert not list((run / "checkpoints").glob(".tmp-*")) and not (run / "checkpoints" / "last.pt").exists()


# ------------------------------------------------------------------------- prompt, one line
def _unreadable_in_a_worker(data: Path) -> None:
    """Cut shard 3 mid-member and let the manifest vouch for it: only a worker's read finds it."""
    path = data / "shard-000003.tar"
    path.write_bytes(path.read_bytes()[:9000])
    rerecord_shard(data, path.name)


def test_worker_error_leaves_no_worker_behind(copy):
    """Row: a worker's error printed at 4 s but the job exited at 105 s: its workers outlived the
    loader (a 100 s alarm in their SIGTERM handler ended them at interpreter exit)."""
    import multiprocessing

    from hpc_lensiam.data.loader import ShardError, ShardLoader

    _unreadable_in_a_worker(copy)
    with pytest.raises(ShardError, match=r"shard-000003\.tar.*cannot read"):
        for _ in ShardLoader(str(copy), "lens", 2, workers=2).epoch(0):
            pass
    assert multiprocessing.active_children() == []


@pytest.mark.slow
def test_worker_error_ends_the_job_with_one_line(copy, tmp_path):
    _unreadable_in_a_worker(copy)
    proc = cli(
        "train",
        "--data",
        copy,
        "--out",
        tmp_path / "run",
        "--arch",
        "resnet18",
        "--batch-size",
        2,
        "--max-steps",
        3,
        "--workers",
        2,
        "--proj-dim",
        64,
        "--pred-dim",
        16,
        "--log-every",
        100,
    )
    # before: "DataLoader worker (pid N) is killed by signal: Alarm clock" traceback at exit, 100 s later
    assert "shard-000003.tar" in one_error_line(proc)


@pytest.mark.slow
def test_user_error_under_torchrun_is_one_line_exit_2(tmp_path):
    """Row: any user error under torchrun: rank 0's line, ~30 lines from torchrun, exit 1."""
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "hpc_lensiam.launch",
            "--standalone",
            "--nproc_per_node",
            "2",
            "-m",
            "hpc_lensiam",
            "train",
            "--data",
            str(tmp_path / "absent"),
            "--out",
            str(tmp_path / "run"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=_env(),
    )
    assert "no such data directory" in one_error_line(proc)
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_resume_never_runs_beside_trainers_left_by_a_killed_agent(data, tmp_path):
    """Row: kill -9 of the torchrun agent: its trainers ran on and a --resume then ran beside them.
    Either the trainers die with their agent (issue 11's PR_SET_PDEATHSIG) or they still hold
    RUN/.lock and the resume is refused naming them: never two writers."""
    run = tmp_path / "run"
    args = [
        "--data",
        str(data),
        "--out",
        str(run),
        "--arch",
        "resnet18",
        "--batch-size",
        "4",
        "--epochs",
        "1000",
        "--workers",
        "0",
        "--proj-dim",
        "64",
        "--pred-dim",
        "16",
        "--ckpt-every",
        "1",
    ]
    agent = subprocess.Popen(
        torchrun_cmd(1) + ["train", *args],
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    trainer = None
    try:
        deadline = time.time() + 300
        while time.time() < deadline and not (run / "checkpoints" / "last.pt").is_file():
            time.sleep(0.2)
        assert (run / "checkpoints" / "last.pt").is_file()
        trainer = int((run / ".lock").read_text().split(" pid ")[1].split()[0])
        agent.kill()
        agent.wait()
        proc = cli("train", *args, "--max-steps", "1", "--resume")
        if proc.returncode == 2:
            assert f"in use by another job, host {os.uname().nodename} pid {trainer} (train" in one_error_line(proc)
        else:  # only if the trainer died with its agent
            assert proc.returncode == 0, proc.stderr[-2000:]
            with pytest.raises(ProcessLookupError):
                os.kill(trainer, 0)
    finally:
        agent.kill()
        if trainer:
            try:
                os.kill(trainer, signal.SIGKILL)
            except ProcessLookupError:
                pass


# ------------------------------------------------------------------ issue 25: stale and outside
@pytest.mark.parametrize("name", ["../outside/shard-000001.tar", "ABS", "sub/../shard-000001.tar"])
def test_manifest_shard_name_leading_out_of_the_folder_is_refused(copy, tmp_path, name):
    """Issue 25: a manifest naming ``../x.tar`` made verify and the readers use a file outside the
    data folder (a good shard there: verify was clean). Only plain file names are accepted."""
    from hpc_lensiam.data.loader import ShardLoader
    from hpc_lensiam.shards.integrity import check_shards
    from hpc_lensiam.shards.reader import load_images

    outside = tmp_path / "outside"
    outside.mkdir()
    shutil.copy(copy / "shard-000001.tar", outside / "shard-000001.tar")
    name = str(outside / "shard-000001.tar") if name == "ABS" else name
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["shards"][1]["name"] = name
    (copy / "manifest.json").write_text(json.dumps(manifest))
    line = one_error_line(cli("verify", copy))
    assert f"{copy / 'manifest.json'}: shard entry 1 has name {name!r}, not a plain file name" in line, line
    for read in (
        lambda: ShardLoader(str(copy), "lens", 4, workers=0),
        lambda: load_images(copy, 4),
        lambda: check_shards(copy, verify=True),
    ):
        with pytest.raises(UserError, match="shard entry 1 has name .* not a plain file name"):
            read()
    assert "shard entry 1" in one_error_line(cli("show", copy, "--out", tmp_path / "grid.png"))
    assert not (tmp_path / "grid.png").exists()


def test_two_psf_files_of_one_name_edited_between_killed_run_and_rerun_is_refused(tmp_path):
    """Issue 25: psfA/p.fits and psfB/p.fits were recorded under one key "p.fits" (the last one's
    sha256), so editing psfA/p.fits between a killed run and its rerun gave a data set made with
    two PSFs and a clean verify. Both are recorded by resolved path, and the edited one is named."""
    from hpc_lensiam.simulate.writer import simulate_shards

    (tmp_path / "psfA").mkdir()
    (tmp_path / "psfB").mkdir()
    a, b = _psf_fits(tmp_path / "psfA" / "p.fits", 1.5), _psf_fits(tmp_path / "psfB" / "p.fits", 2.5)
    kw = dict(
        num_samples=4,
        shard_size=2,
        mode="lensiam",
        seed=0,
        overrides=SMALL,
        psf_files=[str(a), str(b)],
        psf_pixel_scale_arcsec=0.05,
        progress=False,
    )
    out = tmp_path / "ds"
    manifest = simulate_shards(out_dir=str(out), **kw)
    (out / "manifest.json").unlink()  # as if killed before the end
    (out / "shard-000001.tar").unlink()
    sha_a = sha256_file(a)
    a.unlink()
    _psf_fits(a, 3.5)
    with pytest.raises(UserError, match=rf"other input files \(sha256 of {re.escape(str(a.resolve()))} changed\)"):
        simulate_shards(out_dir=str(out), **kw)
    assert not (out / "shard-000001.tar").exists() and not (out / "manifest.json").exists()
    assert manifest["inputs"]["psf_files"] == {str(a.resolve()): sha_a, str(b.resolve()): sha256_file(b)}


@pytest.fixture
def small_fs(tmp_path):
    """A 4 MB tmpfs (root only): room for the planned data set, until another job fills it."""
    mnt = tmp_path / "mnt4"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def _fill(fs: Path) -> None:
    """Take every free byte of ``fs``, as another job filling the disk would."""
    import errno

    fd = os.open(fs / "filler", os.O_WRONLY | os.O_CREAT)
    try:
        while True:
            os.write(fd, bytes(1 << 16))
    except OSError as exc:
        assert exc.errno == errno.ENOSPC
    finally:
        os.close(fd)


@pytest.mark.parametrize("ranks", [1, pytest.param(2, marks=pytest.mark.slow)])  # 2: mpiexec
def test_disk_full_while_writing_shards_is_one_line_and_leaves_no_partial_file(small_fs, tmp_path, ranks):
    """Row (disk full), issue 25 for 2 ranks: the disk fills while `simulate` writes shards (after its
    size check). Before: with `mpiexec -n 2` a traceback from a rank and MPI_Abort(1); now one
    `hpc-lensiam: error:` line naming the file, exit 2, no partial file, every shard left complete."""
    from hpc_lensiam.shards.integrity import verify_dataset

    out = small_fs / "ds"
    yaml_path = tmp_path / "small.yaml"
    yaml_path.write_text("instrument:\n  num_pix: 32\n")
    args = ["simulate", "--out", out, "--pairs", 60, "--shard-size", 2, "--seed", 0, "--physics", yaml_path]
    cmd = [str(BIN / "hpc-lensiam"), *map(str, args)]
    if ranks > 1:
        cmd = [str(BIN / "mpiexec"), "-n", str(ranks), *cmd]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and not list(out.glob("shard-*.tar")):
        time.sleep(0.05)
    _fill(small_fs)
    stdout, stderr = proc.communicate(timeout=600)
    line = one_error_line(subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr))
    assert "No space left on device" in line and str(out) in line, line
    said = [x for x in stderr.splitlines() if x.strip() and not x.startswith("simulate:")]  # not the bar, note
    assert len(said) <= 2, stderr  # the line, and MPI's own line about the abort
    assert not list(out.glob(".tmp-*")) and not list((out / ".done").glob(".tmp-*"))  # nothing half written
    assert not (out / "manifest.json").exists() and list(out.glob("shard-*.tar"))
    (small_fs / "filler").unlink()  # room again: the rerun keeps the complete shards and finishes
    rerun = cli(*args)
    assert rerun.returncode == 0 and "already done" in rerun.stdout and "(0 already done)" not in rerun.stdout
    assert verify_dataset(out, progress=False) == []


def test_huge_pairs_are_refused_at_once_writing_nothing(tmp_path):
    """Issue 25: `--pairs 1e12 --shard-size 1` ran 30 s in silence with no size or disk check, then
    left a .plan.json binding the folder to it. Now one line, at once, and nothing written."""
    out = tmp_path / "ds"
    start = time.perf_counter()
    line = one_error_line(cli("simulate", "--out", out, "--pairs", 10**12, "--shard-size", 1))
    assert "--pairs 1000000000000 --shard-size 1: 1000000000000 shards, more than 1000000 files" in line
    line = one_error_line(cli("simulate", "--out", out, "--pairs", 10**12, "--shard-size", 10**6))
    assert "--pairs 1000000000000: the data set needs about 99.3 PB (99328 bytes per sample" in line
    assert f"but --out {out} is on a file system with" in line and "free" in line
    assert time.perf_counter() - start < 30 and not out.exists()


# --------------------------------------------------------------- signals and peers under the launcher
TINY = ["--arch", "resnet18", "--batch-size", "4", "--workers", "0", "--proj-dim", "64", "--pred-dim", "16"]


def _launch(*args: str, env: dict | None = None) -> subprocess.Popen:
    """``python -m hpc_lensiam.launch --standalone --nproc_per_node 2 -m hpc_lensiam train ARGS``."""
    cmd = [sys.executable, "-m", "hpc_lensiam.launch", "--standalone", "--nproc_per_node", "2", "-m", "hpc_lensiam"]
    return subprocess.Popen(
        [*cmd, "train", *map(str, args)],
        env=launcher_env(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", **(env or {})),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _wait_for_rows(run: Path, rows: int, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        metrics = run / "metrics.csv"
        if metrics.is_file() and len(metrics.read_text().splitlines()) > rows:
            return
        time.sleep(0.1)
    proc.kill()
    raise AssertionError(f"no {rows} metrics rows: " + "".join(proc.communicate())[-3000:])


def _rank_pid(launcher: int, rank: int) -> int:
    """The pid of the trainer of global rank ``rank``: the launcher's child whose RANK says so."""
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            ppid = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
            if ppid == launcher and f"RANK={rank}".encode() in Path(f"/proc/{entry}/environ").read_bytes().split(b"\0"):
                return int(entry)
        except (OSError, ValueError):
            continue
    raise AssertionError(f"no rank {rank} under pid {launcher}")


@pytest.mark.slow
def test_sigterm_to_the_launcher_checkpoints_and_exits_0(data, tmp_path):
    """Row (issue 25): `kill -TERM` of the launcher exited 1 with torchrun's SignalException traceback
    although every rank had saved; docs/training.md promises exit 0."""
    from hpc_lensiam.models.weights import load_checkpoint

    run = tmp_path / "run"
    proc = _launch("--data", data, "--out", run, *TINY, "--epochs", 1000, "--log-every", 1)
    _wait_for_rows(run, 2, proc)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == 0, err[-3000:]
    assert "Traceback" not in err and "hpc-lensiam" not in err, err[-3000:]
    step = load_checkpoint(run / "checkpoints" / "last.pt")["step"]
    assert step >= 2 and f"train: stopped by SIGTERM at step {step}; checkpoint" in out, out


@pytest.mark.slow
def test_rank_still_running_after_the_grace_is_killed_in_one_line(data, tmp_path):
    """SIGTERM while a rank cannot stop (here: SIGSTOP'd): after torchrun's shutdown timeout the ranks
    are killed and the launcher says so in one line, no traceback."""
    run = tmp_path / "run"
    env = {"TORCH_ELASTIC_SHUTDOWN_TIMEOUT": "3"}
    proc = _launch("--data", data, "--out", run, *TINY, "--epochs", 1000, "--log-every", 1, env=env)
    stopped = None
    try:
        _wait_for_rows(run, 2, proc)
        stopped = _rank_pid(proc.pid, 1)
        os.kill(stopped, signal.SIGSTOP)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
        if stopped is not None:
            try:
                os.kill(stopped, signal.SIGKILL)
            except ProcessLookupError:
                pass
    lines = [x for x in err.splitlines() if x.startswith("hpc-lensiam")]
    assert proc.returncode == 1 and len(lines) == 1 and "Traceback" not in err, err[-3000:]
    assert lines[0] == (
        "hpc-lensiam: error: rank(s) still running 3 s after SIGTERM were killed (--shutdown-timeout); "
        "--resume continues from the last checkpoint saved"
    )


@pytest.mark.slow
def test_hung_peer_times_out_naming_the_rank(data, tmp_path):
    """Row (issue 25): a stopped rank (SIGSTOP) left the others waiting in a collective forever. Now
    --dist-timeout (minutes) bounds the wait and the surviving rank names the silent one, in one line."""
    run = tmp_path / "run"
    proc = _launch("--data", data, "--out", run, *TINY, "--epochs", 1000, "--log-every", 1, "--dist-timeout", 0.1)
    stopped = None
    try:
        _wait_for_rows(run, 2, proc)
        stopped = _rank_pid(proc.pid, 1)
        os.kill(stopped, signal.SIGSTOP)
        t0 = time.time()
        out, err = proc.communicate(timeout=240)  # 6 s + a 10 s roll call + torchrun's 30 s for the stopped rank
    finally:
        proc.kill()
        if stopped is not None:
            try:
                os.kill(stopped, signal.SIGKILL)
            except ProcessLookupError:
                pass
    assert proc.returncode == 1 and time.time() - t0 < 200, err[-3000:]
    lines = [x for x in err.splitlines() if x.startswith("hpc-lensiam")]
    assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
    assert lines[0].startswith("hpc-lensiam: error: rank 0: no answer from rank 1 for 0.1 min (--dist-timeout) in ")
    assert "hung" in lines[0], lines[0]


@pytest.mark.slow
def test_healthy_rank_is_quiet_when_a_peer_fails_on_bad_data(copy, tmp_path):
    """Row (issue 25): one rank failed on an unreadable shard; the healthy rank printed ~70 lines (the
    traceback of the collective it was waiting in). Now the failing rank's line is the whole report."""
    _unreadable_in_a_worker(copy)  # read by one rank only
    proc = _launch("--data", copy, "--out", tmp_path / "run", *TINY, "--epochs", 2)
    out, err = proc.communicate(timeout=300)
    assert "shard-000003.tar" in one_error_line(subprocess.CompletedProcess(proc.args, proc.returncode, out, err))


# ------------------------------------------------------------------------- issue 25: also-items
@pytest.mark.parametrize("bad", [np.inf, np.nan, -np.inf])
@pytest.mark.parametrize("family", ["paper", "survey"])
def test_psf_file_with_a_non_finite_pixel_is_one_line_at_load(tmp_path, bad, family):
    """Row (issue 25): a PSF with an inf pixel gave a traceback from the resampling (OverflowError); a NaN or
    -inf pixel was silently taken as 0. Now one line naming the file, its HDU and the pixel, before any
    rendering or writing. The PSF sits in an extension (HDU 1) after an empty primary HDU."""
    from astropy.io import fits

    y, x = np.mgrid[-10:11, -10:11]
    psf = np.exp(-(x**2 + y**2) / (2 * 1.5**2)).astype(np.float32)
    psf[3, 4] = bad
    path = tmp_path / "psf.fits"
    fits.HDUList([fits.PrimaryHDU(), fits.ImageHDU(psf)]).writeto(path)
    out = tmp_path / "ds"
    args = ["--psf", path, "--psf-pixel-scale", 0.05, "--pairs", 2, "--out", out, "--family", family]
    line = one_error_line(cli("simulate", *args))
    assert f"{path} (HDU 1): 1 non-finite PSF pixel(s), the first {float(bad)} at row 3, column 4" in line, line
    assert not out.exists()


@pytest.mark.parametrize("fmt", ["pt", "safetensors"])
def test_disk_full_in_export_is_one_line_nothing_half_written(tiny_fs, run_a, fmt):
    """Row (issue 25): export onto a full disk gave a traceback (torch.save's "enforce fail"); now one line
    naming the file, and neither the weights nor the sidecar is left (half) written."""
    out = tiny_fs / f"backbone.{fmt}"
    line = one_error_line(
        cli("export", "--checkpoint", run_a / "checkpoints" / "last.pt", "--out", out, "--format", fmt)
    )
    assert "No space left on device" in line and str(out) in line, line
    assert list(tiny_fs.iterdir()) == []  # no weights, no sidecar, no .tmp-*


def test_umap_checks_every_file_it_writes_before_fitting(tiny_fs, run_a, data, tmp_path):
    """Row (issue 25): umap on a read-only embeddings file failed after ~33 s of fitting, with the figure
    already written (it stored its coordinates in the input file). Now the input is only read (a read-only
    embeddings file works: tests/embed/test_similar.py) and every file umap writes, the figure and the
    coordinates, is checked first: on a read-only file system, one line naming it, before any fit."""
    from hpc_lensiam.embed.extract import extract_embeddings

    emb = tmp_path / "emb.h5"
    extract_embeddings(str(run_a / "checkpoints" / "last.pt"), str(data), str(emb), progress=False)
    subprocess.run(["mount", "-o", "remount,ro", str(tiny_fs)], check=True)
    t0 = time.monotonic()
    line = one_error_line(cli("umap", "--embeddings", emb, "--out", tiny_fs / "u.png"))
    assert str(tiny_fs) in line and "not writable" in line, line
    line = one_error_line(cli("umap", "--embeddings", emb, "--out", tmp_path / "u.png", "--coords", tiny_fs / "u.csv"))
    assert f"--coords {tiny_fs / 'u.csv'}" in line and "not writable" in line, line
    assert time.monotonic() - t0 < 60  # two refusals at the door (the fit alone took ~33 s)
    assert not (tmp_path / "u.png").exists() and not list(tiny_fs.iterdir())


# ------------------------------------------------------- a damaged shard of the right size (issue 25)
def _damage(path: Path, where: str) -> str:
    """Flip one byte of shard ``path`` (same size, no manifest change) inside the second sample's
    view1.npy: its npy header ("npy") or its tar header ("tar"). Returns that sample's key."""
    raw = bytearray(path.read_bytes())
    with tarfile.open(path) as tar:
        member = [m for m in tar.getmembers() if m.name.endswith("view1.npy")][1]
    raw[member.offset_data + 20 if where == "npy" else member.offset + 130] ^= 0x41
    path.write_bytes(bytes(raw))
    return member.name.split(".", 1)[0]


@pytest.mark.parametrize("where", ["npy", "tar"])
def test_damaged_shard_named_by_embed_finetune_show(copy, data, tmp_path, where):
    """Row (issue 25): bytes flipped inside a shard of the right size: embed, finetune and show gave
    23-67-line tracebacks naming neither shard nor sample (train and verify named both). Now one line
    naming the shard file and the sample key, exit 2, nothing written."""
    key = _damage(copy / "shard-000001.tar", where)
    for args, out in (
        (("embed", "--checkpoint", "none", "--arch", "resnet18", "--data", copy, "--workers", 1), "e.h5"),
        (("finetune", "--backbone", "none", "--arch", "resnet18", "--train", copy, "--test", data), "f.json"),
        (("show", copy, "-n", 24), "grid.png"),
    ):
        extra = ("--n-train", 20, "--n-test", 4, "--epochs", 1, "--json") if args[0] == "finetune" else ("--out",)
        line = one_error_line(cli(*args, *extra, tmp_path / out))
        assert "shard-000001.tar" in line and f"sample {key!r}" in line, line
        assert not list(tmp_path.glob(out.split(".")[0] + "*")), line


# ------------------------------------------------------------ the lock and loader workers (issue 25)
def _children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def _tiny_train_args(data: Path, run: Path, workers: int) -> list:
    return [
        "train",
        "--data",
        data,
        "--out",
        run,
        "--arch",
        "resnet18",
        "--batch-size",
        4,
        "--workers",
        workers,
        "--proj-dim",
        64,
        "--pred-dim",
        16,
    ]


@pytest.mark.slow
def test_loader_workers_do_not_hold_the_run_lock_after_kill_9(data, tmp_path):
    """Row (issue 25): the DataLoader workers inherited RUN/.lock's flock; for ~5 s after kill -9 of the
    trainer (until its workers noticed) a rerun was refused naming the dead pid. Now the workers close
    the lock's descriptor when forked: the lock goes with the trainer."""
    from hpc_lensiam.core.lock import DirLock

    run = tmp_path / "run"
    args = [str(a) for a in _tiny_train_args(data, run, workers=2)]
    trainer = subprocess.Popen(
        [str(BIN / "hpc-lensiam"), *args, "--epochs", "1000", "--ckpt-every", "1", "--log-every", "100"],
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.time() + 300
        while time.time() < deadline and not ((run / "checkpoints" / "last.pt").is_file() and _children(trainer.pid)):
            time.sleep(0.05)
        workers = _children(trainer.pid)
        assert workers, "no loader workers seen"
        trainer.kill()
        trainer.wait()
        assert any(Path(f"/proc/{w}").exists() for w in workers)  # the orphaned workers are still there
        DirLock(run, "train").acquire().release()  # before the fix: "in use by another job, ... pid <dead>"
    finally:
        trainer.kill()
    proc = cli(*args, "--epochs", "1000", "--max-steps", 1, "--resume", "--log-every", "100")
    assert proc.returncode == 0, proc.stderr[-2000:]


# ---------------------------------------------------- loader workers that fail, die or hang (issue 25)
def _file_size_limit(limit: int):
    """preexec_fn: ``ulimit -f`` for the command (a worker's batch no longer fits in shared memory)."""
    import resource

    return lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))


class _Leased:
    """Another process holds a write lease on ``path``: every other open() of it waits (up to
    /proc/sys/fs/lease-break-time, 45 s by default), as on a hung file system: a loader worker really
    blocked in a system call."""

    CODE = (
        "import fcntl, os, signal, sys, time; signal.signal(signal.SIGIO, signal.SIG_IGN); "
        "fd = os.open(sys.argv[1], os.O_RDONLY); fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_WRLCK); "
        "print('held', flush=True); time.sleep(600)"
    )

    def __init__(self, path: Path):
        self.path = path

    def __enter__(self):
        try:
            if int(Path("/proc/sys/fs/lease-break-time").read_text()) < 30:
                pytest.skip("lease-break-time < 30 s: a lease blocks open() too briefly here")
        except OSError:
            pytest.skip("no /proc/sys/fs/lease-break-time")
        self.proc = subprocess.Popen(
            [sys.executable, "-c", self.CODE, str(self.path)], stdout=subprocess.PIPE, text=True
        )
        if self.proc.stdout.readline().strip() != "held":
            self.proc.kill()
            pytest.skip("cannot take a file lease here")
        return self

    def __exit__(self, *exc):
        self.proc.kill()
        self.proc.wait()


@pytest.mark.slow
def test_embed_loader_worker_that_cannot_hand_over_or_hangs_is_one_line(copy, tmp_path):
    """Row (issue 25): under `ulimit -f` embed's worker could not move its batch to shared memory; the
    batch was dropped and the main process waited 636 s until killed. Now the worker's failure is one
    line naming it; a worker blocked in a system call ends the job after --loader-timeout, naming it."""
    base = ("embed", "--checkpoint", "none", "--arch", "resnet18", "--data", copy, "--workers", 1, "--batch-size", 4)
    proc = cli(*base, "--out", tmp_path / "e.h5", timeout=240, preexec_fn=_file_size_limit(8192))  # batch: 16 kB
    line = one_error_line(proc)
    assert "data-loader worker (pid" in line and "could not hand over its batch" in line, line
    assert "File too large" in line, line
    with _Leased(copy / "shard-000003.tar"):  # the worker blocks opening its 4th shard, for 45 s
        line = one_error_line(cli(*base, "--loader-timeout", 10, "--out", tmp_path / "e.h5", timeout=240))
    assert "no batch from data-loader worker (pid" in line and "in 10 s" in line, line
    assert not list(tmp_path.glob("e*.h5"))


@pytest.mark.slow
def test_train_loader_worker_killed_blocked_or_unable_to_hand_over_is_one_line(data, tmp_path):
    """The same for train's loader, and a worker killed with SIGKILL mid-run (before: torch's
    "DataLoader worker (pid N) is killed by signal" traceback, exit 1)."""
    args = [str(a) for a in _tiny_train_args(data, tmp_path / "run", workers=2)]
    proc = cli(*args, "--max-steps", 2, "--out", tmp_path / "r1", timeout=240, preexec_fn=_file_size_limit(8192))
    line = one_error_line(proc)
    assert "train: data-loader worker (pid" in line and "File too large" in line, line

    with _Leased(data / "shard-000003.tar"):  # read-only: the lease only delays opening it
        line = one_error_line(cli(*args, "--max-steps", 2, "--loader-timeout", 10, "--out", tmp_path / "r2"))
    assert "train: no batch from data-loader worker (pid" in line and "in 10 s" in line, line

    stderr = tmp_path / "stderr.txt"
    with open(stderr, "w") as err:
        trainer = subprocess.Popen(
            [str(BIN / "hpc-lensiam"), *args, "--epochs", "1000", "--log-every", "1000"],
            env=_env(),
            stdout=subprocess.DEVNULL,
            stderr=err,
        )
    try:
        killed, deadline = [], time.time() + 300
        while trainer.poll() is None and time.time() < deadline:
            workers = _children(trainer.pid)
            if workers and (run := tmp_path / "run" / "metrics.csv").is_file() and len(killed) < 5:
                os.kill(workers[0], signal.SIGKILL)  # a worker just ending its epoch may escape: try again
                killed.append(workers[0])
                time.sleep(10)
            time.sleep(0.05)
        assert killed and trainer.wait(timeout=60) is not None, run
    finally:
        trainer.kill()
    proc = subprocess.CompletedProcess(trainer.args, trainer.returncode, "", stderr.read_text())
    line = one_error_line(proc)
    assert "train: data-loader worker (pid" in line and "killed by signal" in line, line
    assert any(f"pid {pid})" in line for pid in killed), line
