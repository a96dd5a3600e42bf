"""Shard integrity: every consumer checks a data set against its manifest before using it.

Why: a shard can be truncated (a full disk, a killed copy), bit-flipped (bad media, a faulty
transfer) or replaced (two jobs writing one folder). The manifest records each shard's size,
sample count and sha256 when it is written; the checks here compare a shard with that record.

* :func:`check_shards` -- cheap, always: every listed shard exists and has the recorded size;
  with ``verify`` also its sha256 (reads every byte). All bad shards are named in one error.
* :func:`shard_samples` -- the samples of one shard, requiring the tar's end-of-archive blocks
  and exactly the manifest's sample count, so a shard cut at a member boundary is an error.
* :func:`verify_dataset` -- ``hpc-lensiam verify DIR``: size, tar structure, sample count and
  sha256 of every shard, one line per bad shard.
* :func:`check_finite` -- a non-finite pixel is an error naming the file and the sample key,
  when a shard is written and when it is read.
"""

from __future__ import annotations

import os
import sys
import tarfile
from pathlib import Path

import numpy as np

from ..core.errors import UserError
from ..core.io import sha256_file
from .manifest import MANIFEST_NAME, decode_npy, read_manifest, shard_paths
from .tar import read_shard, tar_members


class IntegrityError(UserError):
    """A shard that does not match its manifest record, or holds non-finite pixels."""


def shard_problem(path: str | os.PathLike, entry: dict, verify: bool = False) -> str | None:
    """What is wrong with one shard against its manifest ``entry`` (None: nothing found).

    Without ``verify`` only existence and size are checked (one ``stat``); with it the sha256 too.
    Manifests written before sizes were recorded skip the size check.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return "missing"
    except OSError as exc:
        return f"unreadable ({exc.strerror})"
    want = entry.get("size")
    if want is not None and size != int(want):
        return f"size {size} bytes, the manifest says {want} (truncated or replaced)"
    if verify and entry.get("sha256"):
        try:
            sha = sha256_file(path)
        except OSError as exc:
            return f"unreadable ({exc.strerror})"
        if sha != entry["sha256"]:
            return f"sha256 {sha[:12]}... differs from the manifest's {entry['sha256'][:12]}... (corrupted)"
    return None


def check_shards(
    data_dir: str | os.PathLike, manifest: dict | None = None, verify: bool = False, only: list[int] | None = None
) -> dict:
    """Check the shards of ``data_dir`` (or those at indices ``only``); raise naming every bad one.

    Returns the manifest. ``verify`` adds the sha256 of each shard (reads all the data).
    """
    manifest = manifest or read_manifest(data_dir)
    paths = shard_paths(data_dir, manifest)
    indices = range(len(paths)) if only is None else only
    bad = []
    for i in indices:
        problem = shard_problem(paths[i], manifest["shards"][i], verify)
        if problem:
            bad.append(f"{paths[i]}: {problem}")
    if bad:
        more = (
            f" (and {len(bad) - 1} more: {'; '.join(bad[1:4])}{'; ...' if len(bad) > 4 else ''})"
            if len(bad) > 1
            else ""
        )
        raise IntegrityError(
            f"shard {bad[0]}{more}; `hpc-lensiam verify {data_dir}` lists them all, "
            f"re-running the same `simulate` command redoes them"
        )
    return manifest


def count_samples(path: str | os.PathLike) -> int:
    """Samples (distinct keys) in a tar shard, walking the headers with seeks (no data read).

    Raises ValueError/EOFError for a malformed tar or a missing end-of-archive block.
    """
    keys, last = 0, None
    with open(path, "rb") as f:
        for name, _ in tar_members(f, skip_data=True):
            base = name.rsplit("/", 1)[-1]
            key = name[: len(name) - len(base)] + base.split(".", 1)[0]
            if key != last:
                keys, last = keys + 1, key
    return keys


def verify_dataset(data_dir: str | os.PathLike, progress: bool = True) -> list[str]:
    """Check every shard of ``data_dir`` in full; print and return one line per bad shard."""
    manifest = read_manifest(data_dir)
    paths = shard_paths(data_dir, manifest)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(paths), unit="shard", desc="verify", dynamic_ncols=True, file=sys.stderr, disable=None)
    bad = []
    for path, entry in zip(paths, manifest["shards"]):
        problem = shard_problem(path, entry, verify=True)
        if problem is None:
            try:
                n = count_samples(path)
                if n != int(entry["num_samples"]):
                    problem = f"holds {n} samples, the manifest says {entry['num_samples']}"
            except (ValueError, EOFError, UnicodeDecodeError) as exc:
                problem = f"not a complete tar ({exc})"
        if problem:
            bad.append(f"{path}: {problem}")
            print(f"verify: bad shard {path}: {problem}", file=sys.stderr, flush=True)
        if bar:
            bar.update(1)
    if bar:
        bar.close()
    n = int(manifest["num_samples"])
    print(
        f"verify: {len(paths) - len(bad)} of {len(paths)} shards good ({n} samples listed in "
        f"{Path(data_dir) / MANIFEST_NAME}); {len(bad)} bad",
        flush=True,
    )
    return bad


def _verify_hint(path) -> str:
    return f"`hpc-lensiam verify {Path(path).parent}` checks every shard"


def shard_samples(path: str, expected: int | None):
    """The raw samples of one shard (``loader.read_shard``), then an error if their count is not
    ``expected``: a shard cut cleanly between two samples reads without error otherwise.

    A damaged tar (a bad header checksum, a cut member, bytes flipped in a header) is an
    IntegrityError naming the shard and the last sample read whole, not a bare ValueError."""
    n, key = 0, None
    try:
        for sample in read_shard(path):
            n, key = n + 1, sample.get("__key__")
            yield sample
    except (ValueError, EOFError, KeyError, tarfile.TarError) as exc:  # UnicodeDecodeError is a ValueError
        reading = getattr(exc, "sample_key", None)  # the sample being assembled (tar.py), else the last one read
        where = (
            f"in or just after sample {reading!r}"
            if reading is not None
            else (f"after sample {key!r}" if key is not None else "at its first sample")
        )
        raise IntegrityError(
            f"shard {path}: cannot read the tar {where} ({type(exc).__name__}: {' '.join(str(exc).split())}); "
            f"{_verify_hint(path)}"
        ) from None
    if expected is not None and n != expected:
        raise IntegrityError(f"shard {path}: holds {n} samples, the manifest says {expected} (truncated?)")


def decode_member(data: bytes, path, key: str, member: str) -> np.ndarray:
    """One ``.npy`` member of a shard's sample -> its finite array; bytes that are not an npy array
    (a flipped byte in its header) are an IntegrityError naming the shard, sample and member."""
    try:
        array = decode_npy(data)
    except Exception as exc:  # numpy's ValueError, or a pickled-object refusal, on damaged bytes
        raise IntegrityError(
            f"shard {path} sample {key!r}: {member} is not a readable npy array "
            f"({type(exc).__name__}: {' '.join(str(exc).split())[:200]}); {_verify_hint(path)}"
        ) from None
    return check_finite(array, path, key, member)


def check_finite(array: np.ndarray, path, key: str, member: str) -> np.ndarray:
    """``array`` unchanged, or an IntegrityError naming the shard, sample and member."""
    if not np.isfinite(array).all():
        bad = int(array.size - np.isfinite(array).sum())
        raise IntegrityError(f"shard {path} sample {key!r}: {bad} non-finite pixel(s) in {member} (NaN/inf)")
    return array
