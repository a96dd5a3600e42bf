"""Exclusive ownership of an output folder: ``fcntl.flock`` on ``DIR/.lock``, held for the run.

Why: two ``simulate`` jobs (or two ``train`` runs) writing one folder interleave their files and
both exit 0 (a mixed data set, overwritten checkpoints). The lock is taken before anything is
written; a second job fails at once naming the holder's host and pid. The kernel releases a
``flock`` when the holder dies, however it dies (``kill -9`` included), so a stale ``.lock`` file
never blocks a rerun. On a cluster file system ``flock`` must be coherent across nodes (Lustre
mounted with ``-o flock``, GPFS, NFSv4); with ``localflock`` it only excludes jobs on one node.

A ``flock`` belongs to the open file description, which a forked child shares: DataLoader workers
(forked by the trainer) kept the lock for the ~5 s they take to notice their trainer's ``kill -9``,
and a rerun was refused naming a dead pid. So every forked child closes its copy of a held lock's
descriptor at once (``os.register_at_fork``); closing one copy leaves the holder's lock in place.
(An exec'd child never inherits it: the descriptor is close-on-exec. POSIX ``lockf`` locks are per
process and not inherited, but a process drops them on closing *any* descriptor of the file, and they
never conflict within one process; OFD locks belong to the shared description, like ``flock``.)
"""

from __future__ import annotations

import fcntl
import os
import socket
import time
from pathlib import Path

from .errors import UserError

LOCK_NAME = ".lock"
_HELD: set[DirLock] = set()  # the locks this process holds (a dropped DirLock keeps its descriptor open)


def _forget_in_child() -> None:
    """In a forked child: close the inherited lock descriptors (the parent keeps its lock)."""
    for lock in list(_HELD):
        if lock.fd is not None:
            try:
                os.close(lock.fd)
            except OSError:
                pass
            lock.fd = None
    _HELD.clear()


def prepare_dir(path: str | os.PathLike, flag: str = "--out") -> Path:
    """Create the output folder ``path`` (and parents) or raise a one-line UserError naming it."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UserError(f"{flag} {path}: exists and is not a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"{flag} {path}: cannot create the folder ({exc.strerror})") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise UserError(f"{flag} {path}: folder is not writable")
    return path


class DirLock:
    """``with DirLock(out, "simulate"):`` -- or ``acquire()`` / ``release()`` around a run."""

    def __init__(self, directory: str | os.PathLike, what: str):
        self.dir, self.what = Path(directory), what
        self.path = self.dir / LOCK_NAME
        self.fd: int | None = None

    def holder(self) -> str:
        try:
            return self.path.read_text().strip() or "a process that is starting"
        except OSError:
            return "unknown"

    def acquire(self) -> DirLock:
        prepare_dir(self.dir)
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise UserError(f"{self.path}: cannot create the lock file ({exc.strerror})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise UserError(
                f"{self.dir}: in use by another job, {self.holder()}; wait for it to end or choose another --out"
            ) from None
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S")
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"host {socket.gethostname()} pid {os.getpid()} ({self.what}, since {stamp})\n".encode(), 0)
        self.fd = fd
        _HELD.add(self)
        return self

    def release(self) -> None:
        _HELD.discard(self)
        if self.fd is not None:
            os.close(self.fd)  # closing the descriptor drops the flock; the file itself stays
            self.fd = None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()


os.register_at_fork(after_in_child=_forget_in_child)
