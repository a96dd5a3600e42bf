"""Pretraining: lr recipe, config, 2-rank torchrun DDP and DeepSpeed runs, signal/kill + resume, bad input.

Every run uses shards made by the real simulator (conftest fixtures), a real torchrun/gloo group,
the real DeepSpeed engine and webdataset: no mocks. resnet18 at 48x48, batch 4, a few steps.
"""

from __future__ import annotations

import csv
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from hpc_lensiam.core.errors import ConfigError, UserError
from hpc_lensiam.models.weights import load_checkpoint, load_model_state
from hpc_lensiam.train.config import TrainConfig
from hpc_lensiam.train.loop import lr_at, scaled_lr, train, train_config
from support import launcher_env, leave_spawned_rank, tiny_config, torchrun_cmd, train_tiny

REPO = Path(__file__).resolve().parents[2]
SMALL = ["--arch", "resnet18", "--batch-size", "4", "--epochs", "2", "--log-every", "1"]


def _env() -> dict:
    return launcher_env(PYTHONWARNINGS="ignore")


def _torchrun(args: list[str], nproc: int = 2, timeout: float = 240) -> subprocess.CompletedProcess:
    cmd = torchrun_cmd(nproc) + ["train", *args]
    return subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=timeout)


def _metrics(run: Path) -> dict[int, dict]:
    with open(run / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    steps = [int(r["step"]) for r in rows]
    assert len(steps) == len(set(steps)), f"duplicate steps in metrics.csv: {steps}"
    return {int(r["step"]): {k: float(v) for k, v in r.items()} for r in rows}


def _same_curve(a: dict, b: dict, steps) -> None:
    for s in steps:
        assert math.isclose(a[s]["lr"], b[s]["lr"], rel_tol=1e-5), (s, a[s], b[s])
        assert math.isclose(a[s]["loss"], b[s]["loss"], rel_tol=1e-3, abs_tol=2e-5), (s, a[s], b[s])
        assert math.isclose(a[s]["z_std"], b[s]["z_std"], rel_tol=1e-3, abs_tol=1e-6), (s, a[s], b[s])


def _ok(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc.stdout


# ---------------------------------------------------------------------------------------- recipe
def test_lr_scaling_and_warmup_cosine_schedule():
    cfg = TrainConfig(batch_size=100, grad_accum=2)
    assert scaled_lr(cfg, world_size=2) == pytest.approx(0.03 * 400 / 256)  # the paper's batch 400
    assert lr_at(0, 1.0, 10, 100) == pytest.approx(0.1)
    assert lr_at(9, 1.0, 10, 100) == pytest.approx(1.0)  # end of warm-up
    assert lr_at(10, 1.0, 10, 100) == pytest.approx(1.0)  # cosine starts at the peak
    assert lr_at(55, 1.0, 10, 100) == pytest.approx(0.5)  # half-way down
    assert lr_at(100, 1.0, 10, 100) == pytest.approx(0.0, abs=1e-12)
    assert lr_at(0, 1.0, 0, 100) == pytest.approx(1.0)  # no warm-up
    lrs = [lr_at(s, 1.0, 10, 100) for s in range(10, 101)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))


def test_config_yaml_flags_and_errors(tmp_path):
    path = tmp_path / "t.yaml"
    path.write_text("arch: resnet18\nbatch_size: 16\nepochs: 3\n")
    cfg = train_config(str(path), batch_size=8, precision=None)
    assert (cfg.arch, cfg.batch_size, cfg.epochs, cfg.precision) == ("resnet18", 8, 3, "fp32")
    path.write_text("arch: resnet18\nbatchsize: 16\n")
    with pytest.raises(ConfigError, match=r"t\.yaml: unknown key 'batchsize'"):
        train_config(str(path))
    with pytest.raises(ConfigError, match=r"flags\.arch: 'vgg' is not one of"):
        train_config(None, arch="vgg")
    for name in ("demo", "paper"):
        train_config(str(REPO / "configs" / f"{name}.yaml"))
    paper = train_config(str(REPO / "configs" / "paper.yaml"))
    assert paper.arch == "resnet101" and paper.precision == "bf16"


def test_cli_errors_are_one_line(tmp_path, capsys):
    from hpc_lensiam.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["train", "--data", str(tmp_path), "--bogus-flag", "1"])
    assert exc.value.code == 2 and "unrecognized arguments: --bogus-flag" in capsys.readouterr().err
    assert main(["train", "--data", str(tmp_path / "absent"), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("hpc-lensiam: error:") and "no such data directory" in err and "\n" not in err


# ------------------------------------------------------------------------------- 2-rank torchrun
@pytest.fixture(scope="module")
def ddp_ref(lensiam_shards, tmp_path_factory) -> Path:
    """An uninterrupted 2-rank DDP run of 10 steps (8 per epoch): the curve resumed runs must reproduce."""
    run = tmp_path_factory.mktemp("ddp") / "ref"
    out = _ok(
        _torchrun(
            [
                "--data",
                str(lensiam_shards),
                "--out",
                str(run),
                *SMALL,
                "--workers",
                "1",
                "--max-steps",
                "10",
                "--ckpt-every",
                "4",
            ]
        )
    )
    assert "2 rank(s) on cpu (gloo) + SyncBatchNorm" in out
    assert "lr = 0.03 x 8/256 = 0.0009375" in out
    assert "train: done: 10 steps" in out and "images/s" in out and "z_std" in out
    return run


@pytest.mark.slow
def test_ddp_two_ranks_outputs(ddp_ref):
    rows = _metrics(ddp_ref)
    assert sorted(rows) == list(range(1, 11))
    assert all(math.isfinite(r["loss"]) and -1 <= r["loss"] <= 1 and r["images_per_s"] > 0 for r in rows.values())
    assert all(0.01 < r["z_std"] < 0.05 for r in rows.values())  # ~1/sqrt(2048), not collapsed
    assert rows[8]["epoch"] == pytest.approx(1.0)  # 64 pairs / (4 x 2) = 8 steps/epoch
    cfg = train_config(str(ddp_ref / "config.yaml"))
    assert cfg.arch == "resnet18" and cfg.max_steps == 10
    ck = ddp_ref / "checkpoints"
    assert sorted(p.name for p in ck.iterdir()) == ["last.pt", "step_00000004.pt", "step_00000008.pt"]
    last = load_checkpoint(ck / "last.pt")
    assert last["step"] == 10 and last["epoch"] == 1 and last["arch"] == "resnet18" and last["engine"] == "ddp"
    assert {"model", "optimizer", "scheduler", "scaler", "rng", "config"} <= set(last)
    assert not any(k.startswith("module.") for k in last["model"])
    state, config, step = load_model_state(ddp_ref)
    assert step == 10 and config["arch"] == "resnet18" and "predictor.3.weight" in state


@pytest.mark.slow
def test_ddp_sigterm_then_resume_matches_uninterrupted(lensiam_shards, ddp_ref, tmp_path):
    """SIGTERM to torchrun (as Slurm's time-limit warning ends up): every rank stops at a step
    boundary and saves; --resume continues the same step counter, lr and loss curve."""
    run = tmp_path / "run"
    args = ["--data", str(lensiam_shards), "--out", str(run), *SMALL, "--workers", "1", "--ckpt-every", "4"]
    cmd = torchrun_cmd(2) + [
        "train",
        *args,
        "--max-steps",
        "10",
    ]
    proc = subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 180
    while time.time() < deadline and proc.poll() is None:
        if (run / "metrics.csv").is_file() and len((run / "metrics.csv").read_text().splitlines()) >= 3:
            break
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    stopped = load_checkpoint(run / "checkpoints" / "last.pt")["step"]
    assert 2 <= stopped < 10, out + err
    assert f"stopped by SIGTERM at step {stopped}" in out, out + err[-3000:]
    assert not list((run / "checkpoints").glob(".tmp-*"))
    out = _ok(_torchrun([*args, "--max-steps", "10", "--resume"]))
    assert f"resuming at step {stopped}" in out
    rows = _metrics(run)
    assert sorted(rows) == list(range(1, 11))
    _same_curve(rows, _metrics(ddp_ref), range(1, 11))  # across the epoch boundary
    assert load_checkpoint(run / "checkpoints" / "last.pt")["step"] == 10


@pytest.mark.slow
def test_deepspeed_two_ranks_resume_matches_ddp(lensiam_shards, ddp_ref, tmp_path):
    run = tmp_path / "ds"
    args = [
        "--data",
        str(lensiam_shards),
        "--out",
        str(run),
        *SMALL,
        "--workers",
        "1",
        "--engine",
        "deepspeed",
        "--zero-stage",
        "1",
        "--ckpt-every",
        "2",
    ]
    out = _ok(_torchrun([*args, "--max-steps", "3"]))
    assert "engine deepspeed | 2 rank(s)" in out and "train: done: 3 steps" in out
    ck = run / "checkpoints"
    assert (ck / "deepspeed" / "latest").read_text().strip() == "step_00000003"
    assert sorted(p.name for p in (ck / "deepspeed").iterdir() if p.is_dir()) == ["step_00000002", "step_00000003"]
    last = load_checkpoint(ck / "last.pt")
    assert last["engine"] == "deepspeed" and last["deepspeed_tag"] == "step_00000003" and last["step"] == 3
    ds_state, ds_cfg, ds_step = load_model_state(ck / "deepspeed")  # DeepSpeed's own folder
    pt_state, _, _ = load_model_state(run)  # our last.pt
    assert ds_step == 3 and ds_cfg["engine"] == "deepspeed" and ds_state.keys() == pt_state.keys()
    assert all(torch.equal(ds_state[k], pt_state[k]) for k in pt_state)

    out = _ok(_torchrun([*args, "--max-steps", "6", "--resume"]))
    assert "resuming at step 3" in out
    assert (ck / "deepspeed" / "latest").read_text().strip() == "step_00000006"
    # superseded non-periodic tags are removed, periodic ones kept
    assert sorted(p.name for p in (ck / "deepspeed").iterdir() if p.is_dir()) == [
        "step_00000002",
        "step_00000004",
        "step_00000006",
    ]
    rows = _metrics(run)
    assert sorted(rows) == list(range(1, 7))
    _same_curve(rows, _metrics(ddp_ref), range(1, 7))  # same numbers as DDP


@pytest.mark.slow
def test_bad_shard_on_any_rank_is_named(lensiam_shards, tmp_path):
    data = Path(shutil.copytree(lensiam_shards, tmp_path / "data"))
    for shard in data.glob("shard-*.tar"):  # every shard broken: whichever rank reads first says so
        shard.write_bytes(shard.read_bytes()[:20000])
    proc = _torchrun(
        ["--data", str(data), "--out", str(tmp_path / "run"), *SMALL, "--workers", "0", "--max-steps", "2"], timeout=120
    )
    assert proc.returncode != 0
    assert "hpc-lensiam: error" in proc.stderr and "shard-0000" in proc.stderr and "cannot read" in proc.stderr


# ---------------------------------------------------------------------------- one process, kill -9
def _cfg(data, out, **kw) -> TrainConfig:
    """The tiny recipe with 4 per rank over 2 epochs, no step cap unless given, full-size heads."""
    base = {"batch_size": 4, "epochs": 2, "max_steps": None, "proj_dim": None, "pred_dim": None}
    return tiny_config(data, out, **{**base, **kw})


@pytest.mark.slow
def test_killed_run_resumes_exactly_simsiam_mode(single_shards, tmp_path):
    """kill -9 mid-run: the atomic last.pt survives; --resume continues to the uninterrupted curve."""
    run = tmp_path / "killed"
    cmd = [
        sys.executable,
        "-m",
        "hpc_lensiam",
        "train",
        "--data",
        str(single_shards),
        "--out",
        str(run),
        "--views",
        "standard",
        *SMALL,
        "--workers",
        "2",
        "--ckpt-every",
        "2",
        "--max-steps",
        "30",
    ]
    proc = subprocess.Popen(
        cmd, cwd=REPO, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    deadline = time.time() + 180
    while time.time() < deadline and not (run / "checkpoints" / "step_00000004.pt").is_file():
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the process group this test started: trainer + its workers
    proc.wait()
    killed_at = load_checkpoint(run / "checkpoints" / "last.pt")["step"]
    assert killed_at >= 4 and killed_at % 2 == 0
    if killed_at > 6:
        pytest.skip(f"machine too slow to kill before step 6 (reached {killed_at})")

    summary = train(_cfg(single_shards, run, views="standard", workers=2, max_steps=8, ckpt_every=2), resume=True)
    assert summary["step"] == 8 and summary["steps_run"] == 8 - killed_at
    ref = tmp_path / "ref"
    train(_cfg(single_shards, ref, views="standard", workers=2, max_steps=8, ckpt_every=2))
    rows = _metrics(run)
    assert sorted(rows) == list(range(1, 9))  # rows past last.pt dropped
    _same_curve(rows, _metrics(ref), range(1, 9))


@pytest.mark.slow  # a long end-to-end run (15-45 s): make test, not test-fast
def test_resnet101_one_step(lensiam_shards, tmp_path):
    summary = train(_cfg(lensiam_shards, tmp_path / "r101", arch="resnet101", batch_size=2, max_steps=1))
    assert summary["step"] == 1 and math.isfinite(summary["loss"])
    state, config, _ = load_model_state(tmp_path / "r101")
    assert config["arch"] == "resnet101" and state["encoder.layer3.22.conv3.weight"].shape == (1024, 256, 1, 1)


def test_bf16_autocast_correctness(lensiam_shards, tmp_path):
    from hpc_lensiam.models.methods.simsiam import SimSiam, simsiam_loss
    from hpc_lensiam.train.engine import Engine

    cfg = _cfg(lensiam_shards, tmp_path / "bf16", precision="bf16", max_steps=2)
    engine = Engine(cfg)
    torch.manual_seed(0)
    model = SimSiam("resnet18", 256, 64)
    engine.wrap(model, [{"params": list(model.parameters()), "lr": 0.01}])
    x1, x2 = torch.randn(4, 1, 48, 48), torch.randn(4, 1, 48, 48)
    p1, p2, z1, z2 = engine.forward(x1, x2)
    assert p1.dtype == torch.bfloat16 and next(model.parameters()).dtype == torch.float32  # fp32 master weights
    with torch.no_grad():
        ref = model(x1, x2)
    assert abs(float(simsiam_loss(p1, p2, z1, z2).detach()) - float(simsiam_loss(*ref))) < 0.02
    summary = train(cfg)
    assert summary["step"] == 2 and math.isfinite(summary["loss"])


# ----------------------------------------------------------------------------------- bad input
def test_bad_inputs(lensiam_shards, tmp_path):
    with pytest.raises(UserError, match="no such data directory"):
        train(_cfg(tmp_path / "absent", tmp_path / "a"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="manifest.json: missing"):
        train(_cfg(tmp_path / "empty", tmp_path / "b"))
    with pytest.raises(UserError, match="batch larger than the data"):
        train(_cfg(lensiam_shards, tmp_path / "c", batch_size=65))
    with pytest.raises(ConfigError, match="fp16 with --engine deepspeed needs --zero-stage 0"):
        train(_cfg(lensiam_shards, tmp_path / "d", engine="deepspeed", precision="fp16", zero_stage=1))
    # nothing to resume: starts fresh
    assert train(_cfg(lensiam_shards, tmp_path / "e", max_steps=1), resume=True)["step"] == 1
    with pytest.raises(UserError, match="last.pt exists: pass --resume"):
        train(_cfg(lensiam_shards, tmp_path / "e", max_steps=2))
    with pytest.raises(UserError, match="cannot resume this run with --arch resnet50"):
        train(_cfg(lensiam_shards, tmp_path / "e", max_steps=2, arch="resnet50"), resume=True)
    assert train(_cfg(lensiam_shards, tmp_path / "e", max_steps=1), resume=True)["steps_run"] == 0  # done already


@pytest.mark.slow
def test_bad_shard_named_or_skipped(lensiam_shards, tmp_path):
    data = Path(shutil.copytree(lensiam_shards, tmp_path / "data"))
    shard = data / "shard-000006.tar"
    shard.write_bytes(shard.read_bytes()[:25000])
    with pytest.raises(UserError, match=r"shard-000006\.tar.*cannot read.*--skip-bad-samples"):
        train(_cfg(data, tmp_path / "a", max_steps=16, batch_size=4))
    summary = train(_cfg(data, tmp_path / "b", max_steps=16, batch_size=4, skip_bad_samples=True))
    assert summary["step"] == 16 and summary["skipped_samples"] >= 1


@pytest.mark.slow  # a long end-to-end run (15-45 s): make test, not test-fast
def test_nan_loss_stops_and_keeps_last_good_checkpoint(lensiam_shards, tmp_path):
    run = tmp_path / "nan"
    with pytest.raises(UserError, match=r"loss is nan at step (\d+).*last good checkpoint .*last\.pt \(step"):
        train(_cfg(lensiam_shards, run, base_lr=1e30, warmup_epochs=0.0, ckpt_every=1, max_steps=10))
    last = load_checkpoint(run / "checkpoints" / "last.pt")
    assert 1 <= last["step"] < 10
    assert all(torch.isfinite(v).all() for v in last["model"].values() if v.is_floating_point())


# ----------------------------------------------------------------------------- SyncBatchNorm (CPU)
def _sync_bn_worker(rank: int, port: int, out: str):
    import torch.distributed as dist

    from hpc_lensiam.train.engine import convert_sync_batchnorm

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    torch.manual_seed(0)
    torch.nn.Sequential(torch.nn.BatchNorm2d(3), torch.nn.BatchNorm1d(6, affine=False))  # same RNG draws
    x = torch.randn(8, 3, 5, 5) * 3 + 1
    sync = convert_sync_batchnorm(torch.nn.BatchNorm2d(3), cuda=False)
    xr = x[rank * 4 : (rank + 1) * 4].clone().requires_grad_(True)
    y = sync(xr)
    (y * torch.arange(y.numel()).view_as(y)).sum().backward()
    torch.save(
        {
            "y": y.detach(),
            "grad": xr.grad,
            "mean": sync.running_mean,
            "var": sync.running_var,
            "wgrad": sync.weight.grad,
        },
        f"{out}/{rank}.pt",
    )
    dist.destroy_process_group()
    leave_spawned_rank()


@pytest.mark.slow
def test_gloo_sync_batchnorm_equals_full_batch_batchnorm(tmp_path):
    """2 gloo ranks with 4 samples each == one BatchNorm over all 8 (forward, backward, running stats)."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_sync_bn_worker, args=(port, str(tmp_path)), nprocs=2, join=True)
    torch.manual_seed(0)
    torch.nn.Sequential(torch.nn.BatchNorm2d(3), torch.nn.BatchNorm1d(6, affine=False))  # same RNG draws
    x = (torch.randn(8, 3, 5, 5) * 3 + 1).requires_grad_(True)
    bn = torch.nn.BatchNorm2d(3)
    y = bn(x)
    (y * torch.cat([torch.arange(y[:4].numel()).view_as(y[:4])] * 2)).sum().backward()
    r = [torch.load(tmp_path / f"{i}.pt") for i in range(2)]
    assert torch.allclose(torch.cat([r[0]["y"], r[1]["y"]]), y, atol=1e-5)
    assert torch.allclose(torch.cat([r[0]["grad"], r[1]["grad"]]), x.grad, atol=1e-5)
    assert torch.allclose(r[0]["mean"], bn.running_mean, atol=1e-6)
    assert torch.allclose(r[0]["var"], bn.running_var, atol=1e-5)
    assert torch.allclose(r[0]["wgrad"] + r[1]["wgrad"], bn.weight.grad, atol=1e-3)  # DDP sums the rest


def test_deepspeed_config_generated_or_from_json(tmp_path):
    from hpc_lensiam.train.plan import deepspeed_config

    cfg = TrainConfig(batch_size=8, grad_accum=2, precision="bf16", zero_stage=1)
    ds = deepspeed_config(cfg, world_size=4)
    assert ds["train_batch_size"] == 64 and ds["gradient_accumulation_steps"] == 2
    assert ds["gradient_clipping"] == 0.0 and ds["zero_optimization"] == {"stage": 1}
    assert ds["zero_allow_untested_optimizer"] and ds["torch_autocast"] == {
        "enabled": True,
        "dtype": "bfloat16",
        "lower_precision_safe_modules": [],
    }
    user = tmp_path / "ds.json"
    user.write_text('{"gradient_clipping": 1.0, "bf16": {"enabled": true}, "train_micro_batch_size_per_gpu": 8}')
    cfg.deepspeed_config = str(user)
    ds = deepspeed_config(cfg, world_size=4)
    assert ds["gradient_clipping"] == 1.0 and ds["bf16"] == {"enabled": True}
    user.write_text('{"train_batch_size": 10}')
    with pytest.raises(ConfigError, match="train_batch_size = 10 contradicts the flags"):
        deepspeed_config(cfg, world_size=4)
    user.write_text("{not json")
    with pytest.raises(ConfigError, match="cannot read DeepSpeed config"):
        deepspeed_config(cfg, world_size=4)


def test_max_steps_inside_the_warm_up_is_said_at_start(lensiam_shards, tmp_path, capsys):
    """`--max-steps` stops a run without shortening its schedule (a stopped run is the prefix of the
    full one); a 2-rank demo run never left its warm-up and nothing said so. Now the start says where
    the stop falls: inside the warm-up (a warning naming what to change) or on the cosine (the lr)."""
    from hpc_lensiam.train.loop import Schedule, train_config

    cfg = train_config(data="x", out="y", epochs=10, warmup_epochs=2, max_steps=15)
    sched = Schedule.from_config(cfg, world_size=2, batches_per_epoch=10)  # 10 steps/epoch, warm-up 20
    assert sched.warmup_steps == 20 and sched.end_step == 15
    assert "stops inside the warm-up (20 steps)" in sched.stop_note()
    later = Schedule.from_config(train_config(data="x", out="y", epochs=10, warmup_epochs=2, max_steps=60), 2, 10)
    assert "stops at lr" in later.stop_note() and "warm-up" not in later.stop_note()
    assert Schedule.from_config(train_config(data="x", out="y", epochs=10), 2, 10).stop_note() is None

    train_tiny(lensiam_shards, tmp_path / "run", epochs=4, warmup_epochs=2, max_steps=2)
    out = capsys.readouterr().out
    assert "train: warning: --max-steps 2 stops inside the warm-up" in out, out


def _as_older_version(cfg: dict) -> dict:
    """A config as an older version saved it: ``mode: lensiam|simsiam`` and the flat method keys, no
    ``views`` and no ``method_params``."""
    cfg = dict(cfg)
    views, params = cfg.pop("views"), cfg.pop("method_params")
    flat = {"ema_tau_base": 0.996, "temperature": 0.1, "vicreg_sim_coeff": 25.0, "vicreg_std_coeff": 25.0}
    flat.update(vicreg_cov_coeff=1.0, **params)
    return {"mode": {"lens": "lensiam", "standard": "simsiam"}[views], **cfg, **flat}


@pytest.mark.slow  # a long end-to-end run (15-45 s): make test, not test-fast
def test_a_run_saved_by_an_older_version_resumes_and_stays_guarded(lensiam_shards, tmp_path, capsys):
    """A BYOL run whose RUN/config.yaml and checkpoints say ``mode: lensiam`` and ``ema_tau_base``
    (an older version's files) resumes with ``--config RUN/config.yaml --resume``: the saved files are
    translated on read (views lens, method_params {ema_tau_base}); a change of the views or of the
    EMA is still refused naming it; downstream readers see its views."""
    import yaml

    from hpc_lensiam.cli import main
    from hpc_lensiam.models.weights import HASH_KEY, backbone_from_checkpoint
    from hpc_lensiam.train.checkpoint import save_checkpoint

    run = train_tiny(lensiam_shards, tmp_path / "old", method="byol", proj_hidden_dim=32, proj_dim=16, pred_dim=32)
    header, body = (run / "config.yaml").read_text().split("\n", 1)
    old = _as_older_version(yaml.safe_load(body))
    assert old["mode"] == "lensiam" and old["ema_tau_base"] == 0.996 and "views" not in old
    (run / "config.yaml").write_text(header + "\n" + yaml.safe_dump(old, sort_keys=False))
    for path in (run / "checkpoints").glob("*.pt"):
        ckpt = load_checkpoint(path)
        ckpt.pop(HASH_KEY, None)
        save_checkpoint(path, {**ckpt, "config": _as_older_version(ckpt["config"])})
    assert "mode" in load_checkpoint(run / "checkpoints" / "last.pt")["config"]
    assert backbone_from_checkpoint(run / "checkpoints" / "last.pt")[1]["views"] == "lens"

    resume = ["train", "--config", str(run / "config.yaml"), "--resume", "--max-steps", "3"]
    for change, named in (
        (["--views", "standard"], "views 'lens' -> 'standard'"),
        (["--method-param", "ema_tau_base=0.99"], "method_params {'ema_tau_base': 0.996} -> {'ema_tau_base': 0.99}"),
    ):
        assert main([*resume, *change]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "was trained with other settings: " + named in err, err
    assert load_checkpoint(run / "checkpoints" / "last.pt")["step"] == 2  # refusals changed nothing

    assert main(resume) == 0, capsys.readouterr().err
    assert "resuming at step 2" in capsys.readouterr().out
    ckpt = load_checkpoint(run / "checkpoints" / "last.pt")
    assert ckpt["step"] == 3 and ckpt["config"]["views"] == "lens" and "mode" not in ckpt["config"]
    assert ckpt["config"]["method_params"] == {"ema_tau_base": 0.996}
