#!/usr/bin/env bash
# Set everything up on a fresh machine and run every check (what CI runs): lint, the tests in two
# pytest calls (the default suite, then the slow real-data chain marked `chain`), the docs.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 MPLBACKEND=Agg
bash scripts/setup.sh
.venv/bin/ruff check .
# both pytest calls share one cache of prepared sections (bt.datasets.her2st(..., prepared=True)),
# a fresh folder removed at exit unless BITRO_CACHE_DIR is set by the caller
if [ -z "${BITRO_CACHE_DIR:-}" ]; then
  BITRO_CACHE_DIR="$(mktemp -d "${TMPDIR:-/tmp}/bitro-test-cache-XXXXXX")"
  trap 'rm -rf "$BITRO_CACHE_DIR"' EXIT
fi
export BITRO_CACHE_DIR

run_pytest() {  # run_pytest NAME ALLOW_EMPTY ARGS...: fail on errors and (unless allowed) when nothing was collected
  local name=$1 allow_empty=$2
  shift 2
  set +e
  .venv/bin/python -m pytest -q -p no:cacheprovider "$@"
  local rc=$?
  set -e
  if [ "$rc" -eq 5 ] && [ "$allow_empty" = yes ]; then
    return 0
  fi
  if [ "$rc" -eq 5 ]; then
    echo "pytest ($name) collected no tests: failing" >&2
    exit 1
  fi
  [ "$rc" -eq 0 ] || exit "$rc"
}
run_pytest "default suite" no "$@"
# with arguments (e.g. one test file) the chain call may select nothing; a full run must find the chain
run_pytest "chain" "$([ "$#" -gt 0 ] && echo yes || echo no)" -m chain "$@"
.venv/bin/python -m sphinx -W --keep-going -q -b html docs docs/_build/html
echo "docs built: docs/_build/html/index.html"
