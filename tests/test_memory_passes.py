"""Passes that lower eager memory without changing a value: buffer reuse (in-place rewrites), sinking cheap ops to
their first user, transposed-convolution pullbacks, and batch-norm recomputation under the ``recompute`` policy."""

from __future__ import annotations

import operator

import pytest
import torch
import torch.fx as fx
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp

import dynlrp_fx as dynlrp
from dynlrp_fx.explainer import Explainer
from dynlrp_fx.passes.memory import peak_live_bytes
from dynlrp_fx.passes.reuse_buffers import inplace_variant, out_variant
from dynlrp_fx.program import Analysis
from dynlrp_fx.rules.composite import Composite, default_class_rules
from tests.helpers import call_args, grad_x_input, pooled_cnn, run_pass, tiny_bert

aten = torch.ops.aten


def _graph(build) -> fx.GraphModule:
    """A GraphModule from ``build(graph, x)`` -> outputs, with ``val`` metadata (shapes, strides) from a real run."""
    g = fx.Graph()
    x = g.placeholder("x")
    g.output(build(g, x))
    return _with_vals(fx.GraphModule(nn.Module(), g), torch.randn(64))


def _with_vals(gm: fx.GraphModule, *args) -> fx.GraphModule:
    """``gm`` with ``val`` metadata (shapes, strides) from a real run on ``args``, as lowering leaves it."""
    ShapeProp(gm).propagate(*args)

    def empty(tm):  # (a TensorMetadata is a named tuple itself)
        if not hasattr(tm, "shape"):
            return tuple(empty(t) for t in tm)
        return torch.empty_strided(tm.shape, tm.stride, dtype=tm.dtype)

    for n in gm.graph.nodes:
        tm = n.meta.get("tensor_meta")
        if n.op != "output" and tm is not None:
            n.meta["val"] = empty(tm)
    return gm


def _targets(gm: fx.GraphModule) -> list:
    return [n.target for n in gm.graph.nodes if n.op == "call_function"]


def test_twins_of_pointwise_ops():
    assert inplace_variant(aten.add.Tensor) is aten.add_.Tensor
    assert inplace_variant(aten.mul.Scalar) is aten.mul_.Scalar
    assert inplace_variant(aten.mm.default) is None  # not pointwise
    assert out_variant(aten.div.Tensor) is aten.div.out
    assert out_variant(aten.where.self) is aten.where.self_out


def test_reuse_buffers_writes_into_dying_temporaries_only():
    """``a = x*2; b = a+1; c = -b``: ``b`` may overwrite ``a`` and ``c`` may overwrite ``b``; ``x`` (an input) is
    never written; the values are the same."""
    gm = _graph(lambda g, x: g.call_function(aten.neg.default, (
        g.call_function(aten.add.Tensor, (g.call_function(aten.mul.Tensor, (x, 2.0)), 1.0)),)))
    new, ctx = run_pass("reuse_buffers", gm, backend="eager")
    k = ctx.buffer_rewrites
    assert k == 2 and _targets(new) == [aten.mul.Tensor, aten.add_.Tensor, aten.neg_.default]
    assert _targets(gm) == [aten.mul.Tensor, aten.add.Tensor, aten.neg.default]  # the input graph is untouched
    x = torch.randn(64)
    x0 = x.clone()
    assert torch.equal(new(x), gm(x)) and torch.equal(x, x0)
    assert peak_live_bytes(new, x)[0] == 64 * 4 < peak_live_bytes(gm, x)[0]


def test_reuse_buffers_respects_views_outputs_and_operand_order():
    """A storage that a view still reads later, or that is a graph output, is not written; a dying second operand
    is written through ``out=``."""

    def build(g, x):
        a = g.call_function(aten.mul.Tensor, (x, 2.0))
        v = g.call_function(aten.view.default, (a, [8, 8]))
        b = g.call_function(aten.add.Tensor, (a, 1.0))  # a is still read through v: not in place
        t = g.call_function(aten.exp.default, (x,))
        d = g.call_function(aten.div.Tensor, (b, t))  # t dies here, b too: b first (in place)
        e = g.call_function(aten.sub.Tensor, (x, d))  # d dies, but it is operand 1: sub.out(x, d, out=d)
        return (v, e)

    gm = _graph(build)
    new, _ = run_pass("reuse_buffers", gm, backend="eager")
    assert _targets(new) == [aten.mul.Tensor, aten.view.default, aten.add.Tensor, aten.exp.default,
                             aten.div_.Tensor, aten.sub.out]
    x = torch.randn(64)
    for a, b in zip(new(x), gm(x)):
        assert torch.equal(a, b)


