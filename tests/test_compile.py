"""Inductor-compiled explanations equal eager ones; one compilation serves every batch size above 1.

Kept small on purpose: Inductor compiles on 2 shared CPU cores are slow.

torch's meta functions specialise size 1 (Inductor's CPU convolution guards ``2 <= batch``, ``copy_`` guards
broadcasting), so a batch of 1 gets its own static compilation (padding it to 2 would do twice the work); the
explainer ties every batched input's dim 0 to one symbol (the ``unify_batch`` pass), so one compilation serves
batches 2, 3, 7.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import dynlrp_fx as dynlrp
from tests.helpers import pooled_cnn, tiny_bert


class CountingInductor:
    """A ``torch.compile`` backend that counts compilations and delegates to Inductor."""

    def __init__(self):
        self.compilations = 0

    def __call__(self, gm: torch.fx.GraphModule, example_inputs):
        from torch._inductor.compile_fx import compile_fx

        self.compilations += 1
        return compile_fx(gm, example_inputs)


def _close(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-5) -> bool:
    return bool(((a - b).abs() <= tol * (1 + b.abs())).all())


@pytest.mark.slow  # ~40 s of Inductor compile on two cores: in CI's slow step (test-slow-ci)
def test_compiled_equals_eager_cnn_and_batch_is_dynamic():
    model = pooled_cnn()
    backend = CountingInductor()
    compiled = dynlrp.compile(model, torch.randn(2, 3, 16, 16), backend=backend)
    eager = dynlrp.compile(model, torch.randn(2, 3, 16, 16), backend="eager")
    for batch in (2, 1, 3, 7):
        x = torch.randn(batch, 3, 16, 16)
        c, e = compiled(x), eager(x)
        assert c.relevance.shape == x.shape
        assert _close(c.output, e.output) and _close(c.relevance, e.relevance)
        assert _close(c.absorbed, e.absorbed) and _close(c.conservation.seed, e.conservation.seed)
    assert backend.compilations == 2, f"recompiled for a new batch size ({backend.compilations} compilations)"


@pytest.mark.slow  # 60-70 s of Inductor compile on two cores: in CI's slow step (test-slow-ci)
def test_compiled_equals_eager_bert_2_layers_one_compile_for_batches_2_3_7():

    torch.manual_seed(0)
    model = tiny_bert(sdpa=True)
    kw = {"input_ids": torch.randint(3, 128, (2, 10)), "attention_mask": torch.ones(2, 10, dtype=torch.long)}
    backend = CountingInductor()
    compiled = dynlrp.compile(model, example_kwargs=kw, backend=backend)
    eager = dynlrp.compile(model, example_kwargs=kw, backend="eager")
    for batch in (2, 1, 3, 7):
        kb = {
            "input_ids": torch.randint(3, 128, (batch, 10)),
            "attention_mask": torch.ones(batch, 10, dtype=torch.long),
        }
        c, e = compiled(**kb), eager(**kb)
        assert set(c.inputs) == set(e.inputs) and c.inputs
        for name in e.inputs:
            assert _close(c.inputs[name], e.inputs[name]), name
        assert _close(c.output, e.output) and _close(c.absorbed, e.absorbed)
    assert backend.compilations == 2, f"recompiled per batch size ({backend.compilations} compilations)"


@pytest.mark.slow  # ~26 s (two Inductor compiles of a small CNN): CI's slow step
def test_recompile_switches_backend_and_policy_without_tracing_again():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3)).eval()
    eager = dynlrp.compile(model, torch.randn(2, 6), backend="eager", promise_policy="keep")
    backend = CountingInductor()
    compiled = eager.recompile(backend=backend)
    recomputing = eager.recompile(promise_policy="recompute")
    assert compiled.traced is eager.traced and recomputing.traced is eager.traced  # no new trace
    assert compiled.graph() is eager.graph()  # same policy: the lowered program is shared
    assert eager.backend == "eager" and eager.promise_policy == "keep"  # the original is unchanged
    x = torch.randn(5, 6)
    ref = eager(x)
    for other in (compiled, recomputing):
        got = other(x)
        assert _close(got.relevance, ref.relevance) and _close(got.absorbed, ref.absorbed)
    assert backend.compilations == 1
    with pytest.raises(ValueError, match="promise policy"):
        eager.recompile(promise_policy="hoard")


def test_auto_backend_is_eager_on_cpu_and_compiled_when_asked():
    """``backend="auto"`` (the default) runs the eager program on CPU (Inductor measured slower there), compiles
    when a ``torch.compile`` mode is given, and leaves explicit choices alone."""
    from dynlrp_fx.explainer import resolve_backend

    model = pooled_cnn()
    ex = dynlrp.compile(model, torch.randn(2, 3, 16, 16))
    assert ex.backend == "eager"
    assert ex.recompile(mode="max-autotune").backend == "inductor"
    assert resolve_backend("auto", torch.device("cuda", 0)) == "inductor"
    assert resolve_backend("auto", torch.device("cpu"), mode="reduce-overhead") == "inductor"
    assert resolve_backend("inductor", torch.device("cpu")) == "inductor"
    assert resolve_backend("eager", torch.device("cuda", 0)) == "eager"
    with pytest.raises(ValueError, match="backend must be one of"):
        resolve_backend(3, None)
