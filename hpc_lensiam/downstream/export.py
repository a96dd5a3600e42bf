"""Export a pretrained backbone as a stock library state_dict (+ a JSON sidecar).

Contract (facebookresearch/simsiam's main_lincls.py), for every SSL method: keep the online
``encoder.*`` minus its projector (``encoder.fc.*`` for ResNets, ``encoder.head.*`` for ViTs),
strip the prefix; a BYOL momentum target (``target_encoder.*``) is not exported. Each backbone of
:mod:`hpc_lensiam.models.backbones` states its export contract:

- ResNets: the 1-channel ``conv1`` is folded into torchvision's 3-channel ``conv1`` as
  ``w3 = repeat(w1, 3) / 3``, so an image (divided by its max, as in training) repeated on 3
  channels gives the same features as the trained backbone; ``torchvision.models.<arch>()`` loads
  the file with ``strict=False``, missing exactly ``fc.weight`` and ``fc.bias``.
- ViTs: ``timm.create_model(name, img_size=H, patch_size=P, in_chans=1, num_classes=0)`` loads the
  file strictly (with a classifier head: missing exactly ``head.weight``, ``head.bias``).

The exporter checks the keys, and the features against the trained backbone on a test image,
before writing anything. Reads DDP ``last.pt`` files, run folders and DeepSpeed checkpoint
folders alike (:func:`hpc_lensiam.train.checkpoint.load_model_state`).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
from pathlib import Path

from ..errors import UserError
from ..io import atomic_path, atomic_write_json, check_output_file, check_torch_file, read_manifest, sha256_json

FORMATS = ("pt", "safetensors")
SIDECAR_FORMAT = "hpc_lensiam.backbone/1"
NORMALISATION = "each image divided by its maximum (max = 1), as the shards store it; no mean/std subtraction"
__all__ = [
    "FORMATS",
    "backbone_from_checkpoint",
    "export_backbone",
    "load_backbone",
    "read_backbone_file",
    "read_sidecar",
]


# ------------------------------------------------------------------------------------ helpers
def state_sha256(state: dict) -> str:
    """Hash of a state_dict's names, dtypes, shapes and values (format-independent identity)."""
    import torch

    h = hashlib.sha256()
    for k in sorted(state):
        t = state[k]
        if not isinstance(t, torch.Tensor):
            continue
        t = t.detach().cpu().contiguous().reshape(-1)
        h.update(f"{k}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def sidecar_path(out: str | os.PathLike) -> Path:
    out = Path(out)
    return out.with_name(out.name + ".json")


def _training_grid(config: dict | None) -> dict | None:
    """The pixel grid of the data a checkpoint was trained on (its manifest), None where unknown."""
    from .model_file import data_grid

    data = (config or {}).get("data")
    if not data:
        return None
    try:
        return data_grid(data)
    except (UserError, OSError, ValueError):
        return None


def _image_shape(config: dict | None):
    data = (config or {}).get("data")
    if not data:
        return None
    try:
        return list(read_manifest(data).get("image_shape") or []) or None
    except UserError:
        return None


# ------------------------------------------------------------------------- checkpoint -> backbone
def backbone_from_checkpoint(checkpoint: str | os.PathLike, arch: str | None = None) -> tuple[dict, dict]:
    """(1-channel backbone state for ``build_backbone``, info) from any training checkpoint.

    ``arch``, if given, is what the caller expects: a checkpoint of another arch is a UserError.
    The arch is recognised from the weights (:func:`hpc_lensiam.models.backbones.recognise`) and
    must agree with the one the checkpoint's config declares; a ViT's image side comes from its
    position embedding.
    """
    from ..models.backbones import ARCHS, BACKBONES, backbone_state_dict, recognise
    from ..train.checkpoint import load_model_state

    if not Path(checkpoint).exists():
        raise UserError(
            f"{checkpoint}: no such checkpoint (expected RUN/checkpoints/last.pt, a run "
            "folder or a DeepSpeed checkpoint folder)"
        )
    if Path(checkpoint).is_file():
        check_torch_file(checkpoint)
    state, config, step = load_model_state(checkpoint)
    config = config if isinstance(config, dict) else {}
    declared = config.get("arch")
    bb = backbone_state_dict(state, BACKBONES[declared].head if declared in BACKBONES else "fc")
    if not bb:
        raise UserError(
            f"{checkpoint}: no encoder.* backbone weights: not a pretraining checkpoint "
            "(an exported backbone goes to `finetune --backbone`, not here)"
        )
    spec = recognise(bb)
    if spec is None:
        raise UserError(f"{checkpoint}: backbone weights match no known backbone (expected one of: {', '.join(ARCHS)})")
    found = spec.name
    if declared and declared != found:
        raise UserError(f"{checkpoint}: its config says arch {declared!r} but its weights are a {found}")
    if arch and arch != found:
        raise UserError(f"{checkpoint}: checkpoint of the wrong arch: {found}, expected {arch}")
    img_size = spec.img_size_of(bb)
    info = {
        "arch": found,
        "mode": config.get("mode", "unknown"),
        "method": config.get("method", "simsiam"),
        "step": int(step or 0),
        "config_hash": sha256_json(config) if config else "",
        "feature_dim": BACKBONES[found].feature_dim,
        "img_size": img_size,
        "weights_sha256": state_sha256(bb),
        "engine": config.get("engine", "unknown"),
        "image_shape": _image_shape(config),
        "training_grid": _training_grid(config),
        "checkpoint": str(Path(checkpoint).resolve()),
    }
    return bb, info


def load_backbone(checkpoint: str | os.PathLike, arch: str | None = None):
    """(trained 1-channel backbone module in eval mode, info) from a training checkpoint."""
    from ..models.backbones import build_backbone

    bb, info = backbone_from_checkpoint(checkpoint, arch)
    try:
        net = build_backbone(info["arch"], img_size=info["img_size"])
        net.load_state_dict(bb, strict=True)
    except (RuntimeError, ValueError) as exc:
        raise UserError(
            f"{checkpoint}: backbone weights do not fit {info['arch']} ({str(exc).splitlines()[0]})"
        ) from None
    return net.eval(), info


def random_backbone(arch: str, seed: int = 0, img_size: int | None = None):
    """(random-weight 1-channel backbone in eval mode, info): the no-pretraining reference of a probe.

    What the architecture alone gives, so a probe can tell "this method learned little" from "this
    method learned nothing": torchvision's init with every residual branch live (as finetune's
    ``--backbone none``), drawn from ``seed`` so every rank, and every rerun, gets the same weights.
    ``img_size``: the data's image side (a ViT's patch grid needs it).
    """
    import torch

    from ..models.backbones import ARCHS, BACKBONES, build_backbone

    if arch not in BACKBONES:
        raise UserError(f"--arch: {arch!r} is not one of {', '.join(ARCHS)}")
    torch.manual_seed(seed)
    try:
        net = build_backbone(arch, zero_init_residual=False, img_size=img_size)
    except ValueError as exc:
        raise UserError(f"--arch: {exc}") from None
    info = {
        "arch": arch,
        "mode": "random-weights",
        "method": "none",
        "step": 0,
        "config_hash": "",
        "feature_dim": BACKBONES[arch].feature_dim,
        "img_size": img_size,
        "weights_sha256": state_sha256(net.state_dict()),
        "engine": "none",
        "image_shape": None,
        "checkpoint": f"none (random {arch} weights, seed {seed})",
    }
    return net.eval(), info


def checkpoint_fingerprint(checkpoint: str | os.PathLike) -> str:
    """sha256 of the checkpoint's backbone weights: equal for the DDP and DeepSpeed copies of a state."""
    return backbone_from_checkpoint(checkpoint)[1]["weights_sha256"]


# --------------------------------------------------------------------------------------- export
def export_backbone(checkpoint: str, out: str, fmt: str = "pt", arch: str | None = None) -> dict:
    """Write ``out`` (library state_dict, ``.pt`` or safetensors) and ``out.json``; return the sidecar."""
    import torch

    from ..models.backbones import get
    from ..train.checkpoint import _FULL_BYTES

    if fmt not in FORMATS:
        raise UserError(f"--format: {fmt!r} is not one of {', '.join(FORMATS)}")
    check_output_file(out, "--out")

    net, info = load_backbone(checkpoint, arch)
    ex = get(info["arch"]).export(net.state_dict(), info["img_size"])

    # the promise, checked: the library model gives the trained backbone's features
    g = torch.Generator().manual_seed(0)
    side = [info["img_size"]] * 2 if info["img_size"] else (info["image_shape"] or [64, 64])
    x = torch.rand(2, 1, *side, generator=g)
    x = x / x.amax(dim=(2, 3), keepdim=True)
    with torch.inference_mode():
        a, b = net(x), ex.model(x.repeat(1, ex.in_chans, 1, 1))
    err = float((a - b).abs().max() / a.abs().max().clamp_min(1e-12))
    if err > 1e-4:
        raise RuntimeError(
            f"export: the library {info['arch']} features differ from the trained backbone "
            f"(max relative error {err:.2e})"
        )
    state = ex.state

    out = Path(out)
    state = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    n_params = sum(v.numel() for k, v in state.items() if not k.endswith("num_batches_tracked"))
    sidecar = {
        "format": SIDECAR_FORMAT,
        "weights": out.name,
        "weights_format": fmt,
        "weights_sha256": state_sha256(state),
        "arch": info["arch"],
        "feature_dim": info["feature_dim"],
        "num_parameters": n_params,
        "load": ex.load.replace("STATE", "torch.load(f)" if fmt == "pt" else "safetensors.torch.load_file(f)"),
        **ex.library,
        "input": {
            "channels": ex.in_chans,
            "channel_note": ex.channel_note,
            "size": [info["img_size"]] * 2 if info["img_size"] else info["image_shape"],
            "size_note": (
                "training image size (native, no resize); "
                + ("the ViT's position embedding fixes it" if info["img_size"] else "global pooling accepts any size")
            ),
            "normalisation": NORMALISATION,
            "dtype": "float32",
        },
        "training": {
            "method": info["method"],
            "mode": info["mode"],
            "step": info["step"],
            "config_hash": info["config_hash"],
            "engine": info["engine"],
            "checkpoint": info["checkpoint"],
            "backbone_weights_sha256": info["weights_sha256"],
        },
        "check": {"features_max_relative_error": err},
    }
    # the weights go to a temporary file, renamed into place only once the sidecar is written: a failure (a
    # full disk) leaves no new file, and an earlier export at ``out`` as it was
    with atomic_path(out) as tmp:
        try:
            if fmt == "pt":
                torch.save(state, tmp)
            else:
                from safetensors.torch import save_file

                save_file(state, str(tmp), metadata={"format": SIDECAR_FORMAT, "arch": info["arch"]})
        except Exception as exc:  # torch: RuntimeError "enforce fail"; safetensors: SafetensorError; no errno
            if "No space left" in str(exc) or shutil.disk_usage(tmp.parent).free < _FULL_BYTES:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(out)) from None
            raise
        atomic_write_json(sidecar_path(out), sidecar)
    print(
        f"export: {info['arch']} backbone ({info['method']}, {info['mode']}, step {info['step']}, "
        f"{n_params / 1e6:.1f}M parameters, {ex.in_chans}-channel input, feature check {err:.1e}) -> {out} "
        f"[{fmt}]; {ex.load.split(';')[0].removeprefix('m = ')} loads it ({ex.load.split('#')[-1].strip()}); "
        f"sidecar {sidecar_path(out)}",
        flush=True,
    )
    return sidecar


