"""timm Vision Transformers at native resolution with a 1-channel patch embedding.

``--arch vit_<width>_p<patch>`` builds ``timm.create_model("vit_<width>_patch16_224",
img_size=H, patch_size=<patch>, in_chans=1, num_classes=0)`` with ``H`` the data's native image
side (110 px for the hst preset: ``p10`` gives 11x11 = 121 tokens, ``p11`` 10x10 = 100), no resize
and no repeated channels. ``<width>`` is timm's tiny (192-d, for tests), small (384-d) or base
(768-d). The paper names "different encoders (e.g., ViT)" as future work; the LenSiam authors' later
configs resize to 224 px for a ViT-B/16, which costs ~4x the tokens for the same pixels.

Export contract: the trained state is the timm model's own (1 channel, no folding), so
``timm.create_model`` with the same arguments loads it strictly, and with ``num_classes`` left at
its default it misses only ``head.weight`` and ``head.bias``; the exporter asserts both.
"""

from __future__ import annotations

from .spec import BackboneSpec, Exported

WIDTHS = {"tiny": 192, "small": 384, "base": 768}
PATCHES = (8, 10, 11)
CHANNELS = "1 channel: the grayscale image itself (in_chans=1 patch embedding)"
# SGD/LARS recipes were tuned for ResNets: a ViT trains with MoCo v3's AdamW recipe (Chen, Xie & He
# 2021, "An Empirical Study of Training Self-Supervised Vision Transformers": AdamW, lr = 1.5e-4 x
# batch/256, weight decay 0.1), applied over the method's recipe and under YAML keys and flags.
RECIPE = dict(optimizer="adamw", base_lr=1.5e-4, weight_decay=0.1)


def timm_kwargs(width: str, patch: int, img_size: int) -> dict:
    return {
        "model_name": f"vit_{width}_patch16_224",
        "img_size": img_size,
        "patch_size": patch,
        "in_chans": 1,
        "num_classes": 0,
    }


def check_img_size(name: str, patch: int, img_size: int | None) -> int:
    if img_size is None:
        raise ValueError(f"--arch {name} needs the image side (the data's native size) to build its patch grid")
    if img_size % patch:
        raise ValueError(
            f"--arch {name}: the image side {img_size} px is not a multiple of the patch size "
            f"{patch} (native resolution, no resize); pick a patch size from "
            f"{', '.join(str(p) for p in PATCHES)} that divides it"
        )
    return img_size


def build(width: str, patch: int, img_size: int | None):
    import timm

    img_size = check_img_size(f"vit_{width}_p{patch}", patch, img_size)
    kw = timm_kwargs(width, patch, img_size)
    return timm.create_model(kw.pop("model_name"), pretrained=False, **kw)


def img_size_of(patch: int):
    def run(state: dict) -> int | None:
        pos = state.get("pos_embed")
        if pos is None:
            return None
        side = int(round((pos.shape[1] - 1) ** 0.5))  # one class token, then a side x side grid
        return side * patch

    return run


def matches(width: str, patch: int):
    """Weights of this width and patch size: the position embedding's width, the patch kernel's side
    (the image side comes from the number of positions, :func:`img_size_of`)."""

    def run(state: dict) -> bool:
        pos, proj = state.get("pos_embed"), state.get("patch_embed.proj.weight")
        return pos is not None and proj is not None and pos.shape[-1] == WIDTHS[width] and proj.shape[-1] == patch

    return run


def to_timm(bb: dict, width: str, patch: int, img_size: int):
    """Load into ``timm.create_model`` with the training arguments; assert the key contract."""
    import timm

    kw = timm_kwargs(width, patch, img_size)
    name = kw.pop("model_name")
    ref = timm.create_model(name, pretrained=False, **kw)
    res = ref.load_state_dict(bb, strict=False)
    if res.missing_keys or res.unexpected_keys:
        raise RuntimeError(
            f"export contract broken for {name}: missing {res.missing_keys}, "
            f"unexpected {res.unexpected_keys} (expected none)"
        )
    with_head = timm.create_model(name, pretrained=False, **{**kw, "num_classes": 1000})
    res = with_head.load_state_dict(bb, strict=False)
    if sorted(res.missing_keys) != ["head.bias", "head.weight"] or res.unexpected_keys:
        raise RuntimeError(
            f"export contract broken for {name} with a head: missing {res.missing_keys}, "
            f"unexpected {res.unexpected_keys} (expected missing head.weight, head.bias only)"
        )
    return ref, {"model_name": name, **kw}


def _specs():
    def export(width, patch):
        def run(bb: dict, img_size: int):
            ref, kw = to_timm(bb, width, patch, img_size)
            args = ", ".join(f"{k}={v!r}" for k, v in kw.items() if k != "model_name")
            return Exported(
                state=dict(bb),
                model=ref.eval(),
                in_chans=1,
                channel_note=CHANNELS,
                load=f"m = timm.create_model({kw['model_name']!r}, {args}); m.load_state_dict(STATE)  # strict",
                library={"timm": kw},
            )

        return run

    return tuple(
        BackboneSpec(
            name=f"vit_{w}_p{p}",
            family="timm",
            feature_dim=d,
            head="head",
            build=lambda img_size, zir, w=w, p=p: build(w, p, img_size),
            export=export(w, p),
            library=lambda img_size, w=w, p=p: (build(w, p, img_size), 1),
            matches=matches(w, p),
            img_size_of=img_size_of(p),
            recipe=RECIPE,
        )
        for w, d in WIDTHS.items()
        for p in PATCHES
    )


ENTRIES = _specs()