def test_reuse_buffers_sees_one_storage_behind_two_getitems_of_one_output():
    """Two ``getitem`` s of the same output of a multi-output op (a value reused by a later pass) are one storage:
    a pointwise op on the first may not write into it while the second is read later."""
    def build(g, x):
        t = g.call_function(aten.var_mean.correction, (x,), {"correction": 0})
        first, second = (g.call_function(operator.getitem, (t, 1)) for _ in range(2))
        neg = g.call_function(aten.neg.default, (first,))
        return (neg, g.call_function(aten.add.Tensor, (second, 1.0)))

    gm = _graph(build)
    new, ctx = run_pass("reuse_buffers", gm, backend="eager")
    assert aten.neg_.default not in _targets(new)
    x = torch.randn(64)
    assert all(torch.equal(a, b) for a, b in zip(new(x), gm(x)))


def test_reuse_buffers_knows_unannotated_views():
    """``_unsafe_view`` returns a view although its schema does not say so: writing into it would change ``a``,
    which is read afterwards."""

    def build(g, x):
        a = g.call_function(aten.mul.Tensor, (x, 2.0))
        v = g.call_function(aten._unsafe_view.default, (a, [8, 8]))
        b = g.call_function(aten.add.Tensor, (v, 1.0))
        return (b, g.call_function(aten.add.Tensor, (a, 3.0)))

    gm = _graph(build)
    new, _ = run_pass("reuse_buffers", gm, backend="eager")
    assert aten.add.Tensor in _targets(new)[:3]  # the first add stays out of place
    x = torch.randn(64)
    for a, b in zip(new(x), gm(x)):
        assert torch.equal(a, b)


def test_sink_moves_a_recomputation_to_its_user_and_lowers_the_peak():
    """``r = relu(z)`` computed early stays alive through a temporary-heavy stretch; it moves down to its user
    because ``z`` is read after that point anyway, and the peak drops."""

    def build(g, x):
        z = g.call_function(aten.mul.Tensor, (x, 3.0))
        r = g.call_function(aten.relu.default, (z,))
        w = g.call_function(aten.sin.default, (x,))
        s = g.call_function(aten.exp.default, (w,))
        t = g.call_function(aten.add.Tensor, (s, w))
        u = g.call_function(aten.mul.Tensor, (r, t))
        return (g.call_function(aten.add.Tensor, (u, z)),)

    gm = _graph(build)
    x = torch.randn(64)
    before_peak, before = peak_live_bytes(gm, x)
    run_pass("sink_cheap_ops", gm)
    order = [str(n.target) for n in gm.graph.nodes if n.op == "call_function"]
    i = order.index("aten.relu.default")
    assert i > order.index("aten.add.Tensor") and order[i + 1] == "aten.mul.Tensor"  # right before its user
    after_peak, after = peak_live_bytes(gm, x)
    assert after_peak < before_peak
    assert torch.equal(before[0], after[0])


def test_sink_never_makes_an_input_live_longer():
    """``p = exp(q)`` is the last read of ``q``: moving ``p`` down to its distant user would keep ``q`` alive
    longer, so it stays."""

    def build(g, x):
        q = g.call_function(aten.sin.default, (x,))
        p = g.call_function(aten.exp.default, (q,))
        k = g.call_function(aten.cos.default, (x,))
        m = g.call_function(aten.mul.Tensor, (k, 2.0))
        return (g.call_function(aten.add.Tensor, (p, m)),)

    gm, _ = run_pass("sink_cheap_ops", _graph(build))
    order = [str(n.target) for n in gm.graph.nodes if n.op == "call_function"]
    assert order.index("aten.exp.default") == order.index("aten.sin.default") + 1
    assert order.index("aten.exp.default") < order.index("aten.cos.default")


