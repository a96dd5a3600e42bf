"""Export into stock torchvision (DDP and DeepSpeed checkpoints) and downstream fine-tuning."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision

from hpc_lensiam.core.errors import UserError
from hpc_lensiam.shards.manifest import LENS_PARAMS
from support import train_tiny

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def run_ddp(lensiam_shards, tmp_path_factory) -> Path:
    return train_tiny(lensiam_shards, tmp_path_factory.mktemp("ddp") / "run")


@pytest.fixture(scope="module")
def exported(run_ddp, tmp_path_factory) -> Path:
    from hpc_lensiam.downstream.export import export_backbone

    out = tmp_path_factory.mktemp("export") / "backbone.pt"
    export_backbone(str(run_ddp / "checkpoints" / "last.pt"), str(out), "pt")
    return out


def _images(data_dir: Path, n: int) -> torch.Tensor:
    from hpc_lensiam.shards.reader import load_images

    _, x, _ = load_images(data_dir, n)
    return torch.as_tensor(x).unsqueeze(1)


def _torchvision(arch: str, state: dict) -> torch.nn.Module:
    m = getattr(torchvision.models, arch)()
    res = m.load_state_dict(state, strict=False)
    assert sorted(res.missing_keys) == ["fc.bias", "fc.weight"] and res.unexpected_keys == []
    m.fc = torch.nn.Identity()
    return m.eval()


# -------------------------------------------------------------------------------------- export
def test_export_round_trip_into_torchvision(run_ddp, exported, lensiam_shards, tmp_path):
    from safetensors.torch import load_file

    from hpc_lensiam.downstream.export import export_backbone
    from hpc_lensiam.models.weights import load_backbone

    state = torch.load(exported, weights_only=True)
    assert state["conv1.weight"].shape == (64, 3, 7, 7)
    tv = _torchvision("resnet18", state)
    trained, info = load_backbone(run_ddp / "checkpoints" / "last.pt")
    x = _images(lensiam_shards, 8)  # real images, max 1, 1 channel
    with torch.inference_mode():
        ref, got = trained(x), tv(x.repeat(1, 3, 1, 1))
    assert ref.shape == (8, 512)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)

    side = json.loads(Path(str(exported) + ".json").read_text())
    assert side["arch"] == "resnet18" and side["training"]["views"] == "lens" and side["training"]["step"] == 2
    assert side["input"]["size"] == [48, 48] and side["input"]["channels"] == 3
    assert "max" in side["input"]["normalisation"] and len(side["training"]["config_hash"]) == 64

    st = tmp_path / "backbone.safetensors"
    export_backbone(str(run_ddp), str(st), "safetensors")  # a run folder works too
    loaded = load_file(str(st))
    assert loaded.keys() == state.keys() and all(torch.equal(loaded[k], state[k]) for k in state)
    assert json.loads(Path(str(st) + ".json").read_text())["weights_format"] == "safetensors"


@pytest.mark.slow
def test_export_from_deepspeed_checkpoint(lensiam_shards, tmp_path):
    from hpc_lensiam.downstream.export import export_backbone

    run = train_tiny(lensiam_shards, tmp_path / "ds", engine="deepspeed")
    ds_dir = run / "checkpoints" / "deepspeed"
    assert (ds_dir / "latest").is_file()
    a = export_backbone(str(ds_dir), str(tmp_path / "from_ds.pt"))
    b = export_backbone(str(run / "checkpoints" / "last.pt"), str(tmp_path / "from_last.pt"))
    assert a["training"]["step"] == 2 and a["arch"] == "resnet18"
    assert a["weights_sha256"] == b["weights_sha256"]  # same weights through either reader
    _torchvision("resnet18", torch.load(tmp_path / "from_ds.pt", weights_only=True))


def test_export_bad_input(run_ddp, tmp_path):
    from hpc_lensiam.downstream.export import export_backbone

    ckpt = str(run_ddp / "checkpoints" / "last.pt")
    with pytest.raises(UserError, match="wrong arch: resnet18, expected resnet101"):
        export_backbone(ckpt, str(tmp_path / "a.pt"), arch="resnet101")
    with pytest.raises(UserError, match="no such checkpoint"):
        export_backbone(str(tmp_path / "nope.pt"), str(tmp_path / "a.pt"))
    (tmp_path / "text.pt").write_text("hello")
    with pytest.raises(UserError, match="cannot read checkpoint"):
        export_backbone(str(tmp_path / "text.pt"), str(tmp_path / "a.pt"))
    assert not (tmp_path / "a.pt").exists()
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "hpc_lensiam",
            "export",
            "--checkpoint",
            ckpt,
            "--out",
            str(tmp_path / "a.pt"),
            "--arch",
            "resnet50",
        ],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "wrong arch" in r.stderr


# ------------------------------------------------------------------------------------ finetune
def test_finetune_end_to_end(exported, single_shards, lensiam_shards, tmp_path):
    from hpc_lensiam.downstream.finetune import finetune

    out = tmp_path / "ft.json"
    rep = finetune(
        str(exported),
        str(single_shards),
        str(single_shards),
        target="theta_E",
        n_train=40,
        n_test=24,
        epochs=2,
        freeze_backbone=False,
        batch_size=16,
        lr=None,
        seed=0,
        out_json=str(out),
        progress=False,
    )
    saved = json.loads(out.read_text())
    assert saved["r2"] == rep["r2"] and np.isfinite(rep["r2"])
    lo, hi = rep["r2_ci95"]
    assert lo <= hi and rep["residual_sigma"] > 0 and rep["unit"] == "arcsec"
    assert (rep["n_train"], rep["n_val"], rep["n_test"]) == (32, 8, 24) and rep["test_from_train_set"]
    assert rep["arch"] == "resnet18" and rep["init"] == "pretrained" and rep["pretraining"]["step"] == 2
    assert 1 <= rep["best_epoch"] <= 2 and len(rep["history"]) == 2
    y, p = np.array(saved["test_targets"]), np.array(saved["test_predictions"])
    assert len(y) == len(p) == 24 and abs(1 - ((y - p) ** 2).sum() / ((y - y.mean()) ** 2).sum() - rep["r2"]) < 1e-9

    # the no-pretraining baseline, and the frozen-backbone probe is deterministic for a seed
    frozen_random = dict(
        target="e1", n_train=20, n_test=10, epochs=1, freeze_backbone=True, batch_size=16, seed=1, arch="resnet18"
    )
    base = finetune("none", str(single_shards), str(lensiam_shards), progress=False, **frozen_random)
    again = finetune("none", str(single_shards), str(lensiam_shards), progress=False, **frozen_random)
    assert base["init"].startswith("random") and not base["test_from_train_set"]
    assert base["r2"] == again["r2"] and base["r2_ci95"] == again["r2_ci95"]

    # a stock torchvision weights file (1000-class fc, no sidecar) is accepted too
    tv_file = tmp_path / "tv_resnet18.pth"
    torch.save(torchvision.models.resnet18().state_dict(), tv_file)
    tv = finetune(
        str(tv_file),
        str(single_shards),
        str(single_shards),
        target="gamma",
        n_train=20,
        n_test=10,
        epochs=1,
        freeze_backbone=True,
        batch_size=16,
        seed=0,
        progress=False,
    )
    assert tv["arch"] == "resnet18" and tv["init"] == "pretrained" and np.isfinite(tv["r2"])


def test_paired_r2_difference_cancels_the_shared_test_set():
    from hpc_lensiam.evaluation.stats import paired_r2_difference, r2

    rng = np.random.default_rng(0)
    y = rng.normal(size=400)
    good, worse = y + rng.normal(0, 0.3, 400), y + rng.normal(0, 0.6, 400)
    d, lo, hi = paired_r2_difference(y, good, worse)
    assert abs(d - (r2(y, good) - r2(y, worse))) < 1e-12 and 0 < lo < d < hi  # clearly better
    assert paired_r2_difference(y, good, good) == (0.0, 0.0, 0.0)  # same model: exactly 0
    d, lo, hi = paired_r2_difference(y, good, good + rng.normal(0, 0.01, 400))
    assert lo < 0 < hi  # no real difference
    with pytest.raises(ValueError, match="same"):
        paired_r2_difference(y, good, worse[:10])


def test_finetune_bad_input(exported, single_shards, tmp_path):
    from hpc_lensiam.downstream.finetune import finetune

    kw = dict(
        train_dir=str(single_shards),
        test_dir=str(single_shards),
        n_train=10,
        n_test=10,
        epochs=1,
        freeze_backbone=True,
        batch_size=8,
        progress=False,
    )
    with pytest.raises(UserError, match="unknown lens parameter 'thetaE'.*" + ", ".join(LENS_PARAMS)):
        finetune(str(exported), target="thetaE", **kw)
    with pytest.raises(UserError, match="wrong arch: resnet18, --arch asked for resnet50"):
        finetune(str(exported), target="theta_E", arch="resnet50", **kw)
    with pytest.raises(UserError, match="asked for 1000 samples but it holds only 64"):
        finetune(str(exported), target="theta_E", **{**kw, "n_train": 990})
    with pytest.raises(UserError, match="backbone file not found"):
        finetune(str(tmp_path / "nope.pt"), target="theta_E", **kw)
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "hpc_lensiam",
            "finetune",
            "--backbone",
            "none",
            "--train",
            str(single_shards),
            "--test",
            str(single_shards),
            "--target",
            "Einstein",
        ],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "theta_E, gamma, e1" in r.stderr


def test_finetune_refuses_an_export_whose_weights_differ_from_its_sidecar(exported, single_shards, tmp_path):
    """Exports' sidecars carry the weight hash; a replaced or damaged backbone file is refused by
    finetune in one line instead of being fine-tuned as if it were the recorded backbone."""
    import shutil

    from hpc_lensiam.downstream.finetune import finetune

    bad = tmp_path / "backbone.pt"
    shutil.copy(exported, bad)
    shutil.copy(str(exported) + ".json", str(bad) + ".json")
    state = torch.load(bad, weights_only=True)
    name = next(k for k, v in state.items() if v.is_floating_point() and v.numel() > 1)
    state[name].view(-1)[0] += 1.0  # one weight changed: still a loadable, complete resnet18
    torch.save(state, bad)
    kw = dict(
        train_dir=str(single_shards),
        test_dir=str(single_shards),
        n_train=10,
        n_test=10,
        epochs=1,
        freeze_backbone=True,
        batch_size=8,
        progress=False,
    )
    with pytest.raises(UserError, match="weights differ from those its sidecar"):
        finetune(str(bad), target="theta_E", **kw)
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "hpc_lensiam",
            "finetune",
            "--backbone",
            str(bad),
            "--train",
            str(single_shards),
            "--test",
            str(single_shards),
            "--n-train",
            "10",
            "--n-test",
            "10",
        ],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "export it again" in r.stderr, r.stderr


def test_a_new_task_is_one_class_and_one_registry_line(single_shards, monkeypatch):
    """docs/extending.md's example task, registered in-process: `--task` offers it and finetune learns
    through it with the loop unchanged (same split; the head's targets are log theta_E)."""
    import re

    from hpc_lensiam.cli import build_parser
    from hpc_lensiam.downstream import tasks
    from hpc_lensiam.downstream.finetune import finetune

    page = (Path(__file__).resolve().parents[2] / "docs" / "extending.md").read_text()
    section = page.split("## A new downstream task", 1)[1].split("\n## ", 1)[0]
    namespace = dict(vars(tasks))
    exec(re.search(r"```python\n(.*?)```", section, re.S).group(1), namespace)
    monkeypatch.setitem(tasks.TASKS, "logregress", namespace["LogRegressTask"])
    args = build_parser().parse_args(
        ["finetune", "--backbone", "none", "--train", "a", "--test", "b", "--task", "logregress"]
    )
    assert args.task == "logregress"

    kw = dict(
        target="theta_E",
        n_train=20,
        n_test=10,
        epochs=1,
        freeze_backbone=True,
        batch_size=16,
        seed=0,
        arch="resnet18",
        progress=False,
    )
    log = finetune("none", str(single_shards), str(single_shards), task="logregress", **kw)
    lin = finetune("none", str(single_shards), str(single_shards), task="regress", **kw)
    assert log["task"] == "logregress" and log["test_targets"] == lin["test_targets"] and log["unit"] == "arcsec"
    assert (np.array(log["test_predictions"]) > 0).all() and np.isfinite(log["r2"])
    # standardised in log space: exp(mean log theta_E) is the geometric mean, below the arithmetic one
    assert np.exp(log["target_train_mean"]) < lin["target_train_mean"]


def test_a_new_backbone_is_one_module_and_one_registry_line(single_shards, tmp_path, monkeypatch):
    """docs/extending.md's MobileNetV3-Small, registered in-process with no case for it anywhere else:
    a SimSiam on it checkpoints, exports into stock torchvision with the trained features, embeds
    and fine-tunes (pretrained and from scratch), and its arch is named by its weights alone."""
    import re

    from hpc_lensiam.downstream.export import export_backbone
    from hpc_lensiam.downstream.finetune import finetune
    from hpc_lensiam.models import backbones
    from hpc_lensiam.models.methods import SimSiam
    from hpc_lensiam.models.weights import load_backbone
    from hpc_lensiam.train.checkpoint import save_checkpoint

    page = (Path(__file__).resolve().parents[2] / "docs" / "extending.md").read_text()
    section = page.split("## A new backbone", 1)[1].split("\n## ", 1)[0]
    namespace: dict = {}
    exec(re.search(r"```python\n(.*?)```", section, re.S).group(1), namespace)
    (spec,) = namespace["ENTRIES"]
    monkeypatch.setitem(backbones.BACKBONES, spec.name, spec)

    torch.manual_seed(0)
    model = SimSiam(spec.name, dim=64, pred_dim=16)
    x = _images(single_shards, 8)
    model(x, x.flip(-1))  # one forward in train mode: BatchNorm running statistics move off their init
    assert backbones.recognise(backbones.backbone_state_dict(model.state_dict(), spec.head)) is spec
    ckpt = tmp_path / "last.pt"
    config = {"arch": spec.name, "method": "simsiam", "mode": "lensiam"}
    save_checkpoint(ckpt, {"model": model.state_dict(), "config": config, "step": 1})

    out = tmp_path / "mobilenet.pt"
    side = export_backbone(str(ckpt), str(out))
    assert side["arch"] == spec.name and side["feature_dim"] == 576 and side["input"]["channels"] == 3
    stock = torchvision.models.mobilenet_v3_small()
    res = stock.load_state_dict(torch.load(out, weights_only=True), strict=False)
    assert sorted(res.missing_keys) == sorted(k for k in stock.state_dict() if k.startswith("classifier."))
    assert res.unexpected_keys == []
    stock.classifier = torch.nn.Identity()
    trained, info = load_backbone(ckpt)  # what `embed` runs
    assert info["arch"] == spec.name
    with torch.inference_mode():
        a, b = trained(x), stock.eval()(x.repeat(1, 3, 1, 1))
    assert a.shape == (8, 576) and torch.allclose(a, b, rtol=1e-4, atol=1e-5 * float(a.abs().max()))

    kw = dict(target="theta_E", n_train=20, n_test=10, epochs=1, batch_size=16, seed=0, progress=False)
    pre = finetune(str(out), str(single_shards), str(single_shards), freeze_backbone=True, **kw)
    scratch = finetune("none", str(single_shards), str(single_shards), arch=spec.name, **kw)
    assert (pre["arch"], pre["init"], scratch["arch"]) == (spec.name, "pretrained", spec.name)
    assert pre["test_targets"] == scratch["test_targets"] and np.isfinite([pre["r2"], scratch["r2"]]).all()

    # weights of no registered layout are refused before any image is read, naming the file
    broken = tmp_path / "broken.pt"
    state = torch.load(out, weights_only=True)
    torch.save({k: v for k, v in state.items() if not k.startswith("features.12.")}, broken)
    with pytest.raises(UserError, match=r"broken\.pt: weights match no known backbone"):
        finetune(str(broken), str(single_shards), str(single_shards), **kw)
