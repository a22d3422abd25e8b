#!/usr/bin/env bash
# GPU run of issue 7, in parts that each fit ONE device call of < 10 minutes on one H100/H200:
#   bash benchmarks/gpu.sh vision   # GPU tests, then VGG16, ResNet-50, ViT-B/16 (~8 min)
#   bash benchmarks/gpu.sh text     # BERT-base, Llama-8L, GPT-2 with Inductor and CUDA graphs (~8 min)
# Results go under $OUT if set (device tool), else benchmarks/results/. Needs python3 with torch (CUDA),
# torchvision, transformers, pytest, hypothesis; zennit and captum for the peer columns (on a machine without
# network: pip install --no-deps --target DIR of their wheels, add DIR to PYTHONPATH). Random weights, no network.
# Every step has its own time limit and writes its results after each model, so a step that runs long costs only
# itself. Measured on an H200 (2026-11-26): GPU tests ~75 s, VGG16 with all methods ~140 s; tracing on that
# machine's CPU is slow (BERT-base ~20 s, ViT-B/16 ~33 s per trace), hence one trace per model (Explainer.recompile)
# and two parts.
set -uo pipefail
cd "$(dirname "$0")/.."
PART="${1:-vision}"
export TORCHINDUCTOR_CACHE_DIR="${TORCHINDUCTOR_CACHE_DIR:-/tmp/dynlrp_inductor_cache}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1 PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD"
PY="${PYTHON:-python3}"
DEST="${OUT:-benchmarks/results}"
mkdir -p "$DEST"
LOG="$DEST/run.log"
GPU=$($PY -c "import torch; print(torch.cuda.get_device_name().replace(' ', '_'))")
{ date -u; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; \
  $PY -c "import torch, torchvision, transformers; print(torch.__version__, torchvision.__version__, transformers.__version__)"; } >> "$LOG" 2>&1
t0=$SECONDS
run() {  # run LIMIT NAME ARGS...: one benchmark invocation with its own time limit and result files
  local limit=$1 name=$2; shift 2
  [ "$limit" -gt 30 ] || { echo "$name: skipped (no time left)" | tee -a "$LOG"; return; }
  timeout "$limit" $PY -m benchmarks.run --device cuda --reps 8 --warmup 2 "$@" \
    --json "$DEST/$GPU.$name.json" --md "$DEST/$GPU.$name.md" >> "$LOG" 2>&1
  echo "$name: rc=$? after $((SECONDS - t0)) s" | tee -a "$LOG"
}
OURS=ours_eager_recompute,ours_inductor,ours_inductor_cg
if [ "$PART" = vision ]; then
  # CUDA correctness: compiled == eager, == float64 CPU, LRP-0 == gradient x input, CUDA graphs, bf16
  timeout 110 $PY -m pytest -q -m gpu tests/test_gpu.py -p no:cacheprovider > /tmp/gpu_tests.log 2>&1
  echo "gpu tests: rc=$? after $((SECONDS - t0)) s" | tee -a "$LOG"; tail -3 /tmp/gpu_tests.log
  cat /tmp/gpu_tests.log >> "$LOG"
  run 150 vgg16 --models vgg16
  run 150 resnet50 --models resnet50 \
    --methods forward,gxi,ours_eager,$OURS,ours_egb_eager,zennit_eps,zennit_egb,captum_lrp
  run $((560 - (SECONDS - t0))) vit_b_16 --models vit_b_16 --methods forward,gxi,ours_eager,$OURS
elif [ "$PART" = text ]; then
  run 190 bert_base --models bert_base --methods forward,gxi,ours_eager,$OURS
  run 190 llama_8l --models llama_8l --methods forward,gxi,ours_eager,$OURS
  run $((560 - (SECONDS - t0))) gpt2_small --models gpt2_small --methods forward,gxi,ours_eager,$OURS
else
  echo "usage: bash benchmarks/gpu.sh [vision|text]" >&2; exit 2
fi
grep -h -A40 "## Targets" "$DEST/$GPU".*.md 2>/dev/null | grep -v "^$" | head -60
