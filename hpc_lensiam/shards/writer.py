"""Writing a shard set, the same way for ``simulate`` and ``ingest``: MPI ranks take shards round-robin.

Shard i is written from whatever ``write_one(i, tick)`` draws, by whichever rank: a data set is
therefore byte-for-byte the same whatever the number of ranks when its samples depend on (seed, i)
only. Each shard is written under a temporary name and renamed when complete, so a rerun of the same
command skips complete shards and redoes partial ones. Rank 0 writes ``manifest.json`` last: its
presence means the data set is complete.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import sys
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..core.errors import UserError, os_error_line
from ..core.io import TMP_PREFIX, atomic_open, atomic_write_json
from ..core.lock import DirLock
from .integrity import check_finite, shard_problem
from .manifest import MANIFEST_NAME, npy_bytes, shard_name

PLAN_NAME = ".plan.json"  # written first: what this folder is being filled with
DONE_DIR = ".done"  # one record per shard this package wrote: size and sha256
_TAG_PROGRESS, _TAG_DONE, _TAG_ERROR = 11, 12, 13


@dataclass(frozen=True)
class ShardPlan:
    """How ``num_samples`` split into shards of ``shard_size`` (the last one may be shorter)."""

    num_samples: int
    shard_size: int

    @property
    def num_shards(self) -> int:
        return -(-self.num_samples // self.shard_size)

    def size_of(self, index: int) -> int:
        return min(self.shard_size, self.num_samples - index * self.shard_size)


def encode_sample(key: str, sample: dict, path: Path | str = "?") -> dict:
    """Simulator output -> webdataset sample (raw npy bytes + sorted JSON), deterministic bytes.

    A non-finite pixel is an error naming the shard and sample: it would poison training silently.
    """
    out = {"__key__": key, "params.json": json.dumps(sample["params"], sort_keys=True).encode()}
    for name in ("view1", "view2", "image"):
        if name in sample:
            out[f"{name}.npy"] = npy_bytes(check_finite(np.asarray(sample[name]), path, key, f"{name}.npy"))
    return out


def _tar_add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    """One tar member with fixed metadata, so equal samples give equal shard bytes."""
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o444
    info.uname = info.gname = "bigdata"
    tar.addfile(info, io.BytesIO(data))


class _HashingWriter:
    """File wrapper that hashes what is written, so a new shard is never read back to be hashed."""

    def __init__(self, f):
        self.f, self.sha, self.size = f, hashlib.sha256(), 0

    def write(self, data) -> int:
        self.sha.update(data)
        self.size += len(data)
        return self.f.write(data)


def write_tar(path: Path, samples, on_sample=None) -> dict:
    """Write encoded samples (:func:`encode_sample`) as one shard, atomically; return its manifest entry.

    The tar is the plain WebDataset layout (``KEY.ext`` members, sorted by ext within a sample);
    it is written with the standard library so simulation ranks never import torch. Shared by
    ``simulate`` and ``ingest``: the same member order and tar metadata, so equal samples give equal
    bytes whatever produced them. The entry (name, num_samples, size, sha256 of the bytes as
    written) is also kept in ``DIR/.done/`` so a rerun after a kill can check the shard without
    trusting the file itself.
    """
    num = 0
    with atomic_open(path, "wb") as f:
        out = _HashingWriter(f)
        with tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT) as tar:
            for sample in samples:
                key = sample.pop("__key__")
                for ext in sorted(sample):
                    _tar_add(tar, f"{key}.{ext}", sample[ext])
                num += 1
                if on_sample:
                    on_sample()
    entry = {"name": path.name, "num_samples": num, "size": out.size, "sha256": out.sha.hexdigest()}
    atomic_write_json(path.parent / DONE_DIR / (path.name + ".json"), entry)
    return entry


# ------------------------------------------------------------------------------------------ MPI
class _RankFailed(UserError):
    """Another rank's one-line error (a full disk, bad input), raised on rank 0 to be said once."""


def _user_error_line(exc: BaseException) -> str | None:
    """The one line the CLI would print for ``exc`` (a UserError or a full disk, read-only file
    system...), or None for anything else (a bug: its traceback is wanted)."""
    if isinstance(exc, UserError):
        return str(exc)
    if isinstance(exc, OSError):
        return os_error_line(exc)
    return None


