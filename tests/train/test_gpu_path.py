"""The GPU/cluster path on a CPU: the CUDA device plan run through DDP and DeepSpeed, resume across
engines and layouts, per-rank RNG, the launcher guard, checkpoints that survive corruption.

No GPU here: each CUDA-only decision is taken by ``make_plan(cfg, DeviceCaps.cuda(...), world)``
(a pure function of the device's capabilities) and the resulting plan runs on the CPU with the real
DeepSpeed engine, real DDP over gloo and real checkpoints. Numbers in comments refer to the findings
of issue 11.
"""

from __future__ import annotations

import dataclasses
import os
import random
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from hpc_lensiam.core.errors import ConfigError, UserError
from hpc_lensiam.core.runtime import (
    DeviceCaps,
    check_torch_launch,
    cpu_budget_warning,
    inference_dtype,
    pick_cuda_index,
    process_group_kwargs,
    runtime,
)
from hpc_lensiam.models.methods.simsiam import SimSiam, simsiam_loss
from hpc_lensiam.models.weights import load_checkpoint
from hpc_lensiam.train.checkpoint import capture_rank_rng, load_for_resume, rank_rng, restore_rank_rng, save_checkpoint
from hpc_lensiam.train.config import TrainConfig
from hpc_lensiam.train.engine import Engine, resume_mode
from hpc_lensiam.train.loop import train
from hpc_lensiam.train.plan import apply_switches, make_plan
from support import REPO, launcher_env, leave_spawned_rank, only_error_line, tiny_config, torchrun_cmd

CPU = torch.device("cpu")
# What Slurm sets in each task of a plain `srun -n 2` (measured: core/runtime.py, test_mpi_env.py)
SRUN_TASK1 = {
    "SLURM_JOB_ID": "4",
    "SLURM_NTASKS": "2",
    "SLURM_PROCID": "1",
    "SLURM_STEP_ID": "0",
    "SLURM_STEP_NUM_TASKS": "2",
}


def _cfg(data, out, **kw) -> TrainConfig:
    """The tiny recipe with 4 per rank over 2 epochs and no step cap unless one is given."""
    return tiny_config(data, out, **{"batch_size": 4, "epochs": 2, "max_steps": None, **kw})


def _one_step(engine: Engine, model: SimSiam) -> torch.Tensor:
    groups = [{"params": list(model.parameters()), "lr": 0.05}]
    engine.wrap(model, groups)
    g = torch.Generator().manual_seed(0)
    x1, x2 = (engine.to_input(torch.rand(4, 1, 48, 48, generator=g)) for _ in range(2))
    loss = simsiam_loss(*engine.forward(x1, x2))
    engine.backward(loss)
    assert engine.step()
    return loss.detach()


def _clean_env(monkeypatch):
    for k in (
        "RANK",
        "WORLD_SIZE",
        "LOCAL_RANK",
        "LOCAL_WORLD_SIZE",
        "MASTER_ADDR",
        "MASTER_PORT",
        "TORCHELASTIC_RUN_ID",
        *SRUN_TASK1,
    ):
        monkeypatch.delenv(k, raising=False)