def test_sink_never_moves_a_read_past_a_write():
    """``r = neg(a)`` must stay before ``a.add_(1)`` (a VJP's in-place fill), even though ``a`` is read later."""

    def build(g, x):
        a = g.call_function(aten.mul.Tensor, (x, 1.0))
        r = g.call_function(aten.neg.default, (a,))
        g.call_function(aten.add_.Tensor, (a, 1.0))
        return (g.call_function(aten.add.Tensor, (r, a)),)

    gm = _graph(build)
    x = torch.randn(64)
    expected = gm(x)[0]
    run_pass("sink_cheap_ops", gm)
    assert [str(t) for t in _targets(gm)].index("aten.neg.default") == 1
    torch.testing.assert_close(gm(x)[0], expected, rtol=0, atol=0)


class _Convs(nn.Module):
    """Strided, dilated, grouped and 1d/3d convolutions with odd sizes: every output-padding case."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, stride=2, padding=1)  # 11 -> 6 (output padding 0)
        self.c2 = nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=2)  # 6 -> 3 (output padding 1)
        self.c3 = nn.Conv2d(8, 6, 2, dilation=2, padding=1)
        self.c4 = nn.Conv1d(6, 4, 3, stride=2)
        self.c5 = nn.Conv3d(1, 2, 3, stride=2, padding=1)

    def forward(self, x):
        h = torch.relu(self.c3(torch.relu(self.c2(torch.relu(self.c1(x))))))
        h = torch.relu(self.c4(h.flatten(2)))
        h3 = torch.relu(self.c5(x[:, :1, None, :5, :5].expand(-1, 1, 5, 5, 5).contiguous()))
        return torch.cat([h.flatten(1), h3.flatten(1)], 1)


def test_convolution_pullbacks_become_transposed_convolutions():
    """No ``convolution_backward`` is left in the program, and LRP-0 still equals gradient x input."""
    torch.manual_seed(0)
    model = _Convs().eval().double()
    x = torch.randn(3, 3, 11, 11, dtype=torch.float64)
    ex = dynlrp.compile(model, (x[:2],), rules=dynlrp.presets.lrp0(), backend="eager")
    targets = [str(n.target) for n in ex.graph().graph.nodes]
    assert "aten.convolution_backward.default" not in targets
    assert sum(t == "aten.convolution.default" for t in targets) == 10  # 5 forward + 5 transposed
    e = ex(x, target=4)
    torch.testing.assert_close(e.relevance, grad_x_input(model, x, torch.full((3,), 4)), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("which", ["cnn", "bert"])
def test_eager_program_reuses_buffers_and_equals_the_functional_graph(which):
    """The eager backend runs the buffer-reusing copy: bit-identical results, lower peak, the model untouched."""
    if which == "cnn":
        model, args, kwargs = pooled_cnn(), (torch.randn(4, 3, 16, 16),), {}
    else:
        model = tiny_bert(sdpa=True)
        args, kwargs = (), {"input_ids": torch.randint(3, 128, (2, 12)), "attention_mask": torch.ones(2, 12, dtype=torch.long)}
    state = {k: v.clone() for k, v in model.state_dict().items()}
    ex = dynlrp.compile(model, args, example_kwargs=kwargs, backend="eager")
    if which == "cnn":
        # the relevance form, whose epsilon chains leave activation-sized temporaries at the peak (in gradient form
        # this CNN's peak is forward values and gradients, which no pointwise rewrite can lower)
        ex = Explainer(model, ex.traced, ex.composite, backend="eager",
                       analysis=Analysis(ex.traced, ex.composite, gradient_form=False))
    else:
        # every row of the last layer (narrow_dead_rows computes the pooler's token alone, after which this tiny
        # BERT's peak is forward values that no buffer reuse lowers): the sweep's (B, T, 64) temporaries at the peak
        ex = Explainer(model, ex.traced, ex.composite, backend="eager",
                       analysis=Analysis(ex.traced, ex.composite, narrow_rows=False))
    prog = ex.program("target")
    assert prog.fn is not prog.graph
    def mutating(gm):
        return sum(isinstance(t, torch._ops.OpOverload) and t._schema.is_mutable for t in _targets(gm))

    assert mutating(prog.fn) > mutating(prog.graph)
    call = call_args(ex, args, kwargs)
    peak_f, out_f = peak_live_bytes(prog.graph, *call)
    peak_r, out_r = peak_live_bytes(prog.fn, *call)
    assert peak_r < peak_f
    for a, b in zip(out_f, out_r):
        assert torch.equal(a, b)
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k


def _policy_run(model, args, kwargs, policy, counted, rules=None):
    """``(ops counted, peak_live_bytes, relevance)`` of the eager explainer of ``model`` under a promise policy;
    ``counted(node)`` picks the ops to count in its lowered program."""
    ex = dynlrp.compile(model, args, example_kwargs=kwargs, backend="eager", promise_policy=policy, rules=rules)
    peak, _ = peak_live_bytes(ex.graph(), *call_args(ex, args, kwargs))
    return sum(map(counted, ex.graph().graph.nodes)), peak, ex(*args, **kwargs).relevance


def test_recompute_rematerialises_batch_norm():
    """Under ``recompute`` an inference batch norm is recomputed from the convolution output that the relevance
    half holds anyway (one activation fewer per conv-bn layer), with the same relevance as ``keep``. The
    convolution's own rule reads that output here: epsilon without ``merge_batchnorm`` (the ``epsilon`` preset
    gives the convolution LRP-0, which reads nothing, and then holds the batch norm's output instead:
    ``tests/test_memory_policy.py``)."""
    torch.manual_seed(0)
    layers = [m for c in (3, 8, 8) for m in (nn.Conv2d(c, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())]
    model = nn.Sequential(*layers, nn.Flatten(), nn.Linear(8 * 16 * 16, 5)).eval()
    x = torch.randn(4, 3, 16, 16)
    unmerged = Composite(default_class_rules(1e-6))
    res = {
        policy: _policy_run(model, (x,), {}, policy, lambda n: "batch_norm" in str(n.target), rules=unmerged)
        for policy in ("keep", "recompute")
    }
    assert res["recompute"][0] >= res["keep"][0] + 3  # each forward batch norm recomputed
    assert res["recompute"][1] < res["keep"][1]
    assert torch.equal(res["keep"][2], res["recompute"][2])


class _TransposedLinear(nn.Module):
    """``nn.MultiheadAttention``'s projection pattern: a linear layer over ``x.transpose(0, 1)`` (which
    ``torch.export`` traces as a ``bmm`` against the weight expanded along the sequence)."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(6, 12)
        self.out = nn.Linear(12, 4)

    def forward(self, x):  # x: (batch, seq, 6)
        h = torch.relu(self.proj(x.transpose(0, 1)))  # (seq, batch, 12)
        return self.out(h.transpose(0, 1)).sum(1)


