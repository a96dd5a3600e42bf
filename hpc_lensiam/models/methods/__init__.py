"""SSL method registry: ``--method NAME`` -> an :class:`~.base.SSLMethod` subclass.

Each method is one module: its heads, its loss (written here from the paper's formula, no SSL
framework dependency), an optional after-step hook and its reference hyperparameters (``recipe``),
documented with the paper they come from, and its own hyperparameters (``Params``, a frozen
dataclass with their defaults and checks; a run sets them under ``method_params:``). Adding a
method, its own knobs included, = one module + one entry in ``METHODS`` (docs/extending.md shows a
tested example); nothing in the training config changes.

``--views lens|standard`` (:data:`VIEWS`) says where every method's two views come from: the stored
lens pair, or two standard augmentations of one image.

:func:`recipe` gives the TrainConfig defaults of a (method, backbone): the method's paper recipe,
then the backbone's own (``BackboneSpec.recipe``: a ViT's is MoCo v3's AdamW recipe, since SGD/LARS
recipes were tuned for ResNets), and the lr scaling rule of the resulting (method, optimizer)
(:func:`lr_scaling_rule`). YAML keys and flags override all of them.
"""

from __future__ import annotations

from ..backbones import BACKBONES
from .base import NoParams, SSLMethod, check_params, gather_with_grad, mlp
from .byol import BYOL, BYOLParams
from .simclr import SimCLR, SimCLRParams
from .simsiam import SimSiam
from .vicreg import VICReg, VICRegParams

METHODS: dict[str, type[SSLMethod]] = {m.name: m for m in (SimSiam, BYOL, VICReg, SimCLR)}

VIEWS = ("lens", "standard")  # the stored lens pair | two standard augmentations of one image
OLD_MODE_VIEWS = {"lensiam": "lens", "simsiam": "standard"}  # the former ``mode:`` values, in saved runs


def views_of(config: dict) -> str:
    """The ``views`` of a saved training config, an older run's ``mode:`` translated ('unknown': neither)."""
    if config.get("views"):
        return str(config["views"])
    return OLD_MODE_VIEWS.get(config.get("mode"), "unknown")


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
    if out:
        out["lr_scaling"] = lr_scaling_rule(method, out.get("optimizer", "sgd"))
    return out


def lr_scaling_rule(method: str, optimizer: str) -> str:
    """The lr scaling rule that goes with ``(method, optimizer)``: the rule its base lr was tuned for.

    SimCLR's LARS recipe uses the square-root rule (its paper's small-batch rule, ``lr_rules``);
    every other pair is linear, a ViT's AdamW included (MoCo v3's 1.5e-4 x batch/256). Combining an
    AdamW base lr meant for the linear rule with SimCLR's sqrt rule gave a ViT 32x its lr at batch 64.
    """
    m = METHODS.get(method) if isinstance(method, str) else None
    return getattr(m, "lr_rules", {}).get(optimizer, "linear") if m is not None else "linear"


def method_params(method: str, values, where: str = "method_params"):
    """``values`` checked against ``method``'s own hyperparameters: its ``Params``, defaults filled."""
    return check_params(get(method).Params, values, method, where)


def build_method(cfg, img_size: int | None = None) -> SSLMethod:
    """The model ``cfg.method`` on ``cfg.arch`` for images of side ``img_size``, seeded by the caller."""
    return get(cfg.method).from_config(cfg, img_size)


__all__ = [
    "METHODS",
    "OLD_MODE_VIEWS",
    "VIEWS",
    "NoParams",
    "SSLMethod",
    "BYOL",
    "BYOLParams",
    "SimCLR",
    "SimCLRParams",
    "SimSiam",
    "VICReg",
    "VICRegParams",
    "build_method",
    "check_params",
    "gather_with_grad",
    "get",
    "lr_scaling_rule",
    "method_params",
    "mlp",
    "recipe",
    "views_of",
]
