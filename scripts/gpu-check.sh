#!/usr/bin/env bash
# GPU readiness (issue #15), under 8 minutes on one GPU: per-sample gradients vs autograd for
# every LoRA preset on CUDA (K = 1 and K = 8), one federated round of the `full` experiment
# preset's DP settings with --gpus-per-site, and DP-SGD steps/s. Writes a JSON summary and
# prints its path. Exit 0: all passed; 1: a check failed; 3: no GPU (nothing was checked).
#   bash scripts/gpu-check.sh                        # on the GPU machine
#   bash scripts/gpu-check.sh --device cpu --quick   # the code path on CPU (tiny model)
#   bash scripts/gpu-check.sh --help                 # every option (bench/gpu_check.py)
# Uses .venv/bin/python when there is one (scripts/setup.sh), else $PYTHON or python3.
set -euo pipefail
cd "$(dirname "$0")/.."
python="${PYTHON:-python3}"
if [[ -x .venv/bin/python ]]; then
  python=.venv/bin/python
fi
export FLWR_DISABLE_UPDATE_CHECK=1 FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1
exec "$python" bench/gpu_check.py "$@"
