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

import math
import random
import signal
import sys
import time
from pathlib import Path

import torch

from ..config import TrainConfig, from_dict, merge, read_yaml, to_dict
from ..errors import UserError
from ..io import read_manifest
from ..models.methods import build_method, recipe
from ..models.methods.simsiam import z_std
from ..rng import derive_seed
from ..runtime import cpu_budget_warning
from .checkpoint import LAST
from .monitor import IMAGES_PER_PAIR, METRICS, Monitor
from .resume import load_weights, restore, verify
from .rundir import RunDir


def train_config(config_path: str | None = None, **overrides) -> TrainConfig:
    """TrainConfig from defaults <- the method's recipe <- YAML file <- keyword overrides (the CLI
    flags; None = unset). The recipe is that of the chosen ``method`` on the chosen ``arch``."""
    data = read_yaml(config_path) if config_path else {}
    overrides = {k: v for k, v in overrides.items() if v is not None}
    pick = {**TrainConfig().__dict__, **data, **overrides}
    base = recipe(pick["method"], pick["arch"])
    cfg = from_dict(TrainConfig, base, "recipe") if base else TrainConfig()
    if config_path:
        cfg = merge(cfg, data, str(config_path))
    return merge(cfg, overrides, "flags") if overrides else cfg


def scaled_lr(cfg: TrainConfig, world_size: int) -> float:
    """lr = base_lr x global_batch / 256 (``lr_scaling`` linear) or base_lr x sqrt(global_batch)
    (sqrt, SimCLR's small-batch rule); global = per-rank batch x world size x grad accumulation."""
    global_batch = cfg.batch_size * world_size * cfg.grad_accum
    return cfg.base_lr * (math.sqrt(global_batch) if cfg.lr_scaling == "sqrt" else global_batch / 256)


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


def train(cfg: TrainConfig, resume: bool = False, allow_config_change: bool = False) -> dict:
    """Pretrain SimSiam on ``cfg.data`` into ``cfg.out``; return a summary dict (rank 0's view).

    ``RUN`` is locked for the run and ``--resume`` must continue the same run (train/rundir.py)."""
    from ..data.loader import ShardError
    from .engine import Engine

    out = Path(cfg.out)
    ckpt_dir = out / "checkpoints"
    last = ckpt_dir / LAST
    if last.is_file() and not resume:
        raise UserError(f"{last} exists: pass --resume to continue that run, or choose another --out")
    if cfg.probe_data:   # a bad --probe-data fails before the run folder is created
        read_manifest(cfg.probe_data)
    engine = Engine(cfg)
    run = None
    stop = _StopSignal()
    try:
        run = RunDir(cfg, engine, allow_config_change)
        if resume and not last.is_file() and engine.is_main:
            print(f"train: --resume: no checkpoint at {last} yet, starting from step 0", flush=True)
        return _train(cfg, engine, out, ckpt_dir, resume and last.is_file(), stop, run)
    except ShardError as exc:   # one rank's shard: say it from that rank (the CLI prints rank 0 only)
        if not engine.is_main:
            print(f"hpc-lensiam: error (rank {engine.rank}): {exc}", file=sys.stderr, flush=True)
        raise
    finally:
        stop.restore()
        if run is not None:
            run.close()
        engine.close()