@pytest.fixture(autouse=True)
def _restore_environ():
    """A one-process DeepSpeed engine writes RANK/MASTER_PORT into os.environ: undo it per test."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


# ---------------------------------------------------------------------------- 1, 3: DeepSpeed start-up
@pytest.mark.slow  # a long end-to-end run (15-45 s): make test, not test-fast
def test_channels_last_model_breaks_deepspeed_initialize(lensiam_shards, tmp_path, monkeypatch):
    """Finding 1, the trap itself: the old CUDA branch converted the model to channels_last before
    deepspeed.initialize, whose start-up broadcast views every weight as bytes."""
    _clean_env(monkeypatch)
    cfg = _cfg(lensiam_shards, tmp_path / "x", engine="deepspeed")
    engine = Engine(cfg, device=CPU)
    try:
        import deepspeed

        model = SimSiam("resnet18", 64, 16).to(memory_format=torch.channels_last)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        with pytest.raises(RuntimeError, match="stride"):
            deepspeed.initialize(model=model, optimizer=opt, config=engine.plan.deepspeed)
    finally:
        engine.close()


@pytest.mark.parametrize("zero_stage", [0, 1])
def test_cuda_plan_through_deepspeed_startup_and_a_step(lensiam_shards, tmp_path, monkeypatch, zero_stage):
    """Findings 1 and 3: the CUDA plan (bf16 + channels_last, the paper config) starts DeepSpeed and
    steps; inputs are channels_last, the model handed to initialize is not; no parameter carries
    DeepSpeed's bf16 communication dtype, so ZeRO-1 reduces fp32 gradients like ZeRO-0 and DDP."""
    from deepspeed.runtime.torch_autocast import PARAM_COMM_DTYPE_ATTR_NAME

    _clean_env(monkeypatch)
    cfg = _cfg(
        lensiam_shards, tmp_path / "x", engine="deepspeed", zero_stage=zero_stage, precision="bf16", channels_last=True
    )
    plan = make_plan(cfg, DeviceCaps.cuda((8, 0)), world_size=1)
    assert plan.input_memory_format == torch.channels_last and plan.model_memory_format == torch.contiguous_format
    assert plan.deepspeed["torch_autocast"]["lower_precision_safe_modules"] == []
    engine = Engine(cfg, plan=plan, device=CPU)
    try:
        torch.manual_seed(0)
        model = SimSiam("resnet18", 64, 16)
        before = {k: v.clone() for k, v in model.state_dict().items()}
        loss = _one_step(engine, model)
        assert torch.isfinite(loss)
        assert engine.to_input(torch.rand(2, 1, 8, 8)).is_contiguous(memory_format=torch.channels_last)
        assert not [n for n, p in engine.module.named_parameters() if hasattr(p, PARAM_COMM_DTYPE_ATTR_NAME)]
        assert next(engine.module.parameters()).dtype == torch.float32  # fp32 master weights
        assert not torch.equal(before["encoder.conv1.weight"], engine.module.state_dict()["encoder.conv1.weight"])
    finally:
        engine.close()


def test_default_lower_precision_modules_reduce_in_bf16(lensiam_shards, tmp_path, monkeypatch):
    """Finding 3, the trap: without "lower_precision_safe_modules": [] DeepSpeed tags Conv/Linear
    parameters with a bf16 communication dtype (ZeRO >= 1 then all-reduces their gradients in bf16)."""
    import deepspeed
    from deepspeed.runtime.torch_autocast import PARAM_COMM_DTYPE_ATTR_NAME

    _clean_env(monkeypatch)
    cfg = _cfg(lensiam_shards, tmp_path / "x", engine="deepspeed", zero_stage=1, precision="bf16")
    engine = Engine(cfg, device=CPU)
    try:
        ds = dict(engine.plan.deepspeed, torch_autocast={"enabled": True, "dtype": "bfloat16"})
        model = SimSiam("resnet18", 64, 16)
        m, _, _, _ = deepspeed.initialize(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), config=ds)
        tagged = {n for n, p in model.named_parameters() if getattr(p, PARAM_COMM_DTYPE_ATTR_NAME, None)}
        assert "encoder.conv1.weight" in tagged and "predictor.0.weight" in tagged
    finally:
        engine.close()


# --------------------------------------------------------------------------- 10: the CUDA plan on DDP
def _ddp_worker(rank: int, port: int, data: str, out: str, precision: str):
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE="2",
        LOCAL_WORLD_SIZE="2",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    cfg = _cfg(data, out, precision=precision, channels_last=True)
    plan = make_plan(cfg, DeviceCaps.cuda((8, 0)), world_size=2)
    assert plan.sync_bn == "torch" and plan.ddp_kwargs == {"broadcast_buffers": False}
    # nn.SyncBatchNorm has CUDA kernels only: on this CPU its gloo twin (tested equal to full-batch BN)
    engine = Engine(cfg, plan=dataclasses.replace(plan, sync_bn="gloo"), device=CPU)
    torch.manual_seed(0)
    model = SimSiam("resnet18", 64, 16)
    g = torch.Generator().manual_seed(rank)  # different data per rank
    engine.wrap(model, [{"params": list(model.parameters()), "lr": 0.05}])
    x1, x2 = (engine.to_input(torch.rand(4, 1, 48, 48, generator=g)) for _ in range(2))
    loss = simsiam_loss(*engine.forward(x1, x2))
    engine.backward(loss)
    engine.step()
    state = engine.model_state()
    torch.save(
        {
            "state": state,
            "broadcast_buffers": engine.model.broadcast_buffers,
            "channels_last": engine.module.encoder.conv1.weight.is_contiguous(memory_format=torch.channels_last),
            "scaler": engine.scaler is not None,
            "loss": float(loss),
        },
        f"{out}/{rank}.pt",
    )
    engine.close()
    leave_spawned_rank()


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_cuda_plan_through_ddp_two_ranks(lensiam_shards, tmp_path, precision):
    """Finding 10: DDP with broadcast_buffers=False (SyncBN keeps buffers equal by itself), a
    channels_last model, autocast, and for fp16 the GradScaler: after a step on different data the
    two ranks hold identical weights AND BatchNorm buffers."""
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_ddp_worker, args=(port, str(lensiam_shards), str(tmp_path), precision), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"{r}.pt") for r in range(2))
    assert r0["broadcast_buffers"] is False and r0["channels_last"] and r0["scaler"] == (precision == "fp16")
    assert r0["loss"] != r1["loss"]  # different batches
    for k, v in r0["state"].items():
        assert torch.equal(v, r1["state"][k]), k  # running stats too
    assert "encoder.bn1.running_mean" in r0["state"]


