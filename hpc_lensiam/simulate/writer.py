"""MPI shard plan: shard i is simulated from a seed derived from (seed, i), by whichever rank.

The data set is therefore byte-for-byte the same whatever the number of ranks. Ranks take the
missing shards round-robin; each shard is written under a temporary name and renamed when complete,
so a rerun of the same command skips complete shards and redoes partial ones. Rank 0 writes
``manifest.json`` last: its presence means the data set is complete.
"""
from __future__ import annotations

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
from ..io import MANIFEST_FORMAT, MANIFEST_NAME, TMP_PREFIX, atomic_open, atomic_write_json, sha256_file, sha256_json

PLAN_NAME = ".plan.json"          # written first: what this folder is being filled with
MODES = ("lensiam", "single")
ENGINES = ("lenstronomy", "torch")   # LensSimulator, or its batched torch twin (docs/online.md)
_TAG_PROGRESS, _TAG_DONE = 11, 12


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


def encode_sample(key: str, sample: dict) -> dict:
    """Simulator output -> webdataset sample (raw npy bytes + sorted JSON), deterministic bytes."""
    out = {"__key__": key, "params.json": json.dumps(sample["params"], sort_keys=True).encode()}
    for name in ("view1", "view2", "image"):
        if name in sample:
            out[f"{name}.npy"] = npy_bytes(sample[name])
    return out


def _tar_add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    """One tar member with fixed metadata, so equal samples give equal shard bytes."""
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o444
    info.uname = info.gname = "bigdata"
    tar.addfile(info, io.BytesIO(data))


def write_shard(sim, mode: str, seed: int, index: int, num: int, out_dir: Path, on_sample=None) -> str:
    """Simulate shard ``index`` (``num`` samples) and write it atomically; return its sha256.

    The tar is the plain WebDataset layout (``KEY.ext`` members, sorted by ext within a sample);
    it is written with the standard library so simulation ranks never import torch.
    """
    rng = shard_rng(seed, index)
    if hasattr(sim, "iter_samples"):   # the batched torch renderer draws the shard in batches
        drawn = sim.iter_samples(mode, rng, num)
    else:
        draw = sim.sample_pair if mode == "lensiam" else sim.sample_single
        drawn = (draw(rng) for _ in range(num))
    samples = (encode_sample(f"{index:06d}_{j:06d}", d) for j, d in enumerate(drawn))
    return write_tar(out_dir / shard_name(index), samples, on_sample)


def write_tar(path: Path, samples, on_sample=None) -> str:
    """Write encoded samples (:func:`encode_sample`) as one shard, atomically; return its sha256.

    Shared by ``simulate`` and ``ingest``: the same member order and tar metadata, so equal
    samples give equal bytes whatever produced them.
    """
    with atomic_open(path, "wb") as f:
        with tarfile.open(fileobj=f, mode="w|", format=tarfile.PAX_FORMAT) as tar:
            for sample in samples:
                key = sample.pop("__key__")
                for ext in sorted(sample):
                    _tar_add(tar, f"{key}.{ext}", sample[ext])
                if on_sample:
                    on_sample()
    return sha256_file(path)


# ------------------------------------------------------------------------------------------ MPI
class _Progress:
    """tqdm on rank 0 over every rank's finished samples; other ranks send small MPI messages."""

    def __init__(self, comm, rank: int, size: int, total: int, initial: int, enabled: bool,
                 desc: str = "simulate"):
        self.comm, self.rank, self.size = comm, rank, size
        self.done = 0  # ranks (other than 0) that said they finished
        self.bar = None
        if rank == 0 and enabled:
            from tqdm import tqdm
            self.bar = tqdm(total=total, initial=initial, unit="sample", desc=desc,
                            dynamic_ncols=True, file=sys.stderr)

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
                block or self.comm.Iprobe(source=MPI.ANY_SOURCE, tag=_TAG_PROGRESS, status=status)):
            n = self.comm.recv(source=MPI.ANY_SOURCE, tag=_TAG_PROGRESS, status=status)
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
        for key in ("mode", "seed", "num_samples", "shard_size", "config_hash", "engine"):
            default = "lenstronomy" if key == "engine" else None   # manifests before --engine have none
            if old.get(key, default) != plan.get(key, default):
                raise UserError(
                    f"{out_dir}: holds shards of a different data set ({key}: {old.get(key, default)!r} there, "
                    f"{plan.get(key, default)!r} asked); choose another --out or remove it")
        return
    if any(out_dir.glob("shard-*.tar")):
        raise UserError(f"{out_dir}: holds shards but no {PLAN_NAME}/{MANIFEST_NAME}; "
                        "choose another --out or remove them")


def torch_simulator(cfg, device: str):
    """``--engine torch``: the batched renderer on ``device`` (float32, as the shards store)."""
    from .torch_render import TorchLensSimulator, resolve_device
    return TorchLensSimulator(cfg, device=resolve_device(device, "--device"))