def _broadcast_bmms(gm: fx.GraphModule) -> int:
    return sum(
        n.target is aten.bmm.default and n.args[1].meta["val"].stride(0) == 0
        for n in gm.graph.nodes
        if n.op == "call_function"
    )


def test_broadcast_bmm_becomes_one_matmul():
    """A ``bmm`` against a broadcast weight is one ``mm`` in both halves of the program, and LRP-0 still equals
    gradient x input (forward and pullbacks rewritten alike); without the pass the traced graph has such ``bmm`` s."""

    torch.manual_seed(0)
    model = _TransposedLinear().double().eval()
    x = torch.randn(3, 5, 6, dtype=torch.float64)
    ex = dynlrp.compile(model, (x[:2],), rules=dynlrp.presets.lrp0(), backend="eager")
    assert _broadcast_bmms(ex.traced.graph_module) == 2  # the traced forward has the pattern (both layers)
    gm = ex.graph()
    assert _broadcast_bmms(gm) == 0
    assert sum(n.target is aten.mm.default for n in gm.graph.nodes) >= 2
    e = ex(x, target=1)
    torch.testing.assert_close(e.relevance, grad_x_input(model, x, torch.full((3,), 1)), rtol=1e-9, atol=1e-12)
    # the pattern the pass removes: a bmm of A (B, M, K) with W expanded to (B, K, N); values as the bmm's
    g = fx.Graph()
    a, w = g.placeholder("a"), g.placeholder("w")
    g.output(g.call_function(aten.bmm.default, (a, g.call_function(aten.expand.default, (w, [5, 6, 12])))))
    av, wv = torch.randn(3, 5, 6, dtype=torch.float64).transpose(0, 1), torch.randn(6, 12, dtype=torch.float64)
    raw = _with_vals(fx.GraphModule(nn.Module(), g), av, wv)
    ref = raw(av, wv)
    assert _broadcast_bmms(raw) == 1
    folded, _ = run_pass("fold_broadcast_bmm", raw)
    assert _broadcast_bmms(folded) == 0 and aten.mm.default in _targets(folded)
    torch.testing.assert_close(folded(av, wv), ref, rtol=1e-12, atol=1e-12)


