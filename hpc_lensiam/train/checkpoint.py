"""Checkpoint files: atomic save, and one reader for DDP and DeepSpeed checkpoints alike.

Layout of a run folder::

    RUN/checkpoints/last.pt             every engine: torch.save({"model", "config", "step", "epoch",
                                        "arch", "engine", "optimizer", "scheduler", "scaler", "rng", ...})
    RUN/checkpoints/step_000500.pt      periodic copies (same format)
    RUN/checkpoints/deepspeed/latest    DeepSpeed only: its own checkpoint folder
    RUN/checkpoints/deepspeed/<tag>/mp_rank_00_model_states.pt   weights under key "module"

``last.pt`` is written by global rank 0 only, through a temporary file renamed into place, so a
killed run always leaves the previous complete checkpoint. With DeepSpeed, ``last.pt`` holds the
model weights too (so every downstream tool reads one format) and names the DeepSpeed tag that
holds the matching optimizer state.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from ..errors import UserError
from ..io import atomic_path

LAST = "last.pt"
DS_DIR = "deepspeed"


def save_checkpoint(path: str | os.PathLike, state: dict) -> None:
    """``torch.save`` to a temporary file beside ``path``, then rename: never a half-written file."""
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


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


def load_checkpoint(path: str | os.PathLike) -> dict:
    """Load one of our checkpoint files (``last.pt``/``step_*.pt``) onto the CPU."""
    path = Path(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated, not a torch file, ...
        raise UserError(f"{path}: cannot read checkpoint ({type(exc).__name__}: {exc})") from None


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
        try:  # DeepSpeed's own file pickles its config objects too
            ckpt = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as exc:
            raise UserError(f"{path}: cannot read DeepSpeed checkpoint ({type(exc).__name__}: {exc})") from None
        state, step = ckpt.get("module"), ckpt.get("step", ckpt.get("global_steps"))
    else:
        ckpt = load_checkpoint(path)
        state, step = ckpt.get("model"), ckpt.get("step")
    if not isinstance(state, dict):
        raise UserError(f"{path}: no model weights in this checkpoint")
    state = {k: (v.float() if torch.is_floating_point(v) else v) for k, v in _strip_module(state).items()}
    return state, ckpt.get("config"), step
