#!/bin/bash
# SimSiam/LenSiam pretraining on a Slurm cluster: one torchrun per node (srun), NPROC_PER_NODE
# training processes per torchrun, rendezvous on the job's first node.
#
#   DATA=shards/paper sbatch --nodes=2 --gpus-per-node=4 --cpus-per-task=28 --mem-per-cpu=4G slurm/pretrain.sh
#                                                    # the paper's run: 4 GPUs x (1 + 6 workers) = 28 CPUs per node
#   DATA=shards/demo RUN=runs/demo CONFIG=configs/demo.yaml NPROC_PER_NODE=2 sbatch slurm/pretrain.sh   # CPU
#   ENGINE=deepspeed PRECISION=bf16 DATA=... sbatch --nodes=4 --gpus-per-node=8 slurm/pretrain.sh
#
# Environment variables (all optional): DATA (shards/paper), RUN (runs/pretrain), CONFIG
# (configs/paper.yaml: the recipe; the variables below override it), VIEWS (lens|standard), ENGINE
# (ddp|deepspeed), PRECISION (fp32|bf16|fp16), ARCH, EPOCHS, MAX_STEPS, BATCH (per process; global =
# BATCH x nodes x NPROC_PER_NODE), WORKERS (loader processes per training process), EXTRA_ARGS (more
# `hpc-lensiam train` flags), NPROC_PER_NODE (default: the GPUs Slurm gave each node, else 2 on CPU),
# PORT (rendezvous port on the first node; default 29500 + job id mod 1000), VENV (.venv).
#
# CPUs and memory: the one task per node hosts torchrun, NPROC_PER_NODE trainers and each trainer's
# loader workers, all inside that task's cgroup. Request --cpus-per-task = NPROC_PER_NODE x (1 + WORKERS)
# (WORKERS defaults to CONFIG's `workers`, 6 in configs/paper.yaml: 28 for 4 GPUs) and memory per CPU
# (--mem-per-cpu=4G: a trainer's host side with its CUDA context, pinned batches and each worker's
# shuffle buffer fit in about 4 GB per CPU; or --mem=0 for the whole node where the site allows it).
# The script prints a warning when the task got fewer CPUs, and every trainer warns when its
# processes x (1 + workers) exceed the CPUs it may run on (os.sched_getaffinity). The default below
# (2) is the CPU demo's size; a GPU run must pass --cpus-per-task.
#
# Time limit and requeue: Slurm sends the batch shell SIGUSR1 120 s before the limit
# (--signal=B:USR1@120). The trap forwards SIGTERM to the job steps (`scancel --signal=TERM`:
# steps only, not this shell): torchrun passes it to its training processes, which finish the
# current step, save RUN/checkpoints/last.pt atomically and exit; then this script requeues the job
# (`scontrol requeue`), and the requeued job starts again with --resume. The same happens for a
# plain `scancel --signal=TERM JOBID`. Keep one step plus one checkpoint well under 30 s
# (torchrun's grace period before SIGKILL) and under the 120 s warning.
#
# Adapt to your site: add `#SBATCH --partition=...` / `#SBATCH --account=...`, `module load` your
# Python and CUDA (before the venv is used), request GPUs with `--gpus-per-node=G` (NPROC_PER_NODE
# follows) and --cpus-per-task/--mem-per-cpu as above, and set --time.
# Backend: NCCL on GPUs, gloo on CPU, chosen by the code. Logs append to slurm-lensiam-pretrain-JOBID.out.
#SBATCH --job-name=lensiam-pretrain
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --cpus-per-task=2
#SBATCH --time=24:00:00
#SBATCH --signal=B:USR1@120
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%j.out
set -uo pipefail
# Under Slurm the job starts in --chdir (default: the submit dir); by hand, run from the repo.
[ -n "${SLURM_JOB_ID:-}" ] || cd "$(dirname "$0")/.."

VENV=${VENV:-.venv}
DATA=${DATA:-shards/paper}
RUN=${RUN:-runs/pretrain}
CONFIG=${CONFIG:-configs/paper.yaml}
JOB=${SLURM_JOB_ID:-0}
NNODES=${SLURM_NNODES:-1}
PORT=${PORT:-$((29500 + JOB % 1000))}
HEAD=$(scontrol show hostnames "${SLURM_JOB_NODELIST:-localhost}" 2>/dev/null | head -n 1)
HEAD=${HEAD:-localhost}
if [ -z "${NPROC_PER_NODE:-}" ]; then
  GPUS=${SLURM_GPUS_ON_NODE:-$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)}
  NPROC_PER_NODE=$(( ${GPUS:-0} > 0 ? ${GPUS:-0} : 2 ))
