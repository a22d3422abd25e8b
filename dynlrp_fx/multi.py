"""Several targets per sample in one forward pass and one batched relevance sweep.

With the forward values fixed, every rule is linear in the relevance it receives, so the relevance half of a
program can carry ``K`` seeds per sample at once. :func:`split_program` cuts a lowered, functional program into

* a **forward** graph: the model's ops at batch ``B``, returning the explained outputs and every forward value the
  relevance half reads (the *cut*), and
* a **relevance** graph: the seed, the rules and the ledger, run at a relevance batch of ``B * k`` rows (sample
  ``b``'s target ``j`` is row ``b * k + j``) on those values.

Each batched forward value is widened to ``B * k`` rows right before its first use in the relevance graph (so a
widened copy lives only as long as the ops that read it); a size that scales with the batch (``s0``, ``s0*s1``,
``12*s0``) is multiplied by ``k``. Where the batch is merged with other dims (``(B*H, T, D)``, MHA's ``(T*B, E)``)
the dim is split as ``(outer, B, inner)`` (``outer`` from :func:`dynlrp_fx.passes.pair._batch_dim`), so every
layout the program uses stays consistent. Values the ``recompute`` memory policy rematerialises stay in the
relevance half (computed from widened inputs), which keeps that policy's memory savings, and so do cheap values
read only by the relevance half (a stabiliser ``|z| + eps``): recomputed per sweep, not kept across all sweeps.

A program the widening cannot serve (a model that specialised its batch size, a value that mixes samples, a
relevance output summed over the batch such as ``params=``, absorbed relevance with no sample) runs its relevance
graph once per target instead: still one forward pass. :class:`SplitProgram` says which (``batched``, ``why``).
"""

from __future__ import annotations

import operator
import os
from dataclasses import dataclass, field
from typing import Any

import sympy
import torch
import torch.fx as fx

from .passes.nodes import is_cheap, is_recomputed
from .passes.pair import ProgramOutputs, _batch_dim

__all__ = ["SplitProgram", "split_program", "expand_batch", "sweep_size", "DEFAULT_SWEEP_BYTES"]

#: default bound on the bytes one sweep's widened forward values may take (``DYNLRP_SWEEP_BYTES`` overrides it)
DEFAULT_SWEEP_BYTES = 2 << 30


def expand_batch(x: torch.Tensor, batch: int, k: int, dim: int, outer: int) -> torch.Tensor:
    """``x`` with every sample repeated ``k`` times along its batch position (sample ``b`` becomes rows ``b*k ..
    b*k+k-1``): dim ``dim`` is split as ``(outer, batch, inner)`` and ``k`` inserted after ``batch``. The copy has
    ``x``'s dimension order in memory, so the ops after it see the layout they were traced with."""
    if k == 1:
        return x
    n = x.shape[dim]
    inner = n // (outer * batch)
    shape = list(x.shape)
    wide = x.unflatten(dim, (outer, batch, inner)).unsqueeze(dim + 2)
    wide = wide.expand(*shape[:dim], outer, batch, k, inner, *shape[dim + 1 :]).flatten(dim, dim + 3)
    shape[dim] = n * k
    # allocate in x's stride order (outermost first), then view it in logical order
    order = sorted(range(x.ndim), key=lambda i: (-x.stride(i), i))
    out = torch.empty([shape[i] for i in order], dtype=x.dtype, device=x.device)
    out = out.permute([order.index(i) for i in range(x.ndim)])
    return out.copy_(wide)


@dataclass
class _Cut:
    """One value the relevance graph reads from the forward half: a placeholder of the program (``source`` its
    index among the program's inputs) or a forward result (``source`` its index among the forward graph's extra
    outputs); ``how``: ``"same"`` (passed as is), ``"batch"`` (widened at ``dim``/``outer``) or ``"scale"`` (a size
    multiplied by ``k``)."""

    node: str
    placeholder: bool
    source: int
    how: str
    dim: int = 0
    outer: int = 1


