"""SimSiam (Chen & He, "Exploring Simple Siamese Representation Learning", CVPR 2021).

Follows facebookresearch/simsiam ``builder.py``: ``encoder`` is the backbone whose head is the
3-layer projector, ``predictor`` the 2-layer bottleneck MLP, and the loss the symmetric negative
cosine similarity with a stop-gradient on the target branch. No negatives, no momentum encoder.

Recipe (TrainConfig defaults): SGD, momentum 0.9, lr = base_lr x batch/256 with base_lr 0.03 and
weight decay 5e-4 (the paper's small-image/CIFAR recipe, which the LenSiam authors used; ImageNet:
0.05 and 1e-4), projector 2048-2048-2048, predictor hidden 512, the predictor's lr fixed.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .base import SSLMethod


def projector(in_dim: int, dim: int = 2048) -> nn.Sequential:
    """3 bias-free linears, each followed by BN; ReLU after the first two; last BN without affine."""
    return nn.Sequential(
        nn.Linear(in_dim, dim, bias=False),
        nn.BatchNorm1d(dim),
        nn.ReLU(inplace=True),
        nn.Linear(dim, dim, bias=False),
        nn.BatchNorm1d(dim),
        nn.ReLU(inplace=True),
        nn.Linear(dim, dim, bias=False),
        nn.BatchNorm1d(dim, affine=False),
    )


def predictor(dim: int = 2048, pred_dim: int = 512) -> nn.Sequential:
    """Bottleneck dim-pred_dim-dim: BN+ReLU in the hidden layer only, plain linear output."""
    return nn.Sequential(
        nn.Linear(dim, pred_dim, bias=False), nn.BatchNorm1d(pred_dim), nn.ReLU(inplace=True), nn.Linear(pred_dim, dim)
    )


def simsiam_loss(p1: torch.Tensor, p2: torch.Tensor, z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
    """L = D(p1, sg(z2))/2 + D(p2, sg(z1))/2 with D the negative cosine similarity (in fp32)."""
    d1 = F.cosine_similarity(p1.float(), z2.detach().float(), dim=-1).mean()
    d2 = F.cosine_similarity(p2.float(), z1.detach().float(), dim=-1).mean()
    return -0.5 * (d1 + d2)


@torch.no_grad()
def z_std(z: torch.Tensor) -> torch.Tensor:
    """Collapse monitor: mean per-dimension std of l2-normalised z; ~1/sqrt(dim) healthy, 0 collapsed."""
    return F.normalize(z.float(), dim=1).std(dim=0).mean()


class SimSiam(SSLMethod):
    """``encoder`` = backbone with its head = projector; ``predictor`` on top."""

    name = "simsiam"
    paper = "Chen & He 2021, Exploring Simple Siamese Representation Learning (CVPR)"
    recipe: dict = {}  # TrainConfig's own defaults are SimSiam's (LenSiam's CIFAR-scale recipe)

    def __init__(
        self,
        arch: str = "resnet101",
        dim: int = 2048,
        pred_dim: int = 512,
        zero_init_residual: bool = True,
        img_size: int | None = None,
    ):
        super().__init__(arch, zero_init_residual, img_size)
        self.set_projector(projector(self.feature_dim, dim))
        self.predictor = predictor(dim, pred_dim)

    @classmethod
    def from_config(cls, cfg, img_size):
        return cls(cfg.arch, cfg.proj_dim, cfg.pred_dim, cfg.zero_init_residual, img_size)

    def forward(self, x1: torch.Tensor, x2: torch.Tensor):
        """Return ``p1, p2, z1.detach(), z2.detach()``: predictions and stop-gradient targets."""
        z1, z2 = self.encoder(x1), self.encoder(x2)
        p1, p2 = self.predictor(z1), self.predictor(z2)
        return p1, p2, z1.detach(), z2.detach()

    def loss(self, p1, p2, z1, z2):
        return simsiam_loss(p1, p2, z1, z2), z1
