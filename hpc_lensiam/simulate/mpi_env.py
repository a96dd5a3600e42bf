"""The MPI world of this process, and the guard against the srun-singleton trap.

The trap: inside a Slurm allocation, plain ``srun -n 2 hpc-lensiam simulate ...`` (no ``--mpi=``)
starts two independent processes that each initialise MPI alone as "rank 0 of 1". Both would
simulate every shard and overwrite each other's files. The same happens when a launcher from one
MPI (a system ``mpirun``) starts a program whose mpi4py is linked against another MPI (the PyPI
wheel). :func:`mpi_world` notices that the environment announces several tasks while MPI's world
has one, and stops with a :class:`~hpc_lensiam.errors.UserError` naming the fix.

What the launchers set, measured on a one-node Slurm 22.05 (``ci/slurm-up.sh``) with the PyPI
``mpich`` wheel, inside ``sbatch --ntasks=2``:

- the batch shell itself: SLURM_NTASKS=2 SLURM_NPROCS=2 SLURM_PROCID=0 and no SLURM_STEP_*;
  one process, world 1 (correct: it is the script, not a rank).
- ``srun -n 2`` (no --mpi): SLURM_STEP_ID, SLURM_STEP_NUM_TASKS=2, SLURM_PROCID=0 and 1, no PMI
  variables; two processes, each world 1 -- the trap.
- ``srun --mpi=pmi2 -n 2``: the same plus PMI_SIZE=2, PMI_RANK=0/1, SLURM_MPI_TYPE=pmi2; world 2.
- ``mpiexec -n 2`` (the wheel's Hydra, which starts its proxy with a 1-task ``srun``): PMI_SIZE=2,
  MPI_LOCALNRANKS=2, SLURM_STEP_NUM_TASKS=1, SLURM_PROCID=0 in both ranks; world 2.
- ``srun --mpi=pmix``: refused, Debian's plugin finds no libpmix; it is for a site MPI built
  with PMIx.

So the batch shell's SLURM_NTASKS alone proves nothing (it is one process, and ``mpiexec`` started
from it builds a correct world); only a Slurm *step* (SLURM_STEP_ID set) with several tasks, a task
number above 0, or a PMI/PMIx/Open MPI/Hydra size above 1 says several ranks were meant.
That reading of the environment lives in :mod:`hpc_lensiam.runtime` (train, embed and finetune
refuse the same trap when torchrun is missing); this module adds the MPI side.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from ..errors import UserError
from ..runtime import LAUNCHER_SIZE_VARS, launch_evidence  # noqa: F401  (shared with train/embed)

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
    else:
        comm = MPI.COMM_WORLD
        rank, size = comm.Get_rank(), comm.Get_size()
    check_launch(size, environ=os.environ)
    return comm, rank, size
