"""The one place that differs between DDP and DeepSpeed, and the only place with rank logic.

``Engine(cfg)`` joins the process group torchrun describes in the environment (NCCL on CUDA, gloo on
CPU; a plain ``python`` run is a single process), then offers one small interface to the loop::

    engine.wrap(model, param_groups)      SyncBatchNorm (world > 1), device, DDP | deepspeed.initialize
    engine.forward(x1, x2)                under the precision's autocast
    engine.backward(loss); engine.step()  loss scaling and gradient accumulation; step() -> boundary?
    engine.param_groups                   for the lr schedule
    engine.save(ckpt_dir, state, keep)    last.pt from rank 0 (+ DeepSpeed's folder from every rank)
    engine.load(ckpt, ckpt_dir)           resume
    engine.all_reduce_sum(t), rank, world_size, is_main, device, close()
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import warnings
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..errors import ConfigError, UserError
from .checkpoint import DS_DIR, LAST, save_checkpoint

DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


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
        var = (stats[C:2 * C] / n - mean * mean).clamp(min=0)
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
        out = GlooSyncBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                                module.track_running_stats)
        if module.affine:   # the same Parameter objects: optimizer groups built before stay valid
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


def deepspeed_config(cfg, world_size: int) -> dict:
    """DeepSpeed JSON: generated from the flags, or the user's file with the batch keys checked."""
    ds = {"train_micro_batch_size_per_gpu": cfg.batch_size,
          "gradient_accumulation_steps": cfg.grad_accum,
          "train_batch_size": cfg.batch_size * cfg.grad_accum * world_size,
          "gradient_clipping": 0.0,            # SimSiam does not clip (DeepSpeed >= 0.19.3 defaults to 1.0)
          "zero_optimization": {"stage": cfg.zero_stage},
          "zero_allow_untested_optimizer": True,
          "steps_per_print": 10 ** 9, "wall_clock_breakdown": False}
    # bf16/fp16 as autocast with fp32 master weights, like torch.amp under DDP. DeepSpeed's own
    # "bf16"/"fp16" sections cast every parameter, BatchNorm's included, to half precision; a user
    # JSON may still ask for them (inputs are then cast to match).
    if cfg.precision in ("bf16", "fp16"):
        ds["torch_autocast"] = {"enabled": True, "dtype": {"bf16": "bfloat16", "fp16": "float16"}[cfg.precision]}
    if cfg.deepspeed_config:
        path = Path(cfg.deepspeed_config)
        try:
            user = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise ConfigError(f"{path}: cannot read DeepSpeed config ({exc})") from None
        for key in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size"):
            if key in user and user[key] != ds[key]:
                raise ConfigError(f"{path}: {key} = {user[key]} contradicts the flags ({ds[key]}); "
                                  f"set the batch with --batch-size/--grad-accum")
        ds.update(user)
    return ds


