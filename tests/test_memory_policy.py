"""The promise-resolution memory policy: ``recompute`` lowers peak memory and leaves every result unchanged."""

from __future__ import annotations

import operator

import pytest
import torch
from torch import nn

import dynlrp_fx as dynlrp
from dynlrp_fx.passes.memory import peak_live_bytes
from dynlrp_fx.passes.nodes import RECOMPUTED_FROM, is_recomputed
from dynlrp_fx.passes.resolve_promises import POLICIES
from tests.helpers import call_args, run_pass, tiny_bert


def _cnn() -> nn.Module:
    layers: list[nn.Module] = []
    c = 3
    for o in (16, 16, "M", 32, 32, "M"):
        if o == "M":
            layers.append(nn.MaxPool2d(2))
        else:
            layers += [nn.Conv2d(c, o, 3, padding=1), nn.ReLU()]
            c = o
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(32 * 8 * 8, 10)).eval()


def _bert():

    model = tiny_bert(sdpa=True, intermediate_size=128)
    ids = torch.randint(3, 128, (2, 12))
    return model, (), {"input_ids": ids, "attention_mask": torch.ones(2, 12, dtype=torch.long)}


def _peak(ex, args, kwargs):
    return peak_live_bytes(ex.graph(), *call_args(ex, args, kwargs))


@pytest.mark.parametrize("which", ["cnn", "bert"])
def test_recompute_lowers_peak_memory_and_keeps_results(which):
    """Measured (eager execution of the lowered graph): CNN 2.03 -> 1.84 MB, 2-layer BERT -12%."""
    if which == "cnn":
        model, args, kwargs = _cnn(), (torch.randn(4, 3, 32, 32),), {}
    else:
        model, args, kwargs = _bert()
    res = {}
    for policy in POLICIES:
        ex = dynlrp.compile(model, args, example_kwargs=kwargs, backend="eager", promise_policy=policy)
        res[policy] = (_peak(ex, args, kwargs), ex(*args, **kwargs), ex.graph())
    (keep_peak, keep_out), keep_expl, keep_g = res["keep"]
    (rec_peak, rec_out), rec_expl, rec_g = res["recompute"]
    assert len(rec_g.graph.nodes) > len(keep_g.graph.nodes)  # recomputations were added ...
    assert rec_peak < 0.95 * keep_peak, (keep_peak, rec_peak)  # ... and they lower the peak
    for a, b in zip(keep_out, rec_out):  # same ops on the same values: bit-identical
        assert torch.equal(a, b)
    for name in keep_expl.inputs:
        assert torch.equal(keep_expl.inputs[name], rec_expl.inputs[name])
    assert torch.equal(keep_expl.absorbed, rec_expl.absorbed)


def test_peak_live_bytes_counts_live_tensors():
    """A chain a -> b -> c of 4 KiB tensors has at most two alive at once (input excluded)."""
    g = torch.fx.Graph()
    x = g.placeholder("x")
    a = g.call_function(torch.ops.aten.mul.Tensor, (x, 2.0))
    b = g.call_function(torch.ops.aten.add.Tensor, (a, 1.0))
    c = g.call_function(torch.ops.aten.neg.default, (b,))
    g.output((c,))
    gm = torch.fx.GraphModule(torch.nn.Module(), g)
    x_val = torch.zeros(1024)
    peak, (out,) = peak_live_bytes(gm, x_val)
    assert peak == 2 * 4096
    assert torch.equal(out, -(x_val * 2 + 1))


def test_unknown_policy_is_rejected():
    gm = torch.fx.GraphModule(torch.nn.Module(), torch.fx.Graph())
    with pytest.raises(ValueError, match="unknown promise policy 'minimal'"):
        run_pass("resolve_promises", gm, promise_policy="minimal")


