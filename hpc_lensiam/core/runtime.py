"""Which process am I, on which device, talking over which backend: one answer for every command.

The MPI world of ``simulate``/``ingest`` (:func:`mpi_world`), torchrun's ranks (:func:`runtime`) and
what a device can do (:class:`DeviceCaps`, :func:`inference_dtype`) for every launcher.

``simulate`` (MPI), ``train``, ``embed`` and ``finetune`` (torch.distributed under torchrun, or one
process) all read their rank, local rank, world size and device here, so a cluster launch means the
same thing to each of them.

The launcher guard. Inside a Slurm allocation, plain ``srun -n 2 hpc-lensiam train ...`` (no
torchrun) starts two independent processes that each find no torchrun variables and would run as
"rank 0 of 1" on the same GPU, writing the same ``last.pt``. The environment still says several
tasks were started (a Slurm step with ``SLURM_STEP_NUM_TASKS`` > 1 or ``SLURM_PROCID`` > 0, or a
PMI/PMIx/Open MPI/Hydra size > 1: :func:`launch_evidence`, measured on the local Slurm, see
:func:`mpi_world` below), so :func:`check_torch_launch` refuses it before anything is written and
names torchrun. ``slurm/pretrain.sh`` starts one torchrun per node (a 1-task-per-node step), whose
``WORLD_SIZE`` covers every node, so it passes.

Also here, because they are per-process facts: ``PR_SET_PDEATHSIG`` (a trainer dies with its
torchrun agent instead of living on after a ``kill -9`` of the agent) and the check that loader
workers x processes fit in the CPUs this process may use (``os.sched_getaffinity``).
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from .errors import UserError

# Variables a process manager sets to the number of ranks it started (Slurm's are handled apart).
LAUNCHER_SIZE_VARS = ("PMI_SIZE", "PMIX_SIZE", "OMPI_COMM_WORLD_SIZE", "MPI_LOCALNRANKS")
# Variables torchrun (torch.distributed.run) sets in every worker.
TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")

TORCHRUN_FIX = (
    "launch with torchrun: `torchrun --nproc_per_node G -m hpc_lensiam ...` on one machine, or under "
    "Slurm one torchrun per node (`srun --ntasks-per-node=1 torchrun --nnodes N ...`, as slurm/pretrain.sh "
    "does); for one process run it without srun -n"
)


def _int(environ: Mapping[str, str], key: str) -> int | None:
    try:
        return int(str(environ[key]).strip())
    except (KeyError, ValueError):
        return None


def launch_evidence(environ: Mapping[str, str] | None = None) -> str | None:
    """Why the environment says several processes were launched (``"... VAR=value"``), or None.

    The batch shell's own ``SLURM_NTASKS`` proves nothing (it is one process outside any step);
    only a Slurm *step* with several tasks, a task number above 0, or a launcher's size above 1 does.
    """
    env = os.environ if environ is None else environ
    if "SLURM_STEP_ID" in env or "SLURM_STEPID" in env:
        n = _int(env, "SLURM_STEP_NUM_TASKS")
        if n is not None and n > 1:
            return f"srun started {n} tasks (SLURM_STEP_NUM_TASKS={n})"
        procid = _int(env, "SLURM_PROCID")
        if procid is not None and procid > 0:
            return f"this is srun task {procid} (SLURM_PROCID={procid})"
    for key in LAUNCHER_SIZE_VARS:
        n = _int(env, key)
        if n is not None and n > 1:
            return f"the launcher started {n} ranks ({key}={n})"
    return None


@dataclass(frozen=True)
class Runtime:
    """This process's place in the job: torchrun's variables, or one process."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    local_world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def check_torch_launch(environ: Mapping[str, str] | None = None, command: str = "this command") -> None:
    """Refuse several processes started without torchrun (each would be rank 0 of 1)."""
    env = os.environ if environ is None else environ
    if (_int(env, "WORLD_SIZE") or 1) > 1:
        return
    why = launch_evidence(env)
    if why is not None:
        raise UserError(
            f"{why} but torch's world size is 1 (no torchrun): each task would be its own rank 0 "
            f"on the same device and write the same files of {command}; {TORCHRUN_FIX}"
        )


