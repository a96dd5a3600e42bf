"""finetune --seeds (per-seed runs, mean +- sd, resume after a kill) and `hpc-lensiam compare`."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from hpc_lensiam.core.errors import UserError

pytestmark = pytest.mark.timeout(600)


def _kw(data: Path, **over) -> dict:
    """A tiny frozen-feature recipe on the 48-px euclid set: random-init resnet18, 20 train / 10 test."""
    kw = dict(
        backbone="none",
        train_dir=str(data),
        test_dir=str(data),
        target="theta_E",
        n_train=20,
        n_test=10,
        epochs=1,
        freeze_backbone=True,
        batch_size=16,
        arch="resnet18",
        progress=False,
    )
    kw.update(over)
    return kw


def _cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "hpc_lensiam", *map(str, args)],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])},
    )


@pytest.fixture(scope="module")
def reports(single_shards, tmp_path_factory) -> dict:
    from hpc_lensiam.downstream.seeds import finetune_seeds

    d = tmp_path_factory.mktemp("seeds")
    finetune_seeds([0, 1], out_json=str(d / "a.json"), **_kw(single_shards))
    finetune_seeds([0, 1], out_json=str(d / "b.json"), **_kw(single_shards, epochs=3))
    finetune_seeds([0, 1], out_json=str(d / "other_test.json"), **_kw(single_shards, n_test=12))
    return {k: d / f"{k}.json" for k in ("a", "b", "other_test")}


def test_finetune_seeds_per_seed_and_mean_sd(reports, single_shards):
    from hpc_lensiam.downstream.finetune import finetune

    rep = json.loads(reports["a"].read_text())
    assert rep["seeds"] == [0, 1] and rep["complete"] and rep["metric"] == "r2" and len(rep["test_targets"]) == 10
    r2s = [r["r2"] for r in rep["runs"]]
    assert [r["seed"] for r in rep["runs"]] == [0, 1] and all(len(r["test_predictions"]) == 10 for r in rep["runs"])
    s = rep["summary"]["r2"]
    assert s["values"] == r2s and np.isclose(s["mean"], np.mean(r2s)) and np.isclose(s["sd"], np.std(r2s, ddof=1))
    assert r2s[0] != r2s[1]  # the seed changes the split and the head: a different run
    one = finetune(seed=1, **_kw(single_shards))  # each seed is exactly the single-seed recipe
    assert one["r2"] == r2s[1] and one["test_predictions"] == rep["runs"][1]["test_predictions"]


@pytest.mark.slow
def test_finetune_seeds_resumes_after_a_kill(single_shards, tmp_path):
    """SIGKILL the CLI once the first seed is on disk; --resume keeps it and runs only the rest."""
    out = tmp_path / "ft.json"
    args = [
        "finetune",
        "--backbone",
        "none",
        "--arch",
        "resnet18",
        "--train",
        single_shards,
        "--test",
        single_shards,
        "--n-train",
        20,
        "--n-test",
        10,
        "--epochs",
        1,
        "--batch-size",
        16,
        "--freeze-backbone",
        "--seeds",
        "3,4,5",
        "--json",
        out,
    ]
    proc = subprocess.Popen(
        [sys.executable, "-m", "hpc_lensiam", *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    t0 = time.time()
    while not out.exists() and proc.poll() is None and time.time() - t0 < 300:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    partial = json.loads(out.read_text())  # written atomically: whole, with what had finished
    assert not partial["complete"] and 1 <= len(partial["seeds"]) < 3 and partial["seeds_requested"] == [3, 4, 5]
    r = _cli(*args, "--resume")
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("already in") == len(partial["seeds"]) and "mean +- sd over 3 seeds" in r.stdout
    final = json.loads(out.read_text())
    assert final["complete"] and final["seeds"] == [3, 4, 5]
    kept = {x["seed"]: x for x in partial["runs"]}
    assert all(final["runs"][i] == kept[s] for i, s in enumerate([3, 4, 5]) if s in kept)  # reused, not rerun

    r = _cli(*[a if a != 1 else 2 for a in args], "--resume")  # another recipe (--epochs 2)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "different recipe (differs in: epochs)" in r.stderr


def test_compare_paired_seed_aware_difference(reports, tmp_path):
    from hpc_lensiam.downstream.seeds import compare

    a, b = (json.loads(reports[k].read_text()) for k in ("a", "b"))
    res = compare(str(reports["a"]), str(reports["b"]), out_json=str(tmp_path / "c.json"), n_boot=500)
    per_seed = [x["r2"] - y["r2"] for x, y in zip(a["runs"], b["runs"])]
    assert np.allclose(res["per_seed"], per_seed) and np.isclose(res["delta"], np.mean(per_seed))
    assert res["ci95"][0] <= res["delta"] <= res["ci95"][1] and res["seeds"] == 2 and res["n_test"] == 10
    assert json.loads((tmp_path / "c.json").read_text())["delta"] == res["delta"]
    # the CLI: one line with the estimate, its interval and the per-seed numbers
    r = _cli("compare", reports["a"], reports["b"], "--n-boot", 500)
    assert r.returncode == 0 and r.stdout.count("\n") == 1
    assert f"{res['delta']:+.3f} [{res['ci95'][0]:+.3f}, {res['ci95'][1]:+.3f}]" in r.stdout
    assert "over 2 paired seeds x 10 test images" in r.stdout


def test_compare_backbones_of_several_pretraining_seeds(reports, tmp_path):
    """A_s0,A_s1 against B_s0,B_s1 (and against one random-init report): the 2 x 2 runs are resampled
    as pretraining and fine-tuning levels, the estimate is the mean of the four paired differences."""
    from hpc_lensiam.downstream.seeds import compare
    from hpc_lensiam.evaluation.stats import hierarchical_paired_difference

    a, b = (json.loads(reports[k].read_text()) for k in ("a", "b"))
    a2 = {**a, "runs": [{**r, "test_predictions": [v + 0.1 for v in r["test_predictions"]]} for r in a["runs"]]}
    (tmp_path / "a_s1.json").write_text(json.dumps(a2))  # a second pretraining seed of A, worse by a shift
    a_list = f"{reports['a']},{tmp_path / 'a_s1.json'}"
    res = compare(a_list, f"{reports['b']},{reports['b']}", n_boot=500)
    y = np.asarray(a["test_targets"])
    pa = np.asarray([r["test_predictions"] for r in a["runs"] + a2["runs"]])
    pb = np.asarray([r["test_predictions"] for r in b["runs"] * 2])
    levels = {"pretraining": [0, 0, 1, 1], "fine-tuning": [0, 1, 0, 1]}
    assert res["levels"] == {"pretraining": 2, "fine-tuning": 2} and res["seeds"] == 4
    for key in ("delta", "ci95", "per_seed", "se"):
        assert res[key] == hierarchical_paired_difference(y, pa, pb, "r2", None, 500, 0, levels=levels)[key]
    one_b = compare([str(reports["a"]), str(tmp_path / "a_s1.json")], [str(reports["b"])], n_boot=500)
    assert one_b["delta"] == res["delta"] and one_b["pretraining_seed_pairs"][1][1] == str(reports["b"])
    r = _cli("compare", a_list, reports["b"], "--n-boot", 500)
    assert r.returncode == 0 and r.stdout.count("\n") == 1
    assert "over 2 pretraining x 2 fine-tuning seeds x 10 test images" in r.stdout
    assert f"{res['delta']:+.3f} [{res['ci95'][0]:+.3f}, {res['ci95'][1]:+.3f}]" in r.stdout
    r = _cli("compare", a_list, f"{reports['b']},{reports['b']},{reports['b']}")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "2 report(s) for A but 3 for B" in r.stderr


def test_compare_and_seeds_bad_input(reports, single_shards, tmp_path):
    from hpc_lensiam.downstream.seeds import compare, finetune_seeds

    with pytest.raises(UserError, match="different test sets"):
        compare(str(reports["a"]), str(reports["other_test"]))
    one = tmp_path / "one_seed.json"
    finetune_seeds([0], out_json=str(one), **_kw(single_shards))
    with pytest.raises(UserError, match=r"has seeds \[0, 1\] but .* has \[0\]"):
        compare(str(reports["a"]), str(one))
    other_target = json.loads(reports["a"].read_text())
    other_target["target"] = "e1"  # a report of another task on the same test set
    (tmp_path / "e1.json").write_text(json.dumps(other_target))
    with pytest.raises(UserError, match="compare runs of one task"):
        compare(str(reports["a"]), str(tmp_path / "e1.json"))
    with pytest.raises(UserError, match="--n-boot: must be >= 100"):
        compare(str(reports["a"]), str(reports["b"]), n_boot=10)
    (tmp_path / "text.json").write_text("not json")
    with pytest.raises(UserError, match="text.json: not a JSON file"):
        compare(str(tmp_path / "text.json"), str(reports["a"]))
    (tmp_path / "probe.json").write_text('{"results": {}}')
    with pytest.raises(UserError, match="not a fine-tuning report"):
        compare(str(reports["a"]), str(tmp_path / "probe.json"))
    r = _cli("compare", reports["a"], reports["other_test"])
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and r.stderr.startswith("hpc-lensiam: error: compare:")
    r = _cli("compare", reports["a"], tmp_path / "nope.json")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "nope.json: no such file" in r.stderr
    base = ["finetune", "--backbone", "none", "--train", single_shards, "--test", single_shards]
    for extra, msg in (
        (["--seeds", "0,x"], "--seeds: expected distinct"),
        (["--seeds", "1,1"], "--seeds: expected"),
        (["--seeds", "0,1", "--seed", "2"], "--seed and --seeds"),
        (["--resume"], "--resume: only"),
    ):
        r = _cli(*base, *extra)
        assert r.returncode == 2 and r.stderr.count("\n") == 1 and msg in r.stderr, (extra, r.stderr)


@pytest.fixture(scope="module")
def survey_set(tmp_path_factory) -> Path:
    """72 survey-family single images, half lenses (``simulate --family survey --samples single --lens-fraction 0.5
    --preset euclid``), 48 x 48 px without supersampling: 32 train, then 40 test images (~20 of each class)."""
    from hpc_lensiam.simulate.writer import simulate_shards

    out = tmp_path_factory.mktemp("survey") / "single"
    simulate_shards(
        out_dir=str(out),
        num_samples=72,
        shard_size=24,
        mode="single",
        preset="euclid",
        seed=5,
        family="survey",
        lens_fraction=0.5,
        overrides={"instrument": {"num_pix": 48, "supersampling_factor": 1}},
        progress=False,
    )
    return out


@pytest.mark.slow
def test_seed_aware_lens_finding_on_the_survey_set(survey_set, tmp_path):
    """The science protocol's survey arm in small: two resnet18 recipes (full fine-tuning and frozen features)
    find lenses over seeds 0,1 on one survey test set; `compare` pairs them by seed on the AUC."""
    from hpc_lensiam.evaluation.stats import roc_auc

    reports = {}
    for name, extra in (("full", []), ("frozen", ["--freeze-backbone"])):
        reports[name] = tmp_path / f"{name}.json"
        r = _cli(
            "finetune",
            "--backbone",
            "none",
            "--arch",
            "resnet18",
            "--task",
            "classify",
            "--target",
            "is_lens",
            "--train",
            survey_set,
            "--test",
            survey_set,
            "--n-train",
            32,
            "--n-test",
            40,
            "--epochs",
            2,
            "--batch-size",
            16,
            "--seeds",
            "0,1",
            "--json",
            reports[name],
            *extra,
        )
        assert r.returncode == 0, r.stderr
        assert "ROC AUC = " in r.stdout and "mean +- sd over 2 seeds" in r.stdout
    aucs = {}
    for name, path in reports.items():
        rep = json.loads(path.read_text())
        y = np.asarray(rep["test_targets"])
        assert rep["metric"] == "auc" and rep["task"] == "classify" and rep["seeds"] == [0, 1] and rep["complete"]
        assert len(y) == 40 and 10 <= y.sum() <= 30  # both classes in the test set
        aucs[name] = [run["auc"] for run in rep["runs"]]  # per-seed AUCs, each from its own scores
        assert aucs[name] == [roc_auc(y, run["test_predictions"]) for run in rep["runs"]]
        assert rep["summary"]["auc"]["values"] == aucs[name] and rep["summary"]["auc"]["n"] == 2
    r = _cli("compare", reports["full"], reports["frozen"], "--json", tmp_path / "cmp.json")
    assert r.returncode == 0 and r.stdout.count("\n") == 1 and "ROC AUC full - frozen" in r.stdout, r.stderr
    assert "over 2 paired seeds x 40 test images" in r.stdout
    res = json.loads((tmp_path / "cmp.json").read_text())
    per_seed = [a - b for a, b in zip(aucs["full"], aucs["frozen"])]
    assert res["metric"] == "auc" and res["seeds"] == 2 and res["n_test"] == 40
    assert np.allclose(res["per_seed"], per_seed) and np.isclose(res["delta"], np.mean(per_seed))
    lo, hi = res["ci95"]
    lo_i, hi_i = res["ci95_images_only"]
    assert lo <= res["delta"] <= hi
    assert hi - lo >= hi_i - lo_i  # seeds add noise to the interval, never take it away
