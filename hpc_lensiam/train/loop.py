"""The training loop, shared by every engine: schedule, pairs, logging, checkpoints, resume, signals.

One ``step`` is one optimizer step (``grad_accum`` micro-batches). The lr schedule is a pure
function of the step (linear warm-up, then cosine to zero, per step; the predictor keeps the
initial lr), the data order a pure function of (seed, epoch, batch index) and the SimSiam
augmentations are seeded by (seed, rank, step): so a run resumed from ``last.pt`` continues the
same step counter, lr and batches as an uninterrupted run.

SIGTERM / SIGUSR1 (Slurm's warning signal, or torchrun forwarding a ``scancel``) make every rank
stop at the next step boundary, save ``last.pt`` and exit cleanly; ``--resume`` continues.

Read top-down, the way torchvision's references/classification/train.py reads: :func:`train` owns
the run folder and the engine; :func:`_train` is the sequence (the data source's loader, the
:class:`Schedule`, :func:`build_model` with resume, :func:`train_one_epoch` until the end step,
:func:`summarize`). Where batches come from is data/sources.py's business, the loss and after-step
hook the SSL method's (models/methods/).
"""

from __future__ import annotations

import math
import random
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..core.config import from_dict, merge, read_yaml, to_dict
from ..core.errors import UserError
from ..core.rng import derive_seed
from ..core.runtime import collective_failure
from ..data.sources import source_for
from ..models.methods import build_method, lr_scaling_rule, recipe
from ..models.methods.simsiam import z_std
from ..models.weights import LAST
from ..shards.manifest import read_manifest
from .config import TrainConfig, refuse_renamed, translate_saved
from .monitor import IMAGES_PER_PAIR, METRICS, Monitor
from .resume import load_weights, restore, verify
from .rundir import RESOLVED, RunDir


def train_config(config_path: str | None = None, **overrides) -> TrainConfig:
    """TrainConfig from defaults <- the method's recipe <- YAML file <- keyword overrides (the CLI
    flags; None = unset). The recipe is that of the chosen ``method`` on the chosen ``arch``; the
    method's own hyperparameters (``method_params``) come back complete, its defaults filled.

    A renamed key (``mode`` -> ``views``, BYOL's/SimCLR's/VICReg's flat keys -> ``method_params``)
    is refused naming the new spelling, except in a run's own ``RUN/config.yaml`` written by an older
    version, which is translated so that ``--config RUN/config.yaml --resume`` still continues it.

    A run folder's own ``RUN/config.yaml`` trains into the folder it sits in: its ``out:`` still names
    the folder it was first written in, which is another run once the folder was copied or moved."""
    data = read_yaml(config_path) if config_path else {}
    overrides = {k: v for k, v in overrides.items() if v is not None}
    refuse_renamed(overrides, "flags", flags=True)
    if config_path and is_run_config(config_path):
        data = translate_saved(data)  # an older run's own config.yaml (mode:, flat method keys) resumes
        if "out" not in overrides:
            data["out"] = str(Path(config_path).parent)
    elif config_path:
        refuse_renamed(data, str(config_path))
    pick = {**TrainConfig().__dict__, **data, **overrides}
    base = recipe(pick["method"], pick["arch"])
    cfg = from_dict(TrainConfig, base, "recipe") if base else TrainConfig()
    if config_path:
        cfg = merge(cfg, data, str(config_path))
    cfg = merge(cfg, overrides, "flags") if overrides else cfg
    rule = lr_scaling_rule(cfg.method, cfg.optimizer)  # the rule of the optimizer finally chosen
    if "lr_scaling" not in data and "lr_scaling" not in overrides and cfg.lr_scaling != rule:
        cfg = merge(cfg, {"lr_scaling": rule}, "recipe")
    return cfg.resolved()


