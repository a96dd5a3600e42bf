"""Where trained weights live and how they are read back: the checkpoint file layout and its readers.

Layout of a run folder (written by :mod:`hpc_lensiam.train.checkpoint`)::

    RUN/checkpoints/last.pt             every engine: torch.save({"model", "config", "step", "epoch",
                                        "arch", "engine", "optimizer", "scheduler", "scaler", "rng", ...})
    RUN/checkpoints/step_000500.pt      periodic copies (same format)
    RUN/checkpoints/deepspeed/latest    DeepSpeed only: its own checkpoint folder
    RUN/checkpoints/deepspeed/<tag>/mp_rank_00_model_states.pt   weights under key "module"

Every checkpoint stores ``state_sha256`` (:func:`checkpoint_sha256`, a hash of its whole content),
checked on load. An exported backbone (``hpc-lensiam export``) is a library state_dict plus a JSON
sidecar recording :func:`weights_sha256` of its tensors. Readers here: a checkpoint (any engine's)
-> model state (:func:`load_model_state`) -> backbone (:func:`backbone_from_checkpoint`,
:func:`load_backbone`); a random backbone (:func:`random_backbone`); a backbone file and its
sidecar (:func:`read_backbone_file`, :func:`read_sidecar`). Every torch file goes through
:func:`load_weights_only`: no file's code ever runs.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

from ..core.errors import UserError
from ..core.io import check_torch_file, sha256_json
from ..shards.manifest import data_grid, read_manifest

LAST = "last.pt"
DS_DIR = "deepspeed"
HASH_KEY = "state_sha256"
SIDECAR_FORMAT = "hpc_lensiam.backbone/1"


# ------------------------------------------------------------------------------------ hashes
def _hash_into(h, obj) -> None:
    import torch

    """Feed ``obj`` (nested dicts/lists of tensors and plain values) into ``h``, deterministically."""
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    elif isinstance(obj, dict):
        h.update(b"{")
        for k in sorted(obj, key=repr):
            h.update(repr(k).encode())
            _hash_into(h, obj[k])
        h.update(b"}")
    elif isinstance(obj, (list, tuple)):
        h.update(b"[" if isinstance(obj, list) else b"(")
        for v in obj:
            _hash_into(h, v)
        h.update(b"]")
    else:
        h.update(repr(obj).encode())


def checkpoint_sha256(state: dict) -> str:
    """sha256 of a whole checkpoint's content (every tensor's bytes, every other value's repr), without its
    own ``state_sha256`` entry: the integrity hash stored in ``last.pt``/``step_*.pt``."""
    h = hashlib.sha256()
    _hash_into(h, {k: v for k, v in state.items() if k != HASH_KEY})
    return h.hexdigest()


def weights_sha256(state: dict) -> str:
    """Hash of a state_dict's tensors: names, dtypes, shapes and values (format-independent identity of
    a backbone's weights: the same for its .pt and safetensors files and its DDP/DeepSpeed sources)."""
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


# ------------------------------------------------------------------------- checkpoint files
def _strip_module(state: dict) -> dict:
    return {k.removeprefix("module."): v for k, v in state.items()}


def _resolve(path: Path) -> Path:
    """A checkpoint file, a DeepSpeed folder (has ``latest``), ``RUN/checkpoints`` or ``RUN``."""
    if path.is_file():
        return path
    if not path.is_dir():
        raise UserError(f"{path}: no such checkpoint (expected RUN, RUN/checkpoints/last.pt or a DeepSpeed folder)")
    for candidate in (path / LAST, path / "checkpoints" / LAST):
        if candidate.is_file():
            return candidate
    for candidate in (path, path / DS_DIR, path / "checkpoints" / DS_DIR):
        if (candidate / "latest").is_file():
            return candidate
    raise UserError(f"{path}: holds no checkpoint (no last.pt, checkpoints/last.pt or DeepSpeed 'latest')")


