"""SimSiam model and loss against the definition (Chen & He 2021)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from hpc_lensiam.models.backbones import backbone_state_dict, build_backbone, feature_dim
from hpc_lensiam.models.methods.simsiam import SimSiam, simsiam_loss, z_std
from hpc_lensiam.models.weights import load_model_state
from hpc_lensiam.train.checkpoint import save_checkpoint


@pytest.fixture(scope="module")
def model18():
    torch.manual_seed(0)
    return SimSiam("resnet18")


def test_backbone_is_torchvision_resnet_with_1_channel_stem_and_zero_init_residual():
    for arch, dim in (("resnet18", 512), ("resnet50", 2048), ("resnet101", 2048)):
        assert feature_dim(arch) == dim
    net = build_backbone("resnet18")
    assert net.conv1.in_channels == 1 and net.conv1.out_channels == 64 and net.conv1.stride == (2, 2)
    assert isinstance(net.fc, nn.Identity)
    assert all(float(b.bn2.weight.detach().abs().sum()) == 0 for layer in (net.layer1, net.layer4) for b in layer)
    with torch.no_grad():
        assert net.eval()(torch.randn(2, 1, 48, 48)).shape == (2, 512)  # native size, no resize
    with pytest.raises(ValueError, match="unknown arch 'vgg16'"):  # not in the registry
        build_backbone("vgg16")


def test_zero_init_residual_can_be_turned_off_for_short_runs():
    """Off: every residual branch live from step 0 (torchvision's default init), the rest unchanged."""
    net = build_backbone("resnet18", zero_init_residual=False)
    assert all(float(b.bn2.weight.detach().min()) == 1.0 for layer in (net.layer1, net.layer4) for b in layer)
    assert net.conv1.in_channels == 1
    model = SimSiam("resnet18", zero_init_residual=False)
    assert float(model.encoder.layer2[0].bn2.weight.detach().min()) == 1.0
    from hpc_lensiam.core.config import from_dict
    from hpc_lensiam.train.config import TrainConfig

    assert TrainConfig().zero_init_residual is True  # the SimSiam reference recipe by default
    assert from_dict(TrainConfig, {"zero_init_residual": False}, "t").zero_init_residual is False


def test_resnet101_structure():
    net = build_backbone("resnet101")
    assert sum(len(layer) for layer in (net.layer1, net.layer2, net.layer3, net.layer4)) == 33  # 3+4+23+3
    assert all(float(b.bn3.weight.detach().abs().sum()) == 0 for b in net.layer3)
    n_params = sum(p.numel() for p in net.parameters())
    assert 42e6 < n_params < 43e6  # torchvision resnet101 (44.5M) minus fc and 2 of 3 stem channels


def test_projector_and_predictor_follow_simsiam(model18):
    proj, pred = model18.encoder.fc, model18.predictor
    linears = [m for m in proj if isinstance(m, nn.Linear)]
    bns = [m for m in proj if isinstance(m, nn.BatchNorm1d)]
    assert [(lin.in_features, lin.out_features) for lin in linears] == [(512, 2048), (2048, 2048), (2048, 2048)]
    assert all(lin.bias is None for lin in linears)
    assert [bn.affine for bn in bns] == [True, True, False]
    assert sum(isinstance(m, nn.ReLU) for m in proj) == 2 and isinstance(proj[-1], nn.BatchNorm1d)
    assert (pred[0].in_features, pred[0].out_features, pred[-1].out_features) == (2048, 512, 2048)
    assert pred[0].bias is None and pred[-1].bias is not None and isinstance(pred[1], nn.BatchNorm1d)
    r101 = SimSiam("resnet101")
    assert [m.in_features for m in r101.encoder.fc if isinstance(m, nn.Linear)] == [2048, 2048, 2048]


def test_forward_shapes_and_detached_targets(model18):
    x1, x2 = torch.randn(4, 1, 48, 48), torch.randn(4, 1, 48, 48)
    p1, p2, z1, z2 = model18.train()(x1, x2)
    assert p1.shape == p2.shape == z1.shape == z2.shape == (4, 2048)
    assert p1.requires_grad and not z1.requires_grad and not z2.requires_grad


def test_loss_is_symmetric_negative_cosine():
    p1, p2, z1, z2 = (torch.randn(8, 16) for _ in range(4))
    expected = -(F.cosine_similarity(p1, z2).mean() + F.cosine_similarity(p2, z1).mean()) / 2
    assert torch.allclose(simsiam_loss(p1, p2, z1, z2), expected)
    assert torch.allclose(simsiam_loss(p2, p1, z2, z1), expected)  # symmetric
    assert math.isclose(float(simsiam_loss(z2, z1, z1, z2)), -1.0, abs_tol=1e-6)  # aligned: -1
    assert math.isclose(float(simsiam_loss(-z2, -z1, z1, z2)), 1.0, abs_tol=1e-6)


def test_stop_gradient_no_gradient_through_target_branch():
    p1, p2 = torch.randn(4, 8, requires_grad=True), torch.randn(4, 8, requires_grad=True)
    z1, z2 = torch.randn(4, 8, requires_grad=True), torch.randn(4, 8, requires_grad=True)
    simsiam_loss(p1, p2, z1, z2).backward()
    assert z1.grad is None and z2.grad is None  # targets get no gradient
    assert p1.grad.abs().sum() > 0 and p2.grad.abs().sum() > 0


def test_encoder_gradient_flows_only_through_the_predictor_branch():
    """Gradients of the model equal those with the targets replaced by constants of the same value."""
    torch.manual_seed(1)
    model = SimSiam("resnet18", dim=64, pred_dim=16).train()
    x1, x2 = torch.randn(4, 1, 32, 32), torch.randn(4, 1, 32, 32)
    p1, p2, z1, z2 = model(x1, x2)
    simsiam_loss(p1, p2, z1, z2).backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    z1c, z2c = model.encoder(x1), model.encoder(x2)  # fresh graph, targets as plain constants
    c1, c2 = z1c.detach().clone(), z2c.detach().clone()
    loss = (
        -(F.cosine_similarity(model.predictor(z1c), c2).mean() + F.cosine_similarity(model.predictor(z2c), c1).mean())
        / 2
    )
    loss.backward()
    for g, p in zip(grads, model.parameters()):
        assert torch.allclose(g, p.grad, atol=1e-6)


def test_z_std_collapse_monitor():
    torch.manual_seed(0)
    healthy = z_std(torch.randn(4096, 2048))
    assert abs(float(healthy) - 1 / math.sqrt(2048)) < 1e-3
    collapsed = z_std(torch.ones(64, 2048) + 1e-3 * torch.randn(1, 2048))
    assert float(collapsed) < 1e-6


def test_checkpoint_roundtrip_and_backbone_export(tmp_path, model18):
    state = {f"module.{k}": v for k, v in model18.state_dict().items()}  # as a DDP wrapper names them
    save_checkpoint(
        tmp_path / "run" / "checkpoints" / "last.pt",
        {"model": state, "config": {"arch": "resnet18"}, "step": 7, "epoch": 0, "arch": "resnet18"},
    )
    assert not list((tmp_path / "run" / "checkpoints").glob(".tmp-*"))
    for path in (tmp_path / "run", tmp_path / "run" / "checkpoints", tmp_path / "run" / "checkpoints" / "last.pt"):
        sd, cfg, step = load_model_state(path)
        assert step == 7 and cfg == {"arch": "resnet18"} and not any(k.startswith("module.") for k in sd)
    backbone = build_backbone("resnet18")
    missing = backbone.load_state_dict(backbone_state_dict(sd), strict=True)
    assert not missing.missing_keys and not missing.unexpected_keys
    model18.eval()
    x = torch.randn(2, 1, 48, 48)
    with torch.no_grad():
        ref = nn.Sequential(*list(model18.encoder.children())[:-1])(x).flatten(1)
        assert torch.allclose(backbone.eval()(x), ref, atol=1e-5)


def test_load_model_state_errors(tmp_path):
    from hpc_lensiam.core.errors import UserError

    with pytest.raises(UserError, match="no such checkpoint"):
        load_model_state(tmp_path / "nope")
    with pytest.raises(UserError, match="holds no checkpoint"):
        load_model_state(tmp_path)
    (tmp_path / "last.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="cannot read checkpoint"):
        load_model_state(tmp_path)


def test_every_registered_backbone_is_named_by_its_weights_alone():
    """`recognise` (what export, embed and finetune use) names each entry from its trained 1-channel
    weights and from its library (export) layout, and no second entry claims either: the registry
    holds no two backbones that weights cannot tell apart. Built on the meta device (no memory)."""
    from hpc_lensiam.models.backbones import BACKBONES, recognise

    for spec in BACKBONES.values():
        side = 88 if spec.name.endswith("_p8") else 110  # a ViT's patch must divide the side
        with torch.device("meta"):
            trained = spec.build(side, True).state_dict()
            library, in_chans = spec.library(side)
        for state in (trained, library.state_dict()):
            state = {k: v for k, v in state.items() if not k.startswith(f"{spec.head}.")}
            claimed = [s.name for s in BACKBONES.values() if s.matches(state)]
            assert claimed == [spec.name] and recognise(state) is spec
        assert spec.img_size_of(trained) in (None, side)
        # the export's input channels: a torchvision stem takes 3 repeated channels, a timm ViT 1
        assert in_chans == (3 if spec.family == "torchvision" else 1)
