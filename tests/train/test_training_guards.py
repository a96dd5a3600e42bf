"""Issue 30: silent training bugs (each refused or fixed) and the relative update size |dW|/|W|.

Every test here failed before its fix: LARS under ZeRO-1 ran with one trust ratio per partition,
a ViT's --probe-data crashed on ResNet attributes, SimCLR on a ViT got 32x its lr, --grad-accum
scaled SimCLR/VICReg's lr for a batch their loss never sees, a DeepSpeed JSON could switch the ZeRO
stage behind --zero-stage, and a JSON torch_autocast section undid the fp32-reduce fix silently.
"""

from __future__ import annotations

import csv
import json
import math
import os

import numpy as np
import pytest
import torch

from hpc_lensiam.core.errors import ConfigError
from hpc_lensiam.core.runtime import DeviceCaps
from hpc_lensiam.train.loop import scaled_lr, train_config
from hpc_lensiam.train.plan import make_plan
from support import main_error_line, train_tiny

CPU = torch.device("cpu")
# support.train_tiny's config, for a --resume of one of its runs
_TINY = dict(arch="resnet18", batch_size=8, epochs=1, workers=0, proj_dim=64, pred_dim=16, log_every=1)
_ENV_KEYS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture(autouse=True)
def _clean_environ(monkeypatch):
    """A one-process DeepSpeed engine writes RANK/MASTER_PORT into os.environ: start clean, undo after."""
    saved = dict(os.environ)
    for k in _ENV_KEYS:
        monkeypatch.delenv(k, raising=False)
    yield
    os.environ.clear()
    os.environ.update(saved)


def _metrics(run) -> dict[int, dict[str, float]]:
    with open(run / "metrics.csv", newline="") as f:
        return {int(r["step"]): {k: float(v) for k, v in r.items()} for r in csv.DictReader(f)}


# ------------------------------------------------------------------ 1: LARS under DeepSpeed ZeRO-1
def _lars_relative_updates(engine, zero_stage: int) -> dict[str, float]:
    """|dW|/|W| per backbone weight after one LARS step through a real DeepSpeed engine."""
    import deepspeed

    from hpc_lensiam.models.methods.simsiam import SimSiam, simsiam_loss
    from hpc_lensiam.train.optim import LARS, _split_1d

    torch.manual_seed(0)
    model = SimSiam("resnet18", 64, 16, zero_init_residual=False)  # every layer gets a gradient
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    groups = _split_1d([{"params": list(model.parameters()), "lr": 1.0}], 0.0, "lars_exclude")
    opt = LARS(groups, lr=1.0, momentum=0.9, weight_decay=0.0, eta=1e-3)
    ds = dict(engine.plan.deepspeed, zero_optimization={"stage": zero_stage})
    m, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=ds)
    g = torch.Generator().manual_seed(0)
    x1, x2 = (torch.rand(4, 1, 48, 48, generator=g) for _ in range(2))
    m.backward(simsiam_loss(*m(x1, x2)))
    m.step()
    after = dict(model.named_parameters())
    return {
        n: float((after[n].detach() - w).norm() / w.norm())
        for n, w in before.items()
        if n.startswith("encoder.") and w.ndim > 1 and not n.startswith("encoder.fc.") and w.norm() > 0
    }


@pytest.mark.slow  # a long end-to-end run (12-14 s): make test, not test-fast
def test_lars_is_layer_wise_under_zero0_but_not_zero1_the_trap(lensiam_shards, tmp_path):
    """The trap itself, on real DeepSpeed engines: one LARS step (lr 1, eta 1e-3, first step so no
    momentum yet) moves every layer by exactly 1e-3 of its norm under ZeRO-0; under ZeRO-1 the trust
    ratio is the flat partition's, so layers move by very different fractions."""
    from hpc_lensiam.train.engine import Engine

    cfg = train_config(
        data=str(lensiam_shards), out=str(tmp_path / "x"), arch="resnet18", engine="deepspeed", workers=0
    )
    engine = Engine(cfg, device=CPU)
    try:
        zero0 = _lars_relative_updates(engine, 0)
        zero1 = _lars_relative_updates(engine, 1)
    finally:
        engine.close()
    assert all(v == pytest.approx(1e-3, rel=1e-3) for v in zero0.values()), zero0
    spread = max(zero1.values()) / max(min(zero1.values()), 1e-30)
    assert spread > 10, zero1  # not layer-wise: one ratio for the whole partition