def is_run_config(path) -> bool:
    """True for a ``config.yaml`` that a run wrote into its folder (it starts with the resolved line)."""
    path = Path(path)
    if path.name != "config.yaml":
        return False
    try:
        with open(path) as f:
            return f.readline().startswith(RESOLVED)
    except OSError:
        return False


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

    cfg = cfg.resolved()  # the method's own hyperparameters complete, as saved and compared on resume
    out = Path(cfg.out)
    ckpt_dir = out / "checkpoints"
    last = ckpt_dir / LAST
    if last.is_file() and not resume:
        raise UserError(f"{last} exists: pass --resume to continue that run, or choose another --out")
    if cfg.probe_data:  # a bad --probe-data fails before the run folder is created
        read_manifest(cfg.probe_data)
    engine = Engine(cfg)
    run = None
    stop = _StopSignal()
    broken = False  # a collective broke: leave the group without its (possibly blocking) teardown
    done = False
    try:
        run = RunDir(cfg, engine, allow_config_change)
        if resume and not last.is_file() and engine.is_main:
            print(f"train: --resume: no checkpoint at {last} yet, starting from step 0", flush=True)
        summary = _train(cfg, engine, out, ckpt_dir, resume and last.is_file(), stop, run)
        done = True
        return summary
    except ShardError as exc:  # one rank's shard: say it from that rank (the CLI prints rank 0 only)
        if not engine.is_main:
            print(f"hpc-lensiam: error: rank {engine.rank}: {exc}", file=sys.stderr, flush=True)
        raise
    except RuntimeError as exc:  # another rank failed (quiet here: it says why) or hung (named here)
        failure = collective_failure(exc, engine.rank, engine.world_size, cfg.dist_timeout)
        if failure is None:
            raise
        broken = True
        raise failure from None
    finally:
        stop.restore()
        if run is not None:
            run.close(refused=not done)
        if not broken:
            engine.close()


def _train(cfg, engine, out: Path, ckpt_dir: Path, resume: bool, stop: _StopSignal, run: RunDir) -> dict:
    """The run in order: data, schedule, model (fresh or resumed), start-up lines and files, epochs, summary."""
    loader = source_for(cfg.data).loader(cfg, engine)
    sched = Schedule.from_config(cfg, engine.world_size, loader.batches_per_epoch)
    step = build_model(cfg, engine, loader.image_shape[-1], sched, ckpt_dir, run, resume)
    announce(cfg, engine, sched, step, resume)
    monitor = Monitor(cfg, engine, out, sched.global_batch, step)  # reads --probe-data before anything is written
    if engine.is_main:
        write_run_files(engine, run, out, sched, resume, step)
    bar = _progress_bar(sched, step) if engine.is_main else None
    progress = Progress(step=step, first_step=step, saved_step=step if resume else None)  # starts the clock
    while progress.step < sched.end_step and not progress.stopped_by:
        train_one_epoch(cfg, engine, loader, sched, monitor, run, stop, progress, bar)
    monitor.close()
    if engine.is_main:  # RUN/loss.png beside metrics.csv; a plotting failure is one warning line
        from ..shards.display import plot_loss_safely

        plot_loss_safely(out / "metrics.csv", out / "loss.png", 1 / math.sqrt(cfg.proj_dim))
    if bar is not None:
        bar.close()
    return summarize(cfg, engine, sched, progress, ckpt_dir)


