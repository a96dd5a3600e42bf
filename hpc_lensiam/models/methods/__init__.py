"""SSL method registry: ``--method NAME`` -> an :class:`~.base.SSLMethod` subclass.

Each method is one module: its heads, its loss (written here from the paper's formula, no SSL
framework dependency), an optional after-step hook and its reference hyperparameters (``recipe``),
documented with the paper they come from. Adding a method = one module + one entry in ``METHODS``
(docs/extending.md shows an example).

:func:`recipe` gives the TrainConfig defaults of a (method, backbone): the method's paper recipe,
then the backbone's own (``BackboneSpec.recipe``: a ViT's is MoCo v3's AdamW recipe, since SGD/LARS
recipes were tuned for ResNets). YAML keys and flags override both.
"""

from __future__ import annotations

from ..backbones import BACKBONES
from .base import SSLMethod, gather_with_grad, mlp
from .byol import BYOL
from .simclr import SimCLR
from .simsiam import SimSiam
from .vicreg import VICReg

METHODS: dict[str, type[SSLMethod]] = {m.name: m for m in (SimSiam, BYOL, VICReg, SimCLR)}


def get(name: str) -> type[SSLMethod]:
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r} (expected one of: {', '.join(METHODS)})")
    return METHODS[name]


def recipe(method: str, arch: str) -> dict:
    """TrainConfig defaults of ``method`` on ``arch`` (unknown or ill-typed names: none of them; the
    config's validation reports those)."""
    out = dict(METHODS[method].recipe) if isinstance(method, str) and method in METHODS else {}
    if isinstance(arch, str) and arch in BACKBONES:
        out.update(BACKBONES[arch].recipe)
    return out


def build_method(cfg, img_size: int | None = None) -> SSLMethod:
    """The model ``cfg.method`` on ``cfg.arch`` for images of side ``img_size``, seeded by the caller."""
    return get(cfg.method).from_config(cfg, img_size)


__all__ = [
    "METHODS",
    "SSLMethod",
    "BYOL",
    "SimCLR",
    "SimSiam",
    "VICReg",
    "build_method",
    "gather_with_grad",
    "get",
    "mlp",
    "recipe",
]
