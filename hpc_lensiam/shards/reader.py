"""The one sample reader of a shard set: streaming (:func:`raw_samples`), by
index (:func:`load_images`, the first ``n`` in manifest order), by key (:class:`SamplesByKey`).

Every byte comes through the package's tar reader (:mod:`hpc_lensiam.shards.tar`) via
:func:`~hpc_lensiam.shards.integrity.shard_samples`, which also holds each shard to its manifest sample
count, and every image through the one npy decoder (:mod:`hpc_lensiam.shards.manifest`) and the
finite-pixel check (:func:`~hpc_lensiam.shards.integrity.decode_member`), so a
damaged shard reads the same way (an error naming it) wherever it is read: the training loader, the
images of embed, finetune and the monitor, ``show`` and ``similar``. No torch here: ``finetune`` and
the training monitor load their few thousand images as numpy arrays, and ``embed`` batches the same
rows (:func:`image_rows`) through a webdataset pipeline.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from ..core.errors import UserError
from .integrity import IntegrityError, check_shards, decode_member, shard_samples
from .manifest import LENS_PARAMS, read_manifest, shard_of_key, shard_paths
from .tar import read_shard


def raw_samples(data_dir: str | os.PathLike, manifest: dict):
    """The raw samples of every shard of ``data_dir`` in manifest order, each shard held to its count."""
    for path, entry in zip(shard_paths(data_dir, manifest), manifest["shards"]):
        yield from shard_samples(path, int(entry["num_samples"]))


def iter_samples(data_dir: str | os.PathLike):
    """Decoded samples of a shard folder in manifest order: dicts of arrays + ``params``.

    Shards are checked against the manifest (size, end-of-archive, sample count) and pixels must be
    finite, as for training: a picture of damaged data is an error, not a plausible image."""
    manifest = check_shards(data_dir)
    for path, entry in zip(shard_paths(data_dir, manifest), manifest["shards"]):
        for raw in shard_samples(path, int(entry["num_samples"])):  # = raw_samples, naming the path
            try:
                params = json.loads(raw["params.json"])
            except (KeyError, ValueError) as exc:  # a flipped byte: not JSON, or not UTF-8
                raise IntegrityError(
                    f"shard {path} sample {raw['__key__']!r}: params.json is not readable JSON "
                    f"({type(exc).__name__}: {exc}); `hpc-lensiam verify {data_dir}` checks every shard"
                ) from None
            sample = {"key": raw["__key__"], "params": params}
            for name in ("view1", "view2", "image"):
                if f"{name}.npy" in raw:
                    sample[name] = decode_member(raw[f"{name}.npy"], path, raw["__key__"], f"{name}.npy")
            yield sample


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
    yield from image_rows(manifest["mode"], with_params)(raw_samples(data_dir, manifest))


class SamplesByKey:
    """Raw samples read back by (folder, key), one shard held at a time (``similar``, ``umap``'s pictures).

    The simulator's keys ``AAAAAA_BBBBBB`` live in ``shard-AAAAAA.tar``
    (:func:`~hpc_lensiam.shards.manifest.shard_of_key`); any other key (an ingested object's name), or
    one not there, is looked up in the folder's index of shards (their member names, read once). A
    shard the folder's manifest lists is checked against its entry (size, then its sample count)
    before it is used, as every other reader does.
    """

    def __init__(self):
        self._cache: dict[str, dict] = {}
        self._where: dict[str, dict[str, str]] = {}  # folder -> {key: shard}, for keys that are names

    def get(self, data_dir: str, key: str) -> dict:
        shard = str(Path(data_dir) / shard_of_key(key))
        sample = self._load(shard, key, data_dir) if Path(shard).is_file() else None
        if sample is None:
            shard = self._index(data_dir).get(key, shard)
            sample = self._load(shard, key, data_dir)
        if sample is None:
            raise UserError(f"{shard}: no sample {key}")
        return sample

    def _index(self, data_dir: str) -> dict[str, str]:
        """{key: shard} of a folder, from its shards' member names (read once)."""
        import tarfile

        if data_dir not in self._where:
            index: dict[str, str] = {}
            for shard in sorted(Path(data_dir).glob("shard-*.tar")):
                with tarfile.open(shard) as t:
                    for n in t.getnames():
                        index.setdefault(n.rsplit("/", 1)[-1].split(".", 1)[0], str(shard))
            self._where[data_dir] = index
        return self._where[data_dir]

    def _load(self, shard: str, key: str, data_dir: str) -> dict | None:
        if shard not in self._cache:
            if not Path(shard).is_file():
                raise UserError(f"{shard}: missing (needed for sample {key}; the embeddings name {data_dir})")
            self._cache = {shard: {s["__key__"]: s for s in self._read(data_dir, shard)}}  # keep one shard
        return self._cache[shard].get(key)

    @staticmethod
    def _read(data_dir: str, shard: str):
        try:
            manifest = read_manifest(data_dir)
        except UserError:  # no manifest to hold the shard to: read it as it is
            return read_shard(shard)
        names = [e["name"] for e in manifest["shards"]]
        name = Path(shard).name
        if name not in names:
            return read_shard(shard)
        i = names.index(name)
        check_shards(data_dir, manifest, only=[i])
        return shard_samples(shard, int(manifest["shards"][i]["num_samples"]))
