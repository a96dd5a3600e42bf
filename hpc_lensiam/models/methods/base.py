"""What every SSL method shares: the online encoder with its projector, an MLP head, a gather.

A method is an ``nn.Module`` with

- ``encoder``: the backbone whose head attribute (``fc``/``head``, :mod:`..backbones`) is the
  projector, so ``encoder.*`` minus ``encoder.<head>.*`` is the exported backbone for every method;
- ``forward(x1, x2)``: a tuple of tensors (run under DDP/DeepSpeed and autocast by the engine);
- ``loss(*outputs) -> (loss, z)``: the scalar loss in fp32 and the online projection ``z`` of view 1
  (detached) for the collapse monitor; collectives the loss needs (a global batch) happen here;
- ``param_groups(lr, fix_pred_lr)``: the optimizer's groups (the predictor may keep its lr);
- ``after_step(step, total_steps)``: a hook after each optimizer step (BYOL's EMA target update);
- ``recipe``: the paper's shared training settings (optimizer, lr, widths) as TrainConfig defaults,
  applied under YAML and flags;
- ``Params``: a frozen dataclass of the method's OWN hyperparameters (BYOL's EMA, SimCLR's
  temperature, VICReg's weights), each default written there once, checked by its ``validate``;
  the run sets them under ``method_params:`` (YAML) or ``--method-param KEY=VALUE`` and
  :meth:`SSLMethod.params_of` reads them from the config (:class:`NoParams`: none);
- ``from_config(cfg, img_size)``: the constructor the training loop calls.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import ClassVar

import torch
import torch.distributed as dist
import torch.nn as nn

from ...core.config import from_dict
from ...core.errors import ConfigError
from ..backbones import build_backbone, get


@dataclass(frozen=True)
class NoParams:
    """The hyperparameters of a method that has none of its own (SimSiam)."""

    def validate(self, where: str) -> None:
        """A subclass checks its ranges here, raising ConfigError naming ``where.<key>``."""


def check_params(params_cls: type, values, method: str, where: str = "method_params"):
    """``values`` (a mapping from YAML or ``--method-param``) as ``params_cls``, checked once: an unknown
    key names the method's keys, a wrong type or range the key (a ConfigError, one line)."""
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise ConfigError(f"{where}: expected a mapping of {method}'s hyperparameters, got {values!r}")
    allowed = [f.name for f in fields(params_cls)]
    for key in values:
        if key not in allowed:
            raise ConfigError(
                f"{where}: unknown key {key!r} for --method {method} (its keys: {', '.join(allowed) or 'none'})"
            )
    return from_dict(params_cls, values, where)


def mlp(dims: list[int], last_bn: bool = False) -> nn.Sequential:
    """``Linear -> BN -> ReLU`` for every hidden layer, then a plain ``Linear`` (BYOL, SimCLR, VICReg heads)."""
    layers: list[nn.Module] = []
    for a, b in zip(dims[:-2], dims[1:-1]):
        layers += [nn.Linear(a, b), nn.BatchNorm1d(b), nn.ReLU(inplace=True)]
    layers.append(nn.Linear(dims[-2], dims[-1]))
    if last_bn:
        layers.append(nn.BatchNorm1d(dims[-1], affine=False))
    return nn.Sequential(*layers)


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` from every rank (rank order), gradients flowing back to each rank's slice.

    ``torch.distributed.nn.functional.all_gather``: its backward sums the incoming gradients over
    ranks (reduce-scatter; all-to-all + sum on gloo), so rank r's slice gets d(sum of every rank's
    loss)/dx_r, and DDP's gradient average then equals the gradient of the global-batch loss.
    One process: ``x`` itself. Every rank must hold the same number of rows.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(x.contiguous()), dim=0)


class SSLMethod(nn.Module):
    name: ClassVar[str] = ""
    paper: ClassVar[str] = ""
    recipe: ClassVar[dict] = {}
    Params: ClassVar[type] = NoParams

    def __init__(self, arch: str, zero_init_residual: bool = True, img_size: int | None = None):
        super().__init__()
        self.arch = arch
        self.head_attr = get(arch).head
        self.encoder = build_backbone(arch, zero_init_residual, img_size)

    @property
    def feature_dim(self) -> int:
        return get(self.arch).feature_dim

    def set_projector(self, projector: nn.Module) -> None:
        setattr(self.encoder, self.head_attr, projector)

    @property
    def projector(self) -> nn.Module:
        return getattr(self.encoder, self.head_attr)

    @classmethod
    def params_of(cls, cfg):
        """This method's hyperparameters (a ``Params``) from ``cfg.method_params``, defaults filled."""
        return check_params(cls.Params, getattr(cfg, "method_params", None), cls.name)

    @classmethod
    def from_config(cls, cfg, img_size: int | None) -> SSLMethod:
        raise NotImplementedError

    def loss(self, *outputs) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def param_groups(self, lr: float, fix_pred_lr: bool = False) -> list[dict]:
        groups = [{"params": [p for p in self.encoder.parameters() if p.requires_grad], "lr": lr, "fix_lr": False}]
        if hasattr(self, "predictor"):
            groups.append({"params": list(self.predictor.parameters()), "lr": lr, "fix_lr": fix_pred_lr})
        return groups

    def after_step(self, step: int, total_steps: int) -> None:
        """Called after every optimizer step with the count of completed steps; nothing by default."""
