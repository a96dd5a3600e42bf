"""A saved fine-tuned model and `predict` (issue 27): the file, the catalogue, the uncertainty, the grid.

Tiny sizes: 48 px euclid-preset singles, a random-init resnet18, 2 epochs. What is asserted is the
contract (same predictions as `finetune`, ensemble columns, calibration metrics computed as defined,
refusals), not how good a 2-epoch model is.
"""

from __future__ import annotations

import json
import os
import subprocess

import numpy as np
import pytest

from hpc_lensiam.core.errors import UserError
from support import BIN, REPO, one_error_line, torchrun_cmd

RECIPE = dict(backbone="none", arch="resnet18", n_train=40, n_test=20, epochs=2, batch_size=16, progress=False)


def _cli(*args) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [str(BIN / "hpc-lensiam"), *map(str, args)], capture_output=True, text=True, timeout=600, env=env
    )


@pytest.fixture(scope="module")
def ensemble(single_shards, tmp_path_factory):
    """Two fine-tuning seeds of theta_E on the euclid singles, saved; their multi-seed report."""
    from hpc_lensiam.downstream.seeds import finetune_seeds

    out = tmp_path_factory.mktemp("ens")
    report = finetune_seeds(
        [0, 1],
        out_json=str(out / "ft.json"),
        train_dir=str(single_shards),
        test_dir=str(single_shards),
        save_model=str(out / "m.safetensors"),
        **RECIPE,
    )
    return out, report


def test_predict_gives_finetune_s_own_test_predictions(single_shards, ensemble):
    """`finetune` and `predict` on the same test images give the same predictions (each seed's model)."""
    import csv

    from hpc_lensiam.downstream.predict import predict

    out, report = ensemble
    for run in report["runs"]:
        model = out / f"m.seed{run['seed']}.safetensors"
        assert model.is_file()
        predict([str(model)], [str(single_shards)], str(out / f"cat{run['seed']}.csv"), n_boot=0)
        with open(out / f"cat{run['seed']}.csv") as f:
            rows = list(csv.DictReader(f))
        assert len(rows) == 64 and rows[0]["key"] and rows[0]["source"] == str(single_shards.resolve())
        # the test set is the 20 samples after the 40 training ones (same data set for --train and --test)
        got = np.array([float(r["theta_E_pred"]) for r in rows[40:60]])
        np.testing.assert_allclose(got, run["test_predictions"], rtol=1e-4, atol=1e-5)
        truth = np.array([float(r["theta_E_true"]) for r in rows[40:60]])
        np.testing.assert_allclose(truth, report["test_targets"], rtol=1e-6)


def test_saved_model_carries_what_prediction_needs(ensemble):
    from hpc_lensiam.downstream.model_file import load_model, read_meta

    out, report = ensemble
    meta = read_meta(out / "m.seed0.safetensors")
    assert meta["task"] == "regress" and meta["target"] == "theta_E" and meta["unit"] == "arcsec"
    assert meta["arch"] == "resnet18" and meta["in_chans"] == 3 and meta["feature_dim"] == 512
    assert meta["input"]["pixel_scale_arcsec"] == pytest.approx(0.1) and meta["input"]["image_shape"] == [48, 48]
    run0 = report["runs"][0]
    assert meta["task_state"] == {"target_mean": run0["target_train_mean"], "target_std": run0["target_train_std"]}
    assert meta["val_residual_sigma"] > 0 and meta["recipe"]["seed"] == 0
    assert meta["train_manifest_sha256"] == run0["train_manifest_sha256"]
    net, _ = load_model(out / "m.seed0.safetensors")
    assert not net.training


def test_ensemble_catalogue_uncertainty_and_metrics(single_shards, ensemble):
    """Two seeds: per-model columns, sigma = sqrt(sd_seeds^2 + sigma_val^2), metrics and a plot."""
    from astropy.table import Table

    from hpc_lensiam.downstream.model_file import read_meta

    out, _ = ensemble
    models = [str(out / f"m.seed{s}.safetensors") for s in (0, 1)]
    proc = _cli("predict", "--model", *models, "--data", single_shards, "--out", out / "cat.fits")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "within 1/2 sigma" in proc.stdout, proc.stdout
    t = Table.read(out / "cat.fits")
    assert len(t) == 64 and {"name", "key", "source", "theta_E_pred_m0", "theta_E_pred_m1"} <= set(t.colnames)
    each = np.stack([np.asarray(t["theta_E_pred_m0"]), np.asarray(t["theta_E_pred_m1"])])
    np.testing.assert_allclose(np.asarray(t["theta_E_pred"]), each.mean(0), rtol=1e-6)
    val = np.sqrt(np.mean([read_meta(m)["val_residual_sigma"] ** 2 for m in models]))
    np.testing.assert_allclose(np.asarray(t["theta_E_sigma"]), np.sqrt(each.std(0, ddof=1) ** 2 + val**2), rtol=1e-6)
    metrics = json.loads((out / "cat.metrics.json").read_text())["metrics"]
    d = np.asarray(t["theta_E_pred"]) - np.asarray(t["theta_E_true"])
    assert metrics["within_1sigma"] == pytest.approx(np.mean(np.abs(d) <= np.asarray(t["theta_E_sigma"])))
    assert metrics["n"] == 64 and 0 <= metrics["outlier_fraction"] <= 1
    assert (out / "cat_pred_vs_true.png").stat().st_size > 1000