def _train(cfg, engine, out: Path, ckpt_dir: Path, resume: bool, stop: _StopSignal, run: RunDir) -> dict:
    from ..data.augment import make_pair
    from ..data.loader import ShardLoader

    main = engine.is_main
    say = (lambda *a: print(*a, flush=True)) if main else (lambda *a: None)
    from ..data.online import OnlineLoader, is_online
    if is_online(cfg.data):   # rendered on this rank's device before each step (docs/online.md)
        loader = OnlineLoader.from_train_config(cfg, engine.rank, engine.world_size, engine.device)
    else:
        loader = ShardLoader(cfg.data, cfg.mode, cfg.batch_size, engine.rank, engine.world_size, cfg.workers,
                             cfg.seed, cfg.shuffle_buffer, cfg.grad_accum, cfg.skip_bad_samples, verify=cfg.verify,
                             pin_memory=engine.plan.pin_memory)
        if main and (busy := cpu_budget_warning(loader.workers if cfg.workers else 0, engine.local_world_size)):
            print(f"train: warning: {busy}", file=sys.stderr, flush=True)
    spe = loader.batches_per_epoch // cfg.grad_accum             # optimizer steps per epoch
    total = cfg.epochs * spe
    end = min(total, cfg.max_steps) if cfg.max_steps else total
    warmup = min(total, round(cfg.warmup_epochs * spe))
    global_batch = cfg.batch_size * engine.world_size * cfg.grad_accum
    lr0 = scaled_lr(cfg, engine.world_size)

    torch.manual_seed(cfg.seed)
    img_size = (loader.image_shape if is_online(cfg.data)   # native side (ViT patch grid)
                else read_manifest(cfg.data).get("image_shape") or [None])[-1]
    try:
        model = build_method(cfg, img_size)
    except ValueError as exc:
        raise UserError(f"{cfg.data}: {exc}") from None
    if resume:   # into the bare model, before the engine wraps it (ZeRO clones its master copy there)
        ckpt, ckpt_path = load_weights(model, ckpt_dir, cfg)
        run.check_resume(ckpt, ckpt_path)
    engine.wrap(model, model.param_groups(lr0, cfg.fix_pred_lr))
    method = engine.module   # the unwrapped model: its loss and after-step hook

    step = 0
    if resume:
        step = restore(engine, ckpt, ckpt_path, ckpt_dir, spe)
        verify(engine, ckpt, ckpt_path)

    rule = f"sqrt({global_batch})" if cfg.lr_scaling == "sqrt" else f"{global_batch}/256"
    pred = f" (predictor {'fixed' if cfg.fix_pred_lr else 'scheduled'})" if hasattr(method, "predictor") else ""
    backend = engine.backend if engine.world_size > 1 or cfg.engine == "deepspeed" else "single process"
    say(f"train: {cfg.method} | {cfg.mode} | {cfg.arch} | {cfg.optimizer} | engine {cfg.engine} | "
        f"{engine.world_size} rank(s) on {engine.device.type} ({backend})"
        f"{' + SyncBatchNorm' if engine.plan.sync_bn != 'none' else ''} | {engine.plan.describe()}")
    say(f"train: global batch {cfg.batch_size} x {engine.world_size} rank(s) x {cfg.grad_accum} accum = "
        f"{global_batch}; lr = {cfg.base_lr} x {rule} = {lr0:.6g}{pred}; {spe} steps/epoch x {cfg.epochs} epochs = "
        f"{total} steps, warm-up {warmup}; {'resuming at step ' + str(step) if resume else 'from step 0'}"
        f"{f', stopping at {end}' if end < total else ''}")

    monitor = Monitor(cfg, engine, out, global_batch, step)   # reads --probe-data before anything is written
    if main:
        out.mkdir(parents=True, exist_ok=True)
        header = (f"# resolved: world_size={engine.world_size} global_batch={global_batch} lr={lr0:.6g} "
                  f"steps_per_epoch={spe} total_steps={total} warmup_steps={warmup}\n")
        run.write_config(header, resume, step)
        run.reset_metrics(step if resume else 0)

    def state(step):
        return {"format": "hpc_lensiam.checkpoint/1", "config": to_dict(cfg), "step": step, **run.state_keys(),
                "epoch": step // spe, "arch": cfg.arch, "world_size": engine.world_size,
                "scheduler": {"name": "warmup_cosine", "step": step, "lr": lr0, "warmup_steps": warmup,
                              "total_steps": total, "steps_per_epoch": spe},
                "rng": {"torch": torch.get_rng_state(), "python": random.getstate()}}   # + per_rank (engine)

    saved_step = step if resume else None
    bar = None
    if main:
        from tqdm import tqdm
        bar = tqdm(total=end, initial=step, desc="train", unit="step", dynamic_ncols=True,
                   file=sys.stderr, disable=None)
    first_step, t_start = step, None
    loss_v = std_v = float("nan")
    pps = 0.0
    skipped = 0
    stopped_by = 0
    to_device = engine.to_input

    t_loop = time.perf_counter()
    while step < end and not stopped_by:
        epoch = step // spe
        batches = loader.epoch(epoch, start=(step % spe) * cfg.grad_accum)
        acc = torch.zeros(4, device=engine.device)   # loss, z_std, skipped samples, stop flag
        try:
            for i, batch in enumerate(batches):
                monitor.got_batch()
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
                    g.manual_seed(derive_seed(cfg.seed, engine.rank, step, micro))
                    x1, x2 = make_pair(to_device(batch["x"]), g)
                loss, z1 = method.loss(*engine.forward(x1, x2))
                engine.backward(loss)
                acc[:2] += torch.stack([loss.detach().float(), z_std(z1)]) / cfg.grad_accum
                acc[2] += int(batch["bad"])
                if not engine.step():
                    monitor.compute_done()
                    continue
                step += 1
                method.after_step(step, total)   # e.g. BYOL's EMA target update
                acc[3] = float(stop.signum > 0)
                red = engine.all_reduce_sum(acc).cpu()      # one small collective and one sync per step
                monitor.step_done()
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
                    pps = global_batch / (now - t_loop)
                    t_start = now
                probed = main and monitor.probe_due(step)
                if probed:
                    monitor.run_probe(step)
                if step % cfg.log_every == 0 or step == end or probed:
                    row = monitor.row(step, step / spe, loss_v, lr, std_v)
                    pps = row["pairs_per_s"] if math.isfinite(row["pairs_per_s"]) else pps
                    if main:
                        _append_metrics(out / "metrics.csv", [row[k] for k in METRICS])
                        monitor.log(row)
                        bar.set_postfix(loss=f"{loss_v:.4f}", z_std=f"{std_v:.4f}", lr=f"{lr:.3g}")
                        if bar.disable:   # no terminal (a batch job's log): a plain line instead
                            print(f"step {step}/{end} epoch {step / spe:.2f} loss {loss_v:.4f} z_std {std_v:.4f} "
                                  f"lr {lr:.4g} {pps:.1f} pairs/s", flush=True)
                if bar is not None:
                    bar.update(1)
                if red[3] > 0:
                    stopped_by = stop.signum or signal.SIGTERM
                periodic = step % cfg.ckpt_every == 0
                if periodic or step == end or stopped_by:
                    engine.save(ckpt_dir, state(step), keep=periodic, keep_last=cfg.keep_last)
                    saved_step = step
                if step >= end or stopped_by:
                    break
        finally:
            batches.close()
    monitor.close()
    if bar is not None:
        bar.close()

    elapsed = time.perf_counter() - t_start if t_start else 0.0
    run_steps = step - first_step
    mean_pps = (run_steps - 1) * global_batch / elapsed if run_steps > 1 and elapsed > 0 else pps
    summary = {"step": step, "epoch": step / spe, "steps_run": run_steps, "pairs_per_s": mean_pps,
               "images_per_s": IMAGES_PER_PAIR * mean_pps,
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
        f"{mean_pps:.1f} pairs/s ({IMAGES_PER_PAIR * mean_pps:.1f} images/s), final loss {loss_v:.4f}, "
        f"z_std {std_v:.4f} (healthy ~{healthy:.4f}, "
        f"collapsed 0); checkpoint {ckpt_dir / LAST}")
    return summary


def _append_metrics(path: Path, row: list) -> None:
    with open(path, "a") as f:
        f.write(",".join(str(v) if isinstance(v, int) else f"{v:.6g}" for v in row) + "\n")
