"""The training loop, shared by every engine: schedule, pairs, logging, checkpoints, resume, signals.

One ``step`` is one optimizer step (``grad_accum`` micro-batches). The lr schedule is a pure
function of the step (linear warm-up, then cosine to zero, per step; the predictor keeps the
initial lr), the data order a pure function of (seed, epoch, batch index) and the SimSiam
augmentations are seeded by (seed, rank, step): so a run resumed from ``last.pt`` continues the
same step counter, lr and batches as an uninterrupted run.

SIGTERM / SIGUSR1 (Slurm's warning signal, or torchrun forwarding a ``scancel``) make every rank
stop at the next step boundary, save ``last.pt`` and exit cleanly; ``--resume`` continues.
"""
from __future__ import annotations

import csv
import math
import random
import shutil
import signal
import sys
import time
from pathlib import Path

import torch

from ..config import TrainConfig, dump_yaml, from_dict, merge, read_yaml, to_dict
from ..errors import UserError
from ..io import atomic_path, atomic_write_text
from ..models.simsiam import SimSiam, simsiam_loss, z_std
from .checkpoint import LAST, load_checkpoint

METRICS = ("step", "epoch", "loss", "lr", "z_std", "images_per_s")


def train_config(config_path: str | None = None, **overrides) -> TrainConfig:
    """TrainConfig from defaults <- YAML file <- keyword overrides (the CLI flags; None = unset)."""
    cfg = TrainConfig()
    if config_path:
        cfg = from_dict(TrainConfig, read_yaml(config_path), str(config_path))
    overrides = {k: v for k, v in overrides.items() if v is not None}
    return merge(cfg, overrides, "flags") if overrides else cfg


def scaled_lr(cfg: TrainConfig, world_size: int) -> float:
    """lr = base_lr x global_batch / 256, global = per-rank batch x world size x grad accumulation."""
    return cfg.base_lr * cfg.batch_size * world_size * cfg.grad_accum / 256