def runtime(environ: Mapping[str, str] | None = None, command: str = "this command") -> Runtime:
    """Rank, local rank and world size from torchrun's variables; checks the launch first."""
    env = os.environ if environ is None else environ
    check_torch_launch(env, command)
    world = _int(env, "WORLD_SIZE") or 1
    rank, local = _int(env, "RANK") or 0, _int(env, "LOCAL_RANK") or 0
    local_world = _int(env, "LOCAL_WORLD_SIZE") or world
    if not (0 <= rank < world and 0 <= local < max(local_world, 1)):
        raise UserError(
            f"inconsistent launcher variables RANK={rank} LOCAL_RANK={local} WORLD_SIZE={world} "
            f"LOCAL_WORLD_SIZE={local_world}"
        )
    return Runtime(rank, local, world, local_world)


def under_torchrun(environ: Mapping[str, str] | None = None) -> bool:
    """True in a worker started by torchrun (its agent sets TORCHELASTIC_RUN_ID)."""
    env = os.environ if environ is None else environ
    return "TORCHELASTIC_RUN_ID" in env


def pick_cuda_index(local_rank: int, device_count: int) -> int:
    """The GPU of local rank ``local_rank`` among ``device_count`` visible ones.

    One visible GPU (Slurm's per-task binding, ``CUDA_VISIBLE_DEVICES`` of one) is everyone's
    ``cuda:0``; otherwise local rank r gets ``cuda:r``, and more local ranks than GPUs is an error
    (two ranks on one GPU halve its memory and NCCL refuses duplicate GPUs).
    """
    if device_count < 1:
        raise UserError("no CUDA device visible")
    if device_count == 1:
        return 0
    if local_rank >= device_count:
        raise UserError(
            f"LOCAL_RANK={local_rank} but only {device_count} GPUs are visible: start at most "
            f"{device_count} processes per node (torchrun --nproc_per_node {device_count})"
        )
    return local_rank


def device_for(rt: Runtime, cuda: bool | None = None, device_count: int | None = None, exclusive: bool = True):
    """``torch.device`` of this process: ``cuda:<pick_cuda_index>`` when CUDA is usable, else cpu.

    torchrun's workers on a node all inherit the same ``CUDA_VISIBLE_DEVICES`` (torchrun binds no
    GPU), so under torchrun more local ranks than visible GPUs means several ranks on one GPU, which
    NCCL refuses deep inside its first collective: refused here, naming the fix. (One visible GPU is
    everyone's ``cuda:0`` only where a launcher binds one GPU per task: Slurm, MPI.) ``exclusive=False``
    (``embed``, whose ranks talk over gloo) lets several workers share one GPU.
    """
    import torch

    cuda = torch.cuda.is_available() if cuda is None else cuda
    if not cuda:
        return torch.device("cpu")
    count = torch.cuda.device_count() if device_count is None else device_count
    if exclusive and count >= 1 and under_torchrun() and rt.local_world_size > count:
        raise UserError(
            f"LOCAL_WORLD_SIZE={rt.local_world_size}: torchrun started {rt.local_world_size} processes on this "
            f"node but only {count} GPU(s) are visible to them (torchrun's workers share CUDA_VISIBLE_DEVICES, "
            f"and NCCL cannot put two ranks on one GPU): start at most {count} per node "
            f"(torchrun --nproc_per_node {count}) or make {rt.local_world_size} GPUs visible"
        )
    return torch.device("cuda", pick_cuda_index(rt.local_rank, count))


def backend_for(device) -> str:
    """NCCL between GPUs, gloo between CPU processes (torch has no MPI backend in the wheels)."""
    return "nccl" if device.type == "cuda" else "gloo"


def process_group_kwargs(device) -> dict:
    """``init_process_group`` arguments: the backend, and on CUDA the ``device_id`` (binds the
    communicator to this GPU at once instead of guessing one at the first collective)."""
    kw = {"backend": backend_for(device)}
    if device.type == "cuda":
        kw["device_id"] = device
    return kw


def init_distributed(rt: Runtime, device, timeout=None) -> bool:
    """Join torchrun's process group (once); True when this call created it."""
    import torch
    import torch.distributed as dist

    if dist.is_initialized():
        return False
    if device.type == "cuda":
        torch.cuda.set_device(device)
    kw = process_group_kwargs(device)
    if timeout is not None:
        kw["timeout"] = timeout
    dist.init_process_group(**kw)
    return True


def launcher_rank() -> int:
    """This process's rank as its launcher set it (MPICH/Slurm PMI, Open MPI, PMIx, torchrun), 0 alone."""
    for var in ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK", "RANK"):
        if os.environ.get(var, "0") != "0":
            return int(os.environ[var])
    return 0


def is_rank0() -> bool:
    """Under mpiexec or torchrun every rank hits the same bad input: let one of them say so."""
    return launcher_rank() == 0