def test_another_pixel_grid_is_refused_unless_allowed(lensiam_shards, ensemble, tmp_path):
    """The euclid-grid model (0.1"/px) on hst-preset data (0.05"/px): one line, nothing written;
    with --allow-grid-mismatch a warning naming both grids, and the catalogue."""
    out, _ = ensemble
    model = out / "m.seed0.safetensors"
    line = one_error_line(_cli("predict", "--model", model, "--data", lensiam_shards, "--out", tmp_path / "c.csv"))
    assert '0.05"/px' in line and '0.1"/px' in line and "--allow-grid-mismatch" in line, line
    assert not (tmp_path / "c.csv").exists()
    proc = _cli(
        "predict", "--model", model, "--data", lensiam_shards, "--out", tmp_path / "c.csv", "--allow-grid-mismatch"
    )
    assert proc.returncode == 0 and "predict: warning: --data" in proc.stderr, proc.stderr[-2000:]
    assert (tmp_path / "c.csv").is_file()


def test_bad_input_is_one_line_before_any_image_is_read(single_shards, ensemble, tmp_path):
    out, _ = ensemble
    model = out / "m.seed0.safetensors"
    assert "expected a catalogue file ending in .csv or .fits" in one_error_line(
        _cli("predict", "--model", model, "--data", single_shards, "--out", tmp_path / "c.txt")
    )
    assert "no such file" in one_error_line(
        _cli("predict", "--model", tmp_path / "nope.safetensors", "--data", single_shards, "--out", tmp_path / "c.csv")
    )
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 64)
    assert "not a safetensors model file" in one_error_line(
        _cli("predict", "--model", tmp_path / "junk.safetensors", "--data", single_shards, "--out", tmp_path / "c.csv")
    )
    assert "the same file given twice" in one_error_line(
        _cli("predict", "--model", model, model, "--data", single_shards, "--out", tmp_path / "c.csv")
    )
    assert "no such folder" in one_error_line(
        _cli("predict", "--model", model, "--data", tmp_path / "none", "--out", tmp_path / "c.csv")
    )
    with pytest.raises(UserError, match="ending in .safetensors"):
        from hpc_lensiam.downstream.model_file import check_model_path

        check_model_path(tmp_path / "m.pt")
    assert not list(tmp_path.glob("c.*"))


@pytest.mark.slow
def test_predict_under_torchrun_equals_one_process(single_shards, ensemble, tmp_path):
    """Two torchrun ranks each predict every other image; rank 0 gathers them: the same catalogue, row
    for row, as one process (and only rank 0 writes)."""
    import csv

    out, _ = ensemble
    models = [str(out / f"m.seed{s}.safetensors") for s in (0, 1)]
    one = tmp_path / "one.csv"
    assert _cli("predict", "--model", *models, "--data", single_shards, "--out", one).returncode == 0
    two = tmp_path / "two.csv"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    env = {k: v for k, v in env.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    cmd = [*torchrun_cmd(2), "predict", "--model", *models, "--data", str(single_shards), "--out", str(two)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("predict: 64 image(s)") == 1, proc.stdout  # one summary line: rank 0's
    with open(one) as f, open(two) as g:
        a, b = list(csv.DictReader(f)), list(csv.DictReader(g))
    assert [r["key"] for r in a] == [r["key"] for r in b]
    for col in ("theta_E_pred", "theta_E_sigma", "theta_E_pred_m0", "theta_E_pred_m1"):
        np.testing.assert_allclose([float(r[col]) for r in b], [float(r[col]) for r in a], rtol=1e-4, atol=1e-6)
    assert not list(tmp_path.glob("two.part*")) and not list(tmp_path.glob(".tmp-*"))
