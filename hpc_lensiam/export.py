"""Export a pretrained backbone as a stock torchvision ResNet state_dict (+ a JSON sidecar).

Contract (facebookresearch/simsiam's main_lincls.py): keep ``encoder.*`` minus ``encoder.fc.*``
(the projector), strip the prefix. Training uses a 1-channel ``conv1`` (models/simsiam.py); it is
folded into torchvision's 3-channel ``conv1`` as ``w3 = repeat(w1, 3) / 3``, so an image (divided by
its max, as in training) repeated on 3 channels gives the same features as the trained backbone.
``torchvision.models.<arch>()`` then loads the file with ``strict=False``, missing exactly
``fc.weight`` and ``fc.bias`` and nothing unexpected; the exporter checks that, and checks the
features against the trained backbone on a test image, before writing anything.

Reads DDP ``last.pt`` files, run folders and DeepSpeed checkpoint folders alike
(:func:`hpc_lensiam.train.checkpoint.load_model_state`).
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from .errors import UserError
from .io import atomic_path, atomic_write_json, read_manifest, sha256_json

FORMATS = ("pt", "safetensors")
SIDECAR_FORMAT = "hpc_lensiam.backbone/1"
NORMALISATION = "each image divided by its maximum (max = 1), as the shards store it; no mean/std subtraction"
CHANNELS = "grayscale image repeated on 3 channels (conv1 folded from the 1-channel training stem)"
# torchvision ResNets by (bottleneck blocks?, blocks per stage)
_RESNETS = {(False, (2, 2, 2, 2)): "resnet18", (False, (3, 4, 6, 3)): "resnet34",
            (True, (3, 4, 6, 3)): "resnet50", (True, (3, 4, 23, 3)): "resnet101",
            (True, (3, 8, 36, 3)): "resnet152"}


# ------------------------------------------------------------------------------------ helpers
def infer_arch(state: dict) -> str | None:
    """torchvision ResNet name from a backbone state_dict's keys (None if it is not one)."""
    counts = []
    for i in range(1, 5):
        idx = {int(k.split(".")[1]) for k in state if k.startswith(f"layer{i}.") and k.split(".")[1].isdigit()}
        if not idx:
            return None
        counts.append(max(idx) + 1)
    bottleneck = any(k.startswith("layer1.0.conv3.") for k in state)
    return _RESNETS.get((bottleneck, tuple(counts)))


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


def fold_conv1(state: dict) -> dict:
    """1-channel ``conv1.weight`` -> 3-channel ``repeat / 3`` (same output on a repeated image)."""
    w = state.get("conv1.weight")
    if w is not None and w.shape[1] == 1:
        state = dict(state)
        state["conv1.weight"] = (w.repeat(1, 3, 1, 1) / 3.0).contiguous()
    return state


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
    """
    from .models.simsiam import backbone_state_dict, feature_dim
    from .train.checkpoint import load_model_state

    if not Path(checkpoint).exists():
        raise UserError(f"{checkpoint}: no such checkpoint (expected RUN/checkpoints/last.pt, a run "
                        "folder or a DeepSpeed checkpoint folder)")
    state, config, step = load_model_state(checkpoint)
    bb = backbone_state_dict(state)
    if not bb or "conv1.weight" not in bb:
        raise UserError(f"{checkpoint}: no encoder.* backbone weights: not a SimSiam/LenSiam training "
                        "checkpoint (an exported backbone goes to `finetune --backbone`, not here)")
    config = config if isinstance(config, dict) else {}
    found = infer_arch(bb)
    declared = config.get("arch")
    if found is None:
        raise UserError(f"{checkpoint}: backbone weights match no torchvision ResNet")
    if declared and declared != found:
        raise UserError(f"{checkpoint}: its config says arch {declared!r} but its weights are a {found}")
    if arch and arch != found:
        raise UserError(f"{checkpoint}: checkpoint of the wrong arch: {found}, expected {arch}")
    try:
        dim = feature_dim(found)
    except ValueError as exc:
        raise UserError(f"{checkpoint}: {exc}") from None
    info = {"arch": found, "mode": config.get("mode", "unknown"), "step": int(step or 0),
            "config_hash": sha256_json(config) if config else "", "feature_dim": dim,
            "weights_sha256": state_sha256(bb), "engine": config.get("engine", "unknown"),
            "image_shape": _image_shape(config), "checkpoint": str(Path(checkpoint).resolve())}
    return bb, info


def load_backbone(checkpoint: str | os.PathLike, arch: str | None = None):
    """(trained 1-channel backbone module in eval mode, info) from a training checkpoint."""
    from .models.simsiam import build_backbone

    bb, info = backbone_from_checkpoint(checkpoint, arch)
    net = build_backbone(info["arch"])
    try:
        net.load_state_dict(bb, strict=True)
    except RuntimeError as exc:
        raise UserError(f"{checkpoint}: backbone weights do not fit {info['arch']} "
                        f"({str(exc).splitlines()[0]})") from None
    return net.eval(), info


def checkpoint_fingerprint(checkpoint: str | os.PathLike) -> str:
    """sha256 of the checkpoint's backbone weights: equal for the DDP and DeepSpeed copies of a state."""
    return backbone_from_checkpoint(checkpoint)[1]["weights_sha256"]


