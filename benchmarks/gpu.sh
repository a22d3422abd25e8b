#!/usr/bin/env bash
# GPU run of issue 7, as ONE prepared command of at most ~9.8 minutes on one H100/H200 (the device tool's
# per-command limit is 10): CUDA correctness tests, then the benchmark table, then the compile-cache test.
#   bash benchmarks/gpu.sh     # results under $OUT if set (device tool), else benchmarks/results/
# Needs: python3 with torch (CUDA), torchvision, transformers, pytest, hypothesis; zennit and captum for the peer
# columns (on a machine without network: pip install --no-deps --target DIR of their wheels, add DIR to
# PYTHONPATH). Random weights, no network.
# Every step has its own time limit and writes its results as it goes, so a step that runs long costs only itself.
set -uo pipefail
cd "$(dirname "$0")/.."
export TORCHINDUCTOR_CACHE_DIR="${TORCHINDUCTOR_CACHE_DIR:-/tmp/dynlrp_inductor_cache}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1 PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD"
PY="${PYTHON:-python3}"
DEST="${OUT:-benchmarks/results}"
mkdir -p "$DEST"
LOG="$DEST/run.log"
GPU=$($PY -c "import torch; print(torch.cuda.get_device_name().replace(' ', '_'))")
{ date -u; nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv; \
  $PY -c "import torch, torchvision, transformers; print(torch.__version__, torchvision.__version__, transformers.__version__)"; } >> "$LOG" 2>&1
t0=$SECONDS
# 1) CUDA correctness: compiled == eager, == float64 CPU, LRP-0 == gradient x input, CUDA graphs, bf16
timeout 100 $PY -m pytest -q -m gpu tests/test_gpu.py -p no:cacheprovider > /tmp/gpu_tests.log 2>&1
echo "gpu tests: rc=$? after $((SECONDS - t0)) s" | tee -a "$LOG"; tail -3 /tmp/gpu_tests.log; cat /tmp/gpu_tests.log >> "$LOG"
run() {  # run LIMIT NAME ARGS...: one benchmark invocation with its own time limit and result files
  local limit=$1 name=$2; shift 2
  [ "$limit" -gt 30 ] || { echo "$name: skipped (no time left)" | tee -a "$LOG"; return; }
  timeout "$limit" $PY -m benchmarks.run --device cuda --reps 8 --warmup 2 "$@" \
    --json "$DEST/$GPU.$name.json" --md "$DEST/$GPU.$name.md" >> "$LOG" 2>&1
  echo "$name: rc=$? after $((SECONDS - t0)) s" | tee -a "$LOG"
}
# 2) VGG16: every method (compiled gradient, Inductor, CUDA graphs, Zennit, Captum), batch 1 and 16
run 170 vgg16 --models vgg16
# 3) transformers: eager variants (their targets compare with quoted DynamicLRP / LXT H200 numbers)
run 110 text --models bert_base,gpt2_small,llama_8l --inductor-models none \
  --methods forward,gxi,ours_eager,ours_eager_recompute
# 4) ViT-B/16 with Inductor and CUDA graphs, ResNet-50 eager and peers (Inductor compiles are the cost)
run $((560 - (SECONDS - t0))) vit_resnet --models vit_b_16,resnet50 --inductor-models vit_b_16 \
  --methods forward,gxi,ours_eager,ours_eager_recompute,ours_inductor,ours_inductor_cg,ours_egb_eager,zennit_eps,zennit_egb,captum_lrp,lxt
# 5) compile cache: cold vs warm Inductor compile of the explainer in two fresh processes (VGG16)
left=$((575 - (SECONDS - t0)))
if [ "$left" -gt 60 ]; then
  timeout "$left" $PY -m benchmarks.run --device cuda --cache-test vgg16 > "$DEST/$GPU.cache.json" 2>> "$LOG"
  echo "cache test: rc=$? after $((SECONDS - t0)) s" | tee -a "$LOG"
fi
grep -h -A40 "## Targets" "$DEST/$GPU".*.md 2>/dev/null | grep -v "^$" | head -60
cat "$DEST/$GPU.cache.json" 2>/dev/null
