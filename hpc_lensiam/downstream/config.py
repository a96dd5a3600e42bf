"""Typed configs of the downstream commands: ``export``, ``finetune``, ``predict`` and ``compare``.

Each field is a flag (:func:`hpc_lensiam.core.config.option`): its default, help and allowed values
are written here once; ``hpc-lensiam config COMMAND`` prints them as YAML that ``--config`` reads.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..core.config import option
from ..core.errors import ConfigError

FORMATS = ("pt", "safetensors")


def task_names() -> tuple:
    from .tasks import TASKS  # the registry: a task added there is a choice here

    return tuple(TASKS)


def archs() -> tuple:
    from ..models.backbones import BACKBONES  # the live registry (torch: imported only when the choices are needed)

    return tuple(BACKBONES)


@dataclass
class ExportConfig:
    """``hpc-lensiam export``: the backbone as a stock torchvision state_dict."""

    checkpoint: str | None = option(None, "RUN, RUN/checkpoints/last.pt or a DeepSpeed folder", required=True)
    out: str | None = option(None, "the exported weights file", required=True)
    format: str = option("pt", "file format", choices=FORMATS)
    arch: str | None = option(None, "expected arch: refuse a checkpoint of another one", choices=archs)


@dataclass
class FinetuneConfig:
    """``hpc-lensiam finetune``: regress a lens parameter (or find lenses) on an independent set."""

    backbone: str | None = option(None, "exported backbone, a torchvision weights file, or 'none'", required=True)
    train: str | None = option(None, "labelled shard folder to train the head on", required=True)
    test: str | None = option(None, "labelled shard folder to test on", required=True)
    task: str = option(
        "regress",
        "regress a lens parameter, or classify (--target is_lens: lens finding, survey family)",
        choices=task_names,
    )
    target: str = option("theta_E", "the label to predict (a lens parameter, or is_lens)")
    n_train: int = option(1000, "labelled training images used (>= 5)")
    n_test: int = option(1000, "test images used (>= 2)")
    epochs: int = option(30, "passes over the training images (>= 1)")
    batch_size: int = option(64, "images per step")
    lr: float | None = option(None, "learning rate (default: the task's)")
    val_fraction: float = option(0.2, "fraction of the training images held out for early stopping")
    weight_decay: float = option(1e-4, "AdamW weight decay")
    n_boot: int = option(1000, "bootstrap resamples of the test metrics")
    seed: int | None = option(None, "one seed (default 0)")
    seeds: str | None = option(
        None, "run the recipe once per seed (e.g. 0,1,2): per-seed numbers and mean +- sd", metavar="S,S,..."
    )
    resume: bool = option(False, "with --seeds: keep the seeds already in --json")
    freeze_backbone: bool = option(False, "train the linear head only (linear probe)")
    arch: str | None = option(
        None, "arch for --backbone none (default resnet101); else checked against the file", choices=archs
    )
    json: str | None = option(None, "the report as JSON")
    verify: bool = option(False, "check every shard's sha256 against the manifest first")
    save_model: str | None = option(
        None,
        "save the fine-tuned network for `predict` (with --seeds: M.seedS.safetensors per seed)",
        metavar="M.safetensors",
    )

    def validate(self, where: str) -> None:
        for name, lo in (("n_train", 5), ("n_test", 2), ("epochs", 1), ("batch_size", 1), ("n_boot", 1)):
            if getattr(self, name) < lo:
                raise ConfigError(f"{where}.{name}: must be >= {lo}, got {getattr(self, name)}")
        if not 0 < self.val_fraction < 1:
            raise ConfigError(f"{where}.val_fraction: must be in (0, 1), got {self.val_fraction}")
        if self.lr is not None and not (self.lr > 0 and math.isfinite(self.lr)):
            raise ConfigError(f"{where}.lr: must be a finite number > 0, got {self.lr}")
        if self.weight_decay < 0:
            raise ConfigError(f"{where}.weight_decay: must be >= 0, got {self.weight_decay}")
        if self.seed is not None and self.seed < 0:
            raise ConfigError(f"{where}.seed: must be >= 0, got {self.seed}")
        if self.seeds is None and self.resume:
            raise ConfigError(f"{where}.resume: only with --seeds (it keeps the seeds already in --json)")
        if self.seeds is not None and self.seed is not None:
            raise ConfigError(f"{where}.seed: give one of --seed and --seeds")
        if self.seeds is not None:
            self.seed_list()

    def seed_list(self) -> list[int]:
        """``seeds`` "0,1,2" -> [0, 1, 2]: distinct integers, at least one."""
        try:
            seeds = [int(s) for s in str(self.seeds).split(",") if s.strip() != ""]
        except ValueError:
            seeds = []
        if not seeds or len(set(seeds)) != len(seeds):
            raise ConfigError(f"--seeds: expected distinct comma-separated integers such as 0,1,2, got {self.seeds!r}")
        return seeds


@dataclass
class PredictConfig:
    """``hpc-lensiam predict``: fine-tuned models (finetune --save-model) applied to shard sets."""

    model: list[str] = option(
        help="saved model(s) of one task: several = an ensemble", required=True, default_factory=list
    )
    data: list[str] = option(
        help="shard set(s) to predict (simulated or ingested)", required=True, default_factory=list
    )
    out: str | None = option(None, "catalogue: .csv or .fits, one row per image", required=True)
    batch_size: int = option(128, "images per forward pass")
    allow_grid_mismatch: bool = option(
        False, "predict data on another pixel grid than the models' training data (refused by default)"
    )
    verify: bool = option(False, "check every shard's sha256 against the manifest first")
    n_boot: int = option(1000, "bootstrap resamples of the metrics of labelled sets (0: no intervals)")

    def validate(self, where: str) -> None:
        if self.batch_size < 1:
            raise ConfigError(f"{where}.batch_size: must be >= 1, got {self.batch_size}")
        if self.n_boot < 0:
            raise ConfigError(f"{where}.n_boot: must be >= 0 (0: no intervals), got {self.n_boot}")
        if len(set(map(str, self.model))) != len(self.model):
            raise ConfigError(f"{where}.model: the same file given twice (an ensemble counts each model once)")


@dataclass
class CompareConfig:
    """``hpc-lensiam compare``: paired, seed-aware difference of two finetune reports on one test set."""

    a: str | None = option(
        None,
        "finetune --json report of backbone A (one seed or --seeds); several pretraining seeds of A: "
        "A_s0.json,A_s1.json (pretraining and fine-tuning seeds are then both resampled)",
        positional=True,
        required=True,
    )
    b: str | None = option(
        None,
        "finetune --json report(s) of backbone B, same test set and fine-tuning seeds: one per report "
        "of A (paired in order), or one (e.g. random init)",
        positional=True,
        required=True,
    )
    json: str | None = option(None, "write the comparison as JSON here too")
    n_boot: int = option(2000, "bootstrap resamples")
    seed: int = option(0, "bootstrap seed")

    def validate(self, where: str) -> None:
        if self.n_boot < 100:
            raise ConfigError(f"{where}.n_boot: must be >= 100 for a 95% interval, got {self.n_boot}")
        if self.seed < 0:
            raise ConfigError(f"{where}.seed: must be >= 0, got {self.seed}")