class _ConvBN(nn.Module):
    """conv -> BN -> ReLU twice; ``skip``: the second convolution's output is also added after its ReLU, so it is
    read by more than its batch norm."""

    def __init__(self, skip: bool):
        super().__init__()
        self.skip = skip
        self.c1, self.b1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.c2, self.b2 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        h = torch.relu(self.b1(self.c1(x)))
        z = self.c2(h)
        h = torch.relu(self.b2(z))
        if self.skip:
            h = h + z
        return self.fc(h.mean((2, 3)))


@pytest.mark.parametrize("skip", [False, True], ids=["bn_input_read_once", "bn_input_read_twice"])
def test_batch_norm_output_held_or_recomputed_once(skip):
    """Under ``epsilon`` a batch norm's output is read by its own rule (the op's tuple: ``|y|`` of the stabiliser)
    and by the ReLU's after it. Where the batch norm's input serves nothing else once the pullback is a per-channel
    scale, the output is held instead of the input (``hold_outputs_not_inputs``, the same bytes): the program runs
    each batch norm once, in the forward pass (twice before). Where the input is read elsewhere (``skip``: the
    second convolution's output is added to the ReLU's), the first batch norm's output is still held and the second's
    is recomputed: inside the recomputation of the sum (a private copy) and once for both its own rule and the
    ReLU's (not a copy each). Relevance as with ``keep``."""
    torch.manual_seed(0)
    model = _ConvBN(skip).eval().double()
    for bn in (model.b1, model.b2):
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    ex = dynlrp.compile(model, (x,), rules="epsilon", backend="eager")
    norms = [n for n in ex.graph("target").graph.nodes if n.op == "call_function" and "batch_norm" in str(n.target)]
    assert len(norms) == (4 if skip else 2), [n.name for n in norms]
    kept = dynlrp.compile(model, (x,), rules="epsilon", backend="eager", promise_policy="keep")
    torch.testing.assert_close(ex(x, target=1).relevance, kept(x, target=1).relevance, rtol=1e-12, atol=1e-14)


def test_strided_max_pool_indices_come_from_the_forward_pass(monkeypatch):
    """The max-pool rule's VJP re-runs the pool for its indices, on the recomputed activation. A strided pool's
    result (output and int64 indices: 3/4 of the input's bytes at 3x3, stride 2) is smaller than that activation,
    so the forward pool's indices are read instead: one pool per explanation, as autograd (two when CSE may not
    merge it), the indices held as int32 (half the bytes of autograd's int64). Relevance as with ``keep``."""
    from dynlrp_fx.passes import eliminate_common_subexpressions as cse

    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(3, 2, 1),
        nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4),
    ).eval().double()
    x = torch.randn(2, 3, 12, 12, dtype=torch.float64)

    def pools(ex):
        return sum("max_pool2d_with_indices.default" in str(n.target) for n in ex.graph("target").graph.nodes)

    ex = dynlrp.compile(model, (x,), rules="lrp0", backend="eager")
    assert pools(ex) == 1
    narrow = [n for n in ex.graph("target").graph.nodes
              if "_to_copy" in str(n.target) and n.kwargs.get("dtype") == torch.int32]
    assert len(narrow) == 1 and "max_pool2d_with_indices" in str(narrow[0].args[0].args[0].target)
    kept = dynlrp.compile(model, (x,), rules="lrp0", backend="eager", promise_policy="keep")
    torch.testing.assert_close(ex(x, target=1).relevance, kept(x, target=1).relevance, rtol=1e-12, atol=1e-14)
    monkeypatch.setattr(cse, "_smaller_than_operands", lambda node: False)
    assert pools(dynlrp.compile(model, (x,), rules="lrp0", backend="eager", cache=False)) == 2


