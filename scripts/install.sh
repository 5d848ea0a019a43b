#!/usr/bin/env bash
# Install otprune and what it runs with: torch, then (with --llava or --test) transformers 5,
# lmms-eval 0.7.3 and the original LLaVA. Safe to re-run.
#
#   bash scripts/install.sh           # the library: torch, numpy, POT
#   bash scripts/install.sh --llava   # + transformers, lmms-eval, llava-torch (the patch, the harness)
#   bash scripts/install.sh --test    # + the above and pytest
set -euo pipefail
export PIP_ROOT_USER_ACTION=ignore
cd "$(dirname "$0")/.."
extras=""
case "${1:-}" in
  "") ;;
  --llava) extras="[llava]" ;;
  --test) extras="[llava,test]" ;;
  *) echo "install.sh: unknown option '$1'; allowed: --llava, --test" >&2; exit 2 ;;
esac
PIP=(python3 -m pip install -q --disable-pip-version-check)
# pip 23's resolver crashes on lmms-eval's dependency tree; 24+ resolves it.
"${PIP[@]}" "pip>=24"
# Keep whatever torch is installed (a CUDA build on a GPU machine); otherwise take 2.13.0.
torch_version=$(python3 -c "import torch; print(torch.__version__.split('+')[0])" 2>/dev/null || true)
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
  # ("operator torchvision::nms does not exist"). Nothing here needs it, so drop a broken one.
  if ! python3 -c "import torchvision" >/dev/null 2>&1; then
    python3 -m pip uninstall -q -y torchvision >/dev/null 2>&1 || true
  fi
fi
python3 -c "import otprune, torch; print(f'otprune {otprune.__version__} with torch {torch.__version__}')"
