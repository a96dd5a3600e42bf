"""A fine-tuned model on disk: what ``finetune --save-model`` writes and ``predict`` reads.

One safetensors file per fine-tuning seed: the tensors are the whole network (the stock library
backbone under ``features.``, the linear head under ``fc.``); the file's metadata holds one JSON
document (key ``hpc_lensiam``) with everything prediction needs besides weights:

- ``task``, ``target``, ``task_state`` (regression: the train split's target mean and sd, which
  turn the head's output back into arcsec), ``unit``;
- the network: ``arch``, ``in_chans``, ``feature_dim``, ``img_size`` (a ViT's bound side);
- the input grid it was trained on: ``input.pixel_scale_arcsec``, ``input.image_shape`` and the
  normalisation (each image divided by its maximum, as the shards store it);
- ``val_residual_sigma``: the residual sd on the validation split (target units), the aleatoric
  part of ``predict``'s uncertainty;
- provenance: the seed and recipe, the backbone file and its pretraining record, the train/test
  manifests' sha256, the test metrics.

safetensors holds raw tensors and strings only: loading one never runs code (unlike a pickle).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..core.errors import UserError
from ..core.io import atomic_path

FORMAT = "hpc_lensiam.model/1"
META_KEY = "hpc_lensiam"


def seed_path(path: str | os.PathLike, seed: int, n_seeds: int) -> Path:
    """Where seed ``seed`` goes: ``path`` itself for one seed, ``stem.seedS.safetensors`` for several."""
    path = Path(path)
    return path if n_seeds == 1 else path.with_name(f"{path.stem}.seed{seed}{path.suffix}")


def check_model_path(path: str | os.PathLike) -> None:
    """``--save-model`` must name a ``.safetensors`` file in a writable place (checked before training)."""
    from ..core.io import check_output_file

    if Path(path).suffix != ".safetensors":
        raise UserError(f"--save-model {path}: expected a file name ending in .safetensors")
    check_output_file(path, "--save-model")


def save_model(path: str | os.PathLike, net, meta: dict) -> Path:
    """Write ``net``'s weights and ``meta`` atomically (temporary name, fsync, rename)."""
    from safetensors.torch import save_file

    state = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    doc = json.dumps({"format": FORMAT, **meta}, sort_keys=True, default=float)
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata={META_KEY: doc})
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
    return Path(path)


def read_meta(path: str | os.PathLike) -> dict:
    """The metadata document of a saved model (no tensors read); one-line UserError on anything else."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise UserError(f"--model {path}: no such file (expected `finetune --save-model` output)")
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get(META_KEY)
    except Exception as exc:  # not a safetensors file, truncated header, ...
        first = (str(exc).strip().splitlines() or [""])[0]
        raise UserError(f"--model {path}: not a safetensors model file ({type(exc).__name__}: {first})") from None
    try:
        meta = json.loads(raw) if raw else None
    except json.JSONDecodeError:
        meta = None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise UserError(f"--model {path}: not an hpc_lensiam fine-tuned model (no {FORMAT!r} metadata)")
    return meta


def with_linear_head(features, in_chans: int, dim: int):
    """The library model (head = Identity) fed the export contract's input, with ``fc = Linear(D, 1)``:
    a grayscale image ``(N, 1, H, W)`` goes in repeated on the model's ``in_chans`` channels (3 for a
    torchvision ResNet, whose folded ``conv1`` then gives the trained features; 1 for a timm ViT)."""
    import torch.nn as nn

    class LinearHead(nn.Module):
        def __init__(self):
            super().__init__()
            self.features, self.in_chans, self.fc = features, in_chans, nn.Linear(dim, 1)

        def forward(self, x):
            return self.fc(self.features(x.repeat(1, self.in_chans, 1, 1)))

    return LinearHead()


def load_model(path: str | os.PathLike):
    """(network in eval mode on the CPU, metadata) from a saved model: the library backbone of the
    recorded arch with its linear head, loaded strictly (every key present, no key left over)."""
    from safetensors.torch import load_file

    from ..models.backbones import BACKBONES

    meta = read_meta(path)
    spec = BACKBONES.get(meta.get("arch"))
    if spec is None:
        raise UserError(f"--model {path}: arch {meta.get('arch')!r} is not a known backbone")
    features, in_chans = spec.library(meta.get("img_size"))
    net = with_linear_head(features, in_chans, spec.feature_dim)
    try:
        missing, unexpected = net.load_state_dict(load_file(str(path)), strict=False)
    except RuntimeError as exc:  # shape mismatch
        raise UserError(f"--model {path}: weights do not fit a {spec.name} ({str(exc).splitlines()[0]})") from None
    if missing or unexpected:
        raise UserError(
            f"--model {path}: weights do not fit a {spec.name} (missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    return net.eval(), meta
