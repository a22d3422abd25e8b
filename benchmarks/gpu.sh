#!/usr/bin/env bash
# GPU benchmark of issue 7: one prepared run of about 8 minutes on one GPU (H100/H200), leaving room for a rerun.
#   bash benchmarks/gpu.sh            # writes benchmarks/results/<gpu-name>.md and .json (under $OUT if set)
# Requirements on the GPU machine: the project venv (torch with CUDA, torchvision, transformers 5, zennit,
# captum), no network. Everything is random-init from configs.
# Budget (H200 estimates from DESIGN.md section 7 timings and CPU compile times): 6 models x 2 batches, 10
# interleaved reps; Inductor cold compiles dominate (~20-60 s per model and mode). To fit ~8 minutes the
# Inductor cache dir is kept on local disk; CUDA-graph ("reduce-overhead") variants run at batch 1 and 16.
set -euo pipefail
cd "$(dirname "$0")/.."
export TORCHINDUCTOR_CACHE_DIR="${TORCHINDUCTOR_CACHE_DIR:-/tmp/dynlrp_inductor_cache}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
PY="${PYTHON:-python}"
GPU=$($PY -c "import torch; print(torch.cuda.get_device_name().replace(' ', '_'))")
DEST="${OUT:-benchmarks/results}"
mkdir -p "$DEST"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
# 1) main table (models x methods x batch 1/16); timeout guards the 10-minute per-command limit
timeout 450 $PY -m benchmarks.run --device cuda --reps 10 --warmup 3 \
  --json "$DEST/$GPU.json" --md "$DEST/$GPU.md" 2> "$DEST/$GPU.log" || echo "main run failed/timed out: see $DEST/$GPU.log"
# 2) compile cache: cold vs warm Inductor compile of the explainer in two fresh processes (VGG16)
timeout 120 $PY -m benchmarks.run --device cuda --cache-test vgg16 > "$DEST/$GPU.cache.json" 2>> "$DEST/$GPU.log" || true
cat "$DEST/$GPU.md" "$DEST/$GPU.cache.json" 2>/dev/null || tail -50 "$DEST/$GPU.log"
