#!/usr/bin/env bash
# Create .venv and install bitro with its pinned dependency set (CPU torch from the local wheel first).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
# torch first: pip takes the CPU build (a later resolver pass would otherwise pick a CUDA build).
if ! .venv/bin/python -c "import torch, sys; sys.exit(0 if torch.__version__.startswith('2.13.0') else 1)" 2>/dev/null; then
  .venv/bin/python -m pip install --no-compile --quiet torch==2.13.0
fi
.venv/bin/python -m pip install --quiet uv
if ! .venv/bin/uv pip install --quiet --python .venv/bin/python -c ci/constraints.txt -e ".[dev]"; then
  echo "uv failed; falling back to pip" >&2
  .venv/bin/python -m pip install --quiet -c ci/constraints.txt -e ".[dev]"
fi
.venv/bin/python - <<'PY'
import importlib.util, sys
import torch
if torch.version.cuda is not None:
    sys.exit(f"a CUDA build of torch was installed ({torch.__version__}); install torch==2.13.0 first")
if importlib.util.find_spec("torchvision") is not None:
    sys.exit("torchvision is installed and breaks beside the CPU torch; remove it")
print(f"bitro environment ready: torch {torch.__version__} (CPU)")
PY
