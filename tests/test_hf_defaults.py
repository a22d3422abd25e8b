"""Hugging Face generative models as their library builds them by default (``use_cache=True``): the output holds a
key/value cache object, which ``torch.export`` cannot return; the explainer traces the model with its non-tensor
outputs left out and explains the logits. Configs are the library's defaults with only the size fields shrunk; no
flag is set by hand. Oracle: the ``gradient`` preset equals autograd's gradient x input (``tests.helpers``)."""

from __future__ import annotations

import pytest
import torch

import dynlrp_fx as dynlrp
from dynlrp_fx.trace import tensor_outputs
from tests.helpers import GRADIENT_TOL, gradient_oracle_errors

SMALL = {
    "GPT2": dict(n_layer=1, n_embd=32, n_head=2, vocab_size=128, n_positions=32),
    "Llama": dict(num_hidden_layers=1, hidden_size=32, intermediate_size=64, num_attention_heads=2,
                  num_key_value_heads=1, vocab_size=128, max_position_embeddings=32),
}


def _model(family: str):
    import transformers

    cfg = getattr(transformers, f"{family}Config")(**SMALL[family])
    torch.manual_seed(0)
    model = getattr(transformers, f"{family}LMHeadModel" if family == "GPT2" else f"{family}ForCausalLM")(cfg).eval()
    assert model.config.use_cache  # the library's default: the output carries a cache object
    return model


@pytest.mark.parametrize("family", sorted(SMALL))
def test_default_causal_lm_compiles_and_equals_gradient_x_input(family):
    model = _model(family)
    ids = torch.randint(3, 128, (2, 8), generator=torch.Generator().manual_seed(0))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ex = dynlrp.compile(model, example_kwargs={"input_ids": ids}, rules="gradient", backend="eager")
    assert ex.traced.output_name.strip("[]'") == "logits"
    expl = ex(input_ids=ids)
    torch.testing.assert_close(expl.output, model(input_ids=ids).logits)
    errs = gradient_oracle_errors(expl, model, (), {"input_ids": ids}, "logits")
    assert errs and all(e <= GRADIENT_TOL for e in errs.values()), errs
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert model.config.use_cache  # the user's model and config untouched


def test_tensor_outputs_keeps_tensors_under_their_names():
    class Cache:
        pass

    t = torch.ones(2)
    assert tensor_outputs({"logits": t, "cache": Cache(), "x": None}) == {"logits": t}
    assert tensor_outputs((t, Cache(), (t, "s"))) == (t, (t,))
    assert tensor_outputs(Cache()) is None and tensor_outputs({"c": Cache()}) is None