def _fail_ranks(comm, rank: int, out_dir: Path, exc: BaseException) -> None:
    """End every rank after ``exc`` on this one, with one error line and no partial file.

    A user-side failure (full disk, bad input) on another rank goes to rank 0, which says it
    (``_RankFailed`` from its progress loop) together with its own; rank 0 removes the partial
    files of every rank, then aborts the job with exit code 2. A bug aborts with 1 and its traceback.
    """
    line = _user_error_line(exc)
    if line is None:
        import traceback

        traceback.print_exc()
        comm.Abort(1)
        os._exit(1)  # Abort may return before the launcher kills this process: say nothing more
    if rank != 0:
        comm.send(line, dest=0, tag=_TAG_ERROR)
        deadline = time.monotonic() + 120  # rank 0 sees it after its current sample
        while time.monotonic() < deadline:
            time.sleep(0.1)
        print(f"hpc-lensiam: error: rank {rank}: {line}", file=sys.stderr, flush=True)  # rank 0 is stuck
        comm.Abort(2)
        os._exit(2)
    print(f"hpc-lensiam: error: {line}", file=sys.stderr, flush=True)
    time.sleep(1.0)  # let mpiexec pass the line on: an abort can end its forwarding before it is read
    for stale in [*out_dir.glob(TMP_PREFIX + "*"), *(out_dir / DONE_DIR).glob(TMP_PREFIX + "*")]:
        stale.unlink(missing_ok=True)  # the other ranks' shards in progress: they end with this job
    comm.Abort(2)
    os._exit(2)


class _Progress:
    """tqdm on rank 0 over every rank's finished samples; other ranks send small MPI messages."""

    def __init__(self, comm, rank: int, size: int, total: int, initial: int, enabled: bool, desc: str = "simulate"):
        self.comm, self.rank, self.size = comm, rank, size
        self.done = 0  # ranks (other than 0) that said they finished
        self.bar = None
        if rank == 0 and enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, unit="sample", desc=desc, dynamic_ncols=True, file=sys.stderr)

    def tick(self) -> None:
        if self.rank == 0:
            self._drain(block=False)
            if self.bar:
                self.bar.update(1)
        elif self.comm is not None:
            self.comm.send(1, dest=0, tag=_TAG_PROGRESS)

    def _drain(self, block: bool) -> None:
        if self.comm is None or self.size == 1:
            return
        from mpi4py import MPI

        status = MPI.Status()
        while self.done < self.size - 1 and (
            block or self.comm.Iprobe(source=MPI.ANY_SOURCE, tag=MPI.ANY_TAG, status=status)
        ):
            n = self.comm.recv(source=MPI.ANY_SOURCE, tag=MPI.ANY_TAG, status=status)
            if status.Get_tag() == _TAG_ERROR:  # another rank failed on the user's side: say it once, here
                raise _RankFailed(n)
            if n < 0:  # that rank finished
                self.done += 1
            elif self.bar:
                self.bar.update(n)

    def finish(self) -> None:
        """Rank 0 keeps updating until every other rank says it is done."""
        if self.rank != 0:
            if self.comm is not None:
                self.comm.send(-1, dest=0, tag=_TAG_PROGRESS)
            return
        self._drain(block=True)
        if self.bar:
            self.bar.close()


def check_existing(out_dir: Path, plan: dict) -> None:
    """Refuse an output folder that holds another data set (different config, seed, mode...)."""
    for name in (MANIFEST_NAME, PLAN_NAME):
        path = out_dir / name
        if not path.is_file():
            continue
        try:
            old = json.loads(path.read_text())
        except ValueError:
            raise UserError(f"{path}: unreadable; remove it or choose another --out") from None
        keys = (
            "mode",
            "seed",
            "num_samples",
            "shard_size",
            "config_hash",
            "engine",
            "inputs_sha256",
            "device",
            "numerics",
        )
        for key in keys:
            if key == "device" and key not in old:  # a torch-engine set from before the device was recorded
                continue
            if key == "inputs_sha256" and key in plan and key in old and old[key] != plan[key]:
                changed = sorted(
                    n
                    for kind, files in plan["inputs"].items()
                    for n, sha in files.items()
                    if (old.get("inputs") or {}).get(kind, {}).get(n) != sha
                )
                raise UserError(
                    f"{out_dir}: was made from other input files (sha256 of "
                    f"{', '.join(changed) or 'the PSF/COSMOS file list'} changed); restore "
                    f"them, or choose another --out"
                )
            # manifests before --engine have none; before "numerics", the generator's first revision made them
            default = {"engine": "lenstronomy", "numerics": 1}.get(key)
            if key != "inputs_sha256" and old.get(key, default) != plan.get(key, default):
                raise UserError(
                    f"{out_dir}: holds shards of a different data set ({key}: {old.get(key, default)!r} there, "
                    f"{plan.get(key, default)!r} asked); choose another --out or remove it"
                )
        return
    if any(out_dir.glob("shard-*.tar")):
        raise UserError(
            f"{out_dir}: holds shards but no {PLAN_NAME}/{MANIFEST_NAME}; choose another --out or remove them"
        )


def _known_entries(out_dir: Path) -> dict[str, dict]:
    """What this package recorded about each shard it wrote here: ``.done`` records, overridden
    by the manifest of a finished run. A shard without a record is never trusted."""
    known = {}
    for rec in sorted((out_dir / DONE_DIR).glob("shard-*.json")):
        try:
            entry = json.loads(rec.read_text())
            known[entry["name"]] = entry
        except (OSError, ValueError, KeyError, TypeError):
            continue
    try:
        for entry in json.loads((out_dir / MANIFEST_NAME).read_text())["shards"]:
            known[entry["name"]] = entry
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return known


