"""Downstream regression of one lens parameter with few labels on an independent data set.

``hpc-lensiam finetune --backbone backbone.pt|none --train DIR --test DIR --target theta_E
--n-train 1000 --n-test 1000 [--epochs E] [--freeze-backbone]`` (paper: 1,000 / 1,000 images).

- Backbone: an ``hpc-lensiam export`` file, a stock library weights file of a registered arch (a
  torchvision ResNet's, its ``fc`` dropped), or ``none``: the stock library model at random init,
  the no-pretraining baseline (``--arch``, default resnet101). The arch is recognised from the
  weights (``BackboneSpec.matches``; the sidecar, if any, must agree), so a backbone added to the
  registry needs nothing here. A ``Linear(feature_dim, 1)`` head ``fc`` goes on top.
- Input, the export contract: each image divided by its max (as stored), repeated on the library
  model's input channels (3 for a torchvision ResNet, 1 for a timm ViT at its training size).
- The first ``n_train`` samples of ``--train`` (manifest order) are split ``1 - val_fraction`` /
  ``val_fraction`` with the seed; the epoch with the lowest validation loss is kept. The first
  ``n_test`` samples of ``--test`` are used once, for the final report only. If ``--test`` is the
  same data set as ``--train``, the test samples are the ``n_test`` after the first ``n_train``.
- Targets standardised with the train split's mean/std; AdamW, cosine schedule; MSE loss. With
  ``--freeze-backbone`` the backbone runs once in eval mode and only the linear head is trained.
- ``--task classify --target is_lens`` (survey-family sets): the lens-finding task, logistic head and
  BCE, reporting ROC AUC and TPR at FPR 1e-2 / 1e-3 with bootstrap intervals and the ROC curve
  (tasks.py, evaluation/classify.py); the rest of this page holds for both tasks.
- Report: test R^2 with a bootstrap 95% interval (1000 resamples, seeded), residual sigma and RMSE
  in the target's units; one line on stdout and, with ``--json``, a JSON file (atomic) that also
  keeps the test targets and predictions, so two backbones can be compared pairwise
  (``hpc-lensiam compare``; the statistics live in :mod:`hpc_lensiam.evaluation.stats`). ``--seeds 0,1,2``
  runs the recipe once per seed (:mod:`hpc_lensiam.downstream.seeds`).
"""

from __future__ import annotations

import copy
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..core.config import from_flags
from ..core.errors import UserError
from ..core.io import atomic_write_json, check_output_file, sha256_file
from ..shards.manifest import MANIFEST_NAME, data_grid, read_manifest
from ..shards.reader import load_images
from .config import FinetuneConfig
from .model_file import check_model_path, with_linear_head
from .model_file import save_model as save_model_file
from .tasks import make_task

DEFAULT_ARCH = "resnet101"


# ---------------------------------------------------------------------------------------- model
def build_model(backbone: str, arch: str | None, seed: int, img_size: int | None = None):
    """(library backbone with a ``Linear(D, 1)`` head ``fc``, description dict).

    The arch comes from the weights (:func:`hpc_lensiam.models.backbones.recognise`), checked against
    ``--arch`` and the export sidecar; the weights go into the stock library model through the
    backbone's export contract (``BackboneSpec.export``, a no-op on an export). ``img_size``: the
    data's image side, used only to build a random-init backbone that needs it (a ViT).
    """
    import torch

    from ..models.backbones import BACKBONES, recognise
    from ..models.weights import read_backbone_file, read_sidecar

    if arch is not None and arch not in BACKBONES:
        raise UserError(f"--arch: {arch!r} is not one of {', '.join(BACKBONES)}")
    torch.manual_seed(seed)
    desc = {"backbone": backbone}
    if backbone.lower() == "none":
        spec = BACKBONES[arch or DEFAULT_ARCH]
        try:
            features, in_chans = spec.library(img_size)
        except ValueError as exc:
            raise UserError(f"--arch: {exc}") from None
        desc.update(arch=spec.name, init="random (no pretraining)")
    else:
        state = read_backbone_file(backbone)
        side = read_sidecar(backbone)
        spec = recognise(state)
        if spec is None:
            raise UserError(f"{backbone}: weights match no known backbone (expected one of: {', '.join(BACKBONES)})")
        if side and side.get("arch") and side["arch"] != spec.name:
            raise UserError(f"{backbone}: sidecar says arch {side['arch']!r} but the weights are a {spec.name}")
        if arch and arch != spec.name:
            raise UserError(f"{backbone}: backbone of the wrong arch: {spec.name}, --arch asked for {arch}")
        state = {k: v for k, v in state.items() if not k.startswith(f"{spec.head}.")}
        try:
            ex = spec.export(state, spec.img_size_of(state))
        except (RuntimeError, ValueError) as exc:
            raise UserError(f"{backbone}: weights do not fit {spec.name} ({str(exc).splitlines()[0]})") from None
        features, in_chans = ex.model.train(), ex.in_chans
        desc.update(arch=spec.name, init="pretrained", sidecar=side)
    side_px = spec.img_size_of(features.state_dict())  # the image side the backbone is bound to (a ViT's)
    if side_px:
        desc["img_size"] = side_px
    desc["feature_dim"], desc["in_chans"] = spec.feature_dim, in_chans
    return with_linear_head(features, in_chans, spec.feature_dim), desc