def simulate_shards(out_dir: str | os.PathLike, num_samples: int, shard_size: int = 1000,
                    mode: str = "lensiam", preset: str | None = None, seed: int = 0,
                    cosmos_dir: str | None = None, psf_files: list[str] | None = None,
                    psf_pixel_scale_arcsec: float | None = None, config_path: str | None = None,
                    overrides: dict | None = None, progress: bool = True, family: str = "paper",
                    lens_fraction: float | None = None, engine: str = "lenstronomy", device: str = "cpu") -> dict:
    """Simulate ``num_samples`` pairs (or single images) into WebDataset shards; return the manifest.

    Runs as one process, or as every rank of ``mpiexec -n K``: same arguments, same bytes.
    ``family``: "paper" (LensSimulator) or "survey" (simulate/survey, lenses and non-lenses with
    ``lens_fraction``).
    """
    from .mpi_env import mpi_world

    _, rank, _ = mpi_world()  # the srun-singleton check, before any work
    if mode not in MODES:
        raise UserError(f"--mode: {mode!r} is not one of {', '.join(MODES)}")
    if engine not in ENGINES:
        raise UserError(f"--engine: {engine!r} is not one of {', '.join(ENGINES)}")
    if engine == "torch" and family != "paper":
        raise UserError(f"--engine torch: renders the paper family (EPL + shear) only, not --family {family}")
    if num_samples < 1 or shard_size < 1:
        raise UserError(f"--pairs and --shard-size must be >= 1 (got {num_samples}, {shard_size})")
    from .families import resolve_family
    cfg, make_simulator = resolve_family(family, mode, preset, config_path, cosmos_dir, psf_files,
                                         psf_pixel_scale_arcsec, overrides, lens_fraction)
    out_dir = Path(out_dir)
    config = to_dict(cfg)
    plan = {"format": MANIFEST_FORMAT, "version": __version__, "mode": mode, "seed": seed,
            "num_samples": num_samples, "shard_size": shard_size, "preset": cfg.preset,
            "image_shape": [cfg.instrument.num_pix] * 2, "config": config,
            "config_hash": sha256_json(config)}
    if family != "paper":  # the paper family's manifest stays as it was
        plan["family"] = family
    if engine != "lenstronomy":  # likewise the lenstronomy engine's
        plan["engine"] = engine
    _check_existing(out_dir, plan)

    # Build the simulator before touching the folder: a bad COSMOS dir or PSF file writes nothing.
    import warnings
    with warnings.catch_warnings(record=True) as notes:
        warnings.simplefilter("always")
        sim = make_simulator(cfg) if engine == "lenstronomy" else torch_simulator(cfg, device)
    if rank == 0:  # said once, not once per rank
        for note in notes:
            print(f"simulate: note: {note.message}", file=sys.stderr, flush=True)

    shards = ShardPlan(num_samples, shard_size)
    return write_shard_set(out_dir, plan, shards, progress, "simulate",
                           lambda i, tick: write_shard(sim, mode, seed, i, shards.size_of(i), out_dir, tick))


def write_shard_set(out_dir: Path, plan: dict, shards: ShardPlan, progress: bool, what: str, write_one) -> dict:
    """The MPI shard machinery behind ``simulate`` and ``ingest``; returns the manifest.

    ``plan`` (already checked with :func:`_check_existing`) is written first as ``.plan.json``;
    ``write_one(index, tick)`` writes shard ``index`` atomically (calling ``tick()`` per sample)
    and returns its sha256. Ranks take the missing shards round-robin, so a rerun redoes only
    those; rank 0 writes ``manifest.json`` last.
    """
    from .mpi_env import mpi_world

    comm, rank, size = mpi_world()
    num_samples = shards.num_samples
    if rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        for stale in out_dir.glob(TMP_PREFIX + "*"):  # partial shards of a killed run
            stale.unlink(missing_ok=True)
        if not (out_dir / PLAN_NAME).is_file():
            atomic_write_json(out_dir / PLAN_NAME, plan)
    if comm is not None:
        comm.barrier()

    start = time.perf_counter()
    missing = [i for i in range(shards.num_shards) if not (out_dir / shard_name(i)).is_file()]
    done_before = num_samples - sum(shards.size_of(i) for i in missing)
    bar = _Progress(comm, rank, size, num_samples, done_before, progress, what)
    hashes: dict[int, str] = {}
    try:
        for index in missing[rank::size]:
            hashes[index] = write_one(index, bar.tick)
        bar.finish()
    except BaseException:
        if comm is not None and size > 1:
            import traceback
            traceback.print_exc()
            comm.Abort(1)
        raise
    if comm is not None:
        gathered = comm.gather(hashes, root=0)
        if rank == 0:
            for part in gathered:
                hashes.update(part)

    manifest = None
    if rank == 0:
        entries = []
        for i in range(shards.num_shards):
            sha = hashes.get(i) or sha256_file(out_dir / shard_name(i))
            entries.append({"name": shard_name(i), "num_samples": shards.size_of(i), "sha256": sha})
        manifest = {**plan, "shards": entries}
        atomic_write_json(out_dir / MANIFEST_NAME, manifest)
        elapsed = time.perf_counter() - start
        new = num_samples - done_before
        print(f"{what}: wrote {new} new samples ({num_samples - new} already done) in "
              f"{len(missing)} of {shards.num_shards} shards to {out_dir} with {size} rank(s) in "
              f"{elapsed:.1f} s ({new / max(elapsed, 1e-9):.1f} samples/s); manifest: "
              f"{out_dir / MANIFEST_NAME}", flush=True)
    if comm is not None:
        manifest = comm.bcast(manifest, root=0)
    return manifest
