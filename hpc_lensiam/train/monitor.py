"""What a training run reports while it runs: metrics.csv, TensorBoard, timing, memory, a physics probe.

Rank 0 writes ``RUN/metrics.csv`` (one row per ``log_every`` steps, :data:`METRICS`) and the same
scalars as TensorBoard event files under ``RUN/tb/`` (``tensorboard --logdir RUN/tb``):

- ``loss``, ``lr``, ``z_std`` (collapse monitor), ``epoch``;
- ``pairs_per_s`` (training pairs over all ranks) and ``images_per_s`` (= 2 x pairs: both images of a
  pair, or both augmentations of a sample, go through the backbone);
- ``data_wait_s`` vs ``compute_s`` per step (this rank: time blocked on the loader vs the rest of the
  step up to its one synchronising collective): a loader-bound run shows data_wait_s >> 0;
- ``peak_mem_mb``: peak device memory (``torch.cuda.max_memory_allocated``) on a GPU, the process's
  peak resident memory on a CPU;
- with ``--probe-data DIR``, every ``probe_every`` steps, ``probe_r2_theta_E``, ``probe_r2_e1``,
  ``probe_r2_gamma``: the held-out ridge R^2 of those lens parameters from the backbone's features
  of the first ``probe_samples`` samples of DIR (``evaluation/probe.py``'s ridge with its fixed split).
  The curve of these numbers is what exposed the zero-init-residual problem (docs/results.md): a
  backbone can lower the SimSiam loss while its features lose the lens physics. The features are
  the backbone seam's (:func:`backbone_features`: the encoder with its head, the projector, bypassed),
  so every ``--arch`` (ResNet or ViT) probes the same way;
- ``rel_update``: the relative backbone update ``|W_now - W_prev| / |W_prev|`` since the previous
  row (the first row: since the run's start or resume), over the backbone's parameters only (the
  online encoder minus its projector head), computed on rank 0 from the module's full fp32 weights
  under every engine (DDP, DeepSpeed ZeRO-0/1). It is the step size a run actually takes: at the
  recipes' batch-64 lrs it differs 10x between methods (issue 30).
"""

from __future__ import annotations

import math
import resource
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from ..core.errors import UserError

PROBE_PARAMS = ("theta_E", "e1", "gamma")
METRICS = (
    "step",
    "epoch",
    "loss",
    "lr",
    "z_std",
    "pairs_per_s",
    "images_per_s",
    "data_wait_s",
    "compute_s",
    "peak_mem_mb",
    *(f"probe_r2_{p}" for p in PROBE_PARAMS),
    "rel_update",
)
IMAGES_PER_PAIR = 2


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def backbone_features(encoder: nn.Module, head: str, x: torch.Tensor) -> torch.Tensor:
    """Pooled backbone features of an SSL encoder whose ``head`` attribute (``fc``, ``head``) is the
    projector: the backbone seam (:mod:`hpc_lensiam.models.backbones`) maps images to pooled features
    with its head an ``Identity``, so the projector is swapped out for the call, whatever the arch."""
    projector = getattr(encoder, head)
    setattr(encoder, head, nn.Identity())
    try:
        return encoder(x)
    finally:
        setattr(encoder, head, projector)


def backbone_params(method: nn.Module) -> list[torch.Tensor]:
    """The backbone's parameters of an SSL method: ``encoder.*`` minus ``encoder.<head>.*`` (the
    projector), in a fixed order; a momentum target and the predictor are not the backbone."""
    head = f"{method.head_attr}."
    return [p for n, p in method.encoder.named_parameters() if not n.startswith(head)]


class UpdateSize:
    """``|W_now - W_prev| / |W_prev|`` over the backbone's parameters, ``W_prev`` the weights at the
    previous :meth:`__call__` (or at construction). Norms in fp64 over all parameters together."""

    def __init__(self, method: nn.Module):
        self.params = backbone_params(method)
        self.prev = self._snapshot()

    @torch.no_grad()
    def _snapshot(self) -> list[torch.Tensor]:
        return [p.detach().float().clone() for p in self.params]

    @torch.no_grad()
    def __call__(self) -> float:
        diff = sum(float((p.detach().float() - q).double().pow(2).sum()) for p, q in zip(self.params, self.prev))
        norm = sum(float(q.double().pow(2).sum()) for q in self.prev)
        self.prev = self._snapshot()
        return math.sqrt(diff) / math.sqrt(norm) if norm > 0 else float("nan")


