# Sourced by tpu_vm.sh and slurm.sbatch (not run on its own).
#
# train_line_args PYTHON LINE WHERE: puts the arguments of one `python -m tljax.train ...` line
# (as `tljax.ablate --print-commands` writes it) in the array `train_args`. The line is split as
# a shell would split it, by Python's shlex, and never run; anything else exits 2 naming WHERE.
train_line_args() {
  local words
  mapfile -d '' -t words < <("$1" -c \
    'import shlex, sys; sys.stdout.write("".join(w + "\0" for w in shlex.split(sys.argv[1])))' \
    "$2" 2>/dev/null)
  if [ "${#words[@]}" -lt 3 ] || [ "${words[1]}" != -m ] || [ "${words[2]}" != tljax.train ]; then
    echo "error: $3 is not a 'python -m tljax.train ...' line: $2" >&2
    exit 2
  fi
  # shellcheck disable=SC2034  # read by the script that sources this file
  train_args=("${words[@]:3}")
}
