# Two commands do all the setup on a fresh machine:  `make demo`  and  `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.dynlrp-installed

.PHONY: demo test test-slow test-slow-ci bench lint setup

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(BIN)/python -m pip install -q -e ".[test,viz,zoo,data,demo,bench]"
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m dynlrp_fx demo --out out

test: $(STAMP)
	$(BIN)/python -m pytest -q -n 2 --durations=15

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow --durations=15

# the slow tests that fit CI's budget (~30 min): export/AOTI, datasets under torchrun, the demo command, Zennit,
# the gradient oracle on every zoo entry, the whole single-op sweep, masks and Hugging Face defaults on every model,
# several targets per sample and concept relevance on transformers, Inductor on a CNN and a 2-layer BERT,
# gradient form on transformers, LayerNorm recomputation, the lowering retrace check on BERT
test-slow-ci: $(STAMP)
	$(BIN)/python -m pytest -q -m slow -p no:xdist tests/test_export.py tests/test_dataset.py tests/test_demo.py \
		tests/test_zennit.py tests/test_attnlrp.py tests/test_rules.py tests/test_composite.py \
		tests/test_zoo_gradient.py tests/test_op_sweep.py tests/test_masks.py tests/test_hf_defaults.py tests/test_multi_target.py tests/test_concepts.py tests/test_compile.py \
		tests/test_gradient_form.py tests/test_memory_passes.py tests/test_pipeline.py tests/test_outputs.py \
		tests/test_targets.py --durations=10

bench: $(STAMP)
	$(BIN)/python -m benchmarks.run --quick

lint: $(STAMP)
	$(BIN)/ruff check dynlrp_fx tests benchmarks

# LXT (AttnLRP) vs ours, same run, in a separate venv (transformers 4.53, lxt 2.1; LXT_VENV, default /tmp/lxtenv)
.PHONY: bench-lxt
bench-lxt:
	benchmarks/lxt_env.sh
