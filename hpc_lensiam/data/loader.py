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
import re
import signal
import sys
import warnings
from pathlib import Path

import torch

from ..core.errors import UserError
from ..core.rng import derive_seed
from ..shards.integrity import IntegrityError, check_finite, shard_problem, shard_samples
from ..shards.manifest import NpyDecoder, read_manifest, shard_paths


def _shuffle(data, bufsize: int, initial: int, rng: random.Random):
    """webdataset's shuffle buffer (``webdataset.filters._shuffle``, 1.0), the same stream for the
    same ``rng``, written here so that training on shards needs no webdataset: the GPU machine's
    bare image has none (bench/gpu_check.py). tests/test_loader.py checks it against webdataset's."""
    initial = min(initial, bufsize)
    buf: list = []
    for sample in data:
        buf.append(sample)
        if len(buf) < bufsize:
            try:
                buf.append(next(data))
            except StopIteration:
                pass
        if len(buf) >= initial:
            yield _pick(buf, rng)
    while buf:
        yield _pick(buf, rng)


def _pick(buf: list, rng: random.Random):
    k = rng.randint(0, len(buf) - 1)
    sample = buf[k]
    buf[k] = buf[-1]
    buf.pop()
    return sample


class ShardError(UserError):
    """A shard (or a sample in it) that cannot be read; the message names the shard."""


class LoaderError(UserError):
    """A DataLoader worker that did not hand over its batch: dead, blocked past the loader timeout,
    or unable to pass the batch to the main process; the message says which and why, when known."""


# Seconds the main process waits for one batch from its workers before it gives up (DataLoader
# ``timeout``): generous (a batch is ~1 s of reading; a resumed epoch first skips its seen samples),
# but a worker blocked on a hung file system no longer hangs the job forever.
LOADER_TIMEOUT = 600.0

_HANDOVER = None  # shared with the forked workers: why a worker could not hand over its batch


def handover_buffer():
    """The shared buffer (created once in the main process, before it forks workers), emptied."""
    global _HANDOVER
    if _HANDOVER is None:
        _HANDOVER = multiprocessing.RawArray("c", 512)
    _HANDOVER.value = b""
    return _HANDOVER


def _feeder_failed(exc, obj) -> None:
    """A worker's queue feeder thread could not send a batch (``Queue._on_queue_feeder_error``).

    multiprocessing's default prints a traceback and drops the batch, and the main process then
    waits for it forever (issue 25: ``embed`` under ``ulimit -f`` or with /dev/shm full, whose
    tensors could not be moved to shared memory, waited 636 s until killed). Here the reason goes to
    the main process and the worker ends: the main process sees a dead worker at once and names why.
    A broken pipe is left alone: the main process closed the queue, it is stopping the workers."""
    if isinstance(exc, (BrokenPipeError, ConnectionResetError)):
        return
    if _HANDOVER is not None:
        _HANDOVER.value = f"{type(exc).__name__}: {' '.join(str(exc).split())}".encode()[:511]
    os._exit(70)


def init_worker(_worker_id: int = 0) -> None:
    """``worker_init_fn`` of every loader with workers: a batch the worker cannot hand over ends it."""
    import multiprocessing.queues

    multiprocessing.queues.Queue._on_queue_feeder_error = staticmethod(_feeder_failed)


def _awaited_worker(it) -> str:
    """The " (pid N)" of the worker whose batch a DataLoader iterator waits for, when it can tell."""
    try:
        return f" (pid {it._workers[it._task_info[it._rcvd_idx][0]].pid})"
    except (AttributeError, KeyError, IndexError, TypeError):
        return ""


def loader_failure(exc: BaseException, what: str, it=None) -> str | None:
    """One line for a failure of torch's DataLoader workers (raised as a RuntimeError), or None.
    ``it``: the DataLoader's iterator, to name the worker a timed-out wait was for."""
    text = str(exc)
    if m := re.match(r"DataLoader timed out after (\S+) seconds", text):
        return (
            f"{what}: no batch from data-loader worker{_awaited_worker(it)} in {float(m[1]):g} s: it is blocked "
            f"(a hung file system?); a longer --loader-timeout, or --workers 0 to read in the main process"
        )
    if m := re.match(r"DataLoader worker \(pid(?:\(s\))? ([\d, ]+)\) (.*)", text, re.S):
        why = _HANDOVER.value.decode(errors="replace") if _HANDOVER is not None else ""
        if why:
            return (
                f"{what}: data-loader worker (pid {m[1]}) could not hand over its batch to the main process "
                f"({why}): /dev/shm full, or a file-size limit (ulimit -f)?"
            )
        how = m[2].split(". Details are lost")[0].strip().rstrip(".")
        codes = [w.exitcode for w in getattr(it, "_workers", ()) if str(w.pid) == m[1].strip()]
        if codes and codes[0] is not None:  # torch's own check says only "exited unexpectedly"
            code = codes[0]
            try:
                how = f"was killed by signal {signal.Signals(-code).name}" if code < 0 else f"exited with code {code}"
            except ValueError:
                how = f"was killed by signal {-code}"
        return f"{what}: data-loader worker (pid {m[1]}) {how} (out of memory, or killed?)"
    return None


