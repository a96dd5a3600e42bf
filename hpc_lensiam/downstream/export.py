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
folders alike (:func:`hpc_lensiam.models.weights.load_model_state`); the readers of what it writes
(:func:`~hpc_lensiam.models.weights.read_backbone_file`, the sidecar) are in :mod:`hpc_lensiam.models.weights`.
"""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

from ..core.config import from_flags
from ..core.io import FULL_DISK_BYTES, atomic_path, atomic_write_json, check_output_file
from ..models.weights import SIDECAR_FORMAT, load_backbone, sidecar_path, weights_sha256
from .config import ExportConfig

NORMALISATION = "each image divided by its maximum (max = 1), as the shards store it; no mean/std subtraction"


# ------------------------------------------------------------------------------------ helpers
# --------------------------------------------------------------------------------------- export
def export_backbone(
    checkpoint: str | None = None,
    out: str | None = None,
    fmt: str | None = None,
    arch: str | None = None,
    config: ExportConfig | None = None,
) -> dict:
    """Write ``out`` (library state_dict, ``.pt`` or safetensors) and ``out.json``; return the sidecar."""
    import torch

    from ..models.backbones import get

    if config is None:  # the Python API's arguments (None: the config's default), validated once
        config = from_flags(
            ExportConfig,
            dict(
                checkpoint=None if checkpoint is None else str(checkpoint),
                out=None if out is None else str(out),
                format=fmt,
                arch=arch,
            ),
        )
    checkpoint, out, fmt, arch = config.checkpoint, config.out, config.format, config.arch
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
        "weights_sha256": weights_sha256(state),
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
            "views": info["views"],
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
            if "No space left" in str(exc) or shutil.disk_usage(tmp.parent).free < FULL_DISK_BYTES:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(out)) from None
            raise
        atomic_write_json(sidecar_path(out), sidecar)
    print(
        f"export: {info['arch']} backbone ({info['method']}, {info['views']} views, step {info['step']}, "
        f"{n_params / 1e6:.1f}M parameters, {ex.in_chans}-channel input, feature check {err:.1e}) -> {out} "
        f"[{fmt}]; {ex.load.split(';')[0].removeprefix('m = ')} loads it ({ex.load.split('#')[-1].strip()}); "
        f"sidecar {sidecar_path(out)}",
        flush=True,
    )
    return sidecar
