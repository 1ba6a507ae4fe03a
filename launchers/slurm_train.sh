#!/bin/bash
# dopsd on Slurm: one training process per GPU on every allocated node, preemption-safe.
#
#   sbatch launchers/slurm_train.sh CONFIG.yaml [--set key=value ...] [--dry-run]
#   sbatch --nodes=4 --gpus-per-node=8 --ntasks-per-node=8 --time=48:00:00 launchers/slurm_train.sh ...
#
# Every #SBATCH default below can be overridden on the sbatch command line. Set ntasks-per-node to the
# number of GPUs per node: each task is one rank (RANK/WORLD_SIZE/LOCAL_RANK come from SLURM_PROCID/
# SLURM_NTASKS/SLURM_LOCALID). The master address is the first node's NodeAddr from scontrol (node names
# need not resolve). The trainer runs with --resume latest, so a requeued job continues where it stopped.
#
# Preemption: Slurm sends USR1 to this script 300 s before the time limit (--signal=B:USR1@300). It is
# forwarded to every rank; the ranks finish the current step, write a complete checkpoint, note
# "preempted" in the job's status file and exit; this script then requeues the job. SIGTERM (scancel -s
# TERM, preemption) is handled the same way by the ranks. A run that reached train.steps is not requeued.
#
# Environment knobs: DOPSD_PYTHON (interpreter, default: python3 on PATH), DOPSD_LOG_DIR (per-job logs,
# default: logs), MASTER_PORT (default: derived from the job id), DOPSD_FAULT_SKIP_RANKS (comma-separated
# ranks that do NOT start: fault injection for testing the rendezvous timeout).
#SBATCH --job-name=dopsd
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=8
#SBATCH --time=24:00:00
#SBATCH --signal=B:USR1@300
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=dopsd-%x-%j.out
set -uo pipefail

CONFIG="${1:-}"
if [[ -z "$CONFIG" || "$CONFIG" == -* ]]; then
    echo "usage: sbatch launchers/slurm_train.sh CONFIG.yaml [--set key=value ...] [--dry-run]" >&2
    exit 2
fi
shift
DRY_RUN=0
ARGS=()
for a in "$@"; do
    if [[ "$a" == "--dry-run" ]]; then DRY_RUN=1; else ARGS+=("$a"); fi
done

PYTHON="${DOPSD_PYTHON:-python3}"
LOG_DIR="${DOPSD_LOG_DIR:-logs}/${SLURM_JOB_NAME:-dopsd}-${SLURM_JOB_ID:-local}"
mkdir -p "$LOG_DIR"

FIRST_NODE=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
MASTER_ADDR=$(scontrol show node "$FIRST_NODE" | grep -oE 'NodeAddr=[^ ]+' | head -n 1 | cut -d= -f2)
export MASTER_ADDR="${MASTER_ADDR:-$FIRST_NODE}"
export MASTER_PORT="${MASTER_PORT:-$(( 20000 + SLURM_JOB_ID % 20000 ))}"
export PYTHONUNBUFFERED=1
# Ranks that stop on a signal exit 0 (srun --kill-on-bad-exit would otherwise kill the slower ones while
# they finish) and leave "preempted" in the status file.
export DOPSD_STATUS_FILE="${LOG_DIR}/status"
export DOPSD_PREEMPT_EXIT_CODE=0
rm -f "$DOPSD_STATUS_FILE"

echo "[dopsd] job ${SLURM_JOB_ID} restart ${SLURM_RESTART_COUNT:-0}: nodes=${SLURM_JOB_NODELIST} (${SLURM_JOB_NUM_NODES} nodes)" \
     "ranks=${SLURM_NTASKS} master=${MASTER_ADDR}:${MASTER_PORT} logs=${LOG_DIR}"
echo "[dopsd] command: ${PYTHON} -m dopsd.train --config ${CONFIG} --resume latest ${ARGS[*]}"
if (( DRY_RUN )); then
    for node in $(scontrol show hostnames "$SLURM_JOB_NODELIST"); do
        addr=$(scontrol show node "$node" | grep -oE 'NodeAddr=[^ ]+' | head -n 1 | cut -d= -f2)
        echo "[dopsd] plan: node ${node} (${addr}) runs ${SLURM_NTASKS_PER_NODE:-?} ranks"
    done
    echo "[dopsd] dry run: nothing started"
    exit 0
fi

# One task per rank; a task that dies takes the step down (--kill-on-bad-exit) instead of leaving its
# peers waiting in a collective.
srun --kill-on-bad-exit=1 --output="${LOG_DIR}/rank-%t.log" --export=ALL \
    bash -c 'for r in ${DOPSD_FAULT_SKIP_RANKS//,/ }; do [[ "$r" == "$SLURM_PROCID" ]] && exit 0; done
             exec "$0" -m dopsd.train "$@"' "$PYTHON" --config "$CONFIG" --resume latest "${ARGS[@]}" &
SRUN_PID=$!

forward() {
    echo "[dopsd] $1 received: asking every rank to checkpoint and stop"
    scancel --signal="$1" "${SLURM_JOB_ID}" 2>/dev/null || kill -s "$1" "$SRUN_PID"
}
trap 'forward USR1' USR1
trap 'forward TERM' TERM

# `wait` returns early when a trapped signal arrives: keep waiting for srun itself.
while true; do
    wait "$SRUN_PID"
    rc=$?
    kill -0 "$SRUN_PID" 2>/dev/null || break
done

if (( rc == 0 )) && grep -q '^preempted' "$DOPSD_STATUS_FILE" 2>/dev/null; then
    echo "[dopsd] ranks checkpointed and stopped ($(cat "$DOPSD_STATUS_FILE")): requeueing job ${SLURM_JOB_ID}"
    scontrol requeue "${SLURM_JOB_ID}"
    exit 0
fi
echo "[dopsd] training exited with ${rc}"
exit "$rc"