# --------------------------------------------------------------------------------------- export
def to_torchvision(bb: dict, arch: str):
    """Fold conv1, load into ``torchvision.models.<arch>()`` checking the missing/unexpected keys."""
    import torchvision

    state = fold_conv1(bb)
    tv = getattr(torchvision.models, arch)(weights=None)
    try:
        res = tv.load_state_dict(state, strict=False)
    except RuntimeError as exc:
        raise UserError(f"backbone weights do not fit torchvision {arch} ({str(exc).splitlines()[0]})") from None
    if sorted(res.missing_keys) != ["fc.bias", "fc.weight"] or res.unexpected_keys:
        raise RuntimeError(f"export contract broken for {arch}: missing {res.missing_keys}, "
                           f"unexpected {res.unexpected_keys} (expected missing fc.weight, fc.bias only)")
    return state, tv


def export_backbone(checkpoint: str, out: str, fmt: str = "pt", arch: str | None = None) -> dict:
    """Write ``out`` (torchvision state_dict, ``.pt`` or safetensors) and ``out.json``; return the sidecar."""
    import torch
    import torch.nn as nn

    if fmt not in FORMATS:
        raise UserError(f"--format: {fmt!r} is not one of {', '.join(FORMATS)}")
    net, info = load_backbone(checkpoint, arch)
    state, tv = to_torchvision(net.state_dict(), info["arch"])

    # the promise, checked: a repeated grayscale image gives the trained backbone's features
    tv.fc = nn.Identity()
    tv.eval()
    g = torch.Generator().manual_seed(0)
    side = (info["image_shape"] or [64, 64])
    x = torch.rand(2, 1, *side, generator=g)
    x = x / x.amax(dim=(2, 3), keepdim=True)
    with torch.inference_mode():
        a, b = net(x), tv(x.repeat(1, 3, 1, 1))
    err = float((a - b).abs().max() / a.abs().max().clamp_min(1e-12))
    if err > 1e-4:
        raise RuntimeError(f"export: torchvision {info['arch']} features differ from the trained backbone "
                           f"(max relative error {err:.2e})")

    out = Path(out)
    state = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    with atomic_path(out) as tmp:
        if fmt == "pt":
            torch.save(state, tmp)
        else:
            from safetensors.torch import save_file
            save_file(state, str(tmp), metadata={"format": SIDECAR_FORMAT, "arch": info["arch"]})
    n_params = sum(v.numel() for k, v in state.items() if not k.endswith("num_batches_tracked"))
    sidecar = {
        "format": SIDECAR_FORMAT,
        "weights": out.name, "weights_format": fmt, "weights_sha256": state_sha256(state),
        "arch": info["arch"], "feature_dim": info["feature_dim"], "num_parameters": n_params,
        "load": (f"m = torchvision.models.{info['arch']}(); "
                 f"m.load_state_dict({'torch.load(f)' if fmt == 'pt' else 'safetensors.torch.load_file(f)'}, "
                 "strict=False)  # missing only fc.weight, fc.bias"),
        "input": {"channels": 3, "channel_note": CHANNELS, "size": info["image_shape"],
                  "size_note": "training image size (native, no resize); global pooling accepts any size",
                  "normalisation": NORMALISATION, "dtype": "float32"},
        "training": {"mode": info["mode"], "step": info["step"], "config_hash": info["config_hash"],
                     "engine": info["engine"], "checkpoint": info["checkpoint"],
                     "backbone_weights_sha256": info["weights_sha256"]},
        "check": {"features_max_relative_error": err},
    }
    atomic_write_json(sidecar_path(out), sidecar)
    print(f"export: {info['arch']} backbone ({info['mode']}, step {info['step']}, "
          f"{n_params / 1e6:.1f}M parameters, conv1 folded 1->3 channels, feature check {err:.1e}) -> {out} "
          f"[{fmt}]; torchvision.models.{info['arch']}() loads it with strict=False, missing only "
          f"fc.weight/fc.bias; sidecar {sidecar_path(out)}", flush=True)
    return sidecar


# ------------------------------------------------------------------------------ read an export back
def read_backbone_file(path: str | os.PathLike) -> dict:
    """A backbone weights file (our export, a torchvision weights file; .pt/.pth or safetensors)
    -> plain state_dict without ``fc.*``, ``module.`` prefixes stripped."""
    import torch
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: backbone file not found (expected `hpc-lensiam export` output, a "
                        "torchvision weights file, or 'none')")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file
            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise UserError(f"{path}: cannot read backbone weights ({type(exc).__name__}: {exc})") from None
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict) and any(
            k.startswith(("encoder.", "module.encoder.")) for k in state["model"]):
        raise UserError(f"{path}: a training checkpoint, not a backbone; run `hpc-lensiam export "
                        f"--checkpoint {path} --out backbone.pt` first")
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{path}: not a state_dict of tensors")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    return {k: v for k, v in state.items() if not k.startswith("fc.")}


def read_sidecar(path: str | os.PathLike) -> dict | None:
    p = sidecar_path(path)
    if not p.is_file():
        return None
    try:
        return json.loads(p.read_text())
    except ValueError:
        raise UserError(f"{p}: sidecar is not valid JSON") from None