@dataclass
class SplitProgram:
    """A program cut into a forward graph and a relevance graph (see the module doc).

    ``forward(*state, *inputs)`` returns ``(*explained outputs, *cut values)``; ``relevance(k, batch, *cut inputs,
    extra, *condition masks)`` returns ``(seed_total, absorbed, *input/param/captured/conditioned relevance)`` for
    ``batch * k`` rows (the extra and the masks have ``batch * k`` rows).
    ``batched`` is false when the relevance graph only runs at ``k == 1`` (``why`` says why)."""

    forward_graph: fx.GraphModule
    relevance_graph: fx.GraphModule
    cuts: list[_Cut]
    n_outputs: int
    outputs: ProgramOutputs
    batched: bool
    why: str = ""
    #: per cut: ``(first, last)`` positions in the relevance graph where its widened copy is alive (``None``: not
    #: widened)
    lifetimes: list[tuple[int, int] | None] = field(default_factory=list)
    forward: Any = None  #: what runs the forward graph (the graph, or its compiled form)
    relevance: Any = None  #: what runs the relevance graph

    def cut_inputs(self, program_inputs: list, forward_values: list) -> list:
        """The relevance graph's cut inputs from the program's inputs and the forward graph's extra outputs."""
        return [program_inputs[c.source] if c.placeholder else forward_values[c.source] for c in self.cuts]

    def widened_bytes(self, cut_values: list, batch: int) -> int:
        """Bytes one more target adds to a sweep's widened forward values at their peak: a widened copy lives
        from its first to its last use in the relevance graph, so this is the largest sum of one sample's share
        of the copies alive at one point."""
        events: list[tuple[int, int]] = []
        for c, v, life in zip(self.cuts, cut_values, self.lifetimes or [None] * len(self.cuts)):
            if c.how == "batch" and isinstance(v, torch.Tensor):
                size = v.numel() * v.element_size() // max(batch, 1)
                first, last = life if life is not None else (0, 1 << 62)
                events += [(first, size), (last + 1, -size)]
        peak = live = 0
        for _, delta in sorted(events):
            live += delta
            peak = max(peak, live)
        return peak


#: relevance rows per sweep on a CPU by default: wider sweeps measured slower there (ResNet-50 at 224, batch 2, 8
#: targets: 2.44 s with one target per sweep, 2.74 s with 3, 3.55 s with 8; GPT-2 at 128 tokens: 5.71 s, 6.17 s with
#: 2, 6.64 s with 8), since two cores are already busy at batch 2 and wider tensors leave the caches
CPU_SWEEP_ROWS = 2


