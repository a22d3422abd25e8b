"""CUDA checks (marker ``gpu``; run with ``pytest -m gpu tests/test_gpu.py`` on a machine with a GPU).

The default test run has no GPU and deselects these; the GPU benchmark script (``benchmarks/gpu.sh``) runs them
first. Oracles: CUDA relevance equals the float64 CPU relevance, LRP-0 equals gradient x input, Inductor and
CUDA-graph programs equal the eager program, one compilation serves every batch size above 1, and a bf16 model's
relevance is float32 and close to the fp32 model's.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import dynlrp_fx as dynlrp
from dynlrp_fx import presets
from tests.helpers import grad_x_input, pooled_cnn, tiny_bert
from tests.test_compile import CountingInductor

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (run on the GPU machine)"),
]

DEV = torch.device("cuda")


@pytest.fixture(autouse=True)
def _exact_fp32():
    """Full fp32 matmuls/convolutions (no TF32), so that comparisons measure our program, not TF32 rounding."""
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def _cnn() -> nn.Module:
    return pooled_cnn(width=16, classes=10)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double().cpu() - b.double().cpu()).norm() / b.double().cpu().norm())


def test_cuda_relevance_equals_cpu_float64_and_lrp0_is_gradient_x_input():
    model = _cnn()
    x = torch.randn(4, 3, 16, 16)
    ref = dynlrp.compile(copy.deepcopy(model).double(), x.double(), backend="eager")(x.double(), target=3)
    gpu_model = copy.deepcopy(model).to(DEV)
    got = dynlrp.compile(gpu_model, x.to(DEV), backend="eager")(x.to(DEV), target=3)
    assert got.relevance.is_cuda
    assert _rel(got.relevance, ref.relevance) < 1e-4
    assert float(got.conservation.error.max()) < 1e-5
    lrp0 = dynlrp.compile(gpu_model, x.to(DEV), rules=presets.lrp0(), backend="eager")(x.to(DEV), target=3)
    gxi = grad_x_input(gpu_model, x.to(DEV), torch.full((4,), 3))
    assert _rel(lrp0.relevance, gxi) < 1e-5


def test_cuda_inductor_equals_eager_one_compilation_for_all_batches_above_1():
    model = _cnn().to(DEV)
    backend = CountingInductor()
    compiled = dynlrp.compile(model, torch.randn(2, 3, 16, 16, device=DEV), backend=backend)
    eager = dynlrp.compile(model, torch.randn(2, 3, 16, 16, device=DEV), backend="eager")
    for batch in (2, 1, 3, 16):
        x = torch.randn(batch, 3, 16, 16, device=DEV)
        c, e = compiled(x), eager(x)
        assert _rel(c.relevance, e.relevance) < 1e-5
        assert _rel(c.output, e.output) < 1e-6
    assert backend.compilations == 2  # batches 2, 3, 16 share one; a batch of 1 is specialised by torch


def test_cuda_gamma_box_fast_path_compiled_equals_eager():
    model = _cnn().to(DEV)
    x = torch.randn(3, 3, 16, 16, device=DEV)
    rules = presets.epsilon_gamma_box(-3.0, 3.0)
    ref = dynlrp.compile(copy.deepcopy(_cnn()).double(), x.double().cpu(), rules=rules, backend="eager")(
        x.double().cpu()
    )
    e = dynlrp.compile(model, x, rules=rules, backend="eager")(x)
    c = dynlrp.compile(model, x, rules=rules, backend="inductor")(x)
    assert _rel(e.relevance, ref.relevance) < 1e-4
    assert _rel(c.relevance, e.relevance) < 1e-5


def test_cuda_graphs_mode_equals_eager_on_bert():
    model = tiny_bert(sdpa=True).to(DEV)
    kw = {"input_ids": torch.randint(3, 128, (2, 10), device=DEV)}
    eager = dynlrp.compile(model, example_kwargs=kw, backend="eager")
    graphs = dynlrp.compile(model, example_kwargs=kw, backend="inductor", mode="reduce-overhead")
    for batch in (2, 2, 5):  # a replay, then a new batch size
        kb = {"input_ids": torch.randint(3, 128, (batch, 10), device=DEV)}
        e, g = eager(**kb), graphs(**kb)
        assert _rel(g.relevance, e.relevance) < 1e-4
        assert float(g.conservation.error.max()) < 1e-4


def test_cuda_bfloat16_model_relevance_is_float32():
    model = _cnn().to(DEV)
    x = torch.randn(3, 3, 16, 16, device=DEV)
    ref = dynlrp.compile(model, x, backend="eager")(x, target=1)
    low = copy.deepcopy(model).bfloat16()
    expl = dynlrp.compile(low, x.bfloat16(), backend="eager")(x.bfloat16(), target=1)
    assert expl.output.dtype == torch.bfloat16 and expl.relevance.dtype == torch.float32
    assert float(expl.conservation.error.max()) < 1e-5
    assert (expl.relevance - ref.relevance).abs().max() < 0.03 * ref.relevance.abs().max()
