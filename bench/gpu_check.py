"""One-shot check of the GPU path: run it once on a machine with a GPU before a cluster run.

    .venv/bin/python -m bench.gpu_check                 # one or more GPUs, < 8 min on one GPU
    .venv/bin/python -m bench.gpu_check --cpu-smoke     # the same script, tiny, on a CPU (tests/)

Every case is the real command line (``hpc-lensiam train``/``embed``/``export`` in a fresh process,
as a cluster job runs them) on shards it simulates itself:

1. ResNet101 (``--cpu-smoke``: resnet18) a few steps each: DDP in bf16 + channels_last, fp16
   (GradScaler) and fp32; DeepSpeed ZeRO-0 and ZeRO-1 in bf16 + channels_last; with 2+ GPUs the same
   bf16 DDP run on 2 processes (NCCL) with SyncBatchNorm and without (``--no-sync-batchnorm``);
2. resume across engines: a DDP checkpoint continued by DeepSpeed ZeRO-1, then by ZeRO-0 (weights
   only, said in one line), and a resume with the same engine;
3. embed and export of the result on the GPU;
4. the shard loader's pairs/s with ``--workers`` worker processes;
5. the on-the-fly renderer (``python -m bench.online --device cuda``): rendered pairs/s at batch 256-4096 at
   110 px and the training ratio online / shards.

Prints one table (images/s = 2 x pairs/s, peak device memory, data wait vs compute per step) and
exits 1 if any case failed (each failure is printed with the tail of its log).
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


# A launcher's rendezvous variables (torchrun, Slurm, or a one-process DeepSpeed group earlier in the
# calling process) must not reach the cases: each starts its own group, and an inherited MASTER_PORT
# is a port already bound by that other group (EADDRINUSE).
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


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in _LAUNCHER_VARS}
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("PYTHONWARNINGS", "ignore")
    return env


class Check:
    def __init__(self):
        self.rows: list[dict] = []
        self.failures: list[str] = []

    def run(self, name: str, cmd: list[str], expect: tuple[str, ...] = (), timeout: float = 600) -> str | None:
        """Run ``cmd``; a failure is recorded (not raised) so every case gets its turn."""
        t = time.perf_counter()
        try:
            p = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=timeout)
            out, rc = p.stdout + p.stderr, p.returncode
        except subprocess.TimeoutExpired as exc:
            out, rc = f"timed out after {timeout} s\n{exc.stdout or ''}{exc.stderr or ''}", -1
        dt = time.perf_counter() - t
        missing = [e for e in expect if e not in out]
        ok = rc == 0 and not missing
        print(f"gpu_check: {'ok  ' if ok else 'FAIL'} {name} ({dt:.0f} s)", flush=True)
        if not ok:
            tail = "\n    ".join(out.strip().splitlines()[-15:])
            self.failures.append(f"{name}: exit {rc}{'; missing ' + repr(missing) if missing else ''}\n    {tail}")
            return None
        return out


def _last_metrics(run: Path) -> dict:
    with open(run / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    return {k: float(v) for k, v in rows[-1].items()} if rows else {}


def _mean_metrics(run: Path) -> dict:
    with open(run / "metrics.csv", newline="") as f:
        rows = [{k: float(v) for k, v in r.items()} for r in csv.DictReader(f)][1:]  # skip the warm-up row
    return {k: sum(r[k] for r in rows) / len(rows) for k in ("data_wait_s", "compute_s")} if rows else {}


def simulate(out: Path, pairs: int, num_pix: int) -> None:
    from hpc_lensiam.simulate.writer import simulate_shards

    if not (out / "manifest.json").is_file():
        simulate_shards(
            out_dir=str(out),
            num_samples=pairs,
            shard_size=max(1, pairs // 8),
            mode="lensiam",
            seed=0,
            overrides={"instrument": {"num_pix": num_pix}},
            progress=False,
        )


def loader_pairs_per_s(data: str, batch: int, workers: int, pin: bool) -> float:
    from hpc_lensiam.data.loader import ShardLoader

    loader = ShardLoader(data, "lensiam", batch, 0, 1, workers, 0, 256, 1, False, pin_memory=pin)
    batches = loader.epoch(0)
    n, t = 0, None
    try:
        for i, b in enumerate(batches):
            if i == 0:
                t = time.perf_counter()  # after the workers started
                continue
            n += len(b["x1"])
    finally:
        batches.close()
    return n / (time.perf_counter() - t) if t and n else float("nan")


def main(argv=None) -> int:
    import torch

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--cpu-smoke", "--quick", action="store_true", help="tiny sizes on the CPU (the test suite runs this)"
    )
    ap.add_argument("--out", default=None, help="work folder (default: a temporary one, removed)")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--batch", type=int, default=None, help="per process")
    ap.add_argument("--workers", type=int, default=None)
    a = ap.parse_args(argv)
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if not gpus and not a.cpu_smoke:
        print("gpu_check: no CUDA device visible; run with --cpu-smoke for the CPU version", file=sys.stderr)
        return 2
    smoke = a.cpu_smoke
    arch = "resnet18" if smoke else "resnet101"
    steps = a.steps or (2 if smoke else 30)
    batch = a.batch or (4 if smoke else 64)
    workers = a.workers if a.workers is not None else (1 if smoke else 4)
    pairs, num_pix = (32, 48) if smoke else (2048, 110)
    tmp = None if a.out else tempfile.TemporaryDirectory(prefix="gpu_check-")
    work = Path(a.out or tmp.name)
    work.mkdir(parents=True, exist_ok=True)
    data = work / f"shards_{pairs}_{num_pix}"
    device = torch.cuda.get_device_name(0) if gpus else "cpu"
    print(
        f"gpu_check: {device} x {max(gpus, 1) if gpus else 0} GPU(s); torch {torch.__version__}; {arch}, "
        f"batch {batch}/process, {steps} steps per case; work folder {work}",
        flush=True,
    )
    simulate(data, pairs, num_pix)
    small = ["--proj-dim", "64", "--pred-dim", "16"] if smoke else []
    common = [
        "--data",
        str(data),
        "--arch",
        arch,
        "--batch-size",
        str(batch),
        "--epochs",
        "1000",
        "--warmup-epochs",
        "0",
        "--log-every",
        "1",
        "--workers",
        str(workers),
        "--ckpt-every",
        "1000000",
        *small,
    ]
    hl = [sys.executable, "-m", "hpc_lensiam"]
    chk = Check()

    def train_case(name, extra, nproc=1, steps_=steps, run=None, resume=False, expect=()):
        run = run or work / f"run_{name}"
        launcher = (
            [str(BIN / "torchrun"), "--standalone", "--nproc_per_node", str(nproc), "-m", "hpc_lensiam"]
            if nproc > 1
            else hl
        )
        out = chk.run(
            name,
            [
                *launcher,
                "train",
                *common,
                "--out",
                str(run),
                "--max-steps",
                str(steps_),
                *extra,
                *(["--resume"] if resume else []),
            ],
            expect=("train: done:", *expect),
        )
        if out is None:
            return None
        m = re.search(r"([\d.]+) pairs/s \(([\d.]+) images/s\)", out)
        last, mean = _last_metrics(run), _mean_metrics(run)
        chk.rows.append(
            {
                "case": name,
                "images_per_s": float(m.group(2)) if m else math.nan,
                "peak_mem_mb": last.get("peak_mem_mb", math.nan),
                **mean,
            }
        )
        return run

    # 1. engines x precisions (channels_last is the default; on a CPU the plan ignores it)
    bf16 = train_case("ddp_bf16_channels_last", ["--precision", "bf16", "--engine", "ddp"])
    train_case("ddp_fp16_gradscaler", ["--precision", "fp16", "--engine", "ddp"])
    train_case("ddp_fp32", ["--precision", "fp32", "--engine", "ddp", "--no-channels-last"])
    train_case("deepspeed_zero0_bf16", ["--precision", "bf16", "--engine", "deepspeed", "--zero-stage", "0"])
    train_case("deepspeed_zero1_bf16", ["--precision", "bf16", "--engine", "deepspeed", "--zero-stage", "1"])
    if gpus >= 2 or smoke:  # on a CPU: 2 gloo processes with the CPU SyncBatchNorm
        train_case("ddp_bf16_2proc_syncbn", ["--precision", "bf16"], nproc=2)
    if gpus >= 2:  # what SyncBatchNorm costs: the same run with per-rank BatchNorm
        train_case("ddp_bf16_2proc_no_syncbn", ["--precision", "bf16", "--no-sync-batchnorm"], nproc=2)

    # 2. resume across engines and ZeRO stages (a fresh DDP run, then continued)
    run = train_case("resume_0_ddp", ["--precision", "bf16"], steps_=steps)
    if run is not None:
        train_case(
            "resume_1_ddp_to_zero1",
            ["--precision", "bf16", "--engine", "deepspeed", "--zero-stage", "1"],
            steps_=steps + 1,
            run=run,
            resume=True,
            expect=("weights only", f"resuming at step {steps}"),
        )
        train_case(
            "resume_2_zero1_to_zero0",
            ["--precision", "bf16", "--engine", "deepspeed", "--zero-stage", "0"],
            steps_=steps + 2,
            run=run,
            resume=True,
            expect=("--zero-stage 1, this run is --zero-stage 0",),
        )
        train_case(
            "resume_3_zero0_same",
            ["--precision", "bf16", "--engine", "deepspeed", "--zero-stage", "0"],
            steps_=steps + 3,
            run=run,
            resume=True,
            expect=(f"resuming at step {steps + 2}",),
        )

    # 3. embed + export on the device
    if bf16 is not None:
        emb = work / "emb.h5"
        chk.run(
            "embed",
            [
                *hl,
                "embed",
                "--checkpoint",
                str(bf16),
                "--data",
                str(data),
                "--out",
                str(emb),
                "--batch-size",
                str(batch * 2),
                "--workers",
                "0",
            ],
            expect=("images/s",),
        )
        chk.run("export", [*hl, "export", "--checkpoint", str(bf16), "--out", str(work / "backbone.pt")])

    # 4. the loader alone
    loader = {w: loader_pairs_per_s(str(data), batch, w, pin=bool(gpus)) for w in sorted({0, workers})}

    # 5. on-the-fly lens augmentation (bench.online): rendered pairs/s at batch 256-4096 at 110 px
    # and the training ratio online / shards, on the device the trainer uses (docs/online.md)
    online_json = work / "online.json"
    online = (
        [
            "--device",
            "cpu",
            "--batch",
            "2",
            "--num-pix",
            "32",
            "--numpy-pairs",
            "2",
            "--rounds",
            "1",
            "--accuracy-systems",
            "1",
            "--train-steps",
            "0",
        ]
        if smoke
        else [
            "--device",
            "cuda",
            "--batch",
            "256",
            "1024",
            "4096",
            "--num-pix",
            "110",
            "--numpy-pairs",
            "16",
            "--accuracy-systems",
            "4",
            "--arch",
            arch,
            "--train-batch",
            str(batch),
            "--train-steps",
            "20",
            "--precision",
            "bf16",
            "--workers",
            str(workers),
        ]
    )
    online_line = chk.run(
        "online",
        [sys.executable, "-m", "bench.online", *online, "--json", str(online_json)],
        expect=("online bench:",),
        timeout=900,
    )

    # the table
    print(f"\n{'case':32s} {'images/s':>10s} {'peak MB':>9s} {'wait s/step':>12s} {'compute s/step':>15s}")
    for r in chk.rows:
        print(
            f"{r['case']:32s} {r['images_per_s']:10.1f} {r['peak_mem_mb']:9.0f} "
            f"{r.get('data_wait_s', math.nan):12.4f}"
            f" {r.get('compute_s', math.nan):15.4f}"
        )
    by = {r["case"]: r["images_per_s"] for r in chk.rows}
    if by.get("ddp_bf16_channels_last") and by.get("ddp_fp32"):
        print(
            f"\n{arch} images/s bf16 + channels_last / fp32: {by['ddp_bf16_channels_last']:.1f} / "
            f"{by['ddp_fp32']:.1f} = {by['ddp_bf16_channels_last'] / by['ddp_fp32']:.2f}x"
        )
    if by.get("ddp_bf16_2proc_syncbn") and by.get("ddp_bf16_2proc_no_syncbn"):
        sync, per_rank = by["ddp_bf16_2proc_syncbn"], by["ddp_bf16_2proc_no_syncbn"]
        print(
            f"2 processes, images/s with SyncBatchNorm / without: {sync:.1f} / {per_rank:.1f} = {sync / per_rank:.2f}x"
        )
    for w, pps in loader.items():
        print(f"loader pairs/s, {w} worker process(es): {pps:.0f}")
    if online_line:
        print(next(line for line in online_line.splitlines() if line.startswith("online bench:")))
    if chk.failures:
        print(f"\ngpu_check: {len(chk.failures)} failure(s):", file=sys.stderr)
        for f in chk.failures:
            print("  " + f, file=sys.stderr)
        return 1
    print(f"\ngpu_check: all {len(chk.rows) + (2 if bf16 is not None else 0)} cases passed", flush=True)
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