def test_lars_with_zero1_is_refused_in_one_line(lensiam_shards, tmp_path, capsys):
    for method in ("byol", "simclr", "vicreg"):  # their recipes use LARS
        with pytest.raises(ConfigError, match="--zero-stage 1 with --optimizer lars is refused"):
            train_config(method=method, arch="resnet18", engine="deepspeed", zero_stage=1)
    with pytest.raises(ConfigError, match="one trust ratio"):
        train_config(optimizer="lars", engine="deepspeed", zero_stage=1)
    # still allowed: LARS under ZeRO-0 or DDP, and SGD/AdamW under ZeRO-1
    assert train_config(method="byol", engine="deepspeed", zero_stage=0).optimizer == "lars"
    assert train_config(method="byol", engine="ddp", zero_stage=1).optimizer == "lars"
    assert train_config(method="byol", arch="vit_tiny_p8", engine="deepspeed", zero_stage=1).optimizer == "adamw"
    assert train_config(engine="deepspeed", zero_stage=1).optimizer == "sgd"
    line = main_error_line(
        capsys,
        ["train", "--data", str(lensiam_shards), "--out", str(tmp_path / "r"), "--method", "byol", "--arch",
         "resnet18", "--engine", "deepspeed", "--zero-stage", "1"],
    )  # fmt: skip
    assert "--zero-stage 1 with --optimizer lars" in line and "--zero-stage 0" in line
    assert not (tmp_path / "r").exists()


# --------------------------------------------------------------------------- 2: --probe-data on a ViT
@pytest.mark.slow  # a long end-to-end run (15-45 s): make test, not test-fast
def test_vit_run_with_probe_data_logs_probe_rows(lensiam_shards, single_shards, tmp_path):
    """The training probe uses the backbone seam's features (head bypassed), so a ViT probes like a
    ResNet (it crashed on ``encoder.maxpool``), and equals an offline probe of the saved backbone."""
    from hpc_lensiam.evaluation.probe import probe_arrays, split_by_key
    from hpc_lensiam.models.weights import load_backbone
    from hpc_lensiam.shards.manifest import LENS_PARAMS
    from hpc_lensiam.shards.reader import load_images

    run = train_tiny(
        lensiam_shards,
        tmp_path / "vit",
        arch="vit_tiny_p8",
        probe_data=str(single_shards),
        probe_every=1,
        probe_samples=64,
    )
    rows = _metrics(run)
    assert sorted(rows) == [1, 2]
    params = ("theta_E", "e1", "gamma")
    assert all(np.isfinite(rows[s][f"probe_r2_{p}"]) for s in (1, 2) for p in params)
    backbone, _ = load_backbone(str(run / "checkpoints" / "last.pt"))
    keys, images, lens = load_images(str(single_shards), 64)
    with torch.no_grad():
        feats = backbone.eval()(torch.from_numpy(images).unsqueeze(1)).numpy()
    targets = {p: lens[:, LENS_PARAMS.index(p)] for p in params}
    offline = probe_arrays(feats, targets, np.asarray(keys), split_by_key(np.asarray(keys)))["ridge"]
    for p in params:
        assert rows[2][f"probe_r2_{p}"] == pytest.approx(offline[p], rel=1e-3, abs=1e-4), p


# ------------------------------------------------------------------------ 3: one lr rule per pair
def test_simclr_lr_rule_per_method_and_optimizer(lensiam_shards, tmp_path, capsys):
    """SimCLR's sqrt rule goes with its LARS recipe only; a ViT's AdamW base lr is for the linear
    rule (MoCo v3): combined with sqrt it gave 32x the lr at batch 64 and 4x at 4096."""
    for batch, resnet_lr, vit_lr in ((64, 0.075 * 8, 1.5e-4 * 64 / 256), (4096, 0.075 * 64, 1.5e-4 * 4096 / 256)):
        res = train_config(method="simclr", arch="resnet18", batch_size=batch)
        vit = train_config(method="simclr", arch="vit_small_p10", batch_size=batch)
        assert (res.optimizer, res.lr_scaling, vit.optimizer, vit.lr_scaling) == ("lars", "sqrt", "adamw", "linear")
        assert scaled_lr(res, world_size=1) == pytest.approx(resnet_lr)
        assert scaled_lr(vit, world_size=1) == pytest.approx(vit_lr)
    # the rule follows the optimizer finally chosen; an explicit lr_scaling still wins
    assert train_config(method="simclr", arch="resnet18", optimizer="adamw").lr_scaling == "linear"
    assert train_config(method="simsiam", arch="vit_small_p10").lr_scaling == "linear"
    path = tmp_path / "t.yaml"
    path.write_text("method: simclr\noptimizer: adamw\nlr_scaling: sqrt\n")
    assert train_config(str(path)).lr_scaling == "sqrt"
    # the start line states the rule and where it comes from
    train_tiny(lensiam_shards, tmp_path / "s", method="simclr", proj_hidden_dim=32, proj_dim=16, max_steps=1)
    assert "lr = 0.075 x sqrt(8) = 0.212132 (sqrt: the simclr + lars rule)" in capsys.readouterr().out