class ControlGroup:
    """torch.distributed under torchrun (gloo for the few control messages: ``embed``'s barrier and
    broadcasts, ``predict``'s gather of every rank's predictions), else one process."""

    def __init__(self, command: str = "embed"):
        import torch.distributed as dist

        self.dist = dist
        self.created = False
        self.group = None
        self.rt = runtime(command=command)  # refuses `srun -n N` without torchrun
        if under_torchrun():
            die_with_parent()
        if self.rt.world_size > 1 and not dist.is_initialized():
            dist.init_process_group("gloo", timeout=timedelta(hours=6))
            self.created = True
        if dist.is_initialized():
            self.rank, self.size = dist.get_rank(), dist.get_world_size()
            if dist.get_backend() != "gloo":  # caller's NCCL group: objects travel over gloo
                self.group = dist.new_group(backend="gloo", timeout=timedelta(hours=6))
        else:
            self.rank, self.size = 0, 1

    def barrier(self):
        if self.size > 1:
            self.dist.barrier(group=self.group)

    def bcast(self, obj):
        if self.size == 1:
            return obj
        box = [obj]
        self.dist.broadcast_object_list(box, src=0, group=self.group)
        return box[0]

    def gather(self, obj) -> list | None:
        """Every rank's ``obj`` on rank 0, in rank order (None on the other ranks)."""
        if self.size == 1:
            return [obj]
        out = [None] * self.size if self.rank == 0 else None
        self.dist.gather_object(obj, out, dst=0, group=self.group)
        return out

    def close(self):
        if self.created:
            self.dist.destroy_process_group()


# A collective that broke: the peer's socket closed (it exited: bad data, a crash, a kill) or
# nothing came for the process group's timeout (it hangs: stopped, deadlocked, stuck in I/O).
# Gloo's and NCCL's words for each.
_PEER_GONE = ("connection closed by peer", "connection reset by peer", "broken pipe", "remote process exited")
_PEER_SILENT = ("timed out", "timeout")
ROLL_CALL_S = 10.0  # how long a rank whose collective timed out waits for the others to say they are alive


def _where(exc: BaseException) -> str:
    """The innermost frame of this package in ``exc``'s traceback: the operation that waited."""
    tb, found = exc.__traceback__, ""
    root = os.path.dirname(os.path.abspath(__file__))
    while tb is not None:
        code = tb.tb_frame.f_code
        if os.path.abspath(code.co_filename).startswith(root):
            rel = os.path.relpath(code.co_filename, os.path.dirname(root))
            found = f"{getattr(code, 'co_qualname', code.co_name)} ({rel}:{tb.tb_lineno})"
        tb = tb.tb_next
    return found or "a collective"


def _roll_call(rank: int, world_size: int, state: str, wait_s: float) -> dict[int, str]:
    """Every rank whose collective broke says so in the group's store (its own TCP connection, not
    the broken one) and, when ``wait_s`` > 0, waits that long for the others: {rank: state} of the
    ranks that answered. A stopped or deadlocked rank cannot answer."""
    import time

    import torch.distributed as dist

    try:
        store = dist.distributed_c10d._get_default_store()
        keys = {r: f"hpc_lensiam/broken/{r}" for r in range(world_size)}
        store.set(keys[rank], state)
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline and not store.check(list(keys.values())):
            time.sleep(0.2)
        return {r: store.get(k).decode() for r, k in keys.items() if store.check([k])}
    except Exception:  # no store (or its host is gone): this rank's own view only
        return {rank: state}


def collective_failure(exc: BaseException, rank: int, world_size: int, timeout_min: float):
    """A :class:`~hpc_lensiam.core.errors.PeerFailure` when ``exc`` is a broken collective, else None.

    A peer that exited: quiet (that rank says why). A peer that stopped answering: the lowest rank
    whose collective timed out names the ranks that did not answer the roll call and the operation."""
    import torch.distributed as dist

    from .errors import PeerFailure

    if world_size < 2 or not isinstance(exc, RuntimeError):
        return None
    text = str(exc).lower()
    if not isinstance(exc, dist.DistError) and not any(k in text for k in ("gloo", "nccl", "c10d")):
        return None  # not the process group's (a loader's timeout, say)
    gone = any(s in text for s in _PEER_GONE)
    if not gone and not any(s in text for s in _PEER_SILENT):
        return None
    answered = _roll_call(rank, world_size, "gone" if gone else "timeout", 0.0 if gone else ROLL_CALL_S)
    if gone:
        return PeerFailure(f"rank {rank}: another rank left the process group (its error says why)", quiet=True)
    timed_out = sorted(r for r, s in answered.items() if s == "timeout")
    silent = [r for r in range(world_size) if r not in answered]
    quiet = bool(timed_out) and rank != timed_out[0]  # one line per job
    who = f"rank {', '.join(map(str, silent))}" if silent else "another rank"
    return PeerFailure(
        f"rank {rank}: no answer from {who} for {timeout_min:g} min (--dist-timeout) in {_where(exc)}: "
        f"that rank is hung (stopped, deadlocked or stuck in I/O); stopping; --resume continues from the "
        f"last checkpoint",
        quiet=quiet,
    )


