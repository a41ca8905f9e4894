#!/usr/bin/env bash
# Start N ginseng processes on this machine, connected through jax.distributed.
#
#   launch/local.sh N DEVICES_PER_PROCESS [hydra overrides...]
#
# Each process gets GINSENG_PROCESS_ID / GINSENG_NUM_PROCESSES, the coordinator address
# (127.0.0.1 and a free port) and, on CPU, DEVICES_PER_PROCESS virtual devices. On a GPU machine
# process i sees GPUs [i*DEVICES_PER_PROCESS, (i+1)*DEVICES_PER_PROCESS) through
# CUDA_VISIBLE_DEVICES. All processes write into one run directory (GINSENG_RUN_DIR, created
# here unless already set). Waits for all; if one fails, the others are stopped and the script
# exits with that process's exit code. Logs: <run dir>/process-<i>.log (process 0 also prints).
#
# Example: launch/local.sh 2 2 trainer.epochs=5 model.hidden_dim=128
set -euo pipefail

usage="usage: $0 N DEVICES_PER_PROCESS [hydra overrides...]"
if [[ $# -lt 2 ]]; then
    echo "$usage" >&2
    exit 2
fi
N=$1
DEVICES=$2
shift 2
if ! [[ "$N" =~ ^[1-9][0-9]*$ && "$DEVICES" =~ ^[1-9][0-9]*$ ]]; then
    echo "N and DEVICES_PER_PROCESS must be positive integers, got N='$N' DEVICES_PER_PROCESS='$DEVICES'" >&2
    echo "$usage" >&2
    exit 2
fi

PYTHON=${PYTHON:-python}
PORT=${GINSENG_PORT:-$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()')}
export GINSENG_COORDINATOR="127.0.0.1:${PORT}"
export GINSENG_NUM_PROCESSES="$N"
export GINSENG_RUN_DIR=${GINSENG_RUN_DIR:-"outputs/local-$(date +%Y-%m-%d_%H-%M-%S)-${PORT}"}
mkdir -p "$GINSENG_RUN_DIR"
echo "ginseng: $N processes x $DEVICES devices, coordinator $GINSENG_COORDINATOR, run dir $GINSENG_RUN_DIR" >&2

# Virtual CPU devices for CPU runs (ignored by GPU backends), replacing any count already set.
BASE_XLA_FLAGS=$(echo "${XLA_FLAGS:-}" | sed -E 's/--xla_force_host_platform_device_count=[0-9]+//g')

pids=()
cleanup() {
    for pid in "${pids[@]}"; do
        kill "$pid" 2>/dev/null || true
    done
}
trap 'cleanup; exit 130' INT
trap 'cleanup; exit 143' TERM

for ((i = 0; i < N; i++)); do
    log="$GINSENG_RUN_DIR/process-$i.log"
    (
        export GINSENG_PROCESS_ID=$i
        export XLA_FLAGS="$BASE_XLA_FLAGS --xla_force_host_platform_device_count=$DEVICES"
        if [[ -z "${CUDA_VISIBLE_DEVICES:-}" ]] && command -v nvidia-smi >/dev/null 2>&1; then
            export CUDA_VISIBLE_DEVICES=$(seq -s, $((i * DEVICES)) $(((i + 1) * DEVICES - 1)))
        fi
        if [[ $i -eq 0 ]]; then
            # The console gets the run without gloo's connection chatter ("[Gloo] Rank 0 is
            # connected to 1 peer ranks..."); the log file keeps everything.
            exec "$PYTHON" -m ginseng.launch distributed=local "$@" > >(tee "$log" | grep --line-buffered -v '^\[Gloo\]') 2>&1
        else
            exec "$PYTHON" -m ginseng.launch distributed=local "$@" >"$log" 2>&1
        fi
    ) &
    pids+=($!)
done

# Wait for the processes one by one; the first failure stops the others.
status=0
running=("${pids[@]}")
while [[ ${#running[@]} -gt 0 ]]; do
    set +e
    wait -n -p done_pid "${running[@]}"
    rc=$?
    set -e
    still=()
    for pid in "${running[@]}"; do
        [[ "$pid" != "${done_pid:-}" ]] && still+=("$pid")
    done
    running=("${still[@]+"${still[@]}"}")
    if [[ $rc -ne 0 && $status -eq 0 ]]; then
        status=$rc
        for ((i = 0; i < N; i++)); do
            if [[ "${pids[$i]}" == "${done_pid:-}" ]]; then
                echo "ginseng: process $i exited with code $rc (log: $GINSENG_RUN_DIR/process-$i.log); stopping the others" >&2
            fi
        done
        cleanup
    fi
done
exit $status
