#!/usr/bin/env bash
# Download the wheels of scripts/gpu_wheels.txt, at locks/vlm.txt's versions, into .whl/ (git-ignored) for the GPU machine, which
# reaches no registry: Python 3.12, CPython, manylinux x86_64, exact versions, no dependencies
# (the list names each one). scripts/gpu_check.sh installs them there. Safe to re-run.
#   bash scripts/fetch_gpu_wheels.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
platforms=()
# pip matches a manylinux_2_N tag exactly: offer every N the wheels above use, and the legacy names.
for n in 17 24 27 28 31 34 35; do platforms+=(--platform "manylinux_2_${n}_x86_64"); done
platforms+=(--platform manylinux2014_x86_64 --platform manylinux2010_x86_64 --platform manylinux1_x86_64)
mkdir -p .whl
rm -f .whl/*.whl
# Each name at the version the vlm lock pins: the GPU machine runs what CI tested.
pins=$(grep -v -e '^\s*#' -e '^\s*$' scripts/gpu_wheels.txt | while read -r name; do
  pin=$(grep -i -E "^${name//[-_.]/[-_.]}==" locks/vlm.txt) || { echo "fetch_gpu_wheels: $name is not in locks/vlm.txt" >&2; exit 1; }
  echo "$pin"
done)
echo "$pins" | xargs "$PYTHON" -m pip download -q --disable-pip-version-check \
  --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${platforms[@]}" -d .whl
wanted=$(grep -cv -e '^\s*#' -e '^\s*$' scripts/gpu_wheels.txt)
got=$(ls .whl/*.whl | wc -l)
if [ "$got" -ne "$wanted" ]; then
  echo "fetch_gpu_wheels: $got wheels in .whl/ for $wanted pins in scripts/gpu_wheels.txt" >&2
  exit 1
fi
total=$(du -cb .whl/*.whl | tail -1 | cut -f1)
echo "fetch_gpu_wheels: $got wheels, $((total / 1048576)) MiB in .whl/ (the device tool carries at most 64 MiB with the tree)"
