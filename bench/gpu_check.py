"""One-shot check of the GPU path, written for a bare, brief GPU machine: the first run must give the numbers.

    python3 -m bench.gpu_check                   # a GPU machine: < 8 min (--budget-s), rows in $OUT/gpu_check.csv
    python3 -m bench.gpu_check --cpu-smoke       # the same cases, tiny, on a CPU (tests/ops/test_device_image.py)

It needs only what the device image has (torch, torchvision, numpy, scipy, h5py, timm, tensorboard,
pyyaml, ...): the shards are rendered by the torch renderer, training reads them without webdataset,
and the cases that need a package the image lacks (DeepSpeed; webdataset for embed) run when the
carried wheels (``make gpu-wheels`` -> ``.whl/``) are there, installed with ``pip install --no-index
--no-deps --target``, and are reported as ``skip`` otherwise. Every case is the real command line in a
fresh process, under a per-case timeout (``--case-timeout-s``) and a total budget (``--budget-s``);
each figure is appended to the results file the moment its case ends, so a run cut short keeps what
it measured. Cases, most valuable first:

1. ``sweep_bf16_bN``: ResNet101 bf16 + channels_last (DDP engine, world size 1), batch N per step;
   images/s from the steady ``metrics.csv`` rows (no start-up, no checkpoint save), the
   compute-only rate 2N / compute_s, the data-wait share of a shard-fed step, peak memory;
2. ``fp32``: the same at the sweep's best batch in fp32 (TF32, contiguous): the bf16 / fp32 ratio;
3. ``online``: ``python -m bench.online`` on the device: the torch renderer's pairs/s at batch 256-4096 and
   the training pairs/s online / shards (steady rows, same model and batch);
4. ``collectives``: ``python -m bench.gpu_micro``: the whole gradient all-reduced by 2 gloo processes (host),
   one NCCL all-reduce at world size 1 and the DDP wrapper's cost at world size 1;
5. ``deepspeed_zero1``, ``resume`` (DDP -> DDP, and DDP -> ZeRO-1 with DeepSpeed), ``embed``;
6. ``profile``: 5 training steps under torch.profiler, saved as a Chrome trace beside the results.

What one GPU cannot show: NCCL traffic between GPUs, SyncBatchNorm's cost (at world size 1 torch
skips its sync), the DDP overlap of communication with the backward pass; docs/gpu.md says how the
figures above bound them.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
GOALS = {  # figure -> (comparison, goal): docs/gpu.md says where each comes from
    "images_per_s": (">=", 15000.0),
    "pairs_per_s_b4096": (">=", 100000.0),
    "ratio_online_over_shards": (">=", 0.9),
    "data_wait_fraction": ("<", 0.02),
}
FIELDS = ["case", "status", "seconds", "figure", "value", "unit", "goal", "note"]

# A launcher's rendezvous variables must not reach the cases: each starts its own group.
_LAUNCHER_VARS = (
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "LOCAL_WORLD_SIZE",
    "MASTER_ADDR",
    "MASTER_PORT",
    "GROUP_RANK",
    "ROLE_RANK",
    "ROLE_WORLD_SIZE",
    "TORCHELASTIC_RUN_ID",
)


def has_module(name: str, extra_path: str | None) -> bool:
    code = f"import importlib.util, sys; sys.exit(importlib.util.find_spec({name!r}) is None)"
    return subprocess.run([sys.executable, "-c", code], env=case_env(extra_path)).returncode == 0


def case_env(extra_path: str | None) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in _LAUNCHER_VARS}
    paths = [str(REPO), *([extra_path] if extra_path else []), *([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])]
    env["PYTHONPATH"] = os.pathsep.join(paths)
    env.setdefault("PYTHONWARNINGS", "ignore")
    return env


def install_wheels(wheels: Path, target: Path) -> str | None:
    """The carried wheels (``make gpu-wheels``) into ``target``, offline; its path, or None without wheels."""
    found = sorted(wheels.glob("*.whl")) if wheels.is_dir() else []
    if not found:
        return None
    if not (target / ".done").is_file():
        cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--target", str(target)]
        if has_module("pip", None):
            subprocess.run([*cmd, *map(str, found)], check=True)
        else:  # an image without pip: a wheel is a zip of its files as installed (no scripts are needed)
            import zipfile

            for w in found:
                zipfile.ZipFile(w).extractall(target)
        (target / ".done").touch()
    print(f"gpu_check: {len(found)} carried wheel(s) from {wheels} installed into {target}", flush=True)
    return str(target)


class Results:
    """Figures appended to a CSV (and printed) as each case ends; the run's budget and failures."""

    def __init__(self, path: Path, budget_s: float, case_timeout_s: float, extra_path: str | None):
        self.path, self.budget_s, self.case_timeout_s, self.extra = path, budget_s, case_timeout_s, extra_path
        self.t0 = time.perf_counter()
        self.failed: list[str] = []
        self.values: dict[str, float] = {}
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w", newline="") as f:
            csv.writer(f).writerow(FIELDS)

    def left(self) -> float:
        return self.budget_s - (time.perf_counter() - self.t0)

    def row(self, case, status, seconds, figure="", value=math.nan, unit="", note="") -> None:
        goal = GOALS.get("pairs_per_s_b4096" if figure.startswith("pairs_per_s_b") else figure)
        if figure == "images_per_s" and not case.startswith("sweep"):
            goal = None  # the goal is bf16's: fp32, ZeRO-1 and resumed runs are for comparison
        goal_s = f"{goal[0]} {goal[1]:g}" if goal and not (isinstance(value, float) and math.isnan(value)) else ""
        with open(self.path, "a", newline="") as f:
            csv.writer(f).writerow([case, status, f"{seconds:.1f}", figure, f"{value:.6g}", unit, goal_s, note])
        if figure:
            self.values[f"{case}.{figure}"] = value
        print(
            f"gpu_check: {case:22s} {status:8s} {seconds:6.1f} s  {figure:28s} {value:12.4g} {unit:8s} "
            f"{goal_s:9s} {note}",
            flush=True,
        )

    def run(self, case: str, cmd: list[str], expect: str = "", timeout: float | None = None) -> str | None:
        """``cmd`` in a fresh process within the case timeout and what is left of the budget; its output, or None."""
        limit = min(timeout or self.case_timeout_s, self.left())
        if limit < 10:
            self.row(case, "no-time", 0.0, note=f"budget of {self.budget_s:.0f} s spent")
            return None
        t = time.perf_counter()
        try:
            p = subprocess.run(cmd, cwd=REPO, env=case_env(self.extra), capture_output=True, text=True, timeout=limit)
            out, rc = p.stdout + p.stderr, p.returncode
        except subprocess.TimeoutExpired as exc:
            out = (exc.stdout or b"").decode() if isinstance(exc.stdout, bytes) else exc.stdout or ""
            out, rc = f"{out}\ntimed out after {limit:.0f} s", -1
        dt = time.perf_counter() - t
        if rc != 0 or (expect and expect not in out):
            tail = " | ".join(out.strip().splitlines()[-6:])
            self.row(case, "timeout" if rc == -1 else "FAIL", dt, note=f"exit {rc}: {tail}"[:600])
            self.failed.append(case)
            print(out[-3000:], file=sys.stderr, flush=True)
            return None
        self.case_seconds = dt
        return out


