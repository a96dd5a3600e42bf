"""The training command's typed config (``TrainConfig``)."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, ClassVar

from ..core.errors import ConfigError, UserError

# Keys and flags that were renamed: the old spelling is refused naming the new one (an older run's own
# RUN/config.yaml and checkpoints are translated instead, :func:`translate_saved`).
RENAMED = {
    "mode": ("--views lens|standard", "views: lens|standard"),
    "ema_tau_base": ("--method-param ema_tau_base=VALUE", "method_params: {ema_tau_base: VALUE}"),
    "temperature": ("--method-param temperature=VALUE", "method_params: {temperature: VALUE}"),
    "vicreg_sim_coeff": ("--method-param sim_coeff=VALUE", "method_params: {sim_coeff: VALUE}"),
    "vicreg_std_coeff": ("--method-param std_coeff=VALUE", "method_params: {std_coeff: VALUE}"),
    "vicreg_cov_coeff": ("--method-param cov_coeff=VALUE", "method_params: {cov_coeff: VALUE}"),
}
# an older run's flat method keys: (the method that read it, its name in that method's ``Params``)
OLD_METHOD_KEYS = {
    "ema_tau_base": ("byol", "ema_tau_base"),
    "temperature": ("simclr", "temperature"),
    "vicreg_sim_coeff": ("vicreg", "sim_coeff"),
    "vicreg_std_coeff": ("vicreg", "std_coeff"),
    "vicreg_cov_coeff": ("vicreg", "cov_coeff"),
}


def _archs() -> tuple:
    from ..models.backbones import BACKBONES  # the live registry: an entry added in-process is a choice

    return tuple(BACKBONES)


def _views() -> tuple:
    from ..models.methods import VIEWS

    return tuple(VIEWS)


def _methods() -> tuple:
    from ..models.methods import METHODS

    return tuple(METHODS)


def _optimizers() -> tuple:
    from .optim import OPTIMIZERS

    return tuple(OPTIMIZERS)


# Allowed values of TrainConfig's fields: the flags show them, from_dict checks them.
TRAIN_CHOICES = {
    "views": _views,
    "engine": ("ddp", "deepspeed"),
    "precision": ("fp32", "bf16", "fp16"),
    "arch": _archs,
    "method": _methods,
    "optimizer": _optimizers,
    "lr_scaling": ("linear", "sqrt"),
}


@dataclass
class TrainConfig:
    """SimSiam / LenSiam pretraining (the LenSiam paper's recipe). CLI flags override YAML values.

    The defaults below are SimSiam's recipe on a ResNet; ``method`` and ``arch`` choose another
    recipe (:func:`hpc_lensiam.models.methods.recipe`, docs/methods.md), which
    :func:`hpc_lensiam.train.loop.train_config` applies under the YAML file and the flags.
    """

    data: str = ""
    out: str = "runs/pretrain"
    views: str = "lens"  # lens: the stored lens pair; standard: two augmentations of one image (every method)
    method: str = "simsiam"  # simsiam | byol | vicreg | simclr (docs/methods.md)
    # the method's own hyperparameters (its ``Params``: BYOL ema_tau_base, SimCLR temperature, VICReg
    # sim/std/cov_coeff); YAML ``method_params:``, flag ``--method-param KEY=VALUE``
    method_params: dict[str, Any] = field(default_factory=dict, metadata={"flag": False})
    optimizer: str = "sgd"  # sgd | lars | adamw (the method's/backbone's recipe sets it)
    lr_scaling: str = "linear"  # linear: lr = base_lr x batch/256; sqrt: base_lr x sqrt(batch)
    engine: str = "ddp"  # ddp | deepspeed
    precision: str = "fp32"  # fp32 | bf16 | fp16
    arch: str = "resnet101"  # resnet18 | resnet50 | resnet101 | vit_{tiny,small,base}_p{8,10,11}
    zero_init_residual: bool = True  # SimSiam reference init; false for short runs (docs/results.md)
    batch_size: int = 64  # per rank
    grad_accum: int = 1
    epochs: int = 100
    max_steps: int | None = None  # stop early (tests, smoke runs)
    base_lr: float = 0.03  # lr = base_lr * global_batch / 256
    momentum: float = 0.9
    weight_decay: float = 5e-4
    warmup_epochs: float = 10.0
    fix_pred_lr: bool = True
    proj_dim: int = 2048  # projector output width
    proj_hidden_dim: int | None = None  # projector hidden width (None: proj_dim; SimSiam uses proj_dim)
    pred_dim: int = 512  # predictor hidden width (SimSiam, BYOL)
    workers: int = 2
    loader_timeout: float = 600.0  # s without a batch from the loader's workers, then a one-line error (no hang)
    shuffle_buffer: int = 1000
    seed: int = 0
    log_every: int = 10
    ckpt_every: int = 500  # steps between periodic checkpoints (plus last.pt)
    keep_last: int = 3  # periodic step_*.pt kept (newest); 0 keeps all
    deterministic: bool = False  # deterministic algorithms, cudnn.benchmark off (docs/gpu.md)
    probe_data: str | None = None  # held-out shards: ridge R^2 of theta_E, e1, gamma every probe_every
    probe_every: int = 500  # steps between lens-physics probes (with probe_data)
    probe_samples: int = 256  # samples of probe_data embedded per probe (first ones, manifest order)
    channels_last: bool = True  # CUDA only
    sync_batchnorm: bool = True  # SyncBatchNorm across ranks (world size > 1); false: per-rank BN
    deepspeed_config: str | None = None
    zero_stage: int = 0
    skip_bad_samples: bool = False
    dist_timeout: float = 30.0  # minutes a collective waits for a silent rank before the run stops naming it
    verify: bool = False  # sha256 of every shard against the manifest before training
    online_epoch_samples: int = 100_000  # --data online: samples (pairs or images) per epoch, all ranks
    online_compile: bool = False  # --data online: torch.compile the ray shooting (minutes once, then fast)

    # The flags' help and allowed values (core.config.option's metadata, kept beside the field list).
    FLAG_META: ClassVar[dict] = {
        "data": {"help": "shard folder, or online[:FAMILY_OR_CONFIG] (batches rendered on the device)"},
        "out": {"help": "run folder: checkpoints, logs, config.yaml"},
        "views": {"help": "lens: the stored lens pair; standard: two standard augmentations of one image"},
        "method": {"help": "self-supervised method (docs/methods.md); sets its recipe's defaults"},
        "method_params": {"help": "the method's own hyperparameters (YAML method_params:; --method-param KEY=VALUE)"},
        "optimizer": {"help": "the method's/backbone's recipe sets it"},
        "lr_scaling": {"help": "linear: lr = base_lr x batch/256; sqrt: base_lr x sqrt(batch)"},
        "engine": {"help": "distributed engine: torch DDP or DeepSpeed"},
        "precision": {"help": "training precision (docs/gpu.md)"},
        "arch": {"help": "backbone (the method's recipe may depend on it)"},
        "batch_size": {"help": "per rank"},
        "max_steps": {"help": "stop early (tests, smoke runs)"},
        "base_lr": {"help": "lr = base_lr x global_batch / 256 (lr_scaling linear)"},
        "loader_timeout": {"help": "seconds without a batch from the loader's workers, then a one-line error"},
        "ckpt_every": {"help": "steps between periodic checkpoints (plus last.pt)"},
        "keep_last": {"help": "periodic step_*.pt kept (newest); 0 keeps all"},
        "probe_data": {"help": "held-out shards: ridge R^2 of theta_E, e1, gamma every --probe-every steps"},
        "dist_timeout": {"help": "minutes a collective waits for a silent rank before the run stops naming it"},
        "online_epoch_samples": {"help": "--data online: samples (pairs or images) per epoch, all ranks"},
        "zero_init_residual": {"help": "zero-init each residual block's last BN (SimSiam); off for short runs"},
        "grad_accum": {"help": "micro-batches per optimizer step"},
        "epochs": {"help": "passes over the data"},
        "momentum": {"help": "SGD/LARS momentum"},
        "weight_decay": {"help": "weight decay"},
        "warmup_epochs": {"help": "linear lr warm-up, then cosine decay"},
        "fix_pred_lr": {"help": "SimSiam: the predictor keeps the base lr (no decay)"},
        "proj_dim": {"help": "projector output width"},
        "proj_hidden_dim": {"help": "projector hidden width (default: proj_dim)"},
        "pred_dim": {"help": "predictor hidden width (SimSiam, BYOL)"},
        "workers": {"help": "loader worker processes per rank"},
        "shuffle_buffer": {"help": "samples in the loader's shuffle buffer"},
        "seed": {"help": "random seed of the run"},
        "log_every": {"help": "steps between log lines"},
        "deterministic": {"help": "deterministic algorithms, cudnn.benchmark off (docs/gpu.md)"},
        "probe_every": {"help": "steps between lens-physics probes (with --probe-data)"},
        "probe_samples": {"help": "samples of --probe-data embedded per probe (first ones, manifest order)"},
        "channels_last": {"help": "channels-last memory format (CUDA only)"},
        "sync_batchnorm": {"help": "SyncBatchNorm across ranks (world size > 1); off: per-rank BN"},
        "deepspeed_config": {"help": "DeepSpeed JSON config (--engine deepspeed)"},
        "zero_stage": {"help": "DeepSpeed ZeRO stage (0 or 1)"},
        "skip_bad_samples": {"help": "skip undecodable samples with a warning instead of stopping"},
        "verify": {"help": "sha256 of every shard against the manifest before training"},
        "online_compile": {"help": "--data online: torch.compile the ray shooting (minutes once, then fast)"},
    }
    for _name, _allowed in TRAIN_CHOICES.items():
        FLAG_META[_name] = {**FLAG_META.get(_name, {}), "choices": _allowed}
    del _name, _allowed

    def validate(self, where: str) -> None:
        from ..models.methods import method_params

        for name, allowed in TRAIN_CHOICES.items():
            allowed = allowed() if callable(allowed) else allowed
            if getattr(self, name) not in allowed:
                raise ConfigError(f"{where}.{name}: {getattr(self, name)!r} is not one of {', '.join(allowed)}")
        method_params(self.method, self.method_params, f"{where}.method_params")
        for name in (
            "batch_size",
            "grad_accum",
            "epochs",
            "log_every",
            "ckpt_every",
            "proj_dim",
            "pred_dim",
            "probe_every",
            "probe_samples",
            "online_epoch_samples",
        ):
            if getattr(self, name) < 1:
                raise ConfigError(f"{where}.{name}: must be >= 1, got {getattr(self, name)}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ConfigError(f"{where}.max_steps: must be >= 1")
        if self.keep_last < 0:
            raise ConfigError(f"{where}.keep_last: must be >= 0 (0 keeps every periodic checkpoint)")
        if self.workers < 0 or self.base_lr <= 0 or self.warmup_epochs < 0:
            raise ConfigError(f"{where}: workers >= 0, base_lr > 0 and warmup_epochs >= 0 expected")
        if not 0.0 <= self.momentum < 1.0:
            raise ConfigError(f"{where}.momentum: {self.momentum} is not in [0, 1)")
        if self.weight_decay < 0:
            raise ConfigError(f"{where}.weight_decay: must be >= 0, got {self.weight_decay}")
        if self.seed < 0:
            raise ConfigError(f"{where}.seed: must be >= 0, got {self.seed}")
        if self.shuffle_buffer < 1:
            raise ConfigError(f"{where}.shuffle_buffer: must be >= 1, got {self.shuffle_buffer}")
        if not self.loader_timeout > 0:
            raise ConfigError(f"{where}.loader_timeout: must be > 0 seconds, got {self.loader_timeout}")
        if self.proj_hidden_dim is not None and self.proj_hidden_dim < 1:
            raise ConfigError(f"{where}.proj_hidden_dim: must be >= 1, got {self.proj_hidden_dim}")
        if self.zero_stage not in (0, 1):
            raise ConfigError(f"{where}.zero_stage: expected 0 or 1 (ZeRO buys nothing for ResNet101)")
        if not self.dist_timeout > 0:
            raise ConfigError(f"{where}.dist_timeout: must be > 0 minutes, got {self.dist_timeout}")
        if self.engine == "deepspeed" and self.zero_stage >= 1 and self.optimizer == "lars":
            # ZeRO-1 flattens each param group into one fp32 partition and steps the optimizer on that
            # flat tensor: LARS then computes one trust ratio for the whole partition, not per layer
            # (measured: one step moves conv1 by 5.6e-2 and the block convs by 0, where ZeRO-0 moves
            # every layer by lr x eta). The byol, simclr and vicreg recipes use LARS.
            raise ConfigError(
                f"{where}.zero_stage: --zero-stage {self.zero_stage} with --optimizer lars is refused: ZeRO >= 1 "
                f"flattens each parameter group into one partition, so LARS would compute one trust ratio for "
                f"all layers instead of one per layer; use --zero-stage 0 (or --engine ddp) with LARS, or "
                f"--optimizer sgd/adamw under ZeRO-1"
            )
        if self.grad_accum > 1 and self.method in ("simclr", "vicreg"):
            # the lr would be scaled for grad_accum x the batch, while SimCLR's negatives, VICReg's
            # variance/covariance terms and BatchNorm only ever see one micro-batch
            raise ConfigError(
                f"{where}.grad_accum: --grad-accum {self.grad_accum} with --method {self.method} is refused: the "
                f"lr would be scaled for a {self.grad_accum}x larger batch, but "
                f"{'the negatives' if self.method == 'simclr' else 'the variance and covariance terms'} and "
                f"BatchNorm see one micro-batch of {self.batch_size} per rank; use --grad-accum 1 and raise "
                f"--batch-size or the number of ranks"
            )

    def resolved(self) -> TrainConfig:
        """This config with ``method_params`` complete (the method's defaults filled): what a run saves
        in RUN/config.yaml and its checkpoints, and what ``--resume`` compares."""
        from ..core.config import to_dict
        from ..models.methods import method_params

        return replace(self, method_params=to_dict(method_params(self.method, self.method_params)))


def refuse_renamed(data: dict, where: str, flags: bool = False) -> None:
    """A renamed key in ``data`` (a YAML file's, or the flags'): one line naming the new spelling."""
    for old, (flag, key) in RENAMED.items():
        if old in data:
            if flags:
                raise UserError(f"--{old.replace('_', '-')} was renamed: use {flag}")
            raise ConfigError(f"{where}: key {old!r} was renamed: use {key}")


def translate_saved(config: dict) -> dict:
    """An older run's saved config (RUN/config.yaml, a checkpoint's ``config``) in today's keys:
    ``mode: lensiam|simsiam`` -> ``views: lens|standard``, the flat method keys -> ``method_params``
    (the chosen method's; the others were unused). A current config comes back unchanged."""
    from ..models.methods import OLD_MODE_VIEWS

    if not any(k in config for k in RENAMED):
        return config
    new = dict(config)
    if "mode" in new:
        mode = new.pop("mode")
        new.setdefault("views", OLD_MODE_VIEWS.get(mode, mode))
    params = dict(new.get("method_params") or {})
    for old, (method, key) in OLD_METHOD_KEYS.items():
        if old in new:
            value = new.pop(old)
            if new.get("method", "simsiam") == method:
                params.setdefault(key, value)
    new["method_params"] = params
    return new


def parse_method_params(items: list[str] | None) -> dict | None:
    """``--method-param KEY=VALUE`` (repeatable) as a mapping; VALUE is read as YAML (0.99, true, text)."""
    import yaml

    if not items:
        return None
    out = {}
    for item in items:
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise UserError(f"--method-param: expected KEY=VALUE (e.g. temperature=0.2), got {item!r}")
        try:
            out[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError:
            raise UserError(f"--method-param {item}: VALUE is not a number, true/false or text") from None
    return out
