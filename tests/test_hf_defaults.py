"""Hugging Face models as their library builds them by default, called as a user calls them.

Generative models keep their default ``use_cache=True``: the output holds a key/value cache object (``DynamicCache``,
``EncoderDecoderCache``), which ``torch.export`` cannot return; the explainer traces the model with its non-tensor
outputs left out and explains the logits. The same holds for the flags users pass at call time or set in configs:
``return_dict=False`` (a tuple), ``output_attentions=True``, ``output_hidden_states=True``. Configs are the library's
defaults with only the size fields shrunk (and, for sequence classification with batches above 1, the pad token the
library requires); no flag is set by hand unless the test is about that flag.

Oracle: the ``gradient`` preset equals autograd's gradient x input (``tests.helpers.gradient_oracle_errors``), and
the model and its config are untouched after compile and explain (``config.to_dict()`` and every parameter and
buffer compared before/after).
"""

from __future__ import annotations

import pytest
import torch

import dynlrp_fx as dynlrp
from dynlrp_fx.trace import tensor_outputs
from tests.helpers import GRADIENT_TOL, autograd_gradient_x_input, gradient_oracle_errors

VOCAB = 128
#: size fields only (the ``Config()`` defaults otherwise)
SMALL = {
    "GPT2": dict(n_layer=1, n_embd=32, n_head=2, vocab_size=VOCAB, n_positions=32),
    "Llama": dict(num_hidden_layers=1, hidden_size=32, intermediate_size=64, num_attention_heads=2,
                  num_key_value_heads=1, vocab_size=VOCAB, max_position_embeddings=32),
    "Mistral": dict(num_hidden_layers=1, hidden_size=32, intermediate_size=64, num_attention_heads=2,
                    num_key_value_heads=1, vocab_size=VOCAB, max_position_embeddings=32,
                    pad_token_id=0),  # sequence classification refuses batches > 1 without a pad token (eager too)
    "Bart": dict(vocab_size=VOCAB, d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                 decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=32),
    "T5": dict(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_decoder_layers=1, num_heads=2,
               relative_attention_num_buckets=8, relative_attention_max_distance=16),
}
HEAD = {"GPT2": "GPT2LMHeadModel", "Llama": "LlamaForCausalLM", "Mistral": "MistralForSequenceClassification",
        "Bart": "BartForConditionalGeneration", "T5": "T5ForConditionalGeneration"}


def _model(family: str, **config_flags):
    """``HEAD[family]`` from its default config with the sizes of :data:`SMALL` (and ``config_flags``, for tests of a
    config flag), random weights, eval mode."""
    import transformers

    cfg = getattr(transformers, f"{family}Config")(**SMALL[family], **config_flags)
    torch.manual_seed(0)
    return getattr(transformers, HEAD[family])(cfg).eval()


def _ids(length: int = 8, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, VOCAB, (2, length), generator=torch.Generator().manual_seed(seed))


def _explain(model, kwargs: dict, output_name: str = "logits"):
    """Compile with nothing but ``kwargs`` and explain; checks the explained output (the logits) and that the model and
    its config are untouched. Returns the explanation."""
    config = model.config.to_dict()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    ex = dynlrp.compile(model, example_kwargs=kwargs, rules="gradient", backend="eager")
    assert ex.traced.output_name.strip("[]'") == output_name
    expl = ex(**kwargs)
    with torch.no_grad():
        out = model(**kwargs)
    torch.testing.assert_close(expl.output, out[0] if isinstance(out, tuple) else out.logits)
    assert model.config.to_dict() == config  # the user's config untouched (use_cache, return_dict... as they were)
    after = model.state_dict()
    assert after.keys() == state.keys() and all(torch.equal(after[k], v) for k, v in state.items())
    return expl


def _check(model, kwargs: dict, output_name: str = "logits") -> None:
    """:func:`_explain`, and the gradient preset equals autograd's gradient x input."""
    expl = _explain(model, kwargs, output_name)
    errs = gradient_oracle_errors(expl, model, (), kwargs, None)
    assert errs and all(e <= GRADIENT_TOL for e in errs.values()), errs


@pytest.mark.parametrize("family", ["GPT2", "Llama"])
def test_default_causal_lm_compiles_and_equals_gradient_x_input(family):
    model = _model(family)
    assert model.config.use_cache  # the library's default: the output carries a cache object
    _check(model, {"input_ids": _ids()})


def test_default_sequence_classifier_with_cache_output():
    """``MistralForSequenceClassification`` returns its cache next to the logits (``SequenceClassifierOutputWithPast``)."""
    model = _model("Mistral")
    assert model.config.use_cache
    _check(model, {"input_ids": _ids()})


def _shifted_reference(model, kwargs: dict, dec: torch.Tensor, target: torch.Tensor):
    """Autograd's gradient x input of ``model`` called with its derived decoder ids ``dec`` passed explicitly as
    ``decoder_input_ids`` (the same computation), the decoder ids' share shifted back onto the input positions they
    were copied from (decoder position ``t + 1`` reads input position ``t``): ``(reference, magnitude, output)`` of
    ``input_ids``."""
    ref, mag, y = autograd_gradient_x_input(model, (), {**kwargs, "decoder_input_ids": dec}, None, target)
    expected, scale = ref["input_ids"].clone(), mag["input_ids"].clone()
    expected[:, :-1] += ref["decoder_input_ids"][:, 1:]
    scale[:, :-1] += mag["decoder_input_ids"][:, 1:]
    assert float(ref["decoder_input_ids"][:, 1:].abs().max()) > 0  # the decoder's share is not vacuous
    return expected, scale, y


