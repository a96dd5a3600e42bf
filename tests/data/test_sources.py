"""The training-data seam: a new ``--data`` source is one class plus one registry entry.

The extra source here reads real simulated pairs (the conftest shards, decoded once into one
``pairs.npy``) from a folder; it is registered in-process and the real trainer runs through it:
the registry in data/sources.py is the only thing the test touches.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from hpc_lensiam.core.errors import UserError
from hpc_lensiam.core.io import sha256_file
from hpc_lensiam.data.sources import SOURCES, OnlineSource, PrefixSource, ShardSource, source_for
from hpc_lensiam.models.methods import build_method
from hpc_lensiam.models.weights import load_checkpoint
from hpc_lensiam.shards.manifest import decode_npy, shard_paths
from hpc_lensiam.shards.tar import read_shard
from hpc_lensiam.train.loop import train, train_config
from support import tiny_config, train_tiny


class NpyPairLoader:
    """One rank's micro-batches of an in-memory ``(N, 2, H, W)`` pair array, in order."""

    def __init__(self, pairs: np.ndarray, batch_size: int, rank: int, world_size: int, grad_accum: int):
        self.pairs = torch.from_numpy(pairs[rank::world_size])
        self.batch_size = batch_size
        self.batches_per_epoch = len(self.pairs) // batch_size // grad_accum * grad_accum
        self.image_shape = tuple(pairs.shape[-2:])

    def epoch(self, epoch: int, start: int = 0):
        for i in range(start, self.batches_per_epoch):
            b = self.pairs[i * self.batch_size : (i + 1) * self.batch_size]
            yield {"x1": b[:, :1], "x2": b[:, 1:], "keys": [f"e{epoch}_b{i}"] * len(b), "bad": 0}


class NpyPairs(PrefixSource):
    """``--data npy:DIR``: the lens pairs in ``DIR/pairs.npy``."""

    prefix = "npy"

    def identity(self, data: str) -> str:
        path = Path(self.spec(data)) / "pairs.npy"
        if not path.is_file():
            raise UserError(f"--data {data}: no {path}")
        return sha256_file(path)

    def loader(self, cfg, engine):
        pairs = np.load(Path(self.spec(cfg.data)) / "pairs.npy")
        return NpyPairLoader(pairs, cfg.batch_size, engine.rank, engine.world_size, cfg.grad_accum)


def _pairs_folder(shards: Path, out: Path, n: int | None = None) -> Path:
    """The simulator's pairs, decoded from its shards into ``out/pairs.npy`` (first ``n``)."""
    pairs = [
        np.stack([decode_npy(s["view1.npy"]), decode_npy(s["view2.npy"])])
        for p in shard_paths(shards)
        for s in read_shard(p)
    ]
    out.mkdir(parents=True)
    np.save(out / "pairs.npy", np.stack(pairs[:n]).astype(np.float32))
    return out


@pytest.fixture
def npy_source(monkeypatch):
    source = NpyPairs()
    monkeypatch.setitem(SOURCES, "npy", source)  # the one line a new source adds to SOURCES
    return source


def test_source_for_picks_by_spec(npy_source, lensiam_shards):
    assert source_for("npy:/some/dir") is npy_source
    assert isinstance(source_for("online:hst"), OnlineSource) and isinstance(source_for("online"), OnlineSource)
    assert isinstance(source_for(str(lensiam_shards)), ShardSource)  # any other spec: a shard directory
    assert isinstance(source_for("npy_shards/run1"), ShardSource)  # a prefix needs its colon
    with pytest.raises(UserError, match="--data: no shard directory given"):
        source_for("")


@pytest.mark.slow
def test_registered_source_trains_and_guards_resume(npy_source, lensiam_shards, tmp_path):
    """2 steps through the new source: step 1's loss is the fresh model's loss on the source's first
    batch; the checkpoint carries the source's identity, so resuming on other pairs is refused."""
    folder = _pairs_folder(lensiam_shards, tmp_path / "pairs")
    run = train_tiny(f"npy:{folder}", tmp_path / "run", batch_size=8, max_steps=2)

    with open(run / "metrics.csv", newline="") as f:
        rows = {int(r["step"]): r for r in csv.DictReader(f)}
    assert sorted(rows) == [1, 2] and all(math.isfinite(float(r["loss"])) for r in rows.values())
    cfg = train_config(data=f"npy:{folder}", out=str(run), arch="resnet18", batch_size=8, proj_dim=64, pred_dim=16)
    torch.manual_seed(cfg.seed)
    model = build_method(cfg, 48).train()
    first = torch.from_numpy(np.load(folder / "pairs.npy")[:8])
    with torch.no_grad():
        loss, _ = model.loss(*model(first[:, :1], first[:, 1:]))
    assert math.isclose(float(rows[1]["loss"]), loss.item(), rel_tol=1e-4, abs_tol=1e-6)

    ckpt = load_checkpoint(run / "checkpoints" / "last.pt")
    assert ckpt["step"] == 2 and ckpt["data_manifest_sha256"] == sha256_file(folder / "pairs.npy")
    other = _pairs_folder(lensiam_shards, tmp_path / "other", n=32)
    with pytest.raises(UserError, match=r"other settings: data"):
        train(
            tiny_config(f"npy:{other}", run, max_steps=3),
            resume=True,
        )


def test_registered_source_bad_spec_is_checked_before_the_run_folder(npy_source, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(UserError, match="--data npy:.*no .*pairs.npy"):
        train_tiny(f"npy:{tmp_path / 'missing'}", out)
    assert not out.exists()