def test_cudnn_tf32_and_deterministic_switches():
    """Finding 10 and --deterministic: the CUDA plan turns on cudnn.benchmark and TF32;
    --deterministic turns benchmark off and deterministic algorithms on."""
    try:
        plan = make_plan(TrainConfig(), DeviceCaps.cuda(), world_size=4)
        apply_switches(plan)
        assert torch.backends.cudnn.benchmark and torch.backends.cuda.matmul.allow_tf32
        assert torch.backends.cudnn.allow_tf32 and not torch.are_deterministic_algorithms_enabled()
        det = make_plan(TrainConfig(deterministic=True), DeviceCaps.cuda(), world_size=4)
        apply_switches(det)
        assert not torch.backends.cudnn.benchmark and torch.backends.cudnn.deterministic
        assert torch.are_deterministic_algorithms_enabled() and os.environ["CUBLAS_WORKSPACE_CONFIG"]
        cpu = make_plan(TrainConfig(), DeviceCaps(), world_size=1)
        assert not cpu.cudnn_benchmark and cpu.input_memory_format == torch.contiguous_format
    finally:
        apply_switches(make_plan(TrainConfig(), DeviceCaps(), world_size=1))
    assert not torch.are_deterministic_algorithms_enabled()


def test_sync_batchnorm_in_the_plan_and_off_with_its_flag():
    """SyncBatchNorm across ranks by default (torch's on CUDA, the all-reduce one on CPU), none on
    one rank, none with --no-sync-batchnorm (gpu_check measures what it costs)."""
    assert make_plan(TrainConfig(), DeviceCaps.cuda(), world_size=2).sync_bn == "torch"
    assert make_plan(TrainConfig(), DeviceCaps(), world_size=2).sync_bn == "gloo"
    assert make_plan(TrainConfig(), DeviceCaps.cuda(), world_size=1).sync_bn == "none"
    assert make_plan(TrainConfig(sync_batchnorm=False), DeviceCaps.cuda(), world_size=2).sync_bn == "none"


def test_one_device_rule_and_process_group_device_id():
    """Finding 10: one rule for every command. Local rank r -> cuda:r; one visible GPU (per-task
    binding) -> cuda:0; more local ranks than GPUs is an error, not two ranks on one GPU."""
    assert [pick_cuda_index(r, 4) for r in range(4)] == [0, 1, 2, 3]
    assert pick_cuda_index(3, 1) == 0
    with pytest.raises(UserError, match="LOCAL_RANK=4 but only 4 GPUs.*--nproc_per_node 4"):
        pick_cuda_index(4, 4)
    kw = process_group_kwargs(torch.device("cuda", 1))
    assert kw == {"backend": "nccl", "device_id": torch.device("cuda", 1)}
    assert process_group_kwargs(CPU) == {"backend": "gloo"}
    rt = runtime({"RANK": "5", "LOCAL_RANK": "1", "WORLD_SIZE": "8", "LOCAL_WORLD_SIZE": "4"})
    assert (rt.rank, rt.local_rank, rt.world_size, rt.local_world_size) == (5, 1, 8, 4)


# ------------------------------------------------------------------------------------------ 8: bf16
def test_bf16_refused_without_native_support_and_embed_picks_fp16():
    """Finding 8: a V100 (7.0) or T4 (7.5) would emulate bf16: training refuses, naming fp16."""
    cfg = TrainConfig(precision="bf16")
    for cap in ((7, 0), (7, 5)):
        with pytest.raises(ConfigError, match=rf"compute capability {cap[0]}\.{cap[1]}\) has no native bf16.*fp16"):
            make_plan(cfg, DeviceCaps.cuda(cap, "V100"), world_size=1)
        assert inference_dtype(DeviceCaps.cuda(cap)) == torch.float16
        make_plan(TrainConfig(precision="fp16"), DeviceCaps.cuda(cap), world_size=1)  # fp16 is fine
    assert make_plan(cfg, DeviceCaps.cuda((8, 0)), world_size=1).autocast_dtype == torch.bfloat16
    assert inference_dtype(DeviceCaps.cuda((9, 0))) == torch.bfloat16 and inference_dtype(DeviceCaps()) is None