class LensProbe:
    """Ridge R^2 of theta_E, e1, gamma from the backbone's features of a held-out shard set."""

    def __init__(self, data_dir: str, samples: int):
        from ..evaluation.probe import split_by_key
        from ..shards.manifest import LENS_PARAMS, read_manifest
        from ..shards.reader import load_images

        manifest = read_manifest(data_dir)
        n = min(samples, int(manifest["num_samples"]))
        keys, images, lens = load_images(data_dir, n, what="--probe-data")
        self.keys = np.asarray(keys)
        self.test = split_by_key(self.keys)
        if self.test.sum() < 2 or (~self.test).sum() < 5:
            raise UserError(
                f"--probe-data {data_dir}: {n} samples give {int(self.test.sum())} held-out and "
                f"{int((~self.test).sum())} fitting systems; need >= 2 and >= 5 (raise --probe-samples)"
            )
        self.images = torch.from_numpy(images).unsqueeze(1)
        self.targets = {p: lens[:, LENS_PARAMS.index(p)] for p in PROBE_PARAMS}

    @torch.no_grad()
    def __call__(
        self, encoder: nn.Module, head: str, device: torch.device, dtype, memory_format, batch: int = 64
    ) -> dict:
        from ..evaluation.probe import probe_arrays

        was_training = encoder.training
        encoder.eval()
        try:
            feats = []
            for i in range(0, len(self.images), batch):
                x = self.images[i : i + batch].to(device, memory_format=memory_format)
                with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                    feats.append(backbone_features(encoder, head, x).float().cpu())
        finally:
            encoder.train(was_training)
        r = probe_arrays(torch.cat(feats).numpy(), self.targets, self.keys, self.test)
        return {p: r["ridge"][p] for p in PROBE_PARAMS}


class Monitor:
    """Timing per step, and rank 0's metrics.csv rows, TensorBoard scalars and lens-physics probes."""

    def __init__(self, cfg, engine, out: Path, global_batch: int, first_step: int):
        self.cfg, self.engine, self.out = cfg, engine, out
        self.main = engine.is_main
        self.global_batch = global_batch
        self.writer = None
        self.probe = None
        self._reset_interval(time.perf_counter())
        self.wait = self.compute = 0.0
        self.mark = time.perf_counter()
        self.probed: dict[str, float] = {}
        self.update_size = None
        if not self.main:
            return
        self.update_size = UpdateSize(engine.module)  # the weights this run starts from
        if cfg.probe_data:
            self.probe = LensProbe(cfg.probe_data, cfg.probe_samples)
        from torch.utils.tensorboard import SummaryWriter

        # purge_step: a resumed run drops the events a killed run logged past its checkpoint
        self.writer = SummaryWriter(log_dir=str(out / "tb"), purge_step=first_step + 1 if first_step else None)

    def _reset_interval(self, now: float) -> None:
        self.t_interval, self.n_interval, self.wait_sum, self.compute_sum = now, 0, 0.0, 0.0

    # ---- timing: the loop calls got_batch() when a batch arrives, compute_done() after each (micro-)step
    def got_batch(self) -> None:
        now = time.perf_counter()
        self.wait += now - self.mark
        self.mark = now

    def compute_done(self) -> None:
        now = time.perf_counter()
        self.compute += now - self.mark
        self.mark = now

    def exclude(self, since: float) -> float:
        """Take the time from ``since`` to now (a checkpoint save) out of the data wait and the
        interval's throughput; returns its seconds."""
        dt = time.perf_counter() - since
        self.mark += dt
        self.t_interval += dt
        return dt

    def step_done(self) -> float:
        """After the step's synchronising collective: close this step's timing; returns its end."""
        self.compute_done()
        self.wait_sum += self.wait
        self.compute_sum += self.compute
        self.n_interval += 1
        self.wait = self.compute = 0.0
        return self.mark

    def row(self, step: int, epoch: float, loss: float, lr: float, z_std: float) -> dict:
        """The metrics of the steps since the last row; starts the next interval."""
        now = time.perf_counter()
        n = max(self.n_interval, 1)
        pairs = self.n_interval * self.global_batch / (now - self.t_interval) if self.n_interval else float("nan")
        row = {
            "step": step,
            "epoch": epoch,
            "loss": loss,
            "lr": lr,
            "z_std": z_std,
            "pairs_per_s": pairs,
            "images_per_s": IMAGES_PER_PAIR * pairs,
            "data_wait_s": self.wait_sum / n,
            "compute_s": self.compute_sum / n,
            "peak_mem_mb": peak_memory_mb(self.engine.device),
        }
        row.update({f"probe_r2_{p}": self.probed.pop(p, float("nan")) for p in PROBE_PARAMS})
        row["rel_update"] = self.update_size() if self.update_size is not None else float("nan")
        self._reset_interval(now)
        return row

    def log(self, row: dict) -> None:
        """Rank 0: the row's scalars into TensorBoard (metrics.csv is the loop's)."""
        if self.writer is None:
            return
        for k, v in row.items():
            if k != "step" and isinstance(v, (int, float)) and math.isfinite(v):
                tag = f"probe/ridge_r2_{k.removeprefix('probe_r2_')}" if k.startswith("probe_r2_") else f"train/{k}"
                self.writer.add_scalar(tag, v, row["step"])
        self.writer.flush()

    # ---- the lens-physics probe (rank 0; the other ranks wait at the next step's collective)
    def probe_due(self, step: int) -> bool:
        return self.probe is not None and step % self.cfg.probe_every == 0

    def run_probe(self, step: int) -> dict:
        plan, method = self.engine.plan, self.engine.module
        r2 = self.probe(
            method.encoder, method.head_attr, self.engine.device, plan.autocast_dtype, plan.input_memory_format
        )
        self.probed = dict(r2)
        print(f"train: probe at step {step}: ridge R^2 " + ", ".join(f"{p} {v:.3f}" for p, v in r2.items()), flush=True)
        self.mark = time.perf_counter()  # the probe is neither data wait nor training compute
        return r2

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