# The only classes (beyond tensors and plain containers) DeepSpeed 0.19 pickles into its checkpoint
# files: the loss scaler, ZeRO's fragment addresses and stage enum in the optimizer-state files.
DEEPSPEED_SAFE_GLOBALS = (
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.utils.tensor_fragment.fragment_address",
    "deepspeed.runtime.zero.config.ZeroStageEnum",
)


def _deepspeed_safe_globals() -> list:
    """The classes of :data:`DEEPSPEED_SAFE_GLOBALS` (those importable: none without DeepSpeed)."""
    import importlib

    out = []
    for name in DEEPSPEED_SAFE_GLOBALS:
        module, _, attr = name.rpartition(".")
        try:
            out.append(getattr(importlib.import_module(module), attr))
        except (ImportError, AttributeError):
            continue
    return out


def load_weights_only(path: str | os.PathLike, map_location="cpu", what: str = "checkpoint"):
    """``torch.load`` that never runs a file's code: ``weights_only=True`` (tensors, plain containers)
    plus only DeepSpeed's few known classes, for every torch file a user may hand the package (our
    checkpoints, DeepSpeed's model and optimizer files, backbones). A file that needs any other
    global is refused in one line (``UserError``), never unpickled with ``weights_only=False``."""
    import torch

    path = Path(path)
    check_torch_file(path)
    try:
        with torch.serialization.safe_globals(_deepspeed_safe_globals()):
            return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # truncated, not a torch file, a disallowed global, ...
        text = str(exc)
        unsupported = re.search(r"Unsupported global: GLOBAL (\S+)", text)
        if unsupported:  # torch's own text goes on to advise weights_only=False: never that
            raise UserError(
                f"{path}: refused to read {what}: it needs the Python global {unsupported.group(1)}, which "
                "a weights file never holds (loading it would run code from the file)"
            ) from None
        first = text.strip().splitlines()[0] if text.strip() else ""
        raise UserError(f"{path}: cannot read {what} ({type(exc).__name__}: {first})") from None


def load_checkpoint(path: str | os.PathLike) -> dict:
    """Load one of our checkpoint files (``last.pt``/``step_*.pt``) onto the CPU, hash checked."""
    path = Path(path)
    ckpt = load_weights_only(path)
    if not isinstance(ckpt, dict):
        raise UserError(f"{path}: not an hpc_lensiam checkpoint (a {type(ckpt).__name__}, not a dict)")
    if HASH_KEY in ckpt and checkpoint_sha256(ckpt) != ckpt[HASH_KEY]:
        raise UserError(f"{path}: corrupt checkpoint (content does not match its stored sha256)")
    return ckpt


def load_model_state(path: str | os.PathLike) -> tuple[dict, dict | None, int | None]:
    """Return ``(SimSiam state_dict, config dict, step)`` from any checkpoint this package writes.

    ``path`` may be ``RUN``, ``RUN/checkpoints``, a ``last.pt``/``step_*.pt`` file, a DeepSpeed
    checkpoint folder (``latest`` + ``<tag>/mp_rank_00_model_states.pt``, weights under
    ``"module"``) or such a ``mp_rank_00_model_states.pt`` file. DDP ``module.`` prefixes are
    stripped; floating tensors come back as fp32 on the CPU.
    """
    path = _resolve(Path(path))
    if path.is_dir():  # DeepSpeed folder
        tag = (path / "latest").read_text().strip()
        path = path / tag / "mp_rank_00_model_states.pt"
        if not path.is_file():
            raise UserError(f"{path}: missing (the DeepSpeed 'latest' file names tag {tag!r})")
    if path.name.startswith("mp_rank_"):
        ckpt = load_weights_only(path, what="DeepSpeed checkpoint")
        if not isinstance(ckpt, dict):
            raise UserError(f"{path}: not a DeepSpeed checkpoint (a {type(ckpt).__name__}, not a dict)")
        state, step = ckpt.get("module"), ckpt.get("step", ckpt.get("global_steps"))
    else:
        ckpt = load_checkpoint(path)
        state, step = ckpt.get("model"), ckpt.get("step")
    if not isinstance(state, dict):
        raise UserError(f"{path}: no model weights in this checkpoint")
    import torch

    state = {k: (v.float() if torch.is_floating_point(v) else v) for k, v in _strip_module(state).items()}
    return state, ckpt.get("config"), step


