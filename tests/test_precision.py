"""Half-precision models: relevance is computed in float32 (stabilisers vanish in bf16/fp16)."""

from __future__ import annotations

import copy

import torch
from torch import nn

import dynlrp_fx as dynlrp


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


def test_float16_seed_and_ledger():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.GELU(), nn.LayerNorm(16), nn.Linear(16, 3)).eval().half()
    x = torch.randn(4, 6).half()
    expl = dynlrp.compile(model, x, backend="eager")(x)
    assert expl.relevance.dtype == torch.float32 and torch.isfinite(expl.relevance).all()
    assert torch.allclose(expl.conservation.seed, model(x).float().max(1).values, rtol=1e-3)
    assert expl.conservation.error.max() < 1e-5
