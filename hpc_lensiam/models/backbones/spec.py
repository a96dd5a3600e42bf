"""The two records a backbone module fills in (kept apart so backbone modules import no registry)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Exported:
    """What a backbone's export contract produces (see :func:`hpc_lensiam.downstream.export.export_backbone`)."""

    state: dict  # state_dict the library model loads
    model: object  # that library model, loaded, head = Identity, eval mode
    in_chans: int  # channels the library model takes (a grayscale image repeated)
    load: str  # one line of Python that rebuilds it (goes into the sidecar)
    channel_note: str
    library: dict = field(default_factory=dict)  # e.g. {"timm": {model kwargs}}


@dataclass(frozen=True)
class BackboneSpec:
    name: str  # the --arch value
    family: str  # "torchvision" | "timm"
    feature_dim: int  # width of the pooled feature
    head: str  # attribute the projector replaces ("fc", "head")
    build: Callable  # (img_size or None, zero_init_residual) -> nn.Module
    export: Callable  # (backbone state, img_size) -> Exported
    img_size_of: Callable = lambda state: None  # native image side from a trained state (ViT: pos_embed)
    recipe: dict = field(default_factory=dict)  # TrainConfig defaults this backbone needs over the method's