# ------------------------------------------------------------------------------------ sidecars
def sidecar_path(out: str | os.PathLike) -> Path:
    out = Path(out)
    return out.with_name(out.name + ".json")


def _training_grid(config: dict | None) -> dict | None:
    """The pixel grid of the data a checkpoint was trained on (its manifest), None where unknown."""
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
    from .backbones import BACKBONES, backbone_state_dict, recognise
    from .methods import views_of

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
        raise UserError(
            f"{checkpoint}: backbone weights match no known backbone (expected one of: {', '.join(BACKBONES)})"
        )
    found = spec.name
    if declared and declared != found:
        raise UserError(f"{checkpoint}: its config says arch {declared!r} but its weights are a {found}")
    if arch and arch != found:
        raise UserError(f"{checkpoint}: checkpoint of the wrong arch: {found}, expected {arch}")
    img_size = spec.img_size_of(bb)
    info = {
        "arch": found,
        "views": views_of(config),  # lens | standard (an older run's mode: translated) | unknown
        "mode": views_of(config),  # how the backbone was trained (embed's train_mode): its views here
        "method": config.get("method", "simsiam"),
        "step": int(step or 0),
        "config_hash": sha256_json(config) if config else "",
        "feature_dim": BACKBONES[found].feature_dim,
        "img_size": img_size,
        "weights_sha256": weights_sha256(bb),
        "engine": config.get("engine", "unknown"),
        "image_shape": _image_shape(config),
        "training_grid": _training_grid(config),
        "checkpoint": str(Path(checkpoint).resolve()),
    }
    return bb, info


def load_backbone(checkpoint: str | os.PathLike, arch: str | None = None):
    """(trained 1-channel backbone module in eval mode, info) from a training checkpoint."""
    from .backbones import build_backbone

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

    from .backbones import BACKBONES, build_backbone

    if arch not in BACKBONES:
        raise UserError(f"--arch: {arch!r} is not one of {', '.join(BACKBONES)}")
    torch.manual_seed(seed)
    try:
        net = build_backbone(arch, zero_init_residual=False, img_size=img_size)
    except ValueError as exc:
        raise UserError(f"--arch: {exc}") from None
    info = {
        "arch": arch,
        "views": "none",
        "mode": "random-weights",
        "method": "none",
        "step": 0,
        "config_hash": "",
        "feature_dim": BACKBONES[arch].feature_dim,
        "img_size": img_size,
        "weights_sha256": weights_sha256(net.state_dict()),
        "engine": "none",
        "image_shape": None,
        "checkpoint": f"none (random {arch} weights, seed {seed})",
    }
    return net.eval(), info


# ------------------------------------------------------------------------------ read an export back
def read_backbone_file(path: str | os.PathLike) -> dict:
    """A backbone weights file (our export, a library weights file; .pt/.pth or safetensors)
    -> plain state_dict, ``module.`` prefixes stripped. A library file's classifier head stays: which
    keys are the head depends on the arch, so the caller drops them once it is recognised."""
    import torch

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
    if side and side.get("weights_sha256") and weights_sha256(state) != side["weights_sha256"]:
        # the sidecar describes other weights: a damaged or replaced file would be fine-tuned silently
        raise UserError(
            f"{path}: weights differ from those its sidecar {sidecar_path(path)} records (sha256 "
            f"{weights_sha256(state)[:12]} vs {side['weights_sha256'][:12]}); the file was damaged or "
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
