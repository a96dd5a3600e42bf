"""A training run folder that one job owns, and whose ``--resume`` continues the same run.

* **Lock.** Global rank 0 holds ``RUN/.lock`` (``fcntl.flock``, see :mod:`hpc_lensiam.core.lock`) from
  start to end; every rank learns whether it got it before anything is written, so a second
  ``train`` into the same ``--out`` fails at once naming the holder's host and pid instead of
  overwriting run A's checkpoints and interleaving ``metrics.csv``. Leftover ``.tmp-*`` files of
  a killed run are removed under the lock.
* **Resume guard.** Each checkpoint stores ``config_hash`` (of the keys that define the run,
  :data:`GUARDED`) and ``data_manifest_sha256`` (the data source's identity: a shard directory's
  manifest sha256, an online source's simulation config's with the sha256 of the PSF/COSMOS files it
  names, which ``data_inputs`` also stores by path). ``--resume`` with other data or another value of
  a guarded key is a one-line error naming the keys (and any edited file); with
  ``--allow-config-change`` the change is appended to ``RUN/config_history.yaml``, the config used
  until then is kept as ``RUN/config.N.yaml`` (N = 1 for the first change) and ``RUN/config.yaml``
  becomes the config now used, so that ``--config RUN/config.yaml --resume`` (the refusal's advice)
  continues the run as it now is.
* **Nothing left by a refusal.** A run refused before it wrote anything (data that does not fit
  the model or the batch, a refused resume) removes the ``.lock`` and the folders it created.
* **Metrics repair.** On resume ``metrics.csv`` keeps its well-formed rows up to the checkpoint's
  step; a damaged tail (a kill mid-write, a full disk) is dropped with a warning, never fatal.
"""

from __future__ import annotations

import csv
import sys
import time
from pathlib import Path

import torch

from ..core.config import dump_yaml, to_dict
from ..core.errors import UserError
from ..core.io import TMP_PREFIX, atomic_write_text, sha256_json
from ..core.lock import LOCK_NAME, DirLock, prepare_dir
from ..data.sources import source_for
from .config import translate_saved
from .monitor import METRICS

# What makes a resumed run the same run: its data (manifest sha256) and these keys. Not guarded:
# epochs/max_steps (extending a run), engine/precision/workers (how it runs), logging cadence.
GUARDED = (
    "views",
    "method",
    "arch",
    "seed",
    "base_lr",
    "lr_scaling",
    "optimizer",
    "batch_size",
    "grad_accum",
    "momentum",
    "weight_decay",
    "warmup_epochs",
    "fix_pred_lr",
    "proj_dim",
    "proj_hidden_dim",
    "pred_dim",
    "method_params",  # the method's own hyperparameters (BYOL's EMA, SimCLR's temperature, ...)
    "zero_init_residual",
    "shuffle_buffer",
)
HISTORY = "config_history.yaml"
RESOLVED = "# resolved:"  # the first line of RUN/config.yaml: the numbers the run resolved


def _missing_top(path: Path) -> Path | None:
    """The outermost folder of ``path`` (itself included) that does not exist yet, or None."""
    top, p = None, path.absolute()
    while not p.exists():
        top, p = p, p.parent
    return top


def config_hash(config: dict) -> str:
    return sha256_json({k: config.get(k) for k in GUARDED})


