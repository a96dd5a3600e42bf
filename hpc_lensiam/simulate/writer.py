"""MPI shard plan: shard i is simulated from a seed derived from (seed, i), by whichever rank.

The data set is therefore byte-for-byte the same whatever the number of ranks. Ranks take the
missing shards round-robin; each shard is written under a temporary name and renamed when complete,
so a rerun of the same command skips complete shards and redoes partial ones. Rank 0 writes
``manifest.json`` last: its presence means the data set is complete.
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

from .. import __version__
from ..config import to_dict
from ..errors import UserError
from ..integrity import check_finite, shard_problem
from ..io import MANIFEST_FORMAT, MANIFEST_NAME, TMP_PREFIX, atomic_open, atomic_write_json, sha256_file, sha256_json
from ..lock import DirLock

PLAN_NAME = ".plan.json"  # written first: what this folder is being filled with
DONE_DIR = ".done"  # one record per shard this package wrote: size and sha256
MODES = ("lensiam", "single")
ENGINES = ("lenstronomy", "torch")  # LensSimulator, or its batched torch twin (docs/online.md)
_TAG_PROGRESS, _TAG_DONE, _TAG_ERROR = 11, 12, 13


def shard_name(index: int) -> str:
    return f"shard-{index:06d}.tar"


def shard_rng(seed: int, index: int) -> np.random.Generator:
    """The one source of randomness for shard ``index``: independent of rank and rank count."""
    return np.random.default_rng(np.random.SeedSequence([seed, index]))


def npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array(buf, np.ascontiguousarray(array, dtype=np.float32), allow_pickle=False)
    return buf.getvalue()


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


def write_shard(sim, mode: str, seed: int, index: int, num: int, out_dir: Path, on_sample=None) -> dict:
    """Simulate shard ``index`` (``num`` samples) and write it atomically; return its manifest entry."""
    rng = shard_rng(seed, index)
    path = out_dir / shard_name(index)
    if hasattr(sim, "iter_samples"):  # the batched torch renderer draws the shard in batches
        drawn = sim.iter_samples(mode, rng, num)
    else:
        draw = sim.sample_pair if mode == "lensiam" else sim.sample_single
        drawn = (draw(rng) for _ in range(num))
    return write_tar(path, (encode_sample(f"{index:06d}_{j:06d}", d, path) for j, d in enumerate(drawn)), on_sample)


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
        from ..cli import _os_error_line

        return _os_error_line(exc)
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
        print(f"hpc-lensiam: error (rank {rank}): {line}", file=sys.stderr, flush=True)  # rank 0 is stuck
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


def _check_existing(out_dir: Path, plan: dict) -> None:
    """Refuse an output folder that holds another data set (different config, seed, mode...)."""
    for name in (MANIFEST_NAME, PLAN_NAME):
        path = out_dir / name
        if not path.is_file():
            continue
        try:
            old = json.loads(path.read_text())
        except ValueError:
            raise UserError(f"{path}: unreadable; remove it or choose another --out") from None
        for key in ("mode", "seed", "num_samples", "shard_size", "config_hash", "engine", "inputs_sha256", "device"):
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
            default = "lenstronomy" if key == "engine" else None  # manifests before --engine have none
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


def input_hashes(cfg) -> dict:
    """sha256 of every input file the data depend on: PSF files and the COSMOS catalog table.

    Recorded in the plan and manifest (provenance), and compared on a rerun: a PSF file edited
    between a killed run and its rerun would otherwise give one data set made with two PSFs.
    Keyed by resolved path (the key shows the file name too): two PSFs of one name in two folders
    are two entries, each checked.
    """
    from .sources import CATALOG_NAMES

    out = {"psf_files": {str(Path(f).resolve()): sha256_file(f) for f in getattr(cfg, "psf_files", None) or []}}
    if getattr(cfg, "match_file", None):  # simulate --match: the real file and the PSF file beside it
        psf = str(cfg.match_psf_file or "").split("[")[0]
        out["match_file"] = {str(Path(f).resolve()): sha256_file(f) for f in dict.fromkeys([cfg.match_file, psf]) if f}
    if getattr(cfg, "cosmos_dir", None):
        cat = next((Path(cfg.cosmos_dir) / n for n in CATALOG_NAMES if (Path(cfg.cosmos_dir) / n).is_file()), None)
        out["cosmos_catalog"] = {str(cat.resolve()): sha256_file(cat)} if cat else {}
    return out


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


MAX_SHARDS = 1_000_000  # shard-NNNNNN.tar: six digits, and already a million files in one folder


def _tar_bytes(size: int) -> int:
    """Bytes one tar member of ``size`` bytes takes: its 512-byte header and its data in 512 blocks."""
    return 512 + -(-size // 512) * 512


def check_planned_size(out_dir: Path, num_samples: int, shard_size: int, num_pix: int, views: int) -> None:
    """Before anything is written: a sane shard count, and room for the planned data set.

    The size is a lower bound (float32 images as .npy tar members, one 512-byte block of params per
    sample), less the shards already in ``out_dir`` (a rerun); it is compared with the free space of
    the file system ``out_dir`` is (or would be) on.
    """
    import shutil

    shards = -(-num_samples // shard_size)
    if shards > MAX_SHARDS:
        raise UserError(
            f"--pairs {num_samples} --shard-size {shard_size}: {shards} shards, more than {MAX_SHARDS} files "
            f"in one folder; raise --shard-size (or lower --pairs)"
        )
    per_sample = views * _tar_bytes(128 + 4 * num_pix * num_pix) + _tar_bytes(512)
    have = sum(p.stat().st_size for p in out_dir.glob("shard-*.tar")) if out_dir.is_dir() else 0
    need = per_sample * num_samples - have
    base = out_dir
    while not base.exists() and base != base.parent:  # the nearest folder that exists
        base = base.parent
    if not os.access(base, os.W_OK | os.X_OK):
        return  # read-only or not ours: the first write says so, naming the file
    try:
        free = shutil.disk_usage(base).free
    except OSError:
        return  # not a folder we can stat: the write itself will say why
    if need > free:
        raise UserError(
            f"--pairs {num_samples}: the data set needs about {_human(need)} ({per_sample} bytes per sample "
            f"x {num_samples} samples{', less the shards already there' if have else ''}), but --out "
            f"{out_dir} is on a file system with {_human(free)} free; lower --pairs or choose another --out"
        )


def _human(n: float) -> str:
    for unit in ("bytes", "kB", "MB", "GB", "TB", "PB"):
        if abs(n) < 1000 or unit == "PB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.3g} {unit}"
        n /= 1000
    return f"{n:.3g} PB"


def rank_device(device: str, local_rank: int, device_count: int) -> str:
    """This rank's ``--device``: a bare ``cuda`` is ``cuda:<local rank>`` (round-robin when a node
    has more ranks than GPUs, so every GPU renders; one visible GPU, a launcher's per-task binding,
    is everyone's ``cuda:0``); ``cuda:N`` and ``cpu`` are taken as given. Which GPU renders does not
    change the bytes (the same CUDA random stream), the device type does (:func:`device_type`)."""
    if device.strip() != "cuda" or device_count < 1:
        return device
    return f"cuda:{local_rank % device_count}"


def device_type(device: str) -> str | None:
    """``cpu`` or ``cuda`` (what the torch engine's bytes depend on: CPU and CUDA random streams
    differ), or None for a string that is not a torch device (resolve_device reports it later)."""
    import torch

    try:
        return torch.device(device).type
    except (RuntimeError, ValueError):
        return None


def _local_rank(comm) -> int:
    """This MPI rank's index among the ranks on its node (0 without MPI)."""
    if comm is None:
        return 0
    from mpi4py import MPI

    node = comm.Split_type(MPI.COMM_TYPE_SHARED)
    try:
        return node.Get_rank()
    finally:
        node.Free()