def sweep_size(split: SplitProgram, cut_values: list, batch: int, k: int, sweep_batch: int | None,
               device: Any = None) -> int:
    """Targets per sweep: all ``k`` when the relevance batch ``batch * k`` is at most ``sweep_batch`` rows. With
    ``sweep_batch=None``: on a CPU, :data:`CPU_SWEEP_ROWS` rows (one target per sweep from batch 2 on); elsewhere
    as many targets as keep four times the peak of the widened forward values (for the relevance tensors and
    temporaries beside them) under ``DYNLRP_SWEEP_BYTES`` (default 2 GiB). At least 1."""
    if not split.batched:
        return 1
    if sweep_batch is not None:
        return max(1, min(k, int(sweep_batch) // max(batch, 1)))
    if device is None or torch.device(device).type == "cpu":
        return max(1, min(k, CPU_SWEEP_ROWS // max(batch, 1)))
    budget = int(os.environ.get("DYNLRP_SWEEP_BYTES", DEFAULT_SWEEP_BYTES))
    per_target = 4 * split.widened_bytes(cut_values, batch) * max(batch, 1)
    return max(1, min(k, budget // max(per_target, 1)))


def _expr_of(node: fx.Node) -> Any:
    """The size expression of a symbolic int node (``sym_size`` nodes without a recorded value are read from
    their tensor's fake value)."""
    v = node.meta.get("val")
    if isinstance(v, torch.SymInt):
        return v.node.expr
    if isinstance(v, int):
        return sympy.Integer(v)
    if node.target is torch.ops.aten.sym_size.int and isinstance(node.args[0], fx.Node):
        t = node.args[0].meta.get("val")
        if isinstance(t, torch.Tensor):
            s = t.shape[node.args[1]]
            return s.node.expr if isinstance(s, torch.SymInt) else sympy.Integer(int(s))
    return None


def _cut_plan(node: fx.Node, bsym: Any) -> tuple[str, int, int] | str:
    """``(how, dim, outer)`` for a cut value, or a string saying why it cannot be widened."""
    v = node.meta.get("val")
    if isinstance(v, torch.Tensor):
        dims = [d for d, s in enumerate(v.shape) if isinstance(s, torch.SymInt) and bsym in s.node.expr.free_symbols]
        if not dims:
            return ("same", 0, 1)
        where = _batch_dim(v, bsym, node) if len(dims) == 1 else None
        if where is None:
            return f"{node.name} ({node.target}, shape {tuple(v.shape)}) has no single batch position"
        return ("batch", *where)
    if isinstance(v, (torch.SymFloat, torch.SymBool)):
        return f"{node.name} is a symbolic {type(v).__name__}"
    if isinstance(v, (tuple, list)):
        return f"{node.name} ({node.target}) is a tuple"
    expr = _expr_of(node) if (isinstance(v, torch.SymInt) or v is None) else None
    if expr is None:
        return ("same", 0, 1) if v is not None or node.op == "get_attr" else f"{node.name} has no recorded value"
    if bsym not in expr.free_symbols:
        return ("same", 0, 1)
    if bsym in sympy.simplify(expr / bsym).free_symbols:
        return f"size {node.name} = {expr} is not a multiple of the batch"
    return ("scale", 0, 1)


def split_program(gm: fx.GraphModule, outputs: ProgramOutputs, n_inputs_before_extra: int,
                  batch_symbol: Any) -> SplitProgram:
    """Cut the functional program ``gm`` (placeholders: the program's inputs, the target/seed last) into a forward
    and a relevance graph (see the module doc). ``batch_symbol``: the sympy symbol of the batch (``None`` or an
    int when the program is static in it: the relevance graph then runs one target at a time)."""
    g = gm.graph
    nodes = list(g.nodes)
    phs = [n for n in nodes if n.op == "placeholder"]
    if len(phs) <= n_inputs_before_extra:
        raise ValueError(f"program has {len(phs)} placeholders, expected {n_inputs_before_extra} inputs + the extra")
    # the target/seed and any condition= masks: per relevance row, inputs of the relevance half
    row_inputs = phs[n_inputs_before_extra:]
    out_node = nodes[-1]
    results = list(out_node.args[0])
    n_out = max(1, len(outputs.output_names))
    model_outs, rel_outs = results[:n_out], results[n_out:]

    # the relevance half: what depends on the target/seed, plus rematerialised forward values
    dep: set[fx.Node] = set(row_inputs)
    for n in nodes:
        if n.op == "call_function" and any(a in dep for a in n.all_input_nodes):
            dep.add(n)
    fwd: set[fx.Node] = set()
    stack = [n for n in nodes if n.op != "output" and n not in dep and (
        n.op == "placeholder" or not is_recomputed(n))]
    stack += [r for r in model_outs if isinstance(r, fx.Node)]
    while stack:  # the forward half is closed under inputs
        n = stack.pop()
        if n in fwd:
            continue
        if n in dep:
            raise ValueError(f"explained output depends on the target/seed through {n.name}")
        fwd.add(n)
        stack.extend(n.all_input_nodes)
    # cheap values that do not depend on the target but are read only by the relevance half (the epsilon rule's
    # |z| + eps, a residual add's sign(z)) are recomputed there in every sweep rather than cut: a cut value stays
    # alive across all sweeps, and keeping one more activation-sized tensor per layer for the whole call costs
    # more than its two passes (on a CPU the larger live set turns allocations into page faults: ResNet-50's
    # transposed convolutions and divisions ran 3-5x slower per call, and two targets cost 2.5 single calls)
    model_set = {r for r in model_outs if isinstance(r, fx.Node)}
    rel_side = {n for n in nodes if n.op == "call_function" and n not in fwd}
    for n in reversed(nodes):
        # (not an output of a multi-output op: the op's tuple would become the cut; a LayerNorm's rstd is cut)
        if (n in fwd and n.op == "call_function" and n not in model_set and n.users and is_cheap(n)
                and n.target is not operator.getitem and all(u in rel_side for u in n.users)):
            fwd.discard(n)
            rel_side.add(n)
    rel = [n for n in nodes if n in rel_side]

    # values the relevance half reads from the forward half, in order of first use
    cut_nodes: list[fx.Node] = []
    seen: set[fx.Node] = set()
    for n in [*rel, out_node]:
        args = n.all_input_nodes if n is not out_node else [r for r in rel_outs if isinstance(r, fx.Node)]
        for a in args:
            if a in fwd and a not in seen and a not in dep and a.op != "get_attr":
                seen.add(a)
                cut_nodes.append(a)

    why = ""
    if batch_symbol is None or not hasattr(batch_symbol, "free_symbols"):
        why = "the program is static in its batch size"
    elif outputs.unattributed:
        why = f"absorbed relevance of {outputs.unattributed[:3]} has no sample"
    else:
        for r in rel_outs:
            v = r.meta.get("val") if isinstance(r, fx.Node) else None
            if isinstance(v, torch.Tensor) and not any(
                    isinstance(s, torch.SymInt) and batch_symbol in s.node.expr.free_symbols for s in v.shape):
                why = f"relevance output {r.name} has no batch dimension (e.g. params= sums over the batch)"
                break
    plans: dict[fx.Node, tuple] = {}
    for c in cut_nodes:
        p = ("same", 0, 1) if why else _cut_plan(c, batch_symbol)
        if isinstance(p, str):
            why = p
            break
        plans[c] = p
    batched = not why

    # the forward graph: the program without the relevance half, returning the cut values after the outputs
    fg = fx.Graph()
    fenv: dict[fx.Node, fx.Node] = {}
    for n in nodes:
        if n in fwd or (n.op == "placeholder" and n not in dep):
            fenv[n] = fg.node_copy(n, fenv.__getitem__)
    forward_cuts = [c for c in cut_nodes if c.op != "placeholder"]
    fg.output(tuple([fenv[r] if isinstance(r, fx.Node) else r for r in model_outs] + [fenv[c] for c in forward_cuts]))

    # the relevance graph: (k, batch, *cut values, extra) -> relevance outputs, widening at first use
    rg = fx.Graph()
    k_ph = rg.placeholder("dynlrp_k")
    b_ph = rg.placeholder("dynlrp_batch")
    cut_ph = {c: rg.placeholder(f"cut_{c.name}") for c in cut_nodes}
    for c in cut_nodes:
        cut_ph[c].meta = dict(c.meta)
    renv: dict[fx.Node, fx.Node] = {}
    for p in row_inputs:
        renv[p] = rg.placeholder(p.name)
        renv[p].meta = dict(p.meta)

    def use(a: fx.Node) -> fx.Node:
        if a in renv:
            return renv[a]
        if a.op == "get_attr":  # constants are read by both graphs
            renv[a] = rg.node_copy(a)
            return renv[a]
        how, dim, outer = plans.get(a, ("same", 0, 1))
        ph = cut_ph[a]
        if how == "batch":
            w = rg.call_function(expand_batch, (ph, b_ph, k_ph, dim, outer))
            w.meta = dict(a.meta)
        elif how == "scale":
            w = rg.call_function(operator.mul, (ph, k_ph))
        else:
            w = ph
        renv[a] = w
        return w

    for n in rel:
        for a in n.all_input_nodes:
            use(a)
        renv[n] = rg.node_copy(n, use)
    rg.output(tuple(use(r) if isinstance(r, fx.Node) else r for r in rel_outs))

    index = {p: i for i, p in enumerate(phs[:n_inputs_before_extra])}
    fidx = {c: i for i, c in enumerate(forward_cuts)}
    cuts = [_Cut(c.name, c.op == "placeholder", index[c] if c.op == "placeholder" else fidx[c], *plans.get(c, ("same", 0, 1)))
            for c in cut_nodes]
    order = {n: i for i, n in enumerate(rg.nodes)}
    lifetimes = []
    for c in cut_nodes:
        w = renv.get(c)
        if w is None or w.op == "placeholder" or not w.users:
            lifetimes.append(None)
        else:
            lifetimes.append((order[w], max(order[u] for u in w.users)))
    fgm = fx.GraphModule(gm, fg)
    rgm = fx.GraphModule(gm, rg)
    return SplitProgram(fgm, rgm, cuts, n_out, outputs, batched, why, lifetimes)