def _shards_to_write(out_dir: Path, shards: ShardPlan, known: dict, indices) -> tuple[list[int], dict]:
    """Of ``indices``, the shards to (re)write, and the recorded entries of the good ones.

    Every existing shard is checked against its record (size, then sha256); a shard that fails, or
    has no record (killed between its rename and its record), is redone. A shard this run did not
    write is never rehashed into the manifest: its entry is the record made when it was written.
    """
    todo, good = [], {}
    for i in indices:
        name, path = shard_name(i), out_dir / shard_name(i)
        if not path.exists():
            todo.append(i)
            continue
        entry = known.get(name)
        problem = (
            "no record of it being written"
            if not entry or entry.get("num_samples") != shards.size_of(i)
            else shard_problem(path, entry, verify=True)
        )
        if problem:
            print(f"simulate: redoing {path}: {problem}", file=sys.stderr, flush=True)
            todo.append(i)
        else:
            good[i] = {**entry, "size": entry.get("size", path.stat().st_size)}
    return todo, good


def write_shard_set(out_dir: Path, plan: dict, shards: ShardPlan, progress: bool, what: str, write_one) -> dict:
    """The MPI shard machinery behind ``simulate`` and ``ingest``; returns the manifest.

    Rank 0 takes the folder (``DIR/.lock``), re-checks it under the lock (:func:`_check_existing`),
    removes partial files of a killed run and writes ``plan`` first as ``.plan.json``; the other
    ranks start only if it succeeded. ``write_one(index, tick)`` writes shard ``index`` atomically
    (calling ``tick()`` per sample) and returns its manifest entry (:func:`write_tar`). Ranks take the
    shards to (re)write round-robin, so a rerun redoes only missing or damaged ones; rank 0 writes
    ``manifest.json`` last.
    """
    from ..core.runtime import mpi_world

    comm, rank, size = mpi_world()
    lock, failed, new_plan = DirLock(out_dir, what), None, False
    if rank == 0:
        try:
            lock.acquire()
            check_existing(out_dir, plan)
            for stale in [*out_dir.glob(TMP_PREFIX + "*"), *(out_dir / DONE_DIR).glob(TMP_PREFIX + "*")]:
                stale.unlink(missing_ok=True)  # partial files of a killed run
            if not (out_dir / PLAN_NAME).is_file():
                atomic_write_json(out_dir / PLAN_NAME, plan)
                new_plan = True
        except (UserError, OSError) as exc:  # a full or read-only disk too: every rank must hear of it
            lock.release()
            failed = _user_error_line(exc) or f"{out_dir}: {exc}"
    if comm is not None:
        failed = comm.bcast(failed, root=0)
    if failed:
        raise UserError(failed)
    try:
        return _write_all(comm, rank, size, out_dir, plan, shards, progress, what, write_one)
    except UserError:
        # refused before a single shard was written (e.g. a survey selection nothing passes): the plan this
        # run wrote must not bind the folder to the refused config
        if new_plan and not any(out_dir.glob("shard-*.tar")) and not any((out_dir / DONE_DIR).glob("*.json")):
            (out_dir / PLAN_NAME).unlink(missing_ok=True)
        raise
    finally:
        lock.release()


def _write_all(comm, rank, size, out_dir, plan, shards, progress, what, write_one) -> dict:
    start = time.perf_counter()
    num_samples = shards.num_samples
    todo, good = _shards_to_write(out_dir, shards, _known_entries(out_dir), range(rank, shards.num_shards, size))
    if comm is not None:
        todo = sorted(i for part in comm.allgather(todo) for i in part)
        good = {i: e for part in comm.allgather(good) for i, e in part.items()}
    done_before = num_samples - sum(shards.size_of(i) for i in todo)
    bar = _Progress(comm, rank, size, num_samples, done_before, progress, what)
    entries: dict[int, dict] = {}
    try:
        for index in todo[rank::size]:
            entries[index] = write_one(index, bar.tick)
        bar.finish()
    except BaseException as exc:
        if bar.bar:  # end the bar's line: the error is a line of its own
            bar.bar.close()
        if comm is not None and size > 1:
            _fail_ranks(comm, rank, out_dir, exc)
        raise
    if comm is not None:
        gathered = comm.gather(entries, root=0)
        if rank == 0:
            for part in gathered:
                entries.update(part)

    manifest = None
    if rank == 0:
        entries = {**good, **entries}
        manifest = {**plan, "shards": [entries[i] for i in range(shards.num_shards)]}
        atomic_write_json(out_dir / MANIFEST_NAME, manifest)
        elapsed = time.perf_counter() - start
        new = num_samples - done_before
        print(
            f"{what}: wrote {new} new samples ({num_samples - new} already done) in "
            f"{len(todo)} of {shards.num_shards} shards to {out_dir} with {size} rank(s) in "
            f"{elapsed:.1f} s ({new / max(elapsed, 1e-9):.1f} samples/s); manifest: "
            f"{out_dir / MANIFEST_NAME}",
            flush=True,
        )
    if comm is not None:
        manifest = comm.bcast(manifest, root=0)
    return manifest
