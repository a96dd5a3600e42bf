"""Real images beside simulations: embed several folders into one file, similar (faiss) by key,
by image and --anomaly, umap --overlay; the real Euclid Q1 lens against a simulated set."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

import conftest
from hpc_lensiam.cli import main
from hpc_lensiam.core.errors import UserError
from hpc_lensiam.embed.similar import similar, unit_vectors
from hpc_lensiam.ingest.config import IngestConfig
from hpc_lensiam.shards.manifest import LENS_PARAMS

pytestmark = pytest.mark.timeout(900)
EUCLID = conftest.SHARED_DATA / "euclid_q1" / "102020532_NEG589257492489565961.fits"


@pytest.fixture(scope="module")
def ckpt(lensiam_shards, tmp_path_factory) -> Path:
    return conftest.train_tiny(lensiam_shards, tmp_path_factory.mktemp("run") / "run") / "checkpoints" / "last.pt"


@pytest.fixture(scope="module")
def real_dir(tmp_path_factory) -> Path:
    """The Euclid Q1 lens, ingested on the euclid grid at the simulated set's 48 px, labelled a lens."""
    if not EUCLID.is_file():
        pytest.skip(f"Euclid Q1 lens not present at {EUCLID}")
    from hpc_lensiam.ingest.run import ingest

    d = tmp_path_factory.mktemp("real")
    (d / "labels.csv").write_text(f"file,is_lens\n{EUCLID.name},1\n")
    out = d / "euclid_q1"
    ingest(
        str(out),
        files=[str(EUCLID)],
        labels_csv=str(d / "labels.csv"),
        config=IngestConfig(preset="euclid", num_pix=48),
        progress=False,
    )
    return out


@pytest.fixture(scope="module")
def mixed(ckpt, single_shards, real_dir, tmp_path_factory) -> Path:
    """64 simulated euclid images + the real lens, one file (the CLI's `embed --data A B`)."""
    out = tmp_path_factory.mktemp("emb") / "mixed.h5"
    assert (
        main(
            [
                "embed",
                "--checkpoint",
                str(ckpt),
                "--data",
                str(single_shards),
                str(real_dir),
                "--out",
                str(out),
                "--workers",
                "0",
            ]
        )
        == 0
    )
    return out


def test_embed_several_folders_source_column_and_unlabelled_rows(mixed, single_shards, real_dir, ckpt, tmp_path):
    from hpc_lensiam.embed.extract import extract_embeddings, load_embeddings

    e = load_embeddings(mixed, need_params=False)
    assert e["features"].shape == (65, 512) and np.isfinite(e["features"]).all()
    assert list(e["source"]) == [str(single_shards)] * 64 + [str(real_dir)]
    assert e["keys"][-1] == "000000_000000" and e["keys"][0] == "000000_000000"  # each row keeps its shard key
    assert len(np.unique(e["pair_id"])) == 65  # same key, two systems
    with h5py.File(mixed) as f:
        for p in LENS_PARAMS:  # NaN-free, marked unknown
            assert np.isfinite(f["params"][p][...]).all()
            assert f["params_known"][p][...].tolist() == [True] * 64 + [False]
        assert json.loads(f.attrs["missing_params"]) == []
    # the simulated rows are exactly those of a file made from the simulated folder alone
    alone = tmp_path / "sim.h5"
    extract_embeddings(str(ckpt), str(single_shards), str(alone), workers=0, progress=False)
    s = load_embeddings(alone)
    np.testing.assert_allclose(e["features"][:64], s["features"], rtol=1e-4, atol=1e-5)
    assert (e["keys"][:64] == s["keys"]).all()
    # real images only: no lens parameter at all -> left out; probe says so. The is_lens label the
    # CSV gave is kept (it is a label, not a lens parameter).
    only = tmp_path / "real.h5"
    extract_embeddings(str(ckpt), str(real_dir), str(only), workers=0, progress=False)
    with h5py.File(only) as f:
        assert list(f["params"]) == ["is_lens"] and json.loads(f.attrs["missing_params"]) == list(LENS_PARAMS)
        assert f["params"]["is_lens"][...].tolist() == [1]
    from hpc_lensiam.embed.probe import probe

    with pytest.raises(UserError, match="no lens parameters"):
        probe(str(only))
    rep = probe(str(mixed))  # the 64 labelled rows are probed
    (res,) = rep["results"].values()
    assert res["n_train"] + res["n_test"] == 64


def _brute_force(features: np.ndarray, q: int, k: int, skip: np.ndarray) -> list[int]:
    """Independent reference: cosine of mean-centred features, numpy argsort."""
    x = features.astype(np.float64) - features.astype(np.float64).mean(0)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    sims = x @ x[q]
    sims[skip] = -np.inf
    return np.argsort(-sims, kind="stable")[:k].tolist()