@pytest.mark.slow
def test_default_bart_from_input_ids_only():
    """BART makes its decoder ids from ``input_ids`` (``shift_tokens_right``: an in-place ``copy_`` of integer ids into
    a new tensor, ``aten.copy`` and ``slice_scatter`` after export) and returns an ``EncoderDecoderCache``.

    The relevance of ``input_ids`` then sums the encoder's lookups of each id and the decoder's lookup of its shifted
    copy (decoder position ``t + 1`` reads input position ``t``; position 0 is the start token, a constant). The
    reference is autograd's gradient x input of the same model called with those decoder ids passed explicitly
    (the same computation), the decoder ids' part shifted back onto the input positions."""
    from transformers.models.bart.modeling_bart import shift_tokens_right

    model = _model("Bart")
    assert model.config.use_cache
    ids = _ids()
    expl = _explain(model, {"input_ids": ids})
    assert set(expl.inputs) == {"input_ids"}
    dec = shift_tokens_right(ids, model.config.pad_token_id, model.config.decoder_start_token_id)
    out = expl.output
    expected, scale, y = _shifted_reference(model, {"input_ids": ids}, dec, out.reshape(out.shape[0], -1).argmax(1))
    torch.testing.assert_close(out, y)
    err = float((expl.inputs["input_ids"].double() - expected.double()).abs().max()) / float(scale.max())
    assert err <= GRADIENT_TOL, err


class _ShiftedIds(torch.nn.Module):
    """BART's ``shift_tokens_right`` in a few lines: the decoder ids are a shifted copy of the input ids (an in-place
    ``copy_`` into a new integer tensor, then a start token), looked up by the same embedding as the ids."""

    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(16, 4)
        self.head = torch.nn.Linear(4, 3)

    def forward(self, input_ids, decoder_input_ids=None):
        if decoder_input_ids is None:
            decoder_input_ids = input_ids.new_zeros(input_ids.shape)
            decoder_input_ids[:, 1:] = input_ids[:, :-1].clone()
            decoder_input_ids[:, 0] = 2
        return self.head(torch.relu(self.emb(input_ids) + self.emb(decoder_input_ids)))


def test_ids_copied_into_a_new_tensor_route_their_relevance():
    """Integer ids written in place into a new tensor (``aten.copy`` and ``slice_scatter`` after export, which torch
    cannot differentiate as such) carry their lookups' relevance back to the input ids, as gradient x input does."""
    torch.manual_seed(0)
    model = _ShiftedIds().eval()
    ids = torch.randint(3, 16, (2, 6), generator=torch.Generator().manual_seed(0))
    expl = dynlrp.compile(model, (ids,), rules="gradient", backend="eager")(ids)
    dec = ids.new_full(ids.shape, 2)
    dec[:, 1:] = ids[:, :-1]
    out = expl.output
    expected, scale, y = _shifted_reference(model, {"input_ids": ids}, dec, out.reshape(out.shape[0], -1).argmax(1))
    torch.testing.assert_close(out, y)
    err = float((expl.inputs["input_ids"].double() - expected.double()).abs().max()) / float(scale.max())
    assert err <= GRADIENT_TOL, err


@pytest.mark.slow
def test_default_t5_with_decoder_input_ids():
    """T5 needs decoder inputs (it makes none from ``input_ids``): a user passes ``decoder_input_ids``. Its output holds
    an ``EncoderDecoderCache``."""
    model = _model("T5")
    assert model.config.use_cache
    _check(model, {"input_ids": _ids(), "decoder_input_ids": _ids(5, seed=1)})


CALL_FLAGS = {
    "return_dict=False": ({"return_dict": False}, "0"),
    "output_attentions": ({"output_attentions": True}, "logits"),
    "output_hidden_states": ({"output_hidden_states": True}, "logits"),
}


@pytest.mark.parametrize("flag", [pytest.param(f, marks=[] if f == "return_dict=False" else [pytest.mark.slow])
                                  for f in CALL_FLAGS])
def test_call_time_flags_explain_the_logits(flag):
    """Flags passed at call time: a tuple output (``return_dict=False``) or extra tuples of attentions / hidden states
    next to the cache; the logits are explained."""
    kwargs, name = CALL_FLAGS[flag]
    _check(_model("GPT2"), {"input_ids": _ids(), **kwargs}, output_name=name)


@pytest.mark.slow
@pytest.mark.parametrize("flag", ["output_attentions", "output_hidden_states"])
def test_config_flags_explain_the_logits(flag):
    """The same flags set in the config (as a saved config may carry them). ``return_dict=False`` in a config is not
    tested: transformers 5's causal LMs fail on it in eager mode (the base model returns a tuple and the head reads
    ``outputs.last_hidden_state``)."""
    _check(_model("Llama", **{flag: True}), {"input_ids": _ids()})


def test_tensor_outputs_keeps_tensors_under_their_names():
    class Cache:
        pass

    t = torch.ones(2)
    assert tensor_outputs({"logits": t, "cache": Cache(), "x": None}) == {"logits": t}
    assert tensor_outputs((t, Cache(), (t, "s"))) == (t, (t,))
    assert tensor_outputs(Cache()) is None and tensor_outputs({"c": Cache()}) is None
