"""torchvision ResNets with a 1-channel stem at native image size (the package's original backbone).

The stem is a 1-channel ``conv1`` (7x7, stride 2, 64 filters, Kaiming-initialised like
torchvision's) and images are used at their native size (110x110 for the hst preset), with no
resize: the LenSiam reference repeats the channel 3x and resizes to 224, ~4x the compute for no new
information. Everything else is the stock torchvision ResNet (maxpool included).

Export contract (the official SimSiam export): the 1-channel ``conv1`` is folded into torchvision's
3-channel one as ``repeat(w, 3) / 3``, so ``torchvision.models.<arch>()`` loads the state with
``strict=False``, missing exactly ``fc.weight`` and ``fc.bias``, and a grayscale image repeated on
3 channels gives the trained features.
"""

from __future__ import annotations

from .spec import BackboneSpec, Exported, fold_stem, matches_layout

FEATURE_DIMS = {"resnet18": 512, "resnet34": 512, "resnet50": 2048, "resnet101": 2048, "resnet152": 2048}
CHANNELS = "grayscale image repeated on 3 channels (conv1 folded from the 1-channel training stem)"


def build(arch: str, zero_init_residual: bool = True):
    """Torchvision ResNet, random init, 1-channel ``conv1``, ``fc=Identity``.

    ``zero_init_residual`` (the SimSiam reference's choice) zeroes the last BN scale of every
    residual block, so training starts from identity blocks; over a few hundred steps those scales
    stay ~1e-3 (docs/results.md measures what that does to short runs).
    """
    import torch.nn as nn
    import torchvision

    net = getattr(torchvision.models, arch)(weights=None, zero_init_residual=zero_init_residual)
    net.conv1 = nn.Conv2d(1, 64, kernel_size=7, stride=2, padding=3, bias=False)
    nn.init.kaiming_normal_(net.conv1.weight, mode="fan_out", nonlinearity="relu")
    net.fc = nn.Identity()
    return net


def to_torchvision(bb: dict, arch: str):
    """Fold conv1, load into ``torchvision.models.<arch>()`` checking the missing/unexpected keys."""
    import torchvision

    from ...core.errors import UserError

    state = fold_stem(bb, "conv1.weight")
    tv = getattr(torchvision.models, arch)(weights=None)
    try:
        res = tv.load_state_dict(state, strict=False)
    except RuntimeError as exc:
        raise UserError(f"backbone weights do not fit torchvision {arch} ({str(exc).splitlines()[0]})") from None
    if sorted(res.missing_keys) != ["fc.bias", "fc.weight"] or res.unexpected_keys:
        raise RuntimeError(
            f"export contract broken for {arch}: missing {res.missing_keys}, "
            f"unexpected {res.unexpected_keys} (expected missing fc.weight, fc.bias only)"
        )
    return state, tv


def library(arch: str):
    """Stock ``torchvision.models.<arch>()`` at random init (torchvision's own, 3-channel stem),
    ``fc = Identity``: what an export loads into, and the no-pretraining baseline of ``finetune``."""
    import torch.nn as nn
    import torchvision

    tv = getattr(torchvision.models, arch)(weights=None)
    tv.fc = nn.Identity()
    return tv, 3


def _specs():
    def export(arch):
        def run(bb: dict, img_size=None):
            import torch.nn as nn

            state, tv = to_torchvision(bb, arch)
            tv.fc = nn.Identity()
            return Exported(
                state=state,
                model=tv.eval(),
                in_chans=3,
                channel_note=CHANNELS,
                load=f"m = torchvision.models.{arch}(); m.load_state_dict(STATE, strict=False)"
                "  # missing only fc.weight, fc.bias",
            )

        return run

    return tuple(
        BackboneSpec(
            name=a,
            family="torchvision",
            feature_dim=d,
            head="fc",
            build=lambda img_size, zir, a=a: build(a, zir),
            export=export(a),
            library=lambda img_size, a=a: library(a),
            matches=matches_layout(lambda a=a: library(a)[0], head="fc", stem="conv1.weight"),
        )
        for a, d in FEATURE_DIMS.items()
    )


ENTRIES = _specs()