class _PackedAttention(nn.Module):
    """``nn.MultiheadAttention`` (one packed ``(3E, E)`` input projection) and a linear head."""

    def __init__(self):
        super().__init__()
        self.mha = nn.MultiheadAttention(16, 2, batch_first=True)
        self.fc = nn.Linear(16, 3)

    def forward(self, x, detach_query_key: bool = False):
        qk = x.detach() if detach_query_key else x
        y, _ = self.mha(qk, qk if not detach_query_key else x.detach(), x, need_weights=False)
        return self.fc(y.mean(1))


def test_packed_projection_pulls_back_only_the_value_block():
    """CP-LRP sends no relevance through query and key, so the packed input projection's cotangent is zero outside
    the value's columns: its pullback multiplies those 16 columns, not all 48, and the relevance is still LXT's
    CP-LRP (LRP-0 with query and key detached), i.e. gradient x input of the model with query and key detached."""
    torch.manual_seed(0)
    model = _PackedAttention().double().eval()
    x = torch.randn(3, 5, 16, dtype=torch.float64)
    ex = dynlrp.compile(model, (x[:2],), rules="cp_lrp", backend="eager")
    mms = [[tuple(a.meta["val"].shape) for a in n.args] for n in ex.graph().graph.nodes if n.target is aten.mm.default]
    assert not any(w == (48, 16) for _, w in mms)  # no pullback through the whole packed weight
    assert any(w == (16, 48) for _, w in mms) and sum(w == (16, 16) for _, w in mms) >= 2  # forward; value block
    xr = x.clone().requires_grad_(True)
    y = model(xr, detach_query_key=True)
    (g,) = torch.autograd.grad(y[torch.arange(3), 1].sum(), xr)
    torch.testing.assert_close(ex(x, target=1).relevance, xr.detach() * g, rtol=1e-9, atol=1e-12)


@pytest.mark.slow  # ~20 s (two GPT-2 compiles): in CI's slow step; the MHA test covers the pass by default
def test_split_projection_pulls_back_only_the_value_block(monkeypatch):
    """GPT-2's ``c_attn`` is split into query, key and value; under CP-LRP the split's pullback is a ``cat`` of
    zeros and the value's cotangent, and the projection's pullback multiplies only the value's columns: the same
    relevance (float64) as the program without the pass, which multiplies all of them."""
    import transformers

    from dynlrp_fx.passes import PIPELINE

    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=40, n_positions=32, n_embd=16, n_layer=2, n_head=2)
    model = transformers.GPT2LMHeadModel(cfg).eval().double()
    ids = torch.randint(0, 40, (2, 7))

    def run():
        ex = dynlrp.compile(model, example_kwargs={"input_ids": ids}, rules="cp_lrp", backend="eager", cache=False)
        ws = [tuple(n.args[1].meta["val"].shape) for n in ex.graph().graph.nodes if n.target is aten.mm.default]
        return ex(input_ids=ids, target=5).inputs["input_ids"], ws

    r, ws = run()
    assert (48, 16) not in ws and ws.count((16, 16)) >= 2  # per layer: the value block, not the packed weight
    monkeypatch.setattr(PIPELINE, "passes", tuple(p for p in PIPELINE.passes if p.name != "narrow_block_matmuls"))
    r_all, ws_all = run()
    assert ws_all.count((48, 16)) == 2
    torch.testing.assert_close(r, r_all, rtol=1e-10, atol=1e-12)


