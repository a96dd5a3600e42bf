"""Shared fixtures: paths to the venv's tools, the optional real HST data, small shard sets."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
BIN = Path(sys.executable).parent  # the venv's bin: mpiexec, torchrun, hpc-lensiam

try:  # no network: never let astropy try to download IERS tables
    from astropy.utils import iers

    iers.conf.auto_download = False
except Exception:  # pragma: no cover
    pass


@pytest.fixture(scope="session")
def bin_dir() -> Path:
    return BIN


@pytest.fixture(scope="session")
def cosmos_dir() -> Path:
    d = SHARED_DATA / "cosmos_23.5_sample"
    if not (d / "real_galaxy_catalog_23.5.fits").is_file():
        pytest.skip(f"real COSMOS sample not present at {d}")
    return d


@pytest.fixture(scope="session")
def hst_psf_dir() -> Path:
    d = SHARED_DATA / "hst_psf"
    if not (d / "emp_psf_f814w.fits").is_file():
        pytest.skip(f"HST PSF files not present at {d}")
    return d


def _simulate(out: Path, **kw) -> Path:
    from hpc_lensiam.simulate.writer import simulate_shards

    simulate_shards(out_dir=str(out), progress=False, **kw)
    return out


@pytest.fixture(scope="session")
def lensiam_shards(tmp_path_factory) -> Path:
    """64 small LenSiam pairs in 8 shards (hst preset, 48x48 px to keep tests fast)."""
    out = tmp_path_factory.mktemp("shards") / "lensiam"
    return _simulate(
        out, num_samples=64, shard_size=8, mode="lensiam", seed=1, overrides={"instrument": {"num_pix": 48}}
    )


@pytest.fixture(scope="session")
def single_shards(tmp_path_factory) -> Path:
    """64 single images in 8 shards (euclid preset, 48x48 px)."""
    out = tmp_path_factory.mktemp("shards") / "single"
    return _simulate(
        out,
        num_samples=64,
        shard_size=8,
        mode="single",
        preset="euclid",
        seed=2,
        overrides={"instrument": {"num_pix": 48}},
    )


def train_tiny(data: Path, out: Path, **kw) -> Path:
    """The real trainer, 2 steps of a resnet18 with small heads: a run folder in the real format."""
    from hpc_lensiam.train.loop import train, train_config

    cfg = dict(
        data=str(data),
        out=str(out),
        arch="resnet18",
        batch_size=8,
        max_steps=2,
        epochs=1,
        workers=0,
        proj_dim=64,
        pred_dim=16,
        log_every=1,
    )
    cfg.update(kw)
    train(train_config(**cfg))
    return out


def torchrun_cmd(nproc: int = 2) -> list[str]:
    """``torchrun --standalone --nproc_per_node N -m hpc_lensiam`` from this venv: append the subcommand."""
    return [str(BIN / "torchrun"), "--standalone", "--nproc_per_node", str(nproc), "-m", "hpc_lensiam"]


def launcher_env(**extra: str) -> dict[str, str]:
    """This process's environment for a launcher child, without the RANK/WORLD_SIZE/LOCAL_RANK that a
    parent torchrun may have set (the child would take itself for one of that run's workers)."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    return {**env, **extra}


def rerecord_shard(data_dir: Path, name: str) -> None:
    """Make the manifest vouch for shard ``name`` as it now is (size, sha256): a test that edits a
    shard's content on purpose models a bad sample written by the simulator, not a damaged file."""
    import json

    from hpc_lensiam.core.io import sha256_file
    from hpc_lensiam.shards.manifest import MANIFEST_NAME

    path = Path(data_dir) / MANIFEST_NAME
    manifest = json.loads(path.read_text())
    for entry in manifest["shards"]:
        if entry["name"] == name:
            entry.update(size=(Path(data_dir) / name).stat().st_size, sha256=sha256_file(Path(data_dir) / name))
    path.write_text(json.dumps(manifest))
