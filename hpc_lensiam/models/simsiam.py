"""SimSiam on 1-channel lens images: ResNet backbone, projector, predictor, loss (Chen & He 2021).

Follows facebookresearch/simsiam (``simsiam/builder.py``): ``encoder`` is a torchvision ResNet
whose ``fc`` is replaced by the 3-layer projector, ``predictor`` is the 2-layer bottleneck MLP, and
the loss is the symmetric negative cosine similarity with a stop-gradient on the target branch.

Input choice: the stem is a **1-channel** ``conv1`` (7x7, stride 2, 64 filters,
Kaiming-initialised like torchvision's) and images are used at their **native size** (110x110 for
the hst preset), with no resize. The LenSiam reference code instead repeats the channel 3x and
resizes to 224x224; that costs ~4x the compute per image for the same information, since a
repeated channel carries nothing new. Everything else is the stock torchvision ResNet (maxpool
included), so an exported backbone is a torchvision ``resnet*`` whose ``conv1`` takes 1 channel.

Checkpoint contract (written by :mod:`hpc_lensiam.train.loop`, read by
:func:`hpc_lensiam.train.checkpoint.load_model_state`): ``RUN/checkpoints/last.pt`` holds
``{"model": SimSiam.state_dict() (no "module." prefix), "config": TrainConfig as dict, "step",
"epoch", "arch", ...resume state}``. :func:`backbone_state_dict` turns the model state into the
state of :func:`build_backbone` (``encoder.*`` minus ``encoder.fc.*``, prefix stripped).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

ARCHS = ("resnet18", "resnet50", "resnet101")
_FEATURE_DIM = {"resnet18": 512, "resnet50": 2048, "resnet101": 2048}


def feature_dim(arch: str) -> int:
    """Width of the pooled backbone feature: 512 for resnet18, 2048 for resnet50/101."""
    if arch not in _FEATURE_DIM:
        raise ValueError(f"unknown arch {arch!r} (expected one of: {', '.join(ARCHS)})")
    return _FEATURE_DIM[arch]


def build_backbone(arch: str, zero_init_residual: bool = True) -> nn.Module:
    """Torchvision ResNet, random init, 1-channel ``conv1``, ``fc=Identity``.

    ``backbone(x)`` with ``x`` of shape (N, 1, H, W) at native size returns the pooled
    ``(N, feature_dim(arch))`` feature. ``zero_init_residual`` (the SimSiam reference's choice) zeroes
    the last BN scale of every residual block, so training starts from a network of identity blocks;
    over a few hundred steps those scales stay ~1e-3 and the backbone is effectively a stem plus
    the 1x1 shortcut convolutions (docs/results.md measures what that does to short runs).
    """
    feature_dim(arch)  # validates the name
    net = getattr(torchvision.models, arch)(weights=None, zero_init_residual=zero_init_residual)
    net.conv1 = nn.Conv2d(1, 64, kernel_size=7, stride=2, padding=3, bias=False)
    nn.init.kaiming_normal_(net.conv1.weight, mode="fan_out", nonlinearity="relu")
    net.fc = nn.Identity()
    return net


def projector(in_dim: int, dim: int = 2048) -> nn.Sequential:
    """3 bias-free linears, each followed by BN; ReLU after the first two; last BN without affine."""
    return nn.Sequential(
        nn.Linear(in_dim, dim, bias=False), nn.BatchNorm1d(dim), nn.ReLU(inplace=True),
        nn.Linear(dim, dim, bias=False), nn.BatchNorm1d(dim), nn.ReLU(inplace=True),
        nn.Linear(dim, dim, bias=False), nn.BatchNorm1d(dim, affine=False))


def predictor(dim: int = 2048, pred_dim: int = 512) -> nn.Sequential:
    """Bottleneck dim-pred_dim-dim: BN+ReLU in the hidden layer only, plain linear output."""
    return nn.Sequential(
        nn.Linear(dim, pred_dim, bias=False), nn.BatchNorm1d(pred_dim), nn.ReLU(inplace=True),
        nn.Linear(pred_dim, dim))


class SimSiam(nn.Module):
    """``encoder`` = backbone with ``fc`` = projector; ``predictor`` on top (SimSiam, Chen & He 2021)."""

    def __init__(self, arch: str = "resnet101", dim: int = 2048, pred_dim: int = 512,
                 zero_init_residual: bool = True):
        super().__init__()
        self.arch = arch
        self.encoder = build_backbone(arch, zero_init_residual)
        self.encoder.fc = projector(feature_dim(arch), dim)
        self.predictor = predictor(dim, pred_dim)

    def forward(self, x1: torch.Tensor, x2: torch.Tensor):
        """Return ``p1, p2, z1.detach(), z2.detach()``: predictions and stop-gradient targets."""
        z1, z2 = self.encoder(x1), self.encoder(x2)
        p1, p2 = self.predictor(z1), self.predictor(z2)
        return p1, p2, z1.detach(), z2.detach()


def simsiam_loss(p1: torch.Tensor, p2: torch.Tensor, z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
    """L = D(p1, sg(z2))/2 + D(p2, sg(z1))/2 with D the negative cosine similarity (in fp32)."""
    d1 = F.cosine_similarity(p1.float(), z2.detach().float(), dim=-1).mean()
    d2 = F.cosine_similarity(p2.float(), z1.detach().float(), dim=-1).mean()
    return -0.5 * (d1 + d2)


@torch.no_grad()
def z_std(z: torch.Tensor) -> torch.Tensor:
    """Collapse monitor: mean per-dimension std of l2-normalised z; ~1/sqrt(dim) healthy, 0 collapsed."""
    return F.normalize(z.float(), dim=1).std(dim=0).mean()


def backbone_state_dict(model_state: dict) -> dict:
    """SimSiam state -> :func:`build_backbone` state: ``encoder.*`` minus ``encoder.fc.*``, prefix stripped."""
    out = {}
    for k, v in model_state.items():
        k = k.removeprefix("module.")
        if k.startswith("encoder.") and not k.startswith("encoder.fc."):
            out[k[len("encoder."):]] = v
    return out
