"""Every choice that differs between a GPU and a CPU, made in one place from (device, config).

``make_plan(cfg, caps, world_size)`` is a pure function: the trainer calls it with the capabilities
of its real device (:meth:`DeviceCaps.detect`), and the tests call it with a CUDA device's
capabilities on a CPU machine, then run the resulting plan through DDP and DeepSpeed start-up and a
step. So every decision that only a GPU would exercise -- channels_last, bf16 vs fp16, the loss
scaler, which SyncBatchNorm, the DeepSpeed JSON, cudnn/TF32 switches -- is covered by the CPU suite.

Decisions and why:

- channels_last (CUDA + ``cfg.channels_last``): inputs always; the *model* only under DDP.
  ``deepspeed.initialize`` broadcasts every parameter as ``p.data.view(torch.uint8)``, which fails
  on channels_last conv weights, and ZeRO re-points parameters into flat contiguous buffers anyway.
  With channels_last inputs cuDNN still picks NHWC kernels (it follows the input's layout).
- bf16 needs native support (compute capability >= 8.0, what
  ``torch.cuda.is_bf16_supported(including_emulation=False)`` tells): on a V100/T4 torch would
  emulate it, many times slower, so training refuses and names fp16; embedding picks fp16.
- fp16 under DDP gets torch's GradScaler; DeepSpeed's autocast scales the loss itself (ZeRO-0 only).
- SyncBatchNorm when world > 1: ``nn.SyncBatchNorm`` on CUDA, the gloo all-reduce version on CPU;
  buffers are then equal on every rank by construction, so DDP's per-forward buffer broadcast is
  switched off (``broadcast_buffers=False``).
- DeepSpeed JSON: ``torch_autocast`` (fp32 master weights, BatchNorm in fp32) with
  ``"lower_precision_safe_modules": []``: otherwise ZeRO-1/2 all-reduce Conv/Linear gradients in
  bf16 while ZeRO-0 and DDP reduce fp32, and ZeRO-1 would not match ZeRO-0.
- ``cudnn.benchmark`` on (input sizes are fixed) and TF32 for fp32 matmuls/convolutions on CUDA;
  ``--deterministic``: deterministic algorithms, benchmark off, cuBLAS workspace pinned.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..core.errors import ConfigError
from ..core.runtime import DeviceCaps

DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class DevicePlan:
    device_type: str
    precision: str
    autocast_dtype: torch.dtype | None
    grad_scaler: bool
    model_memory_format: torch.memory_format
    input_memory_format: torch.memory_format
    sync_bn: str  # "none" | "torch" | "gloo"
    ddp_kwargs: dict = field(default_factory=dict)
    deepspeed: dict | None = None
    cudnn_benchmark: bool = False
    tf32: bool = False
    deterministic: bool = False
    pin_memory: bool = False
    warnings: tuple[str, ...] = ()  # one line each, printed by rank 0 at start

    def describe(self) -> str:
        fmt = "channels_last" if self.input_memory_format == torch.channels_last else "contiguous"
        bits = [self.precision, fmt]
        if self.grad_scaler:
            bits.append("GradScaler")
        if self.tf32:
            bits.append("TF32")
        bits.append("deterministic" if self.deterministic else ("cudnn.benchmark" if self.cudnn_benchmark else ""))
        return ", ".join(b for b in bits if b)


def check_precision(precision: str, caps: DeviceCaps, what: str = "--precision") -> None:
    """bf16 on a GPU without native bf16 is refused (torch would emulate it, slowly)."""
    if precision == "bf16" and not caps.bf16_native:
        major, minor = caps.capability or (0, 0)
        raise ConfigError(
            f"{what} bf16: {caps.name} (compute capability {major}.{minor}) has no native bf16 "
            f"(needs >= 8.0; torch would emulate it many times slower); use {what} fp16 "
            f"(autocast + loss scaling) or fp32"
        )


def deepspeed_config(cfg, world_size: int) -> dict:
    """DeepSpeed JSON: generated from the flags, or the user's file with the batch keys checked."""
    ds = {
        "train_micro_batch_size_per_gpu": cfg.batch_size,
        "gradient_accumulation_steps": cfg.grad_accum,
        "train_batch_size": cfg.batch_size * cfg.grad_accum * world_size,
        "gradient_clipping": 0.0,  # SimSiam does not clip (DeepSpeed >= 0.19.3 defaults to 1.0)
        "zero_optimization": {"stage": cfg.zero_stage},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    # bf16/fp16 as autocast with fp32 master weights, like torch.amp under DDP. DeepSpeed's own
    # "bf16"/"fp16" sections cast every parameter, BatchNorm's included, to half precision; a user
    # JSON may still ask for them (inputs are then cast to match). No "lower precision safe" modules:
    # gradients are reduced in fp32 under every ZeRO stage, as under DDP.
    if cfg.precision in ("bf16", "fp16"):
        ds["torch_autocast"] = {
            "enabled": True,
            "dtype": {"bf16": "bfloat16", "fp16": "float16"}[cfg.precision],
            "lower_precision_safe_modules": [],
        }
    if cfg.deepspeed_config:
        path = Path(cfg.deepspeed_config)
        try:
            user = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise ConfigError(f"{path}: cannot read DeepSpeed config ({exc})") from None
        for key in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size"):
            if key in user and user[key] != ds[key]:
                raise ConfigError(
                    f"{path}: {key} = {user[key]} contradicts the flags ({ds[key]}); "
                    f"set the batch with --batch-size/--grad-accum"
                )
        zero = user.get("zero_optimization")
        if zero is not None:  # ds.update(user) would silently switch the ZeRO stage behind --zero-stage
            stage = zero.get("stage", 0) if isinstance(zero, dict) else None
            if stage != cfg.zero_stage:
                raise ConfigError(
                    f"{path}: zero_optimization.stage = {stage!r} contradicts --zero-stage {cfg.zero_stage}; "
                    f"set the stage with --zero-stage (0 or 1) and leave it out of the JSON, or make them equal"
                )
        ds.update(user)
    return ds


def deepspeed_warnings(ds: dict | None) -> tuple[str, ...]:
    """One-line warnings about a DeepSpeed JSON that undoes the generated config's fixes."""
    if not ds:
        return ()
    ac = ds.get("torch_autocast")
    if isinstance(ac, dict) and ac.get("enabled") and ac.get("lower_precision_safe_modules") != []:
        return (
            "train: warning: the DeepSpeed JSON's torch_autocast section replaces the generated one without "
            '"lower_precision_safe_modules": []: ZeRO >= 1 then all-reduces Conv/Linear gradients in '
            f"{ac.get('dtype', 'bfloat16')} (DDP and ZeRO-0 reduce fp32); add that key to keep fp32 reduces",
        )
    return ()


def make_plan(cfg, caps: DeviceCaps, world_size: int) -> DevicePlan:
    """The device plan for training ``cfg`` on a device with ``caps`` in a world of ``world_size``."""
    check_precision(cfg.precision, caps)
    if cfg.precision == "fp16" and cfg.engine == "deepspeed" and cfg.zero_stage != 0:
        # Re-checked against DeepSpeed 0.19.8 (runtime/zero/stage_1_and_2.py): ZeRO-1/2 now build a
        # torch GradScaler for fp16 torch_autocast, but it unscales and checks inf/NaN on this rank's
        # own fp32 partition only and calls update() once per param group, with no all-reduce of the
        # overflow flag: ranks can skip different steps and go on with different loss scales, whose
        # scaled gradients ZeRO then averages. ZeRO-0 uses one engine-level GradScaler over whole grads.
        raise ConfigError(
            "--precision fp16 with --engine deepspeed needs --zero-stage 0 (DeepSpeed 0.19's ZeRO-1 fp16 "
            "autocast scaler checks overflow per rank partition, without agreement across ranks); use bf16 "
            "for ZeRO-1"
        )
    cuda = caps.type == "cuda"
    deterministic = bool(getattr(cfg, "deterministic", False))
    nhwc = cuda and cfg.channels_last
    fmt = torch.channels_last if nhwc else torch.contiguous_format
    ds = deepspeed_config(cfg, world_size) if cfg.engine == "deepspeed" else None
    return DevicePlan(
        device_type=caps.type,
        precision=cfg.precision,
        autocast_dtype=DTYPES[cfg.precision],
        grad_scaler=cfg.precision == "fp16" and cfg.engine == "ddp",
        model_memory_format=fmt if cfg.engine == "ddp" else torch.contiguous_format,
        input_memory_format=fmt,
        sync_bn=("torch" if cuda else "gloo") if world_size > 1 and getattr(cfg, "sync_batchnorm", True) else "none",
        ddp_kwargs={"broadcast_buffers": False} if world_size > 1 else {},
        deepspeed=ds,
        cudnn_benchmark=cuda and not deterministic,
        tf32=cuda,
        deterministic=deterministic,
        pin_memory=cuda,
        warnings=deepspeed_warnings(ds),
    )


def apply_switches(plan: DevicePlan) -> None:
    """Set torch's process-wide switches the plan asks for (harmless on a CPU-only build)."""
    torch.backends.cudnn.benchmark = plan.cudnn_benchmark
    torch.backends.cudnn.deterministic = plan.deterministic
    torch.backends.cuda.matmul.allow_tf32 = plan.tf32
    torch.backends.cudnn.allow_tf32 = plan.tf32
    if plan.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS needs it to be deterministic
    torch.use_deterministic_algorithms(plan.deterministic, warn_only=False)
