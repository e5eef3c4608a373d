#!/usr/bin/env bash
# The life of a TPU VM job with gcloud: create, copy the code, install, run on every worker, tail
# the logs, delete. Every host of a slice runs the same command; tljax.train --distributed calls
# jax.distributed.initialize(), which reads the slice's topology from the TPU metadata.
#
#   launch/tpu_vm.sh [--dry-run] [OPTIONS] COMMAND [ARGS]
#
# Commands:
#   create                         create the TPU VM (add --spot for a Spot VM)
#   setup                          copy this checkout (git archive of HEAD plus uncommitted edits
#                                  of tracked files), or clone --repo at --ref, to every worker;
#                                  install jax[tpu] and tljax in ~/tljax/.venv on every worker
#   run CONFIG WORKDIR [--config.key=value ...]
#                                  start training on --worker=all in the background; each worker
#                                  logs to its own ~/tljax-logs/NAME.log
#   run-line 'python -m tljax.train ...'
#                                  the same for one line of `tljax.ablate --print-commands`
#   logs [--follow]                tail every worker's log, each line prefixed with its host
#   delete                         delete the TPU VM
#   up CONFIG WORKDIR [...]        create, setup and run
#   sweep FILE                     one TPU VM per line of `tljax.ablate --print-commands` output:
#                                  NAME-1, NAME-2, ... each created, set up and started
#
# Options (or the environment variable in brackets):
#   --name NAME [TPU_NAME, default tljax]   --zone ZONE [ZONE, default us-central2-b]
#   --project PROJECT [PROJECT]             --accelerator TYPE [ACCELERATOR, default v4-8]
#   --version RUNTIME [RUNTIME_VERSION; default by accelerator generation]
#   --spot                                  --repo URL, --ref REV [default main]: clone instead
#   --dry-run: print every command (gcloud, git) instead of running it.
#
# On a slice of several hosts WORKDIR must be a directory every worker sees (an NFS or
# Filestore mount): orbax writes each host's shards of a checkpoint there.
set -euo pipefail

dry_run=0
name=${TPU_NAME:-tljax}
zone=${ZONE:-us-central2-b}
project=${PROJECT:-}
accelerator=${ACCELERATOR:-v4-8}
version=${RUNTIME_VERSION:-}
spot=0
repo=''
ref=main
here=$(cd "$(dirname "$0")/.." && pwd)
# shellcheck source-path=SCRIPTDIR source=_train_line.sh
. "$here/launch/_train_line.sh"

usage() {  # --help: to stdout, exit 0; a wrong call: to stderr, exit 2
  local text
  text=$(sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//')
  if [ "${1:-2}" = 0 ]; then echo "$text"; else echo "$text" >&2; fi
  exit "${1:-2}"
}

# One line a shell can run again: words quoted only where they need it (--flag='value').
quote() {
  local word flag words=()
  for word in "$@"; do
    flag=''
    if [[ $word =~ ^(--[A-Za-z0-9_.-]+=)(.*)$ ]]; then
      flag=${BASH_REMATCH[1]}
      word=${BASH_REMATCH[2]}
    fi
    if [[ $word =~ ^[A-Za-z0-9_./=:,@%+~-]*$ ]]; then
      words+=("$flag$word")
    elif [[ $word == *\'* && $word != *[\"\$\`\\!]* ]]; then
      words+=("$flag\"$word\"")
    else
      words+=("$flag'${word//\'/\'\\\'\'}'")
    fi
  done
  echo "${words[*]}"
}

# Runs a command, or prints it under --dry-run.
x() {
  if [ "$dry_run" = 1 ]; then
    quote "$@"
  else
    "$@"
  fi
}

runtime_version() {
  if [ -n "$version" ]; then
    echo "$version"
    return
  fi
  case $accelerator in
    v5litepod-*|v5e-*) echo v2-alpha-tpuv5-lite ;;
    v5p-*) echo v2-alpha-tpuv5 ;;
    v6e-*) echo v2-alpha-tpuv6e ;;
    *) echo tpu-ubuntu2204-base ;;
  esac
}

location() {
  echo "--zone=$zone"
  if [ -n "$project" ]; then echo "--project=$project"; fi
}

tpu() {  # gcloud compute tpus tpu-vm SUBCOMMAND ... with this VM's zone and project
  local subcommand=$1
  shift
  local where
  mapfile -t where < <(location)
  x gcloud compute tpus tpu-vm "$subcommand" "$@" "${where[@]}"
}

on_all_workers() {
  tpu ssh "$name" --worker=all --command="$1"
}

create() {
  local extra=()
  if [ "$spot" = 1 ]; then extra+=(--spot); fi
  tpu create "$name" "--accelerator-type=$accelerator" "--version=$(runtime_version)" \
    "${extra[@]}"
}

setup() {
  if [ -n "$repo" ]; then
    on_all_workers "rm -rf ~/tljax && git clone --quiet $(quote "$repo") ~/tljax && \
git -C ~/tljax checkout --quiet $(quote "$ref")"
  else
    local archive tree
    archive=${TMPDIR:-/tmp}/tljax-$name.tar.gz
    tree=$(git -C "$here" stash create 2>/dev/null || true)
    x git -C "$here" archive --format=tar.gz -o "$archive" "${tree:-HEAD}"
    tpu scp "$archive" "$name:~/tljax.tar.gz" --worker=all
    on_all_workers "rm -rf ~/tljax && mkdir -p ~/tljax && tar -xzf ~/tljax.tar.gz -C ~/tljax"
  fi
  on_all_workers "python3 -m venv ~/tljax/.venv && ~/tljax/.venv/bin/pip install -q -U pip && \
~/tljax/.venv/bin/pip install -q 'jax[tpu]' -e ~/tljax"
}

