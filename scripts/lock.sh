#!/usr/bin/env bash
# Regenerate locks/*.txt from pyproject.toml: for each environment scripts/install.sh makes, every
# package at an exact version, resolved by uv within pyproject's bounds for CPython 3.11 on
# x86-64 Linux with torch's CPU build. Needs uv (pip install uv). Safe to re-run.
#
#   bash scripts/lock.sh          # resolve afresh: the newest releases within the bounds
#   bash scripts/lock.sh --keep   # keep every current pin that still satisfies them (adding a package)
#
# locks/base.txt   the library                     install.sh
# locks/llava.txt  + the main job (figures too)    install.sh --llava
# locks/test.txt   + pytest, triton                install.sh --test
# locks/vlm.txt    + torchvision, qwen-vl-utils    install.sh --vlm
set -euo pipefail
cd "$(dirname "$0")/.."
UV=${UV:-uv}
upgrade=(--upgrade)
case "${1:-}" in
  "") ;;
  --keep) upgrade=() ;;
  *) echo "lock.sh: unknown option '$1'; allowed: --keep" >&2; exit 2 ;;
esac
TORCH=2.13.0+cpu
# The locks pin torch's CPU build, whose metadata names no CUDA libraries. This workplace keeps its
# wheel on disk; elsewhere PyTorch's CPU index serves it.
if compgen -G "/opt/wheels/torch-${TORCH}-*.whl" >/dev/null; then
  torch_source=(--find-links /opt/wheels)
else
  torch_source=(--find-links https://download.pytorch.org/whl/cpu/torch/)
fi
constraints=$(mktemp)
trap 'rm -f "$constraints"' EXIT
echo "torch==$TORCH" >"$constraints"
mkdir -p locks

lock() {  # NAME EXTRAS [uv options]
  local name=$1 extras=$2
  local args=()
  for extra in ${extras//,/ }; do args+=(--extra "$extra"); done
  # --upgrade (unless --keep): resolve afresh, not from the pins of the lock being replaced.
  "$UV" pip compile -q "${upgrade[@]}" pyproject.toml "${args[@]}" "${@:3}" --constraint "$constraints" "${torch_source[@]}" \
    --python-version 3.11 --python-platform x86_64-manylinux_2_28 \
    --custom-compile-command "bash scripts/lock.sh" -o "locks/$name.txt"
  # The extras, for install.sh --latest and otprune doctor: this script is where they are chosen.
  sed -i "1i # extras: $extras" "locks/$name.txt"
  # The constraint file's name is a fresh temporary one each run: name what it holds instead.
  sed -i "s|-c $constraints|-c torch==$TORCH (scripts/lock.sh)|" "locks/$name.txt"
  if [ -n "$extras" ]; then
    # Installed with --no-deps like every line here: its own pins (torch 2.0, transformers 4.36)
    # are years old and otprune uses only its model code.
    printf '%s\n' "llava-torch==1.2.2.post1" "    # the original LLaVA (scripts/install.sh)" >>"locks/$name.txt"
  fi
}

lock base ""
# lmms-eval requires torchvision, but a PyPI torchvision cannot load beside a CPU torch: only the
# vlm environment has it (with scripts/cpu_torchvision_hook.py).
lock llava "llava,analysis" --no-emit-package torchvision
lock test "llava,analysis,test" --no-emit-package torchvision
lock vlm "llava,analysis,vlm"
for f in locks/*.txt; do echo "lock.sh: $f: $(grep -c '^[A-Za-z0-9]' "$f") packages"; done