class _PreLN(nn.Module):
    """A pre-LN residual stack (GPT-2 / ViT / Llama style): ``x = x + attn(ln1(x)); x = x + mlp(ln2(x))``, with
    the attention replaced by a linear map (the residual stream is what this test is about)."""

    def __init__(self, d: int = 8, layers: int = 6):
        super().__init__()
        self.embed = nn.Linear(5, d)
        self.blocks = nn.ModuleList(
            nn.ModuleDict({"ln1": nn.LayerNorm(d), "mix": nn.Linear(d, d), "ln2": nn.LayerNorm(d),
                           "fc1": nn.Linear(d, 4 * d), "fc2": nn.Linear(4 * d, d)}) for _ in range(layers))
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, 3)

    def forward(self, x):
        x = self.embed(x)
        for b in self.blocks:
            x = x + b["mix"](b["ln1"](x))
            x = x + b["fc2"](torch.nn.functional.gelu(b["fc1"](b["ln2"](x))))
        return self.head(self.ln(x)).mean(1)


def test_residual_stream_is_stepped_back_not_recomputed(monkeypatch):
    """Under ``epsilon`` every layer's rules read the residual stream ``x_l`` (the residual add's stabiliser, the
    LayerNorm's input). ``recompute`` rebuilds ``x_{l-1}`` as a chain of adds from a held checkpoint, every layer;
    ``step_back_residual_streams`` reads it back as ``x_l - b_l`` from the ``x_l`` the relevance half has just
    read: recomputed adds fall from quadratic in the depth to a few, the peak does not rise, and the relevance
    equals ``keep``'s (the forward values themselves) and the program's without the pass to float64 rounding."""
    from dynlrp_fx.passes import PIPELINE

    torch.manual_seed(0)
    model = _PreLN().double().eval()
    x = torch.randn(2, 7, 5, dtype=torch.float64)

    def recomputed_adds(ex):
        return sum(1 for n in ex.graph().graph.nodes
                   if n.target is torch.ops.aten.add.Tensor and is_recomputed(n))

    def steps(ex):
        return sum(1 for n in ex.graph().graph.nodes if "dynlrp_stepped_back_from" in n.meta)

    ex = dynlrp.compile(model, (x,), rules="epsilon", backend="eager", cache=False)
    keep = dynlrp.compile(model, (x,), rules="epsilon", backend="eager", cache=False, promise_policy="keep")
    with monkeypatch.context() as m:
        m.setattr(PIPELINE, "passes", tuple(p for p in PIPELINE.passes if p.name != "step_back_residual_streams"))
        chains = dynlrp.compile(model, (x,), rules="epsilon", backend="eager", cache=False)
    assert steps(ex) >= 2 * len(model.blocks) - 2 and steps(chains) == 0
    assert recomputed_adds(chains) > 40 and recomputed_adds(ex) * 4 < recomputed_adds(chains), (
        recomputed_adds(ex), recomputed_adds(chains))
    assert _peak(ex, (x,), {})[0] <= _peak(chains, (x,), {})[0]
    got = ex(x, target=1)
    for other in (keep, chains):
        want = other(x, target=1)
        torch.testing.assert_close(got.relevance, want.relevance, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(got.conservation.absorbed, want.conservation.absorbed, rtol=1e-9, atol=1e-12)
    assert float(got.conservation.error.max()) < 1e-9


@pytest.mark.parametrize("rules", ["lrp0", "epsilon"])
def test_relu_pullbacks_read_their_mask_from_the_relu_input(monkeypatch, rules):
    """A ReLU's rule is its own VJP, ``threshold_backward(g, relu(z), 0)``, and ``relu(z)`` was recomputed from the
    held ``z`` for that mask alone (ResNet-18: 17 per explanation). ``mask_relu_pullbacks`` reads the mask from
    ``z`` (``relu(z) > 0`` exactly where ``z > 0``): no ``threshold_backward`` reads a ReLU made only for it, the
    peak does not rise, and the relevance equals ``keep``'s and gradient x input (LRP-0) bit for bit in float64."""
    import torchvision

    from dynlrp_fx.passes import PIPELINE
    from tests.helpers import grad_x_input

    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=7).eval().double()
    for bn in (m for m in model.modules() if isinstance(m, nn.BatchNorm2d)):
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)

    def relus(ex):
        return [n for n in ex.graph().graph.nodes if n.target is torch.ops.aten.relu.default]

    ex = dynlrp.compile(model, (x,), rules=rules, backend="eager", cache=False)
    with monkeypatch.context() as m:
        m.setattr(PIPELINE, "passes", tuple(p for p in PIPELINE.passes if p.name != "mask_relu_pullbacks"))
        before = dynlrp.compile(model, (x,), rules=rules, backend="eager", cache=False)
    masks = [n for n in ex.graph().graph.nodes if n.target is torch.ops.aten.threshold_backward.default]
    assert masks and not any(n.args[1].target is torch.ops.aten.relu.default and len(n.args[1].users) == 1
                             for n in masks)
    assert len(relus(ex)) == len(relus(before)) - 17, (len(relus(ex)), len(relus(before)))
    assert _peak(ex, (x,), {})[0] <= _peak(before, (x,), {})[0]
    keep = dynlrp.compile(model, (x,), rules=rules, backend="eager", cache=False, promise_policy="keep")
    got = ex(x, target=3).relevance
    torch.testing.assert_close(got, keep(x, target=3).relevance, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(got, before(x, target=3).relevance, rtol=0, atol=0)
    if rules == "lrp0":
        torch.testing.assert_close(got, grad_x_input(model, x, 3), rtol=1e-10, atol=1e-13)


def test_recomputed_value_is_shared_while_a_view_of_it_is_alive(monkeypatch):
    """``nn.MultiheadAttention`` splits q, k and v out of one packed projection (``.contiguous()`` then ``select``),
    and ``recompute`` rebuilt the packed projection (bias add and copy) once per operand the rules read: three
    projection-sized copies, each kept alive whole by the third it was made for (ViT-B/16 ``epsilon``: peak 79.8
    -> 76.3 MiB). ``step_back_residual_streams`` reuses a copy made before when its storage is still read later
    through a view, so one copy serves q, k and v: fewer recomputed ops, a lower peak, the same relevance as
    ``keep`` (float64)."""
    import torchvision

    from dynlrp_fx.passes import resolve_promises as rp

    torch.manual_seed(0)
    vit = torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=16,
                                               mlp_dim=32, num_classes=5).eval().double()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)

    def recomputed(ex):
        return sum(1 for n in ex.graph().graph.nodes if is_recomputed(n) and n.target is not operator.getitem)

    def unpacked(ex):  # recomputed (3, L, B, E) views of the packed projection: one chain per copy
        return sum(1 for n in ex.graph().graph.nodes if is_recomputed(n) and n.target is torch.ops.aten.squeeze.dims)

    ex = dynlrp.compile(vit, (x,), rules="epsilon", backend="eager", cache=False)
    keep = dynlrp.compile(vit, (x,), rules="epsilon", backend="eager", cache=False, promise_policy="keep")
    with monkeypatch.context() as m:  # reuse only where the copy itself is read later, not a view of it
        m.setattr(rp, "_read_after", lambda n, pos, order: any(order[u] >= pos for u in n.users))
        unshared = dynlrp.compile(vit, (x,), rules="epsilon", backend="eager", cache=False)
    assert recomputed(ex) < recomputed(unshared), (recomputed(ex), recomputed(unshared))
    layers = len(vit.encoder.layers)
    assert unpacked(ex) == layers and unpacked(unshared) == 3 * layers, (unpacked(ex), unpacked(unshared))
    assert _peak(ex, (x,), {})[0] <= _peak(unshared, (x,), {})[0]
    got, want = ex(x, target=1), keep(x, target=1)
    torch.testing.assert_close(got.relevance, want.relevance, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(got.conservation.absorbed, want.conservation.absorbed, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("rules", ["attnlrp", "epsilon"])
def test_activation_ratio_is_held_instead_of_its_input(monkeypatch, rules):
    """The identity rule on GELU hands on ``G * gelu(x) / x``; ``recompute`` held ``x`` (the first FFN projection's
    output) and re-ran GELU on it in the relevance half. ``hold_activation_ratios`` computes the ratio in the
    forward pass from the forward's own GELU output and holds it instead of ``x``: GELU runs once per layer (the
    forward's), the peak does not rise, and the relevance equals the program's without the pass bit for bit and
    ``keep``'s (float64). Under ``epsilon`` the projection's stabiliser reads ``x`` too, so holding the ratio would
    hold both: nothing is rewritten."""
    from dynlrp_fx.passes import PIPELINE

    torch.manual_seed(0)
    model, args, kwargs = _bert()
    model = model.double()

    def gelus(ex):
        return sum(1 for n in ex.graph().graph.nodes if n.target is torch.ops.aten.gelu.default)

    ex = dynlrp.compile(model, args, example_kwargs=kwargs, rules=rules, backend="eager", cache=False)
    keep = dynlrp.compile(model, args, example_kwargs=kwargs, rules=rules, backend="eager", cache=False,
                          promise_policy="keep")
    with monkeypatch.context() as m:
        m.setattr(PIPELINE, "passes", tuple(p for p in PIPELINE.passes if p.name != "hold_activation_ratios"))
        before = dynlrp.compile(model, args, example_kwargs=kwargs, rules=rules, backend="eager", cache=False)
    layers = model.config.num_hidden_layers
    assert gelus(ex) == (layers if rules == "attnlrp" else 2 * layers) and gelus(before) == 2 * layers, (
        gelus(ex), gelus(before))
    assert _peak(ex, args, kwargs)[0] <= _peak(before, args, kwargs)[0]
    got = ex(**kwargs, target=1)
    want = before(**kwargs, target=1)
    assert torch.equal(got.relevance, want.relevance) and torch.equal(got.conservation.absorbed,
                                                                       want.conservation.absorbed)
    torch.testing.assert_close(got.relevance, keep(**kwargs, target=1).relevance, rtol=1e-9, atol=1e-12)


def test_embedding_lookups_are_recomputed_not_held(monkeypatch):
    """An ``embedding`` (or ``gather``) reads as many table rows as it returns, so ``recompute`` may redo it from
    the ids at the end of the sweep instead of holding it through the whole program (BERT-base's three lookups:
    0.38 MiB each per sample; its ``epsilon`` peak 1.029x -> 1.006x of gradient x input). ``_small`` once judged
    the word embedding "small next to its input", the (vocab, hidden) table, and held it: here the table is 32x the
    lookup. Every lookup of the program is recomputed from the ids, the peak is below the program that holds them,
    and the relevance is ``keep``'s."""
    import dataclasses

    from dynlrp_fx.rules import table

    torch.manual_seed(0)
    model = tiny_bert(sdpa=True, vocab_size=1024).double()
    kwargs = {"input_ids": torch.randint(3, 1024, (2, 12)), "attention_mask": torch.ones(2, 12, dtype=torch.long)}
    lookups = (torch.ops.aten.embedding.default, torch.ops.aten.gather.default)

    def compile_(**kw):
        return dynlrp.compile(model, (), example_kwargs=kwargs, rules="epsilon", backend="eager", cache=False, **kw)

    ex, keep = compile_(), compile_(promise_policy="keep")
    with monkeypatch.context() as m:
        for op in lookups:
            m.setitem(table.OP_TABLE, op, dataclasses.replace(table.OP_TABLE[op], cheap=False))
        held = compile_()
    nodes = list(ex.graph().graph.nodes)
    forward = [n for n in nodes if n.target is torch.ops.aten.embedding.default and not is_recomputed(n)]
    copies = {n.meta[RECOMPUTED_FROM] for n in nodes if n.target is torch.ops.aten.embedding.default
              and is_recomputed(n)}
    assert len(forward) == 3 and copies == {n.name for n in forward}, (forward, copies)
    assert _peak(ex, (), kwargs)[0] < _peak(held, (), kwargs)[0]
    got, want = ex(**kwargs, target=1), keep(**kwargs, target=1)
    torch.testing.assert_close(got.relevance, want.relevance, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(got.conservation.absorbed, want.conservation.absorbed, rtol=1e-9, atol=1e-12)
