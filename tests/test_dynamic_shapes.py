"""Any input shape: batch and token sequence lengths are dynamic by default; a dimension the model specialises (or
one the program is static in) gets a program per shape, built on first use and cached, with one warning.

Oracles: the ``gradient`` preset equals autograd's gradient x input at every length; LRP-0 equals gradient x input
on piecewise-linear models at every new shape; an epsilon explanation from the dynamic program equals one from a
program compiled at exactly that length."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dynlrp_fx as dynlrp
import dynlrp_fx.explainer as explainer_module
from tests.helpers import GRADIENT_TOL, grad_x_input, gradient_oracle_errors, tiny_bert


def _tokens(batch: int, length: int, vocab: int = 128, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed + 100 * length + batch)
    ids = torch.randint(0, vocab, (batch, length), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


@pytest.fixture(scope="module")
def bert():
    torch.manual_seed(0)
    model = tiny_bert()  # max_position_embeddings=32
    explainer = dynlrp.compile(model, example_kwargs=_tokens(3, 12), rules="gradient")
    return model, explainer


def test_sequence_length_is_dynamic_by_default(bert):
    model, explainer = bert
    ids, mask = (explainer.call_spec.inputs[i].shape for i in range(2))
    assert isinstance(ids[1], str) and ids == mask, "input_ids and attention_mask share one dynamic length"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no program per shape, no warning
        for batch, length in ((2, 9), (4, 20), (1, 12), (2, 2)):
            kwargs = _tokens(batch, length)
            expl = explainer(**kwargs)
            assert expl.relevance.shape == (batch, length)
            errs = gradient_oracle_errors(expl, model, (), kwargs)
            assert max(errs.values()) < GRADIENT_TOL, (batch, length, errs)
    assert explainer.variants == []


def test_dynamic_length_equals_a_program_traced_at_that_length():
    torch.manual_seed(0)
    model = tiny_bert()
    dynamic = dynlrp.compile(model, example_kwargs=_tokens(2, 12), rules="epsilon")
    kwargs = _tokens(3, 7)
    static = dynlrp.compile(model, example_kwargs=kwargs, rules="epsilon", dynamic=False)
    assert all(isinstance(d, int) for d in static.call_spec.inputs[0].shape)
    a, b = dynamic(**kwargs, target=1), static(**kwargs, target=1)
    torch.testing.assert_close(a.relevance, b.relevance, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(a.conservation.seed, b.conservation.seed)


def test_length_beyond_the_position_embeddings_is_a_named_error(bert):
    _, explainer = bert
    with pytest.warns(UserWarning, match="outside the range"), pytest.raises(dynlrp.DynlrpShapeError) as info:
        explainer(**_tokens(2, 40))
    msg = str(info.value)
    assert "size 40 in dimension 1" in msg and "[1, 32]" in msg and "Tracing the model again" in msg
    assert isinstance(info.value, dynlrp.DynlrpInputError)


def test_causal_lm_default_config_any_length():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=128, n_positions=64, n_embd=32, n_layer=2, n_head=2)
    model = transformers.GPT2LMHeadModel(config).eval()
    ids = torch.randint(0, 128, (2, 8))
    explainer = dynlrp.compile(model, example_kwargs={"input_ids": ids}, rules="gradient")
    assert isinstance(explainer.call_spec.inputs[0].shape[1], str)
    for length in (5, 13):
        kwargs = {"input_ids": torch.randint(0, 128, (3, length))}
        expl = explainer(**kwargs)
        errs = gradient_oracle_errors(expl, model, (), kwargs)
        assert max(errs.values()) < GRADIENT_TOL, (length, errs)
    assert explainer.variants == []


class LenBatch(nn.Module):
    """A forward that specialises the batch with Python arithmetic on ``len(x)`` (as hand-written ViTs do)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(8, 16)
        self.b = nn.Linear(16, 4)

    def forward(self, x):
        b = len(x)
        return self.b(F.relu(self.a(x))).reshape(b, -1)


def test_specialised_batch_builds_a_program_per_shape_with_one_warning():
    torch.manual_seed(0)
    model = LenBatch().eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    explainer = dynlrp.compile(model, torch.randn(5, 8), rules="lrp0")
    assert explainer.traced.specialised == {"batch": 5}
    assert explainer.call_spec.inputs[0].shape == [5, 8]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for batch in (5, 3, 1, 3, 7):
            x = torch.randn(batch, 8)
            target = torch.arange(batch) % 4  # per-sample targets at every size
            expl = explainer(x, target=target)
            torch.testing.assert_close(expl.relevance, grad_x_input(model, x, target), rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(expl.output, model(x))
    shape_warnings = [w for w in caught if "traced again for each new input shape" in str(w.message)]
    assert len(shape_warnings) == 1 and "specialised batch=5" in str(shape_warnings[0].message)
    assert shape_warnings[0].filename == __file__, "the warning points at the caller"
    assert sorted(v.call_spec.inputs[0].shape[0] for v in explainer.variants) == [1, 3, 7]
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_variants_are_bounded(monkeypatch):
    monkeypatch.setattr(explainer_module, "MAX_VARIANTS", 2)
    explainer = dynlrp.compile(LenBatch().eval(), torch.randn(5, 8), rules="lrp0")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for batch in (2, 3, 4, 3):
            explainer(torch.randn(batch, 8))
    # least recently used dropped: 2 went when 4 came; 3 was used again last
    assert [v.call_spec.inputs[0].shape[0] for v in explainer.variants] == [4, 3]


def test_static_program_seeds_and_other_image_sizes():
    """``dynamic=False`` and a CNN's image size (static by default): new shapes get their own program, with
    per-sample targets and seeds."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(16, 5)).eval()
    for explainer in (dynlrp.compile(model, torch.randn(2, 3, 16, 16), rules="lrp0"),
                      dynlrp.compile(model, torch.randn(2, 3, 16, 16), rules="lrp0", dynamic=False)):
        with pytest.warns(UserWarning, match="traced again"):
            x = torch.randn(3, 3, 20, 24)
            target = torch.tensor([0, 4, 2])
            expl = explainer(x, target=target)
        torch.testing.assert_close(expl.relevance, grad_x_input(model, x, target), rtol=1e-5, atol=1e-6)
        # under LRP-0 a seed R_y = w * y gives x * d(sum(w * y))/dx
        w = torch.randn(3, 5)
        by_seed = explainer(x, seed=w * model(x).detach())
        xg = x.clone().requires_grad_(True)
        (g,) = torch.autograd.grad((model(xg) * w).sum(), xg)
        torch.testing.assert_close(by_seed.relevance, g * x, rtol=1e-5, atol=1e-6)
        assert len(explainer.variants) == 1


def test_export_stores_the_shapes_seen(tmp_path):
    """A loaded file holds the explainer's program and those it built for other shapes: each shape explained live
    before the export runs loaded and equals the live explainer; another shape is refused by name."""
    torch.manual_seed(0)
    model = LenBatch().eval()
    explainer = dynlrp.compile(model, torch.randn(5, 8), rules="lrp0")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        explainer(torch.randn(3, 8))
    path = dynlrp.export(explainer, tmp_path / "len.pt2", modes=("target", "seed"))
    loaded = dynlrp.load(path)
    assert len(loaded.variants) == 1
    for batch in (5, 3):
        x = torch.randn(batch, 8)
        target = torch.arange(batch) % 4
        live, got = explainer(x, target=target), loaded(x, target=target)
        torch.testing.assert_close(got.relevance, live.relevance)
        torch.testing.assert_close(got.relevance, grad_x_input(model, x, target), rtol=1e-5, atol=1e-6)
        seed = torch.randn(batch, 4)
        torch.testing.assert_close(loaded(x, seed=seed).relevance, explainer(x, seed=seed).relevance)
    with pytest.raises(dynlrp.DynlrpLoadError, match=r"holds programs for these input shapes.*\[5, 8\].*\[3, 8\]"):
        loaded(torch.randn(4, 8))


def test_a_model_that_takes_one_sample_only_is_traced_at_its_batch():
    """A sequence classifier without a pad token refuses batches above 1 (its library raises), so the doubled batch
    the tracer tries first fails: the user's batch of 1 is traced static and the length stays dynamic."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.MistralConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2)
    model = transformers.MistralForSequenceClassification(config).eval()
    explainer = dynlrp.compile(model, example_kwargs={"input_ids": torch.randint(3, 128, (1, 8))}, rules="gradient")
    shape = explainer.call_spec.inputs[0].shape
    assert shape[0] == 1 and isinstance(shape[1], str)
    for length in (8, 11):
        kwargs = {"input_ids": torch.randint(3, 128, (1, length))}
        errs = gradient_oracle_errors(explainer(**kwargs), model, (), kwargs)
        assert max(errs.values()) < GRADIENT_TOL, (length, errs)
    assert explainer.variants == []


def test_explainers_sharing_a_trace_keep_its_ranges():
    """Building a program re-runs fake convolutions on the trace's shape environment, where a torch guard narrows
    the batch symbol's range (to <= 15): a second explainer on the same trace still takes any batch, because the
    ranges are those recorded at trace time."""
    from dynlrp_fx.explainer import Explainer
    from dynlrp_fx.presets import resolve
    from dynlrp_fx.trace import trace

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3)).eval()
    traced = trace(model, (torch.randn(4, 1, 8, 8),))
    first = Explainer(model, traced, resolve("lrp0"))
    second = Explainer(model, traced, resolve("gradient"))
    assert first.call_spec.ranges == second.call_spec.ranges == traced.ranges
    x = torch.randn(20, 1, 8, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no program per shape: batch 20 is in range
        a, b = first(x, target=1), second(x, target=1)
    torch.testing.assert_close(a.relevance, b.relevance, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(a.relevance, grad_x_input(model, x, 1), rtol=1e-5, atol=1e-6)
