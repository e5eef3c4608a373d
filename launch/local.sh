#!/usr/bin/env bash
# Run one training job on this machine: launch/local.sh CONFIG[:ARG] WORKDIR [--config.a.b=v ...]
# The interpreter: $PYTHON, else the active environment's python, else .venv (launch/_python.sh).
set -euo pipefail
if [ "$#" -lt 2 ]; then
  echo "usage: $0 CONFIG[:ARG] WORKDIR [--config.key=value ...]" >&2
  exit 2
fi
config=$1
workdir=$2
shift 2
here=$(cd "$(dirname "$0")/.." && pwd)
# shellcheck source-path=SCRIPTDIR source=_python.sh
source "$here/launch/_python.sh"
python=$(pick_python "$here")
require_python "$python"
exec "$python" -m tljax.train --config="$config" --workdir="$workdir" "$@"
