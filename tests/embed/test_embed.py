"""Embeddings (2 torchrun ranks), UMAP and the lens-physics probe, on a really trained checkpoint."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import h5py
import numpy as np
import pytest

import support
from hpc_lensiam.core.errors import UserError
from hpc_lensiam.shards.manifest import LENS_PARAMS
from support import write_embeddings

pytestmark = pytest.mark.timeout(600)


def train_tiny(data: Path, out: Path, **kw) -> Path:
    """A real 2-step checkpoint (see support.train_tiny): its last.pt."""
    return support.train_tiny(data, out, **kw) / "checkpoints" / "last.pt"


@pytest.fixture(scope="module")
def ckpt(lensiam_shards, tmp_path_factory) -> Path:
    return train_tiny(lensiam_shards, tmp_path_factory.mktemp("run") / "run")


@pytest.fixture(scope="module")
def emb2(ckpt, lensiam_shards, tmp_path_factory, bin_dir) -> Path:
    """Embeddings from a real 2-process torchrun launch (the one launch in this file)."""
    out = tmp_path_factory.mktemp("emb") / "emb.h5"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run(
        support.torchrun_cmd(2)
        + [
            "embed",
            "--checkpoint",
            str(ckpt),
            "--data",
            str(lensiam_shards),
            "--out",
            str(out),
            "--batch-size",
            "12",
            "--workers",
            "2",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert "embed: 128 images (64 samples x 2 view(s))" in r.stdout and "2 rank(s)" in r.stdout
    return out


def _shard_params(data_dir: Path) -> dict[str, dict]:
    """key -> lens dict, straight from the tar files (independent of the code under test)."""
    out = {}
    for tar in sorted(data_dir.glob("shard-*.tar")):
        with tarfile.open(tar) as t:
            for m in t.getmembers():
                if m.name.endswith(".params.json"):
                    out[m.name.split(".")[0]] = json.loads(t.extractfile(m).read())["lens"]
    return out


def _shard_image(data_dir: Path, key: str, view: int) -> np.ndarray:
    import io

    with tarfile.open(data_dir / f"shard-{key.split('_')[0]}.tar") as t:
        return np.load(io.BytesIO(t.extractfile(f"{key}.view{view}.npy").read()))


# --------------------------------------------------------------------------------------- embed
@pytest.mark.slow
def test_embed_two_ranks_every_image_once_aligned(emb2, ckpt, lensiam_shards):
    import torch

    from hpc_lensiam.embed.extract import load_embeddings
    from hpc_lensiam.models.weights import load_backbone

    e = load_embeddings(emb2)
    manifest = json.loads((lensiam_shards / "manifest.json").read_text())
    n = manifest["num_samples"] * 2
    assert e["features"].shape == (n, 512) and e["features"].dtype == np.float32
    assert np.isfinite(e["features"]).all()
    pairs = list(zip(e["keys"].tolist(), e["view"].tolist()))
    assert len(set(pairs)) == n  # no image twice across the 2 ranks
    truth = _shard_params(lensiam_shards)
    assert set(e["keys"].tolist()) == set(truth)  # none missed
    assert sorted(pairs) == pairs  # deterministic order: key, then view
    for i, key in enumerate(e["keys"]):  # parameters aligned with their images
        for name in LENS_PARAMS:
            assert e["params"][name][i] == pytest.approx(truth[key][name], abs=1e-12)
    # both views of a system share pair_id, different systems differ
    assert (e["pair_id"][0::2] == e["pair_id"][1::2]).all() and len(np.unique(e["pair_id"])) == n // 2
    # features aligned with their images: recompute a few rows with the trained backbone directly
    net, info = load_backbone(ckpt)
    rows = [0, 1, 37, n - 1]
    x = np.stack([_shard_image(lensiam_shards, e["keys"][i], int(e["view"][i])) for i in rows])
    with torch.inference_mode():
        ref = net(torch.as_tensor(x).unsqueeze(1)).numpy()
    np.testing.assert_allclose(e["features"][rows], ref, rtol=1e-4, atol=1e-5)
    a = e["attrs"]
    assert a["step"] == 2 and a["arch"] == "resnet18" and a["world_size"] == 2
    assert a["checkpoint"] == str(ckpt.resolve()) and a["weights_sha256"] == info["weights_sha256"]
    from hpc_lensiam.core.io import sha256_file

    assert a["manifest_sha256"] == sha256_file(lensiam_shards / "manifest.json")
    assert not list(emb2.parent.glob("*.part*")) and not list(emb2.parent.glob(".tmp-*"))


@pytest.mark.slow
def test_embed_one_process_same_result_and_rerun_is_noop(emb2, ckpt, lensiam_shards, tmp_path, capsys):
    from hpc_lensiam.embed.extract import extract_embeddings

    out = tmp_path / "one.h5"
    extract_embeddings(str(ckpt), str(lensiam_shards), str(out), batch_size=32, workers=0, progress=False)
    with h5py.File(out) as a, h5py.File(emb2) as b:
        assert (a["keys"].asstr()[...] == b["keys"].asstr()[...]).all()
        assert (a["view"][...] == b["view"][...]).all()
        np.testing.assert_allclose(a["features"][...], b["features"][...], rtol=1e-4, atol=1e-5)
        assert a.attrs["world_size"] == 1
    mtime = out.stat().st_mtime_ns
    capsys.readouterr()
    extract_embeddings(str(ckpt), str(lensiam_shards), str(out), batch_size=7, workers=0, progress=False)
    assert "up to date" in capsys.readouterr().out and out.stat().st_mtime_ns == mtime


def test_embed_single_mode_one_view(ckpt, single_shards, tmp_path):
    from hpc_lensiam.embed.extract import extract_embeddings, load_embeddings

    out = tmp_path / "single.h5"
    extract_embeddings(str(ckpt), str(single_shards), str(out), batch_size=64, workers=0, progress=False)
    e = load_embeddings(out)
    assert e["features"].shape == (64, 512) and set(e["view"].tolist()) == {1}
    assert len(np.unique(e["keys"])) == 64 and e["attrs"]["data_mode"] == "single"


def test_embed_bad_checkpoints(ckpt, lensiam_shards, tmp_path):
    import torch

    from hpc_lensiam.embed.extract import extract_embeddings
    from hpc_lensiam.train.checkpoint import save_checkpoint

    junk = tmp_path / "junk.pt"
    junk.write_text("not a checkpoint")
    with pytest.raises(UserError, match="cannot read checkpoint"):
        extract_embeddings(str(junk), str(lensiam_shards), str(tmp_path / "x.h5"))
    with pytest.raises(UserError, match="no such checkpoint"):
        extract_embeddings(str(tmp_path / "missing.pt"), str(lensiam_shards), str(tmp_path / "x.h5"))
    state = torch.load(ckpt, map_location="cpu", weights_only=True)  # weights resnet18, config says resnet50
    state["config"]["arch"] = "resnet50"
    save_checkpoint(tmp_path / "wrong.pt", state)
    with pytest.raises(UserError, match="config says arch 'resnet50' but its weights are a resnet18"):
        extract_embeddings(str(tmp_path / "wrong.pt"), str(lensiam_shards), str(tmp_path / "x.h5"))
    exported = {"conv1.weight": torch.zeros(64, 3, 7, 7)}
    torch.save(exported, tmp_path / "plain.pt")
    with pytest.raises(UserError, match="no model weights|not a SimSiam"):
        extract_embeddings(str(tmp_path / "plain.pt"), str(lensiam_shards), str(tmp_path / "x.h5"))
    assert not (tmp_path / "x.h5").exists()


@pytest.mark.slow
def test_embed_random_weights_reference(emb2, ckpt, lensiam_shards, tmp_path, capsys):
    """``--checkpoint none``: the no-pretraining reference is a seeded draw (same seed, same
    features; another seed, others), labelled as such in the file, and bad flags are one line."""
    from hpc_lensiam.cli import main
    from hpc_lensiam.embed.extract import extract_embeddings, load_embeddings

    run = {"batch_size": 32, "workers": 0, "progress": False}
    a, b, c = tmp_path / "r0.h5", tmp_path / "r0b.h5", tmp_path / "r1.h5"
    extract_embeddings("none", str(lensiam_shards), str(a), arch="resnet18", seed=0, **run)
    extract_embeddings("none", str(lensiam_shards), str(b), batch_size=7, workers=0, progress=False)  # defaults
    extract_embeddings("none", str(lensiam_shards), str(c), arch="resnet18", seed=1, **run)
    ea, eb, ec, trained = (load_embeddings(p) for p in (a, b, c, emb2))
    np.testing.assert_allclose(ea["features"], eb["features"], rtol=1e-5, atol=1e-6)
    assert ea["features"].shape == trained["features"].shape == (128, 512)
    assert (ea["keys"] == trained["keys"]).all() and np.isfinite(ea["features"]).all()
    for other in (ec, trained):  # another seed, or training, gives other features
        assert np.abs(ea["features"] - other["features"]).max() > 1e-2 * np.abs(ea["features"]).max()
    assert ea["attrs"]["checkpoint"] == "none (random resnet18 weights, seed 0)"
    assert ea["attrs"]["step"] == 0 and ea["attrs"]["train_mode"] == "random-weights"
    assert ea["attrs"]["weights_sha256"] != ec["attrs"]["weights_sha256"]

    def cli(*args):
        capsys.readouterr()
        rc = main(["embed", "--data", str(lensiam_shards), "--out", str(tmp_path / "x.h5"), *map(str, args)])
        return rc, capsys.readouterr().err

    for args, expect in (
        (("--checkpoint", "none", "--arch", "resnet7"), "--arch: 'resnet7' is not one of"),
        (("--checkpoint", ckpt, "--seed", 3), "--seed: only with --checkpoint none"),
        (("--checkpoint", ckpt, "--arch", "resnet50"), "wrong arch: resnet18, expected resnet50"),
    ):
        rc, err = cli(*args)
        assert rc == 2 and err.count("\n") == 1 and err.startswith("hpc-lensiam: error: ") and expect in err, err
    assert not (tmp_path / "x.h5").exists()


# ---------------------------------------------------------------------------------------- UMAP
@pytest.mark.slow
def test_umap_small_file(emb2, tmp_path):
    import csv
    import shutil

    from hpc_lensiam.core.io import sha256_file
    from hpc_lensiam.embed.umap import run_umap

    emb = tmp_path / "emb.h5"
    shutil.copyfile(emb2, emb)
    before = sha256_file(emb)
    png = tmp_path / "umap.png"
    res = run_umap(str(emb), str(png), ["theta_E", "e1", "gamma"], seed=3)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and res["points"] == 128
    # the coordinates go to their own CSV beside the figure; the input is only read
    assert res["coords"] == str(tmp_path / "umap.csv") and res["settings"]["seed"] == 3
    with open(res["coords"], newline="") as f:
        rows = list(csv.DictReader(f))
    u = np.array([[float(r["umap_1"]), float(r["umap_2"])] for r in rows])
    assert u.shape == (128, 2) and np.isfinite(u).all()
    np.testing.assert_allclose(u, res["coordinates"], rtol=1e-5)
    assert sha256_file(emb) == before
    with h5py.File(emb) as f:
        assert "umap" not in f and [r["key"] for r in rows] == list(f["keys"].asstr()[...])
        assert [float(r["theta_E"]) for r in rows] == pytest.approx(f["params"]["theta_E"][...], rel=1e-5)
        assert f["features"].shape == (128, 512) and "params" in f  # the rest is intact
    with pytest.raises(UserError, match="unknown column 'theta'"):
        run_umap(str(emb), str(tmp_path / "x.png"), ["theta"], seed=0)


# --------------------------------------------------------------------------------------- probe
def test_probe_near_one_with_signal_near_zero_on_noise(tmp_path):
    from hpc_lensiam.embed.probe import probe
    from hpc_lensiam.evaluation.probe import split_by_key

    rng = np.random.default_rng(0)
    systems = 400
    keys = np.repeat([f"{i // 50:06d}_{i % 50:06d}" for i in range(systems)], 2)
    params = {p: np.repeat(rng.uniform(-1, 1, systems), 2) for p in LENS_PARAMS}
    y = np.stack([params[p] for p in LENS_PARAMS], 1)
    signal = y @ rng.normal(size=(8, 64)) + 0.02 * rng.normal(size=(2 * systems, 64))
    noise = rng.normal(size=(2 * systems, 64))
    write_embeddings(tmp_path / "lensiam.h5", signal, params, keys)
    write_embeddings(tmp_path / "simsiam.h5", noise, params, keys)

    test = split_by_key(keys)
    assert (test[0::2] == test[1::2]).all() and 0.1 < test.mean() < 0.3  # pairs never split
    rep = probe(
        str(tmp_path / "lensiam.h5"), against=str(tmp_path / "simsiam.h5"), out_json=str(tmp_path / "probe.json")
    )
    good, bad = rep["results"]["lensiam"], rep["results"]["simsiam"]
    for p in LENS_PARAMS:
        assert good["ridge"][p] > 0.98 and good["knn"][p] > 0.5
        assert bad["ridge"][p] < 0.1 and bad["knn"][p] < 0.1
    saved = json.loads((tmp_path / "probe.json").read_text())
    assert set(saved["results"]) == {"lensiam", "simsiam"} and saved["results"]["lensiam"]["n_test"] == test.sum()


@pytest.mark.slow
def test_probe_on_real_embeddings_and_bad_files(emb2, tmp_path, capsys):
    from hpc_lensiam.embed.probe import probe
    from hpc_lensiam.embed.umap import run_umap

    rep = probe(str(emb2))
    table = capsys.readouterr().out
    assert all(p in table for p in LENS_PARAMS) and "k-NN" in table and "ridge" in table
    (res,) = rep["results"].values()
    assert all(np.isfinite(res[m][p]) for m in ("knn", "ridge") for p in LENS_PARAMS)

    bare = tmp_path / "noparams.h5"
    write_embeddings(bare, np.zeros((20, 4)), None, np.repeat([f"{i:06d}" for i in range(10)], 2))
    with pytest.raises(UserError, match="no lens parameters"):
        probe(str(bare))
    with pytest.raises(UserError, match="no lens parameter 'theta_E'"):
        run_umap(str(bare), str(tmp_path / "u.png"), ["theta_E"])
    (tmp_path / "text.h5").write_text("hello")
    with pytest.raises(UserError, match="not an HDF5 file"):
        probe(str(tmp_path / "text.h5"))
    # through the CLI: one line, exit code 2
    r = subprocess.run(
        [sys.executable, "-m", "hpc_lensiam", "probe", "--embeddings", str(bare)], capture_output=True, text=True
    )
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "no lens parameters" in r.stderr
