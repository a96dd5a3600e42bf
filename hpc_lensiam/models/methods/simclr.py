"""SimCLR (Chen, Kornblith, Norouzi & Hinton, "A Simple Framework for Contrastive Learning of
Visual Representations", ICML 2020).

NT-Xent: for the 2N projections of a global batch (N systems, two views each), with
``sim(u, v) = u.v / (|u||v|)`` and temperature tau::

    l(i, j) = -log( exp(sim(z_i, z_j)/tau) / sum_{k != i} exp(sim(z_i, z_k)/tau) )
    L = 1/(2N) sum_k [ l(2k-1, 2k) + l(2k, 2k-1) ]

Here the positive of a view is the other image of its LenSiam pair (or of its two standard
augmentations); every other image of the GLOBAL batch is a negative. Each rank gathers the
projections of all ranks with gradients (:func:`.base.gather_with_grad`) and scores its own anchors
against all of them; DDP's gradient average then equals the gradient of L over the global batch.

Recipe: LARS (biases and BN excluded), weight decay 1e-6, square-root lr scaling
lr = 0.075 x sqrt(batch), which the paper's appendix finds better than 0.3 x batch/256 at small
batches and short schedules; temperature 0.1; projection head 2048 (BN, ReLU) -> 128.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ...core.errors import ConfigError
from .base import SSLMethod, gather_with_grad, mlp


@dataclass(frozen=True)
class SimCLRParams:
    """SimCLR's own hyperparameters (``method_params:``); the paper's values."""

    temperature: float = 0.1  # NT-Xent temperature tau

    def validate(self, where: str) -> None:
        if self.temperature <= 0:
            raise ConfigError(f"{where}.temperature: must be > 0, got {self.temperature}")


def nt_xent_loss(z1: torch.Tensor, z2: torch.Tensor, temperature: float = SimCLRParams.temperature) -> torch.Tensor:
    """NT-Xent of this rank's anchors (both views) against the gathered global batch."""
    n = z1.shape[0]
    z1, z2 = F.normalize(z1.float(), dim=1), F.normalize(z2.float(), dim=1)
    g1, g2 = gather_with_grad(z1), gather_with_grad(z2)
    total = g1.shape[0]
    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    if total == n:
        rank = 0
    idx = torch.arange(n, device=z1.device) + rank * n  # this rank's rows in the global batch
    anchors = torch.cat([z1, z2])  # (2n, d)
    candidates = torch.cat([g1, g2])  # (2N, d)
    logits = anchors @ candidates.T / temperature
    self_col = torch.cat([idx, idx + total])
    logits[torch.arange(2 * n, device=z1.device), self_col] = float("-inf")
    positive = torch.cat([idx + total, idx])
    return F.cross_entropy(logits, positive)


class SimCLR(SSLMethod):
    name = "simclr"
    paper = "Chen et al. 2020, A Simple Framework for Contrastive Learning of Visual Representations (ICML)"
    recipe = dict(
        optimizer="lars",
        base_lr=0.075,
        weight_decay=1e-6,
        proj_hidden_dim=2048,
        proj_dim=128,
    )
    lr_rules = {"lars": "sqrt"}  # base_lr 0.075 x sqrt(batch): the paper's rule for its LARS recipe
    Params = SimCLRParams

    def __init__(
        self,
        arch: str,
        proj_hidden_dim: int,
        proj_dim: int,
        params: SimCLRParams = SimCLRParams(),
        zero_init_residual: bool = True,
        img_size: int | None = None,
    ):
        super().__init__(arch, zero_init_residual, img_size)
        self.set_projector(mlp([self.feature_dim, proj_hidden_dim, proj_dim]))
        self.temperature = params.temperature

    @classmethod
    def from_config(cls, cfg, img_size):
        return cls(
            cfg.arch,
            cfg.proj_hidden_dim or cfg.proj_dim,
            cfg.proj_dim,
            cls.params_of(cfg),
            cfg.zero_init_residual,
            img_size,
        )

    def forward(self, x1: torch.Tensor, x2: torch.Tensor):
        return self.encoder(x1), self.encoder(x2)

    def loss(self, z1, z2):
        return nt_xent_loss(z1, z2, self.temperature), z1.detach()
