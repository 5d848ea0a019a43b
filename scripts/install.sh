#!/usr/bin/env bash
# Install otprune and what it runs with into $PYTHON (default python3), by default from the lock:
# every package at the exact version locks/<environment>.txt names (bash scripts/lock.sh makes
# them), so that every machine, on every day, gets the stack CI tested. Safe to re-run.
#
#   bash scripts/install.sh           # the library: torch, numpy, POT              (locks/base.txt)
#   bash scripts/install.sh --llava   # + transformers, lmms-eval, llava-torch and
#                                     #   matplotlib: the patch, the harness, its figures (locks/llava.txt)
#   bash scripts/install.sh --test    # + pytest, triton: the tests                 (locks/test.txt)
#   bash scripts/install.sh --vlm     # --llava + torchvision, qwen-vl-utils for lmms-eval's
#                                     #   Qwen-VL and OneVision models              (locks/vlm.txt)
#   ... --latest                      # no lock: the newest releases pyproject's bounds allow (pip)
#
# An installed torch is kept (a CUDA build on a GPU machine); otherwise the lock's torch version is
# installed with pip. The lock is installed with uv (INSTALLER=pip for pip), every line --no-deps:
# the lock is the whole dependency tree.
set -euo pipefail
export PIP_ROOT_USER_ACTION=ignore
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
INSTALLER=${INSTALLER:-uv}
UV_VERSION=0.13.9
environment=base latest=0
for option in "$@"; do
  case "$option" in
    --llava | --test | --vlm)
      if [ "$environment" != base ]; then
        echo "install.sh: $option after --$environment; give one of --llava, --test, --vlm" >&2
        exit 2
      fi
      environment=${option#--} ;;
    --latest) latest=1 ;;
    *) echo "install.sh: unknown option '$option'; allowed: --llava, --test, --vlm, --latest" >&2; exit 2 ;;
  esac
done
case "$INSTALLER" in uv | pip) ;; *) echo "install.sh: INSTALLER=$INSTALLER; allowed: uv, pip" >&2; exit 2 ;; esac
lock=locks/$environment.txt
[ -f "$lock" ] || { echo "install.sh: $lock is missing; bash scripts/lock.sh makes locks/{base,llava,test,vlm}.txt" >&2; exit 1; }
PIP=("$PY" -m pip install -q --disable-pip-version-check)
# pip 23's resolver crashes on lmms-eval's dependency tree; 24+ resolves it.
"$PY" -c "import pip, sys; sys.exit(int(pip.__version__.split('.')[0]) < 24)" || "${PIP[@]}" "pip>=24"

locked_torch=$(grep -o '^torch==[^ ]*' "$lock" | cut -d= -f3)
torch_version=$("$PY" -c "from importlib.metadata import version; print(version('torch'))" 2>/dev/null || true)
if [ -z "$torch_version" ]; then
  # The version without its local part: pip takes the CPU build where one lies on disk (this
  # workplace), else PyPI's build of the same release.
  "${PIP[@]}" "torch==${locked_torch%%+*}"
  torch_version=$("$PY" -c "from importlib.metadata import version; print(version('torch'))")
fi

if [ "$latest" = 1 ]; then
  constraints=$(mktemp)
  trap 'rm -f "$constraints"' EXIT
  echo "torch==$torch_version" >"$constraints"
  # The lock's first line names the extras of its environment (scripts/lock.sh chooses them).
  extras=$(sed -n '1s/^# extras: *//p' "$lock")
  "${PIP[@]}" --upgrade --upgrade-strategy eager -c "$constraints" -e ".${extras:+[$extras]}"
  if [ "$environment" != base ]; then
    "${PIP[@]}" --no-deps "$(grep '^llava-torch==' "$lock")"
  fi
else
  # The lock less torch. A kept torch (a CUDA build) keeps what it requires where the lock's pin
  # does not satisfy it (its exact triton, say): its own install chose those.
  requirements=$(mktemp)
  trap 'rm -f "$requirements"' EXIT
  "$PY" - "$lock" "$torch_version" "$locked_torch" >"$requirements" <<'EOF'
import re
import sys
from importlib.metadata import requires

from pip._vendor.packaging.requirements import Requirement

lock, installed, locked = sys.argv[1:]


def normalise(name):
    return re.sub(r"[-_.]+", "-", name).lower()


if installed != locked:
    print(f"install.sh: keeping torch {installed} (the lock has {locked})", file=sys.stderr)
needs = {}
for text in requires("torch") or []:
    requirement = Requirement(text)
    if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
        needs[normalise(requirement.name)] = requirement.specifier
for line in open(lock):
    if not line[:1].isalnum():
        continue
    name, version = line.split("==")[0].strip(), line.split("==")[1].split()[0]
    if normalise(name) == "torch":
        continue
    if normalise(name) in needs and not needs[normalise(name)].contains(version, prereleases=True):
        print(f"install.sh: keeping torch's own {name} (the lock's {version} is not {needs[normalise(name)]})", file=sys.stderr)
        continue
    print(line.strip())
EOF
  if [ "$INSTALLER" = uv ]; then
    "$PY" -m uv --version >/dev/null 2>&1 || "${PIP[@]}" "uv==$UV_VERSION"
    # Byte-compiled as pip does: where PYTHONDONTWRITEBYTECODE is set (this workplace) nothing
    # else writes .pyc files, and every lmms-eval process would compile its imports again
    # (measured: 27-30 s per tiny-model run instead of 14-18 s).
    UV=("$PY" -m uv pip install -q --python "$PY" --no-deps --compile-bytecode)
  else
    UV=("${PIP[@]}" --no-deps)
  fi
  "${UV[@]}" -r "$requirements"
  "${UV[@]}" -e .
fi

if [ "$environment" != base ] && [ "$environment" != vlm ] && ! "$PY" -c "import torchvision" >/dev/null 2>&1; then
  # lmms-eval pulls torchvision (--latest, or left from an earlier install); a wheel built for
  # another torch breaks imports ("operator torchvision::nms does not exist"). Only --vlm needs it.
  "$PY" -m pip uninstall -q -y torchvision >/dev/null 2>&1 || true
fi
if [ "$environment" = vlm ] && ! "$PY" -c "import torchvision" >/dev/null 2>&1; then
  # PyPI's torchvision is a CUDA build: on a CPU torch its operators cannot load and its import
  # fails; the hook lets it import (what transformers uses of it is pure Python). See the hook.
  if [ "$("$PY" -c "import torch; print(torch.version.cuda is None and torch.version.hip is None)")" = False ]; then
    echo "install.sh: torchvision does not import against this GPU build of torch; install the matching torchvision" >&2
    exit 1
  fi
  site=$("$PY" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
  cp scripts/cpu_torchvision_hook.py "$site/_otprune_cpu_torchvision.py"
  echo "import _otprune_cpu_torchvision" >"$site/_otprune_cpu_torchvision.pth"
  "$PY" -c "import torchvision" || { echo "install.sh: torchvision does not import even with the hook" >&2; exit 1; }
  echo "install.sh: torchvision $("$PY" -c "import torchvision; print(torchvision.__version__)") imports on this CPU torch through $site/_otprune_cpu_torchvision.pth"
fi
"$PY" -m otprune doctor --summary --lock "$environment"
