"""Issue 2 acceptance: real architectures explain with finite relevance and a closing conservation ledger.

A finite relevance and a closing ledger cannot catch a wrong rule, so each model also gets an exact oracle where it
is cheap: the ``gradient`` preset on the same trace equals autograd's gradient x input (token ids: of the embedding
rows, summed over the hidden dimension), and on ResNet-18 (piecewise linear) LRP-0 equals gradient x input; both to
float32 rounding (``tests.helpers.GRADIENT_TOL``, derived in ``tests/test_zoo_gradient.py``). The full-size ViT-B/16
has no oracle here (compiling its gradient program would cost minutes); ``tests/test_zoo_gradient.py`` checks the
gradient preset on a tiny ``VisionTransformer``.
"""

from __future__ import annotations

import pytest
import torch

import dynlrp_fx as dynlrp
from dynlrp_fx import presets
from tests.helpers import GRADIENT_TOL, grad_x_input, gradient_oracle_errors, tiny_bert

transformers = pytest.importorskip("transformers")
torchvision = pytest.importorskip("torchvision")


def _tokens(vocab=100, batch=2, seq=8):
    ids = torch.randint(0, vocab, (batch, seq))
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[1, seq - 2 :] = 0
    return ids, mask


def _hf(name):
    from transformers import (
        GPT2Config,
        GPT2LMHeadModel,
        LlamaConfig,
        LlamaForCausalLM,
    )

    if name == "bert":
        return tiny_bert(vocab_size=100, num_attention_heads=4, max_position_embeddings=64, num_labels=2), {}
    if name == "gpt2":
        cfg = GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=0, eos_token_id=0)
        return GPT2LMHeadModel(cfg).eval(), {}
    cfg = LlamaConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      intermediate_size=64, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval(), {}


def _check_oracle(expl, model, kwargs):
    errs = gradient_oracle_errors(expl, model, (), kwargs)
    assert set(errs) >= set(expl.inputs) and all(e <= GRADIENT_TOL for e in errs.values()), errs


def _check_ledger(expl, tol=1e-3):
    c = expl.conservation
    for r in expl.inputs.values():
        assert torch.isfinite(r).all()
    assert torch.isfinite(c.absorbed).all()
    err = (c.seed - c.inputs - c.absorbed).abs() / c.seed.abs().clamp_min(1e-6)
    assert err.max().item() <= tol, c


@pytest.mark.parametrize("name", ["bert", "gpt2", "llama"])
def test_hf_models(name):
    model, extra = _hf(name)
    ids, mask = _tokens()
    ex = dynlrp.compile(model, example_kwargs=dict(input_ids=ids, attention_mask=mask, **extra), backend="eager")
    grad = dynlrp.Explainer(model, ex.traced, presets.resolve("gradient"), backend="eager")  # the same trace
    for batch in (2, 3):
        ids, mask = _tokens(batch=batch)
        expl = ex(input_ids=ids, attention_mask=mask, **extra)
        assert list(expl.inputs) == ["input_ids"]  # the attention mask receives no relevance
        assert expl.relevance.shape == ids.shape
        ref = model(input_ids=ids, attention_mask=mask, **extra).logits
        assert torch.allclose(expl.output, ref, atol=1e-5)
        _check_ledger(expl)
        # relevance actually reaches the tokens
        assert expl.relevance.abs().sum() > 0
        # the gradient preset equals autograd's gradient x input of the embedding rows
        _check_oracle(grad(input_ids=ids, attention_mask=mask, **extra), model,
                      dict(input_ids=ids, attention_mask=mask, **extra))


def test_resnet18():
    model = torchvision.models.resnet18(num_classes=10).eval()
    x = torch.randn(2, 3, 32, 32)
    ex = dynlrp.compile(model, x, backend="eager")
    expl = ex(x)
    assert expl.relevance.shape == x.shape
    assert torch.allclose(expl.output, model(x), atol=1e-5)
    _check_ledger(expl)
    # ReLU, max-pooling, batch norm, average pooling and residual adds are piecewise linear: LRP-0 on the same trace
    # is gradient x input
    lrp0 = dynlrp.Explainer(model, ex.traced, presets.resolve("lrp0"), backend="eager")(x, target=3)
    ref = grad_x_input(model, x, 3)
    assert (lrp0.relevance - ref).abs().max() <= GRADIENT_TOL * ref.abs().max()


def test_vit_b_16():
    model = torchvision.models.vit_b_16(num_classes=10).eval()
    x = torch.randn(2, 3, 224, 224)
    ex = dynlrp.compile(model, x, backend="eager")
    expl = ex(x[:1])
    assert expl.relevance.shape == (1, 3, 224, 224)
    assert torch.allclose(expl.output, model(x[:1]), atol=1e-4)
    _check_ledger(expl)