@pytest.mark.slow  # ~30 s (two BERT compiles): in CI's slow step (test-slow-ci)
def test_recompute_rematerialises_layer_norm(monkeypatch):
    """Under ``recompute`` a LayerNorm output (a linear layer's input, the LayerNorm rule's ``y``) is recomputed
    from its input instead of held from the forward pass: a lower peak than the same policy without LayerNorm
    recomputation, and bit-identical relevance to ``keep``."""
    from dataclasses import replace

    from dynlrp_fx.rules import table

    torch.manual_seed(0)
    model = tiny_bert(num_hidden_layers=3)
    kwargs = {"input_ids": torch.randint(3, 128, (2, 12)), "attention_mask": torch.ones(2, 12, dtype=torch.long)}
    ln = aten.native_layer_norm.default

    def run(policy):
        return _policy_run(model, (), kwargs, policy, lambda n: n.target is ln)

    keep, rec = run("keep"), run("recompute")
    monkeypatch.setitem(table.OP_TABLE, ln, replace(table.OP_TABLE[ln], cheap=False))  # LayerNorm not cheap
    rec_no_ln = run("recompute")
    assert rec[0] > rec_no_ln[0] == keep[0]  # LayerNorms recomputed in the relevance half
    assert rec[1] < rec_no_ln[1]
    assert torch.equal(keep[2], rec[2]) and torch.equal(keep[2], rec_no_ln[2])


def test_value_numbers_see_through_reshape_chains():
    """``view(view(x, s1), s2)``, ``view(permute(x, identity), s2)`` and ``view(x, s2)`` are one value (the
    conservation ledger reaches a relevance tensor through two such chains; merging them lets CSE reuse its sum and
    frees the tensor earlier), while a real permute or another shape is not."""
    from dynlrp_fx.passes.values import value_numbers

    g = fx.Graph()
    x = g.placeholder("x")
    base = g.call_function(aten.mul.Tensor, (x, 2.0))
    direct = g.call_function(aten.view.default, (base, [12]))
    chained = g.call_function(aten.view.default, (g.call_function(aten.view.default, (base, [2, 6])), [12]))
    ident = g.call_function(aten.permute.default, (g.call_function(aten.view.default, (base, [3, 4])), [0, 1]))
    via_identity = g.call_function(aten.view.default, (ident, [12]))
    swapped = g.call_function(aten.permute.default, (g.call_function(aten.view.default, (base, [3, 4])), [1, 0]))
    via_swap = g.call_function(aten.reshape.default, (swapped, [12]))
    other = g.call_function(aten.view.default, (base, [4, 3]))
    g.output([direct, chained, via_identity, via_swap, other])
    gm = _with_vals(fx.GraphModule(nn.Module(), g), torch.randn(12))
    canon = value_numbers(gm)
    assert canon.get(chained) is direct and canon.get(via_identity) is direct
    assert via_swap not in canon and other not in canon
    out = gm(torch.arange(12.0))
    assert torch.equal(out[0], out[1]) and torch.equal(out[0], out[2]) and not torch.equal(out[0], out[3])


def _contiguous_clone(g: fx.Graph, x: fx.Node) -> fx.Node:
    return g.call_function(aten.clone.default, (x,), {"memory_format": torch.contiguous_format})


