#!/usr/bin/env bash
# Install otprune and what it runs with: torch, then (with --llava or --test) transformers 5,
# lmms-eval 0.7.3 and the original LLaVA. Safe to re-run. Installs into $PYTHON (default python3).
#
#   bash scripts/install.sh           # the library: torch, numpy, POT
#   bash scripts/install.sh --llava   # + transformers, lmms-eval, llava-torch (the patch, the harness)
#   bash scripts/install.sh --test    # + the above and pytest
#   bash scripts/install.sh --vlm     # --llava + torchvision, qwen-vl-utils (lmms-eval's Qwen-VL and
#                                     #   OneVision models; on a CPU torch with the torchvision hook)
set -euo pipefail
export PIP_ROOT_USER_ACTION=ignore
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
extras=""
case "${1:-}" in
  "") ;;
  --llava) extras="[llava]" ;;
  --test) extras="[llava,test]" ;;
  --vlm) extras="[llava,vlm]" ;;
  *) echo "install.sh: unknown option '$1'; allowed: --llava, --test, --vlm" >&2; exit 2 ;;
esac
PIP=("$PY" -m pip install -q --disable-pip-version-check)
# pip 23's resolver crashes on lmms-eval's dependency tree; 24+ resolves it.
"${PIP[@]}" "pip>=24"
# Keep whatever torch is installed (a CUDA build on a GPU machine); otherwise take 2.13.0.
torch_version=$("$PY" -c "import torch; print(torch.__version__.split('+')[0])" 2>/dev/null || true)
if [ -z "$torch_version" ]; then
  "${PIP[@]}" torch==2.13.0
  torch_version=2.13.0
fi
constraints=$(mktemp)
trap 'rm -f "$constraints"' EXIT
echo "torch==$torch_version" >"$constraints"
"${PIP[@]}" -c "$constraints" -e ".$extras"
if [ -n "$extras" ]; then
  # LLaVA's own pins (torch 2.0, transformers 4.36) are years old: install it without them.
  "${PIP[@]}" --no-deps llava-torch==1.2.2.post1
  # lmms-eval pulls torchvision; a wheel built for another torch breaks imports
  # ("operator torchvision::nms does not exist"). Only --vlm needs it: elsewhere drop a broken one.
  if [ "$extras" != "[llava,vlm]" ] && ! "$PY" -c "import torchvision" >/dev/null 2>&1; then
    "$PY" -m pip uninstall -q -y torchvision >/dev/null 2>&1 || true
  fi
fi
if [ "$extras" = "[llava,vlm]" ] && ! "$PY" -c "import torchvision" >/dev/null 2>&1; then
  # PyPI's torchvision is a CUDA build: on a CPU torch its operators cannot load and its import
  # fails; the hook lets it import (what transformers uses of it is pure Python). See the hook.
  if [ "$("$PY" -c "import torch; print(torch.version.cuda is None and torch.version.hip is None)")" != True ]; then
    echo "install.sh: torchvision does not import against this GPU build of torch; install the matching torchvision" >&2
    exit 1
  fi
  site=$("$PY" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
  cp scripts/cpu_torchvision_hook.py "$site/_otprune_cpu_torchvision.py"
  echo "import _otprune_cpu_torchvision" >"$site/_otprune_cpu_torchvision.pth"
  "$PY" -c "import torchvision" || { echo "install.sh: torchvision does not import even with the hook" >&2; exit 1; }
  echo "install.sh: torchvision $("$PY" -c "import torchvision; print(torchvision.__version__)") imports on this CPU torch through $site/_otprune_cpu_torchvision.pth"
fi
"$PY" -c "import otprune, torch; print(f'otprune {otprune.__version__} with torch {torch.__version__}')"
