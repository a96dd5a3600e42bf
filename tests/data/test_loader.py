"""Shard loader and batched augmentations, on shards made by the real simulator (conftest fixtures)."""

from __future__ import annotations

import io
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from hpc_lensiam.core.errors import UserError
from hpc_lensiam.data.augment import augment, gaussian_blur, make_pair, random_resized_crop_flip
from hpc_lensiam.data.loader import ShardError, ShardLoader
from hpc_lensiam.shards.manifest import NpyDecoder, shard_paths
from hpc_lensiam.shards.tar import read_shard
from support import rerecord_shard


def _keys(loader: ShardLoader, epoch: int = 0, start: int = 0) -> list[str]:
    return [k for b in loader.epoch(epoch, start) for k in b["keys"]]


def _all_samples(data_dir) -> dict:
    return {s["__key__"]: s for p in shard_paths(data_dir) for s in read_shard(p)}


def test_npy_decoder_matches_np_load(lensiam_shards):
    decode = NpyDecoder()
    for sample in list(_all_samples(lensiam_shards).values())[:5]:
        for name in ("view1.npy", "view2.npy"):
            ref = np.load(io.BytesIO(sample[name]))
            out = decode(sample[name])
            assert out.dtype == np.float32 and out.shape == (48, 48) and np.array_equal(out, ref)
    with pytest.raises(ValueError, match="float32"):
        decode(_npy(np.zeros((4, 4), dtype=np.float64)))


def test_fast_tar_reader_matches_webdataset(lensiam_shards, tmp_path):
    import tarfile

    from webdataset.tariterators import group_by_keys, tar_file_iterator

    path = shard_paths(lensiam_shards)[0]
    with open(path, "rb") as f:
        ref = list(group_by_keys({**x, "__url__": path} for x in tar_file_iterator(f)))
    assert list(read_shard(path)) == ref and len(ref) == 8
    # a shard with pax headers (long names) falls back to webdataset's tarfile reader
    long_key = "k" * 120
    with tarfile.open(tmp_path / "pax.tar", "w", format=tarfile.PAX_FORMAT) as tar:
        for key in ("a", long_key):
            for ext, data in (("view1.npy", _npy(np.ones((2, 2), np.float32))), ("params.json", b"{}")):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    samples = list(read_shard(str(tmp_path / "pax.tar")))
    assert [s["__key__"] for s in samples] == ["a", long_key] and samples[1]["params.json"] == b"{}"


def _npy(a) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a)
    return buf.getvalue()


def test_lensiam_batches_are_the_stored_pairs(lensiam_shards):
    loader = ShardLoader(str(lensiam_shards), "lens", batch_size=4, workers=0)
    assert loader.batches_per_epoch == 16 and loader.image_shape == (48, 48)
    samples = _all_samples(lensiam_shards)
    batch = next(iter(loader.epoch(0)))
    assert set(batch) == {"x1", "x2", "keys", "bad"} and batch["bad"] == 0
    for name in ("x1", "x2"):
        assert batch[name].shape == (4, 1, 48, 48) and batch[name].dtype == torch.float32
    for i, key in enumerate(batch["keys"]):
        assert np.array_equal(batch["x1"][i, 0].numpy(), np.load(io.BytesIO(samples[key]["view1.npy"])))
        assert np.array_equal(batch["x2"][i, 0].numpy(), np.load(io.BytesIO(samples[key]["view2.npy"])))
    assert not torch.equal(batch["x1"], batch["x2"])


def test_ranks_see_disjoint_samples_each_exactly_once_per_epoch(lensiam_shards):
    per_rank = [_keys(ShardLoader(str(lensiam_shards), "lens", 4, rank=r, world_size=2, workers=2)) for r in range(2)]
    assert len(per_rank[0]) == len(per_rank[1]) == 32
    assert not set(per_rank[0]) & set(per_rank[1])
    counts = Counter(per_rank[0] + per_rank[1])
    assert len(counts) == 64 and set(counts.values()) == {1}