def _batches(n: int, batch_size: int, gen=None, drop_single: bool = False):
    import torch

    idx = torch.randperm(n, generator=gen) if gen is not None else torch.arange(n)
    for a in range(0, n, batch_size):
        b = idx[a : a + batch_size]
        if drop_single and len(b) < 2 and n > 1:  # BatchNorm in train mode needs > 1 sample
            continue
        yield b


def _images(inputs) -> bool:
    """Whether ``inputs`` are images (N, H, W) for the whole network, not frozen features (N, D) for the head."""
    return inputs.ndim == 3


def _forward(net, inputs, idx, device):
    """``net``'s output (B,) for samples ``idx``; images go in as ``(B, 1, H, W)``."""
    import torch

    x = torch.as_tensor(inputs[idx.numpy()])
    if _images(x):
        x = x.unsqueeze(1)
    return net(x.to(device)).squeeze(1)


def predict(net, inputs, batch_size: int, device) -> np.ndarray:
    """``net``'s outputs (N,) float32 in eval mode, in input order."""
    import torch

    net.eval()
    out = []
    with torch.inference_mode():
        for b in _batches(len(inputs), batch_size):
            out.append(_forward(net, inputs, b, device).float().cpu())
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


# ------------------------------------------------------------------------------------- the steps
def check_args(
    backbone: str,
    train_dir: str,
    test_dir: str,
    out_json: str | None = None,
    save_model: str | None = None,
    **kw,
) -> FinetuneConfig:
    """The Python API's arguments as a :class:`FinetuneConfig` (its checks, written once, name the flags),
    and the report and model paths, before a backbone or an image is read."""
    paths = dict(backbone=backbone, train=train_dir, test=test_dir, json=out_json, save_model=save_model)
    cfg = from_flags(FinetuneConfig, {**{k: None if v is None else str(v) for k, v in paths.items()}, **kw})
    if out_json:
        check_output_file(out_json, "--json")
    if save_model:
        check_model_path(save_model)
    return cfg


@dataclass
class Split:
    """One run's images (N, H, W) float32 and raw labels: train / validation / test."""

    x_tr: np.ndarray
    y_tr: np.ndarray
    x_va: np.ndarray
    y_va: np.ndarray
    x_te: np.ndarray
    y_te: np.ndarray
    test_from_train_set: bool  # --test is --train's data: the test samples follow the train ones
    shared: int  # test images byte-identical to a training image (warned about)


def load_split(
    train_dir: str,
    test_dir: str,
    n_train: int,
    n_test: int,
    val_fraction: float,
    seed: int,
    task,
    desc: dict,
    verify: bool = False,
) -> Split:
    """The first ``n_train`` samples of ``--train`` split train/val with ``seed``, and ``n_test`` test samples.

    The test set is independent of the training samples by construction when ``--test`` is the same data as
    ``--train`` (taken after them); otherwise byte-identical images are counted and warned about, because
    the test score would then not be independent. A ViT backbone takes only its training image size.
    """
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
        print(
            f"finetune: warning: {shared} of {len(x_te)} test images also appear in the training "
            f"samples ({train_dir}, {test_dir}): the test score is not independent (simulate the test "
            f"set with another --seed)",
            file=sys.stderr,
            flush=True,
        )
    for name, x in (("--train", x_tr), ("--test", x_te)):
        if desc.get("img_size") and x.shape[-2:] != (desc["img_size"],) * 2:
            raise UserError(
                f"{name}: images are {x.shape[-2]}x{x.shape[-1]} px but the {desc['arch']} backbone "
                f"takes {desc['img_size']}x{desc['img_size']} (a ViT at its training resolution)"
            )
    n_val = max(1, int(round(val_fraction * n_train)))
    perm = np.random.default_rng(seed).permutation(n_train)
    va, tr = np.sort(perm[:n_val]), np.sort(perm[n_val:])
    if len(tr) < 2:
        raise UserError(f"--n-train {n_train}: too few for a validation split of {val_fraction:.0%}")
    return Split(x_tr[tr], y_tr[tr], x_tr[va], y_tr[va], x_te, y_te, same, shared)


