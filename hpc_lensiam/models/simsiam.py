"""SimSiam on 1-channel lens images: kept importable for existing code; the parts now live in the seams.

- backbones (torchvision ResNets with the 1-channel stem, timm ViTs): :mod:`hpc_lensiam.models.backbones`
- SimSiam's heads, loss and collapse monitor: :mod:`hpc_lensiam.models.methods.simsiam`

Checkpoint contract (written by :mod:`hpc_lensiam.train.loop`, read by
:func:`hpc_lensiam.train.checkpoint.load_model_state`): ``RUN/checkpoints/last.pt`` holds
``{"model": method.state_dict() (no "module." prefix), "config": TrainConfig as dict, "step",
"epoch", "arch", ...resume state}``. :func:`backbone_state_dict` turns the model state into the
state of :func:`build_backbone` (``encoder.*`` minus ``encoder.fc.*``, prefix stripped).
"""

from __future__ import annotations

from .backbones import ARCHS as _ALL_ARCHS
from .backbones import backbone_state_dict, build_backbone, feature_dim
from .methods.simsiam import SimSiam, predictor, projector, simsiam_loss, z_std

ARCHS = tuple(a for a in _ALL_ARCHS if a.startswith("resnet"))

__all__ = [
    "ARCHS",
    "SimSiam",
    "backbone_state_dict",
    "build_backbone",
    "feature_dim",
    "predictor",
    "projector",
    "simsiam_loss",
    "z_std",
]
