"""Atomic file writes, hashing and output-file checks: the file-system floor under every stage."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .errors import UserError

TMP_PREFIX = ".tmp-"
FULL_DISK_BYTES = 1 << 20  # free space under which a failed torch.save is taken for a full disk


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only if the block succeeds.

    Readers never see a half-written file, and a crash leaves only a ``.tmp-*`` file behind.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX + path.name + ".", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, 0o644)
        os.replace(tmp_path, path)
    except OSError as exc:
        tmp_path.unlink(missing_ok=True)
        if exc.filename is None:  # a failed write() names no file: name the one being written
            raise OSError(exc.errno, exc.strerror, str(path)) from None
        raise
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb"):
    """``open()`` for writing, atomically (see :func:`atomic_path`)."""
    with atomic_path(path) as tmp:
        with open(tmp, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_open(path, "wb") as f:
        f.write(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_json(obj: Any) -> str:
    """Stable hash of a JSON-able object (sorted keys), e.g. a resolved config."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def check_output_file(path: str | os.PathLike, flag: str) -> Path:
    """Before any compute: ``path`` can be written (its folder exists or can be made, is writable,
    and ``path`` is not a folder). A UserError naming the flag and path otherwise."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{flag} {path}: is a folder (expected a file name)")
    parent = path.parent
    while not parent.exists() and parent != parent.parent:  # the nearest folder that exists
        parent = parent.parent
    if not parent.is_dir():
        raise UserError(f"{flag} {path}: {parent} exists and is not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):  # also False on a read-only file system, for root
        raise UserError(f"{flag} {path}: {parent} is not writable")
    return path


_TORCH_MAGIC = (b"PK\x03\x04", b"\x80")  # zip (torch.save since 1.6) or a legacy pickle


def check_torch_file(path: str | os.PathLike) -> None:
    """A file that cannot be a ``torch.save`` output is named as such before ``torch.load`` sees it
    (whose own error advises ``weights_only=False``, i.e. running the file's code)."""
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError as exc:
        raise UserError(f"{path}: cannot read checkpoint ({exc.strerror})") from None
    if not head.startswith(_TORCH_MAGIC):
        raise UserError(
            f"{path}: cannot read checkpoint: not a PyTorch checkpoint (it starts with {head!r}; "
            f"expected a file written by torch.save)"
        )