def test_similar_by_key_real_lens_among_simulations(mixed, real_dir, tmp_path, capsys):
    from hpc_lensiam.embed.extract import load_embeddings

    e = load_embeddings(mixed, need_params=False)
    png, js = tmp_path / "grid.png", tmp_path / "n.json"
    rc = main(
        [
            "similar",
            "--embeddings",
            str(mixed),
            "--key",
            "000000_000000",
            "--source",
            str(real_dir),
            "-k",
            "5",
            "--out",
            str(png),
            "--json",
            str(js),
        ]
    )
    assert rc == 0
    table = capsys.readouterr().out
    rep = json.loads(js.read_text())
    nb = rep["neighbours"]
    assert len(nb) == 5 and all(r["source"] != str(real_dir) for r in nb)  # all simulated
    sims = [r["similarity"] for r in nb]
    assert sims == sorted(sims, reverse=True) and all(-1.0001 <= v <= 1.0001 for v in sims)
    rows = [int(np.nonzero((e["keys"] == r["key"]) & (e["source"] == r["source"]))[0][0]) for r in nb]
    assert rows == _brute_force(e["features"], 64, 5, e["source"] == str(real_dir))
    assert all(set(r["params"]) == set(LENS_PARAMS) for r in nb)  # simulated: labelled
    assert nb[0]["key"] in table and "cosine" in table
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # a key in both folders needs --source; an unknown key is one error line
    assert main(["similar", "--embeddings", str(mixed), "--key", "000000_000000"]) == 2
    assert "in several sources" in capsys.readouterr().err
    assert main(["similar", "--embeddings", str(mixed), "--key", "999999_000000"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--key 999999_000000: no such sample" in err


def test_similar_by_image_equals_by_key(mixed, ckpt, real_dir, tmp_path, lensiam_shards):
    by_key = similar(str(mixed), key="000000_000000", source=str(real_dir), k=4, progress=False)
    by_img = similar(str(mixed), image=str(EUCLID), checkpoint=str(ckpt), k=5, progress=False)
    first = by_img["neighbours"][0]
    assert first["key"] == "000000_000000" and first["source"] == str(real_dir)  # itself, re-ingested
    assert first["similarity"] > 0.9999
    assert [(r["key"], r["source"]) for r in by_img["neighbours"][1:]] == [
        (r["key"], r["source"]) for r in by_key["neighbours"]
    ]
    with pytest.raises(UserError, match="needs --checkpoint"):
        similar(str(mixed), image=str(EUCLID))
    other = conftest.train_tiny(lensiam_shards, tmp_path / "other", max_steps=1) / "checkpoints" / "last.pt"
    with pytest.raises(UserError, match="not the backbone"):
        similar(str(mixed), image=str(EUCLID), checkpoint=str(other))


def _write_features(path: Path, x: np.ndarray) -> None:
    with h5py.File(path, "w") as f:
        f["features"] = x.astype(np.float32)
        keys = [f"{i // 100:06d}_{i % 100:06d}" for i in range(len(x))]
        f.create_dataset("keys", data=np.array(keys, dtype=object), dtype=h5py.string_dtype())
        f["view"] = np.ones(len(x), np.int8)
        f["pair_id"] = np.arange(len(x))


@pytest.mark.parametrize("index", ["flat", "ivf"])
def test_anomaly_ranks_the_isolated_points_first(tmp_path, index):
    """Tight clusters plus 3 points far from everything: those 3 come first, flat and IVF alike."""
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(8, 32))
    x = centres[rng.integers(0, 8, 3000)] + 0.05 * rng.normal(size=(3000, 32))
    outliers = [17, 1234, 2999]
    x[outliers] = 3 * rng.normal(size=(3, 32))
    _write_features(tmp_path / "e.h5", x)
    rep = similar(
        str(tmp_path / "e.h5"), anomaly=True, k=5, index=index, json_out=str(tmp_path / "a.json"), progress=False
    )
    top = [r["key"] for r in rep["ranking"][:3]]
    assert sorted(top) == sorted(f"{i // 100:06d}_{i % 100:06d}" for i in outliers)
    scores = [r["score"] for r in rep["ranking"]]
    assert scores == sorted(scores, reverse=True) and rep["index"] == index and len(scores) == 3000
    # the exact score of a row: 1 - cosine to its 5th nearest other row (independent numpy)
    u = unit_vectors(x)
    sims = u.astype(np.float64) @ u[outliers[0]].astype(np.float64)
    sims[outliers[0]] = -np.inf
    kth = 1 - np.sort(sims)[::-1][4]
    got = next(r["score"] for r in rep["ranking"] if r["key"] == "000000_000017")
    assert got == pytest.approx(kth, abs=1e-4 if index == "flat" else 0.05)


def test_umap_overlay_places_real_images_with_the_fitted_map(ckpt, single_shards, real_dir, tmp_path):
    import shutil

    from hpc_lensiam.embed.extract import extract_embeddings
    from hpc_lensiam.embed.umap import run_umap

    sim, real = tmp_path / "sim.h5", tmp_path / "real.h5"
    extract_embeddings(str(ckpt), str(single_shards), str(sim), workers=0, progress=False)
    extract_embeddings(str(ckpt), str(real_dir), str(real), workers=0, progress=False)
    png = tmp_path / "u.png"
    res = run_umap(str(sim), str(png), ["theta_E"], seed=0, overlay=str(real))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    ov = res["overlay"]
    with h5py.File(sim) as f, h5py.File(real) as g:
        u = f["umap"][...]
        assert g["umap"].shape == (1, 2) and g["umap"].attrs["fitted_on"] == str(sim.resolve())
        np.testing.assert_allclose(g["umap"][...], ov)
    lo, hi = u.min(0) - 0.5 * np.ptp(u, 0), u.max(0) + 0.5 * np.ptp(u, 0)
    assert np.all((ov >= lo) & (ov <= hi))  # on the simulated map, not far off it
    other = tmp_path / "other.h5"
    shutil.copyfile(real, other)
    with h5py.File(other, "r+") as f:
        f.attrs["weights_sha256"] = "0" * 64
    with pytest.raises(UserError, match="not embedded with the backbone"):
        run_umap(str(sim), str(png), ["theta_E"], overlay=str(other))


def test_similar_bench_exact_search_and_vector_file_lifetime(tmp_path):
    """bench/similar.py at a tiny size: its block-streamed numpy search and faiss flat are exact (recall 1 against
    an unblocked float64 sort), IVF is measured with the package's index, and the vector file is deleted
    unless --keep-vectors."""
    import os
    import subprocess
    import sys

    bench = Path(__file__).resolve().parents[1] / "bench" / "similar.py"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    common = [
        sys.executable,
        str(bench),
        "--rows",
        "3000",
        "--dim",
        "32",
        "--block-rows",
        "700",
        "--recall-queries",
        "40",
        "--repeats",
        "1",
        "--dir",
        str(tmp_path / "v"),
    ]
    subprocess.run(common + ["--json", str(tmp_path / "r.json")], check=True, env=env, capture_output=True)
    res = {r["method"]: r for r in json.loads((tmp_path / "r.json").read_text())}
    assert set(res) == {"truth", "numpy", "flat", "ivf"}
    assert res["numpy"]["recall_at_16"] == 1.0 and res["flat"]["recall_at_16"] == 1.0
    assert res["ivf"]["nlist"] == int(4 * np.sqrt(3000)) and 0 < res["ivf"]["recall_at_16"] <= 1
    assert not any((tmp_path / "v").iterdir())  # vectors and truth deleted by default
    subprocess.run(common + ["--methods", "numpy", "--keep-vectors"], check=True, env=env, capture_output=True)
    kept = tmp_path / "v" / "vectors_3000x32_seed0.f32"
    x = np.fromfile(kept, np.float32).reshape(3000, 32)
    np.testing.assert_allclose(np.linalg.norm(x, axis=1), 1, atol=1e-5)  # unit vectors, whole file


def test_faiss_runs_on_this_cpus_openblas_kernel():
    """faiss-cpu's bundled OpenBLAS (0.3.15) does not know recent x86 CPUs and falls back to a generic
    kernel, ~4x slower (docs/real_images.md): `similar` names the kernel from the CPU's flags for faiss's
    import only (the variable is gone afterwards, so child processes are untouched); a user's
    OPENBLAS_CORETYPE wins."""
    pytest.importorskip("threadpoolctl")
    from hpc_lensiam.embed.similar import openblas_coretype

    kernel = openblas_coretype()
    if kernel is None:
        pytest.skip("this CPU's flags name no OpenBLAS kernel (not x86 Linux with AVX2)")
    code = (
        "import os; from hpc_lensiam.embed.similar import import_faiss; import_faiss(); "
        "from threadpoolctl import threadpool_info; "
        "arch = [i['architecture'] for i in threadpool_info() "
        "if i['internal_api'] == 'openblas' and 'faiss' in i['filepath']]; "
        "print(arch[0], os.environ.get('OPENBLAS_CORETYPE'))"
    )
    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_CORETYPE"}
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == [kernel, "None"], r.stdout
    r = subprocess.run(
        [sys.executable, "-c", code],
        env={**env, "OPENBLAS_CORETYPE": "Prescott"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["Prescott", "Prescott"], r.stdout
