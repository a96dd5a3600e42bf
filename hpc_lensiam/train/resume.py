"""Resume: weights into the bare model first, then the engine's optimizer state, RNG, and a check.

Order matters. ZeRO-1 clones its fp32 master copy from the module inside ``deepspeed.initialize``
and copies it back after every step, so weights loaded after wrapping are silently replaced by
the fresh initialisation at the first step. So :func:`load_weights` runs *before*
``engine.wrap``, :func:`restore` after it, and :func:`verify` at the first resumed step's start
checks that the module holds the saved weights and that ZeRO's master copy equals them.

When the optimizer state cannot be read as saved (another engine, another ZeRO stage, or another
rank count under ZeRO >= 1, whose state is partitioned by rank) the run continues from the
weights with fresh momentum and says so in one line, instead of a FileNotFoundError.
"""

from __future__ import annotations

import sys
from pathlib import Path

from ..core.errors import UserError
from .checkpoint import load_for_resume, restore_rank_rng


def load_weights(model, ckpt_dir: Path, cfg) -> tuple[dict, Path]:
    """Read the checkpoint to resume from (``last.pt`` or a valid fallback) into the bare ``model``."""
    ckpt, path = load_for_resume(ckpt_dir)
    try:
        model.load_state_dict(ckpt["model"])
    except (RuntimeError, KeyError, ValueError, TypeError) as exc:  # another arch/width, a foreign file
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        was = (ckpt.get("config") or {}).get("method", "simsiam")
        raise UserError(
            f"{path}: cannot resume this run with --arch {cfg.arch} --proj-dim {cfg.proj_dim} "
            f"--pred-dim {cfg.pred_dim} --method {cfg.method} (checkpoint arch {ckpt.get('arch')!r}, "
            f"method {was!r}): {first}"
        ) from None
    return ckpt, path


def restore(engine, ckpt: dict, path: Path, ckpt_dir: Path, steps_per_epoch: int) -> int:
    """Optimizer/scaler state (or weights only, said in one line) and this rank's RNG; the step."""
    why = engine.load(ckpt, ckpt_dir)
    if why and engine.is_main:
        print(
            f"train: notice: resuming {path} (step {ckpt['step']}) with weights only, optimizer momentum "
            f"starts afresh: {why}",
            file=sys.stderr,
            flush=True,
        )
    note = restore_rank_rng(ckpt.get("rng") or {}, engine.rank, engine.device)
    if note:
        print(f"train: notice (rank {engine.rank}): random generator states {note}", file=sys.stderr, flush=True)
    saved_spe = (ckpt.get("scheduler") or {}).get("steps_per_epoch", steps_per_epoch)
    if saved_spe != steps_per_epoch and engine.is_main:
        print(
            f"warning: {path} was trained with {saved_spe} steps/epoch, now {steps_per_epoch}: the lr schedule changes",
            file=sys.stderr,
        )
    return int(ckpt["step"])


def verify(engine, ckpt: dict, path: Path) -> None:
    """At the first resumed step's start: the module holds the saved weights, and ZeRO's master
    copy equals the module (else the first step would silently bring back other weights)."""
    differ = engine.weights_differ(ckpt["model"])
    stale = engine.master_differs()
    if differ or stale:
        where = ", ".join((differ + stale)[:3])
        raise RuntimeError(
            f"resume from {path}: the engine does not hold the saved weights ({where}"
            f"{', ...' if len(differ) + len(stale) > 3 else ''}): refusing to train from other weights"
        )
