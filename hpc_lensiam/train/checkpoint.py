"""Checkpoint files: atomic save, and one reader for DDP and DeepSpeed checkpoints alike.

Layout of a run folder::

    RUN/checkpoints/last.pt             every engine: torch.save({"model", "config", "step", "epoch",
                                        "arch", "engine", "optimizer", "scheduler", "scaler", "rng", ...})
    RUN/checkpoints/step_000500.pt      periodic copies (same format)
    RUN/checkpoints/deepspeed/latest    DeepSpeed only: its own checkpoint folder
    RUN/checkpoints/deepspeed/<tag>/mp_rank_00_model_states.pt   weights under key "module"

``last.pt`` is written by global rank 0 only, through a temporary file that is fsync'd, renamed
into place, and the folder fsync'd: a killed run or a crashed node always leaves the previous
complete checkpoint. With DeepSpeed, ``last.pt`` holds the model weights too (so every downstream
tool reads one format) and names the DeepSpeed tag that holds the matching optimizer state.

Integrity: every checkpoint stores ``state_sha256``, a hash of its whole content (every tensor's
bytes, every other value's repr), checked on load. A file whose bytes were flipped may still
unpickle (tensor data is stored raw); the hash catches it. ``--resume`` then falls back to the
newest readable and valid ``step_*.pt`` with a warning naming both files (:func:`load_for_resume`).
Periodic copies beyond the newest ``keep_last`` are deleted (with their DeepSpeed tags).
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
import shutil
import sys
from pathlib import Path

import torch

from ..errors import UserError
from ..io import atomic_path, check_torch_file

LAST = "last.pt"
DS_DIR = "deepspeed"
HASH_KEY = "state_sha256"
_PERIODIC = re.compile(r"^step_(\d+)\.pt$")
_FULL_BYTES = 1 << 20  # free space under which a failed torch.save is taken for a full disk


def _hash_into(h, obj) -> None:
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


def state_sha256(state: dict) -> str:
    """sha256 of a checkpoint's content, without its own ``state_sha256`` entry."""
    h = hashlib.sha256()
    _hash_into(h, {k: v for k, v in state.items() if k != HASH_KEY})
    return h.hexdigest()


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
    state = {**state, HASH_KEY: state_sha256(state)}
    with atomic_path(path) as tmp:
        try:
            torch.save(state, tmp)
        except RuntimeError:  # torch's zip writer reports a full disk as an "enforce fail", no errno
            if shutil.disk_usage(tmp.parent).free < _FULL_BYTES:
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
    if HASH_KEY in ckpt and state_sha256(ckpt) != ckpt[HASH_KEY]:
        raise UserError(f"{path}: corrupt checkpoint (content does not match its stored sha256)")
    return ckpt


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
    state = {k: (v.float() if torch.is_floating_point(v) else v) for k, v in _strip_module(state).items()}
    return state, ckpt.get("config"), step