@dataclass(frozen=True)
class Schedule:
    """The run's step arithmetic, fixed at start-up by the config, the world size and the epoch length."""

    steps_per_epoch: int  # optimizer steps (grad_accum micro-batches each) per epoch
    total_steps: int  # epochs x steps_per_epoch: where the cosine reaches 0
    end_step: int  # where this run stops: total_steps, or --max-steps if earlier
    warmup_steps: int
    lr0: float  # the peak lr (scaled_lr), also the predictor's fixed lr
    global_batch: int  # pairs per optimizer step over all ranks

    @classmethod
    def from_config(cls, cfg: TrainConfig, world_size: int, batches_per_epoch: int) -> Schedule:
        spe = batches_per_epoch // cfg.grad_accum
        total = cfg.epochs * spe
        end = min(total, cfg.max_steps) if cfg.max_steps else total
        return cls(
            steps_per_epoch=spe,
            total_steps=total,
            end_step=end,
            warmup_steps=min(total, round(cfg.warmup_epochs * spe)),
            lr0=scaled_lr(cfg, world_size),
            global_batch=cfg.batch_size * world_size * cfg.grad_accum,
        )

    def lr(self, step: int) -> float:
        return lr_at(step, self.lr0, self.warmup_steps, self.total_steps)

    def stop_note(self) -> str | None:
        """Where ``--max-steps`` cuts the schedule, said at start (None when it does not): the schedule
        is that of ``--epochs`` (so a stopped run is the prefix of the full run, and ``--resume``
        continues it), so a short ``--max-steps`` may end inside the warm-up or high on the cosine."""
        if self.end_step >= self.total_steps:
            return None
        if self.end_step <= self.warmup_steps:
            return (
                f"train: warning: --max-steps {self.end_step} stops inside the warm-up ({self.warmup_steps} steps): "
                f"the lr never reaches its peak {self.lr0:.6g}; for a complete short schedule lower --epochs "
                f"(the schedule spans --epochs) and --warmup-epochs instead"
            )
        last = self.lr(self.end_step - 1)
        return (
            f"train: note: --max-steps {self.end_step} stops at lr {last:.3g} ({last / self.lr0:.0%} of the peak), "
            f"before the cosine of {self.total_steps} steps ends; --resume with more steps continues the same schedule"
        )

    def state(self, step: int) -> dict:
        """The checkpoint's ``scheduler`` entry (resume warns when steps_per_epoch changed)."""
        return {
            "name": "warmup_cosine",
            "step": step,
            "lr": self.lr0,
            "warmup_steps": self.warmup_steps,
            "total_steps": self.total_steps,
            "steps_per_epoch": self.steps_per_epoch,
        }


@dataclass
class Progress:
    """What the loop carries from step to step and epoch to epoch, and what the summary reports."""

    step: int
    first_step: int  # where this run started (0, or the resumed checkpoint's step)
    saved_step: int | None  # the last checkpoint written or resumed from (named if training diverges)
    loss: float = math.nan  # last step's, averaged over ranks
    z_std: float = math.nan
    lr: float = math.nan
    pairs_per_s: float = 0.0  # the last logged interval's (the first step's until a row is logged)
    skipped: int = 0  # unreadable samples skipped, all ranks (--skip-bad-samples)
    stopped_by: int = 0  # the signal that stopped the run; 0 = none
    t_loop: float = field(default_factory=time.perf_counter)
    t_start: float | None = None  # end of the first (warm-up) step: the mean throughput starts there
    t_end: float | None = None  # end of the last step (before logging and saving): the mean ends there
    saving_s: float = 0.0  # seconds spent saving checkpoints, taken out of the throughput
    saving_at_end: float = 0.0  # saving_s as it was at t_end


def build_model(cfg, engine, image_side: int, sched: Schedule, ckpt_dir: Path, run: RunDir, resume: bool) -> int:
    """The method's model, wrapped by the engine, from ``cfg.seed`` or the checkpoint; the step to start at.

    On resume the weights go into the bare model before the engine wraps it (ZeRO clones its master
    copy there), then the optimizer state and RNG are restored and checked (train/resume.py)."""
    torch.manual_seed(cfg.seed)
    try:
        model = build_method(cfg, image_side)  # native side (a ViT's patch grid)
    except ValueError as exc:
        raise UserError(f"{cfg.data}: {exc}") from None
    ckpt = ckpt_path = None
    if resume:
        ckpt, ckpt_path = load_weights(model, ckpt_dir, cfg)
        run.check_resume(ckpt, ckpt_path)
    engine.wrap(model, model.param_groups(sched.lr0, cfg.fix_pred_lr))
    if ckpt is None:
        return 0
    step = restore(engine, ckpt, ckpt_path, ckpt_dir, sched.steps_per_epoch)
    verify(engine, ckpt, ckpt_path)
    return step


def _params_text(cfg) -> str:
    """`` (ema_tau_base=0.996)``: the method's own hyperparameters in the start-up line ('' when none)."""
    p = cfg.method_params or {}
    return f" ({', '.join(f'{k}={v}' for k, v in p.items())})" if p else ""


