"""Downstream regression of one lens parameter with few labels on an independent data set.

``hpc-lensiam finetune --backbone backbone.pt|none --train DIR --test DIR --target theta_E
--n-train 1000 --n-test 1000 [--epochs E] [--freeze-backbone]`` (paper: 1,000 / 1,000 images).

- Backbone: an ``hpc-lensiam export`` file (arch from its JSON sidecar), any torchvision ResNet
  weights file (arch inferred from the keys; ``fc`` dropped), or ``none``: the same arch at random
  init, the no-pretraining baseline (``--arch``, default resnet101). Its ``fc`` becomes
  ``Linear(feature_dim, 1)``.
  A ViT export (``--arch vit_*`` pretraining) is rebuilt with ``timm.create_model`` from the
  arguments in its sidecar; it reads the single grayscale channel at its training size.
- Input, the export contract: each image divided by its max (as stored) and repeated on 3 channels.
- The first ``n_train`` samples of ``--train`` (manifest order) are split ``1 - val_fraction`` /
  ``val_fraction`` with the seed; the epoch with the lowest validation loss is kept. The first
  ``n_test`` samples of ``--test`` are used once, for the final report only. If ``--test`` is the
  same data set as ``--train``, the test samples are the ``n_test`` after the first ``n_train``.
- Targets standardised with the train split's mean/std; AdamW, cosine schedule; MSE loss. With
  ``--freeze-backbone`` the backbone runs once in eval mode and only the linear head is trained.
- ``--task classify --target is_lens`` (survey-family sets): the lens-finding task, logistic head and
  BCE, reporting ROC AUC and TPR at FPR 1e-2 / 1e-3 with bootstrap intervals and the ROC curve
  (finetune_tasks.py, classify_metrics.py); the rest of this page holds for both tasks.
- Report: test R^2 with a bootstrap 95% interval (1000 resamples, seeded), residual sigma and RMSE
  in the target's units; one line on stdout and, with ``--json``, a JSON file (atomic) that also
  keeps the test targets and predictions, so two backbones can be compared pairwise
  (``hpc-lensiam compare``; the statistics live in :mod:`hpc_lensiam.stats`). ``--seeds 0,1,2``
  runs the recipe once per seed (:mod:`hpc_lensiam.downstream.seeds`).
"""
from __future__ import annotations

import copy
import sys
import time
from pathlib import Path

import numpy as np

from ..errors import UserError
from ..io import MANIFEST_NAME, atomic_write_json, check_output_file, read_manifest, sha256_file

DEFAULT_ARCH = "resnet101"


# ---------------------------------------------------------------------------------------- model
def _vit_regressor(vit, dim: int):
    """A timm ViT (1 channel) behind the torchvision-shaped interface the loop uses: ``.fc`` head and
    the 3-channel repeated input, of which it reads one channel (all three are the same image)."""
    import torch.nn as nn

    class _ViTRegressor(nn.Module):
        def __init__(self):
            super().__init__()
            self.vit, self.fc = vit, nn.Linear(dim, 1)

        def forward(self, x):
            return self.fc(self.vit(x[:, :1]))

    return _ViTRegressor()