def _stop_workers(it, failed: bool = False) -> None:
    """Stop an iterator's workers now: torch's shutdown, then SIGKILL for a stopped or stuck one.
    ``failed``: the job ends on an error: SIGKILL first, not after torch's joins (5 s each), once
    torch's SIGCHLD handler no longer watches them (it would raise "killed by signal" over the error)."""
    if failed and getattr(it, "_worker_pids_set", False):
        from torch.utils.data._utils import signal_handling

        signal_handling._remove_worker_pids(id(it))
        it._worker_pids_set = False
        for w in it._workers:
            if w.is_alive():
                w.kill()
    getattr(it, "_shutdown_workers", lambda: None)()
    for w in getattr(it, "_workers", ()):
        if w.is_alive():
            w.kill()


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
    init_worker(_worker_id)


def worker_message(exc: BaseException) -> str:
    """The message of an error re-raised from a DataLoader worker, less the worker's traceback that
    torch puts into it ("Caught X in DataLoader worker process N. Original Traceback ..."): its last
    line, less the exception's class name. Other messages are returned unchanged."""
    text = str(exc).strip()
    if "in DataLoader worker process" not in text:
        return text
    return re.sub(r"^(?:\w+\.)*\w+: ", "", text.splitlines()[-1], count=1)


def worker_batches(loader, what: str):
    """The batches of a torch DataLoader (``embed``'s rows): bad data found by a worker (a UserError)
    is one line, as in the main process; so is a worker that died, hung past the loader's timeout or
    could not hand over its batch (a LoaderError); the workers stop as soon as the caller leaves."""
    it, failed = iter(loader), True
    try:
        yield from it
        failed = False
    except UserError as exc:  # re-raised from a worker with its traceback in the message
        raise type(exc)(worker_message(exc)) from None
    except RuntimeError as exc:
        if (line := loader_failure(exc, what, it)) is None:
            raise
        raise LoaderError(line) from None
    finally:
        _stop_workers(it, failed)


class ShardLoader:
    """Batches of one rank, epoch by epoch: ``for batch in loader.epoch(e, start=0): ...``.

    ``views="lens"`` gives the stored pair (``x1``, ``x2``); ``views="standard"`` one image ``x``
    per sample (``image`` of single-mode shards, ``view1`` of pair shards), augmented twice by the trainer.
    """

    def __init__(
        self,
        data_dir: str,
        views: str,
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
        timeout: float = LOADER_TIMEOUT,
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
        if views == "lens":
            if manifest["mode"] != "lensiam":
                raise UserError(
                    f"--views lens needs pair shards; {data_dir} holds {manifest['mode']!r} "
                    f"samples (use --views standard, or simulate with --samples pairs)"
                )
            keys = {"x1": "view1.npy", "x2": "view2.npy"}
        elif views == "standard":
            keys = {"x": "image.npy" if manifest["mode"] == "single" else "view1.npy"}
        else:
            raise UserError(f"--views: {views!r} is not one of lens, standard")
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
        self.batch_size, self.pin_memory, self.timeout = batch_size, pin_memory, timeout
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
        handover_buffer()
        # torch's DataLoader itself (not wds.WebLoader, whose iterator hides _shutdown_workers: the
        # workers then lived on until interpreter exit, and a worker's error took 100 s to end the job)
        loader = torch.utils.data.DataLoader(
            self.dataset,
            batch_size=None,
            num_workers=self.workers,
            pin_memory=self.pin_memory,
            persistent_workers=False,
            worker_init_fn=functools.partial(_worker_signals, closing=closing),
            timeout=self.timeout if self.workers else 0,
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
        except RuntimeError as exc:  # a worker died, hung past the timeout or could not hand over a batch
            closing.value = 1
            if (line := loader_failure(exc, "train", it)) is None:
                raise
            _stop_workers(it, failed=True)
            raise LoaderError(line) from None
        finally:  # stop the workers now, even when the caller leaves mid-epoch
            closing.value = 1
            _stop_workers(it)
