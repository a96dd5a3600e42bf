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

MODES = ("lensiam", "single")
ENGINES = ("lenstronomy", "torch")  # LensSimulator, or its batched torch twin (docs/online.md)


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
    """
    from .sources import CATALOG_NAMES

    out = {"psf_files": {Path(f).name: sha256_file(f) for f in getattr(cfg, "psf_files", None) or []}}
    if getattr(cfg, "cosmos_dir", None):
        cat = next((Path(cfg.cosmos_dir) / n for n in CATALOG_NAMES if (Path(cfg.cosmos_dir) / n).is_file()), None)
        out["cosmos_catalog"] = {cat.name: sha256_file(cat)} if cat else {}
    return out


def torch_simulator(cfg, device: str):
    """``--engine torch``: the batched renderer on ``device`` (float32, as the shards store)."""
    from .torch_render import TorchLensSimulator, resolve_device

    return TorchLensSimulator(cfg, device=resolve_device(device, "--device"))


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
) -> dict:
    """Simulate ``num_samples`` pairs (or single images) into WebDataset shards; return the manifest.

    Runs as one process, or as every rank of ``mpiexec -n K``: same arguments, same bytes.
    ``family``: "paper" (LensSimulator) or "survey" (simulate/survey, lenses and non-lenses with
    ``lens_fraction``). Rank 0 holds ``DIR/.lock`` for the whole run; a rerun checks every existing
    shard's sha256 against the record made when it was written and redoes those that fail.
    """
    from ..core.runtime import mpi_world
    from .families import resolve_family

    _, rank, _ = mpi_world()  # the srun-singleton check, before any work
    if mode not in MODES:
        raise UserError(f"--mode: {mode!r} is not one of {', '.join(MODES)}")
    if engine not in ENGINES:
        raise UserError(f"--engine: {engine!r} is not one of {', '.join(ENGINES)}")
    if engine == "torch" and family != "paper":
        raise UserError(f"--engine torch: renders the paper family (EPL + shear) only, not --family {family}")
    if num_samples < 1 or shard_size < 1:
        raise UserError(f"--pairs and --shard-size must be >= 1 (got {num_samples}, {shard_size})")
    if seed < 0:
        raise UserError(f"--seed: must be >= 0, got {seed}")
    cfg, make_simulator = resolve_family(
        family, mode, preset, config_path, cosmos_dir, psf_files, psf_pixel_scale_arcsec, overrides, lens_fraction
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
    if engine != "lenstronomy":  # likewise the lenstronomy engine's
        plan["engine"] = engine
    check_existing(out_dir, plan)

    # Build the simulator before touching the folder: a bad COSMOS dir or PSF file writes nothing.
    import warnings

    with warnings.catch_warnings(record=True) as notes:
        warnings.simplefilter("always")
        sim = make_simulator(cfg) if engine == "lenstronomy" else torch_simulator(cfg, device)
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
