"""The one place that differs between DDP and DeepSpeed, and the only place with rank logic.

``Engine(cfg)`` reads its rank and device from :mod:`hpc_lensiam.core.runtime` (which refuses several
processes started without torchrun), takes every device-dependent choice from the device plan
(:mod:`.plan`: memory format, autocast dtype, loss scaler, SyncBatchNorm kind, DeepSpeed JSON,
cudnn/TF32), joins the process group (NCCL with ``device_id`` on CUDA, gloo on CPU; a plain
``python`` run is a single process), then offers one small interface to the loop::

    engine.wrap(model, param_groups)      SyncBatchNorm (world > 1), device, DDP | deepspeed.initialize
                                          (load resumed weights into ``model`` BEFORE this call: ZeRO
                                          clones its fp32 master copy here)
    engine.forward(x1, x2)                under the precision's autocast
    engine.backward(loss); engine.step()  loss scaling and gradient accumulation; step() -> boundary?
    engine.param_groups                   for the lr schedule
    engine.save(ckpt_dir, state, keep)    last.pt from rank 0 (+ DeepSpeed's folder from every rank)
    engine.load(ckpt, ckpt_dir)           resume optimizer state (or weights only, saying why)
    engine.all_reduce_sum(t), rank, world_size, is_main, device, close()
"""

from __future__ import annotations

import logging
import os
import socket
import warnings
from contextlib import nullcontext
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..core.errors import UserError
from ..core.runtime import (
    DeviceCaps,
    backend_for,
    device_for,
    die_with_parent,
    init_distributed,
    runtime,
    under_torchrun,
)
from ..models.weights import DS_DIR, LAST, load_weights_only
from .checkpoint import capture_rank_rng, periodic_tags, prune_deepspeed_tags, save_checkpoint, save_periodic
from .optim import build_optimizer
from .plan import DevicePlan, apply_switches, make_plan


class _AllReduceSum(torch.autograd.Function):
    """Sum over ranks; its gradient is the sum over ranks of the incoming gradients."""

    @staticmethod
    def forward(ctx, x):
        x = x.clone()
        dist.all_reduce(x)
        return x

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


