"""Images and their labels out of a shard set: the one image reader of embed, finetune and the monitor.

Every byte comes through the package's tar reader (``data/tar.py``, via :func:`integrity.shard_samples`,
which also holds each shard to its manifest sample count), so a damaged shard reads the same way (an
error naming it) wherever it is read. No torch here: ``finetune`` and the training monitor load their
few thousand images as numpy arrays, and ``embed`` batches the same rows (:func:`image_rows`) through a
webdataset pipeline.
"""

from __future__ import annotations

import json
import os

import numpy as np

from ..errors import UserError
from ..integrity import check_shards, decode_member, shard_samples
from ..io import LENS_PARAMS, shard_paths

_VIEWS = {"lensiam": ("view1", "view2"), "single": ("image",)}
# what each image row carries: the 8 lens parameters, then is_lens (NaN where params.json has none)
LABELS = LENS_PARAMS + ("is_lens",)


def views_of(mode: str) -> tuple[str, ...]:
    """The image members of a sample in a ``mode`` shard set (the manifest's ``mode``)."""
    if mode not in _VIEWS:
        raise UserError(f"shard mode {mode!r} is not one of {', '.join(_VIEWS)}")
    return _VIEWS[mode]


def lens_vector(params_json: bytes, where: str) -> np.ndarray:
    """``params.json`` bytes -> the 8 lens parameters in ``LENS_PARAMS`` order, then is_lens (``LABELS``);
    NaN where unknown (an ingested real image has only the labels it was given, often none)."""
    try:
        params = json.loads(params_json)
        lens = params.get("lens") or {}
        is_lens = float(params["is_lens"]) if "is_lens" in params else float("nan")
        return np.array([float(lens.get(name, np.nan)) for name in LENS_PARAMS] + [is_lens], dtype=np.float64)
    except (ValueError, KeyError, AttributeError, TypeError) as exc:
        raise UserError(f"{where}: params.json lacks the lens parameters ({exc!r})") from None


def image_rows(mode: str, with_params: bool = False):
    """webdataset stage: raw samples -> one row per image (key, view, image, lens vector), and with
    ``with_params`` the sample's whole ``params.json`` dict last (what a catalogue row carries)."""
    names = views_of(mode)

    def expand(samples):
        for s in samples:
            where = f"{s.get('__url__', '?')}:{s['__key__']}"
            lens = lens_vector(s["params.json"], where)
            extra = (json.loads(s["params.json"]),) if with_params else ()
            for v, name in enumerate(names, start=1):
                if name + ".npy" not in s:
                    raise UserError(f"{where}: no {name}.npy in a {mode!r} shard")
                image = decode_member(s[name + ".npy"], s.get("__url__", "?"), s["__key__"], name + ".npy")
                yield (s["__key__"], v, image, lens, *extra)

    return expand


def load_images(
    data_dir: str | os.PathLike,
    n: int | None = None,
    what: str = "--data",
    verify: bool = False,
    with_params: bool = False,
):
    """First ``n`` samples of a shard set (manifest order), one process: (keys, images, labels), and
    with ``with_params`` a fourth item, each sample's ``params.json`` dict.

    ``labels`` is (n, 9): the 8 lens parameters and is_lens (``LABELS``; NaN where the set has none).

    Single shards give their image; lensiam shards their first view. ``n`` larger than the set
    is a UserError; so is a shard that fails its manifest check (sha256 too with ``verify``).
    """
    manifest = check_shards(data_dir, verify=verify)
    total = int(manifest["num_samples"])
    if n is not None and n > total:
        raise UserError(f"{what} {data_dir}: asked for {n} samples but it holds only {total}")
    n = total if n is None else n
    keys, images, lens, params = [], [], [], []
    for k, v, img, p, *extra in _iter_rows(data_dir, manifest, with_params):
        if v != 1:
            continue
        keys.append(k), images.append(img), lens.append(p), params.extend(extra)
        if len(keys) == n:
            break
    if len(keys) < n:
        raise UserError(f"{what} {data_dir}: the shards hold {len(keys)} samples, the manifest says {total}")
    out = (keys, np.stack(images).astype(np.float32), np.stack(lens))
    return (*out, params) if with_params else out


def _iter_rows(data_dir, manifest, with_params: bool = False):
    samples = (
        s
        for p, e in zip(shard_paths(data_dir, manifest), manifest["shards"])
        for s in shard_samples(p, int(e["num_samples"]))
    )
    yield from image_rows(manifest["mode"], with_params)(samples)