# ----------------------------------------------------------------------------- process hygiene
PR_SET_PDEATHSIG = 1


def die_with_parent(sig: int = signal.SIGTERM) -> bool:
    """Ask Linux to send ``sig`` to this process when its parent dies (``prctl(PR_SET_PDEATHSIG)``).

    torchrun's agent is the trainers' parent; a ``kill -9`` of the agent (an OOM killer, a node
    agent) would otherwise leave the trainers running, holding GPUs and a half-finished group.
    SIGTERM lets the loop's handler stop cleanly. Returns False where prctl is not available.
    """
    if not sys.platform.startswith("linux"):
        return False
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
            return False
    except (OSError, AttributeError):
        return False
    if os.getppid() == 1:  # the parent died before prctl took effect
        os.kill(os.getpid(), sig)
    return True


def exit_torchrun_rank(rc: int) -> None:
    """A rank that torchrun started (world size > 1) leaves here with ``os._exit(rc)`` after flushing
    its output, skipping the interpreter's finalization. Ranks aborted there, after their command had
    finished and written everything, with "terminate called without an active exception" (torch
    2.14 + gloo: ``predict`` and a 2-process all-reduce, about one full-suite run in two); our reading,
    not proven, is gloo's worker threads releasing work objects while the interpreter is torn down.
    Every command closes its files and process group before it returns, so nothing is lost.
    Elsewhere (one process, mpiexec, an in-process call) this returns and the caller exits as usual."""
    if "TORCHELASTIC_RUN_ID" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        leave_now(rc)


def leave_now(rc: int) -> None:
    """Flush stdout and stderr and end the process with ``os._exit(rc)``, without the interpreter's
    finalization (where gloo-using processes aborted: :func:`exit_torchrun_rank`)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(rc)


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask: Slurm's cgroup/cpuset, taskset)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def cpu_budget_warning(workers: int, local_processes: int, cpus: int | None = None) -> str | None:
    """A warning when ``local_processes`` x (1 + ``workers``) exceeds the usable CPUs, else None.

    Each training process needs one core for itself and one per loader worker; oversubscribed, the
    loader starves the GPUs (on a cgroup cluster every process shares the cores Slurm granted).
    """
    cpus = usable_cpus() if cpus is None else cpus
    need = local_processes * (1 + workers)
    if need <= cpus:
        return None
    return (
        f"{local_processes} process(es) x (1 + {workers} loader workers) = {need} busy processes on {cpus} "
        f"usable CPU(s) (os.sched_getaffinity): the loader will starve the device; lower --workers or "
        f"request more CPUs (Slurm: --cpus-per-task={need} for one torchrun per node, see docs/gpu.md)"
    )


# ------------------------------------------------------------------------------- the MPI world
# The MPI world of this process, and the guard against the srun-singleton trap.
#
# The trap: inside a Slurm allocation, plain ``srun -n 2 hpc-lensiam simulate ...`` (no ``--mpi=``)
# starts two independent processes that each initialise MPI alone as "rank 0 of 1". Both would
# simulate every shard and overwrite each other's files. The same happens when a launcher from one
# MPI (a system ``mpirun``) starts a program whose mpi4py is linked against another MPI (the PyPI
# wheel). :func:`mpi_world` notices that the environment announces several tasks while MPI's world
# has one, and stops with a :class:`~hpc_lensiam.core.errors.UserError` naming the fix.
#
# What the launchers set, measured on a one-node Slurm 22.05 (``ci/slurm-up.sh``) with the PyPI
# ``mpich`` wheel, inside ``sbatch --ntasks=2``:
#
# - the batch shell itself: SLURM_NTASKS=2 SLURM_NPROCS=2 SLURM_PROCID=0 and no SLURM_STEP_*;
#   one process, world 1 (correct: it is the script, not a rank).
# - ``srun -n 2`` (no --mpi): SLURM_STEP_ID, SLURM_STEP_NUM_TASKS=2, SLURM_PROCID=0 and 1, no PMI
#   variables; two processes, each world 1 -- the trap.
# - ``srun --mpi=pmi2 -n 2``: the same plus PMI_SIZE=2, PMI_RANK=0/1, SLURM_MPI_TYPE=pmi2; world 2.
# - ``mpiexec -n 2`` (the wheel's Hydra, which starts its proxy with a 1-task ``srun``): PMI_SIZE=2,
#   MPI_LOCALNRANKS=2, SLURM_STEP_NUM_TASKS=1, SLURM_PROCID=0 in both ranks; world 2.
# - ``srun --mpi=pmix``: refused, Debian's plugin finds no libpmix; it is for a site MPI built
#   with PMIx.
#
# So the batch shell's SLURM_NTASKS alone proves nothing (it is one process, and ``mpiexec`` started
# from it builds a correct world); only a Slurm *step* (SLURM_STEP_ID set) with several tasks, a task
# number above 0, or a PMI/PMIx/Open MPI/Hydra size above 1 says several ranks were meant.
# That reading of the environment is :func:`launch_evidence` above (train, embed and finetune
# refuse the same trap when torchrun is missing); this section adds the MPI side.

FIX = (
    "launch with `mpiexec -n N` (the venv's, from the PyPI mpich wheel) inside the allocation, or "
    "`srun --mpi=pmi2` with the mpich wheel, or `srun --mpi=pmix` with a PMIx-enabled site MPI "
    "and mpi4py built against it"
)


def check_launch(size: int, environ: Mapping[str, str] | None = None) -> None:
    """Raise UserError when the launcher started several tasks but MPI's world has ``size`` 1."""
    if size > 1:
        return
    why = launch_evidence(environ)
    if why is not None:
        raise UserError(
            f"{why} but MPI's world size is 1: each task would be its own rank 0 and write the same "
            f"shards (plain `srun` without --mpi, or an mpirun from another MPI than mpi4py's); {FIX}"
        )