def build_model(backbone: str, arch: str | None, seed: int, img_size: int | None = None):
    """(torchvision ResNet or timm ViT with fc = Linear(D, 1), description dict).

    ``img_size``: the data's image side, needed only to build a random-init ViT (``--backbone none``).
    """
    import torch
    import torch.nn as nn
    import torchvision

    from ..models.backbones import BACKBONES, build_backbone
    from .export import _RESNETS, fold_conv1, infer_arch, read_backbone_file, read_sidecar

    vits = [a for a, s in BACKBONES.items() if s.family == "timm"]
    known = sorted(set(_RESNETS.values())) + vits
    if arch is not None and arch not in known:
        raise UserError(f"--arch: {arch!r} is not one of {', '.join(known)}")
    torch.manual_seed(seed)
    desc = {"backbone": backbone}
    if backbone.lower() == "none":
        arch = arch or DEFAULT_ARCH
        if arch in vits:
            try:
                vit = build_backbone(arch, img_size=img_size)
            except ValueError as exc:
                raise UserError(f"--arch: {exc}") from None
            model = _vit_regressor(vit, BACKBONES[arch].feature_dim)
            desc.update(img_size=img_size)
        else:
            model = getattr(torchvision.models, arch)(weights=None)
        desc.update(arch=arch, init="random (no pretraining)")
    else:
        state = read_backbone_file(backbone)
        side = read_sidecar(backbone)
        if "pos_embed" in state:   # a ViT export: timm's arguments come from the sidecar
            if not (side and side.get("timm") and side.get("arch") in vits):
                raise UserError(f"{backbone}: a ViT backbone needs its `hpc-lensiam export` sidecar "
                                f"({backbone}.json, with the timm arguments)")
            found = side["arch"]
            if arch and arch != found:
                raise UserError(f"{backbone}: backbone of the wrong arch: {found}, --arch asked for {arch}")
            import timm
            kw = dict(side["timm"])
            vit = timm.create_model(kw.pop("model_name"), pretrained=False, **kw)
            try:
                vit.load_state_dict(state, strict=True)
            except RuntimeError as exc:
                raise UserError(f"{backbone}: weights do not fit timm {found} "
                                f"({str(exc).splitlines()[0]})") from None
            model = _vit_regressor(vit, BACKBONES[found].feature_dim)
            desc.update(arch=found, init="pretrained", sidecar=side, img_size=kw["img_size"])
        else:
            found = infer_arch(state)
            if found is None:
                raise UserError(f"{backbone}: weights match no torchvision ResNet")
            if side and side.get("arch") and side["arch"] != found:
                raise UserError(f"{backbone}: sidecar says arch {side['arch']!r} but the weights are a {found}")
            if arch and arch != found:
                raise UserError(f"{backbone}: backbone of the wrong arch: {found}, --arch asked for {arch}")
            arch = found
            model = getattr(torchvision.models, arch)(weights=None)
            try:
                res = model.load_state_dict(fold_conv1(state), strict=False)
            except RuntimeError as exc:
                raise UserError(f"{backbone}: weights do not fit torchvision {arch} "
                                f"({str(exc).splitlines()[0]})") from None
            if set(res.missing_keys) - {"fc.weight", "fc.bias"} or res.unexpected_keys:
                raise UserError(f"{backbone}: not a complete {arch} backbone (missing {res.missing_keys[:3]}, "
                                f"unexpected {res.unexpected_keys[:3]})")
            desc.update(arch=arch, init="pretrained", sidecar=side)
    dim = model.fc.in_features
    if not isinstance(model.fc, nn.Linear) or model.fc.out_features != 1:
        model.fc = nn.Linear(dim, 1)
    desc["feature_dim"] = dim
    return model, desc


def _batches(n: int, batch_size: int, gen=None, drop_single: bool = False):
    import torch
    idx = torch.randperm(n, generator=gen) if gen is not None else torch.arange(n)
    for a in range(0, n, batch_size):
        b = idx[a:a + batch_size]
        if drop_single and len(b) < 2 and n > 1:  # BatchNorm in train mode needs > 1 sample
            continue
        yield b


def _forward(net, images, idx, device):
    import torch
    x = torch.as_tensor(images[idx.numpy()]).unsqueeze(1).repeat(1, 3, 1, 1).to(device)
    return net(x).squeeze(1)


def _predict(net, images, batch_size, device) -> np.ndarray:
    import torch
    net.eval()
    out = []
    with torch.inference_mode():
        for b in _batches(len(images), batch_size):
            out.append(_forward(net, images, b, device).float().cpu())
    return torch.cat(out).numpy() if out else np.zeros(0)


# ------------------------------------------------------------------------------------ provenance
def same_data(train_dir: str, test_dir: str, n: int) -> bool:
    """Whether ``--test`` is the same data as ``--train`` for the first ``n`` samples: the same
    manifest, or shards with identical sha256s in the same order (e.g. the same --seed simulated
    into two folders). Then the test samples are taken after the train ones."""
    a, b = read_manifest(train_dir), read_manifest(test_dir)
    if sha256_file(Path(train_dir) / MANIFEST_NAME) == sha256_file(Path(test_dir) / MANIFEST_NAME):
        return True
    sa, sb = [s.get("sha256") for s in a["shards"]], [s.get("sha256") for s in b["shards"]]
    # enough leading shards identical to cover both sets: one data set in two folders
    covered, common = 0, 0
    for x, y, e in zip(sa, sb, a["shards"]):
        if x is None or x != y:
            break
        common += 1
        covered += int(e["num_samples"])
    return common > 0 and (common == min(len(sa), len(sb)) or covered >= n)


