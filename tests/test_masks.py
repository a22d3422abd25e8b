"""Padded and fully masked positions: finite relevance, exactly zero where the explained output cannot see them.

Hugging Face BERT (an encoder) and GPT-2 / Llama (causal LMs) from their default configs with sizes shrunk, with
``attn_implementation="eager"`` (an additive ``finfo.min`` mask into a softmax) and ``"sdpa"`` (a boolean mask into
``scaled_dot_product_attention``). One batch holds a left-padded sample (the layout of generation: pads first,
mask 0 there), the same tokens right-padded, a sample with no tokens (mask all zero) and an unpadded one.

Oracles: relevance and output are finite; a padded position the explained output does not read gets exactly zero
relevance; the ledger closes for every sample; for Llama (rotary positions: the left-padded sample's outputs
equal the unpadded ones) the left-padded sample's relevance on its real tokens equals the right-padded one's,
whose outputs equal the model's on the unpadded tokens; the ``gradient`` preset equals autograd's gradient x
input on the same batch.
"""

from __future__ import annotations

import pytest
import torch

import dynlrp_fx as dynlrp
from tests.helpers import GRADIENT_TOL, gradient_oracle_errors

S, REAL, PAD = 8, 5, 3  # sequence length, real tokens of the padded samples, pads


def _gpt2(impl: str):
    import transformers

    cfg = transformers.GPT2Config(vocab_size=96, n_embd=32, n_layer=2, n_head=2, n_positions=32)
    return transformers.GPT2LMHeadModel._from_config(cfg, attn_implementation=impl).eval()


def _llama(impl: str):
    import transformers

    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)
    return transformers.LlamaForCausalLM._from_config(cfg, attn_implementation=impl).eval()


def _bert(impl: str):
    import transformers

    cfg = transformers.BertConfig(vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=64, max_position_embeddings=32, num_labels=3)
    return transformers.BertForSequenceClassification._from_config(cfg, attn_implementation=impl).eval()


FACTORIES = {"bert": _bert, "gpt2": _gpt2, "llama": _llama}


def _batch(seed: int = 0) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Samples: 0 left-padded, 1 the same tokens right-padded, 2 no tokens (mask all zero), 3 unpadded. Returns
    the inputs and the real tokens of samples 0 and 1."""
    g = torch.Generator().manual_seed(seed)
    real = torch.randint(1, 96, (REAL,), generator=g)
    ids = torch.randint(1, 96, (4, S), generator=g)
    mask = torch.ones(4, S, dtype=torch.long)
    ids[0, :PAD], ids[0, PAD:], mask[0, :PAD] = 0, real, 0
    ids[1, :REAL], ids[1, REAL:], mask[1, REAL:] = real, 0, 0
    mask[2] = 0
    return {"input_ids": ids, "attention_mask": mask}, real


def _lm_targets(model, inputs: dict, real: torch.Tensor) -> torch.Tensor:
    """Flat targets of the next-token logit after the last real token (the unpadded model's argmax token there)."""
    with torch.no_grad():
        logits = model(input_ids=real[None]).logits
    vocab = logits.shape[-1]
    tok = int(logits[0, -1].argmax())
    last = [S - 1, REAL - 1, S - 1, S - 1]  # left-padded, right-padded, empty, unpadded
    return torch.tensor([p * vocab + tok for p in last])


def _check_common(e, inputs: dict) -> None:
    ids_rel = e.inputs["input_ids"]
    assert torch.isfinite(e.output).all()
    assert torch.isfinite(ids_rel).all(), f"non-finite relevance in samples {(~torch.isfinite(ids_rel)).any(1)}"
    for v in e.inputs.values():
        assert torch.isfinite(v).all()
    assert float(e.conservation.error.max()) < 1e-4, e.conservation.error


# default run: one eager and one SDPA model per test (a few compiles); the rest in the slow step
_SLOW = pytest.mark.slow


@pytest.mark.parametrize(
    "arch, impl",
    [("gpt2", "eager"), ("llama", "sdpa"), pytest.param("gpt2", "sdpa", marks=_SLOW),
     pytest.param("llama", "eager", marks=_SLOW)],
)
def test_causal_lm_padding(arch, impl):
    torch.manual_seed(0)
    model = FACTORIES[arch](impl)
    inputs, real = _batch()
    explainer = dynlrp.compile(model, example_kwargs=inputs)
    targets = _lm_targets(model, inputs, real)
    e = explainer(**inputs, target=targets)
    _check_common(e, inputs)
    rel = e.inputs["input_ids"]
    # a causal LM's last real token sees no pad: left and right pads get exactly zero relevance
    assert (rel[0, :PAD] == 0).all() and (rel[1, REAL:] == 0).all(), rel[:2]
    assert rel[0, PAD:].abs().sum() > 0 and rel[1, :REAL].abs().sum() > 0
    # the right-padded sample computes what the model computes on its real tokens alone
    with torch.no_grad():
        alone = model(input_ids=real[None]).logits[0]
    out = e.output.reshape(4, S, -1)
    torch.testing.assert_close(out[1, :REAL], alone, rtol=1e-4, atol=1e-5)
    if arch == "llama":  # rotary positions: left padding shifts nothing the model sees
        torch.testing.assert_close(out[0, PAD:], alone, rtol=1e-4, atol=1e-5)
        scale = float(rel[1].abs().max())
        torch.testing.assert_close(rel[0, PAD:], rel[1, :REAL], rtol=1e-3, atol=1e-4 * scale)


@pytest.mark.parametrize("impl", [pytest.param("eager", marks=_SLOW), "sdpa"])
def test_encoder_padding(impl):
    """BERT classifies from position 0: right pads, and left pads other than position 0 (which the classifier reads
    when it is a pad), get exactly zero relevance."""
    torch.manual_seed(0)
    model = _bert(impl)
    inputs, _ = _batch()
    e = dynlrp.compile(model, example_kwargs=inputs)(**inputs)
    _check_common(e, inputs)
    rel = e.inputs["input_ids"]
    assert (rel[1, REAL:] == 0).all() and (rel[0, 1:PAD] == 0).all(), rel[:2]
    assert rel[1, :REAL].abs().sum() > 0 and rel[0, PAD:].abs().sum() > 0


@pytest.mark.parametrize(
    "arch, impl",
    [("gpt2", "sdpa"), *(pytest.param(a, i, marks=_SLOW) for a, i in
                         (("bert", "eager"), ("bert", "sdpa"), ("gpt2", "eager"), ("llama", "eager"), ("llama", "sdpa")))],
)
def test_gradient_preset_on_masked_batch(arch, impl):
    """``rules="gradient"`` equals autograd's gradient x input on the padded / empty batch (finite everywhere)."""
    torch.manual_seed(0)
    model = FACTORIES[arch](impl)
    inputs, _ = _batch()
    e = dynlrp.compile(model, example_kwargs=inputs, rules="gradient")(**inputs)
    assert all(torch.isfinite(v).all() for v in e.inputs.values())
    errs = gradient_oracle_errors(e, model, (), inputs)
    assert max(errs.values()) < GRADIENT_TOL, errs
