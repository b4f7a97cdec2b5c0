# Sourced by every shell script of the project, with ROOT set to the repository root: PY is $PYTHON if set, else
# the project's .venv (made by `make setup`), else python3; this checkout's megatron_patch comes first on
# PYTHONPATH, whichever interpreter runs. POSIX sh, for scripts run with `sh` as upstream runs them.
if [ -n "${PYTHON:-}" ]; then
  PY=$PYTHON
elif [ -x "$ROOT/.venv/bin/python" ]; then
  PY=$ROOT/.venv/bin/python
else
  PY=python3
fi
PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONPATH
