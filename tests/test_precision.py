"""Half-precision models: relevance is computed in float32 (stabilisers vanish in bf16/fp16).

Besides finite values and a closing ledger, each test has an exact oracle: the float32 reference the bf16 CNN is
compared with is itself checked (LRP-0 on the piecewise-linear CNN is gradient x input, to float32 rounding), and
the ``gradient`` preset on the float16 MLP equals autograd's gradient x input of the same weights in float32, up to
the float16 rounding of the forward values the relevance sweep reads.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

import dynlrp_fx as dynlrp
from tests.helpers import GRADIENT_TOL, grad_x_input, gradient_oracle_errors


def test_bfloat16_cnn_relevance_is_float32_and_matches_float32_model():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(128, 5)
    ).eval()
    x = torch.randn(3, 3, 8, 8)
    ref = dynlrp.compile(model, x, backend="eager")(x, target=1)
    low = copy.deepcopy(model).bfloat16()
    expl = dynlrp.compile(low, x.bfloat16(), backend="eager")(x.bfloat16(), target=1)
    assert expl.output.dtype == torch.bfloat16  # the forward pass stays in bf16
    assert expl.relevance.dtype == torch.float32
    assert expl.conservation.error.max() < 1e-5  # the ledger closes in float32
    # differs from the float32 model only through the bf16 forward values
    assert (expl.relevance - ref.relevance).abs().max() < 0.02 * ref.relevance.abs().max()
    # oracle for the float32 side: LRP-0 on this piecewise-linear CNN is gradient x input
    lrp0 = dynlrp.compile(model, x, rules="lrp0", backend="eager")(x, target=1).relevance
    exact = grad_x_input(model, x, 1)
    assert (lrp0 - exact).abs().max() <= GRADIENT_TOL * exact.abs().max()
    assert (ref.relevance - exact).abs().max() < 1e-3 * exact.abs().max()  # epsilon = 1e-6 is close to LRP-0 here


def test_float16_seed_and_ledger():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.GELU(), nn.LayerNorm(16), nn.Linear(16, 3)).eval().half()
    x = torch.randn(4, 6).half()
    expl = dynlrp.compile(model, x, backend="eager")(x)
    assert expl.relevance.dtype == torch.float32 and torch.isfinite(expl.relevance).all()
    assert torch.allclose(expl.conservation.seed, model(x).float().max(1).values, rtol=1e-3)
    assert expl.conservation.error.max() < 1e-5
    # oracle: the gradient preset (a float32 sweep at the float16 forward values) against float32 autograd on the same
    # weights and inputs; they differ by the float16 rounding of the forward values, a few eps16 = 2**-10 over this
    # depth (measured: 2e-4 .. 6e-4 of the largest |x * grad|)
    grad = dynlrp.compile(model, x, rules="gradient", backend="eager")(x)
    assert grad.relevance.dtype == torch.float32
    errs = gradient_oracle_errors(grad, copy.deepcopy(model).float(), (x.float(),), {}, output_rtol=1e-2)
    assert set(errs) == {"input"} and errs["input"] < 8 * torch.finfo(torch.float16).eps, errs
