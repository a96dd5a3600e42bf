"""BYOL (Grill et al., "Bootstrap Your Own Latent", NeurIPS 2020).

An online network (encoder + projector + predictor) predicts the projection of the other view made
by a momentum target network (encoder + projector, no predictor), whose weights are an exponential
moving average of the online ones: ``xi <- tau xi + (1 - tau) theta`` after every step, with
``tau = 1 - (1 - tau_base)(cos(pi k / K) + 1) / 2`` rising from ``tau_base`` = 0.996 to 1 over the
K training steps (``method_params: {ema_tau_base: ...}``, :class:`BYOLParams`). Loss:
``||p/|p| - z'/|z'|||^2 = 2 - 2 cos(p, z')``, symmetrised over the views (mean over the batch,
summed over the two directions). The target receives no gradient.

Recipe (paper, section 3.3 / appendix): LARS (biases and BN excluded from weight decay and from
the trust ratio), lr = 0.2 x batch/256, weight decay 1.5e-6, 10 warm-up epochs then cosine;
projector and predictor are MLPs 4096 (BN, ReLU) -> 256. The target network is part of the
model's state_dict (``target_encoder.*``), so checkpoints and resume carry it; export takes the
online ``encoder``.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ...core.errors import ConfigError
from .base import SSLMethod, mlp


@dataclass(frozen=True)
class BYOLParams:
    """BYOL's own hyperparameters (``method_params:``); the paper's values."""

    ema_tau_base: float = 0.996  # target decay at step 0, rising to 1 on a cosine

    def validate(self, where: str) -> None:
        if not 0.0 <= self.ema_tau_base <= 1.0:
            raise ConfigError(f"{where}.ema_tau_base: {self.ema_tau_base} is not in [0, 1]")


def byol_loss(p: torch.Tensor, z_target: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of ``||p/|p| - z'/|z'|||^2 = 2 - 2 cos(p, z')`` (fp32, target detached)."""
    return (2 - 2 * F.cosine_similarity(p.float(), z_target.detach().float(), dim=-1)).mean()


def ema_tau(step: int, total_steps: int, tau_base: float = BYOLParams.ema_tau_base) -> float:
    """BYOL's target decay after step ``step`` of ``total_steps``: tau_base at 0, 1 at the end (cosine)."""
    k = min(max(step, 0), total_steps)
    return 1 - (1 - tau_base) * (math.cos(math.pi * k / max(1, total_steps)) + 1) / 2


@torch.no_grad()
def ema_update(target: torch.nn.Module, online: torch.nn.Module, tau: float) -> None:
    """``target <- tau target + (1 - tau) online``, parameter by parameter (buffers follow their own BN)."""
    for t, o in zip(target.parameters(), online.parameters()):
        t.mul_(tau).add_(o.detach(), alpha=1 - tau)


class BYOL(SSLMethod):
    name = "byol"
    paper = "Grill et al. 2020, Bootstrap Your Own Latent (NeurIPS)"
    recipe = dict(
        optimizer="lars",
        base_lr=0.2,
        weight_decay=1.5e-6,
        proj_hidden_dim=4096,
        proj_dim=256,
        pred_dim=4096,
        fix_pred_lr=False,
    )
    Params = BYOLParams

    def __init__(
        self,
        arch: str,
        proj_hidden_dim: int,
        proj_dim: int,
        pred_dim: int,
        params: BYOLParams = BYOLParams(),
        zero_init_residual: bool = True,
        img_size: int | None = None,
    ):
        super().__init__(arch, zero_init_residual, img_size)
        self.set_projector(mlp([self.feature_dim, proj_hidden_dim, proj_dim]))
        self.predictor = mlp([proj_dim, pred_dim, proj_dim])
        self.target_encoder = copy.deepcopy(self.encoder)
        self.target_encoder.requires_grad_(False)
        self.tau_base = params.ema_tau_base
        self.tau = self.tau_base

    @classmethod
    def from_config(cls, cfg, img_size):
        return cls(
            cfg.arch,
            cfg.proj_hidden_dim or cfg.proj_dim,
            cfg.proj_dim,
            cfg.pred_dim,
            cls.params_of(cfg),
            cfg.zero_init_residual,
            img_size,
        )

    def forward(self, x1: torch.Tensor, x2: torch.Tensor):
        """``p1, p2`` (online predictions), ``t1, t2`` (target projections, no graph), ``z1`` (monitor)."""
        z1, z2 = self.encoder(x1), self.encoder(x2)
        p1, p2 = self.predictor(z1), self.predictor(z2)
        with torch.no_grad():
            t1, t2 = self.target_encoder(x1), self.target_encoder(x2)
        return p1, p2, t1, t2, z1.detach()

    def loss(self, p1, p2, t1, t2, z1):
        return byol_loss(p1, t2) + byol_loss(p2, t1), z1

    def after_step(self, step: int, total_steps: int) -> None:
        self.tau = ema_tau(step, total_steps, self.tau_base)
        ema_update(self.target_encoder, self.encoder, self.tau)