def lr_at(step: int, lr: float, warmup_steps: int, total_steps: int) -> float:
    """Linear warm-up over ``warmup_steps``, then half-cosine to 0 at ``total_steps`` (per step)."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


class _StopSignal:
    """Remember SIGTERM/SIGUSR1; the loop stops at the next step boundary."""

    def __init__(self):
        self.signum = 0
        self.previous = {}
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            self.previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.signum = signum

    def restore(self):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def train(cfg: TrainConfig, resume: bool = False) -> dict:
    """Pretrain SimSiam on ``cfg.data`` into ``cfg.out``; return a summary dict (rank 0's view)."""
    from ..data.loader import ShardError
    from .engine import Engine

    out = Path(cfg.out)
    ckpt_dir = out / "checkpoints"
    last = ckpt_dir / LAST
    if last.is_file() and not resume:
        raise UserError(f"{last} exists: pass --resume to continue that run, or choose another --out")
    engine = Engine(cfg)
    if resume and not last.is_file() and engine.is_main:
        print(f"train: --resume: no checkpoint at {last} yet, starting from step 0", flush=True)
    stop = _StopSignal()
    try:
        return _train(cfg, engine, out, ckpt_dir, resume and last.is_file(), stop)
    except ShardError as exc:   # one rank's shard: say it from that rank (the CLI prints rank 0 only)
        if not engine.is_main:
            print(f"hpc-lensiam: error (rank {engine.rank}): {exc}", file=sys.stderr, flush=True)
        raise
    finally:
        stop.restore()
        engine.close()


def _train(cfg, engine, out: Path, ckpt_dir: Path, resume: bool, stop: _StopSignal) -> dict:
    from ..data.augment import make_pair
    from ..data.loader import ShardLoader

    main = engine.is_main
    say = (lambda *a: print(*a, flush=True)) if main else (lambda *a: None)
    from ..data.online import OnlineLoader, is_online
    if is_online(cfg.data):   # rendered on this rank's device before each step (docs/online.md)
        loader = OnlineLoader.from_train_config(cfg, engine.rank, engine.world_size, engine.device)
    else:
        loader = ShardLoader(cfg.data, cfg.mode, cfg.batch_size, engine.rank, engine.world_size, cfg.workers,
                             cfg.seed, cfg.shuffle_buffer, cfg.grad_accum, cfg.skip_bad_samples,
                             pin_memory=engine.cuda)
    spe = loader.batches_per_epoch // cfg.grad_accum             # optimizer steps per epoch
    total = cfg.epochs * spe
    end = min(total, cfg.max_steps) if cfg.max_steps else total
    warmup = min(total, round(cfg.warmup_epochs * spe))
    global_batch = cfg.batch_size * engine.world_size * cfg.grad_accum
    lr0 = scaled_lr(cfg, engine.world_size)

    torch.manual_seed(cfg.seed)
    model = SimSiam(cfg.arch, cfg.proj_dim, cfg.pred_dim, cfg.zero_init_residual)
    groups = [{"params": list(model.encoder.parameters()), "lr": lr0, "fix_lr": False},
              {"params": list(model.predictor.parameters()), "lr": lr0, "fix_lr": cfg.fix_pred_lr}]
    engine.wrap(model, groups)

    step = 0
    if resume:
        ckpt = load_checkpoint(ckpt_dir / LAST)
        try:
            engine.load(ckpt, ckpt_dir)
        except (RuntimeError, KeyError, ValueError) as exc:   # another arch/width, a foreign file
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise UserError(f"{ckpt_dir / LAST}: cannot resume this run with --arch {cfg.arch} "
                            f"--proj-dim {cfg.proj_dim} --pred-dim {cfg.pred_dim} "
                            f"(checkpoint arch {ckpt.get('arch')!r}): {first}") from None
        step = int(ckpt["step"])
        rng = ckpt.get("rng") or {}
        if "torch" in rng:
            torch.set_rng_state(rng["torch"])
        if rng.get("cuda") and engine.cuda:
            torch.cuda.set_rng_state_all(rng["cuda"])
        if "python" in rng:
            random.setstate(rng["python"])
        if ckpt.get("scheduler", {}).get("steps_per_epoch", spe) != spe and main:
            print(f"warning: {ckpt_dir / LAST} was trained with {ckpt['scheduler']['steps_per_epoch']} "
                  f"steps/epoch, now {spe}: the lr schedule changes", file=sys.stderr)

    backend = engine.backend if engine.world_size > 1 or cfg.engine == "deepspeed" else "single process"
    say(f"train: {cfg.mode} | {cfg.arch} | engine {cfg.engine} | {engine.world_size} rank(s) on "
        f"{engine.device.type} ({backend})"
        f"{' + SyncBatchNorm' if engine.world_size > 1 else ''} | {cfg.precision}")
    say(f"train: global batch {cfg.batch_size} x {engine.world_size} rank(s) x {cfg.grad_accum} accum = "
        f"{global_batch}; lr = {cfg.base_lr} x {global_batch}/256 = {lr0:.6g} (predictor "
        f"{'fixed' if cfg.fix_pred_lr else 'scheduled'}); {spe} steps/epoch x {cfg.epochs} epochs = "
        f"{total} steps, warm-up {warmup}; {'resuming at step ' + str(step) if resume else 'from step 0'}"
        f"{f', stopping at {end}' if end < total else ''}")

    if main:
        out.mkdir(parents=True, exist_ok=True)
        header = (f"# resolved: world_size={engine.world_size} global_batch={global_batch} lr={lr0:.6g} "
                  f"steps_per_epoch={spe} total_steps={total} warmup_steps={warmup}\n")
        atomic_write_text(out / "config.yaml", header + dump_yaml(cfg))
        _reset_metrics(out / "metrics.csv", step if resume else 0)

    def state(step):
        return {"format": "hpc_lensiam.checkpoint/1", "config": to_dict(cfg), "step": step,
                "epoch": step // spe, "arch": cfg.arch, "world_size": engine.world_size,
                "scheduler": {"name": "warmup_cosine", "step": step, "lr": lr0, "warmup_steps": warmup,
                              "total_steps": total, "steps_per_epoch": spe},
                "rng": {"torch": torch.get_rng_state(), "python": random.getstate(),
                        "cuda": torch.cuda.get_rng_state_all() if engine.cuda else []}}

    saved_step = step if resume else None
    bar = None
    if main:
        from tqdm import tqdm
        bar = tqdm(total=end, initial=step, desc="train", unit="step", dynamic_ncols=True,
                   file=sys.stderr, disable=None)
    first_step, t_start = step, None
    t_log, n_log = time.perf_counter(), 0
    loss_v = std_v = float("nan")
    ips = 0.0
    skipped = 0
    stopped_by = 0
    cuda_fmt = torch.channels_last if engine.cuda and cfg.channels_last else torch.contiguous_format

    def to_device(t):
        return t.to(engine.device, non_blocking=True, memory_format=cuda_fmt)

    t_loop = time.perf_counter()
    while step < end and not stopped_by:
        epoch = step // spe
        batches = loader.epoch(epoch, start=(step % spe) * cfg.grad_accum)
        acc = torch.zeros(4, device=engine.device)   # loss, z_std, skipped samples, stop flag
        try:
            for i, batch in enumerate(batches):
                micro = i % cfg.grad_accum
                if micro == 0:
                    lr = lr_at(step, lr0, warmup, total)
                    for g in engine.param_groups:
                        g["lr"] = lr0 if g.get("fix_lr") else lr
                    acc.zero_()
                if cfg.mode == "lensiam":
                    x1, x2 = to_device(batch["x1"]), to_device(batch["x2"])
                else:   # two batched augmentations on the device, seeded by (seed, rank, step)
                    g = torch.Generator(device=engine.device)
                    g.manual_seed(_seed(cfg.seed, engine.rank, step, micro))
                    x1, x2 = make_pair(to_device(batch["x"]), g)
                p1, p2, z1, z2 = engine.forward(x1, x2)
                loss = simsiam_loss(p1, p2, z1, z2)
                engine.backward(loss)
                acc[:2] += torch.stack([loss.detach().float(), z_std(z1)]) / cfg.grad_accum
                acc[2] += int(batch["bad"])
                if not engine.step():
                    continue
                step += 1
                acc[3] = float(stop.signum > 0)
                red = engine.all_reduce_sum(acc).cpu()      # one small collective and one sync per step
                loss_v, std_v = (red[:2] / engine.world_size).tolist()
                skipped += int(red[2])
                if not math.isfinite(loss_v):
                    kept = (f"last good checkpoint {ckpt_dir / LAST} (step {saved_step}) kept"
                            if saved_step is not None else "no checkpoint was written yet")
                    hint = ("use --precision bf16 or fp32" if cfg.precision == "fp16" else
                            "lower --base-lr, or check the shards for NaN/inf pixels")
                    raise UserError(f"loss is {loss_v} at step {step} (lr {lr:.4g}): training diverged and "
                                    f"stopped; {kept}. Try: {hint}")
                now = time.perf_counter()
                if t_start is None:   # the mean throughput excludes the first (warm-up) step
                    ips = global_batch / (now - t_loop)
                    t_start = t_log = now
                else:
                    n_log += 1
                if step % cfg.log_every == 0 or step == end:
                    if n_log and now > t_log:
                        ips = n_log * global_batch / (now - t_log)
                    t_log, n_log = now, 0
                    if main:
                        _append_metrics(out / "metrics.csv", [step, step / spe, loss_v, lr, std_v, ips])
                        bar.set_postfix(loss=f"{loss_v:.4f}", z_std=f"{std_v:.4f}", lr=f"{lr:.3g}")
                        if bar.disable:   # no terminal (a batch job's log): a plain line instead
                            print(f"step {step}/{end} epoch {step / spe:.2f} loss {loss_v:.4f} z_std {std_v:.4f} "
                                  f"lr {lr:.4g} {ips:.1f} images/s", flush=True)
                if bar is not None:
                    bar.update(1)
                if red[3] > 0:
                    stopped_by = stop.signum or signal.SIGTERM
                periodic = step % cfg.ckpt_every == 0
                if periodic or step == end or stopped_by:
                    engine.save(ckpt_dir, state(step), keep=periodic)
                    if periodic and main:
                        with atomic_path(ckpt_dir / f"step_{step:08d}.pt") as tmp:
                            shutil.copyfile(ckpt_dir / LAST, tmp)
                    saved_step = step
                if step >= end or stopped_by:
                    break
        finally:
            batches.close()
    if bar is not None:
        bar.close()

    elapsed = time.perf_counter() - t_start if t_start else 0.0
    run_steps = step - first_step
    mean_ips = (run_steps - 1) * global_batch / elapsed if run_steps > 1 and elapsed > 0 else ips
    summary = {"step": step, "epoch": step / spe, "steps_run": run_steps, "images_per_s": mean_ips,
               "loss": loss_v, "z_std": std_v, "skipped_samples": skipped, "checkpoint": str(ckpt_dir / LAST),
               "stopped_by_signal": bool(stopped_by)}
    healthy = 1 / math.sqrt(cfg.proj_dim)
    if skipped:
        say(f"train: warning: skipped {skipped} unreadable sample(s) or shard read(s) (--skip-bad-samples)")
    if stopped_by:
        say(f"train: stopped by {signal.Signals(stopped_by).name} at step {step}; checkpoint "
            f"{ckpt_dir / LAST} saved; continue with --resume")
    if run_steps == 0 and not stopped_by:
        say(f"train: nothing to do: {ckpt_dir / LAST} is at step {step} of {end} (raise --epochs or --max-steps)")
        return summary
    say(f"train: done: {run_steps} steps this run (step {step}/{end}, epoch {step / spe:.2f}), "
        f"{mean_ips:.1f} images/s, final loss {loss_v:.4f}, z_std {std_v:.4f} (healthy ~{healthy:.4f}, "
        f"collapsed 0); checkpoint {ckpt_dir / LAST}")
    return summary


def _seed(*parts: int) -> int:
    import numpy as np
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])


def _reset_metrics(path: Path, keep_until: int) -> None:
    """New metrics.csv, or on resume the old one without rows past the checkpoint's step."""
    rows = []
    if keep_until and path.is_file():
        with open(path, newline="") as f:
            rows = [r for r in csv.reader(f)][1:]
        rows = [r for r in rows if r and int(r[0]) <= keep_until]
    lines = [",".join(METRICS)] + [",".join(r) for r in rows]
    atomic_write_text(path, "\n".join(lines) + "\n")


def _append_metrics(path: Path, row: list) -> None:
    with open(path, "a") as f:
        f.write(",".join(str(v) if isinstance(v, int) else f"{v:.6g}" for v in row) + "\n")
