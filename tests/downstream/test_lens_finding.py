"""The lens-finding task: metrics, ``finetune --task classify --target is_lens`` (frozen and full),
is_lens through embed into the probe's classification metrics, bad input."""

from __future__ import annotations

import json
import subprocess
import sys

import h5py
import numpy as np
import pytest

import support
from hpc_lensiam.core.errors import UserError
from hpc_lensiam.evaluation.classify import classification_report, roc_auc, tpr_at_fpr

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def survey_shards(tmp_path_factory):
    """80 survey-family single images (half lenses), euclid preset, 48 x 48, no supersampling."""
    from hpc_lensiam.simulate.writer import simulate_shards

    out = tmp_path_factory.mktemp("survey") / "single"
    simulate_shards(
        out_dir=str(out),
        num_samples=80,
        shard_size=20,
        mode="single",
        preset="euclid",
        seed=4,
        family="survey",
        overrides={"instrument": {"num_pix": 48, "supersampling_factor": 1}},
        progress=False,
    )
    return out


# ------------------------------------------------------------------------------------------ metrics
def test_auc_and_tpr_at_fpr_against_definitions():
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 500)
    s = rng.normal(size=500) + 1.5 * y
    s[:50] = np.round(s[:50])  # ties count one half
    assert roc_auc(y, s) == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    # 1000 non-lenses scoring 0..999, lenses at 995.5 and 2000: FPR 1e-2 lets 10 non-lenses through
    neg = np.arange(1000.0)
    y2 = np.r_[np.zeros(1000), [1, 1]]
    s2 = np.r_[neg, [995.5, 2000.0]]
    assert tpr_at_fpr(y2, s2, 1e-2) == 1.0 and tpr_at_fpr(y2, s2, 1e-3) == 0.5
    rep = classification_report(y2, s2, n_boot=200)
    assert rep["tpr_at_fpr"]["0.001"]["resolvable"] and rep["min_resolvable_fpr"] == 1e-3
    perfect = classification_report(np.r_[np.zeros(50), np.ones(50)], np.r_[np.zeros(50), np.ones(50)], n_boot=200)
    assert perfect["auc"] == 1.0 and perfect["auc_ci95"] == [1.0, 1.0]
    assert not perfect["tpr_at_fpr"]["0.001"]["resolvable"]  # 50 non-lenses cannot resolve 1e-3
    assert perfect["roc"]["fpr"][0] == 0.0 and perfect["roc"]["tpr"][-1] == 1.0
    coin = classification_report(y, rng.normal(size=500), n_boot=300)
    assert coin["auc_ci95"][0] < 0.5 < coin["auc_ci95"][1]


# ------------------------------------------------------------------------------------------ finetune
def test_summary_line_says_unresolved_below_one_false_positive():
    """With 11 non-lenses the smallest FPR a threshold can hold is 1/11: TPR at FPR 1e-2 is then not a
    measurement (it printed "0.08 [0.00, 0.33]" as one), and the line must say so; with 2,000
    non-lenses both points are resolved and printed with their intervals."""
    from hpc_lensiam.downstream.tasks import make_task

    rng = np.random.default_rng(0)
    task = make_task("classify", "is_lens")
    y = np.r_[np.ones(40), np.zeros(11)].astype(int)
    _, line = task.report(y, rng.random(y.size), 50, 0, None)
    assert "TPR@FPR=1e-2 = unresolved (FPR floor 1/11" in line and "TPR@FPR=1e-3 = unresolved" in line, line
    y = np.r_[np.ones(40), np.zeros(2000)].astype(int)
    _, line = task.report(y, rng.random(y.size), 50, 0, None)
    assert "unresolved" not in line and line.count("] (95%") == 1 and "TPR@FPR=1e-3 = 0.00 [" in line, line