# ------------------------------------------------------------------------------ read an export back
def read_backbone_file(path: str | os.PathLike) -> dict:
    """A backbone weights file (our export, a library weights file; .pt/.pth or safetensors)
    -> plain state_dict, ``module.`` prefixes stripped. A library file's classifier head stays: which
    keys are the head depends on the arch, so the caller drops them once it is recognised."""
    import torch

    from ..train.checkpoint import load_weights_only

    path = Path(path)
    if not path.is_file():
        raise UserError(
            f"{path}: backbone file not found (expected `hpc-lensiam export` output, a "
            "torchvision weights file, or 'none')"
        )
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = load_weights_only(path, what="backbone weights")
    except UserError:
        raise
    except Exception as exc:  # first line only: torch's text goes on to advise weights_only=False
        first = (str(exc).strip().splitlines() or [""])[0]
        raise UserError(f"{path}: cannot read backbone weights ({type(exc).__name__}: {first})") from None
    if (
        isinstance(state, dict)
        and "model" in state
        and isinstance(state["model"], dict)
        and any(k.startswith(("encoder.", "module.encoder.")) for k in state["model"])
    ):
        raise UserError(
            f"{path}: a training checkpoint, not a backbone; run `hpc-lensiam export "
            f"--checkpoint {path} --out backbone.pt` first"
        )
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{path}: not a state_dict of tensors")
    side = read_sidecar(path)
    if side and side.get("weights_sha256") and state_sha256(state) != side["weights_sha256"]:
        # the sidecar describes other weights: a damaged or replaced file would be fine-tuned silently
        raise UserError(
            f"{path}: weights differ from those its sidecar {sidecar_path(path)} records (sha256 "
            f"{state_sha256(state)[:12]} vs {side['weights_sha256'][:12]}); the file was damaged or "
            f"replaced: export it again"
        )
    return {k.removeprefix("module."): v for k, v in state.items()}


def read_sidecar(path: str | os.PathLike) -> dict | None:
    p = sidecar_path(path)
    if not p.is_file():
        return None
    try:
        return json.loads(p.read_text())
    except ValueError:
        raise UserError(f"{p}: sidecar is not valid JSON") from None
