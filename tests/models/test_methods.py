"""SSL methods and backbones through their seams: losses against the papers' formulas, BYOL's EMA,
SimCLR/VICReg global-batch gathering on 2 real gloo ranks, recipes, and the ViT export contract.

Every loss is checked against an independent, loop-by-loop transcription of its paper's equation on
small tensors; the trainer runs are the real loop on shards made by the real simulator (conftest).
"""

from __future__ import annotations

import math
import os
import re
import socket

import numpy as np
import pytest
import torch

from hpc_lensiam.core.errors import ConfigError, UserError
from hpc_lensiam.models.backbones import backbone_state_dict, build_backbone, get
from hpc_lensiam.models.methods import BYOL, METHODS, SimCLR, SimSiam, VICReg, recipe
from hpc_lensiam.models.methods.byol import byol_loss, ema_tau
from hpc_lensiam.models.methods.simclr import nt_xent_loss
from hpc_lensiam.models.methods.vicreg import vicreg_loss
from hpc_lensiam.models.weights import load_checkpoint
from hpc_lensiam.train.config import TrainConfig
from hpc_lensiam.train.loop import scaled_lr, train_config
from hpc_lensiam.train.optim import LARS
from support import launcher_env, leave_spawned_rank, tiny_config, torchrun_cmd, train_tiny

pytestmark = pytest.mark.timeout(900)