def mpi_world() -> tuple[Any, int, int]:
    """``(comm, rank, size)`` of this process; ``comm`` is MPI.COMM_WORLD, or None without mpi4py.

    Raises UserError for the srun-singleton trap (see :func:`check_launch`).
    """
    try:
        from mpi4py import MPI
    except ImportError:
        comm, rank, size = None, 0, 1
    except RuntimeError as exc:  # mpi4py's wheel finds no MPI library to load (a bare GPU image)
        why = launch_evidence(os.environ)
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if why is not None:
            raise UserError(f"mpi4py cannot load an MPI library ({first}) but {why}; {FIX}") from None
        print(f"note: mpi4py cannot load an MPI library ({first}): running as one process", file=sys.stderr)
        comm, rank, size = None, 0, 1
    else:
        comm = MPI.COMM_WORLD
        rank, size = comm.Get_rank(), comm.Get_size()
    check_launch(size, environ=os.environ)
    return comm, rank, size


# ---------------------------------------------------------------------------- device capabilities
NATIVE_BF16_CAPABILITY = (8, 0)


@dataclass(frozen=True)
class DeviceCaps:
    """What the plan needs to know about a device. ``capability`` is CUDA's (major, minor)."""

    type: str = "cpu"  # "cuda" | "cpu"
    capability: tuple[int, int] | None = None
    name: str = "cpu"

    @property
    def bf16_native(self) -> bool:
        """torch.cuda.is_bf16_supported(including_emulation=False): Ampere (8.0) or newer; any CPU."""
        if self.type != "cuda":
            return True
        return self.capability is not None and tuple(self.capability) >= NATIVE_BF16_CAPABILITY

    @classmethod
    def detect(cls, device) -> DeviceCaps:
        import torch

        if device.type != "cuda":
            return cls()
        return cls("cuda", tuple(torch.cuda.get_device_capability(device)), torch.cuda.get_device_name(device))

    @classmethod
    def cuda(cls, capability=(9, 0), name: str = "H100-like (assumed)") -> DeviceCaps:
        """A GPU's capabilities without a GPU: how the CPU tests build the CUDA plan."""
        return cls("cuda", tuple(capability), name)


def inference_dtype(caps: DeviceCaps):
    """Autocast dtype for embedding: bf16 where native, else fp16 on a GPU; None (fp32) on a CPU."""
    if caps.type != "cuda":
        return None
    import torch

    return torch.bfloat16 if caps.bf16_native else torch.float16