# ----------------------------------------------------------------------------- 7: the launcher guard
def test_srun_without_torchrun_refused(tmp_path):
    """Finding 7: the environment of a plain `srun -n 2` task, no torchrun: train, embed and
    finetune stop before writing anything, naming torchrun; torchrun's own workers pass."""
    with pytest.raises(UserError, match=r"SLURM_STEP_NUM_TASKS=2.*no torchrun.*torchrun --nproc_per_node"):
        check_torch_launch(SRUN_TASK1, "train")
    check_torch_launch({**SRUN_TASK1, "WORLD_SIZE": "2", "RANK": "1"})  # torchrun inside srun
    check_torch_launch({"SLURM_NTASKS": "2", "SLURM_PROCID": "0"})  # the batch shell
    with pytest.raises(UserError, match="PMI_SIZE=2"):
        check_torch_launch({"PMI_SIZE": "2"})  # mpiexec -n 2 train
    env = launcher_env(**SRUN_TASK1, PYTHONPATH=str(REPO))
    for cmd in (
        ["train", "--data", str(tmp_path), "--out", str(tmp_path / "run")],
        ["embed", "--checkpoint", str(tmp_path), "--data", str(tmp_path), "--out", str(tmp_path / "e.h5")],
    ):
        p = subprocess.run(
            [sys.executable, "-m", "hpc_lensiam", *cmd], env=env, capture_output=True, text=True, timeout=120
        )
        assert "torchrun" in only_error_line(p), p.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_cpu_budget_warning():
    assert cpu_budget_warning(workers=1, local_processes=2, cpus=4) is None
    msg = cpu_budget_warning(workers=6, local_processes=4, cpus=2)
    assert "4 process(es) x (1 + 6 loader workers) = 28" in msg and "--cpus-per-task=28" in msg


# ---------------------------------------------------------------------------- 4: RNG per rank
def test_rng_restore_tolerates_fewer_gpus_and_ranks():
    """Finding 4: the old checkpoint held rank 0's list of every visible GPU's state and restored
    the whole list everywhere (IndexError with fewer GPUs). Now each rank gets its own entry."""
    legacy = {"torch": torch.get_rng_state(), "cuda": [torch.tensor([i], dtype=torch.uint8) for i in range(4)]}
    states, note = rank_rng(legacy, rank=0, device_index=0)
    assert int(states["cuda"][0]) == 0 and note is None
    states, note = rank_rng(legacy, rank=5, device_index=5)  # a GPU the saver lacked
    assert states["cuda"] is None and "GPU 5 starts with a fresh generator" in note
    per_rank = {
        "per_rank": [{"torch": torch.get_rng_state(), "cuda": torch.tensor([r], dtype=torch.uint8)} for r in range(2)]
    }
    assert int(rank_rng(per_rank, rank=1, device_index=0)[0]["cuda"][0]) == 1  # rank 1 on its only GPU
    states, note = rank_rng(per_rank, rank=3, device_index=0)
    assert states["cuda"] is None and "saved by 2 rank(s)" in note
    # round trip of this rank's CPU generator and Python's
    saved = {"per_rank": [capture_rank_rng(CPU)], "python": random.getstate()}
    a = (torch.rand(3), random.random())
    assert restore_rank_rng(saved, rank=0, device=CPU) is None
    b = (torch.rand(3), random.random())
    assert torch.equal(a[0], b[0]) and a[1] == b[1]


# ------------------------------------------------------------------- 2, 5: resume across engines
def _flat(state: dict) -> torch.Tensor:
    return torch.cat(
        [v.flatten().float() for k, v in sorted(state.items()) if v.is_floating_point() and "running" not in k]
    )


@pytest.mark.slow  # a long end-to-end run (12-14 s): make test, not test-fast
def test_ddp_checkpoint_resumed_by_zero1_keeps_the_trained_weights(lensiam_shards, tmp_path, monkeypatch, capsys):
    """Finding 2: a DDP last.pt resumed with --engine deepspeed --zero-stage 1. ZeRO-1 clones its
    fp32 master copy at initialize: the weights must be in the model before it, or the first step
    brings back the fresh init. After one resumed step the weights are one step from the saved ones,
    not one step from the initialisation."""
    _clean_env(monkeypatch)
    run = tmp_path / "run"
    kw = dict(base_lr=4.0, warmup_epochs=0.0, ckpt_every=100)
    train(_cfg(lensiam_shards, run, max_steps=2, **kw))
    w2 = load_checkpoint(run / "checkpoints" / "last.pt")["model"]
    torch.manual_seed(0)
    w0 = SimSiam("resnet18", 64, 16).state_dict()
    capsys.readouterr()
    summary = train(_cfg(lensiam_shards, run, max_steps=3, engine="deepspeed", zero_stage=1, **kw), resume=True)
    err = capsys.readouterr().err
    assert summary["steps_run"] == 1
    assert "notice: resuming" in err and "weights only" in err and "--engine ddp" in err
    w3 = load_checkpoint(run / "checkpoints" / "last.pt")["model"]
    d_saved, d_init = (float((_flat(w3) - _flat(w)).norm()) for w in (w2, w0))
    assert d_saved < 0.5 * d_init, (d_saved, d_init)


