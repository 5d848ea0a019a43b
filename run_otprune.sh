#!/usr/bin/env bash
# Main job: run an experiment config through lmms-eval, resumably, then print its Table 1.
#   bash run_otprune.sh                  # paper_table1 with a GPU and the hub, else the embedded synth
#   bash run_otprune.sh synth|smoke|paper_table1|path/to.yaml [--num-processes N] [--jobs N] [--limit N] [--dry-run]
# The same as `otprune run ...` (--executor slurm for a cluster); everything lives in otprune/harness/ (see --help).
set -euo pipefail
cd "$(dirname "$0")"
exec python3 -m otprune run "$@"