class Engine:
    """DDP (``--engine ddp``) or DeepSpeed (``--engine deepspeed``) behind one interface."""

    def __init__(self, cfg):
        self.cfg, self.kind = cfg, cfg.engine
        self.cuda = torch.cuda.is_available()
        self.world_size = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.device = torch.device(f"cuda:{self.local_rank}" if self.cuda else "cpu")
        self.backend = "nccl" if self.cuda else "gloo"
        if self.cuda:
            torch.cuda.set_device(self.device)
        if cfg.precision == "fp16" and self.kind == "deepspeed" and cfg.zero_stage != 0:
            raise ConfigError("--precision fp16 with --engine deepspeed needs --zero-stage 0 "
                              "(DeepSpeed's autocast loss scaler is ZeRO-0 only); use bf16 for ZeRO-1")
        if self.kind == "deepspeed":
            import deepspeed
            logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
            if "RANK" not in os.environ:   # plain `python`: a one-process group for DeepSpeed
                os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                                  MASTER_PORT=os.environ.get("MASTER_PORT", str(_free_port())))
            deepspeed.init_distributed(dist_backend=self.backend)
        elif self.world_size > 1:
            dist.init_process_group(self.backend)
        self.is_main = self.rank == 0
        self.dtype = DTYPES[cfg.precision]
        self.scaler = None
        self.micro = 0
        self._tags: list[tuple[str, bool]] = []   # DeepSpeed tags written: (tag, keep)

    # ------------------------------------------------------------------------------- model
    def wrap(self, model: nn.Module, param_groups: list[dict]) -> None:
        """Move ``model`` to the device and wrap it; SGD over ``param_groups`` (``model``'s parameters)."""
        if self.world_size > 1:
            model = convert_sync_batchnorm(model, self.cuda)
        model = model.to(self.device)
        if self.cuda and self.cfg.channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.module = model
        optimizer = torch.optim.SGD(param_groups, lr=param_groups[0]["lr"], momentum=self.cfg.momentum,
                                    weight_decay=self.cfg.weight_decay)
        if self.kind == "deepspeed":
            import deepspeed
            self.model, self.optimizer, _, _ = deepspeed.initialize(
                model=model, optimizer=optimizer, config=deepspeed_config(self.cfg, self.world_size))
        else:
            self.optimizer = optimizer
            self.model = model
            if self.world_size > 1:
                self.model = nn.parallel.DistributedDataParallel(
                    model, device_ids=[self.local_rank] if self.cuda else None)
            if self.cfg.precision == "fp16":
                self.scaler = torch.amp.GradScaler(self.device.type)

    @property
    def param_groups(self) -> list[dict]:
        return self.optimizer.param_groups

    def _boundary(self) -> bool:
        return (self.micro + 1) % self.cfg.grad_accum == 0

    def forward(self, x1: torch.Tensor, x2: torch.Tensor):
        if self.kind == "deepspeed":   # DeepSpeed applies its torch_autocast config itself
            if self.model.bfloat16_enabled() or self.model.fp16_enabled():   # a user JSON's bf16/fp16 section
                dtype = torch.bfloat16 if self.model.bfloat16_enabled() else torch.float16
                x1, x2 = x1.to(dtype), x2.to(dtype)
            return self.model(x1, x2)
        if isinstance(self.model, nn.parallel.DistributedDataParallel):
            self.model.require_backward_grad_sync = self._boundary()   # no_sync() while accumulating
        ctx = torch.autocast(self.device.type, dtype=self.dtype) if self.dtype else nullcontext()
        with ctx:
            return self.model(x1, x2)

    def backward(self, loss: torch.Tensor) -> None:
        if self.kind == "deepspeed":
            self.model.backward(loss)   # scales by 1/grad_accum and by the loss scale itself
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

    def barrier(self) -> None:
        if dist.is_initialized():
            dist.barrier()

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()

    # ------------------------------------------------------------------------------- state
    def model_state(self) -> dict:
        return {k: v.detach().cpu() for k, v in self.module.state_dict().items()}

    def save(self, ckpt_dir: Path, state: dict, keep: bool = False) -> None:
        """Every rank calls this. Rank 0 writes ``last.pt`` atomically, after DeepSpeed's folder."""
        state = {**state, "model": self.model_state(), "engine": self.kind}
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
        if self.kind == "deepspeed":
            self._tags.append((state["deepspeed_tag"], keep))
            if self.is_main:   # the previous tag, unless periodic, is superseded by the new last.pt
                for old, kept in self._tags[:-1]:
                    if not kept:
                        shutil.rmtree(ckpt_dir / DS_DIR / old, ignore_errors=True)
            self._tags = [t for t in self._tags[:-1] if t[1]] + self._tags[-1:]
        self.barrier()

    def load(self, ckpt: dict, ckpt_dir: Path) -> None:
        """Restore model, optimizer and loss scaler from a checkpoint dict (``last.pt``)."""
        saved = ckpt.get("engine", "ddp")
        if self.kind == "deepspeed" and saved == "deepspeed":
            tag = ckpt["deepspeed_tag"]
            path, _ = self.model.load_checkpoint(str(ckpt_dir / DS_DIR), tag=tag, load_optimizer_states=True,
                                                 load_lr_scheduler_states=False)
            if path is None:
                raise UserError(f"{ckpt_dir / DS_DIR / tag}: DeepSpeed checkpoint missing or unreadable")
            self._tags = [(tag, ckpt["step"] % self.cfg.ckpt_every == 0)]
            return
        self.module.load_state_dict(ckpt["model"])
        if saved != self.kind:
            if self.is_main:
                warnings.warn(f"resuming a {saved} checkpoint with --engine {self.kind}: model weights and "
                              f"schedule restored, optimizer momentum starts afresh", stacklevel=1)
            return
        self.optimizer.load_state_dict(ckpt["optimizer"])
        if self.scaler and ckpt.get("scaler"):
            self.scaler.load_state_dict(ckpt["scaler"])