def test_weights_loaded_after_wrap_are_caught(lensiam_shards, tmp_path, monkeypatch):
    """Finding 2, the check: loading into the module after ZeRO-1 cloned its master copy (the old
    order) leaves a stale master copy, which verify() reports before the first step."""
    from hpc_lensiam.train.resume import verify

    _clean_env(monkeypatch)
    cfg = _cfg(lensiam_shards, tmp_path / "x", engine="deepspeed", zero_stage=1)
    engine = Engine(cfg, device=CPU)
    try:
        torch.manual_seed(1)
        fresh = SimSiam("resnet18", 64, 16).state_dict()
        saved = {k: v + 0.01 if v.is_floating_point() else v for k, v in fresh.items()}
        model = SimSiam("resnet18", 64, 16)
        engine.wrap(model, [{"params": list(model.parameters()), "lr": 0.1}])
        engine.module.load_state_dict(saved)  # the old order
        with pytest.raises(RuntimeError, match="does not hold the saved weights.*param group 0"):
            verify(engine, {"model": saved}, Path("last.pt"))
    finally:
        engine.close()


@pytest.mark.slow  # a long end-to-end run (15-45 s): make test, not test-fast
def test_zero_stage_change_resumes_weights_only(lensiam_shards, tmp_path, monkeypatch, capsys):
    """Finding 5: --zero-stage 0 -> 1 on resume was a raw FileNotFoundError (ZeRO-1 looks for
    per-rank optimizer files ZeRO-0 never wrote); now a one-line notice and the weights."""
    _clean_env(monkeypatch)
    run = tmp_path / "run"
    train(_cfg(lensiam_shards, run, max_steps=1, engine="deepspeed", zero_stage=0))
    w1 = load_checkpoint(run / "checkpoints" / "last.pt")["model"]
    capsys.readouterr()
    summary = train(_cfg(lensiam_shards, run, max_steps=2, engine="deepspeed", zero_stage=1), resume=True)
    err = capsys.readouterr().err
    assert summary["steps_run"] == 1
    notice = [ln for ln in err.splitlines() if "notice: resuming" in ln]
    assert len(notice) == 1 and "--zero-stage 0, this run is --zero-stage 1" in notice[0]
    w2 = load_checkpoint(run / "checkpoints" / "last.pt")["model"]
    assert not torch.equal(w1["encoder.conv1.weight"], w2["encoder.conv1.weight"])


