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
    # (backbone state, img_size) -> Exported. Takes a trained 1-channel state or one already in the
    # library's layout (an export, a library weights file) alike: exporting an export is a no-op.
    export: Callable
    # (img_size or None) -> (random-init stock library model with its head an Identity, its input
    # channels): the model an export loads into, and ``finetune --backbone none``'s baseline.
    library: Callable
    # (backbone state without its head) -> bool: the weights have this arch's layout (trained or
    # exported). The registry's entries never share a layout, so weights name their arch.
    matches: Callable
    img_size_of: Callable = lambda state: None  # native image side from a trained state (ViT: pos_embed)
    recipe: dict = field(default_factory=dict)  # TrainConfig defaults this backbone needs over the method's


def _layout(state: dict, head: str, stem: str) -> dict:
    """{name: shape} of a backbone state without its head, the stem's input channels left out (1 in
    a trained backbone, 3 in a torchvision export of it)."""
    out = {}
    for k, v in state.items():
        if k.startswith(f"{head}.") or not hasattr(v, "shape"):
            continue
        shape = tuple(v.shape)
        out[k] = shape[:1] + shape[2:] if k == stem else shape
    return out


def matches_layout(reference: Callable, head: str, stem: str) -> Callable:
    """A ``BackboneSpec.matches`` that compares names and shapes with ``reference()``'s state, built
    once on the meta device (no memory, no init): wide and grouped ResNets, say, share names with
    the plain ones but not shapes."""
    cache = {}

    def run(state: dict) -> bool:
        if "layout" not in cache:
            import torch

            with torch.device("meta"):
                cache["layout"] = _layout(reference().state_dict(), head, stem)
        return _layout(state, head, stem) == cache["layout"]

    return run


def fold_stem(state: dict, key: str) -> dict:
    """A 1-channel stem conv ``key`` -> the 3-channel one of a stock library model, ``repeat / 3``:
    a grayscale image repeated on 3 channels gives the same output (a 3-channel stem: unchanged)."""
    w = state.get(key)
    if w is not None and w.shape[1] == 1:
        state = dict(state)
        state[key] = (w.repeat(1, 3, 1, 1) / 3.0).contiguous()
    return state