# Starts `python -m tljax.train ARGS --distributed` on every worker, detached from the ssh session.
start() {
  on_all_workers "mkdir -p ~/tljax-logs && cd ~/tljax && nohup .venv/bin/python \
$(quote -m tljax.train "$@" --distributed) >~/tljax-logs/$name.log 2>&1 </dev/null &"
}

check_run_args() {  # CONFIG WORKDIR [--config.KEY=VALUE | --fresh ...], before anything runs
  if [ "$#" -lt 2 ]; then
    echo "error: $command needs CONFIG and WORKDIR (got ${#} argument(s)): $0 $command" \
      "CONFIG[:ARG] WORKDIR [--config.KEY=VALUE ...]" >&2
    exit 2
  fi
  local arg
  for arg in "${@:3}"; do  # only what tljax.train takes; an option of this script is refused
    if [[ $arg != --config.* && $arg != --fresh ]]; then
      echo "error: '$arg' after '$command CONFIG WORKDIR' is not a --config.KEY=VALUE override" \
        "or --fresh; options of this script (--dry-run, --name, ...) go before the command" >&2
      exit 2
    fi
  done
}

no_args() {  # a command that takes no arguments refuses any (e.g. a --dry-run put after it)
  if [ "$#" -gt 0 ]; then
    echo "error: '$command' takes no arguments, got: $*; options of this script" \
      "(--dry-run, --name, ...) go before the command" >&2
    exit 2
  fi
}

run() {
  start "--config=$1" "--workdir=$2" "${@:3}"
}

run_line() {  # LINE [WHERE]
  local train_args
  train_line_args python3 "$1" "${2:-the run-line argument}"
  start "${train_args[@]}"
}

logs() {
  local tail_args='-n 50'
  if [ "${1:-}" = --follow ]; then tail_args='-n 50 -F'; fi
  on_all_workers "tail $tail_args ~/tljax-logs/$name.log | sed \"s/^/[\$(hostname)] /\""
}

delete() {
  tpu delete "$name" --quiet
}

sweep() {
  if [ "$#" != 1 ] || [ ! -f "$1" ]; then
    echo "error: sweep needs the file that tljax.ablate --print-commands wrote, got: $*" >&2
    exit 2
  fi
  local base=$name line lines=() index train_args
  while IFS= read -r line || [ -n "$line" ]; do
    line=${line%$'\r'}  # a file saved with Windows line ends
    if [ -n "${line// /}" ]; then lines+=("$line"); fi
  done <"$1"
  for index in "${!lines[@]}"; do  # every line checked before the first VM is created
    train_line_args python3 "${lines[index]}" "line $((index + 1)) of $1"
  done
  for index in "${!lines[@]}"; do
    name=$base-$((index + 1))
    create
    setup
    run_line "${lines[index]}"
  done
  name=$base
}

value_of() {  # OPTION [VALUE ...]: the option's value, or exit 2 naming the option
  if [ "$#" -lt 2 ] || [[ $2 == --* ]]; then
    echo "error: $1 needs a value" >&2
    exit 2
  fi
  echo "$2"
}

while [ "$#" -gt 0 ]; do
  case $1 in
    --dry-run) dry_run=1 ;;
    --spot) spot=1 ;;
    --name) name=$(value_of "$@"); shift ;;
    --zone) zone=$(value_of "$@"); shift ;;
    --project) project=$(value_of "$@"); shift ;;
    --accelerator) accelerator=$(value_of "$@"); shift ;;
    --version) version=$(value_of "$@"); shift ;;
    --repo) repo=$(value_of "$@"); shift ;;
    --ref) ref=$(value_of "$@"); shift ;;
    -h|--help) usage 0 ;;
    -*) echo "error: unknown option $1" >&2; exit 2 ;;
    *) break ;;
  esac
  shift
done
# The name goes into remote shell commands (log paths) and file names: a GCP resource name only
# (lowercase letters, digits, hyphens; a letter first), so it never needs quoting.
if ! [[ $name =~ ^[a-z]([-a-z0-9]{0,50}[a-z0-9])?$ ]]; then
  echo "error: --name (TPU_NAME) '$name' must be 1-52 lowercase letters, digits or hyphens, \
starting with a letter and not ending with a hyphen" >&2
  exit 2
fi
for pair in "zone:$zone" "project:$project" "accelerator:$accelerator" "version:$version"; do
  if ! [[ ${pair#*:} =~ ^[A-Za-z0-9._-]*$ ]]; then
    echo "error: --${pair%%:*} '${pair#*:}' may hold only letters, digits, '.', '_' and '-'" >&2
    exit 2
  fi
done
if [ "$#" -lt 1 ]; then usage; fi
command=$1
shift
case $command in
  create) no_args "$@"; create ;;
  setup) no_args "$@"; setup ;;
  run) check_run_args "$@"; run "$@" ;;
  run-line) if [ "$#" != 1 ]; then usage; fi; run_line "$1" ;;
  logs)
    if [ "$#" -gt 1 ] || { [ "$#" = 1 ] && [ "$1" != --follow ]; }; then
      echo "error: 'logs' takes only --follow, got: $*; options of this script (--dry-run," \
        "--name, ...) go before the command" >&2
      exit 2
    fi
    logs "$@" ;;
  delete) no_args "$@"; delete ;;
  up) check_run_args "$@"; create; setup; run "$@" ;;
  sweep) sweep "$@" ;;
  *) echo "error: unknown command $command" >&2; usage ;;
esac