def test_uneven_split_still_gives_equal_steps_per_rank(lensiam_shards):
    """8 shards over 3 ranks (3, 3, 2 shards): every rank yields the same number of batches."""
    loaders = [ShardLoader(str(lensiam_shards), "lens", 4, rank=r, world_size=3, workers=1) for r in range(3)]
    keys = [_keys(loader, epoch=1) for loader in loaders]
    assert {loader.batches_per_epoch for loader in loaders} == {64 // 12}
    assert [len(k) for k in keys] == [20, 20, 20]
    assert not (set(keys[0]) & set(keys[1])) and not (set(keys[1]) & set(keys[2])) and not (set(keys[0]) & set(keys[2]))


def test_seeded_order_and_exact_resume_inside_an_epoch(lensiam_shards):
    def loader(seed=0):
        return ShardLoader(str(lensiam_shards), "lens", 4, workers=2, seed=seed, shuffle_buffer=16)

    full = list(loader().epoch(3))
    assert [b["keys"] for b in full] == [b["keys"] for b in loader().epoch(3)]  # reproducible
    assert _keys(loader(), 4) != [k for b in full for k in b["keys"]]  # new order per epoch
    assert _keys(loader(seed=1), 3) != [k for b in full for k in b["keys"]]
    for start in (1, 5):  # resumed mid-epoch: the same remaining batches, whichever worker
        tail = list(loader().epoch(3, start=start))
        assert [b["keys"] for b in tail] == [b["keys"] for b in full[start:]]
        assert all(torch.equal(a["x1"], b["x1"]) for a, b in zip(tail, full[start:]))


def test_workers_reduced_when_shards_are_few(lensiam_shards):
    with pytest.warns(UserWarning, match="using 2 worker"):
        loader = ShardLoader(str(lensiam_shards), "lens", 2, rank=0, world_size=4, workers=3)
    assert loader.workers == 2 and len(_keys(loader)) == 16


def test_simsiam_mode_reads_one_image(single_shards, lensiam_shards):
    batch = next(iter(ShardLoader(str(single_shards), "standard", 8, workers=0).epoch(0)))
    assert set(batch) == {"x", "keys", "bad"} and batch["x"].shape == (8, 1, 48, 48)
    pairs = ShardLoader(str(lensiam_shards), "standard", 8, workers=0)
    b = next(iter(pairs.epoch(0)))
    samples = _all_samples(lensiam_shards)
    assert np.array_equal(b["x"][0, 0].numpy(), np.load(io.BytesIO(samples[b["keys"][0]]["view1.npy"])))
    with pytest.raises(UserError, match="needs pair shards"):
        ShardLoader(str(single_shards), "lens", 8)


# ------------------------------------------------------------------------------------- bad input
@pytest.fixture
def shard_copy(lensiam_shards, tmp_path) -> Path:
    return Path(shutil.copytree(lensiam_shards, tmp_path / "copy"))


def test_missing_or_empty_data_dir(tmp_path):
    with pytest.raises(UserError, match="no such data directory"):
        ShardLoader(str(tmp_path / "absent"), "lens", 4)
    with pytest.raises(UserError, match="manifest.json: missing"):
        ShardLoader(str(tmp_path), "lens", 4)
    with pytest.raises(UserError, match="no shard directory"):
        ShardLoader("", "lensiam", 4)


def test_missing_shard_is_named(shard_copy):
    (shard_copy / "shard-000003.tar").unlink()
    with pytest.raises(ShardError, match=r"shard-000003\.tar: listed in .* but missing"):
        ShardLoader(str(shard_copy), "lens", 4)


def test_truncated_shard_is_named_or_skipped_with_a_count(shard_copy, capfd):
    bad = shard_copy / "shard-000005.tar"
    bad.write_bytes(bad.read_bytes()[:30000])  # cut mid-sample
    with pytest.raises(ShardError, match=r"shard .*shard-000005\.tar.*cannot read"):
        for _ in ShardLoader(str(shard_copy), "lens", 4, workers=2).epoch(0):
            pass
    loader = ShardLoader(str(shard_copy), "lens", 4, workers=2, skip_bad_samples=True)
    batches = list(loader.epoch(0))
    assert len(batches) == 16 and sum(b["bad"] for b in batches) >= 1
    assert "shard-000005.tar" in capfd.readouterr().err


def test_corrupt_sample_is_named(shard_copy):
    import webdataset as wds

    path = shard_copy / "shard-000002.tar"
    samples = list(read_shard(str(path)))
    samples[3]["view2.npy"] = b"\x93NUMPY garbage"
    with wds.TarWriter(str(path), encoder=False) as tar:
        for s in samples:
            tar.write({k: v for k, v in s.items() if k != "__url__"})
    rerecord_shard(shard_copy, path.name)  # a bad sample in a shard its manifest vouches for
    key = samples[3]["__key__"]
    with pytest.raises(ShardError, match=rf"shard-000002\.tar sample '{key}'"):
        for _ in ShardLoader(str(shard_copy), "lens", 8, workers=0).epoch(0):
            pass
    batches = list(ShardLoader(str(shard_copy), "lens", 8, workers=0, skip_bad_samples=True).epoch(0))
    assert sum(b["bad"] for b in batches) == 1 and key not in {k for b in batches for k in b["keys"]}


def test_batch_larger_than_data_and_too_few_shards(lensiam_shards):
    with pytest.raises(UserError, match="batch larger than the data.*holds 64"):
        ShardLoader(str(lensiam_shards), "lens", 40, world_size=2)
    with pytest.raises(UserError, match="8 shard.*for 16 ranks"):
        ShardLoader(str(lensiam_shards), "lens", 2, world_size=16)


# ---------------------------------------------------------------------------------- augmentations
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def test_augment_is_batched_seeded_and_per_sample(single_shards):
    x = next(iter(ShardLoader(str(single_shards), "standard", 16, workers=0).epoch(0)))["x"].to(DEVICE)
    g = torch.Generator(device=DEVICE).manual_seed(0)
    v1, v2 = make_pair(x, g)
    assert v1.shape == x.shape and v1.device == x.device and torch.isfinite(v1).all()
    assert not torch.allclose(v1, v2)  # two different views
    again = make_pair(x, torch.Generator(device=DEVICE).manual_seed(0))
    assert torch.equal(v1, again[0]) and torch.equal(v2, again[1])  # reproducible
    same = x[:1].expand(8, -1, -1, -1).contiguous()  # one image 8 times:
    out = augment(same, torch.Generator(device=DEVICE).manual_seed(1))
    assert len({round(float(o.sum()), 3) for o in out}) == 8  # 8 different draws


def test_crop_keeps_size_and_blur_keeps_flux():
    x = torch.rand(32, 1, 48, 48)
    g = torch.Generator().manual_seed(0)
    assert random_resized_crop_flip(x, g).shape == x.shape
    y = gaussian_blur(x, g)
    assert y.shape == x.shape
    assert torch.allclose(y.mean(dim=(1, 2, 3)), x.mean(dim=(1, 2, 3)), atol=0.02)
    assert (y - x).abs().amax(dim=(1, 2, 3)).gt(1e-4).sum() > 4  # some blurred (p=0.5)
    assert (y - x).abs().amax(dim=(1, 2, 3)).lt(1e-6).sum() > 4  # some untouched


@pytest.mark.parametrize("n,bufsize", [(0, 5), (3, 5), (40, 7), (40, 40), (17, 1)])
def test_shuffle_buffer_is_webdatasets_stream(n, bufsize):
    """The loader's own shuffle buffer (training on shards needs no webdataset, which the GPU
    machine's image lacks) yields webdataset's exact stream for the same seeded rng: a resumed run
    and a run from before the change see the same samples in the same order."""
    import random

    from webdataset.filters import _shuffle as wds_shuffle

    from hpc_lensiam.data.loader import _shuffle

    for seed in range(3):
        ours = list(_shuffle(iter(range(n)), bufsize, bufsize, random.Random(seed)))
        theirs = list(wds_shuffle(iter(range(n)), bufsize=bufsize, initial=bufsize, rng=random.Random(seed)))
        assert ours == theirs and sorted(ours) == list(range(n))
