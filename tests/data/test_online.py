"""The torch renderer in the pipeline: ``simulate --renderer torch`` shards and ``train --data online``."""

from __future__ import annotations

import io
import json
import subprocess
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from hpc_lensiam.cli import main
from hpc_lensiam.data.online import OnlineLoader
from hpc_lensiam.models.weights import load_model_state
from hpc_lensiam.shards.manifest import read_manifest
from hpc_lensiam.simulate.config import simulation_config
from hpc_lensiam.simulate.simulator import LensSimulator
from support import launcher_env, tiny_config, torchrun_cmd, train_tiny

# 48 px, no noise: the shard images can be compared with the lenstronomy path pixel for pixel
NO_NOISE = "instrument:\n  num_pix: 48\n  noise_sigma: [0.0, 0.0]\nsource:\n  merger_fraction: 0.5\n"
SMALL = "instrument:\n  num_pix: 48\n"


@pytest.fixture(scope="module")
def yamls(tmp_path_factory) -> dict:
    d = tmp_path_factory.mktemp("cfg")
    (d / "no_noise.yaml").write_text(NO_NOISE)
    (d / "small.yaml").write_text(SMALL)
    return {"no_noise": d / "no_noise.yaml", "small": d / "small.yaml"}


def _cli(bin_dir, *args) -> subprocess.CompletedProcess:
    return subprocess.run([str(bin_dir / "hpc-lensiam"), *map(str, args)], capture_output=True, text=True, timeout=600)


def _samples(shard: Path):
    with tarfile.open(shard) as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
    keys = sorted({n.split(".", 1)[0] for n in members})
    for key in keys:
        params = json.loads(members[f"{key}.params.json"])
        views = [np.load(io.BytesIO(members[f"{key}.{v}.npy"])) for v in ("view1", "view2")]
        yield params, views