def torch_simulator(cfg, device: str, local_rank: int = 0):
    """``--engine torch``: the batched renderer on ``device`` (float32, as the shards store); under
    MPI each rank renders on its own GPU (:func:`rank_device`), not all on ``cuda:0``."""
    import torch

    from .torch_render import TorchLensSimulator, resolve_device

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return TorchLensSimulator(cfg, device=resolve_device(rank_device(device, local_rank, count), "--device"))


def simulate_shards(
    out_dir: str | os.PathLike,
    num_samples: int,
    shard_size: int = 1000,
    mode: str = "lensiam",
    preset: str | None = None,
    seed: int = 0,
    cosmos_dir: str | None = None,
    psf_files: list[str] | None = None,
    psf_pixel_scale_arcsec: float | None = None,
    config_path: str | None = None,
    overrides: dict | None = None,
    progress: bool = True,
    family: str = "paper",
    lens_fraction: float | None = None,
    engine: str = "lenstronomy",
    device: str = "cpu",
    match: dict | None = None,
) -> dict:
    """Simulate ``num_samples`` pairs (or single images) into WebDataset shards; return the manifest.

    Runs as one process, or as every rank of ``mpiexec -n K``: same arguments, same bytes.
    ``family``: "paper" (LensSimulator) or "survey" (simulate/survey, lenses and non-lenses with
    ``lens_fraction``). Rank 0 holds ``DIR/.lock`` for the whole run; a rerun checks every existing
    shard's sha256 against the record made when it was written and redoes those that fail.
    """
    from .families import resolve_family
    from .mpi_env import mpi_world

    comm, rank, _ = mpi_world()  # the srun-singleton check, before any work
    if mode not in MODES:
        raise UserError(f"--mode: {mode!r} is not one of {', '.join(MODES)}")
    if engine not in ENGINES:
        raise UserError(f"--engine: {engine!r} is not one of {', '.join(ENGINES)}")
    if engine == "torch" and family != "paper":
        raise UserError(f"--engine torch: renders the paper family (EPL + shear) only, not --family {family}")
    if engine == "torch" and (any(v is not None for v in (match or {}).values()) or preset == "hst-f140w"):
        raise UserError("--engine torch: renders the paper presets only, not --match or a matched preset")
    if num_samples < 1 or shard_size < 1:
        raise UserError(f"--pairs and --shard-size must be >= 1 (got {num_samples}, {shard_size})")
    if -(-num_samples // shard_size) > MAX_SHARDS:  # before anything else: the count alone is enough
        check_planned_size(Path(out_dir), num_samples, shard_size, 8, 1)
    if seed < 0:
        raise UserError(f"--seed: must be >= 0, got {seed}")
    cfg, make_simulator = resolve_family(
        family,
        mode,
        preset,
        config_path,
        cosmos_dir,
        psf_files,
        psf_pixel_scale_arcsec,
        overrides,
        lens_fraction,
        match,
    )
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"--out {out_dir}: exists and is not a folder")
    config = to_dict(cfg)
    plan = {
        "format": MANIFEST_FORMAT,
        "version": __version__,
        "mode": mode,
        "seed": seed,
        "num_samples": num_samples,
        "shard_size": shard_size,
        "preset": cfg.preset,
        "image_shape": [cfg.instrument.num_pix] * 2,
        "config": config,
        "config_hash": sha256_json(config),
    }
    if family != "paper":  # the paper family's manifest stays as it was
        plan["family"] = family
    if getattr(cfg, "match_file", None) or getattr(cfg, "match_psf_file", None):  # simulate/match.py
        plan["matched"] = {"file": cfg.match_file, "psf": cfg.match_psf_file, "flux_units": cfg.flux_units}
    if engine != "lenstronomy":  # likewise the lenstronomy engine's
        plan["engine"] = engine
        if device_type(device):  # CPU and CUDA random streams differ: the bytes depend on it
            plan["device"] = device_type(device)
    _check_existing(out_dir, plan)
    check_planned_size(out_dir, num_samples, shard_size, cfg.instrument.num_pix, 2 if mode == "lensiam" else 1)

    # Build the simulator before touching the folder: a bad COSMOS dir or PSF file writes nothing.
    import warnings

    with warnings.catch_warnings(record=True) as notes:
        warnings.simplefilter("always")
        sim = make_simulator(cfg) if engine == "lenstronomy" else torch_simulator(cfg, device, _local_rank(comm))
    if rank == 0:  # said once, not once per rank
        for note in notes:
            print(f"simulate: note: {note.message}", file=sys.stderr, flush=True)
    plan["inputs"] = input_hashes(cfg)
    plan["inputs_sha256"] = sha256_json(plan["inputs"])
    shards = ShardPlan(num_samples, shard_size)
    return write_shard_set(
        out_dir,
        plan,
        shards,
        progress,
        "simulate",
        lambda i, tick: write_shard(sim, mode, seed, i, shards.size_of(i), out_dir, tick),
    )


def write_shard_set(out_dir: Path, plan: dict, shards: ShardPlan, progress: bool, what: str, write_one) -> dict:
    """The MPI shard machinery behind ``simulate`` and ``ingest``; returns the manifest.

    Rank 0 takes the folder (``DIR/.lock``), re-checks it under the lock (:func:`_check_existing`),
    removes partial files of a killed run and writes ``plan`` first as ``.plan.json``; the other
    ranks start only if it succeeded. ``write_one(index, tick)`` writes shard ``index`` atomically
    (calling ``tick()`` per sample) and returns its manifest entry (:func:`write_tar`). Ranks take the
    shards to (re)write round-robin, so a rerun redoes only missing or damaged ones; rank 0 writes
    ``manifest.json`` last.
    """
    from .mpi_env import mpi_world

    comm, rank, size = mpi_world()
    lock, failed, new_plan = DirLock(out_dir, what), None, False
    if rank == 0:
        try:
            lock.acquire()
            _check_existing(out_dir, plan)
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
