#!/usr/bin/env bash
# Set everything up on a fresh machine and run the demo on the built-in synthetic tissue.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/bitro demo "$@"  # each run writes a fresh bitro_demo/<YYYYmmdd-HHMMSS>/ (or pass --out DIR)
