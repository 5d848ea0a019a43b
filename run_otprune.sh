#!/usr/bin/env bash
# Main job. Today: every selector on a synthetic LLaVA-1.5-sized token matrix (N=576, d=4096,
# ratio 0.098), printing kept count, objective, Gaussian W2, OT distance and time per method.
# Extra arguments go to scripts/compare_selectors.py (see --help).
set -euo pipefail
cd "$(dirname "$0")"
exec python3 scripts/compare_selectors.py "$@"
