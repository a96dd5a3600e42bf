"""``hpc-lensiam simulate``: shard i is simulated from a seed derived from (seed, i), by whichever rank.

The data set is therefore byte-for-byte the same whatever the number of ranks. The shard-set
machinery (ranks, temporary names, ``.done`` records, the manifest) is :mod:`hpc_lensiam.shards.writer`,
shared with ``ingest``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np

from ..core import __version__
from ..core.config import to_dict
from ..core.errors import UserError
from ..core.io import sha256_file, sha256_json
from ..shards.manifest import MANIFEST_FORMAT, shard_name
from ..shards.writer import ShardPlan, check_existing, encode_sample, write_shard_set, write_tar
from .config import MODES, RENDERERS, TORCH_FAMILIES


def shard_rng(seed: int, index: int) -> np.random.Generator:
    """The one source of randomness for shard ``index``: independent of rank and rank count."""
    return np.random.default_rng(np.random.SeedSequence([seed, index]))


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
    """``--renderer torch``: the batched renderer on ``device`` (float32, as the shards store); under
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
    from ..core.runtime import mpi_world
    from .families import resolve_family

    comm, rank, _ = mpi_world()  # the srun-singleton check, before any work
    if mode not in MODES:
        raise UserError(f"mode: {mode!r} is not one of {', '.join(MODES)} (--samples pairs|single)")
    if engine not in RENDERERS:
        raise UserError(f"--renderer: {engine!r} is not one of {', '.join(RENDERERS)}")
    if engine == "torch" and family not in TORCH_FAMILIES:
        raise UserError(f"--renderer torch: renders the paper family (EPL + shear) only, not --family {family}")
    if engine == "torch" and (any(v is not None for v in (match or {}).values()) or preset == "hst-f140w"):
        raise UserError("--renderer torch: renders the paper presets only, not --match or a matched preset")
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
    numerics = getattr(make_simulator, "NUMERICS", 1) if engine == "lenstronomy" else 1
    if numerics > 1:  # the generator's revision: shards of older code (none recorded = 1) are not resumed into
        plan["numerics"] = numerics
    if getattr(cfg, "match_file", None) or getattr(cfg, "match_psf_file", None):  # simulate/match.py
        plan["matched"] = {"file": cfg.match_file, "psf": cfg.match_psf_file, "flux_units": cfg.flux_units}
    if engine != "lenstronomy":  # likewise the lenstronomy engine's
        plan["engine"] = engine
        if device_type(device):  # CPU and CUDA random streams differ: the bytes depend on it
            plan["device"] = device_type(device)
    check_existing(out_dir, plan)
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
