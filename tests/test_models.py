"""Issue 2 acceptance: real architectures explain with finite relevance and a closing conservation ledger."""

from __future__ import annotations

import pytest
import torch

import dynlrp_fx as dynlrp
from tests.conftest import tiny_bert

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
        return GPT2LMHeadModel(cfg).eval(), {"use_cache": False}
    cfg = LlamaConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      intermediate_size=64, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval(), {"use_cache": False}


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


def test_resnet18():
    model = torchvision.models.resnet18(num_classes=10).eval()
    x = torch.randn(2, 3, 32, 32)
    ex = dynlrp.compile(model, x, backend="eager")
    expl = ex(x)
    assert expl.relevance.shape == x.shape
    assert torch.allclose(expl.output, model(x), atol=1e-5)
    _check_ledger(expl)


def test_vit_b_16():
    model = torchvision.models.vit_b_16(num_classes=10).eval()
    x = torch.randn(2, 3, 224, 224)
    ex = dynlrp.compile(model, x, backend="eager")
    expl = ex(x[:1])
    assert expl.relevance.shape == (1, 3, 224, 224)
    assert torch.allclose(expl.output, model(x[:1]), atol=1e-4)
    _check_ledger(expl)
