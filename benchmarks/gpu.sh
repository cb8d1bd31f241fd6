#!/usr/bin/env bash
# The full-size SAM3 on one GPU in under 10 minutes: training at 1008² (samples/s, MFU) and
# inference latency, written to benchmarks/results/gpu.json (benchmarks/gpu.py says what each
# figure is). Needs the project installed (make install) and ../shared/data beside the checkout.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python )}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
timeout 540 "$PYTHON" benchmarks/gpu.py "$@"
