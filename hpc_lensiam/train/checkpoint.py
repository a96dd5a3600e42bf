"""Checkpoint files: atomic save, periodic copies, per-rank generator states and resume.

The file layout and its readers are :mod:`hpc_lensiam.models.weights`. Layout of a run folder::

    RUN/checkpoints/last.pt             every engine: torch.save({"model", "config", "step", "epoch",
                                        "arch", "engine", "optimizer", "scheduler", "scaler", "rng", ...})
    RUN/checkpoints/step_000500.pt      periodic copies (same format)
    RUN/checkpoints/deepspeed/latest    DeepSpeed only: its own checkpoint folder
    RUN/checkpoints/deepspeed/<tag>/mp_rank_00_model_states.pt   weights under key "module"

``last.pt`` is written by global rank 0 only, through a temporary file that is fsync'd, renamed
into place, and the folder fsync'd: a killed run or a crashed node always leaves the previous
complete checkpoint. With DeepSpeed, ``last.pt`` holds the model weights too (so every downstream
tool reads one format) and names the DeepSpeed tag that holds the matching optimizer state.

Integrity: every checkpoint stores ``state_sha256``
(:func:`~hpc_lensiam.models.weights.checkpoint_sha256`), a hash of its whole content (every tensor's
bytes, every other value's repr), checked on load. A file whose bytes were flipped may still
unpickle (tensor data is stored raw); the hash catches it. ``--resume`` then falls back to the
newest readable and valid ``step_*.pt`` with a warning naming both files (:func:`load_for_resume`).
Periodic copies beyond the newest ``keep_last`` are deleted (with their DeepSpeed tags).
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import sys
from pathlib import Path

import torch

from ..core.errors import UserError
from ..core.io import FULL_DISK_BYTES, atomic_path
from ..models.weights import DS_DIR, HASH_KEY, LAST, checkpoint_sha256, load_checkpoint

_PERIODIC = re.compile(r"^step_(\d+)\.pt$")


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    """Make a rename inside ``path`` durable (the directory entry, not only the data)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(path: str | os.PathLike, state: dict) -> None:
    """``torch.save`` to a temporary file beside ``path``, fsync, rename, fsync the folder:
    never a half-written file, and the new one survives a power loss once this returns."""
    path = Path(path)
    state = {**state, HASH_KEY: checkpoint_sha256(state)}
    with atomic_path(path) as tmp:
        try:
            torch.save(state, tmp)
        except RuntimeError:  # torch's zip writer reports a full disk as an "enforce fail", no errno
            if shutil.disk_usage(tmp.parent).free < FULL_DISK_BYTES:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path)) from None
            raise
        _fsync_file(tmp)
    _fsync_dir(path.parent)


def periodic_checkpoints(ckpt_dir: Path) -> list[tuple[int, Path]]:
    """``(step, path)`` of every ``step_*.pt`` in ``ckpt_dir``, newest first."""
    if not ckpt_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in ckpt_dir.iterdir() if (m := _PERIODIC.match(p.name))]
    return sorted(found, reverse=True)


def periodic_tags(ckpt_dir: Path) -> list[str]:
    """DeepSpeed tags the kept ``step_*.pt`` files name (tag = file stem)."""
    return [p.stem for _, p in periodic_checkpoints(ckpt_dir)]


def prune_deepspeed_tags(ckpt_dir: Path, keep: set[str]) -> None:
    """Delete DeepSpeed tag folders no checkpoint file names any more."""
    ds = ckpt_dir / DS_DIR
    if ds.is_dir():
        for d in ds.iterdir():
            if d.is_dir() and _PERIODIC.match(d.name + ".pt") and d.name not in keep:
                shutil.rmtree(d, ignore_errors=True)


def save_periodic(ckpt_dir: Path, step: int, keep_last: int = 0) -> Path:
    """Copy ``last.pt`` to ``step_NNNNNNNN.pt`` (atomic, fsync'd); keep only the newest ``keep_last``
    periodic copies (0 keeps all): the paper run's would otherwise take 11-17 GB."""
    dest = ckpt_dir / f"step_{step:08d}.pt"
    with atomic_path(dest) as tmp:
        shutil.copyfile(ckpt_dir / LAST, tmp)
        _fsync_file(tmp)
    if keep_last > 0:
        for _, old in periodic_checkpoints(ckpt_dir)[keep_last:]:
            old.unlink(missing_ok=True)
    _fsync_dir(ckpt_dir)
    return dest


# ------------------------------------------------------------------------------ RNG per rank
def capture_rank_rng(device: torch.device) -> dict:
    """This rank's generator states: CPU, and its own GPU's (not every visible GPU's)."""
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return {"torch": torch.get_rng_state(), "cuda": cuda}


def rank_rng(rng: dict, rank: int, device_index: int | None) -> tuple[dict, str | None]:
    """The states rank ``rank`` (on GPU ``device_index``, None on a CPU) should restore, and a note
    when some cannot be (more ranks or fewer GPUs than when saved): never an IndexError.

    Current checkpoints hold ``rng["per_rank"][r] = {"torch", "cuda"}``; older ones rank 0's CPU state
    and the list of every GPU rank 0 could see (``rng["cuda"]``).
    """
    out, note = {"torch": None, "cuda": None}, None
    per_rank = rng.get("per_rank")
    if per_rank is not None:
        if rank < len(per_rank):
            out = dict(per_rank[rank])
        else:
            note = f"saved by {len(per_rank)} rank(s): rank {rank} starts with fresh generator states"
    else:
        out["torch"] = rng.get("torch")
        cuda = rng.get("cuda") or []
        if device_index is not None and cuda:
            if device_index < len(cuda):
                out["cuda"] = cuda[device_index]
            else:
                note = f"saved with {len(cuda)} GPU state(s): GPU {device_index} starts with a fresh generator"
    if device_index is None:
        out["cuda"] = None
    return out, note


def restore_rank_rng(rng: dict, rank: int, device: torch.device) -> str | None:
    """Restore this rank's generator states from a checkpoint's ``rng``; returns :func:`rank_rng`'s note."""
    import random

    states, note = rank_rng(rng, rank, device.index if device.type == "cuda" else None)
    if states.get("torch") is not None:
        torch.set_rng_state(states["torch"])
    if states.get("cuda") is not None:
        torch.cuda.set_rng_state(states["cuda"], device)
    if "python" in rng:
        random.setstate(rng["python"])
    return note


def load_for_resume(ckpt_dir: Path) -> tuple[dict, Path]:
    """``last.pt``, or when it is unreadable or corrupt the newest valid ``step_*.pt`` (warning
    naming both). Raises UserError when no checkpoint in ``ckpt_dir`` can be used."""
    last = ckpt_dir / LAST
    try:
        return load_checkpoint(last), last
    except UserError as exc:
        why = str(exc)
    for step, path in periodic_checkpoints(ckpt_dir):
        try:
            ckpt = load_checkpoint(path)
        except UserError:
            continue
        print(f"train: warning: {why}; resuming from {path} (step {step}) instead", file=sys.stderr, flush=True)
        return ckpt, path
    raise UserError(
        f"{why}; and no readable step_*.pt in {ckpt_dir} to fall back to "
        f"(remove --resume and choose another --out to start afresh)"
    )