@pytest.mark.slow
def test_simulate_engine_torch_shards_match_lenstronomy(bin_dir, yamls, tmp_path):
    """Same layout and manifest as the lenstronomy engine; every view equals LensSimulator.render
    of its stored parameters (float32 renderer: < 1e-3 of the peak)."""
    out = tmp_path / "torch_ds"
    args = [
        "simulate",
        "--renderer",
        "torch",
        "--out",
        out,
        "--pairs",
        6,
        "--shard-size",
        4,
        "--seed",
        3,
        "--physics",
        yamls["no_noise"],
    ]
    proc = _cli(bin_dir, *args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    manifest = read_manifest(out)
    assert manifest["engine"] == "torch" and manifest["num_samples"] == 6 and manifest["image_shape"] == [48, 48]
    assert [s["name"] for s in manifest["shards"]] == ["shard-000000.tar", "shard-000001.tar"]
    with pytest.warns(UserWarning, match="no cosmos_dir"):
        ref = LensSimulator(simulation_config(config_path=yamls["no_noise"]))
    n = worst = 0
    for shard in sorted(out.glob("shard-*.tar")):
        for params, views in _samples(shard):
            assert len(params["views"]) == 2
            for view, img in zip(params["views"], views):
                assert img.dtype == np.float32 and img.shape == (48, 48)
                want = ref.render(params["lens"], view["source"], lens_light=view["lens_light"], psf=view["psf_id"])
                worst = max(worst, float(np.abs(img - want).max()))
            n += 1
    assert n == 6 and worst < 1e-3
    before = {p.name: p.read_bytes() for p in out.glob("shard-*.tar")}
    for p in out.glob("shard-*.tar"):  # a rerun redoes missing shards with the same bytes
        p.unlink()
    assert _cli(bin_dir, *args).returncode == 0
    assert {p.name: p.read_bytes() for p in out.glob("shard-*.tar")} == before
    other = _cli(bin_dir, *[a if a != "torch" else "lenstronomy" for a in args])  # not mixed with another engine
    assert other.returncode == 2 and "engine" in other.stderr and len(other.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize(
    "device,match", [("cuda:7" if torch.cuda.is_available() else "cuda", "CUDA"), ("gpu", "not a torch device")]
)
def test_simulate_bad_device_fails_before_writing(bin_dir, tmp_path, device, match):
    out = tmp_path / "ds"
    proc = _cli(bin_dir, "simulate", "--renderer", "torch", "--device", device, "--out", out, "--pairs", 2)
    assert proc.returncode == 2 and match in proc.stderr and "--device" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and not out.exists()


@pytest.mark.slow
def test_online_batches_depend_on_seed_rank_and_index_only(yamls):
    spec = f"online:{yamls['small']}"
    a = OnlineLoader(spec, "lens", batch_size=3, rank=0, world_size=2, seed=5, epoch_samples=24)
    assert a.batches_per_epoch == 4 and a.image_shape == (48, 48)
    full = list(a.epoch(1))
    resumed = list(a.epoch(1, start=2))
    assert len(full) == 4 and len(resumed) == 2
    for x, y in zip(full[2:], resumed):
        assert torch.equal(x["x1"], y["x1"]) and torch.equal(x["x2"], y["x2"])
    assert full[0]["x1"].shape == (3, 1, 48, 48) and full[0]["x1"].dtype == torch.float32
    assert not torch.equal(full[0]["x1"], full[1]["x1"])
    assert not torch.equal(full[0]["x1"], next(a.epoch(0))["x1"])  # epochs differ
    other_rank = OnlineLoader(spec, "lens", batch_size=3, rank=1, world_size=2, seed=5, epoch_samples=24)
    assert not torch.equal(full[0]["x1"], next(other_rank.epoch(1))["x1"])  # ranks differ
    single = OnlineLoader(spec, "standard", batch_size=2, epoch_samples=8)
    assert set(next(single.epoch(0))) == {"x", "keys", "bad"}


@pytest.mark.slow
def test_online_training_two_steps_and_resume_sees_the_same_pairs(yamls, tmp_path):
    """2 steps at once == 1 step, then --resume for the second: same loss, same weights."""
    spec = f"online:{yamls['small']}"
    kw = dict(batch_size=4, online_epoch_samples=16, ckpt_every=1)
    ref = train_tiny(spec, tmp_path / "ref", **kw)
    from hpc_lensiam.train.loop import train

    cut = tmp_path / "cut"
    train_tiny(spec, cut, **{**kw, "max_steps": 1})
    summary = train(
        tiny_config(spec, cut, batch_size=4, online_epoch_samples=16, ckpt_every=1),
        resume=True,
    )
    assert summary["step"] == 2 and summary["steps_run"] == 1
    a, _, _ = load_model_state(ref)
    b, _, _ = load_model_state(cut)
    assert a.keys() == b.keys()
    assert all(torch.allclose(a[k].float(), b[k].float(), atol=1e-6) for k in a)
    rows = [r.split(",") for r in (ref / "metrics.csv").read_text().splitlines()[1:]]
    rows_cut = [r.split(",") for r in (cut / "metrics.csv").read_text().splitlines()[1:]]
    assert [r[:3] for r in rows] == [r[:3] for r in rows_cut]  # step, epoch, loss


@pytest.mark.slow
def test_online_simsiam_mode_trains(yamls, tmp_path):
    run = train_tiny(
        f"online:{yamls['small']}",
        tmp_path / "simsiam",
        views="standard",
        batch_size=4,
        online_epoch_samples=8,
        max_steps=1,
    )
    assert (run / "checkpoints" / "last.pt").is_file()


@pytest.mark.parametrize(
    "args,match",
    [
        (["--data", "online:nonsense"], "unknown simulation family or config 'nonsense'"),
        (["--data", "online:missing.yaml"], "missing.yaml: config file not found"),
        (["--data", "online", "--online-epoch-samples", "4"], "--online-epoch-samples 4 is smaller than one step"),
        (["--data", "online", "--online-epoch-samples", "0"], "--online-epoch-samples: must be >= 1"),
    ],
)
def test_online_bad_input_is_one_line(tmp_path, capsys, args, match):
    rc = main(["train", "--out", str(tmp_path / "run"), "--arch", "resnet18", "--batch-size", "8", *args])
    err = capsys.readouterr().err
    assert rc == 2 and match in err and len(err.strip().splitlines()) == 1, err


@pytest.mark.slow
def test_online_two_ranks_torchrun(bin_dir, yamls, tmp_path):
    """Each rank renders its own micro-batch (gloo DDP on CPU); the run finishes and checkpoints."""
    env = launcher_env(PYTHONWARNINGS="ignore")
    out = tmp_path / "ddp"
    cmd = torchrun_cmd(2) + [
        "train",
        "--data",
        f"online:{yamls['small']}",
        "--out",
        str(out),
        "--arch",
        "resnet18",
        "--batch-size",
        "2",
        "--max-steps",
        "2",
        "--online-epoch-samples",
        "8",
        "--proj-dim",
        "64",
        "--pred-dim",
        "16",
        "--log-every",
        "1",
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "2 rank(s)" in proc.stdout and "2 steps/epoch" in proc.stdout
    assert (out / "checkpoints" / "last.pt").is_file()


@pytest.mark.slow
def test_online_resume_after_a_psf_file_was_edited_is_refused_naming_it(tmp_path):
    """Issue 25: the online source's identity hashed its config, not the PSF/COSMOS files it names,
    so `--resume` after the PSF file was edited continued on other data silently."""
    from astropy.io import fits

    from hpc_lensiam.core.errors import UserError
    from hpc_lensiam.train.loop import train, train_config

    def psf(sigma: float) -> None:
        y, x = np.mgrid[-10:11, -10:11]
        fits.PrimaryHDU(np.exp(-(x**2 + y**2) / (2 * sigma**2)).astype(np.float32)).writeto(
            tmp_path / "psf.fits", overwrite=True
        )

    psf(1.5)
    cfg = tmp_path / "psf.yaml"
    cfg.write_text(f"instrument:\n  num_pix: 48\npsf_files: [{tmp_path / 'psf.fits'}]\npsf_pixel_scale_arcsec: 0.05\n")
    spec, run = f"online:{cfg}", tmp_path / "run"
    kw = dict(batch_size=4, online_epoch_samples=16, ckpt_every=1)
    train_tiny(spec, run, **{**kw, "max_steps": 1})
    psf(2.5)
    flags = dict(data=spec, out=str(run), arch="resnet18", batch_size=4, max_steps=2, epochs=1, workers=0)
    flags.update(proj_dim=64, pred_dim=16, log_every=1, online_epoch_samples=16, ckpt_every=1)
    psf_path = str((tmp_path / "psf.fits").resolve())
    with pytest.raises(UserError, match=r"other settings: data .*; sha256 of " + psf_path.replace(".", r"\.")):
        train(train_config(**flags), resume=True)
    psf(1.5)  # the same contents again: the same data, the resume goes on
    assert train(train_config(**flags), resume=True)["step"] == 2


def test_online_bench_training_rates_are_pairs_from_steady_rows(tmp_path):
    """bench.online's training figures are pairs/s (they were images/s under a pairs/s label)
    over the steady metrics rows only: start-up rows left out, total pairs over total time (the
    harmonic mean of the rows' rates), and the data-wait share of the step."""
    from bench import online

    csv_path = tmp_path / "metrics.csv"
    csv_path.write_text(
        "step,pairs_per_s,images_per_s,data_wait_s,compute_s\n"
        "1,1.0,2.0,3.0,1.0\n"  # start-up: left out
        "2,10.0,20.0,0.1,0.3\n"
        "3,20.0,40.0,0.0,0.2\n"
    )
    s = online.steady_rows(csv_path, skip=1, pairs_per_step=4)
    assert s["rows"] == 2
    assert s["pairs_per_s"] == pytest.approx(8 / (0.4 + 0.2))  # 13.3 pairs/s, not 26.7 images/s
    assert s["data_wait_fraction"] == pytest.approx(0.1 / 0.6)
