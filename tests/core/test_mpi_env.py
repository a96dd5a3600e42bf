"""The srun-singleton guard: check_launch on crafted environments, and real launches.

The crafted environments copy what Slurm 22.05 and the mpich wheel's Hydra set, as measured on the
local cluster (see hpc_lensiam/core/runtime.py); tests/ops/test_slurm.py repeats the real thing
under Slurm.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from hpc_lensiam.core.errors import UserError
from hpc_lensiam.core.runtime import check_launch, launch_evidence
from support import BIN, REPO, only_error_line

# The batch shell of `sbatch --ntasks=2`: one process; SLURM_NTASKS=2 describes the allocation.
BATCH_SHELL = {
    "SLURM_JOB_ID": "4",
    "SLURM_NTASKS": "2",
    "SLURM_NPROCS": "2",
    "SLURM_PROCID": "0",
    "SLURM_LOCALID": "0",
    "SLURM_TASKS_PER_NODE": "2",
}
# Each task of plain `srun -n 2` inside it: no PMI variables at all.
SRUN_TASK0 = {
    **BATCH_SHELL,
    "SLURM_STEP_ID": "0",
    "SLURM_STEPID": "0",
    "SLURM_STEP_NUM_TASKS": "2",
    "SLURM_STEP_NUM_NODES": "1",
    "SLURM_STEP_TASKS_PER_NODE": "2",
}
SRUN_TASK1 = {**SRUN_TASK0, "SLURM_PROCID": "1", "SLURM_LOCALID": "1"}
# A rank of `srun --mpi=pmi2 -n 2` with the mpich wheel (world 2).
SRUN_PMI2 = {
    **SRUN_TASK0,
    "SLURM_STEP_ID": "1",
    "SLURM_MPI_TYPE": "pmi2",
    "PMI_SIZE": "2",
    "PMI_RANK": "0",
    "PMI_FD": "11",
}
# A rank of `mpiexec -n 2` in the batch shell: Hydra's proxy is a 1-task srun step.
MPIEXEC_IN_SLURM = {
    **BATCH_SHELL,
    "SLURM_NTASKS": "1",
    "SLURM_NPROCS": "1",
    "SLURM_STEP_ID": "2",
    "SLURM_STEP_NUM_TASKS": "1",
    "PMI_SIZE": "2",
    "PMI_RANK": "1",
    "MPI_LOCALNRANKS": "2",
    "MPI_LOCALRANKID": "1",
}
# A rank of `mpiexec -n 2` on a laptop.
MPIEXEC_PLAIN = {"PMI_SIZE": "2", "PMI_RANK": "0", "MPI_LOCALNRANKS": "2", "MPI_LOCALRANKID": "0"}


@pytest.mark.parametrize(
    "env",
    [
        {},
        BATCH_SHELL,
        {**BATCH_SHELL, "SLURM_NTASKS": "64"},
        {**SRUN_TASK0, "SLURM_STEP_NUM_TASKS": "1", "SLURM_NTASKS": "1"},
        {"PMI_SIZE": "1", "OMPI_COMM_WORLD_SIZE": "1", "MPI_LOCALNRANKS": "1"},
        {"PMI_SIZE": "", "SLURM_STEP_ID": "0", "SLURM_STEP_NUM_TASKS": "x"},
    ],
    ids=["plain-python", "sbatch-batch-shell", "batch-shell-64", "srun-n1", "sizes-of-1", "garbage"],
)
def test_one_process_launches_pass(env):
    assert launch_evidence(env) is None
    check_launch(1, environ=env)


@pytest.mark.parametrize(
    "env",
    [SRUN_PMI2, MPIEXEC_IN_SLURM, MPIEXEC_PLAIN, SRUN_TASK1],
    ids=["srun-pmi2", "mpiexec-in-sbatch", "mpiexec", "srun-any-with-world-2"],
)
def test_world_of_two_passes(env):
    check_launch(2, environ=env)


@pytest.mark.parametrize(
    "env, var",
    [
        (SRUN_TASK0, "SLURM_STEP_NUM_TASKS=2"),
        (SRUN_TASK1, "SLURM_STEP_NUM_TASKS=2"),
        ({"SLURM_STEPID": "0", "SLURM_PROCID": "3"}, "SLURM_PROCID=3"),
        ({"PMI_SIZE": "2", "PMI_RANK": "0"}, "PMI_SIZE=2"),
        ({"PMIX_SIZE": "4"}, "PMIX_SIZE=4"),
        ({"OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_RANK": "1"}, "OMPI_COMM_WORLD_SIZE=2"),
        ({"MPI_LOCALNRANKS": "8"}, "MPI_LOCALNRANKS=8"),
    ],
    ids=["srun-task0", "srun-task1", "procid-only", "pmi", "pmix", "openmpi", "hydra-local"],
)
def test_singleton_trap_refused(env, var):
    with pytest.raises(UserError) as e:
        check_launch(1, environ=env)
    msg = str(e.value)
    assert "\n" not in msg
    assert var in msg and "world size is 1" in msg
    for fix in ("mpiexec", "srun --mpi=pmi2", "srun --mpi=pmix"):
        assert fix in msg


def test_default_environ_is_os_environ(monkeypatch):
    for k in list(os.environ):
        if k.startswith(("SLURM_", "PMI", "OMPI_", "MPI_LOCAL")):
            monkeypatch.delenv(k)
    check_launch(1)
    monkeypatch.setenv("PMIX_SIZE", "2")
    with pytest.raises(UserError):
        check_launch(1)


# ------------------------------------------------------------------------------ real processes
SNIPPET = (
    "from hpc_lensiam.core.runtime import mpi_world; c, r, s = mpi_world(); "
    "print(f'rank {r} of {s} comm={c is not None}', flush=True)"
)


def clean_env(**extra) -> dict:
    """This environment without any launcher's variables (the tests may run inside a Slurm job)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "PMI", "OMPI_", "MPI_LOCAL", "HYDRA_"))}
    env.update(extra)
    return env