def frozen_features(model, split: Split, batch_size: int, device):
    """(train, val, test) backbone features, computed once in eval mode and standardised with the train
    split's mean/sd: with ``--freeze-backbone`` only the head learns, so the backbone never runs again."""
    import torch

    head = model.fc
    model.fc = torch.nn.Identity()
    feats = [
        torch.as_tensor(predict(model, x, batch_size, device).reshape(len(x), -1))
        for x in (split.x_tr, split.x_va, split.x_te)
    ]
    model.fc = head
    mean, sd = feats[0].mean(0), feats[0].std(0).clamp_min(1e-6)
    return tuple((f - mean) / sd for f in feats)


def train_one_epoch(net, inputs, targets, task, opt, sched, batch_size: int, gen, device) -> float:
    """One pass over the training inputs in the seeded order; returns the mean batch loss.

    ``inputs``: images (N, H, W) through the whole network, or frozen features (N, D) through the head.
    A last batch of one image is skipped: BatchNorm in train mode needs two samples.
    """
    net.train()
    losses = []
    for idx in _batches(len(inputs), batch_size, gen, drop_single=_images(inputs)):
        loss = task.loss(_forward(net, inputs, idx, device), targets[idx.to(device)])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
    return float(np.mean(losses))


def evaluate(net, inputs, targets, task, batch_size: int, device) -> float:
    """The task's loss on held-out inputs (the validation split: model selection)."""
    import torch

    return float(task.loss(torch.as_tensor(predict(net, inputs, batch_size, device), device=device), targets))


def build_report(
    task,
    backbone: str,
    desc: dict,
    freeze_backbone: bool,
    metrics: dict,
    split: Split,
    p_te: np.ndarray,
    best: tuple,
    history: list,
    recipe: dict,
    train_dir: str,
    test_dir: str,
    seconds: float,
) -> dict:
    """The run's JSON report: metrics, the recipe, provenance (manifest hashes, the backbone's pretraining)
    and the test targets and predictions that ``compare`` pairs across backbones."""
    report = {
        "task": task.name,
        "target": task.target,
        "backbone": backbone,
        "arch": desc["arch"],
        "init": desc["init"],
        "freeze_backbone": bool(freeze_backbone),
        **metrics,
        "n_train": len(split.y_tr),
        "n_val": len(split.y_va),
        "n_test": len(split.y_te),
        "best_epoch": best[1],
        "best_val_loss": best[0],
        **recipe,
        "train_dir": str(Path(train_dir).resolve()),
        "test_dir": str(Path(test_dir).resolve()),
        "test_from_train_set": bool(split.test_from_train_set),
        "test_images_in_train": split.shared,
        "train_manifest_sha256": sha256_file(Path(train_dir) / MANIFEST_NAME),
        "test_manifest_sha256": sha256_file(Path(test_dir) / MANIFEST_NAME),
        "seconds": seconds,
        "history": history,
        "test_targets": [float(v) for v in split.y_te],
        "test_predictions": [float(v) for v in p_te],
    }
    if desc.get("sidecar"):
        report["pretraining"] = desc["sidecar"].get("training")
    return report