def announce(cfg, engine, sched: Schedule, step: int, resume: bool) -> None:
    """Rank 0's two start-up lines: what runs where, and the batch/lr/schedule arithmetic."""
    rule = f"sqrt({sched.global_batch})" if cfg.lr_scaling == "sqrt" else f"{sched.global_batch}/256"
    pair = f"{cfg.method} + {cfg.optimizer}"
    expected = lr_scaling_rule(cfg.method, cfg.optimizer)
    why = f"the {pair} rule" if cfg.lr_scaling == expected else f"set by config; the {pair} rule is {expected}"
    pred = f" (predictor {'fixed' if cfg.fix_pred_lr else 'scheduled'})" if hasattr(engine.module, "predictor") else ""
    backend = engine.backend if engine.world_size > 1 or cfg.engine == "deepspeed" else "single process"
    _say(
        engine,
        f"train: {cfg.method}{_params_text(cfg)} | {cfg.views} views | {cfg.arch} | {cfg.optimizer} | "
        f"engine {cfg.engine} | "
        f"{engine.world_size} rank(s) on {engine.device.type} ({backend})"
        f"{' + SyncBatchNorm' if engine.plan.sync_bn != 'none' else ''} | {engine.plan.describe()}",
    )
    for line in engine.plan.warnings:
        _say(engine, line)
    _say(
        engine,
        f"train: global batch {cfg.batch_size} x {engine.world_size} rank(s) x {cfg.grad_accum} accum = "
        f"{sched.global_batch}; lr = {cfg.base_lr} x {rule} = {sched.lr0:.6g} ({cfg.lr_scaling}: {why}){pred}; "
        f"{sched.steps_per_epoch} "
        f"steps/epoch x {cfg.epochs} epochs = {sched.total_steps} steps, warm-up {sched.warmup_steps}; "
        f"{'resuming at step ' + str(step) if resume else 'from step 0'}"
        f"{f', stopping at {sched.end_step}' if sched.end_step < sched.total_steps else ''}",
    )
    if sched.stop_note():
        _say(engine, sched.stop_note())


def write_run_files(engine, run: RunDir, out: Path, sched: Schedule, resume: bool, step: int) -> None:
    """Rank 0: ``config.yaml`` (with the resolved numbers) and ``metrics.csv`` (kept up to ``step`` on resume)."""
    out.mkdir(parents=True, exist_ok=True)
    header = (
        f"{RESOLVED} world_size={engine.world_size} global_batch={sched.global_batch} lr={sched.lr0:.6g} "
        f"steps_per_epoch={sched.steps_per_epoch} total_steps={sched.total_steps} "
        f"warmup_steps={sched.warmup_steps}\n"
    )
    run.write_config(header, resume, step)
    run.reset_metrics(step if resume else 0)


def checkpoint_state(cfg, engine, run: RunDir, sched: Schedule, step: int) -> dict:
    """What ``last.pt`` holds besides the weights and optimizer state (the engine adds those and per-rank RNG)."""
    return {
        "format": "hpc_lensiam.checkpoint/1",
        "config": to_dict(cfg),
        "step": step,
        **run.state_keys(),
        "epoch": step // sched.steps_per_epoch,
        "arch": cfg.arch,
        "world_size": engine.world_size,
        "scheduler": sched.state(step),
        "rng": {"torch": torch.get_rng_state(), "python": random.getstate()},
    }


