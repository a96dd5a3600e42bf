"""bench/real_lenses.py end to end at tiny sizes on the real DESI-HST lenses, and its refusals.

The real files are read from the shared data folder beside the repository; the end-to-end test skips
when it is absent. Sizes shrink (16 pairs, 24 labelled sims, one epoch), the path does not: ingest,
simulate --match, LenSiam and SimSiam pretraining on torchrun, export, finetune with three seeds,
predict, the json, the report and the figure; a rerun skips every step.
"""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from bench import real_lenses
from hpc_lensiam.evaluation.lens_scores import lens_scores
from support import SHARED_DATA

DESI = SHARED_DATA / "real_lenses" / "desi_hst"
TINY = ["--pairs", "16", "--n-train", "24", "--n-test", "8", "--num-pix", "64", "--pretrain-epochs", "1"]
TINY += ["--pretrain-batch", "4", "--finetune-epochs", "1", "--finetune-batch", "8", "--nproc", "1"]


@pytest.fixture(scope="module")
def desi():
    if not (DESI / "labels.csv").is_file():
        pytest.skip(f"shared data not present at {DESI}")
    return DESI


def _subset(desi, tmp, names):
    """A labels table of some of the lenses (the files stay where they are)."""
    with open(desi / "labels.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["name"] in names]
    path = tmp / "labels.csv"
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return path


@pytest.mark.slow
@pytest.mark.timeout(3600)  # ~15 CLI launches, each importing torch: minutes idle, far more on a loaded machine
def test_end_to_end_on_real_lenses_tiny(desi, tmp_path, capsys, monkeypatch):
    # one thread per CLI process: on a shared 2-core machine two threads each ran finetune ~10x slower
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    names = ["DESIJ0201-2739", "DESIJ1537+1443", "DESIJ2158+0257", "DESIJ1225-0725"]  # 3 labelled, 1 not
    labels = _subset(desi, tmp_path, names)
    out, report = tmp_path / "run", tmp_path / "docs" / "tiny.md"
    argv = ["--real", str(desi), "--labels", str(labels), "--out", str(out), "--quick", "--report", str(report)]
    assert real_lenses.main(argv + TINY) == 0

    res = json.loads((out / "real_lenses.json").read_text())
    assert set(res["arms"]) == {"lensiam", "simsiam", "random_init"}
    assert res["recipe"]["seeds"] == [0, 1, 2] and res["recipe"]["pairs"] == 16
    truth = {r["name"]: r["theta_E_arcsec"] for r in csv.DictReader(open(labels))}
    for rec in res["arms"].values():
        assert [e["name"] for e in rec["lenses"]] == names
        for e in rec["lenses"]:
            t = truth[e["name"]]
            assert e["theta_E_true"] == (pytest.approx(float(t)) if t else None)  # unlabelled: null
            assert np.isfinite(e["theta_E_pred"]) and e["theta_E_sigma"] > 0
        m = rec["metrics"]
        assert m["n"] == 3  # the unlabelled lens is predicted, not scored
        # the json holds every prediction: anyone re-scores it to the same numbers
        y = np.array([np.nan if e["theta_E_true"] is None else e["theta_E_true"] for e in rec["lenses"]])
        p = np.array([e["theta_E_pred"] for e in rec["lenses"]])
        s = np.array([e["theta_E_sigma"] for e in rec["lenses"]])
        again = lens_scores(y, p, s, n_boot=2000, seed=0)
        for name in ("median_abs_rel_error", "spearman", "coverage_1sigma", "response_slope"):
            assert again[name]["value"] == pytest.approx(m[name]["value"], nan_ok=True)
            assert again[name]["ci95"] == pytest.approx(m[name]["ci95"])
        assert len(rec["simulated_test"]["r2_per_seed"]) == 3  # the recipe's score on held-out sims
        assert len(rec["simulated_test"]["slope_per_seed"]) == 3  # and its compression there
    prior = res["reference"]["prior_mean"]  # the know-nothing score every arm is read against
    assert prior["theta_E_pred"] == pytest.approx(2.0) and prior["metrics"]["n"] == 3
    assert {"lensiam - simsiam", "lensiam - random_init", "simsiam - random_init"} == set(res["paired_differences"])
    text = report.read_text()
    assert "DESIJ1225-0725 | unlabelled" in text and "## Paired differences" in text
    assert report.with_suffix(".png").stat().st_size > 10_000

    # resumable: a rerun skips every step and writes the same predictions
    steps = json.loads((out / "steps.json").read_text())
    capsys.readouterr()
    assert real_lenses.main(argv + TINY) == 0
    assert "skipped" in capsys.readouterr().out
    assert json.loads((out / "steps.json").read_text()) == steps
    assert json.loads((out / "real_lenses.json").read_text())["arms"] == res["arms"]


def test_pretrain_optimizer_swaps_simsiams_sgd_for_the_lars_recipe_in_both_arms(tmp_path):
    """--pretrain-optimizer lars: both pretraining arms take SimCLR's LARS recipe (the step size that
    trains a SimSiam resnet18 in 640 steps), named in the train command the ledger records."""
    a = real_lenses.parse_args(["--real", "x", "--out", "o", "--quick", "--pretrain-optimizer", "lars"])
    r = real_lenses.recipe_from(a)
    assert r.pretrain_optimizer == "lars"
    for mode, views in (("lensiam", "lens"), ("simsiam", "standard")):
        args = [str(x) for x in real_lenses.pretrain_args(r, mode, tmp_path / "pairs", tmp_path / mode)]
        assert args[args.index("--views") + 1] == views
        assert args[args.index("--optimizer") + 1] == "lars" and args[args.index("--lr-scaling") + 1] == "sqrt"
    plain = real_lenses.recipe_from(real_lenses.parse_args(["--real", "x", "--out", "o", "--quick"]))
    assert "--optimizer" not in real_lenses.pretrain_args(plain, "lensiam", tmp_path / "pairs", tmp_path / "l")


def test_sim_scores_give_the_held_out_slope_beside_r2():
    """The held-out simulations' response slope per seed (pred on true), read from finetune's report, so
    the report can set the real lenses' compression beside the simulations' own."""
    y = [1.0, 2.0, 3.0, 4.0]
    runs = [
        {"r2": 0.9, "test_targets": y, "test_predictions": [1.0, 2.0, 3.0, 4.0]},  # slope 1
        {"r2": 0.5, "test_targets": y, "test_predictions": [2.0, 2.25, 2.5, 2.75]},  # squeezed: slope 0.25
    ]
    got = real_lenses.sim_scores({"runs": runs, "n_test": 4})
    assert got["slope_per_seed"] == pytest.approx([1.0, 0.25]) and got["slope_mean"] == pytest.approx(0.625)
    assert got["r2_mean"] == pytest.approx(0.7) and got["n_test"] == 4
    shared = [{k: v for k, v in run.items() if k != "test_targets"} for run in runs]  # finetune --seeds 0,1,2
    assert real_lenses.sim_scores({"runs": shared, "test_targets": y})["slope_per_seed"] == pytest.approx([1.0, 0.25])
    old = real_lenses.sim_scores({"runs": [{"r2": 0.9}]})  # a report from before predictions were kept
    assert old["slope_per_seed"] == [] and old["slope_mean"] is None


@pytest.mark.parametrize(
    "change, expected",
    [
        ({"--seeds": "0,1"}, "--seeds: at least 3"),
        ({"--labels": "MISSING"}, "--labels"),
        ({"--correlated-noise": "0.9"}, "--correlated-noise 0.9"),
        ({"--ablations": "no_psf"}, "--ablations: unknown 'no_psf'"),
        ({"--pretrain-optimizer": "adam"}, "--pretrain-optimizer adam: @adam: a method"),
        ({"--pretrain-optimizer": "lrfastx"}, "--pretrain-optimizer lrfastx: 'lrfastx': lrNx with a number N"),
    ],
)
def test_bad_input_is_one_line_and_exit_2_before_anything_runs(desi, tmp_path, capsys, change, expected):
    args = {"--real": str(desi), "--out": str(tmp_path / "run"), **change}
    if args.get("--labels") == "MISSING":
        args["--labels"] = str(tmp_path / "missing.csv")
    argv = [x for kv in args.items() for x in kv] + ["--quick"]
    assert real_lenses.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("hpc-lensiam: error: ") and expected in err[0]
    assert not (tmp_path / "run").exists()


def test_a_labels_table_without_theta_e_is_refused(tmp_path, capsys):
    (tmp_path / "a.h5").write_bytes(b"")
    (tmp_path / "labels.csv").write_text("name,file\nA,a.h5\n")
    assert real_lenses.main(["--real", str(tmp_path), "--out", str(tmp_path / "o"), "--quick"]) == 2
    err = capsys.readouterr().err
    assert "labels.csv: expected columns file, name, theta_E_arcsec" in err
