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

import support
from hpc_lensiam.cli import main
from hpc_lensiam.core.errors import UserError
from hpc_lensiam.embed.similar import similar, unit_vectors
from hpc_lensiam.ingest.config import IngestConfig
from hpc_lensiam.shards.manifest import LENS_PARAMS

pytestmark = pytest.mark.timeout(900)
EUCLID = support.SHARED_DATA / "euclid_q1" / "102020532_NEG589257492489565961.fits"


@pytest.fixture(scope="module")
def ckpt(lensiam_shards, tmp_path_factory) -> Path:
    return support.train_tiny(lensiam_shards, tmp_path_factory.mktemp("run") / "run") / "checkpoints" / "last.pt"


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
    assert e["keys"][0] == "000000_000000"  # each simulated row keeps its shard key
    assert e["keys"][-1] == e["name"][-1] == EUCLID.stem  # an ingested row: its key is the object's name
    assert e["name"][0] == "000000_000000" and json.loads(e["catalog"][-1]) == {"file": str(EUCLID.resolve())}
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
            EUCLID.stem,  # the object's name: unique across the two folders, so no --data-dir
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
    assert rep["query"] == {"key": EUCLID.stem, "name": EUCLID.stem, "source": str(real_dir), "view": 1}
    # (a name in two folders needs --source: test_names_round_trip...); an unknown key is one error line
    assert main(["similar", "--embeddings", str(mixed), "--key", "999999_000000"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--key 999999_000000: no such sample" in err


def test_similar_by_image_equals_by_key(mixed, ckpt, real_dir, tmp_path, lensiam_shards):
    by_key = similar(str(mixed), key=EUCLID.stem, data_dir=str(real_dir), k=4, progress=False)
    png = tmp_path / "by_image.png"  # the query panel: the re-ingested file, its scale from the ingest grid
    by_img = similar(str(mixed), image=str(EUCLID), checkpoint=str(ckpt), k=5, progress=False, out=str(png))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    first = by_img["neighbours"][0]
    assert first["key"] == EUCLID.stem and first["source"] == str(real_dir)  # itself, re-ingested
    assert first["similarity"] > 0.9999
    assert [(r["key"], r["source"]) for r in by_img["neighbours"][1:]] == [
        (r["key"], r["source"]) for r in by_key["neighbours"]
    ]
    with pytest.raises(UserError, match="needs --checkpoint"):
        similar(str(mixed), image=str(EUCLID))
    other = support.train_tiny(lensiam_shards, tmp_path / "other", max_steps=1) / "checkpoints" / "last.pt"
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


@pytest.mark.slow  # fits UMAP (numba JIT on first use, ~12 s): an end-to-end run
def test_umap_overlay_places_real_images_with_the_fitted_map(ckpt, single_shards, real_dir, tmp_path):
    import shutil

    from hpc_lensiam.embed.extract import extract_embeddings
    from hpc_lensiam.embed.umap import run_umap

    sim, real = tmp_path / "sim.h5", tmp_path / "real.h5"
    extract_embeddings(str(ckpt), str(single_shards), str(sim), workers=0, progress=False)
    extract_embeddings(str(ckpt), str(real_dir), str(real), workers=0, progress=False)
    png = tmp_path / "u.png"
    res = run_umap(str(sim), str(png), ["theta_E"], seed=0, overlay=str(real), coords_out=str(tmp_path / "c.csv"))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    ov = res["overlay"]
    rows = _read_csv(tmp_path / "c.csv")  # both files' points in one table, the inputs untouched
    assert [r["set"] for r in rows] == ["fitted"] * 64 + ["overlay"] and rows[-1]["source"] == str(real_dir)
    u = np.array([[float(r["umap_1"]), float(r["umap_2"])] for r in rows[:64]])
    assert ov.shape == (1, 2)
    np.testing.assert_allclose([[float(rows[-1]["umap_1"]), float(rows[-1]["umap_2"])]], ov, rtol=1e-5)
    with h5py.File(sim) as f, h5py.File(real) as g:
        assert "umap" not in f and "umap" not in g
    lo, hi = u.min(0) - 0.5 * np.ptp(u, 0), u.max(0) + 0.5 * np.ptp(u, 0)
    assert np.all((ov >= lo) & (ov <= hi))  # on the simulated map, not far off it
    other = tmp_path / "other.h5"
    shutil.copyfile(real, other)
    with h5py.File(other, "r+") as f:
        f.attrs["weights_sha256"] = "0" * 64
    with pytest.raises(UserError, match="not embedded with the backbone"):
        run_umap(str(sim), str(png), ["theta_E"], overlay=str(other))


def _read_csv(path) -> list[dict]:
    import csv

    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_umap_colours_by_any_column_says_what_it_does_and_only_reads_its_input(mixed, real_dir, tmp_path, capfd):
    """--color takes any per-row column, categorical ones (is_lens, source) with discrete colours; a
    line per phase on stderr; the coordinates go to --coords and a read-only input works."""
    import shutil
    import stat

    from hpc_lensiam.core.io import sha256_file
    from hpc_lensiam.embed.umap import is_categorical, read_columns

    emb = tmp_path / "labelled.h5"
    shutil.copyfile(mixed, emb)
    with h5py.File(emb, "r+") as f:  # as embed writes it when every folder is labelled (survey family)
        f["params"].create_dataset("is_lens", data=(np.arange(65) % 2).astype(np.int8))
    emb.chmod(stat.S_IRUSR | stat.S_IRGRP | stat.S_IROTH)  # read-only
    before = sha256_file(emb)
    cols = read_columns(emb, 65)
    assert {"theta_E", "is_lens", "source", "view"} <= set(cols)
    assert is_categorical(cols["is_lens"][0]) and is_categorical(cols["source"][0])
    assert not is_categorical(cols["theta_E"][0]) and cols["theta_E"][1].tolist() == [True] * 64 + [False]
    png, coords = tmp_path / "u.png", tmp_path / "u_coords.csv"
    argv = ["umap", "--embeddings", str(emb), "--out", str(png), "--coords", str(coords)]
    assert main(argv + ["--color", "is_lens,source,theta_E", "--stretch", "log"]) == 0
    err = capfd.readouterr().err
    assert "umap: fitting UMAP on 65 points of 512-d features" in err
    assert f"umap: drawing {png}" in err and f"umap: writing coordinates to {coords}" in err
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and sha256_file(emb) == before
    rows = _read_csv(coords)
    assert list(rows[0]) == ["set", "source", "key", "view", "umap_1", "umap_2", "is_lens", "theta_E"]
    assert [r["is_lens"] for r in rows] == [str(i % 2) for i in range(65)]
    assert rows[-1]["source"] == str(real_dir) and rows[-1]["theta_E"] == ""  # the real lens: unknown
    assert not (tmp_path / "u.csv").exists()
    # an unknown column: one line naming the flag and the file's columns, before any fitting
    assert main(argv + ["--color", "theta_E,redshift"]) == 2
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("hpc-lensiam: error: --color: unknown column 'redshift' (columns of")
    assert "is_lens" in err[0] and "source" in err[0] and "theta_E" in err[0]
    # --coords onto the input is refused
    assert main(["umap", "--embeddings", str(emb), "--out", str(png), "--coords", str(emb)]) == 2
    assert "--coords" in capfd.readouterr().err


@pytest.mark.parametrize("stretch", ["linear", "log"])
def test_similar_figures_with_each_stretch(mixed, real_dir, tmp_path, stretch):
    key, anomaly = tmp_path / "key.png", tmp_path / "anomaly.png"
    common = ["similar", "--embeddings", str(mixed), "--stretch", stretch]
    assert main(common + ["--key", EUCLID.stem, "--data-dir", str(real_dir), "-k", "3", "--out", str(key)]) == 0
    assert main(common + ["--anomaly", "-k", "3", "--top", "2", "--out", str(anomaly)]) == 0
    assert key.read_bytes()[:8] == anomaly.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_similar_bench_exact_search_and_vector_file_lifetime(tmp_path):
    """bench.similar at a tiny size: its block-streamed numpy search and faiss flat are exact (recall 1 against
    an unblocked float64 sort), IVF is measured with the package's index, and the vector file is deleted
    unless --keep-vectors."""
    import os
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": str(repo)}
    common = [
        sys.executable,
        "-m",
        "bench.similar",
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
    subprocess.run(common + ["--json", str(tmp_path / "r.json")], check=True, env=env, capture_output=True, cwd=repo)
    res = {r["method"]: r for r in json.loads((tmp_path / "r.json").read_text())}
    assert set(res) == {"truth", "numpy", "flat", "ivf"}
    assert res["numpy"]["recall_at_16"] == 1.0 and res["flat"]["recall_at_16"] == 1.0
    assert res["ivf"]["nlist"] == int(4 * np.sqrt(3000)) and 0 < res["ivf"]["recall_at_16"] <= 1
    assert not any((tmp_path / "v").iterdir())  # vectors and truth deleted by default
    subprocess.run(
        common + ["--methods", "numpy", "--keep-vectors"], check=True, env=env, capture_output=True, cwd=repo
    )
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


def test_similar_checks_its_outputs_before_the_search_and_refuses_zero_columns(tmp_path, capsys):
    """Rows (issue 25): `similar` found an unwritable --out/--json only after the search (the table already
    printed), and took a 0-column feature file (every cosine 0, a ranking of noise). Both: one line, exit 2,
    nothing searched, printed or written."""
    rng = np.random.default_rng(0)
    emb = tmp_path / "e.h5"
    _write_features(emb, rng.normal(size=(200, 8)))
    blocker = tmp_path / "taken"
    blocker.write_text("x")
    for flags, named in (
        (["--json", str(blocker / "a.json")], f"--json {blocker / 'a.json'}: {blocker} exists and is not a folder"),
        (["--json", str(tmp_path)], f"--json {tmp_path}: is a folder"),
        (["--out", str(blocker / "grid.png")], f"--out {blocker / 'grid.png'}: {blocker} exists and is not a folder"),
    ):
        for query in (["--anomaly", "-k", "5"], ["--key", "000001_000002"]):
            assert main(["similar", "--embeddings", str(emb), *query, *flags]) == 2
            captured = capsys.readouterr()
            assert captured.out == "", captured.out  # refused before the search: no table
            assert captured.err.count("\n") == 1 and named in captured.err, captured.err
    assert blocker.read_text() == "x"

    zero = tmp_path / "zero.h5"
    _write_features(zero, np.zeros((50, 0)))
    for query in (["--anomaly", "-k", "3"], ["--key", "000000_000001"]):
        assert main(["similar", "--embeddings", str(zero), *query, "--json", str(tmp_path / "z.json")]) == 2
        captured = capsys.readouterr()
        assert captured.out == "" and captured.err.count("\n") == 1, captured
        assert f"{zero}: 'features' has shape (50, 0), no feature columns" in captured.err
    assert not (tmp_path / "z.json").exists()


def test_names_round_trip_from_ingest_to_embed_similar_and_predict(ckpt, single_shards, tmp_path, capsys):
    """Object names and the catalogue's extra columns (RA, Dec, a magnitude, a flag) go from the
    --list CSV into params.json, embed's HDF5 and table, similar's CSV/FITS (--key and --anomaly)
    and predict's catalogue; a name in two folders needs --source (one line naming both)."""
    import csv

    from astropy.table import Table

    from hpc_lensiam.downstream.predict import predict
    from hpc_lensiam.downstream.seeds import finetune_seeds
    from support import sky_image, write_fits

    folders = {}
    for tag, ra0 in (("a", 150.0), ("b", 200.0)):
        d = tmp_path / tag
        d.mkdir()
        lines = ["file,name,ra,dec,mag_i,flag"]
        for i in range(3):
            write_fits(d / f"f{i}.fits", sky_image(120, 0.05, [(0.3 * i, -0.2, 10.0, 0.2 + 0.1 * i)]), 0.05)
            lines.append(f"f{i}.fits,J{i}.{tag if i else 'x'},{ra0 + i},{-1.5 + i},{20 + i / 4},ok")
        (d / "cat.csv").write_text("\n".join(lines) + "\n")  # J0.x is in both folders, J1.a / J1.b are not
        folders[tag] = d / "shards"
        assert (
            main(
                [
                    "ingest",
                    "--list",
                    str(d / "cat.csv"),
                    "--out",
                    str(folders[tag]),
                    "--preset",
                    "euclid",
                    "--num-pix",
                    "48",
                ]
            )
            == 0
        )
    emb, emb_table = tmp_path / "emb.h5", tmp_path / "emb.csv"
    data = [str(single_shards), str(folders["a"]), str(folders["b"])]
    assert (
        main(
            [
                "embed",
                "--checkpoint",
                str(ckpt),
                "--data",
                *data,
                "--out",
                str(emb),
                "--workers",
                "0",
                "--table",
                str(emb_table),
            ]
        )
        == 0
    )
    err = capsys.readouterr().err
    # the tiny backbone was trained on the hst grid (0.05"/px): every euclid folder is one warning line
    assert (
        sum(
            "embed: warning: --data" in x and '0.1"/px, the backbone was trained on 0.05"/px' in x
            for x in err.splitlines()
        )
        == 3
    )
    with h5py.File(emb) as f:
        names = f["name"].asstr()[...].tolist()
        cats = [json.loads(c) for c in f["catalog"].asstr()[...]]
        assert json.loads(f.attrs["training_grid"])["pixel_scale_arcsec"] == 0.05
    assert names[64:] == ["J0.x", "J1.a", "J2.a", "J0.x", "J1.b", "J2.b"]
    assert cats[65]["ra"] == 151.0 and cats[65]["mag_i"] == 20.25 and cats[65]["flag"] == "ok"
    t = Table.read(emb_table, format="ascii.csv")
    assert len(t) == 70 and t["name"][65] == "J1.a" and t["ra"][65] == 151.0 and t["source"][65] == data[1]
    assert bool(t["ra"].mask[0])  # a simulated row: no RA

    # --key by name: unique -> no --source; in two folders -> one line naming both
    nj, ncsv, nfits = tmp_path / "n.json", tmp_path / "n.csv", tmp_path / "n.fits"
    rc = main(
        [
            "similar",
            "--embeddings",
            str(emb),
            "--key",
            "J1.a",
            "-k",
            "6",
            "--json",
            str(nj),
            "--table",
            str(ncsv),
            str(nfits),
        ]
    )
    assert rc == 0
    rep = json.loads(nj.read_text())
    assert rep["query"]["name"] == "J1.a" and rep["query"]["key"] == "J1_a"
    for table in (Table.read(ncsv, format="ascii.csv"), Table.read(nfits)):
        assert len(table) == 6 and list(table["name"]) == [r["name"] for r in rep["neighbours"]]
        assert set(table.colnames) >= {"rank", "cosine", "query", "name", "key", "source", "ra", "dec", "mag_i"}
        assert all(q == "J1.a" for q in table["query"])
        assert table["rank"].dtype.kind == table["view"].dtype.kind == "i"  # integers stay integers
        for row, r in zip(table, rep["neighbours"]):
            if r["source"] != str(single_shards):
                assert row["ra"] == r["catalog"]["ra"] and row["source"] == r["source"]
    capsys.readouterr()
    assert main(["similar", "--embeddings", str(emb), "--key", "J0.x"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "in several sources" in err and data[1] in err and data[2] in err
    by_src = similar(str(emb), key="J0.x", data_dir=data[2], k=3, progress=False)
    assert by_src["query"]["source"] == data[2]

    # --anomaly: one row per image, names and kept columns
    acsv = tmp_path / "odd.csv"
    assert main(["similar", "--embeddings", str(emb), "--anomaly", "-k", "3", "--table", str(acsv)]) == 0
    t = Table.read(acsv, format="ascii.csv")
    assert len(t) == 70 and "distance" in t.colnames
    real = sorted((str(r["name"]), float(r["ra"])) for r in t if r["source"] != str(single_shards))
    assert real == [
        ("J0.x", 150.0),
        ("J0.x", 200.0),
        ("J1.a", 151.0),
        ("J1.b", 201.0),
        ("J2.a", 152.0),
        ("J2.b", 202.0),
    ]

    # predict: the names and columns in the catalogue (a 1-epoch theta_E model on the euclid singles)
    finetune_seeds(
        [0],
        out_json=str(tmp_path / "ft.json"),
        train_dir=str(single_shards),
        test_dir=str(single_shards),
        save_model=str(tmp_path / "m.safetensors"),
        backbone="none",
        arch="resnet18",
        n_train=40,
        n_test=20,
        epochs=1,
        batch_size=16,
        progress=False,
    )
    model = next(tmp_path.glob("m*.safetensors"))
    predict([str(model)], [str(folders["a"])], str(tmp_path / "pred.csv"), n_boot=0)
    with open(tmp_path / "pred.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["name"] for r in rows] == ["J0.x", "J1.a", "J2.a"] and [r["key"] for r in rows] == [
        "J0_x",
        "J1_a",
        "J2_a",
    ]
    assert [float(r["ra"]) for r in rows] == [150.0, 151.0, 152.0] and rows[1]["flag"] == "ok"