# ---------------------------------------------------- 4: --grad-accum with SimCLR/VICReg is refused
def test_grad_accum_refused_for_simclr_and_vicreg(lensiam_shards, tmp_path, capsys):
    for method, what in (("simclr", "the negatives"), ("vicreg", "the variance and covariance terms")):
        with pytest.raises(ConfigError, match=f"--grad-accum 2 with --method {method} is refused.*{what}"):
            train_config(method=method, grad_accum=2)
    assert train_config(method="byol", grad_accum=2).grad_accum == 2  # no batch-wide term in the loss
    assert train_config(method="simclr", grad_accum=1).grad_accum == 1
    line = main_error_line(
        capsys,
        ["train", "--data", str(lensiam_shards), "--out", str(tmp_path / "r"), "--method", "vicreg",
         "--grad-accum", "4"],
    )  # fmt: skip
    assert "--grad-accum 4 with --method vicreg" in line and "--batch-size" in line


# ------------------------------------------------------------ DeepSpeed JSON: stage conflict, autocast
def test_deepspeed_json_cannot_switch_the_zero_stage(lensiam_shards, tmp_path, capsys):
    js = tmp_path / "ds.json"
    for stage in (2, 3, 1):
        js.write_text(json.dumps({"zero_optimization": {"stage": stage}}))
        cfg = train_config(data=str(lensiam_shards), engine="deepspeed", zero_stage=0, deepspeed_config=str(js))
        with pytest.raises(ConfigError, match=f"zero_optimization.stage = {stage} contradicts --zero-stage 0"):
            make_plan(cfg, DeviceCaps(), 1)
    js.write_text(json.dumps({"zero_optimization": {"stage": 1, "reduce_bucket_size": 1000}}))
    cfg = train_config(data=str(lensiam_shards), engine="deepspeed", zero_stage=1, deepspeed_config=str(js))
    assert make_plan(cfg, DeviceCaps(), 1).deepspeed["zero_optimization"]["stage"] == 1  # agreeing: fine
    js.write_text(json.dumps({"zero_optimization": {"stage": 2}}))
    line = main_error_line(
        capsys,
        ["train", "--data", str(lensiam_shards), "--out", str(tmp_path / "r"), "--arch", "resnet18",
         "--engine", "deepspeed", "--deepspeed-config", str(js), "--workers", "0"],
    )  # fmt: skip
    assert "contradicts --zero-stage 0" in line


def test_user_torch_autocast_section_warns_at_start(lensiam_shards, tmp_path):
    js = tmp_path / "ds.json"
    js.write_text(json.dumps({"torch_autocast": {"enabled": True, "dtype": "bfloat16"}}))
    kw = dict(data=str(lensiam_shards), engine="deepspeed", zero_stage=1, precision="bf16")
    plan = make_plan(train_config(**kw, deepspeed_config=str(js)), DeviceCaps.cuda(), 1)
    assert len(plan.warnings) == 1 and "lower_precision_safe_modules" in plan.warnings[0]
    assert plan.warnings[0].startswith("train: warning: ") and "\n" not in plan.warnings[0]
    js.write_text(json.dumps({"torch_autocast": {"enabled": True, "lower_precision_safe_modules": []}}))
    assert make_plan(train_config(**kw, deepspeed_config=str(js)), DeviceCaps.cuda(), 1).warnings == ()
    assert make_plan(train_config(**kw), DeviceCaps.cuda(), 1).warnings == ()  # the generated section


# -------------------------------------------------------------------- relative update size |dW|/|W|
def _backbone(state: dict) -> dict:
    return {k: v for k, v in state.items() if k.startswith("encoder.") and not k.startswith("encoder.fc.")}


def _rel(a: dict, b: dict) -> float:
    names = [k for k, v in a.items() if v.is_floating_point() and "running_" not in k and "num_batches" not in k]
    diff = math.sqrt(sum(float((b[k].double() - a[k].double()).pow(2).sum()) for k in names))
    return diff / math.sqrt(sum(float(a[k].double().pow(2).sum()) for k in names))


