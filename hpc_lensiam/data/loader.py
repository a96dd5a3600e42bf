"""Shard loader: manifest -> per-epoch shard order -> rank/worker split -> raw npy decode -> batches.

WebDataset streaming, written so that a multi-rank job never hangs and a resumed run sees the
same batches as an uninterrupted one:

* **Split.** Epoch ``e`` permutes the manifest's shard list with ``seed(seed, e)``; rank ``r`` takes
  ``perm[r::world]`` (split by node) and DataLoader worker ``v`` of that ``[v::workers]`` (split by
  worker), so every rank and worker reads disjoint shards.
* **Equal steps.** Every rank yields exactly ``batches_per_epoch = N // (batch x world)`` batches
  per epoch (rounded down to a multiple of ``grad_accum``), whatever its shards hold: a worker
  cycles over its shards (re-shuffled each pass) and stops at its quota, the fix the webdataset
  maintainers give for uneven shards (``resampled`` + ``with_epoch``), done explicitly here. The
  DataLoader takes batches from its workers round-robin, so batch ``i`` comes from worker
  ``i % workers``; a resumed epoch rotates the workers so that stays true, and each worker skips
  its already-seen samples before decoding them.
* **Fast decode.** Samples stay raw bytes through the seeded shuffle buffer; the npy header is
  parsed once and every image is an ``np.frombuffer`` view copied straight into the batch array
  (no generic decoder chain, no pickling of numpy arrays: workers hand back torch tensors, which
  travel through shared memory and can be pinned).

A batch is a dict: ``{"x1", "x2"}`` (lensiam: the stored pair) or ``{"x"}`` (simsiam: one image),
each a float32 tensor ``(B, 1, H, W)``, plus ``"keys"`` (the samples' ``__key__``) and ``"bad"``:
samples skipped since the last batch.
"""

from __future__ import annotations

import functools
import multiprocessing
import os
import random
import signal
import sys
import warnings
from pathlib import Path

import torch
from webdataset.filters import _shuffle

from ..core.errors import UserError
from ..core.rng import derive_seed
from ..shards.integrity import IntegrityError, check_finite, shard_problem
from ..shards.manifest import NpyDecoder, read_manifest, shard_paths
from ..shards.reader import shard_samples


class ShardError(UserError):
    """A shard (or a sample in it) that cannot be read; the message names the shard."""