@pytest.mark.slow
def test_mpiexec_two_ranks():
    p = subprocess.run(
        [str(BIN / "mpiexec"), "-n", "2", sys.executable, "-c", SNIPPET],
        cwd=REPO,
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode == 0, p.stderr
    # Hydra forwards each rank's output in chunks that may interleave: match, don't split lines.
    ranks = sorted(re.findall(r"rank (\d+) of (\d+) comm=(True|False)", p.stdout))
    assert ranks == [("0", "2", "True"), ("1", "2", "True")], p.stdout


def test_real_singleton_with_trap_env_refused():
    """A real MPI singleton that finds srun's variables stops; the CLI says so in one line."""
    p = subprocess.run(
        [sys.executable, "-c", SNIPPET],
        cwd=REPO,
        timeout=120,
        env=clean_env(**SRUN_TASK1),
        capture_output=True,
        text=True,
    )
    assert p.returncode != 0 and "UserError" in p.stderr and "SLURM_STEP_NUM_TASKS=2" in p.stderr
    p = subprocess.run(
        [str(BIN / "hpc-lensiam"), "simulate", "--out", "never-written", "--pairs", "4"],
        cwd=REPO,
        timeout=120,
        env=clean_env(**SRUN_TASK0),
        capture_output=True,
        text=True,
    )
    assert "srun --mpi=pmi2" in only_error_line(p)
    assert not (REPO / "never-written").exists()


def _mpi_world_in_a_subprocess(extra_env: dict) -> subprocess.CompletedProcess:
    code = "from hpc_lensiam.core.runtime import mpi_world; print('world', mpi_world()[1:])"
    env = {k: v for k, v in os.environ.items() if k not in ("PMI_SIZE", "PMIX_SIZE", "OMPI_COMM_WORLD_SIZE")}
    env = {k: v for k, v in env.items() if not k.startswith("SLURM_")}
    env.update(PYTHONPATH=str(REPO), MPI4PY_LIBMPI="/nonexistent/libmpi.so.12", **extra_env)
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)


def test_mpi4py_without_an_mpi_library_runs_one_process():
    """mpi4py's PyPI wheel with no MPI library to load (the GPU machine's bare image: `import
    mpi4py.MPI` raises RuntimeError 'cannot load MPI library') is a one-process world with a
    one-line note, as without mpi4py; it was a traceback that stopped `simulate`."""
    p = _mpi_world_in_a_subprocess({})
    assert p.returncode == 0, p.stderr
    assert "world (0, 1)" in p.stdout
    assert "cannot load an MPI library" in p.stderr and "one process" in p.stderr


def test_mpi4py_without_an_mpi_library_under_a_launcher_is_refused():
    """...but where a launcher started several tasks, each would be rank 0: one error line."""
    p = _mpi_world_in_a_subprocess({"PMI_SIZE": "2"})
    assert p.returncode != 0
    assert "cannot load an MPI library" in p.stderr and "PMI_SIZE=2" in p.stderr


@pytest.mark.parametrize(
    "var", ["PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK", "RANK"]
)  # MPICH/Slurm PMI, Open MPI, PMIx, torchrun
def test_a_rank_local_error_names_the_rank_under_every_launcher(var, monkeypatch):
    """A rank other than 0 prefixes its one error line with 'rank N: ' whichever launcher set its rank
    (the prefix read only RANK and PMI_RANK: under Open MPI or PMIx it said 'rank None: ')."""
    from hpc_lensiam.cli import _rank_prefix
    from hpc_lensiam.core.runtime import is_rank0, launcher_rank

    for other in ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK", "RANK"):
        monkeypatch.delenv(other, raising=False)
    assert (launcher_rank(), is_rank0(), _rank_prefix()) == (0, True, "")
    monkeypatch.setenv(var, "3")
    assert (launcher_rank(), is_rank0(), _rank_prefix()) == (3, False, "rank 3: ")