def test_reshape_of_a_contiguous_clone_reads_the_clone_operand():
    """``make_fx`` traces a reshape it cannot prove viewable as ``clone(x, contiguous)`` + ``_unsafe_view``:
    ``elide_reshape_copies`` lets the reshape read ``x`` (a view where the strides allow, one copy where not), and
    leaves a clone alone where another op reads it or a graph output could alias ``x`` through the reshape."""
    def build(g, x):
        t = g.call_function(aten.permute.default, (g.call_function(aten.reshape.default, (x, [4, 4, 4])), [1, 0, 2]))
        merged = g.call_function(aten._unsafe_view.default, (_contiguous_clone(g, t), [16, 4]))
        kept = _contiguous_clone(g, t)  # read by a sum too: stays
        summed = g.call_function(aten.sum.default, (g.call_function(aten.reshape.default, (kept, [64])),))
        out_alias = g.call_function(aten.reshape.default, (_contiguous_clone(g, t), [64]))  # returned: stays
        return (g.call_function(aten.mul.Tensor, (merged, 2.0)), g.call_function(aten.add.Tensor, (summed, kept)),
                out_alias)

    gm = _graph(build)
    x = torch.randn(64)
    want = gm(x)
    new, _ = run_pass("elide_reshape_copies", gm)
    assert _targets(new).count(aten.clone.default) == 2 and aten._unsafe_view.default not in _targets(new)
    got = new(x)
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    assert got[2].untyped_storage().data_ptr() != x.untyped_storage().data_ptr()