class ShardStream(torch.utils.data.IterableDataset):
    """One rank's batches of one epoch (set :attr:`epoch` and :attr:`start` before iterating)."""

    def __init__(
        self,
        shards: dict[str, int],
        keys: dict[str, str],
        image_shape,
        batch_size: int,
        batches: int,
        rank: int,
        world_size: int,
        workers: int,
        seed: int,
        shuffle_buffer: int,
        skip_bad: bool,
    ):
        self.shards, self.keys, self.image_shape = shards, keys, tuple(image_shape)
        self.batch_size, self.batches = batch_size, batches
        self.rank, self.world_size, self.workers = rank, world_size, max(1, workers)
        self.seed, self.shuffle_buffer, self.skip_bad = seed, shuffle_buffer, skip_bad
        self.epoch, self.start = 0, 0

    def worker_shards(self, epoch: int, v: int) -> list[str]:
        order = random.Random(derive_seed(self.seed, epoch)).sample(list(self.shards), len(self.shards))
        return order[self.rank :: self.world_size][v :: self.workers]

    def _raw(self, shards: list[str], rng: random.Random, counter: list):
        """Samples of ``shards`` through the seeded shuffle buffer, pass after pass (new shard order
        each pass; the buffer drains at the end of a pass, so a pass holds every sample once)."""
        bufsize = max(1, min(self.shuffle_buffer, sum(self.shards[p] for p in shards)))
        while True:
            count = [0]
            yield from _shuffle(self._one_pass(shards, rng, counter, count), bufsize=bufsize, initial=bufsize, rng=rng)
            if count[0] == 0:
                raise ShardError(f"shard {shards[0]}: no readable samples in this worker's {len(shards)} shard(s)")

    def _one_pass(self, shards, rng, counter, count):
        for path in rng.sample(shards, len(shards)):
            try:
                for sample in shard_samples(path, self.shards[path]):
                    count[0] += 1
                    yield sample
            except Exception as exc:  # truncated tar, unreadable file, ...
                self._bad(path, None, exc, counter)

    def _bad(self, path, key, exc, counter):
        where = f"{path}" + (f" sample {key!r}" if key else "")
        what = (
            str(exc) if isinstance(exc, IntegrityError) else f"shard {where}: cannot read ({type(exc).__name__}: {exc})"
        )
        if not self.skip_bad:
            raise ShardError(f"{what}; --skip-bad-samples skips unreadable samples") from None
        counter[0] += 1
        print(f"warning: skipping unreadable data ({what})", file=sys.stderr, flush=True)

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        w, nw = (info.id, info.num_workers) if info else (0, 1)
        assert nw == self.workers, (nw, self.workers)
        v = (w + self.start) % nw  # "virtual worker": batch i comes from i % nw
        skip = len(range(v, self.start, nw))  # this worker's batches already trained on
        take = len(range(v, self.batches, nw)) - skip
        if take <= 0:
            return
        rng = random.Random(derive_seed(self.seed, self.epoch, self.rank, v))
        counter = [0]
        raw = self._raw(self.worker_shards(self.epoch, v), rng, counter)
        for _ in range(skip * self.batch_size):  # skipped without decoding
            next(raw)
        decode = NpyDecoder()
        B, (H, W) = self.batch_size, self.image_shape
        for _ in range(take):
            out = {k: torch.empty((B, 1, H, W), dtype=torch.float32) for k in self.keys}
            arrays = {k: t.numpy() for k, t in out.items()}
            keys, n = [], 0
            while n < B:
                sample = next(raw)
                try:
                    for name, member in self.keys.items():
                        if member not in sample:
                            raise KeyError(f"no {member} in sample")
                        arrays[name][n, 0] = check_finite(
                            decode(sample[member]), sample.get("__url__"), sample.get("__key__"), member
                        )
                except Exception as exc:
                    self._bad(sample.get("__url__"), sample.get("__key__"), exc, counter)
                    continue
                keys.append(sample["__key__"])
                n += 1
            out["keys"] = keys
            out["bad"], counter[0] = counter[0], 0
            yield out


def _worker_signals(_worker_id: int, closing=None) -> None:
    """SIGTERM reaches the workers too (Slurm signals every process of a step; torchrun signals each
    trainer's process group): it is the trainer's cue to checkpoint at the next step boundary, so
    a worker keeps serving batches until the trainer closes the loader. When the trainer is closing
    the loader (``closing`` set, e.g. after a worker's error) or is gone, SIGTERM ends the worker at
    once; otherwise a timer ends it should the trainer never close the loader."""
    parent = os.getppid()

    def on_sigterm(signum, frame):
        if (closing is not None and closing.value) or os.getppid() != parent:
            os._exit(0)
        signal.alarm(signal.alarm(0) or 100)

    signal.signal(signal.SIGUSR1, signal.SIG_IGN)  # the trainer's checkpoint-and-stop signal
    signal.signal(signal.SIGTERM, on_sigterm)


