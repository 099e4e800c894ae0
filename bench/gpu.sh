#!/usr/bin/env bash
# The GPU benchmark in one command, from anywhere in the repo (README, "GPU benchmark"):
#   bash bench/gpu.sh [OUT_DIR] [more `python -m bench.gpu` flags, e.g. --budget-s 600 --models sd15,sdxl]
# OUT_DIR defaults to bench/results/gpu-<device name>, e.g. bench/results/gpu-nvidia-h100-80gb-hbm3.
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ $# -gt 0 && $1 != -* ]]; then
    out=$1
    shift
else
    name=$(python -c "import torch; print(torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu')")
    out=bench/results/gpu-$(echo "$name" | tr '[:upper:]' '[:lower:]' | tr -cs 'a-z0-9' '-' | sed 's/-$//')
fi
mkdir -p "$out"
if command -v nvidia-smi > /dev/null; then
    nvidia-smi > "$out/nvidia-smi.txt" || true
fi
exec python -m bench.gpu --out "$out" "$@"
