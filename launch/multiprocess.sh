#!/usr/bin/env bash
# N local processes joined by jax.distributed on 127.0.0.1, each with its own simulated CPU
# devices: what a TPU VM slice does, on one machine.
#   launch/multiprocess.sh N DEVICES_PER_PROCESS CONFIG[:ARG] WORKDIR [--config.a.b=v ...]
set -euo pipefail
if [ "$#" -lt 4 ]; then
  echo "usage: $0 N DEVICES_PER_PROCESS CONFIG[:ARG] WORKDIR [--config.key=value ...]" >&2
  exit 2
fi
num=$1
devices=$2
config=$3
workdir=$4
shift 4
here=$(cd "$(dirname "$0")/.." && pwd)
python=${PYTHON:-$here/.venv/bin/python}
port=${PORT:-$((20000 + RANDOM % 20000))}
mkdir -p "$workdir"
pids=()
for ((i = 0; i < num; i++)); do
  JAX_PLATFORMS=cpu "$python" -m tljax.train --config="$config" --workdir="$workdir" \
    --coordinator_address="127.0.0.1:$port" --num_processes="$num" --process_id="$i" \
    --cpu_devices="$devices" "$@" >"$workdir/process_$i.log" 2>&1 &
  pids+=("$!")
done
status=0
for pid in "${pids[@]}"; do
  wait "$pid" || status=$?
done
exit "$status"