@pytest.mark.slow
@pytest.mark.parametrize("frozen", [True, False])
def test_finetune_classify_reports_auc_tpr_and_roc(survey_shards, tmp_path, frozen):
    from hpc_lensiam.downstream.finetune import finetune

    out = tmp_path / "cls.json"
    rep = finetune(
        "none",
        str(survey_shards),
        str(survey_shards),
        target="is_lens",
        task="classify",
        n_train=50,
        n_test=30,
        epochs=2,
        freeze_backbone=frozen,
        batch_size=16,
        seed=0,
        arch="resnet18",
        out_json=str(out),
        progress=False,
    )
    saved = json.loads(out.read_text())
    assert saved["task"] == "classify" and saved["auc"] == rep["auc"] and 0.0 <= rep["auc"] <= 1.0
    lo, hi = rep["auc_ci95"]
    assert lo <= rep["auc"] <= hi
    assert set(rep["tpr_at_fpr"]) == {"0.01", "0.001"}
    y, p = np.array(saved["test_targets"]), np.array(saved["test_predictions"])
    assert set(np.unique(y)) == {0.0, 1.0} and ((p > 0) & (p < 1)).all()  # probabilities
    assert rep["auc"] == pytest.approx(roc_auc(y, p), abs=1e-12)
    assert rep["n_lenses"] + rep["n_non_lenses"] == 30 and rep["freeze_backbone"] == frozen
    assert len(saved["roc"]["fpr"]) == len(saved["roc"]["tpr"]) >= 2
    assert (tmp_path / "cls_roc.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert rep["roc_png"] == str(tmp_path / "cls_roc.png")


def test_finetune_classify_bad_input(survey_shards, single_shards):
    from hpc_lensiam.downstream.finetune import finetune

    kw = dict(n_train=20, n_test=10, epochs=1, freeze_backbone=True, batch_size=8, arch="resnet18", progress=False)
    with pytest.raises(UserError, match="samples without is_lens labels.*--family survey"):
        finetune("none", str(single_shards), str(single_shards), target="is_lens", task="classify", **kw)
    with pytest.raises(UserError, match="--task classify takes --target is_lens"):
        finetune("none", str(survey_shards), str(survey_shards), target="theta_E", task="classify", **kw)
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "hpc_lensiam",
            "finetune",
            "--backbone",
            "none",
            "--train",
            str(survey_shards),
            "--test",
            str(survey_shards),
            "--target",
            "is_lens",
        ],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "unknown lens parameter 'is_lens'" in r.stderr


# ------------------------------------------------------------------------------------ embed + probe
@pytest.mark.slow
def test_embed_carries_is_lens_and_probe_reports_lens_finding(survey_shards, lensiam_shards, tmp_path, capsys):
    from hpc_lensiam.embed.extract import extract_embeddings, load_embeddings
    from hpc_lensiam.embed.probe import probe
    from hpc_lensiam.shards.reader import iter_samples

    ckpt = support.train_tiny(lensiam_shards, tmp_path / "run") / "checkpoints" / "last.pt"
    out = tmp_path / "emb.h5"
    extract_embeddings(checkpoint=str(ckpt), data_dir=str(survey_shards), out=str(out), batch_size=32, workers=0)
    truth = {s["key"]: s["params"]["is_lens"] for s in iter_samples(survey_shards)}
    with h5py.File(out, "r") as f:
        keys = f["keys"].asstr()[...]
        assert f["params/is_lens"].dtype == np.int8
        assert [int(v) for v in f["params/is_lens"][...]] == [truth[k] for k in keys]
    emb = load_embeddings(out)
    assert emb["is_lens"] is not None and len(emb["is_lens"]) == 80
    report = probe(str(out))
    res = next(iter(report["results"].values()))
    for model in ("knn", "logistic"):
        c = res["classify"][model]
        assert 0.0 <= c["auc"] <= 1.0 and c["auc_ci95"][0] <= c["auc"] <= c["auc_ci95"][1]
    assert "lens finding: AUC" in capsys.readouterr().out