fi
# CPUs: one per trainer plus one per loader worker (see the header)
CFG_WORKERS=$( [ -n "$CONFIG" ] && sed -n 's/^workers:[[:space:]]*\([0-9]\+\).*/\1/p' "$CONFIG" 2>/dev/null | head -n 1)
EFF_WORKERS=${WORKERS:-${CFG_WORKERS:-2}}
NEED_CPUS=$(( NPROC_PER_NODE * (1 + EFF_WORKERS) ))
GOT_CPUS=${SLURM_CPUS_PER_TASK:-${SLURM_CPUS_ON_NODE:-0}}
if [ -n "${SLURM_JOB_ID:-}" ] && [ "$GOT_CPUS" -lt "$NEED_CPUS" ]; then
  echo "pretrain.sh: warning: $NPROC_PER_NODE trainer(s) x (1 + $EFF_WORKERS loader workers) need $NEED_CPUS CPUs per node, the task has $GOT_CPUS: submit with sbatch --cpus-per-task=$NEED_CPUS --mem-per-cpu=4G (or lower WORKERS)" >&2
fi
# CPU threads per training process (torchrun would otherwise set 1)
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( ${SLURM_CPUS_PER_TASK:-$NPROC_PER_NODE} / NPROC_PER_NODE > 0 ? ${SLURM_CPUS_PER_TASK:-$NPROC_PER_NODE} / NPROC_PER_NODE : 1 ))}
[ -n "${SLURM_CPUS_PER_TASK:-}" ] && export SRUN_CPUS_PER_TASK=$SLURM_CPUS_PER_TASK

ARGS=(train --data "$DATA" --out "$RUN")
[ -n "$CONFIG" ] && ARGS+=(--config "$CONFIG")
[ -n "${MODE:-}" ] && { echo "pretrain.sh: error: MODE was renamed: use VIEWS=lens|standard (train --views)" >&2; exit 2; }
[ -n "${VIEWS:-}" ] && ARGS+=(--views "$VIEWS")
[ -n "${ENGINE:-}" ] && ARGS+=(--engine "$ENGINE")
[ -n "${PRECISION:-}" ] && ARGS+=(--precision "$PRECISION")
[ -n "${ARCH:-}" ] && ARGS+=(--arch "$ARCH")
[ -n "${EPOCHS:-}" ] && ARGS+=(--epochs "$EPOCHS")
[ -n "${MAX_STEPS:-}" ] && ARGS+=(--max-steps "$MAX_STEPS")
[ -n "${BATCH:-}" ] && ARGS+=(--batch-size "$BATCH")
[ -n "${WORKERS:-}" ] && ARGS+=(--workers "$WORKERS")
# Always --resume: a requeued or resubmitted job, or torchrun restarting its workers after a failure
# (--max-restarts, same arguments), continues from last.pt; with no checkpoint yet it starts fresh.
ARGS+=(--resume)
read -r -a EXTRA <<< "${EXTRA_ARGS:-}"

REQUEUE=0
on_time_limit() {
  echo "pretrain.sh: $(date +%T) time limit near: asking training to checkpoint and stop (job $JOB)"
  REQUEUE=1
  scancel --signal=TERM "$JOB"
}
trap on_time_limit USR1

echo "pretrain.sh: job $JOB restart ${SLURM_RESTART_COUNT:-0}: $NNODES node(s) x $NPROC_PER_NODE process(es), rendezvous $HEAD:$PORT"
echo "pretrain.sh: hpc-lensiam ${ARGS[*]} ${EXTRA[*]:-}"
srun --nodes="$NNODES" --ntasks-per-node=1 --kill-on-bad-exit=1 \
  "$VENV/bin/torchrun" --nnodes "$NNODES" --nproc_per_node "$NPROC_PER_NODE" \
    --rdzv_id "$JOB" --rdzv_backend c10d --rdzv_endpoint "$HEAD:$PORT" \
    -m hpc_lensiam "${ARGS[@]}" "${EXTRA[@]}" &
SRUN=$!
while true; do        # `wait` returns early when the trap runs: wait again until srun has exited
  wait "$SRUN"; STATUS=$?
  kill -0 "$SRUN" 2>/dev/null || break
done

if [ "$REQUEUE" = 1 ]; then
  if [ -f "$RUN/checkpoints/last.pt" ]; then
    echo "pretrain.sh: $(date +%T) checkpoint saved; requeueing job $JOB"
    scontrol requeue "$JOB"
  else
    echo "pretrain.sh: no checkpoint in $RUN; not requeueing" >&2
  fi
fi
exit "$STATUS"