def shared_images(x_train: np.ndarray, x_test: np.ndarray) -> int:
    """Number of test images whose pixels are byte-identical to a training image."""
    import hashlib
    seen = {hashlib.sha256(np.ascontiguousarray(x).tobytes()).digest() for x in x_train}
    return sum(hashlib.sha256(np.ascontiguousarray(x).tobytes()).digest() in seen for x in x_test)


# ---------------------------------------------------------------------------------------- finetune
def finetune(backbone: str, train_dir: str, test_dir: str, target: str = "theta_E", n_train: int = 1000,
             n_test: int = 1000, epochs: int = 30, freeze_backbone: bool = False, batch_size: int = 64,
             lr: float | None = None, seed: int = 0, out_json: str | None = None, arch: str | None = None,
             val_fraction: float = 0.2, weight_decay: float = 1e-4, n_boot: int = 1000,
             progress: bool = True, task: str = "regress",
             verify: bool = False) -> dict:
    """Regress ``target`` (``task="regress"``) or find lenses (``task="classify"``, target is_lens) with a
    linear head on the backbone; return (and print) the test report. See finetune_tasks.py."""
    import torch

    from ..data.images import load_images
    from ..runtime import device_for, runtime
    from .tasks import make_task

    rt = runtime(command="finetune")   # one process: refuses `srun -n N` copies writing the same report
    task = make_task(task, target)
    for name, v, lo in (("--n-train", n_train, 5), ("--n-test", n_test, 2), ("--epochs", epochs, 1),
                        ("--batch-size", batch_size, 1)):
        if v is None or v < lo:
            raise UserError(f"{name}: must be >= {lo}, got {v}")
    if not 0 < val_fraction < 1:
        raise UserError(f"val_fraction must be in (0, 1), got {val_fraction}")
    if lr is not None and not (lr > 0 and np.isfinite(lr)):
        raise UserError(f"--lr: must be a finite number > 0, got {lr}")
    if seed < 0:
        raise UserError(f"--seed: must be >= 0, got {seed}")
    if out_json:
        check_output_file(out_json, "--json")
    t0 = time.perf_counter()
    img_size = None
    if backbone.lower() == "none" and (arch or "").startswith("vit"):   # a random-init ViT: the data's side
        img_size = (read_manifest(train_dir).get("image_shape") or [None])[-1]
    model, desc = build_model(backbone, arch, seed, img_size)  # bad backbone / arch fails before data loading

    # ---- data: train (-> train/val) and an independent test set, used once at the end
    same = same_data(train_dir, test_dir, n_train + n_test)
    if same:
        _, xs, ys = load_images(train_dir, n_train + n_test, what="--train/--test (one data set)", verify=verify)
        x_tr, y_tr, x_te, y_te = xs[:n_train], ys[:n_train], xs[n_train:], ys[n_train:]
    else:
        _, x_tr, y_tr = load_images(train_dir, n_train, what="--train", verify=verify)
        _, x_te, y_te = load_images(test_dir, n_test, what="--test", verify=verify)
    y_tr, y_te = task.labels(y_tr, f"--train {train_dir}"), task.labels(y_te, f"--test {test_dir}")
    shared = shared_images(x_tr, x_te)
    if shared:
        print(f"finetune: warning: {shared} of {len(x_te)} test images also appear in the training "
              f"samples ({train_dir}, {test_dir}): the test score is not independent (simulate the test "
              f"set with another --seed)", file=sys.stderr, flush=True)
    for name, x in (("--train", x_tr), ("--test", x_te)):
        if desc.get("img_size") and x.shape[-2:] != (desc["img_size"],) * 2:
            raise UserError(f"{name}: images are {x.shape[-2]}x{x.shape[-1]} px but the {desc['arch']} backbone "
                            f"takes {desc['img_size']}x{desc['img_size']} (a ViT at its training resolution)")
    n_val = max(1, int(round(val_fraction * n_train)))
    perm = np.random.default_rng(seed).permutation(n_train)
    va, tr = np.sort(perm[:n_val]), np.sort(perm[n_val:])
    if len(tr) < 2:
        raise UserError(f"--n-train {n_train}: too few for a validation split of {val_fraction:.0%}")
    x_va, y_va, x_tr, y_tr = x_tr[va], y_tr[va], x_tr[tr], y_tr[tr]
    task.fit(y_tr)

    device = device_for(rt)
    model = model.to(device)
    lr = lr if lr is not None else (1e-3 if freeze_backbone else 1e-4)
    gen = torch.Generator().manual_seed(seed)
    t_tr = torch.as_tensor(task.encode(y_tr), dtype=torch.float32, device=device)
    t_va = torch.as_tensor(task.encode(y_va), dtype=torch.float32, device=device)

    if freeze_backbone:  # features once, in eval mode; then only the head learns
        head = model.fc
        model.fc = torch.nn.Identity()
        f_tr, f_va, f_te = (torch.as_tensor(_predict(model, x, batch_size, device).reshape(len(x), -1))
                            for x in (x_tr, x_va, x_te))
        fm, fs = f_tr.mean(0), f_tr.std(0).clamp_min(1e-6)
        f_tr, f_va, f_te = ((f - fm) / fs for f in (f_tr, f_va, f_te))
        model.fc = head
        net = head
        params = head.parameters()

        def step_loss(idx):
            return task.loss(head(f_tr[idx].to(device)).squeeze(1), t_tr[idx])

        def val_loss():
            with torch.inference_mode():
                return float(task.loss(head(f_va.to(device)).squeeze(1), t_va))
    else:
        net = model
        params = model.parameters()

        def step_loss(idx):
            return task.loss(_forward(model, x_tr, idx, device), t_tr[idx.to(device)])

        def val_loss():
            p = torch.as_tensor(_predict(model, x_va, batch_size, device), device=device)
            return float(task.loss(p, t_va))

    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    steps_per_epoch = max(1, sum(1 for _ in _batches(len(x_tr), batch_size, None, not freeze_backbone)))
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs * steps_per_epoch)
    best = (float("inf"), 0, None)
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=epochs, unit="epoch", desc=f"finetune {target}", dynamic_ncols=True, file=sys.stderr)
    history = []
    for epoch in range(1, epochs + 1):
        net.train()
        if freeze_backbone:
            model.eval()
        losses = []
        for idx in _batches(len(x_tr), batch_size, gen, drop_single=not freeze_backbone):
            loss = step_loss(idx)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            losses.append(float(loss.detach()))
        v = val_loss()
        history.append({"epoch": epoch, "train_loss": float(np.mean(losses)), "val_loss": v})
        if v < best[0]:
            best = (v, epoch, copy.deepcopy(model.state_dict()))
        if bar:
            bar.update(1)
            bar.set_postfix(train=f"{np.mean(losses):.3f}", val=f"{v:.3f}", best_epoch=best[1])
    if bar:
        bar.close()
    model.load_state_dict(best[2])

    # ---- the test set, once
    if freeze_backbone:
        with torch.inference_mode():
            p_te = model.fc(f_te.to(device)).squeeze(1).cpu().numpy()
    else:
        p_te = _predict(model, x_te, batch_size, device)
    p_te = task.decode(p_te)
    metrics, summary = task.report(y_te, p_te, n_boot, seed, out_json)
    report = {
        "task": task.name, "target": target, "backbone": backbone, "arch": desc["arch"],
        "init": desc["init"], "freeze_backbone": bool(freeze_backbone), **metrics,
        "n_train": int(len(tr)), "n_val": int(n_val), "n_test": int(len(y_te)),
        "best_epoch": best[1], "best_val_loss": best[0], "epochs": epochs, "lr": lr,
        "batch_size": batch_size, "weight_decay": weight_decay, "seed": seed, "bootstrap": n_boot,
        "train_dir": str(Path(train_dir).resolve()), "test_dir": str(Path(test_dir).resolve()),
        "test_from_train_set": bool(same), "test_images_in_train": shared,
        "train_manifest_sha256": sha256_file(Path(train_dir) / MANIFEST_NAME),
        "test_manifest_sha256": sha256_file(Path(test_dir) / MANIFEST_NAME),
        "seconds": time.perf_counter() - t0,
        "history": history,
        "test_targets": [float(v) for v in y_te], "test_predictions": [float(v) for v in p_te],
    }
    if desc.get("sidecar"):
        report["pretraining"] = desc["sidecar"].get("training")
    if out_json:
        atomic_write_json(out_json, report)
    print(f"finetune: {summary}; {desc['arch']} {desc['init']}"
          f"{', frozen' if freeze_backbone else ''} ({backbone}), {len(tr)} train / {n_val} val / "
          f"{len(y_te)} test, best epoch {best[1]}/{epochs}, {report['seconds']:.0f} s"
          + (f"; report {out_json}" if out_json else ""), flush=True)
    return report
