"""Backbone registry: ``--arch NAME`` -> how to build it, its feature width and its export contract.

A backbone maps a batch of 1-channel images at native size, ``(N, 1, H, W)``, to pooled features
``(N, feature_dim)``. Its ``head`` attribute (``fc`` for torchvision ResNets, ``head`` for timm
ViTs) is an ``Identity`` that every SSL method replaces by its projector, so the online encoder's
state_dict is ``encoder.*`` with the projector under ``encoder.<head>.*`` (the SimSiam reference's
layout, kept for every method and backbone).

``spec.export(state, img_size)`` turns a trained 1-channel backbone state into the state a stock
library model loads (torchvision or timm), with that model and how to load it; the exporter
checks the keys and the features (:mod:`hpc_lensiam.downstream.export`). ``spec.matches(state)``
recognises the arch from weights (:func:`recognise`), and ``spec.library(img_size)`` builds the
stock model an export loads into, so export, embed and finetune hold no per-backbone case.

Adding a backbone = one module with an ``ENTRIES`` tuple of :class:`BackboneSpec` + one entry in
``_MODULES`` below (docs/extending.md shows an example).
"""

from __future__ import annotations

from . import resnet, vit
from .spec import BackboneSpec, Exported

_MODULES = (resnet, vit)
BACKBONES: dict[str, BackboneSpec] = {s.name: s for m in _MODULES for s in m.ENTRIES}


def get(arch: str) -> BackboneSpec:
    if arch not in BACKBONES:
        raise ValueError(f"unknown arch {arch!r} (expected one of: {', '.join(BACKBONES)})")
    return BACKBONES[arch]


def recognise(state: dict) -> BackboneSpec | None:
    """The registered backbone whose weight layout ``state`` has (a trained 1-channel backbone, an
    export or a library weights file, head removed), or None. Entries never share a layout (a test
    checks every pair), so the weights alone name their arch: no per-family case in the exporter or
    the fine-tuner."""
    hits = [s for s in BACKBONES.values() if s.matches(state)]
    return hits[0] if len(hits) == 1 else None


def feature_dim(arch: str) -> int:
    return get(arch).feature_dim


def build_backbone(arch: str, zero_init_residual: bool = True, img_size: int | None = None):
    """Random-init backbone ``arch`` for 1-channel images of side ``img_size`` (ViTs need it)."""
    return get(arch).build(img_size, zero_init_residual)


def backbone_state_dict(model_state: dict, head: str = "fc") -> dict:
    """Method state -> backbone state: ``encoder.*`` minus ``encoder.<head>.*`` (the projector),
    prefix stripped. A momentum target (``target_encoder.*``) is not the online encoder: dropped."""
    out = {}
    for k, v in model_state.items():
        k = k.removeprefix("module.")
        if k.startswith("encoder.") and not k.startswith(f"encoder.{head}."):
            out[k[len("encoder.") :]] = v
    return out


__all__ = [
    "BACKBONES",
    "BackboneSpec",
    "Exported",
    "backbone_state_dict",
    "build_backbone",
    "feature_dim",
    "get",
    "recognise",
]