# ------------------------------------------------------------------------------- paper formulas
def _cos(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def test_byol_loss_is_the_papers_normalised_mse_symmetrised():
    """Grill et al. eq. 2: L = ||q/|q| - z'/|z'|||^2 = 2 - 2 cos; L_total = L(q1, z'2) + L(q2, z'1)."""
    g = torch.Generator().manual_seed(0)
    p1, p2, t1, t2 = (torch.randn(5, 7, generator=g, dtype=torch.float64) for _ in range(4))
    expected = 0.0
    for q, z in ((p1, t2), (p2, t1)):
        for i in range(5):
            a, b = q[i].numpy(), z[i].numpy()
            expected += float(np.sum((a / np.linalg.norm(a) - b / np.linalg.norm(b)) ** 2)) / 5
    got = byol_loss(p1, t2) + byol_loss(p2, t1)
    assert math.isclose(float(got), expected, rel_tol=1e-6)
    assert math.isclose(float(byol_loss(t1, 3 * t1)), 0.0, abs_tol=1e-6)  # aligned: 0
    assert math.isclose(float(byol_loss(t1, -t1)), 4.0, rel_tol=1e-6)  # opposite: 4


def test_vicreg_loss_is_the_papers_equation():
    """Bardes et al. eqs. 1-6, written out dimension by dimension in float64."""
    g = torch.Generator().manual_seed(1)
    z1 = torch.randn(6, 4, generator=g, dtype=torch.float64) * torch.tensor([0.3, 1.0, 2.0, 0.05], dtype=torch.float64)
    z2 = z1 + 0.5 * torch.randn(6, 4, generator=g, dtype=torch.float64)
    lam, mu, nu, eps = 25.0, 25.0, 1.0, 1e-4
    a, b = z1.numpy(), z2.numpy()
    n, d = a.shape

    def v(z):
        return sum(max(0.0, 1 - math.sqrt(np.var(z[:, j], ddof=1) + eps)) for j in range(d)) / d

    def c(z):
        m = z.mean(0)
        cov = [
            [sum((z[k, i] - m[i]) * (z[k, j] - m[j]) for k in range(n)) / (n - 1) for j in range(d)] for i in range(d)
        ]
        return sum(cov[i][j] ** 2 for i in range(d) for j in range(d) if i != j) / d

    s = sum(float(np.sum((a[i] - b[i]) ** 2)) for i in range(n)) / (n * d)
    expected = lam * s + mu * (v(a) + v(b)) + nu * (c(a) + c(b))
    assert math.isclose(float(vicreg_loss(z1, z2, lam, mu, nu)), expected, rel_tol=1e-6)
    # the variance hinge vanishes once every dimension has std >= 1, the covariance for decorrelated dims
    wide = torch.tensor([[2.0, 0.0], [-2.0, 0.0], [0.0, 2.0], [0.0, -2.0]])
    assert math.isclose(float(vicreg_loss(wide, wide)), 0.0, abs_tol=1e-9)


def test_nt_xent_is_the_papers_loss_with_the_pair_as_positive():
    """Chen et al. 2020 eq. 1 and L = 1/2N sum_k [l(2k-1, 2k) + l(2k, 2k-1)], every other image a negative."""
    g = torch.Generator().manual_seed(2)
    z1, z2 = torch.randn(4, 6, generator=g, dtype=torch.float64), torch.randn(4, 6, generator=g, dtype=torch.float64)
    tau = 0.2
    views = []  # interleaved as in the paper: 2k-1 -> view 1 of system k, 2k -> view 2
    for k in range(4):
        views += [z1[k].numpy(), z2[k].numpy()]

    def ell(i, j):
        num = math.exp(_cos(views[i], views[j]) / tau)
        den = sum(math.exp(_cos(views[i], views[k]) / tau) for k in range(len(views)) if k != i)
        return -math.log(num / den)

    expected = sum(ell(2 * k, 2 * k + 1) + ell(2 * k + 1, 2 * k) for k in range(4)) / 8
    assert math.isclose(float(nt_xent_loss(z1, z2, tau)), expected, rel_tol=1e-6)
    # a batch whose pairs are identical and far apart from each other: loss -> 0
    e = torch.eye(4, dtype=torch.float64)
    assert float(nt_xent_loss(e, e, 0.05)) < 1e-6


# ------------------------------------------------------------------------------------ BYOL EMA
def test_byol_ema_schedule_and_target_update():
    """tau_k = 1 - (1 - tau_base)(cos(pi k/K) + 1)/2; xi <- tau xi + (1 - tau) theta; no gradient to xi."""
    assert ema_tau(0, 100) == pytest.approx(0.996)
    assert ema_tau(50, 100) == pytest.approx(0.998)
    assert ema_tau(100, 100) == pytest.approx(1.0)
    taus = [ema_tau(k, 100) for k in range(101)]
    assert all(a <= b for a, b in zip(taus, taus[1:]))

    torch.manual_seed(0)
    model = BYOL("resnet18", proj_hidden_dim=32, proj_dim=16, pred_dim=32).train()
    online = dict(model.encoder.named_parameters())
    target = dict(model.target_encoder.named_parameters())
    assert all(torch.equal(online[k], target[k]) for k in online)  # target starts as a copy
    assert not any(p.requires_grad for p in model.target_encoder.parameters())
    x1, x2 = torch.randn(4, 1, 32, 32), torch.randn(4, 1, 32, 32)
    loss, z = model.loss(*model(x1, x2))
    loss.backward()
    assert all(p.grad is None for p in model.target_encoder.parameters())
    assert model.predictor[0].weight.grad.abs().sum() > 0
    with torch.no_grad():  # move the online net
        for p in model.encoder.parameters():
            p.add_(0.1)
    before = {k: v.detach().clone() for k, v in target.items()}
    model.after_step(30, 100)
    tau = ema_tau(30, 100)
    for k, v in target.items():
        torch.testing.assert_close(v, tau * before[k] + (1 - tau) * online[k].detach(), rtol=1e-6, atol=1e-7)
    keys = model.state_dict().keys()
    assert any(k.startswith("target_encoder.") for k in keys)  # part of every checkpoint
    bb = backbone_state_dict(model.state_dict())
    assert "conv1.weight" in bb and not any(k.startswith(("fc.", "target")) for k in bb)
    torch.testing.assert_close(bb["conv1.weight"], model.encoder.conv1.weight.detach())  # the ONLINE encoder


def test_lars_step_is_the_papers_update():
    """w <- w - lr * (m mu + eta |w|/|g + wd w| (g + wd w)); 1-D parameters: plain momentum SGD."""
    w = torch.nn.Parameter(torch.tensor([[3.0, 4.0]]))
    b = torch.nn.Parameter(torch.tensor([1.0, -1.0]))
    opt = LARS(
        [{"params": [w]}, {"params": [b], "lars_exclude": True, "weight_decay": 0.0}],
        lr=0.5,
        momentum=0.9,
        weight_decay=0.1,
        eta=0.01,
    )
    w.grad, b.grad = torch.tensor([[0.0, 1.0]]), torch.tensor([2.0, 2.0])
    opt.step()
    d = np.array([0.3, 1.4])
    expected = np.array([3.0, 4.0]) - 0.5 * 0.01 * 5.0 / np.linalg.norm(d) * d
    np.testing.assert_allclose(w.detach().numpy()[0], expected, rtol=1e-6)
    np.testing.assert_allclose(b.detach().numpy(), [0.0, -2.0], rtol=1e-6)


# ------------------------------------------------------------------- 2 gloo ranks: global batch
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_worker(rank: int, world: int, port: int, z1: torch.Tensor, z2: torch.Tensor, out: str) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        n = z1.shape[0] // world
        res = {}
        for name, fn in (("simclr", lambda a, b: nt_xent_loss(a, b, 0.2)), ("vicreg", vicreg_loss)):
            a = z1[rank * n : (rank + 1) * n].clone().requires_grad_(True)
            b = z2[rank * n : (rank + 1) * n].clone().requires_grad_(True)
            loss = fn(a, b)
            loss.backward()
            res[name] = (loss.detach(), a.grad, b.grad)
        torch.save(res, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()
    leave_spawned_rank()


@pytest.mark.slow
def test_simclr_and_vicreg_see_the_global_batch_across_two_gloo_ranks(tmp_path):
    """Each rank holds half the pairs; the gathered loss and its gradients (averaged over ranks as
    DDP does) equal the single-process loss of the whole batch: negatives and statistics are global."""
    g = torch.Generator().manual_seed(3)
    z1, z2 = torch.randn(8, 5, generator=g), torch.randn(8, 5, generator=g)
    torch.multiprocessing.spawn(_rank_worker, args=(2, _free_port(), z1, z2, str(tmp_path / "r")), nprocs=2)
    parts = [torch.load(tmp_path / f"r.{r}", weights_only=True) for r in range(2)]
    for name, fn in (("simclr", lambda a, b: nt_xent_loss(a, b, 0.2)), ("vicreg", vicreg_loss)):
        a, b = z1.clone().requires_grad_(True), z2.clone().requires_grad_(True)
        full = fn(a, b)
        full.backward()
        mean_loss = sum(float(p[name][0]) for p in parts) / 2
        assert math.isclose(mean_loss, float(full.detach()), rel_tol=1e-5), name
        ga = torch.cat([p[name][1] for p in parts]) / 2  # DDP averages gradients over the 2 ranks
        gb = torch.cat([p[name][2] for p in parts]) / 2
        torch.testing.assert_close(ga, a.grad, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(gb, b.grad, rtol=1e-4, atol=1e-6)
    # a local-only SimCLR (no gather) would differ: the test can tell the two apart
    local = (nt_xent_loss(z1[:4], z2[:4], 0.2) + nt_xent_loss(z1[4:], z2[4:], 0.2)) / 2
    assert not math.isclose(float(local), sum(float(p["simclr"][0]) for p in parts) / 2, rel_tol=1e-3)


# ---------------------------------------------------------------------------- recipes and config
def test_each_method_has_its_papers_recipe_under_yaml_and_flags(tmp_path):
    assert set(METHODS) == {"simsiam", "byol", "vicreg", "simclr"}
    assert all(m.paper for m in METHODS.values())
    simsiam = train_config(method="simsiam")
    assert (simsiam.optimizer, simsiam.base_lr, simsiam.weight_decay) == ("sgd", 0.03, 5e-4)  # unchanged
    assert simsiam.method_params == {}  # SimSiam has no hyperparameters of its own
    byol = train_config(method="byol", arch="resnet18")
    assert (byol.optimizer, byol.base_lr, byol.weight_decay, byol.method_params) == (
        "lars",
        0.2,
        1.5e-6,
        {"ema_tau_base": 0.996},
    )
    assert (byol.proj_hidden_dim, byol.proj_dim, byol.pred_dim, byol.fix_pred_lr) == (4096, 256, 4096, False)
    vic = train_config(method="vicreg")
    assert (vic.proj_hidden_dim, vic.proj_dim, vic.base_lr, vic.weight_decay) == (8192, 8192, 0.2, 1e-6)
    assert vic.method_params == {"sim_coeff": 25.0, "std_coeff": 25.0, "cov_coeff": 1.0}
    sim = train_config(method="simclr", batch_size=64)
    assert (sim.method_params, sim.lr_scaling, sim.proj_dim, sim.optimizer) == (
        {"temperature": 0.1},
        "sqrt",
        128,
        "lars",
    )
    assert scaled_lr(sim, world_size=2) == pytest.approx(0.075 * math.sqrt(128))  # sqrt rule
    assert scaled_lr(byol, world_size=1) == pytest.approx(0.2 * 64 / 256)  # linear rule
    vit = train_config(method="byol", arch="vit_small_p10")
    assert (vit.optimizer, vit.base_lr, vit.weight_decay, vit.proj_dim) == ("adamw", 1.5e-4, 0.1, 256)
    # YAML over the recipe, flags over YAML
    path = tmp_path / "t.yaml"
    path.write_text("method: byol\nbase_lr: 0.5\nmethod_params: {ema_tau_base: 0.99}\n")
    cfg = train_config(str(path), weight_decay=1e-5)
    assert (cfg.method, cfg.base_lr, cfg.weight_decay, cfg.optimizer) == ("byol", 0.5, 1e-5, "lars")
    assert cfg.method_params == {"ema_tau_base": 0.99}
    # flags (--method-param) over YAML, key by key
    assert train_config(str(path), method_params={"ema_tau_base": 0.9}).method_params == {"ema_tau_base": 0.9}
    assert recipe("nope", "resnet18") == {}
    path.write_text("method: [byol]\n")
    with pytest.raises(ConfigError, match=r"t\.yaml\.method: expected a string"):
        train_config(str(path))
    with pytest.raises(ConfigError, match="method: 'nope' is not one of simsiam, byol, vicreg, simclr"):
        train_config(method="nope")
    with pytest.raises(ConfigError, match="arch: 'vit_huge_p14' is not one of"):
        train_config(arch="vit_huge_p14")
    with pytest.raises(ConfigError, match="temperature: must be > 0"):
        train_config(method="simclr", method_params={"temperature": 0.0})
    assert TrainConfig().method == "simsiam"


def test_simsiam_keeps_its_state_dict_layout_on_every_backbone():
    """encoder.* (backbone), encoder.<head>.* (projector), predictor.*: old checkpoints and exports load."""
    keys = SimSiam("resnet18", dim=32, pred_dim=8).state_dict().keys()
    assert {k.split(".")[0] for k in keys} == {"encoder", "predictor"} and "encoder.fc.0.weight" in keys
    vit = SimSiam("vit_tiny_p8", dim=32, pred_dim=8, img_size=48)
    assert "encoder.head.0.weight" in vit.state_dict() and "encoder.pos_embed" in vit.state_dict()
    for cls in (VICReg, SimCLR):
        m = cls("resnet18", 32, 16)
        assert {k.split(".")[0] for k in m.state_dict()} == {"encoder"}
        assert m(torch.randn(3, 1, 32, 32), torch.randn(3, 1, 32, 32))[0].shape == (3, 16)


# ------------------------------------------------------------------------------------- ViT export
@pytest.mark.slow
def test_vit_at_native_110px_export_contract_with_timm():
    """vit_small_p10 at 110 px: timm.create_model with the same arguments loads the backbone with no
    missing or unexpected key; with a classifier it misses exactly head.weight/head.bias."""
    import timm

    torch.manual_seed(0)
    net = build_backbone("vit_small_p10", img_size=110).eval()
    assert net.patch_embed.proj.weight.shape == (384, 1, 10, 10) and net.pos_embed.shape == (1, 1 + 11 * 11, 384)
    spec = get("vit_small_p10")
    assert spec.img_size_of(net.state_dict()) == 110
    ex = spec.export(net.state_dict(), 110)
    assert ex.in_chans == 1 and ex.library["timm"]["patch_size"] == 10
    ref = timm.create_model(
        "vit_small_patch16_224", pretrained=False, img_size=110, patch_size=10, in_chans=1, num_classes=0
    )
    res = ref.load_state_dict(ex.state, strict=False)
    assert res.missing_keys == [] and res.unexpected_keys == []
    head = timm.create_model("vit_small_patch16_224", pretrained=False, img_size=110, patch_size=10, in_chans=1)
    res = head.load_state_dict(ex.state, strict=False)
    assert sorted(res.missing_keys) == ["head.bias", "head.weight"] and res.unexpected_keys == []
    x = torch.rand(2, 1, 110, 110)
    with torch.inference_mode():
        torch.testing.assert_close(ref.eval()(x), net(x))
    with pytest.raises(ValueError, match="not a multiple of the patch size 10"):
        build_backbone("vit_small_p10", img_size=48)
    # the exporter refuses a state that breaks the contract
    bad = dict(ex.state)
    bad.pop("norm.weight")
    with pytest.raises(RuntimeError, match="export contract broken"):
        spec.export(bad, 110)


@pytest.fixture(scope="module")
def byol_vit_run(lensiam_shards, tmp_path_factory):
    """The real trainer: BYOL on a tiny ViT (patch 8 at the fixtures' 48 px), 2 steps."""
    return train_tiny(
        lensiam_shards,
        tmp_path_factory.mktemp("byolvit") / "run",
        method="byol",
        arch="vit_tiny_p8",
        proj_hidden_dim=32,
        proj_dim=16,
        pred_dim=32,
    )


@pytest.mark.slow
def test_byol_vit_run_exports_embeds_and_finetunes(byol_vit_run, lensiam_shards, single_shards, tmp_path):
    import json

    import timm

    from hpc_lensiam.downstream.export import export_backbone
    from hpc_lensiam.downstream.finetune import finetune
    from hpc_lensiam.embed.extract import extract_embeddings, load_embeddings

    ckpt = load_checkpoint(byol_vit_run / "checkpoints" / "last.pt")
    online = {k[len("encoder.") :]: v for k, v in ckpt["model"].items() if k.startswith("encoder.")}
    target = {k[len("target_encoder.") :]: v for k, v in ckpt["model"].items() if k.startswith("target_encoder.")}
    assert target and set(target) == set(online)  # the EMA target is checkpointed
    assert not torch.equal(target["blocks.0.attn.qkv.weight"], online["blocks.0.attn.qkv.weight"])
    out = tmp_path / "vit.pt"
    side = export_backbone(str(byol_vit_run), str(out))
    assert side["arch"] == "vit_tiny_p8" and side["input"]["channels"] == 1 and side["input"]["size"] == [48, 48]
    assert side["training"]["method"] == "byol" and side["timm"]["img_size"] == 48
    state = torch.load(out, weights_only=True)
    torch.testing.assert_close(state["blocks.0.attn.qkv.weight"], online["blocks.0.attn.qkv.weight"])
    kw = dict(side["timm"])
    m = timm.create_model(kw.pop("model_name"), pretrained=False, **kw)
    res = m.load_state_dict(state, strict=False)
    assert res.missing_keys == [] and res.unexpected_keys == []
    assert json.loads((tmp_path / "vit.pt.json").read_text())["weights_sha256"] == side["weights_sha256"]

    emb = extract_embeddings(
        str(byol_vit_run), str(lensiam_shards), str(tmp_path / "emb.h5"), batch_size=32, progress=False
    )
    e = load_embeddings(tmp_path / "emb.h5")
    assert emb["arch"] == "vit_tiny_p8" and e["features"].shape == (128, 192)
    rep = finetune(
        str(out), str(single_shards), str(single_shards), n_train=24, n_test=16, epochs=1, batch_size=8, progress=False
    )
    assert rep["arch"] == "vit_tiny_p8" and rep["init"] == "pretrained" and np.isfinite(rep["r2"])
    assert rep["pretraining"]["method"] == "byol"


def test_vit_patch_that_does_not_divide_the_image_is_refused_before_training(lensiam_shards, tmp_path):
    with pytest.raises(UserError, match="48 px is not a multiple of the patch size 10"):
        train_tiny(lensiam_shards, tmp_path / "run", arch="vit_tiny_p10")
    assert not (tmp_path / "run" / "checkpoints").exists()


# ----------------------------------------------------------------- resume, DeepSpeed, torchrun
@pytest.mark.slow
def test_byol_resume_continues_the_ema_target(lensiam_shards, tmp_path):
    """3 steps straight == 2 steps + --resume to 3: online weights AND the EMA target match."""
    kw = dict(method="byol", proj_hidden_dim=32, proj_dim=16, pred_dim=32)
    train_tiny(lensiam_shards, tmp_path / "straight", max_steps=3, **kw)
    train_tiny(lensiam_shards, tmp_path / "split", max_steps=2, **kw)
    from hpc_lensiam.train.loop import train

    train(
        tiny_config(lensiam_shards, tmp_path / "split", max_steps=3, **kw),
        resume=True,
    )
    a = load_checkpoint(tmp_path / "straight" / "checkpoints" / "last.pt")["model"]
    b = load_checkpoint(tmp_path / "split" / "checkpoints" / "last.pt")["model"]
    assert a.keys() == b.keys()
    for k in ("target_encoder.layer4.1.conv2.weight", "target_encoder.fc.0.weight", "encoder.fc.0.weight"):
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6)
    # and the target did move away from the online network (tau < 1), by the EMA, not by gradients
    assert not torch.equal(a["target_encoder.fc.0.weight"], a["encoder.fc.0.weight"])
    # resuming it as another method is refused in one line naming both methods
    with pytest.raises(UserError, match=r"cannot resume this run .*--method simclr .*method 'byol'"):
        train(
            tiny_config(
                lensiam_shards,
                tmp_path / "split",
                max_steps=4,
                method="simclr",
                proj_dim=None,
                pred_dim=None,
                log_every=None,
            ),
            resume=True,
        )


@pytest.mark.slow
def test_byol_with_deepspeed_and_simclr_on_two_torchrun_ranks(lensiam_shards, tmp_path):
    """The method seam under both engines: BYOL (LARS, EMA hook) through DeepSpeed in one process,
    SimCLR (global-batch negatives gathered inside the DDP loop) on 2 torchrun/gloo ranks."""
    import subprocess

    from hpc_lensiam.models.weights import backbone_from_checkpoint

    run = train_tiny(
        lensiam_shards, tmp_path / "ds", method="byol", engine="deepspeed", proj_hidden_dim=32, proj_dim=16, pred_dim=32
    )
    state = load_checkpoint(run / "checkpoints" / "last.pt")
    assert state["engine"] == "deepspeed" and any(k.startswith("target_encoder.") for k in state["model"])
    bb, info = backbone_from_checkpoint(run)
    assert info["method"] == "byol" and info["arch"] == "resnet18" and "fc.0.weight" not in bb

    env = launcher_env()
    cmd = torchrun_cmd(2) + [
        "train",
        "--data",
        str(lensiam_shards),
        "--out",
        str(tmp_path / "simclr"),
        "--method",
        "simclr",
        "--arch",
        "resnet18",
        "--batch-size",
        "4",
        "--max-steps",
        "2",
        "--epochs",
        "1",
        "--workers",
        "0",
        "--proj-hidden-dim",
        "32",
        "--proj-dim",
        "16",
        "--log-every",
        "1",
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "train: simclr (temperature=0.1) | lens views | resnet18 | lars" in proc.stdout
    assert "lr = 0.075 x sqrt(8)" in proc.stdout  # global batch 4 x 2 ranks
    rows = (tmp_path / "simclr" / "metrics.csv").read_text().strip().splitlines()[1:]
    losses = [float(r.split(",")[2]) for r in rows]
    # NT-Xent over the global batch of 8 pairs: 15 candidates per anchor, chance level log(15)
    assert len(losses) == 2 and all(0 < v < 2 * math.log(15) for v in losses)


def _bench_methods():
    import bench.methods

    return bench.methods


def test_bench_methods_report_has_the_random_weight_reference_and_its_differences(tmp_path):
    """The report's no-pretraining rows: each backbone's random weights in the R^2 table (no step time,
    no loss), every run minus them, and the other backbone's run minus the same run on --arch."""
    import argparse

    bench = _bench_methods()

    def params(*r2):
        return {p: {"r2": v, "ci95": [v - 0.1, v + 0.1]} for p, v in zip(bench.PARAMS, r2)}

    def delta(*d):
        return {p: {"delta": v, "ci95": [v - 0.05, v + 0.05]} for p, v in zip(bench.PARAMS, d)}

    run = {"method": "simsiam", "augmentation": "lens", "step_s": 3.0, "final_loss": -0.2}
    results = {"simsiam_lens_resnet18": {**run, "arch": "resnet18", "params": params(0.69, 0.57, 0.12)}}
    reference = {
        "random_resnet18": {
            "augmentation": "random weights (seed 0)",
            "arch": "resnet18",
            "params": params(0.75, 0.59, 0.31),
        },
        "init_resnet18": {
            "augmentation": "init, BatchNorm fitted (seed 0)",
            "arch": "resnet18",
            "params": params(0.64, 0.45, 0.24),
        },
    }
    a = argparse.Namespace(
        batch_size=64, nproc=1, pairs=2048, num_pix=110, steps=320, seed=0, probe_pairs=512, arch="resnet18"
    )
    path = tmp_path / "methods.md"
    bench.write_report(
        path,
        a,
        10,
        results,
        {},
        {},
        1,
        reference,
        {"simsiam_lens_resnet18 - random weights": delta(-0.057, -0.021, -0.188)},
        {"simsiam_lens_vit - simsiam_lens_resnet18": delta(0.066, -0.017, 0.227)},
    )
    text = path.read_text()
    rows = text.splitlines()
    ref = [r for r in rows if r.startswith("| none |")]
    assert ref == [
        "| none | random weights (seed 0) | resnet18 | 0.750 [0.650, 0.850] | 0.590 [0.490, 0.690] | "
        "0.310 [0.210, 0.410] | - | - | - |",
        "| none | init, BatchNorm fitted (seed 0) | resnet18 | 0.640 [0.540, 0.740] | 0.450 [0.350, 0.550] | "
        "0.240 [0.140, 0.340] | - | - | - |",
    ]
    over = "| simsiam_lens_resnet18 - random weights | -0.057 [-0.107, -0.007] | -0.021 [-0.071, +0.029] | "
    assert over + "-0.188 [-0.238, -0.138] |" in rows
    assert "| simsiam_lens_vit - simsiam_lens_resnet18 | +0.066 [+0.016, +0.116] |" in text
    assert "Partial" not in text  # 1 of 1 runs
    bench.write_report(path, a, 10, results, {}, {}, 1)  # before the references exist: no such tables
    assert "random weights" not in path.read_text() and "Across backbones" not in path.read_text()


def test_bench_methods_step_time_is_seconds_per_step_of_pairs(tmp_path):
    """bench/methods.py's s/step column: a metrics.csv row's pairs_per_s is the global batch (pairs)
    over that step's time. Its first version divided the batch by the mean images_per_s (two images
    per pair: half the real step time, and a paused step skewed it); now the median step."""
    bench = _bench_methods()
    run = tmp_path / "run"
    run.mkdir()
    # step, pairs/s, loss: step 1 is start-up; step 5 was paused (SIGSTOP) for 21 minutes
    rows = [(1, 10.0, 0.5), (2, 20.0, 0.4), (3, 40.0, 0.35), (4, 32.0, 0.32), (5, 0.05, 0.3)]
    (run / "metrics.csv").write_text(
        "step,epoch,loss,lr,z_std,pairs_per_s,images_per_s\n"
        + "".join(f"{s},0,{loss},0.1,0.02,{p},{2 * p}\n" for s, p, loss in rows)
    )
    stats = bench.train_stats(run, global_batch=64)
    assert stats["step_s"] == pytest.approx((64 / 32 + 64 / 20) / 2)  # 2.6 s: the median of 3.2, 1.6, 2.0, 1280
    assert stats["final_loss"] == 0.3 and stats["steps"] == 5
    assert stats["train_min"] == pytest.approx((6.4 + 3.2 + 1.6 + 2.0 + 1280) / 60)  # every step, start-up too
    # a run resumed from step 2's checkpoint redid step 3 (its last row counts) and went on in another part
    with open(run / "metrics.csv", "a") as f:
        f.write("3,0,0.35,0.1,0.02,16.0,32.0\n6,0,0.29,0.1,0.02,64.0,128.0\n")
    resumed = bench.train_stats(run, global_batch=64)
    assert resumed["train_min"] == pytest.approx((6.4 + 3.2 + 4.0 + 2.0 + 1280 + 1.0) / 60)


def test_bench_methods_report_after_an_optimizer_swap_run_has_its_row(tmp_path):
    """The report (and methods.json) is rewritten after every run, an optimizer swap's too, so a bench
    stopped later still shows every run that finished. Before: the swap runs skipped the rewrite, and a
    restarted bench's report dropped a finished swap until the last step (the references) completed.
    Here a run-minus-reference file is corrupt, so the bench stops after its runs."""
    import json

    bench = _bench_methods()
    out = tmp_path / "w"
    out.mkdir()
    names = ("simsiam_lens_resnet18", "simsiam_lens_resnet18_lars")
    res = {"ridge": {p: 0.5 for p in bench.PARAMS}, "ridge_ci95": {p: [0.4, 0.6] for p in bench.PARAMS}}
    res["knn"] = {p: 0.4 for p in bench.PARAMS}
    for name in names:
        (out / f"run_{name}").mkdir()
        (out / f"run_{name}" / "metrics.csv").write_text(
            "step,epoch,loss,lr,z_std,pairs_per_s,images_per_s,rel_update\n"
            + "".join(f"{s},0,-0.5,0.1,0.02,32,64,1e-4\n" for s in (1, 2, 3))
        )
        (out / f"probe_{name}.json").write_text(json.dumps({"results": {"emb": res}}))
    (out / "over_random_simsiam_lens_resnet18.json").write_text("{not json")  # read after the runs
    argv = ["--out", str(out), "--reports", str(tmp_path), "--tag", "t", "--methods", "simsiam", "--augs", "lens"]
    argv += ["--vit", "", "--runs", "simsiam-lens@lars", "--report-only"]
    with pytest.raises(json.JSONDecodeError):
        bench.main(argv)
    assert set(json.loads((out / "methods.json").read_text())["results"]) == set(names)
    text = (tmp_path / "t.md").read_text()
    assert "| simsiam @lars | lens | resnet18 | 0.500 [0.400, 0.600] |" in text and "Partial" not in text


def test_bench_methods_pairs_lens_and_standard_at_the_same_override(tmp_path):
    """Lens vs standard at a method's best step size: ``--runs simsiam-standard@lars`` is the twin of
    ``simsiam-lens@lars`` and the two pair (row ``simsiam @lars``); ``simclr-standard`` (no override) is
    SimCLR's own recipe, the same run ``--augs`` would make, listed once."""
    import json

    bench = _bench_methods()
    assert bench.parse_runs("simclr-standard,simsiam-standard@lars", "resnet18") == [
        ("simclr", "standard", "resnet18", ""),
        ("simsiam", "standard", "resnet18", "lars"),
    ]
    out = tmp_path / "w"
    out.mkdir()
    res = {"ridge": {p: 0.5 for p in bench.PARAMS}, "ridge_ci95": {p: [0.4, 0.6] for p in bench.PARAMS}}
    res["knn"] = {p: 0.4 for p in bench.PARAMS}
    names = ("simsiam_lens_resnet18", "simsiam_lens_resnet18_lars", "simsiam_standard_resnet18_lars")
    for name in names:
        (out / f"run_{name}").mkdir()
        (out / f"run_{name}" / "metrics.csv").write_text(
            "step,epoch,loss,lr,z_std,pairs_per_s,images_per_s\n1,0,-0.5,0.1,0.02,32,64\n"
        )
        (out / f"probe_{name}.json").write_text(json.dumps({"results": {"emb": res}}))
    delta = {p: {"delta": 0.1, "ci95": [0.05, 0.15]} for p in bench.PARAMS}
    (out / "paired_simsiam_resnet18_lars.json").write_text(json.dumps({"paired_difference": {"ridge": delta}}))
    argv = ["--out", str(out), "--reports", str(tmp_path), "--tag", "t", "--methods", "simsiam", "--augs", "lens"]
    argv += ["--vit", "", "--runs", "simsiam-lens@lars,simsiam-standard@lars,simsiam-lens", "--report-only"]
    bench.main(argv)
    report = json.loads((out / "methods.json").read_text())
    assert set(report["results"]) == set(names) and set(report["paired"]) == {"simsiam @lars"}
    assert "| simsiam @lars | +0.100 [+0.050, +0.150] |" in (tmp_path / "t.md").read_text()


@pytest.mark.slow
def test_bench_methods_optimizer_swap_harness_tiny(tmp_path):
    """The optimizer-swap experiment's harness at a tiny size: a run named with an override trains with the
    other method's recipe (its flags in the ledger), every periodic checkpoint is embedded and probed (the
    curve, with intervals, in methods.json, the report's table and a PNG), rel_update is reported beside
    each run, and a rerun skips every finished step. A bad override exits 2 before anything runs."""
    import json
    import subprocess
    import sys

    from support import REPO

    out, reports = tmp_path / "w", tmp_path / "r"
    cmd = [sys.executable, "-m", "bench.methods", "--out", str(out), "--reports", str(reports), "--tag", "t"]
    cmd += ["--pairs", "16", "--probe-pairs", "24", "--steps", "4", "--num-pix", "32", "--batch-size", "8"]
    cmd += ["--methods", "simsiam", "--augs", "lens", "--vit", "", "--runs", "simsiam-lens@lars", "--curve-every", "2"]
    bad = subprocess.run([*cmd[:-4], "--runs", "simsiam-lens@adam"], cwd=REPO, capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.startswith("hpc-lensiam: error: --runs: @adam")
    assert not out.exists() or not (out / "steps.json").exists()
    subprocess.run(cmd, cwd=REPO, check=True, capture_output=True, timeout=1100)
    res = json.loads((out / "methods.json").read_text())["results"]
    swap = res["simsiam_lens_resnet18_lars"]
    assert swap["override"] == "lars" and [c["step"] for c in swap["curve"]] == [2, 4]
    assert all(c["params"]["theta_E"]["ci95"][0] <= c["params"]["theta_E"]["r2"] for c in swap["curve"])
    assert swap["rel_update"]["median"] > 0 and res["simsiam_lens_resnet18"]["rel_update"]["median"] > 0
    steps = json.loads((out / "steps.json").read_text())
    assert (
        "--optimizer lars --base-lr 0.075 --weight-decay 1e-06"
        in steps["pretrain simsiam_lens_resnet18_lars"]["command"]
    )
    assert "--lr-scaling sqrt" in steps["pretrain simsiam_lens_resnet18_lars"]["command"]
    text = (reports / "t.md").read_text()
    assert "## Probe R^2 vs pretraining step" in text and (reports / "t_curve.png").stat().st_size > 1000
    assert "| simsiam_lens_resnet18_lars | 4 |" in text and "rel. update/step" in text
    again = subprocess.run(cmd, cwd=REPO, check=True, capture_output=True, text=True, timeout=600)
    assert "pretrain simsiam_lens_resnet18_lars: done before" in again.stdout and "step 2: done before" in again.stdout


# ------------------------------------------------------------------- a method's own hyperparameters
def _barlow_from_the_docs():
    """docs/extending.md's example method (Barlow Twins with its own ``lambd``), executed as written."""
    import re
    from pathlib import Path

    page = (Path(__file__).resolve().parents[2] / "docs" / "extending.md").read_text()
    section = page.split("## A new SSL method", 1)[1].split("\n## ", 1)[0]
    namespace: dict = {}
    exec(re.search(r"```python\n(.*?)```", section, re.S).group(1), namespace)
    return namespace


def test_a_new_method_with_its_own_hyperparameter_is_one_class_and_one_registry_line(
    lensiam_shards, tmp_path, monkeypatch, capsys
):
    """The docs' Barlow Twins, registered with one line: ``--method barlow --method-param lambd=0.01``
    trains 2 steps through the command line with nothing about it in TrainConfig; the run's
    config.yaml and checkpoint record lambd; an unknown or out-of-range key is one line naming it."""
    import dataclasses

    import yaml

    from hpc_lensiam.cli import main

    ns = _barlow_from_the_docs()
    monkeypatch.setitem(METHODS, "barlow", ns["Barlow"])  # the one registry line
    assert not {f.name for f in dataclasses.fields(TrainConfig)} & {"lambd", "barlow"}
    # the loss is Barlow Twins': 0 for identical, decorrelated, standardised embeddings
    a = torch.randn(64, 8, generator=torch.Generator().manual_seed(0))
    z = torch.linalg.qr(a - a.mean(0))[0] * 8  # centred, unit variance, uncorrelated columns
    assert float(ns["barlow_loss"](z, z, 0.0051)) < 1e-6
    assert float(ns["barlow_loss"](z, z.roll(1, dims=1), 0.0051)) > 7.9  # every C_ii = 0: 8 x 1
    run = tmp_path / "barlow"
    args = ["train", "--data", str(lensiam_shards), "--out", str(run), "--method", "barlow"]
    args += ["--arch", "resnet18", "--batch-size", "8", "--max-steps", "2", "--epochs", "1", "--workers", "0"]
    args += ["--proj-hidden-dim", "32", "--proj-dim", "16", "--log-every", "1", "--method-param", "lambd=0.01"]
    assert main(args) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert "train: barlow (lambd=0.01) | lens views | resnet18 | lars" in out
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["method"] == "barlow" and saved["method_params"] == {"lambd": 0.01}
    ckpt = load_checkpoint(run / "checkpoints" / "last.pt")
    assert ckpt["step"] == 2 and ckpt["config"]["method_params"] == {"lambd": 0.01}
    rows = (run / "metrics.csv").read_text().strip().splitlines()[1:]
    assert len(rows) == 2 and all(math.isfinite(float(r.split(",")[2])) for r in rows)
    # the default is the method's, written once in its Params
    assert train_config(method="barlow").method_params == {"lambd": 0.0051}
    for bad, line in (
        ("lamda=0.01", "unknown key 'lamda' for --method barlow (its keys: lambd)"),
        ("lambd=-1", "error: --method-param lambd: must be >= 0, got -1.0"),
        ("lambd=big", "error: --method-param lambd: expected a number, got 'big'"),
    ):
        assert main([*args[:-1], bad, "--out", str(tmp_path / "refused")]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("hpc-lensiam: error: ") and line in err, err
    assert not (tmp_path / "refused").exists()  # refused before the run folder is made


def test_method_params_are_checked_against_the_chosen_method(tmp_path):
    """An unknown key names the method's keys; another method's key is unknown; a YAML mapping
    and --method-param merge key by key; old flat keys and mode: are refused naming the new spelling."""
    with pytest.raises(ConfigError, match=r"unknown key 'ema_tau_base' for --method simclr \(its keys: temperature\)"):
        train_config(method="simclr", method_params={"ema_tau_base": 0.99})
    with pytest.raises(ConfigError, match=r"unknown key 'temperature' for --method simsiam \(its keys: none\)"):
        train_config(method="simsiam", method_params={"temperature": 0.2})
    with pytest.raises(ConfigError, match=r"ema_tau_base: 1.5 is not in \[0, 1\]"):
        train_config(method="byol", method_params={"ema_tau_base": 1.5})
    path = tmp_path / "v.yaml"
    path.write_text("method: vicreg\nmethod_params: {sim_coeff: 10, cov_coeff: 2}\n")
    cfg = train_config(str(path), method_params={"cov_coeff": 3})
    assert cfg.method_params == {"sim_coeff": 10.0, "std_coeff": 25.0, "cov_coeff": 3.0}
    path.write_text("method: vicreg\nmethod_params: [1, 2]\n")
    with pytest.raises(ConfigError, match=r"v\.yaml\.method_params: expected a mapping"):
        train_config(str(path))
    for old, new in (
        ("temperature: 0.2", "use method_params: {temperature: VALUE}"),
        ("vicreg_sim_coeff: 10", "use method_params: {sim_coeff: VALUE}"),
        ("mode: simsiam", "use views: lens|standard"),
    ):
        path.write_text(old + "\n")
        with pytest.raises(ConfigError, match=rf"v\.yaml: key '{old.split(':')[0]}' was renamed: {re.escape(new)}"):
            train_config(str(path))
    with pytest.raises(UserError, match=r"--ema-tau-base was renamed: use --method-param ema_tau_base=VALUE"):
        train_config(method="byol", ema_tau_base=0.99)
    # the method's own numbers reach the model unchanged (defaults: the papers')
    byol = BYOL("resnet18", 32, 16, 32, METHODS["byol"].params_of(train_config(method="byol")))
    assert byol.tau_base == 0.996
    simclr = METHODS["simclr"].from_config(train_config(method="simclr", arch="resnet18", proj_dim=8), None)
    assert simclr.temperature == 0.1
    vic = METHODS["vicreg"].from_config(
        train_config(method="vicreg", arch="resnet18", proj_dim=8, method_params={"std_coeff": 5}), None
    )
    assert vic.coeffs == (25.0, 5.0, 1.0)


def test_old_mode_flag_is_refused_naming_views(tmp_path, capsys):
    """``--mode`` now reads --views: the old flag is one line naming the new spelling, exit 2, nothing made."""
    from hpc_lensiam.cli import main

    out = tmp_path / "run"
    for flag, new in (
        (["--mode", "simsiam"], "--mode was renamed: use --views lens|standard"),
        (["--temperature", "0.2"], "--temperature was renamed: use --method-param temperature=VALUE"),
        (["--vicreg-cov-coeff", "2"], "--vicreg-cov-coeff was renamed: use --method-param cov_coeff=VALUE"),
    ):
        assert main(["train", "--data", str(tmp_path), "--out", str(out), *flag]) == 2
        assert capsys.readouterr().err == f"hpc-lensiam: error: {new}\n"
    assert not out.exists()


def test_bench_methods_runs_only_the_named_runs_when_the_grid_is_empty():
    """``--augs ''`` drops the method x augmentation grid, so a twin pair (lens and standard at one
    optimizer swap) runs alone; before, '' was read as one augmentation named ''."""
    bench = _bench_methods()
    a = bench.parse_args(["--augs", "", "--vit", "", "--runs", "simsiam-lens@lars,simsiam-standard@lars"])
    extra = bench.parse_runs(a.runs, a.arch)
    assert bench.planned_runs(a, extra) == [
        ("simsiam", "lens", "resnet18", "lars"),
        ("simsiam", "standard", "resnet18", "lars"),
    ]
    grid = bench.parse_args(["--methods", "simsiam", "--vit", "", "--runs", "simsiam-lens"])
    assert bench.planned_runs(grid, bench.parse_runs(grid.runs, grid.arch)) == [
        ("simsiam", "lens", "resnet18", ""),
        ("simsiam", "standard", "resnet18", ""),
    ]


@pytest.mark.parametrize("spec", ["simsiam-lens@adam", "simsiam-lens@lrfastx"])
def test_bench_methods_refuses_an_unknown_optimizer_override_in_one_line(spec, capsys):
    bench = _bench_methods()
    with pytest.raises(SystemExit) as e:
        bench.parse_runs(spec, "resnet18")
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("hpc-lensiam: error: --runs: ")


def test_bench_step_sizes_reads_each_recipes_update_at_the_schedules_peak(lensiam_shards, tmp_path):
    """bench.step_sizes runs the first steps of a bench.methods run (same command, its full schedule) and
    reads the backbone's relative update per step: SimCLR's LARS recipe moves SimSiam's backbone further
    per step than SimSiam's own SGD recipe (the issue-30 finding, at a tiny size), and in both the warm-up
    steps move it less than the steps after it. Too few steps to pass the warm-up is refused in one line
    before anything runs; a rerun skips both runs."""
    import json
    import subprocess
    import sys

    from support import REPO

    out, reports = tmp_path / "w", tmp_path / "r"
    cmd = [sys.executable, "-m", "bench.step_sizes", "--data", str(lensiam_shards), "--out", str(out)]
    cmd += ["--reports", str(reports), "--tag", "t", "--batch-size", "8", "--steps", "80"]
    cmd += ["--runs", "simsiam-lens,simsiam-lens@lars"]
    bad = subprocess.run([*cmd, "--measure-steps", "8"], cwd=REPO, capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.startswith("hpc-lensiam: error: --measure-steps: 8: ")
    assert len(bad.stderr.strip().splitlines()) == 1 and not out.exists()
    subprocess.run([*cmd, "--measure-steps", "11"], cwd=REPO, check=True, capture_output=True, timeout=600)
    res = json.loads((out / "step_sizes.json").read_text())["results"]
    sgd, lars = res["simsiam_lens_resnet18"], res["simsiam_lens_resnet18_lars"]
    assert sgd["steps"] == lars["steps"] == 11
    assert lars["rel_update_peak"] > 2 * sgd["rel_update_peak"] > 0
    for r in (sgd, lars):
        assert 0 < r["rel_update_warmup"] < r["rel_update_peak"]
    assert sgd["recipe"].startswith("sgd") and lars["recipe"].startswith("lars")
    steps = json.loads((out / "steps.json").read_text())
    assert "--epochs 10 --max-steps 11 --warmup-epochs 1" in steps["first 11 steps of simsiam_lens_resnet18"]["command"]
    assert "| simsiam_lens_resnet18_lars | lars" in (reports / "t.md").read_text()
    again = subprocess.run([*cmd, "--measure-steps", "11"], cwd=REPO, check=True, capture_output=True, text=True)
    assert again.stdout.count("done before") == 2