@pytest.mark.parametrize("engine", ["ddp", "deepspeed"])
@pytest.mark.slow  # a long end-to-end run (15-45 s): make test, not test-fast
def test_rel_update_matches_a_manual_computation(lensiam_shards, tmp_path, engine):
    """metrics.csv's rel_update at steps 1 and 2 = |W_s - W_(s-1)| / |W_(s-1)| over the backbone's
    parameters (projector excluded), W_0 the seeded init and W_1, W_2 the periodic checkpoints;
    under DeepSpeed ZeRO-1 too (from the module's weights). Also in TensorBoard. ~0 at a tiny lr."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from hpc_lensiam.models.methods import build_method
    from hpc_lensiam.models.weights import load_checkpoint

    kw = dict(engine=engine, zero_stage=1 if engine == "deepspeed" else 0, ckpt_every=1, keep_last=0, base_lr=0.5)
    run = train_tiny(lensiam_shards, tmp_path / "run", **kw)
    cfg = train_config(**{k: v for k, v in kw.items() if k not in ("ckpt_every", "keep_last")}, arch="resnet18",
                       proj_dim=64, pred_dim=16)  # fmt: skip
    torch.manual_seed(cfg.seed)
    w0 = _backbone(build_method(cfg, 48).state_dict())
    w1, w2 = (_backbone(load_checkpoint(run / "checkpoints" / f"step_{s:08d}.pt")["model"]) for s in (1, 2))
    rows = _metrics(run)
    assert rows[1]["rel_update"] == pytest.approx(_rel(w0, w1), rel=1e-4)
    assert rows[2]["rel_update"] == pytest.approx(_rel(w1, w2), rel=1e-4)
    assert rows[1]["rel_update"] > 1e-5
    acc = EventAccumulator(str(run / "tb"))
    acc.Reload()
    tb = {e.step: e.value for e in acc.Scalars("train/rel_update")}
    assert tb[2] == pytest.approx(rows[2]["rel_update"], rel=1e-5)

    tiny = train_tiny(lensiam_shards, tmp_path / "tiny", **{**kw, "base_lr": 1e-12})
    assert all(0 <= r["rel_update"] < 1e-9 for r in _metrics(tiny).values())


# ------------------------------------------------------------------------ embed records its precision
@pytest.mark.slow  # a long end-to-end run (15-45 s): make test, not test-fast
def test_embed_records_precision_and_a_bf16_file_is_not_up_to_date_for_fp32(lensiam_shards, tmp_path, capsys):
    """A GPU embeds under bf16/fp16 autocast, a CPU in fp32: the file records it, and a file made in
    another precision is recomputed instead of counting as up to date."""
    import h5py

    from hpc_lensiam.embed.extract import extract_embeddings

    run = train_tiny(lensiam_shards, tmp_path / "run", max_steps=1)
    out = tmp_path / "emb.h5"
    args = (str(run / "checkpoints" / "last.pt"), str(lensiam_shards), str(out))
    extract_embeddings(*args, batch_size=32, workers=0, progress=False)
    with h5py.File(out, "r") as f:
        assert f.attrs["precision"] == "fp32"
    capsys.readouterr()
    extract_embeddings(*args, batch_size=32, workers=0, progress=False)
    assert "is up to date" in capsys.readouterr().out  # same precision: nothing to do
    with h5py.File(out, "r+") as f:  # as written by a bf16 GPU run
        f.attrs["precision"] = "bf16"
    extract_embeddings(*args, batch_size=32, workers=0, progress=False)
    assert "is up to date" not in capsys.readouterr().out
    with h5py.File(out, "r") as f:
        assert f.attrs["precision"] == "fp32"

    from hpc_lensiam.embed.extract import embed_precision

    assert embed_precision(CPU) == "fp32"


# --------------------------------------------------------- four torchrun ranks, one visible GPU
def test_more_torchrun_ranks_than_visible_gpus_is_the_packages_error(monkeypatch):
    """torchrun --nproc_per_node 4 on a node with one visible GPU used to put all four ranks on
    cuda:0 and fail inside NCCL; the device rule (faked device count, on a CPU) now refuses it.
    One GPU per task from a launcher that binds them (Slurm/MPI, no torchrun) stays cuda:0."""
    from hpc_lensiam.core.errors import UserError
    from hpc_lensiam.core.runtime import device_for, runtime

    env = {"RANK": "3", "LOCAL_RANK": "3", "WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "4"}
    rt = runtime(env)
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "t30")  # what torchrun's agent sets in its workers
    with pytest.raises(UserError, match=r"LOCAL_WORLD_SIZE=4: .* only 1 GPU\(s\) .*--nproc_per_node 1"):
        device_for(rt, cuda=True, device_count=1)
    with pytest.raises(UserError, match="only 2 GPU"):
        device_for(rt, cuda=True, device_count=2)
    assert device_for(rt, cuda=True, device_count=4) == torch.device("cuda", 3)
    assert device_for(rt, cuda=True, device_count=1, exclusive=False) == torch.device("cuda", 0)  # embed (gloo)
    one = runtime({"RANK": "1", "LOCAL_RANK": "0", "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "1"})
    assert device_for(one, cuda=True, device_count=1) == torch.device("cuda", 0)  # one torchrun per GPU
    monkeypatch.delenv("TORCHELASTIC_RUN_ID")
    assert device_for(runtime({}), cuda=True, device_count=1) == torch.device("cuda", 0)


# ------------------------------------------------------- simulate --renderer torch: device recorded
@pytest.mark.slow
def test_torch_engine_records_its_device_and_each_mpi_rank_gets_its_gpu(tmp_path):
    """The torch renderer's bytes depend on the device type (CPU and CUDA random streams differ):
    the plan and manifest record it and a rerun on the other type is refused instead of mixing two
    data sets in one folder. Under MPI a bare ``--device cuda`` is ``cuda:<local rank>`` per rank
    (it was ``cuda:0`` for every rank)."""
    from hpc_lensiam.core.errors import UserError
    from hpc_lensiam.simulate.writer import rank_device, simulate_shards

    assert [rank_device("cuda", r, 4) for r in range(4)] == ["cuda:0", "cuda:1", "cuda:2", "cuda:3"]
    assert [rank_device("cuda", r, 2) for r in range(4)] == ["cuda:0", "cuda:1", "cuda:0", "cuda:1"]
    assert rank_device("cuda", 3, 1) == "cuda:0"  # one visible GPU per task (launcher binding)
    assert rank_device("cuda:1", 0, 4) == "cuda:1" and rank_device("cpu", 2, 4) == "cpu"

    out = tmp_path / "ds"
    kw = dict(num_samples=2, shard_size=2, mode="lensiam", seed=3, engine="torch", progress=False)
    kw["overrides"] = {"instrument": {"num_pix": 32}}
    manifest = simulate_shards(out_dir=str(out), device="cpu", **kw)
    assert manifest["device"] == "cpu" and json.loads((out / "manifest.json").read_text())["device"] == "cpu"
    with pytest.raises(UserError, match="device: 'cpu' there, 'cuda' asked"):
        simulate_shards(out_dir=str(out), device="cuda", **kw)
    assert simulate_shards(out_dir=str(out), device="cpu", **kw)["shards"] == manifest["shards"]  # same device: fine

    # the local rank that picks the GPU, from real MPI ranks (the venv's mpiexec, 2 ranks on this node)
    import subprocess
    import sys

    from support import BIN

    # each rank writes its own file: mpiexec may interleave the two ranks' stdout ("01" was seen under load)
    code = (
        "import sys; from pathlib import Path; from mpi4py import MPI; "
        "from hpc_lensiam.simulate.writer import _local_rank; c = MPI.COMM_WORLD; "
        "Path(sys.argv[1], f'rank{c.Get_rank()}').write_text(str(_local_rank(c)))"
    )
    ranks = tmp_path / "ranks"
    ranks.mkdir()
    proc = subprocess.run(
        [str(BIN / "mpiexec"), "-n", "2", sys.executable, "-c", code, str(ranks)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert sorted(f.read_text() for f in ranks.iterdir()) == ["0", "1"]


@pytest.mark.slow  # a long end-to-end run (15-45 s): make test, not test-fast
def test_resume_keeps_rows_written_before_the_rel_update_column(lensiam_shards, tmp_path, capsys):
    """A run started before rel_update existed resumes with its metrics rows (rel_update nan), not
    with every row dropped as damaged."""
    run = train_tiny(lensiam_shards, tmp_path / "run")
    path = run / "metrics.csv"
    lines = path.read_text().strip().splitlines()
    path.write_text("\n".join(",".join(line.split(",")[:-1]) for line in lines) + "\n")  # the old 13 columns
    capsys.readouterr()
    from hpc_lensiam.train.loop import train

    train(train_config(**{**_TINY, "data": str(lensiam_shards), "out": str(run), "max_steps": 3}), resume=True)
    assert "damaged" not in capsys.readouterr().err
    rows = _metrics(run)
    assert sorted(rows) == [1, 2, 3] and all(math.isnan(rows[s]["rel_update"]) for s in (1, 2))
    assert rows[3]["rel_update"] > 0