# ---------------------------------------------------------------------------------------- finetune
def finetune(
    backbone: str,
    train_dir: str,
    test_dir: str,
    target: str = "theta_E",
    n_train: int = 1000,
    n_test: int = 1000,
    epochs: int = 30,
    freeze_backbone: bool = False,
    batch_size: int = 64,
    lr: float | None = None,
    seed: int = 0,
    out_json: str | None = None,
    arch: str | None = None,
    val_fraction: float = 0.2,
    weight_decay: float = 1e-4,
    n_boot: int = 1000,
    progress: bool = True,
    task: str = "regress",
    verify: bool = False,
    save_model: str | None = None,
) -> dict:
    """Regress ``target`` (``task="regress"``) or find lenses (``task="classify"``, target is_lens) with a
    linear head on the backbone; return (and print) the test report. The tasks are in :mod:`.tasks`."""
    import torch

    from ..core.runtime import device_for, runtime

    rt = runtime(command="finetune")  # one process: refuses `srun -n N` copies writing the same report
    check_args(  # every flag's check, before a backbone or an image is read
        backbone, train_dir, test_dir, out_json, save_model, task=task, target=target, n_train=n_train,
        n_test=n_test, epochs=epochs, batch_size=batch_size, lr=lr, seed=seed, arch=arch,
        val_fraction=val_fraction, weight_decay=weight_decay, n_boot=n_boot,
    )  # fmt: skip
    task = make_task(task, target)
    t0 = time.perf_counter()
    img_size = None
    if backbone.lower() == "none":  # a random-init backbone bound to an image side (a ViT) takes the data's
        img_size = (read_manifest(train_dir).get("image_shape") or [None])[-1]
    model, desc = build_model(backbone, arch, seed, img_size)  # bad backbone / arch fails before data loading
    split = load_split(train_dir, test_dir, n_train, n_test, val_fraction, seed, task, desc, verify)
    task.fit(split.y_tr)

    device = device_for(rt)
    model = model.to(device)
    lr = lr if lr is not None else (1e-3 if freeze_backbone else 1e-4)
    gen = torch.Generator().manual_seed(seed)
    t_tr, t_va = (torch.as_tensor(task.encode(y), dtype=torch.float32, device=device) for y in (split.y_tr, split.y_va))
    if freeze_backbone:  # the head learns on features computed once
        net, (in_tr, in_va, in_te) = model.fc, frozen_features(model, split, batch_size, device)
    else:
        net, (in_tr, in_va, in_te) = model, (split.x_tr, split.x_va, split.x_te)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=weight_decay)
    steps_per_epoch = max(1, sum(1 for _ in _batches(len(in_tr), batch_size, None, _images(in_tr))))
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs * steps_per_epoch)

    best, history = (float("inf"), 0, None), []  # (val loss, epoch, model state): the lowest val loss wins
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=epochs, unit="epoch", desc=f"finetune {target}", dynamic_ncols=True, file=sys.stderr)
    for epoch in range(1, epochs + 1):
        train_loss = train_one_epoch(net, in_tr, t_tr, task, opt, sched, batch_size, gen, device)
        val_loss = evaluate(net, in_va, t_va, task, batch_size, device)
        history.append({"epoch": epoch, "train_loss": train_loss, "val_loss": val_loss})
        if val_loss < best[0]:
            best = (val_loss, epoch, copy.deepcopy(model.state_dict()))
        if bar:
            bar.update(1)
            bar.set_postfix(train=f"{train_loss:.3f}", val=f"{val_loss:.3f}", best_epoch=best[1])
    if bar:
        bar.close()
    model.load_state_dict(best[2])

    p_te = task.decode(predict(net, in_te, batch_size, device))  # the test set, once
    metrics, summary = task.report(split.y_te, p_te, n_boot, seed, out_json)
    recipe = {
        "epochs": epochs,
        "lr": lr,
        "batch_size": batch_size,
        "weight_decay": weight_decay,
        "seed": seed,
        "bootstrap": n_boot,
    }
    report = build_report(
        task,
        backbone,
        desc,
        freeze_backbone,
        metrics,
        split,
        p_te,
        best,
        history,
        recipe,
        train_dir,
        test_dir,
        time.perf_counter() - t0,
    )
    if save_model:
        val_resid = task.decode(predict(net, in_va, batch_size, device)) - split.y_va
        meta = model_meta(task, desc, recipe, report, train_dir, float(np.std(val_resid, ddof=1)))
        save_model_file(save_model, model, meta)
        report["model_file"] = str(save_model)
    if out_json:
        atomic_write_json(out_json, report)
    print(
        f"finetune: {summary}; {desc['arch']} {desc['init']}"
        f"{', frozen' if freeze_backbone else ''} ({backbone}), {len(split.y_tr)} train / {len(split.y_va)} val / "
        f"{len(split.y_te)} test, best epoch {best[1]}/{epochs}, {report['seconds']:.0f} s"
        + (f"; report {out_json}" if out_json else "")
        + (f"; model {save_model}" if save_model else ""),
        flush=True,
    )
    return report


def model_meta(task, desc: dict, recipe: dict, report: dict, train_dir: str, val_residual_sigma: float) -> dict:
    """What a saved model carries besides its weights (:mod:`.model_file`)."""
    from ..shards.manifest import UNITS

    metrics = {k: report[k] for k in ("r2", "r2_ci95", "residual_sigma", "bias", "auc", "auc_ci95") if k in report}
    return {
        "task": task.name,
        "target": task.target,
        "task_state": task.state(),
        "unit": UNITS.get(task.target, ""),
        "arch": desc["arch"],
        "in_chans": desc["in_chans"],
        "feature_dim": desc["feature_dim"],
        "img_size": desc.get("img_size"),
        "input": {**data_grid(train_dir), "normalisation": "each image divided by its maximum (as stored)"},
        "val_residual_sigma": val_residual_sigma if task.name == "regress" else None,
        "recipe": recipe,
        "backbone": report["backbone"],
        "init": report["init"],
        "freeze_backbone": report["freeze_backbone"],
        "pretraining": report.get("pretraining"),
        "best_epoch": report["best_epoch"],
        "train_manifest_sha256": report["train_manifest_sha256"],
        "test_manifest_sha256": report["test_manifest_sha256"],
        "test_metrics": metrics,
    }