class ShardLoader:
    """Batches of one rank, epoch by epoch: ``for batch in loader.epoch(e, start=0): ...``.

    ``mode="lensiam"`` gives the stored pair (``x1``, ``x2``); ``mode="simsiam"`` one image ``x``
    per sample (``image`` of single-mode shards, ``view1`` of pair shards).
    """

    def __init__(
        self,
        data_dir: str,
        mode: str,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        workers: int = 2,
        seed: int = 0,
        shuffle_buffer: int = 1000,
        grad_accum: int = 1,
        skip_bad_samples: bool = False,
        pin_memory: bool = False,
        verify: bool = False,
    ):
        if not data_dir:
            raise UserError("--data: no shard directory given")
        manifest = read_manifest(data_dir)
        self.manifest, self.data_dir = manifest, data_dir
        shards = shard_paths(data_dir, manifest)
        missing = [p for p in shards if not Path(p).is_file()]
        if missing:
            raise ShardError(
                f"shard {missing[0]}: listed in {Path(data_dir) / 'manifest.json'} but missing "
                f"({len(missing)} of {len(shards)} missing)"
            )
        # Size always (a stat); sha256 with --verify, each rank its own share (every shard once).
        for i, (path, entry) in enumerate(zip(shards, manifest["shards"])):
            problem = shard_problem(path, entry, verify=verify and i % world_size == rank)
            if problem and not skip_bad_samples:
                raise ShardError(
                    f"shard {path}: cannot read ({problem}); --skip-bad-samples skips "
                    f"unreadable samples, `hpc-lensiam verify {data_dir}` lists every bad shard"
                )
            if problem and rank == 0:
                warnings.warn(f"shard {path}: {problem}; reading what it holds (--skip-bad-samples)", stacklevel=2)
        if mode == "lensiam":
            if manifest["mode"] != "lensiam":
                raise UserError(
                    f"--mode lensiam needs pair shards; {data_dir} holds {manifest['mode']!r} "
                    f"samples (use --mode simsiam, or simulate with --mode lensiam)"
                )
            keys = {"x1": "view1.npy", "x2": "view2.npy"}
        elif mode == "simsiam":
            keys = {"x": "image.npy" if manifest["mode"] == "single" else "view1.npy"}
        else:
            raise UserError(f"--mode: {mode!r} is not one of lensiam, simsiam")
        num = int(manifest["num_samples"])
        per_step = batch_size * world_size * grad_accum
        if num < per_step:
            raise UserError(
                f"batch larger than the data: {batch_size} per rank x {world_size} rank(s) x "
                f"{grad_accum} accumulation = {per_step} samples per step, but {data_dir} "
                f"holds {num}"
            )
        if len(shards) < world_size:
            raise UserError(
                f"{data_dir} has {len(shards)} shard(s) for {world_size} ranks: every rank needs "
                f"its own shards (re-simulate with a smaller --shard-size)"
            )
        usable = len(shards) // world_size
        if workers > usable:
            warnings.warn(
                f"--workers {workers}: only {usable} shard(s) per rank, using {usable} worker(s)", stacklevel=1
            )  # about the run, not a call site
            workers = usable
        self.workers = workers
        self.batches_per_epoch = num // per_step * grad_accum
        shape = manifest.get("image_shape")
        if not shape:
            raise UserError(f"{Path(data_dir) / 'manifest.json'}: missing key 'image_shape'")
        self.image_shape = tuple(shape)
        self.batch_size, self.pin_memory = batch_size, pin_memory
        sizes = {p: int(s.get("num_samples", 1)) for p, s in zip(shards, manifest["shards"])}
        self.dataset = ShardStream(
            sizes,
            keys,
            shape,
            batch_size,
            self.batches_per_epoch,
            rank,
            world_size,
            workers,
            seed,
            shuffle_buffer,
            skip_bad_samples,
        )

    def epoch(self, epoch: int, start: int = 0):
        """Batches ``start .. batches_per_epoch-1`` of ``epoch`` (the same ones whatever ``start``)."""
        self.dataset.epoch, self.dataset.start = epoch, start
        closing = multiprocessing.RawValue("b", 0)  # shared with the workers (fork), read in a handler
        # torch's DataLoader itself (not wds.WebLoader, whose iterator hides _shutdown_workers: the
        # workers then lived on until interpreter exit, and a worker's error took 100 s to end the job)
        loader = torch.utils.data.DataLoader(
            self.dataset,
            batch_size=None,
            num_workers=self.workers,
            pin_memory=self.pin_memory,
            persistent_workers=False,
            worker_init_fn=functools.partial(_worker_signals, closing=closing),
        )
        it = iter(loader)
        try:
            yield from it
        except ShardError as exc:  # from a worker, its traceback is in the message: keep the last line
            closing.value = 1  # the job ends: its workers go now, not after the join timeout
            for w in getattr(it, "_workers", ()):
                if w.is_alive():
                    w.terminate()
            raise ShardError(str(exc).strip().splitlines()[-1].split("ShardError: ", 1)[-1]) from None
        finally:  # stop the workers now, even when the caller leaves mid-epoch
            closing.value = 1
            getattr(it, "_shutdown_workers", lambda: None)()
