#!/usr/bin/env bash
# N local processes joined by jax.distributed on 127.0.0.1, each with its own simulated CPU
# devices: what the hosts of a TPU VM slice do, on one machine.
#   launch/multiprocess.sh N CONFIG[:ARG] WORKDIR [--config.a.b=v ...]
# Environment: DEVICES_PER_PROCESS (default 4, a TPU v4/v5 host's chips), PORT (the
# coordinator's; default random), PYTHON (else the active environment's python, else .venv:
# launch/_python.sh). Process i appends to WORKDIR/process_i.log; the exit
# status is that of the lowest-numbered process that failed (75: preempted; rerun to resume).
set -euo pipefail
if [ "$#" -lt 3 ]; then
  echo "usage: $0 N CONFIG[:ARG] WORKDIR [--config.key=value ...]" >&2
  exit 2
fi
num=$1
config=$2
workdir=$3
shift 3
devices=${DEVICES_PER_PROCESS:-4}
here=$(cd "$(dirname "$0")/.." && pwd)
# shellcheck source-path=SCRIPTDIR source=_python.sh
source "$here/launch/_python.sh"
python=$(pick_python "$here")
require_python "$python"
port=${PORT:-$((20000 + RANDOM % 20000))}
for pair in "N:$num" "DEVICES_PER_PROCESS:$devices" "PORT:$port"; do
  value=${pair#*:}
  if ! [[ $value =~ ^[1-9][0-9]{0,4}$ ]] || { [ "${pair%%:*}" = PORT ] && [ "$value" -gt 65535 ]; }; then
    echo "error: ${pair%%:*}='$value' must be a positive integer (PORT at most 65535)" >&2
    exit 2
  fi
done
if [ -e "$workdir" ] && [ ! -d "$workdir" ]; then
  echo "error: WORKDIR '$workdir' exists and is not a directory; use another" >&2
  exit 2
fi
mkdir -p "$workdir"
pids=()
# SIGTERM or Ctrl-C to the launcher goes to every process, which save together and exit 75.
# shellcheck disable=SC2329  # called by the traps below
forward() {
  kill -s "$1" "${pids[@]}" 2>/dev/null || true
}
trap 'forward TERM' TERM
trap 'forward INT' INT
for ((i = 0; i < num; i++)); do  # logs are appended: a rerun keeps the earlier run's
  echo "=== $(date '+%Y-%m-%d %H:%M:%S') process $i of $num: $config $*" >>"$workdir/process_$i.log"
  JAX_PLATFORMS=cpu "$python" -m tljax.train --config="$config" --workdir="$workdir" \
    --coordinator_address="127.0.0.1:$port" --num_processes="$num" --process_id="$i" \
    --cpu_devices="$devices" "$@" >>"$workdir/process_$i.log" 2>&1 &
  pids+=("$!")
done
status=0
for pid in "${pids[@]}"; do
  code=0
  # A trapped signal interrupts `wait` (status > 128) while the process runs on: wait again.
  while true; do
    wait "$pid" && code=0 || code=$?
    if [ "$code" -le 128 ] || ! kill -0 "$pid" 2>/dev/null; then break; fi
  done
  if [ "$status" = 0 ]; then status=$code; fi
done
if [ "$status" != 0 ] && [ "$status" != 75 ]; then  # say why here, not only in the logs
  for ((i = 0; i < num; i++)); do
    line=$(tail -n 200 "$workdir/process_$i.log" | grep -m1 '^error:' || true)
    if [ -z "$line" ] && [ -s "$workdir/process_$i.log" ]; then  # no error line: its last one
      line="error: process $i exited with status $status: $(tail -n 1 "$workdir/process_$i.log")"
    fi
    if [ -n "$line" ]; then
      echo "$line (process $i; all of it in $workdir/process_$i.log)" >&2
      break
    fi
  done
fi
exit "$status"
