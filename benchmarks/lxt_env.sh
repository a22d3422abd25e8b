#!/usr/bin/env bash
# Same-run comparison of our explainer with LXT (AttnLRP), in a separate venv.
#
# LXT 2.1 does not import with transformers 5 (the project's venv), so this script builds a venv with
# transformers 4.53 and lxt 2.1 (LXT_VENV, default /tmp/lxtenv; created if missing) and runs the benchmark there,
# importing dynlrp_fx and benchmarks from this checkout through PYTHONPATH (the package is not installed there).
#
#   benchmarks/lxt_env.sh                   # CPU --quick, results in benchmarks/results/cpu_lxt.{md,json}
#   OMP_NUM_THREADS=1 benchmarks/lxt_env.sh --reps 9 --warmup 1   # extra args follow the defaults (last one wins)
#   LXT_MODELS=bert_base benchmarks/lxt_env.sh --device cuda --reps 10 --warmup 3 --json o.json --md o.md
#   LXT_SIZE= benchmarks/lxt_env.sh --batches 1,8 --reps 3 --json o.json --md o.md   # real sizes (224 px, 128 tokens)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${LXT_VENV:-/tmp/lxtenv}"
PY="${PYTHON:-python3}"

if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -c "import lxt.efficient, transformers, torchvision" 2>/dev/null; then
    "$PY" -m venv "$VENV"
    "$VENV/bin/python" -m pip install -q --upgrade pip
    "$VENV/bin/python" -m pip install -q torch==2.14.1 torchvision==0.29.1
    # lxt 2.1 patches transformers' 4.x modelling modules (it fails to import with transformers 5)
    "$VENV/bin/python" -m pip install -q "transformers==4.53.*" "lxt==2.1.*" sympy
fi

SIZE="${LXT_SIZE---quick}"  # "--quick" (default) or empty for the real sizes
MODELS="${LXT_MODELS:-bert_base,gpt2_small,llama_8l,vit_b_16}"
METHODS="${LXT_METHODS:-forward,gxi,ours_eager,ours_eager_recompute,ours_attnlrp_eager,ours_cp_lrp_eager,lxt}"
mkdir -p "$ROOT/benchmarks/results"
cd "$ROOT"
"$VENV/bin/python" -c "import torch, transformers, lxt; from importlib.metadata import version; \
print('torch', torch.__version__, 'transformers', transformers.__version__, 'lxt', version('lxt'))"
exec env PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" "$VENV/bin/python" -m benchmarks.run --device cpu $SIZE \
    --models "$MODELS" --methods "$METHODS" \
    --json benchmarks/results/cpu_lxt.json --md benchmarks/results/cpu_lxt.md "$@"