class GlooSyncBatchNorm(_BatchNorm):
    """SyncBatchNorm for CPU process groups (torch's ``nn.SyncBatchNorm`` only runs on GPUs).

    Batch statistics are summed over all ranks with an autograd-aware all_reduce, so the
    gradient flows through the global mean and variance exactly as in ``nn.SyncBatchNorm``.
    """

    def _check_input_dim(self, x):
        if x.dim() < 2:
            raise ValueError(f"expected at least 2-D input, got {x.dim()}-D")

    def forward(self, x):
        if not (self.training and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        C, dims = x.shape[1], [0] + list(range(2, x.dim()))
        xf = x.float()
        count = xf.new_tensor([x.numel() // C])
        stats = _AllReduceSum.apply(torch.cat([xf.sum(dims), (xf * xf).sum(dims), count]))
        n = stats[-1]
        mean = stats[:C] / n
        var = (stats[C : 2 * C] / n - mean * mean).clamp(min=0)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                m = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
                self.running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)
                self.running_var.mul_(1 - m).add_(var.detach() * n / (n - 1).clamp(min=1), alpha=m)
        shape = [1, C] + [1] * (x.dim() - 2)
        y = (xf - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y.to(x.dtype)


def convert_sync_batchnorm(module: nn.Module, cuda: bool) -> nn.Module:
    """Every BatchNorm -> ``nn.SyncBatchNorm`` (CUDA) or :class:`GlooSyncBatchNorm` (CPU)."""
    if cuda:
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    out = module
    if isinstance(module, _BatchNorm) and not isinstance(module, GlooSyncBatchNorm):
        out = GlooSyncBatchNorm(
            module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats
        )
        if module.affine:  # the same Parameter objects: optimizer groups built before stay valid
            out.weight, out.bias = module.weight, module.bias
        if module.track_running_stats:
            out.running_mean, out.running_var = module.running_mean, module.running_var
            out.num_batches_tracked = module.num_batches_tracked
        out.train(module.training)
    for name, child in module.named_children():
        out.add_module(name, convert_sync_batchnorm(child, cuda))
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def resume_mode(ckpt: dict, kind: str, zero_stage: int, world_size: int) -> str | None:
    """None when the optimizer state in ``ckpt`` can be restored as saved, else why it cannot
    (the resume then restores the weights only, saying so).

    DDP's optimizer state is whole on every rank, so any world size loads it. DeepSpeed keeps it in
    its own folder, laid out by ZeRO stage and, for stage >= 1, partitioned by data-parallel rank:
    another stage, or another rank count under ZeRO >= 1, cannot read it.
    """
    saved = ckpt.get("engine", "ddp")
    if saved != kind:
        return f"it was written by --engine {saved}, this run is --engine {kind}"
    if kind != "deepspeed":
        return None
    saved_stage = int(ckpt.get("zero_stage", (ckpt.get("config") or {}).get("zero_stage", 0)))
    saved_world = int(ckpt.get("world_size", world_size))
    if saved_stage != zero_stage:
        return f"it was written with --zero-stage {saved_stage}, this run is --zero-stage {zero_stage}"
    if zero_stage > 0 and saved_world != world_size:
        return f"ZeRO-{zero_stage} partitions the optimizer state over {saved_world} rank(s), this run has {world_size}"
    return None


def _weights_only_checkpoint_engine(engine):
    """DeepSpeed's checkpoint engine with its ``load`` swapped for :func:`load_weights_only`.

    DeepSpeed 0.19 reads its model and optimizer files with ``torch.load(weights_only=False)``: a
    run folder handed to ``--resume`` could run code from a planted file. Saving is untouched."""

    def load(path: str, map_location=None):
        return load_weights_only(path, map_location=map_location, what="DeepSpeed checkpoint")

    engine.load = load
    return engine


class Engine:
    """DDP (``--engine ddp``) or DeepSpeed (``--engine deepspeed``) behind one interface.

    ``plan`` and ``device`` default to this process's real ones; the tests pass a CUDA plan
    (``make_plan(cfg, DeviceCaps.cuda(), world)``) with a CPU device to run the GPU decisions here.
    """

    def __init__(self, cfg, plan: DevicePlan | None = None, device: torch.device | None = None):
        self.cfg, self.kind = cfg, cfg.engine
        rt = runtime(command="train")
        if under_torchrun():
            die_with_parent()  # a kill -9 of the torchrun agent takes the trainers with it
        self.world_size, self.rank, self.local_rank = rt.world_size, rt.rank, rt.local_rank
        self.local_world_size = rt.local_world_size
        self.device = device if device is not None else device_for(rt)
        self.cuda = self.device.type == "cuda"
        self.plan = plan if plan is not None else make_plan(cfg, DeviceCaps.detect(self.device), self.world_size)
        apply_switches(self.plan)
        self.backend = backend_for(self.device)
        if self.kind == "deepspeed" and "RANK" not in os.environ:  # plain `python`: a one-process group
            os.environ.update(
                RANK="0",
                WORLD_SIZE="1",
                LOCAL_RANK="0",
                MASTER_ADDR="127.0.0.1",
                MASTER_PORT=os.environ.get("MASTER_PORT", str(_free_port())),
            )
        self._created_group = False
        if self.kind == "deepspeed" or self.world_size > 1:
            self._created_group = init_distributed(rt, self.device, timedelta(minutes=cfg.dist_timeout))
        if self.kind == "deepspeed":
            import deepspeed

            logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
            deepspeed.init_distributed(dist_backend=self.backend)  # adopts the group made above
        self.is_main = self.rank == 0
        self.dtype = self.plan.autocast_dtype
        self.scaler = None
        self.micro = 0
        self._tags: list[tuple[str, bool]] = []  # DeepSpeed tags written: (tag, keep)

    # ------------------------------------------------------------------------------- model
    def wrap(self, model: nn.Module, param_groups: list[dict]) -> None:
        """Move ``model`` to the device and wrap it; ``cfg.optimizer`` over ``param_groups`` (``model``'s).

        Resumed weights must already be in ``model``: ZeRO clones its fp32 master copy here and
        copies it back after every step, so weights loaded later would be silently replaced.
        """
        if self.plan.sync_bn != "none":
            model = convert_sync_batchnorm(model, self.plan.sync_bn == "torch")
        model = model.to(self.device, memory_format=self.plan.model_memory_format)
        self.module = model
        optimizer = build_optimizer(self.cfg, param_groups)
        if self.kind == "deepspeed":
            import deepspeed

            self.model, self.optimizer, _, _ = deepspeed.initialize(
                model=model, optimizer=optimizer, config=self.plan.deepspeed
            )
            self.model.checkpoint_engine = _weights_only_checkpoint_engine(self.model.checkpoint_engine)
        else:
            self.optimizer = optimizer
            self.model = model
            if self.world_size > 1:
                with warnings.catch_warnings():
                    # torch 2.14 deprecates broadcast_buffers for forward_sync_buffers, which is absent from
                    # older torch (the lent GPU has 2.11); the behaviour we ask for (no per-forward broadcast,
                    # SyncBN keeps buffers equal) is the same, so the notice would only be noise on every rank
                    warnings.filterwarnings(
                        "ignore", message="`broadcast_buffers` is deprecated", category=FutureWarning
                    )
                    self.model = nn.parallel.DistributedDataParallel(
                        model, device_ids=[self.device.index] if self.cuda else None, **self.plan.ddp_kwargs
                    )
            if self.plan.grad_scaler:
                self.scaler = torch.amp.GradScaler(self.device.type)

    def to_input(self, t: torch.Tensor) -> torch.Tensor:
        """A batch tensor on the device, in the plan's memory format."""
        return t.to(self.device, non_blocking=True, memory_format=self.plan.input_memory_format)

    @property
    def param_groups(self) -> list[dict]:
        return self.optimizer.param_groups

    def _boundary(self) -> bool:
        return (self.micro + 1) % self.cfg.grad_accum == 0

    def forward(self, x1: torch.Tensor, x2: torch.Tensor):
        if self.kind == "deepspeed":  # DeepSpeed applies its torch_autocast config itself
            if self.model.bfloat16_enabled() or self.model.fp16_enabled():  # a user JSON's bf16/fp16 section
                dtype = torch.bfloat16 if self.model.bfloat16_enabled() else torch.float16
                x1, x2 = x1.to(dtype), x2.to(dtype)
            return self.model(x1, x2)
        if isinstance(self.model, nn.parallel.DistributedDataParallel):
            self.model.require_backward_grad_sync = self._boundary()  # no_sync() while accumulating
        ctx = torch.autocast(self.device.type, dtype=self.dtype) if self.dtype else nullcontext()
        with ctx:
            return self.model(x1, x2)

    def backward(self, loss: torch.Tensor) -> None:
        if self.kind == "deepspeed":
            self.model.backward(loss)  # scales by 1/grad_accum and by the loss scale itself
            return
        loss = loss / self.cfg.grad_accum
        (self.scaler.scale(loss) if self.scaler else loss).backward()

    def step(self) -> bool:
        """Call after every backward; returns True when this was an optimizer step."""
        boundary = self._boundary()
        self.micro += 1
        if self.kind == "deepspeed":
            self.model.step()
        elif boundary:
            if self.scaler:
                self.scaler.step(self.optimizer)
                self.scaler.update()
            else:
                self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        return boundary

    # ------------------------------------------------------------------------------- ranks
    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.world_size > 1:
            t = t.to(self.device)
            dist.all_reduce(t)
        return t

    def gather_objects(self, obj) -> list:
        """Every rank's ``obj``, in rank order (all ranks call this)."""
        if self.world_size == 1 or not dist.is_initialized():
            return [obj]
        out = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if dist.is_initialized():
            dist.barrier()

    def close(self) -> None:
        """Leave the process group this engine created. A one-process DeepSpeed group stays for the life of the process:
        DeepSpeed caches its groups, so a later engine in the same process (the Python API, the
        tests) must find the same group, not a destroyed one."""
        if self._created_group and dist.is_initialized() and not (self.kind == "deepspeed" and self.world_size == 1):
            dist.destroy_process_group()

    # ------------------------------------------------------------------------------- state
    def model_state(self) -> dict:
        return {k: v.detach().cpu() for k, v in self.module.state_dict().items()}

    def weights_differ(self, state: dict) -> list[str]:
        """Names of the module's tensors that differ from ``state`` (empty when all are equal)."""
        mine = self.module.state_dict()
        return [k for k, v in state.items() if k not in mine or not torch.equal(mine[k].detach().cpu().to(v.dtype), v)]

    def master_differs(self) -> list[str]:
        """Where ZeRO's fp32 master copy differs from the module's weights (empty when equal).

        ZeRO >= 1 steps its own copy and writes it back into the module after every step: a
        copy cloned from other weights than the module's would replace them at the first step.
        """
        opt = getattr(self.model, "optimizer", None) if self.kind == "deepspeed" else None
        if opt is None or not hasattr(opt, "single_partition_of_fp32_groups"):
            return []
        out = []
        for i, master in enumerate(opt.single_partition_of_fp32_groups):
            pid = dist.get_rank(group=opt.real_dp_process_group[i])
            module_part = opt.parallel_partitioned_bit16_groups[i][pid]
            if not torch.equal(master.detach().float(), module_part.detach().float()):
                out.append(f"param group {i} partition {pid}")
        return out

    def save(self, ckpt_dir: Path, state: dict, keep: bool = False, keep_last: int = 0) -> None:
        """Every rank calls this. Rank 0 writes ``last.pt`` atomically, after DeepSpeed's folder;
        with ``keep`` also a periodic ``step_*.pt`` (only the newest ``keep_last`` stay; 0 = all).

        ``state["rng"]`` gets every rank's generator states (``per_rank``), so a resume restores each
        rank's own, whatever GPUs the resumed job sees.
        """
        per_rank = self.gather_objects(capture_rank_rng(self.device))
        state = {
            **state,
            "model": self.model_state(),
            "engine": self.kind,
            "zero_stage": self.cfg.zero_stage,
            "rng": {**state.get("rng", {}), "per_rank": per_rank},
        }
        if self.kind == "deepspeed":
            tag = f"step_{state['step']:08d}"
            client = {k: state[k] for k in ("step", "epoch", "config", "arch")}
            self.model.save_checkpoint(str(ckpt_dir / DS_DIR), tag=tag, client_state=client)
            self.barrier()
            state["deepspeed_tag"] = tag
        else:
            state["optimizer"] = self.optimizer.state_dict()
            state["scaler"] = self.scaler.state_dict() if self.scaler else None
        if self.is_main:
            save_checkpoint(ckpt_dir / LAST, state)
            if keep:
                save_periodic(ckpt_dir, state["step"], keep_last)
            if self.kind == "deepspeed":  # tags no checkpoint file names any more
                prune_deepspeed_tags(ckpt_dir, keep=set(periodic_tags(ckpt_dir)) | {state["deepspeed_tag"]})
        self.barrier()

    def load(self, ckpt: dict, ckpt_dir: Path) -> str | None:
        """Restore optimizer and loss scaler (the weights are already in the module: see :meth:`wrap`).

        Returns None after a full restore, or the reason only the weights were restored (another
        engine, ZeRO stage, or rank count under ZeRO >= 1); the caller says it in one line.
        """
        why = resume_mode(ckpt, self.kind, self.cfg.zero_stage, self.world_size)
        if why is not None:
            return why
        if self.kind == "deepspeed":
            tag = ckpt["deepspeed_tag"]
            path, _ = self.model.load_checkpoint(
                str(ckpt_dir / DS_DIR), tag=tag, load_optimizer_states=True, load_lr_scheduler_states=False
            )
            if path is None:
                raise UserError(f"{ckpt_dir / DS_DIR / tag}: DeepSpeed checkpoint missing or unreadable")
            return None
        self.optimizer.load_state_dict(ckpt["optimizer"])
        if self.scaler and ckpt.get("scaler"):
            self.scaler.load_state_dict(ckpt["scaler"])
        return None