class RunDir:
    """``RUN`` of one training job; rank 0 holds the lock until :meth:`close`."""

    def __init__(self, cfg, engine, allow_config_change: bool = False):
        self.cfg, self.engine, self.allow = cfg, engine, allow_config_change
        self.out = Path(cfg.out)
        self.lock = DirLock(self.out, "train")
        # the data's identity (shards: manifest sha256; online: its simulation config's); checks --data
        # before the run folder is created (data/sources.py)
        source = source_for(cfg.data)
        self.manifest_sha = source.identity(cfg.data)
        self.data_inputs = source.inputs(cfg.data)  # {path: sha256} behind the identity, to name a change
        failed = ""
        self.written = False  # anything written into the folder (a refused run removes what it made)
        self.new_top = self.lock_existed = None
        if engine.is_main:
            self.new_top = _missing_top(self.out)
            self.lock_existed = (self.out / LOCK_NAME).exists()
            try:
                prepare_dir(self.out)
                self.lock.acquire()
                for d in (self.out, self.out / "checkpoints"):
                    for stale in d.glob(TMP_PREFIX + "*"):  # partial files of a killed run
                        stale.unlink(missing_ok=True)
            except UserError as exc:
                failed = str(exc)
        # every rank learns whether rank 0 owns the folder before anyone writes to it
        flag = engine.all_reduce_sum(torch.tensor([float(bool(failed))], device=engine.device))
        if failed:
            raise UserError(failed)
        if flag.item() > 0:
            raise UserError(f"{self.out}: rank 0 could not take the run folder (see its error)")
        self.changes: dict = {}

    def state_keys(self) -> dict:
        """Keys every checkpoint carries so that ``--resume`` can tell it is the same run."""
        keys = {"config_hash": config_hash(to_dict(self.cfg)), "data_manifest_sha256": self.manifest_sha}
        if self.data_inputs:
            keys["data_inputs"] = self.data_inputs
        return keys

    def check_resume(self, ckpt: dict, path: Path) -> None:
        """Refuse to continue ``ckpt`` with other data or another value of a guarded key."""
        old = translate_saved(ckpt.get("config") or {})  # an older run's mode:/flat method keys
        new = to_dict(self.cfg)
        changes = {k: (old[k], new[k]) for k in GUARDED if k in old and old[k] != new[k]}
        old_data = ckpt.get("data_manifest_sha256")
        if old_data and self.manifest_sha and old_data != self.manifest_sha:
            was, now = ckpt.get("data_inputs") or {}, self.data_inputs
            edited = sorted(p for p in {*was, *now} if was.get(p) != now.get(p))
            changes["data"] = (
                f"{old.get('data')} (manifest sha256 {old_data[:12]})",
                f"{new['data']} (manifest sha256 {self.manifest_sha[:12]}"
                + (f"; sha256 of {', '.join(edited)} changed)" if edited else ")"),
            )
        if changes and not self.allow:
            what = ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in changes.items())
            raise UserError(
                f"--resume: {path} (step {ckpt.get('step')}) was trained with other settings: "
                f"{what}; use the run's own settings (RUN/config.yaml), another --out, or "
                f"--allow-config-change to continue anyway (recorded in RUN/{HISTORY})"
            )
        self.changes = changes

    def write_config(self, header: str, resume: bool, step: int) -> None:
        """``config.yaml`` (a fresh run); a resume that changes anything appends to the history, and
        an allowed change of a guarded key or the data makes ``config.yaml`` the config now used,
        keeping the one before as ``config.N.yaml``."""
        text = header + dump_yaml(self.cfg)
        first = self.out / "config.yaml"
        self.written = True
        if not resume or not first.is_file():
            atomic_write_text(first, text)
            return
        if first.read_text() == text:
            return
        kept = None
        if self.changes:  # an allowed change: config.yaml follows the run, the one used until now is kept
            n = 1
            while (self.out / f"config.{n}.yaml").exists():
                n += 1
            kept = self.out / f"config.{n}.yaml"
            atomic_write_text(kept, first.read_text())
        entry = {
            "resumed_at_step": step,
            "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "changed": {k: {"before": a, "after": b} for k, (a, b) in self.changes.items()},
            "resolved": header.strip().removeprefix(RESOLVED).strip(),
            "config": to_dict(self.cfg),
        }
        if kept is not None:
            entry["previous_config"] = kept.name
        history = self.out / HISTORY
        old = history.read_text() if history.is_file() else ""
        atomic_write_text(history, old + dump_yaml([entry]))
        if kept is not None:
            atomic_write_text(first, text)
            print(
                f"train: warning: --allow-config-change: {', '.join(self.changes)} changed; recorded in "
                f"{history}; {first} is now the config used ({kept.name} keeps the one before)",
                file=sys.stderr,
                flush=True,
            )

    def reset_metrics(self, keep_until: int) -> None:
        """New ``metrics.csv``, or on resume the old one's well-formed rows up to ``keep_until``."""
        path = self.out / "metrics.csv"
        rows, damaged = [], 0
        if keep_until and path.is_file():
            with open(path, newline="", errors="replace") as f:
                lines = list(csv.reader(f))[1:]
            for r in lines:
                if len(r) == len(METRICS) - 1:  # a row written before the rel_update column: not damaged
                    r = r + ["nan"]
                try:
                    if len(r) != len(METRICS):
                        raise ValueError
                    [float(v) for v in r]
                    if int(r[0]) <= keep_until:
                        rows.append(r)
                except ValueError:
                    damaged += 1
            if damaged:
                print(
                    f"train: warning: {path}: dropped {damaged} damaged row(s) (an interrupted write)",
                    file=sys.stderr,
                    flush=True,
                )
        atomic_write_text(path, "\n".join([",".join(METRICS)] + [",".join(r) for r in rows]) + "\n")

    def close(self, refused: bool = False) -> None:
        """Release the lock; ``refused`` (the run stopped on an error): if nothing was written yet,
        remove the ``.lock`` and the folders this run created, so that a refusal leaves nothing behind."""
        if refused and not self.written and self.lock.fd is not None:
            if not self.lock_existed:
                self.lock.path.unlink(missing_ok=True)
            if self.new_top is not None:
                d = self.out.absolute()
                while True:
                    try:
                        d.rmdir()  # only when empty
                    except OSError:
                        break
                    if d == self.new_top:
                        break
                    d = d.parent
        self.lock.release()
