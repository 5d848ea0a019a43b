#!/usr/bin/env bash
# GPU check (issue 12): environment, CUDA tests, both benchmarks, lmms-eval and accelerate on a
# full-size random-weight LLaVA, lmms-eval on tiny Qwen-VL and OneVision checkpoints (issue 14), as
# one Markdown report ($OUT/gpu_check.md, else runs/gpu_check.md).
# Without a GPU it runs the reduced CPU mode (what CI runs). Options: see scripts/gpu_check.py.
#   bash scripts/gpu_check.sh [--budget SECONDS] [--steps NAME,...] [--out FILE]
# Offline GPU machine: run bash scripts/fetch_gpu_wheels.sh where pip works, carry .whl/ along; the
# wheels are installed here into /tmp/site, as the device tool's README says.
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 PIP_ROOT_USER_ACTION=ignore
# Only where lmms-eval is missing (the GPU machine): here the wheels would shadow a working install.
if compgen -G ".whl/*.whl" >/dev/null && ! "$PYTHON" -c "import lmms_eval" 2>/dev/null; then
  if "$PYTHON" -m pip install -q --disable-pip-version-check --no-index --no-deps --no-compile --no-cache-dir \
      --upgrade --target /tmp/site .whl/*.whl; then
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  else
    echo "gpu_check: installing the carried wheels failed; the steps that need them will say so" >&2
  fi
fi
# lmms-eval finds the patch through otprune's entry point: install this checkout (editable, offline).
if ! "$PYTHON" -c "import importlib.metadata as m, sys; sys.exit(not any(e.name == 'otprune' for e in m.entry_points(group='lmms_eval.models')))"; then
  "$PYTHON" -m pip install -q --disable-pip-version-check --no-index --no-deps --no-build-isolation -e . \
    || echo "gpu_check: installing otprune failed; the lmms-eval steps will say so" >&2
fi
exec "$PYTHON" scripts/gpu_check.py "$@"
