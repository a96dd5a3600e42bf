#!/bin/bash
# Simulate LenSiam lens pairs into WebDataset shards on a Slurm cluster: one MPI rank per task.
#
#   sbatch slurm/simulate.sh                                   # 100k pairs -> shards/paper (the paper's scale)
#   OUT=shards/test PAIRS=2000 SHARD_SIZE=100 sbatch slurm/simulate.sh
#   sbatch --nodes=4 --ntasks-per-node=64 slurm/simulate.sh    # more ranks: same bytes, faster
#
# Environment variables (all optional): OUT (shards/paper), PAIRS (100000), SHARD_SIZE (1000),
# SEED (0), SAMPLES (pairs|single), PRESET (hst|euclid), PHYSICS (a simulation YAML),
# EXTRA_ARGS (more `hpc-lensiam simulate` flags, e.g. "--cosmos-dir /data/COSMOS_23.5_training_sample"),
# VENV (.venv: the repo's venv from `make install`), LAUNCHER (see below).
#
# Launcher, one variable:
#   LAUNCHER=mpiexec (default)      the venv's mpiexec (PyPI mpich wheel); reads the Slurm allocation.
#   LAUNCHER="srun --mpi=pmi2"      srun with the mpich wheel's PMI-2 support.
#   LAUNCHER="srun --mpi=pmix"      a site MPI built with PMIx (after `module load` of that MPI and
#                                   `pip install mpi4py` built against it).
# Plain `srun` with no --mpi starts N independent "rank 0 of 1" singletons; the simulator detects
# that and stops with an error instead of writing every shard N times.
#
# Adapt to your site: add `#SBATCH --partition=...` / `#SBATCH --account=...`, load modules
# (python, MPI) before the venv is used, size --nodes/--ntasks-per-node to your nodes' cores.
# Output: OUT/shard-*.tar (written atomically) and OUT/manifest.json (last). Resubmitting the same
# job resumes: complete shards are kept, partial ones redone. Needs no GPU.
#SBATCH --job-name=lensiam-simulate
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=2
#SBATCH --cpus-per-task=1
#SBATCH --time=04:00:00
#SBATCH --output=slurm-%x-%j.out
set -euo pipefail
# Under Slurm the job starts in --chdir (default: the submit dir); by hand, run from the repo.
[ -n "${SLURM_JOB_ID:-}" ] || cd "$(dirname "$0")/.."

VENV=${VENV:-.venv}
OUT=${OUT:-shards/paper}
PAIRS=${PAIRS:-100000}
SHARD_SIZE=${SHARD_SIZE:-1000}
SEED=${SEED:-0}
SAMPLES=${SAMPLES:-pairs}
PRESET=${PRESET:-hst}
LAUNCHER=${LAUNCHER:-mpiexec}
NTASKS=${SLURM_NTASKS:-1}

case "$LAUNCHER" in
  mpiexec|mpirun) RUN=("$VENV/bin/mpiexec" -n "$NTASKS") ;;
  *) read -r -a RUN <<< "$LAUNCHER" ;;
esac
ARGS=(simulate --out "$OUT" --pairs "$PAIRS" --shard-size "$SHARD_SIZE" --seed "$SEED"
      --samples "$SAMPLES" --preset "$PRESET")
[ -n "${PHYSICS:-}" ] && ARGS+=(--physics "$PHYSICS")
read -r -a EXTRA <<< "${EXTRA_ARGS:-}"

echo "simulate.sh: ${RUN[*]} hpc-lensiam ${ARGS[*]} ${EXTRA[*]:-} (job ${SLURM_JOB_ID:-none}, $NTASKS tasks)"
exec "${RUN[@]}" "$VENV/bin/hpc-lensiam" "${ARGS[@]}" "${EXTRA[@]}"
