"""Micro benchmarks that bound what one GPU cannot run as a real multi-GPU job (bench.gpu_check).

    torchrun --standalone --nproc_per_node 2 -m bench.gpu_micro allreduce --json F   # 2 gloo ranks, CPU
    python -m bench.gpu_micro ddp1 --device cuda --json F      # NCCL world 1: all-reduce, DDP wrapper
    python -m bench.gpu_micro profile --device cuda --trace F  # 5 steps under torch.profiler

``allreduce``: seconds per all-reduce of the model's whole gradient (fp32, as DDP reduces it) between
2 gloo processes on the host: the cost of a host-staged reduction (an upper bound for NCCL over
NVLink/PCIe, which one GPU cannot show). ``ddp1``: on the device, one NCCL all-reduce of that
gradient at world size 1 (a copy: the fixed cost of the collective call, no link traffic) and the
training step with and without the DDP wrapper at world size 1 (its bucketing and hooks; the trainer
wraps only at world size > 1). SyncBatchNorm at world size 1 is plain BatchNorm (torch skips the
sync), so its cost is not measurable on one GPU. ``profile``: 5 training steps (after 3 warm-up
steps) of the trainer's model, precision and memory format under ``torch.profiler``, saved as a
Chrome trace (gzip) and a table of the top kernels.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

from hpc_lensiam.core.runtime import exit_torchrun_rank
from hpc_lensiam.models.methods.simsiam import SimSiam, simsiam_loss

from .common import parse_quick, print_ratio


def _model(arch: str, small: bool, device: torch.device) -> SimSiam:
    model = SimSiam(arch, 64, 16) if small else SimSiam(arch, 2048, 512)
    return model.to(device)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, reps: int, device: torch.device) -> float:
    fn()  # warm-up
    _sync(device)
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    _sync(device)
    return (time.perf_counter() - t) / reps


def _grad_numel(arch: str, small: bool) -> int:
    return sum(p.numel() for p in _model(arch, small, torch.device("cpu")).parameters())


def allreduce(a) -> dict:
    dist.init_process_group("gloo")
    n = _grad_numel(a.arch, a.small)
    x = torch.ones(n)
    s = _timed(lambda: dist.all_reduce(x), a.reps, torch.device("cpu"))
    out = {"world_size": dist.get_world_size(), "numel": n, "s_per_allreduce": s, "gb_per_s": 4 * n / s / 1e9}
    dist.destroy_process_group()
    return out if int(os.environ.get("RANK", "0")) == 0 else {}


def _step_fn(model, opt, x1, x2, dtype):
    def step():
        with torch.autocast(x1.device.type, dtype=dtype, enabled=dtype != torch.float32):
            loss = simsiam_loss(*model(x1, x2))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def _inputs(a, device):
    fmt = torch.channels_last if device.type == "cuda" else torch.contiguous_format
    g = torch.Generator(device=device).manual_seed(0)
    x1, x2 = (torch.rand(a.batch, 1, a.num_pix, a.num_pix, device=device, generator=g) for _ in range(2))
    return x1.contiguous(memory_format=fmt), x2.contiguous(memory_format=fmt), fmt


def ddp1(a) -> dict:
    device = torch.device(a.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    store_path = Path(a.json).with_suffix(".store") if a.json else Path(tempfile.mkdtemp()) / "ddp1.store"
    store = dist.FileStore(str(store_path), 1)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", store=store, rank=0, world_size=1)
    n = _grad_numel(a.arch, a.small)
    flat = torch.ones(n, device=device)
    out = {"backend": dist.get_backend(), "numel": n}
    out["s_per_allreduce_world1"] = _timed(lambda: dist.all_reduce(flat), a.reps, device)
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[a.precision]
    x1, x2, fmt = _inputs(a, device)
    for name in ("bare", "ddp"):
        torch.manual_seed(0)
        model = _model(a.arch, a.small, device).to(memory_format=fmt)
        if name == "ddp":
            ids = [device.index or 0] if device.type == "cuda" else None
            model = torch.nn.parallel.DistributedDataParallel(model, device_ids=ids, broadcast_buffers=False)
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        step = _step_fn(model, opt, x1, x2, dtype)
        if device.type == "cuda":
            _timed(step, 2, device)  # cudnn autotune
        out[f"s_per_step_{name}"] = _timed(step, a.reps, device)
    out["ddp_wrapper_overhead"] = out["s_per_step_ddp"] / out["s_per_step_bare"] - 1
    dist.destroy_process_group()
    store_path.unlink(missing_ok=True)
    return out


def profile(a) -> dict:
    from torch.profiler import ProfilerActivity, schedule

    device = torch.device(a.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[a.precision]
    x1, x2, fmt = _inputs(a, device)
    model = _model(a.arch, a.small, device).to(memory_format=fmt)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    step = _step_fn(model, opt, x1, x2, dtype)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    trace = Path(a.trace)
    raw = trace.with_suffix("")  # trace.json.gz -> trace.json
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    tables = []

    def ready(prof) -> None:  # called when the 5 active steps end
        prof.export_chrome_trace(str(raw))
        tables.append(prof.key_averages().table(sort_by=key, row_limit=15))

    with torch.profiler.profile(
        activities=acts, schedule=schedule(wait=0, warmup=a.warmup_steps, active=a.active_steps), on_trace_ready=ready
    ) as prof:
        for _ in range(a.warmup_steps + a.active_steps):
            step()
            _sync(device)
            prof.step()
    with open(raw, "rb") as f, gzip.open(trace, "wb") as g:
        shutil.copyfileobj(f, g)
    raw.unlink()
    trace.with_name(trace.name.replace(".json.gz", "_top.txt")).write_text(tables[0] if tables else "")
    return {"trace": str(trace), "trace_mb": trace.stat().st_size / 2**20, "steps": a.active_steps}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("what", nargs="?", choices=("allreduce", "ddp1", "profile"))
    p.add_argument("--device", default="cpu")
    p.add_argument("--arch", default="resnet101")
    p.add_argument("--small", action="store_true", help="small projector/predictor (the CPU smoke)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--num-pix", type=int, default=110)
    p.add_argument("--precision", default="bf16", choices=("bf16", "fp32"))
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--json", default=None)
    p.add_argument("--trace", default="trace.json.gz")
    p.add_argument("--warmup-steps", type=int, default=3, help="profile: steps before the traced window")
    p.add_argument("--active-steps", type=int, default=5, help="profile: the traced window")
    quick = dict(what="ddp1", arch="resnet18", small=True, batch=2, num_pix=64, reps=2, precision="fp32")
    a = parse_quick(p, argv, quick)  # --quick: the DDP-wrapper bound on this CPU, tiny
    if a.what is None:
        p.error("the measurement (allreduce, ddp1 or profile) is required, or --quick")
    out = {"allreduce": allreduce, "ddp1": ddp1, "profile": profile}[a.what](a)
    if out:
        print(f"gpu_micro {a.what}: " + json.dumps(out), flush=True)
        if a.json:
            Path(a.json).write_text(json.dumps(out, indent=2))
        if a.what == "ddp1":
            print_ratio(1.0 + out["ddp_wrapper_overhead"], "DDP-wrapped over bare step time, world 1")
    return 0


if __name__ == "__main__":
    rc = main()
    exit_torchrun_rank(rc)  # a torchrun rank (the allreduce case) skips the interpreter's finalization
    sys.exit(rc)
