# shellcheck shell=bash
# Sourced by the launch scripts. pick_python ROOT prints the interpreter to run tljax with: $PYTHON
# if set; else the active virtual or conda environment's python (tljax installed there with
# `pip install -e .`); else ROOT/.venv/bin/python (what `make` builds); else python3 on PATH.
pick_python() {
  if [ -n "${PYTHON:-}" ]; then
    echo "$PYTHON"
  elif [ -n "${VIRTUAL_ENV:-}" ] && [ -x "$VIRTUAL_ENV/bin/python" ]; then
    echo "$VIRTUAL_ENV/bin/python"
  elif [ -n "${CONDA_PREFIX:-}" ] && [ -x "$CONDA_PREFIX/bin/python" ]; then
    echo "$CONDA_PREFIX/bin/python"
  elif [ -x "$1/.venv/bin/python" ]; then
    echo "$1/.venv/bin/python"
  else
    command -v python3 || echo python3
  fi
}

# require_python PYTHON: one error line and exit 2 unless PYTHON runs and imports jax and tljax.
require_python() {
  if ! "$1" -c 'import jax, tljax' >/dev/null 2>&1; then
    echo "error: the interpreter '$1' cannot run tljax (it does not exist, or lacks jax or tljax);" \
      "set PYTHON to one that can, activate the environment tljax is installed in, or run make install" >&2
    exit 2
  fi
}