def train_one_epoch(
    cfg, engine, loader, sched: Schedule, monitor: Monitor, run: RunDir, stop: _StopSignal, progress: Progress, bar
) -> None:
    """Optimizer steps from ``progress.step`` (mid-epoch after a resume) to the end of its epoch, the
    run's end step or a stop signal; updates ``progress``. Each step: lr, views, forward/backward per
    micro-batch, the optimizer step, the method's after-step hook, one all-reduce of the metrics and
    the stop flag, the divergence check, logging and checkpoints."""
    method = engine.module  # the unwrapped model: its loss and after-step hook
    ckpt_dir = Path(cfg.out) / "checkpoints"
    spe = sched.steps_per_epoch
    batches = loader.epoch(progress.step // spe, start=(progress.step % spe) * cfg.grad_accum)
    acc = torch.zeros(4, device=engine.device)  # loss, z_std, skipped samples, stop flag
    try:
        for i, batch in enumerate(batches):
            monitor.got_batch()
            micro = i % cfg.grad_accum
            if micro == 0:
                progress.lr = set_lr(engine, sched, progress.step)
                acc.zero_()
            x1, x2 = make_views(cfg, engine, batch, progress.step, micro)
            loss, z1 = method.loss(*engine.forward(x1, x2))
            engine.backward(loss)
            acc[:2] += torch.stack([loss.detach().float(), z_std(z1)]) / cfg.grad_accum
            acc[2] += int(batch["bad"])
            if not engine.step():
                monitor.compute_done()
                continue
            progress.step += 1
            step = progress.step
            method.after_step(step, sched.total_steps)  # e.g. BYOL's EMA target update
            acc[3] = float(stop.signum > 0)
            red = engine.all_reduce_sum(acc).cpu()  # one small collective and one sync per step
            progress.t_end, progress.saving_at_end = monitor.step_done(), progress.saving_s
            progress.loss, progress.z_std = (red[:2] / engine.world_size).tolist()
            progress.skipped += int(red[2])
            check_diverged(cfg, progress, ckpt_dir)
            log_step(cfg, engine, sched, monitor, progress, bar)
            if red[3] > 0:
                progress.stopped_by = stop.signum or signal.SIGTERM
            periodic = step % cfg.ckpt_every == 0
            if periodic or step == sched.end_step or progress.stopped_by:
                t_save = time.perf_counter()
                engine.save(
                    ckpt_dir, checkpoint_state(cfg, engine, run, sched, step), keep=periodic, keep_last=cfg.keep_last
                )
                progress.saved_step = step
                # a save is neither throughput nor data wait (the summary and metrics.csv alike)
                progress.saving_s += monitor.exclude(t_save)
            if step >= sched.end_step or progress.stopped_by:
                break
    finally:
        batches.close()


def set_lr(engine, sched: Schedule, step: int) -> float:
    """The scheduled lr into every param group, except those that keep lr0 (the fixed-lr predictor)."""
    lr = sched.lr(step)
    for g in engine.param_groups:
        g["lr"] = sched.lr0 if g.get("fix_lr") else lr
    return lr


def make_views(cfg, engine, batch: dict, step: int, micro: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A micro-batch's two views on the device: the stored lens pair (``views`` lens), or two batched
    augmentations of one image seeded by (seed, rank, step, micro) (standard), so a resume repeats them."""
    from ..data.augment import make_pair

    if cfg.views == "lens":
        return engine.to_input(batch["x1"]), engine.to_input(batch["x2"])
    g = torch.Generator(device=engine.device)
    g.manual_seed(derive_seed(cfg.seed, engine.rank, step, micro))
    return make_pair(engine.to_input(batch["x"]), g)


def check_diverged(cfg, progress: Progress, ckpt_dir: Path) -> None:
    """A non-finite loss (the same on every rank: it is all-reduced) stops the run, naming the last good checkpoint."""
    if math.isfinite(progress.loss):
        return
    kept = (
        f"last good checkpoint {ckpt_dir / LAST} (step {progress.saved_step}) kept"
        if progress.saved_step is not None
        else "no checkpoint was written yet"
    )
    hint = (
        "use --precision bf16 or fp32"
        if cfg.precision == "fp16"
        else "lower --base-lr, or check the shards for NaN/inf pixels"
    )
    raise UserError(
        f"loss is {progress.loss} at step {progress.step} (lr {progress.lr:.4g}): training diverged "
        f"and stopped; {kept}. Try: {hint}"
    )


def log_step(cfg, engine, sched: Schedule, monitor: Monitor, progress: Progress, bar) -> None:
    """Throughput, the physics probe when due, and every ``log_every`` steps a metrics row (rank 0:
    metrics.csv, TensorBoard, the progress bar or a plain line when there is no terminal)."""
    step, main = progress.step, engine.is_main
    now = progress.t_end  # this step's end (monitor.step_done)
    if progress.t_start is None:  # the mean throughput excludes the first (warm-up) step
        progress.pairs_per_s = sched.global_batch / (now - progress.t_loop)
        progress.t_start = now
    probed = main and monitor.probe_due(step)
    if probed:
        monitor.run_probe(step)
    if step % cfg.log_every == 0 or step == sched.end_step or probed:
        row = monitor.row(step, step / sched.steps_per_epoch, progress.loss, progress.lr, progress.z_std)
        if math.isfinite(row["pairs_per_s"]):
            progress.pairs_per_s = row["pairs_per_s"]
        if main:
            _append_metrics(Path(cfg.out) / "metrics.csv", [row[k] for k in METRICS])
            monitor.log(row)
            bar.set_postfix(loss=f"{progress.loss:.4f}", z_std=f"{progress.z_std:.4f}", lr=f"{progress.lr:.3g}")
            if bar.disable:  # no terminal (a batch job's log): a plain line instead
                print(
                    f"step {step}/{sched.end_step} epoch {step / sched.steps_per_epoch:.2f} loss "
                    f"{progress.loss:.4f} z_std {progress.z_std:.4f} lr {progress.lr:.4g} "
                    f"{progress.pairs_per_s:.1f} pairs/s",
                    flush=True,
                )
    if bar is not None:
        bar.update(1)


def summarize(cfg, engine, sched: Schedule, progress: Progress, ckpt_dir: Path) -> dict:
    """The run's summary dict (rank 0's view) and its closing lines: skipped samples, a stop by
    signal, nothing to do, or the final loss/z_std/throughput."""
    last = ckpt_dir / LAST
    step, run_steps = progress.step, progress.step - progress.first_step
    # from the end of the warm-up step to the end of the last step, less the saves in between
    elapsed = progress.t_end - progress.t_start - progress.saving_at_end if progress.t_start and progress.t_end else 0.0
    mean_pps = (run_steps - 1) * sched.global_batch / elapsed if run_steps > 1 and elapsed > 0 else progress.pairs_per_s
    summary = {
        "step": step,
        "epoch": step / sched.steps_per_epoch,
        "steps_run": run_steps,
        "pairs_per_s": mean_pps,
        "images_per_s": IMAGES_PER_PAIR * mean_pps,
        "loss": progress.loss,
        "z_std": progress.z_std,
        "skipped_samples": progress.skipped,
        "checkpoint": str(last),
        "stopped_by_signal": bool(progress.stopped_by),
    }
    if progress.skipped:
        _say(
            engine,
            f"train: warning: skipped {progress.skipped} unreadable sample(s) or shard read(s) (--skip-bad-samples)",
        )
    if progress.stopped_by:
        _say(
            engine,
            f"train: stopped by {signal.Signals(progress.stopped_by).name} at step {step}; checkpoint "
            f"{last} saved; continue with --resume",
        )
    if run_steps == 0 and not progress.stopped_by:
        _say(
            engine,
            f"train: nothing to do: {last} is at step {step} of {sched.end_step} (raise --epochs or --max-steps)",
        )
        return summary
    healthy = 1 / math.sqrt(cfg.proj_dim)
    _say(
        engine,
        f"train: done: {run_steps} steps this run (step {step}/{sched.end_step}, epoch "
        f"{step / sched.steps_per_epoch:.2f}), {mean_pps:.1f} pairs/s ({IMAGES_PER_PAIR * mean_pps:.1f} images/s), "
        f"final loss {progress.loss:.4f}, z_std {progress.z_std:.4f} (healthy ~{healthy:.4f}, collapsed 0); "
        f"checkpoint {last}",
    )
    return summary


def _say(engine, line: str) -> None:
    """A line on rank 0's stdout; the other ranks stay quiet."""
    if engine.is_main:
        print(line, flush=True)


def _progress_bar(sched: Schedule, step: int):
    from tqdm import tqdm

    return tqdm(
        total=sched.end_step, initial=step, desc="train", unit="step", dynamic_ncols=True, file=sys.stderr, disable=None
    )


def _append_metrics(path: Path, row: list) -> None:
    with open(path, "a") as f:
        f.write(",".join(str(v) if isinstance(v, int) else f"{v:.6g}" for v in row) + "\n")