@pytest.mark.slow
def test_zero1_world_size_change_resumes_weights_only(lensiam_shards, tmp_path, monkeypatch, capsys):
    """Finding 5, the rank count: a 2-rank ZeRO-1 run (optimizer state partitioned in 2 files)
    resumed by 1 process used to die in a FileNotFoundError; now weights-only with one notice."""
    _clean_env(monkeypatch)
    run = tmp_path / "run"
    env = launcher_env(PYTHONPATH=str(REPO))
    args = [
        "--data",
        str(lensiam_shards),
        "--out",
        str(run),
        "--arch",
        "resnet18",
        "--batch-size",
        "4",
        "--epochs",
        "2",
        "--workers",
        "0",
        "--proj-dim",
        "64",
        "--pred-dim",
        "16",
        "--engine",
        "deepspeed",
        "--zero-stage",
        "1",
    ]
    p = subprocess.run(
        torchrun_cmd(2)
        + [
            "train",
            *args,
            "--max-steps",
            "2",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    saved = load_checkpoint(run / "checkpoints" / "last.pt")
    assert saved["world_size"] == 2 and len(saved["rng"]["per_rank"]) == 2
    capsys.readouterr()
    summary = train(_cfg(lensiam_shards, run, max_steps=3, engine="deepspeed", zero_stage=1), resume=True)
    err = capsys.readouterr().err
    assert summary["steps_run"] == 1
    notice = [ln for ln in err.splitlines() if "notice: resuming" in ln]
    assert len(notice) == 1 and "over 2 rank(s), this run has 1" in notice[0], err


def test_resume_mode_layouts():
    """Finding 5: which saved layouts restore the optimizer, and which resume weights-only."""
    ds1 = {"engine": "deepspeed", "zero_stage": 1, "world_size": 2}
    assert resume_mode(ds1, "deepspeed", 1, 2) is None
    assert "over 2 rank(s), this run has 1" in resume_mode(ds1, "deepspeed", 1, 1)
    assert "--zero-stage 1, this run is --zero-stage 0" in resume_mode(ds1, "deepspeed", 0, 2)
    assert resume_mode({**ds1, "zero_stage": 0}, "deepspeed", 0, 8) is None  # ZeRO-0: whole state
    assert resume_mode({"engine": "ddp", "world_size": 8}, "ddp", 0, 2) is None  # DDP: whole state
    assert "--engine deepspeed" in resume_mode(ds1, "ddp", 0, 2)


# ------------------------------------------------------------------------------- 9: checkpoints
def _flip_inside_tensor_data(path: Path) -> None:
    """Flip bytes in the middle of the largest stored tensor: the zip still opens and unpickles."""
    import zipfile

    with zipfile.ZipFile(path) as z:
        info = max(z.infolist(), key=lambda i: i.file_size)
    data = bytearray(path.read_bytes())
    name_len, extra_len = (
        int.from_bytes(data[info.header_offset + o : info.header_offset + o + 2], "little") for o in (26, 28)
    )  # the local header's own
    at = info.header_offset + 30 + name_len + extra_len + info.file_size // 2
    for i in range(at, at + 64):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.slow
def test_corrupt_last_pt_falls_back_to_newest_valid_step(lensiam_shards, tmp_path, monkeypatch, capsys):
    """Finding 9 (and issue 12's "bytes flipped inside last.pt then --resume"): the stored sha256
    catches a flipped file that still loads; resume falls back to the newest valid step_*.pt,
    naming both; a truncated newest step_*.pt is skipped too. keep_last prunes old copies."""
    _clean_env(monkeypatch)
    run = tmp_path / "run"
    ck = run / "checkpoints"
    train(_cfg(lensiam_shards, run, max_steps=7, ckpt_every=2, keep_last=2))
    assert sorted(p.name for p in ck.glob("step_*.pt")) == ["step_00000004.pt", "step_00000006.pt"]
    _flip_inside_tensor_data(ck / "last.pt")
    torch.load(ck / "last.pt", weights_only=True)  # still unpickles: only the hash knows
    with pytest.raises(UserError, match="last.pt: corrupt checkpoint"):
        load_checkpoint(ck / "last.pt")
    (ck / "step_00000006.pt").write_bytes((ck / "step_00000006.pt").read_bytes()[:5000])
    capsys.readouterr()
    summary = train(_cfg(lensiam_shards, run, max_steps=8, ckpt_every=2, keep_last=2), resume=True)
    err = capsys.readouterr().err
    assert summary["step"] == 8 and summary["steps_run"] == 4
    warn = [ln for ln in err.splitlines() if "resuming from" in ln]
    assert len(warn) == 1 and "last.pt: corrupt" in warn[0] and "step_00000004.pt (step 4)" in warn[0]
    assert load_checkpoint(ck / "last.pt")["step"] == 8
    assert sorted(p.name for p in ck.glob("step_*.pt")) == ["step_00000006.pt", "step_00000008.pt"]
    for p in ck.glob("step_*.pt"):
        p.write_bytes(b"junk")
    _flip_inside_tensor_data(ck / "last.pt")
    with pytest.raises(UserError, match="last.pt: corrupt.*no readable step_\\*.pt"):
        load_for_resume(ck)


def test_checkpoint_write_fsyncs_file_and_folder(tmp_path, monkeypatch):
    """Finding 9: the data and the rename are both forced to disk (os.fsync spied, still called)."""
    synced = []
    real = os.fsync

    def spy(fd):
        synced.append(os.path.realpath(f"/proc/self/fd/{fd}"))
        return real(fd)

    monkeypatch.setattr(os, "fsync", spy)
    save_checkpoint(tmp_path / "ck" / "last.pt", {"step": 1, "w": torch.ones(3)})
    assert any("/ck/.tmp-last.pt" in p for p in synced) and str(tmp_path / "ck") in synced
    assert load_checkpoint(tmp_path / "ck" / "last.pt")["step"] == 1


# ------------------------------------------------------------------- PDEATHSIG: kill -9 the agent
def _children(pid: int) -> list[int]:
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                out.append(int(d.name))
    return out


@pytest.mark.slow
def test_trainers_die_with_their_torchrun_agent(lensiam_shards, tmp_path):
    """kill -9 of the torchrun agent: the trainers (PR_SET_PDEATHSIG) stop too instead of running on."""
    run = tmp_path / "run"
    env = launcher_env(PYTHONPATH=str(REPO))
    cmd = torchrun_cmd(2) + [
        "train",
        "--data",
        str(lensiam_shards),
        "--out",
        str(run),
        "--arch",
        "resnet18",
        "--batch-size",
        "4",
        "--epochs",
        "100",
        "--log-every",
        "1",
        "--workers",
        "0",
        "--proj-dim",
        "64",
        "--pred-dim",
        "16",
    ]
    agent = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    trainers: list[int] = []
    try:
        deadline = time.time() + 180
        while time.time() < deadline and not (
            (run / "metrics.csv").is_file() and len((run / "metrics.csv").read_text().splitlines()) >= 2
        ):
            time.sleep(0.2)
        trainers = _children(agent.pid)
        assert len(trainers) == 2, trainers
        agent.kill()
        agent.wait()
        deadline = time.time() + 60
        while time.time() < deadline and any(
            Path(f"/proc/{p}").exists() and "Z" not in (Path(f"/proc/{p}/stat").read_text().split()[2:3] or [""])
            for p in trainers
        ):
            time.sleep(0.2)
        alive = [
            p
            for p in trainers
            if Path(f"/proc/{p}").exists() and Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
        ]
        assert not alive, f"trainers {alive} outlived their torchrun agent"
    finally:  # never leave this test's own processes behind, whatever failed
        for p in set(trainers) | set(_children(agent.pid) if agent.poll() is None else []):
            try:  # only if the pid is still one of this test's trainers (never a reused pid)
                if str(run) in Path(f"/proc/{p}/cmdline").read_bytes().decode(errors="replace"):
                    os.kill(p, 9)
            except (OSError, ProcessLookupError):
                pass
        if agent.poll() is None:
            agent.kill()


# ------------------------------------------------------------------- observability: TensorBoard, probe
@pytest.mark.slow  # a long end-to-end run (15-45 s): make test, not test-fast
def test_tensorboard_metrics_and_lens_probe(lensiam_shards, single_shards, tmp_path, monkeypatch):
    """RUN/tb/ holds the metrics.csv scalars (read back with tensorboard's own EventAccumulator),
    images_per_s = 2 x pairs_per_s (finding 10: it used to count pairs), data wait vs compute, peak
    memory; --probe-data logs ridge R^2 of theta_E, e1, gamma equal to an offline probe of the
    saved backbone on the same held-out set."""
    import csv

    import numpy as np
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from hpc_lensiam.evaluation.probe import probe_arrays, split_by_key
    from hpc_lensiam.models.weights import load_backbone
    from hpc_lensiam.shards.manifest import LENS_PARAMS
    from hpc_lensiam.shards.reader import load_images

    _clean_env(monkeypatch)
    run = tmp_path / "run"
    train(
        _cfg(
            lensiam_shards,
            run,
            max_steps=4,
            probe_data=str(single_shards),
            probe_every=2,
            probe_samples=64,
            log_every=1,
        )
    )
    with open(run / "metrics.csv", newline="") as f:
        rows = {int(r["step"]): {k: float(v) for k, v in r.items()} for r in csv.DictReader(f)}
    assert sorted(rows) == [1, 2, 3, 4]
    for r in rows.values():
        assert r["images_per_s"] == pytest.approx(2 * r["pairs_per_s"], rel=1e-5) and r["pairs_per_s"] > 0
        assert r["data_wait_s"] >= 0 and r["compute_s"] > 0 and r["peak_mem_mb"] > 0
    assert all(np.isnan(rows[s]["probe_r2_theta_E"]) for s in (1, 3))
    assert all(np.isfinite(rows[s][f"probe_r2_{p}"]) for s in (2, 4) for p in ("theta_E", "e1", "gamma"))

    acc = EventAccumulator(str(run / "tb"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {
        "train/loss",
        "train/pairs_per_s",
        "train/images_per_s",
        "train/data_wait_s",
        "train/compute_s",
        "train/peak_mem_mb",
        "train/z_std",
        "train/lr",
        "probe/ridge_r2_theta_E",
        "probe/ridge_r2_e1",
        "probe/ridge_r2_gamma",
    } <= tags
    loss = {e.step: e.value for e in acc.Scalars("train/loss")}
    assert sorted(loss) == [1, 2, 3, 4]
    assert all(loss[s] == pytest.approx(rows[s]["loss"], rel=1e-5) for s in loss)
    r2 = {e.step: e.value for e in acc.Scalars("probe/ridge_r2_theta_E")}
    assert sorted(r2) == [2, 4] and r2[4] == pytest.approx(rows[4]["probe_r2_theta_E"], rel=1e-5)

    # the same probe offline, from last.pt (= the weights at step 4) through embed's backbone loader
    backbone, _ = load_backbone(str(run / "checkpoints" / "last.pt"))
    keys, images, lens = load_images(str(single_shards), 64)
    with torch.no_grad():
        feats = backbone.eval()(torch.from_numpy(images).unsqueeze(1)).numpy()
    targets = {p: lens[:, LENS_PARAMS.index(p)] for p in ("theta_E", "e1", "gamma")}
    offline = probe_arrays(feats, targets, np.asarray(keys), split_by_key(np.asarray(keys)))["ridge"]
    for p in ("theta_E", "e1", "gamma"):
        assert rows[4][f"probe_r2_{p}"] == pytest.approx(offline[p], rel=1e-3, abs=1e-4), p


def test_probe_data_checked_before_training(lensiam_shards, tmp_path, monkeypatch):
    _clean_env(monkeypatch)
    with pytest.raises(UserError, match="no such data directory"):
        train(_cfg(lensiam_shards, tmp_path / "run", max_steps=1, probe_data=str(tmp_path / "absent")))
    assert not (tmp_path / "run").exists()


@pytest.mark.slow  # a long end-to-end run (12-14 s): make test, not test-fast
def test_reported_throughput_excludes_checkpoint_saves(lensiam_shards, tmp_path, monkeypatch):
    """The summary's pairs/s (the `train: done:` line) and metrics.csv's rows count training steps
    only: a checkpoint save (here after every step, and the closing one) is neither throughput time
    nor data wait. Before, the summary's clock ran through the closing save and loss.png (a CPU
    smoke showed 7.1 images/s where metrics.csv showed 18.6) and a periodic save was booked as the
    next step's data wait."""
    import csv

    _clean_env(monkeypatch)
    run = tmp_path / "run"
    s = train(_cfg(lensiam_shards, run, max_steps=4, ckpt_every=1, keep_last=0))
    with open(run / "metrics.csv", newline="") as f:
        rows = [{k: float(v) for k, v in r.items()} for r in csv.DictReader(f)]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    steady = rows[1:]  # the first row holds the warm-up step, which the summary leaves out too
    from_rows = len(steady) * 4 / sum(4 / r["pairs_per_s"] for r in steady)
    assert s["pairs_per_s"] == pytest.approx(from_rows, rel=0.03)
    assert s["images_per_s"] == pytest.approx(2 * s["pairs_per_s"])
    for r in steady:  # wait + compute account for the whole interval: no save hides in either
        assert r["data_wait_s"] + r["compute_s"] == pytest.approx(4 / r["pairs_per_s"], rel=0.03)


# ------------------------------------------------------------------------------ bench.gpu_check
@pytest.mark.slow
@pytest.mark.timeout(3600)  # ~15-20 min on the shared 2-core machine, past pytest.ini's 1200 s
def test_gpu_check_cpu_smoke(tmp_path):
    """The one-shot GPU check, tiny on the CPU with every package (DeepSpeed and webdataset here, so
    ZeRO-1, its resume and embed run too), so it cannot rot: every case ok, each figure in the
    results file (tests/ops/test_device_image.py runs it in the GPU machine's bare image)."""
    import csv

    out = tmp_path / "out"
    p = subprocess.run(
        [sys.executable, "-m", "bench.gpu_check", "--cpu-smoke", "--out", str(tmp_path / "w")]
        + ["--results", str(out), "--budget-s", "3000", "--case-timeout-s", "1200", "--wheels", str(tmp_path / "none")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=3600,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-5000:]
    with open(out / "gpu_check.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert rows and all(r["status"] == "ok" for r in rows), rows
    cases = {r["case"] for r in rows}
    assert cases == {
        "simulate_shards",
        "sweep_bf16_b4",
        "fp32",
        "online",
        "allreduce_gloo_2proc",
        "ddp_world1",
        "deepspeed_zero1",
        "resume_ddp",
        "resume_ddp_to_zero1",
        "embed",
        "profile",
    }
    got = {(r["case"], r["figure"]): float(r["value"]) for r in rows}
    assert got[("resume_ddp_to_zero1", "resumed_at_step")] == 7  # 4 steps, +3 resumed by DDP, then ZeRO-1
    assert got[("sweep_bf16_b4", "images_per_s")] > 0 and 0 <= got[("online", "data_wait_fraction")] < 1
    assert "gpu_check: done in" in p.stdout
