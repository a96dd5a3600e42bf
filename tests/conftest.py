"""Shared fixtures: the venv's tools, the optional real HST data, small shard sets. Fixtures only:
the helpers that tests import live in tests/support.py (no test imports conftest)."""

from __future__ import annotations

from pathlib import Path

import pytest

from support import BIN, SHARED_DATA, simulate_into

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


@pytest.fixture(scope="session")
def lensiam_shards(tmp_path_factory) -> Path:
    """64 small LenSiam pairs in 8 shards (hst preset, 48x48 px to keep tests fast)."""
    out = tmp_path_factory.mktemp("shards") / "lensiam"
    return simulate_into(
        out, num_samples=64, shard_size=8, mode="lensiam", seed=1, overrides={"instrument": {"num_pix": 48}}
    )


@pytest.fixture(scope="session")
def single_shards(tmp_path_factory) -> Path:
    """64 single images in 8 shards (euclid preset, 48x48 px)."""
    out = tmp_path_factory.mktemp("shards") / "single"
    return simulate_into(
        out,
        num_samples=64,
        shard_size=8,
        mode="single",
        preset="euclid",
        seed=2,
        overrides={"instrument": {"num_pix": 48}},
    )