def test_attention_reshapes_and_recomputed_copies_read_their_operands(monkeypatch):
    """torchvision's ViT (``nn.MultiheadAttention``): the rules' head merges for ``bmm`` were traced as contiguous
    clones + views (a copy per call even where a view exists, and a second copy after a reshape that had copied
    already), and the recomputed q / k / v each copied the packed projection again (``.contiguous()`` in torch's
    packed in-projection) to select one third of it. After ``elide_reshape_copies`` no clone is read by reshapes
    alone and no recomputed clone by views alone; the relevance equals the program's without the pass (float64; the
    matmuls see other strides) and the peak does not rise."""
    import torchvision

    from dynlrp_fx.passes import PIPELINE
    from dynlrp_fx.passes.nodes import is_recomputed
    from dynlrp_fx.rules.table import returns_alias

    torch.manual_seed(0)
    vit = torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=16,
                                               mlp_dim=32, num_classes=5).eval().double()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)

    def clones(ex):
        out = []
        for n in ex.graph().graph.nodes:
            if n.target is aten.clone.default and n.kwargs.get("memory_format") is torch.contiguous_format:
                users = list(n.users)
                out.append((all(u.target in (aten.reshape.default, aten._unsafe_view.default) for u in users),
                            is_recomputed(n) and all(returns_alias(u.target) for u in users)))
        return out

    ex = dynlrp.compile(vit, (x,), rules="attnlrp", backend="eager", cache=False)
    with monkeypatch.context() as m:
        m.setattr(PIPELINE, "passes", tuple(p for p in PIPELINE.passes if p.name != "elide_reshape_copies"))
        before = dynlrp.compile(vit, (x,), rules="attnlrp", backend="eager", cache=False)
    assert not any(a or b for a, b in clones(ex))
    assert sum(a for a, _ in clones(before)) >= 4 and sum(b for _, b in clones(before)) >= 2, clones(before)
    args = call_args(ex, (x,), {})
    assert peak_live_bytes(ex.graph(), *args)[0] <= peak_live_bytes(before.graph(), *args)[0]
    got, want = ex(x, target=1), before(x, target=1)
    torch.testing.assert_close(got.relevance, want.relevance, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(got.conservation.absorbed, want.conservation.absorbed, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("dims", [1, 2, 3])
def test_patch_embedding_pullback_is_one_matrix_product(dims):
    """A convolution whose stride equals its kernel (>= 16 taps, no padding) has non-overlapping windows: its
    pullback is one ``mm`` and a permute instead of a transposed convolution (ViT-B/16: 1.9 ms against 11.8 ms).
    The input's edge that no window reaches gets zeros (18 = 4 * 4 + 2). LRP-0 stays gradient x input (float64)."""
    conv, kernel, size = {1: (nn.Conv1d, (16,), (36,)), 2: (nn.Conv2d, (4, 4), (18, 17)),
                          3: (nn.Conv3d, (2, 4, 4), (5, 9, 8))}[dims]
    torch.manual_seed(0)
    model = nn.Sequential(conv(3, 6, kernel, stride=kernel), nn.ReLU(), nn.Flatten(),
                          nn.LazyLinear(4)).double().eval()
    x = torch.randn(2, 3, *size, dtype=torch.float64)
    model(x)
    ex = dynlrp.compile(model, (x,), rules="lrp0", backend="eager", cache=False)
    convs = [n for n in ex.graph().graph.nodes if n.target is aten.convolution.default]
    assert len(convs) == 1 and convs[0].args[6] is False  # the forward's; no transposed convolution
    assert aten.convolution_backward.default not in _targets(ex.graph()) and aten.mm.default in _targets(ex.graph())
    t = torch.tensor([1, 3])
    torch.testing.assert_close(ex(x, target=t).relevance, grad_x_input(model, x, t), rtol=1e-10, atol=1e-12)
    # two taps per window: still a transposed convolution
    small = nn.Sequential(conv(3, 6, (2,) * dims, stride=(2,) * dims), nn.ReLU(), nn.Flatten(),
                          nn.LazyLinear(4)).double().eval()
    small(x)
    ex2 = dynlrp.compile(small, (x,), rules="lrp0", backend="eager", cache=False)
    assert any(n.target is aten.convolution.default and n.args[6] is True for n in ex2.graph().graph.nodes)


def test_sum_of_select_pullbacks_covering_a_dim_is_a_stack():
    """``nn.MultiheadAttention``'s packed projection gets its cotangent as the sum of its q / k / v selects' VJPs
    (zero fills, copies and adds over the packed size); where the indices cover the dim once that sum is one
    ``stack``, with the same values. Two of three indices are left alone."""
    def build(g, x, cover):
        parts = [g.call_function(aten.mul.Tensor, (g.call_function(aten.reshape.default, (x, [4, 16])), float(i)))
                 for i in range(3)]
        sb = [g.call_function(aten.select_backward.default, (p, [3, 4, 16], 0, i)) for i, p in enumerate(parts[:cover])]
        total = sb[0]
        for t in sb[1:]:
            total = g.call_function(aten.add.Tensor, (total, t))
        return (total,)

    x = torch.randn(64)
    for cover, stacked in ((3, True), (2, False)):
        gm = _graph(lambda g, x_, c=cover: build(g, x_, c))
        want = gm(x)
        new, _ = run_pass("stack_select_pullbacks", gm)
        new = run_pass("eliminate_dead_code", new)[0]
        assert (aten.stack.default in _targets(new)) is stacked
        assert (aten.select_backward.default in _targets(new)) is not stacked
        assert torch.equal(new(x)[0], want[0])


def test_vit_query_key_value_pullbacks_are_stacked(monkeypatch):
    """torchvision's ViT under ``attnlrp``: the query / key / value ``select_backward`` s become one ``stack`` per
    layer (the class token's select stays), and the relevance equals the program's without the pass (float64)."""
    import torchvision

    from dynlrp_fx.passes import PIPELINE

    torch.manual_seed(0)
    vit = torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=16,
                                               mlp_dim=32, num_classes=5).eval().double()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    ex = dynlrp.compile(vit, (x,), rules="attnlrp", backend="eager", cache=False)
    with monkeypatch.context() as m:
        m.setattr(PIPELINE, "passes", tuple(p for p in PIPELINE.passes if p.name != "stack_select_pullbacks"))
        before = dynlrp.compile(vit, (x,), rules="attnlrp", backend="eager", cache=False)
    assert _targets(ex.graph()).count(aten.select_backward.default) == 1
    assert _targets(ex.graph()).count(aten.stack.default) == len(vit.encoder.layers)
    assert _targets(before.graph()).count(aten.select_backward.default) == 3 * len(vit.encoder.layers) + 1
    torch.testing.assert_close(ex(x, target=1).relevance, before(x, target=1).relevance, rtol=0, atol=0)