def steady(metrics_csv: Path, skip: int, pairs_per_step: int) -> dict:
    """The steady rows of a ``--log-every 1`` run (bench.online's rule, the same numbers)."""
    from .online import steady_rows

    return steady_rows(metrics_csv, skip, pairs_per_step)


def main(argv=None) -> int:
    import torch

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--cpu-smoke", "--quick", action="store_true", help="tiny sizes on the CPU (tests/ops/test_device_image.py)"
    )
    ap.add_argument("--out", default=None, help="work folder (shards, runs; default: a temporary one, removed)")
    ap.add_argument("--results", default=None, help="results folder (default: $OUT, else ./gpu_check_results)")
    ap.add_argument("--budget-s", type=float, default=480.0, help="total time; later cases are skipped past it")
    ap.add_argument("--case-timeout-s", type=float, default=120.0)
    ap.add_argument("--wheels", default=str(REPO / ".whl"), help="carried wheels (make gpu-wheels)")
    ap.add_argument("--batches", type=int, nargs="+", default=None, help="sweep batch sizes (default 64 128 256)")
    ap.add_argument("--steps", type=int, default=None, help="steps per training case (default 30)")
    ap.add_argument("--workers", type=int, default=None, help="loader workers (default 6)")
    a = ap.parse_args(argv)
    gpu = torch.cuda.is_available()
    if not gpu and not a.cpu_smoke:
        print(
            "hpc-lensiam: error: gpu_check: no CUDA device visible; --cpu-smoke runs the CPU version", file=sys.stderr
        )
        return 2
    smoke = a.cpu_smoke
    dev = "cpu" if smoke else "cuda"
    arch = "resnet18" if smoke else "resnet101"
    batches = a.batches or ([4] if smoke else [64, 128, 256])
    steps = a.steps or (4 if smoke else 30)
    skip = 1 if smoke else 10  # start-up rows: the warm-up step, cudnn.benchmark's autotuning
    workers = a.workers if a.workers is not None else (1 if smoke else 6)
    num_pix, pairs = (32, 24) if smoke else (110, 8192)  # 8192: 30 steps of 256 within one epoch
    results_dir = Path(a.results or os.environ.get("OUT") or REPO / "gpu_check_results")
    tmp = None if a.out else tempfile.TemporaryDirectory(prefix="gpu_check-")
    work = Path(a.out or tmp.name)
    work.mkdir(parents=True, exist_ok=True)
    extra = install_wheels(Path(a.wheels), work / "site")
    res = Results(results_dir / "gpu_check.csv", a.budget_s, a.case_timeout_s, extra)
    name = torch.cuda.get_device_name(0) if gpu else "cpu"
    print(
        f"gpu_check: {name}; torch {torch.__version__}; Python {sys.version.split()[0]}; {arch}; sweep batches "
        f"{batches}, {steps} steps per case; budget {a.budget_s:.0f} s; results {res.path}; work {work}",
        flush=True,
    )
    hl = [sys.executable, "-m", "hpc_lensiam"]
    small = ["--proj-dim", "64", "--pred-dim", "16"] if smoke else []

    # shards by the torch renderer on the device (no lenstronomy), 2 per loader worker at least
    data = work / f"shards_{pairs}_{num_pix}"
    if not (data / "manifest.json").is_file():
        cfg = work / "sim.yaml"
        cfg.write_text(f"instrument:\n  num_pix: {num_pix}\n")
        sim = [*hl, "simulate", "--out", str(data), "--pairs", str(pairs), "--physics", str(cfg)]
        sim += ["--shard-size", str(max(1, pairs // 16)), "--renderer", "torch", "--device", dev, "--seed", "0"]
        if res.run("simulate_shards", sim, expect="simulate: wrote") is None:
            return 1
        res.row("simulate_shards", "ok", res.case_seconds, "pairs", pairs, "pairs", f"{num_pix} px, torch renderer")

    def train_case(case, batch, extra_args, run=None, resume=False, max_steps=steps, timeout=None) -> Path | None:
        run = run or work / f"run_{case}"
        cmd = [*hl, "train", "--data", str(data), "--out", str(run), "--arch", arch, "--batch-size", str(batch)]
        cmd += ["--epochs", "1000", "--warmup-epochs", "0", "--log-every", "1", "--ckpt-every", "1000000"]
        cmd += ["--max-steps", str(max_steps), "--workers", str(workers), *small, *extra_args]
        before = 0  # a resumed run appends to metrics.csv: its own rows follow the earlier run's
        if resume and (run / "metrics.csv").is_file():
            before = len((run / "metrics.csv").read_text().splitlines()) - 1
        if res.run(case, [*cmd, *(["--resume"] if resume else [])], expect="train: done:", timeout=timeout) is None:
            return None
        s = steady(run / "metrics.csv", before + (1 if resume else skip), batch)
        dt = res.case_seconds
        res.row(case, "ok", dt, "images_per_s", 2 * s["pairs_per_s"], "img/s", f"steady rows: {s['rows']}")
        res.row(case, "ok", dt, "images_per_s_compute", 2 * batch / s["compute_s"], "img/s", "2 x batch / compute_s")
        res.row(case, "ok", dt, "data_wait_fraction", s["data_wait_fraction"], "", f"{workers} loader workers")
        with open(run / "metrics.csv", newline="") as f:
            peak = max(float(r["peak_mem_mb"]) for r in csv.DictReader(f))
        res.row(case, "ok", dt, "peak_mem_mb", peak, "MB")
        return run

    # 1. the bf16 + channels_last batch sweep
    runs = {b: train_case(f"sweep_bf16_b{b}", b, ["--precision", "bf16", "--engine", "ddp"]) for b in batches}
    rate = {b: res.values.get(f"sweep_bf16_b{b}.images_per_s", math.nan) for b in batches}
    best = max((b for b in batches if math.isfinite(rate[b])), key=lambda b: rate[b], default=batches[0])
    # 2. fp32 at the best batch
    if train_case("fp32", best, ["--precision", "fp32", "--engine", "ddp", "--no-channels-last"]):
        ratio = rate[best] / res.values["fp32.images_per_s"]
        res.row("fp32", "ok", 0.0, "ratio_bf16_over_fp32", ratio, "x", f"batch {best}")

    # 3. the torch renderer and training online / shards (bench.online)
    online_json = results_dir / "online.json"
    args = ["--device", dev, "--numpy-pairs", "0", "--accuracy-systems", "0", "--arch", arch]
    args += ["--precision", "fp32" if smoke else "bf16"]  # CPU bf16 is emulated: slow, and beside the point
    args += ["--workers", str(workers), "--json", str(online_json), "--num-pix", str(num_pix)]
    args += (
        ["--batch", "2", "8", "--rounds", "1", "--train-batch", "4", "--train-steps", "3", "--skip-rows", "1"]
        if smoke
        else ["--batch", "256", "1024", "4096", "--train-batch", str(best), "--train-steps", "25", "--skip-rows", "8"]
    )
    online_cmd = [sys.executable, "-m", "bench.online", *args]
    if res.run("online", online_cmd, "online bench:", max(240.0, a.case_timeout_s)):
        o = json.loads(online_json.read_text())
        for k, v in o["render"]["pairs_per_s"].items():
            if k.startswith("torch_b"):
                res.row("online", "ok", res.case_seconds, f"pairs_per_s_b{k[7:]}", v, "pairs/s", "torch renderer")
        t = o["train_pairs_per_s"]
        res.row("online", "ok", res.case_seconds, "ratio_online_over_shards", t["ratio_online_over_shards"], "x")
        res.row("online", "ok", res.case_seconds, "data_wait_fraction", t["shards_data_wait_fraction"], "", "shards")

    # 4. what one GPU can say about collectives and the DDP wrapper (bench.gpu_micro)
    micro = ["-m", "bench.gpu_micro"]  # torchrun and python both take -m MODULE
    # the CPU smoke in fp32: bf16 convolutions are emulated on most CPUs, ~100x slower (the trainer's
    # cases above keep bf16: that path is what they check)
    sz = ["--arch", arch]
    sz += ["--small", "--batch", "2", "--num-pix", str(num_pix), "--reps", "1", "--precision", "fp32"] if smoke else []
    ar = results_dir / "allreduce_gloo2.json"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    if res.run("allreduce_gloo_2proc", [*torchrun, *micro, "allreduce", *sz, "--json", str(ar)], "gpu_micro"):
        v = json.loads(ar.read_text())
        res.row("allreduce_gloo_2proc", "ok", res.case_seconds, "s_per_allreduce", v["s_per_allreduce"], "s")
    d1 = results_dir / "ddp_world1.json"
    if not smoke:
        sz += ["--batch", str(best)]
    if res.run("ddp_world1", [sys.executable, *micro, "ddp1", "--device", dev, *sz, "--json", str(d1)], "gpu_micro"):
        v = json.loads(d1.read_text())
        for k in ("s_per_allreduce_world1", "s_per_step_bare", "s_per_step_ddp", "ddp_wrapper_overhead"):
            res.row("ddp_world1", "ok", res.case_seconds, k, v[k], "" if "overhead" in k else "s", v["backend"])

    # 5. DeepSpeed ZeRO-1, resume, embed
    have_ds = has_module("deepspeed", extra)
    if have_ds:
        train_case("deepspeed_zero1", best, ["--precision", "bf16", "--engine", "deepspeed", "--zero-stage", "1"])
    else:
        res.row("deepspeed_zero1", "skip", 0.0, note="deepspeed not importable: make gpu-wheels carries it in .whl/")
    base = runs.get(best)
    if base is not None:
        if train_case("resume_ddp", best, ["--precision", "bf16"], run=base, resume=True, max_steps=steps + 3):
            res.row("resume_ddp", "ok", res.case_seconds, "resumed_at_step", steps, "step")
        if have_ds:
            zero = ["--precision", "bf16", "--engine", "deepspeed", "--zero-stage", "1"]
            if train_case("resume_ddp_to_zero1", best, zero, run=base, resume=True, max_steps=steps + 6):
                res.row("resume_ddp_to_zero1", "ok", res.case_seconds, "resumed_at_step", steps + 3, "step")
        if has_module("webdataset", extra):
            emb = work / "emb.h5"
            cmd = [*hl, "embed", "--checkpoint", str(base / "checkpoints" / "last.pt"), "--data", str(data)]
            out = res.run("embed", [*cmd, "--out", str(emb), "--batch-size", str(2 * best), "--workers", str(workers)])
            if out is not None:
                res.row("embed", "ok", res.case_seconds, "wrote", emb.stat().st_size / 2**20, "MB", str(emb.name))
        else:
            res.row("embed", "skip", 0.0, note="webdataset not importable: make gpu-wheels carries it in .whl/")

    # 6. a 5-step profiler window as a Chrome trace
    trace = results_dir / "profile_trace.json.gz"
    prof = [sys.executable, *micro, "profile", "--device", dev, *sz, "--trace", str(trace)]
    prof += ["--warmup-steps", "1", "--active-steps", "2"] if smoke else []
    if res.run("profile", prof, "gpu_micro"):
        res.row("profile", "ok", res.case_seconds, "trace_mb", trace.stat().st_size / 2**20, "MB", trace.name)

    total = time.perf_counter() - res.t0
    print(
        f"gpu_check: done in {total:.0f} s: {len(res.failed)} failed case(s) {res.failed or ''}; results {res.path}",
        flush=True,
    )
    if tmp is not None:
        shutil.rmtree(work / "site", ignore_errors=True)
        tmp.cleanup()
    return 1 if res.failed else 0


if __name__ == "__main__":
    sys.exit(main())
