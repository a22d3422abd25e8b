"""Programs: an explainer's private analysed graph, and the forward+relevance programs built from it.

:class:`Analysis` copies a traced graph (so that explainers sharing one trace never see each other's rewrites or
rules), runs the pipeline's ``analysis`` stage on the copy and resolves ``params=`` / ``capture=`` against it.
:meth:`Analysis.lowered` runs the ``synthesis`` stage for a seed mode and memory policy (cached: explainers made
by ``recompile`` from one explainer share its analysis and its lowered graphs). :func:`build_program` runs the
``backend`` stage and compiles the result for a backend into a :class:`Program`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx

from . import cache
from .errors import DynlrpInputError
from .passes import PIPELINE, CompileContext, PipelineReport
from .passes.nodes import FLOAT
from .passes.pair import ProgramOutputs
from .progress import stage as progress_stage
from .trace import TracedProgram, _OutputWrapper

__all__ = ["Analysis", "Program", "build_program", "compiled", "copy_graph_module", "module_output_node"]


def copy_graph_module(gm: fx.GraphModule) -> fx.GraphModule:
    """A copy of ``gm`` with its own graph and nodes (node metadata copied one level deep, so a pass may set or
    replace ``node.meta`` entries without touching ``gm``); submodules and attributes are shared.

    Nodes keep their names: the trace refers to placeholders by name, and ``torch.export`` may name one after a
    Python builtin (``input``), which an fx namespace would rename; the namespace never hands out such a name, so
    nodes added later cannot collide with it."""
    g = fx.Graph()
    out = g.graph_copy(gm.graph, {})
    g.output(out)
    for old, new in zip(gm.graph.nodes, g.nodes):
        new.meta = dict(old.meta)
        new.name = old.name
    return fx.GraphModule(gm, g)


@dataclass
class Program:
    """One runnable forward+relevance program (one seed mode) of an explainer.

    ``graph`` is the lowered, functional ATen graph (what exports and ``torch.compile`` consume); ``fn`` is what
    runs (the compiled graph, or for the eager backend its buffer-reusing copy); ``outputs`` names its outputs.
    A program read from the compile cache (``from_cache``) has only its runnable form; its functional graph is
    lowered by ``make_graph`` (which traces the model) the first time ``graph`` is read.
    """

    mode: str
    _graph: fx.GraphModule | None
    fn: Any
    outputs: ProgramOutputs
    compile_seconds: float = 0.0
    calls: int = 0
    from_cache: bool = False  #: read from the persistent compile cache (:mod:`dynlrp_fx.cache`)
    make_graph: Any = field(default=None, repr=False)
    #: the graph ``fn`` runs (before ``torch.compile`` for a compiled backend; ``fn`` itself for eager), which
    #: :mod:`dynlrp_fx.weight_cache` cuts
    runnable: fx.GraphModule | None = field(default=None, repr=False)

    @property
    def graph(self) -> fx.GraphModule:
        if self._graph is None:
            self._graph = self.make_graph()
        return self._graph

    @property
    def input_names(self) -> list[str]:
        return self.outputs.input_names


class Analysis:
    """A private, analysed copy of a traced graph for one composite (see the module doc).

    ``strict=False`` (used by :func:`dynlrp_fx.coverage`) records ops without a rule in :attr:`uncovered` instead
    of raising :class:`~dynlrp_fx.DynlrpUnsupportedOpError`.
    """

    def __init__(self, traced: TracedProgram, composite: Any, *, params: Any = None, capture: Any = None,
                 strict: bool = True, gradient_form: bool = True, ledger: bool = True, narrow_rows: bool = True):
        self.traced = traced
        self.composite = composite
        #: lower rules that have a gradient form that way (``pair``); ``False`` keeps every rule in relevance form
        #: (the reference the tests compare the gradient form with)
        self.gradient_form = bool(gradient_form)
        #: emit the conservation ledger; ``False`` leaves it out (``absorbed`` reads 0, so the conservation error
        #: is meaningless): what ``benchmarks.gradient_form --ledger`` times the ledger's cost against
        self.ledger = bool(ledger)
        self.report = PipelineReport()
        # rows only a select reads are computed alone (narrow_dead_rows), unless capture= reads a module whole
        ctx = CompileContext(traced=traced, composite=composite, strict=strict,
                             narrow_rows=narrow_rows and not capture)
        progress_stage("analysis passes")
        self.graph = PIPELINE.run(copy_graph_module(traced.graph_module), ctx, stage="analysis", report=self.report,
                                  label="analysis")
        if ctx.narrow_rows and any("dynlrp_narrowed" in n.meta for n in self.graph.graph.nodes):
            # narrowing must not change which rule an op gets: a pattern the rules see (a normaliser's
            # x * g(mean(x)), where the select stopped on one branch) would otherwise be lost. Compare with the
            # graph analysed whole and keep that one if any op's rule differs
            whole_ctx = CompileContext(traced=traced, composite=composite, strict=strict, narrow_rows=False)
            whole = PIPELINE.run(copy_graph_module(traced.graph_module), whole_ctx, stage="analysis",
                                 report=self.report, label="analysis (whole rows)")
            if _rule_signature(whole) != _rule_signature(self.graph):
                self.graph, ctx = whole, whole_ctx
        self.uncovered = ctx.uncovered
        self.params = _resolve_params(traced, params)
        self.capture = _resolve_capture(traced, self.graph, capture)
        self._lowered: dict[tuple, tuple[fx.GraphModule, ProgramOutputs, PipelineReport]] = {}

    @property
    def output_node(self) -> fx.Node:
        """The explained output's node in the analysed graph."""
        out = next(n for n in self.graph.graph.nodes if n.op == "output")
        return out.args[0][self.traced.output_index]

    def context(self, seed_mode: str, promise_policy: str, backend: Any = "eager",
                conditions: tuple = ()) -> CompileContext:
        """The compile context of one program of this analysis (``conditions``: ``((path, node name, dim), ...)``
        for a program that takes ``condition=`` masks)."""
        return CompileContext(traced=self.traced, composite=self.composite, seed_mode=seed_mode,
                              state_inputs=len(self.traced.state_specs),
                              gradient_form=self.gradient_form, ledger=self.ledger,
                              promise_policy=promise_policy, backend=backend, params=dict(self.params),
                              capture=dict(self.capture), conditions={p: (n, d) for p, n, d in conditions})

    def lowered(self, seed_mode: str, promise_policy: str,
                conditions: tuple = ()) -> tuple[fx.GraphModule, ProgramOutputs, PipelineReport]:
        """The lowered program of a seed mode under a memory policy: ``(graph, outputs, report of its passes)``."""
        key = (seed_mode, promise_policy, *conditions)
        if key not in self._lowered:
            ctx = self.context(seed_mode, promise_policy, conditions=conditions)
            report = PipelineReport()
            graph = PIPELINE.run(self.graph, ctx, stage="synthesis", report=report, label=f"synthesis[{seed_mode}]")
            self._lowered[key] = (graph, ctx.outputs, report)
        return self._lowered[key]


def build_program(analysis: Analysis, seed_mode: str, *, promise_policy: str, backend: Any, dynamic: bool,
                  mode: str | None, report: PipelineReport, conditions: tuple = ()) -> Program:
    """Lower (or reuse) the program of ``seed_mode`` and compile it for ``backend``; the passes that ran are
    appended to ``report``."""
    t0 = time.perf_counter()
    progress_stage(f"synthesis passes [{seed_mode}]")
    graph, outputs, synth = analysis.lowered(seed_mode, promise_policy, conditions)
    report.records.extend(synth.records)
    ctx = analysis.context(seed_mode, promise_policy, backend, conditions)
    progress_stage(f"backend [{backend}]")
    runnable = PIPELINE.run(graph, ctx, stage="backend", report=report, label=f"backend[{seed_mode}, {backend}]")
    # Inductor reuses buffers itself (and would functionalise in-place ops), so only eager runs the rewritten copy
    fn = runnable if backend == "eager" else compiled(runnable, backend, dynamic, mode)
    return Program(seed_mode, graph, fn, outputs, time.perf_counter() - t0, runnable=runnable)


def compiled(graph: fx.GraphModule, backend: Any, dynamic: bool, mode: str | None) -> Any:
    """``torch.compile`` of a program for a compiled backend (Inductor's own cache beside dynlrp-fx's, when the
    compile cache is on; see :mod:`dynlrp_fx.cache`)."""
    if backend == "inductor" and cache.enabled():
        cache.use_inductor_cache()
    return torch.compile(graph, backend=backend, dynamic=None if dynamic else False, mode=mode)


#: ops a narrowed graph adds or drops (the select and the reshapes around a linear): left out of the comparison
#: (canonicalize has made every view a reshape)
_SHAPE_OPS = frozenset({torch.ops.aten.select.int, torch.ops.aten.slice.Tensor, torch.ops.aten.reshape.default,
                        torch.ops.aten._assert_tensor_metadata.default})


def _rule_signature(gm: fx.GraphModule) -> dict:
    """How many ops of each (module path, op, rule class, rule) carrying float data the analysed graph has."""
    sig: dict = {}
    for n in gm.graph.nodes:
        ann = n.meta.get("dynlrp")
        if ann is None or n.op != "call_function" or n.target in _SHAPE_OPS or ann.status != FLOAT:
            continue  # (sizes and index arithmetic carry no relevance; the reshapes around a linear go)
        key = (ann.module_path, str(n.target), ann.rule_class, repr(ann.rule))
        sig[key] = sig.get(key, 0) + 1
    return sig


# -- params= and capture= ------------------------------------------------------------------------------------------
def _public_prefix(traced: TracedProgram) -> str:
    """Prefix that the traced root adds to the user's parameter names and module paths (``output=`` callables)."""
    return "model." if isinstance(traced.module_root, _OutputWrapper) else ""


def _resolve_params(traced: TracedProgram, params: Any) -> dict[str, str]:
    """``params=`` -> {parameter placeholder name: public parameter name} (in the model's parameter order)."""
    if params is None or params is False:
        return {}
    prefix = _public_prefix(traced)
    available = {}
    for ph, kind, target in traced.state_specs:
        if kind == "PARAMETER":
            name = target[len(prefix) :] if prefix and target.startswith(prefix) else target
            available[name] = ph
    if params is True:
        return {ph: name for name, ph in available.items()}
    if isinstance(params, str):
        params = [params]
    try:
        wanted = list(params)
    except TypeError:
        raise TypeError(f"params= must be True, a parameter name or a list of names, not {type(params).__name__}") from None
    missing = [p for p in wanted if p not in available]
    if missing:
        raise DynlrpInputError(
            f"params={missing} are not parameters of the traced model; its parameters are: "
            f"{', '.join(available) or '(none)'}. Use the names of model.named_parameters() (or params=True)."
        )
    return {available[p]: p for p in dict.fromkeys(wanted)}


def _stack_paths(node: fx.Node) -> list[str]:
    return [str(path) for path, _t in (node.meta.get("nn_module_stack") or {}).values()]


def module_output_node(gm: fx.GraphModule, path: str) -> fx.Node | None:
    """The output node of the module at ``path`` (as it appears in ``nn_module_stack``), or ``None``.

    The module's *region* is every op node whose module stack contains ``path``; its output is the last region
    node whose value is used outside the region (or returned). For a module called several times, this is its
    last call.
    """
    region = [n for n in gm.graph.nodes if n.op == "call_function" and path in _stack_paths(n)]
    members = set(region)
    outs = [n for n in region if any(u not in members for u in n.users)]
    return outs[-1] if outs else None


def routed_experts(gm: fx.GraphModule, path: str) -> tuple[fx.Node, fx.Node] | None:
    """The top-k contributions of a mixture-of-experts layer at ``path``: ``(contributions, expert ids)`` or ``None``.

    An experts module (transformers' ``grouped_mm`` and ``batched_mm`` implementations, and any layer written the
    same way) computes ``out[n] = sum_j w[n, j] * expert_{idx[n, j]}(x[n])`` for the ``N`` tokens of the batch
    (sample-major rows) and returns the sum over ``j`` of an ``(N, k, H)`` tensor. That tensor is the
    contributions node; the expert ids are the ``(N, k)`` integer tensor the layer reads from outside (the router's
    top-k indices): row ``(n, j)`` of the contributions came from expert ``idx[n, j]``.
    """
    out = module_output_node(gm, path)
    while out is not None and out.target in (torch.ops.aten._to_copy.default,
                                             torch.ops.prims.convert_element_type.default):
        out = out.args[0] if isinstance(out.args[0], fx.Node) else None
    if out is None or out.target is not torch.ops.aten.sum.dim_IntList or list(out.args[1]) not in ([1], [-2]):
        return None
    contrib = out.args[0]
    v = contrib.meta.get("val")
    if not isinstance(v, torch.Tensor) or v.ndim != 3:
        return None
    # the integer (N, k) tensor the layer reads from outside its region: walk up from the contributions
    seen, todo, ids = set(), [contrib], []
    while todo:
        n = todo.pop()
        for a in n.all_input_nodes:
            if a in seen:
                continue
            seen.add(a)
            if a.op == "call_function" and path in _stack_paths(a):
                todo.append(a)
                continue
            av = a.meta.get("val")
            if (isinstance(av, torch.Tensor) and not av.dtype.is_floating_point and av.dtype != torch.bool
                    and [str(d) for d in av.shape] == [str(d) for d in v.shape[:2]]):
                ids.append(a)
    return (contrib, ids[0]) if len(ids) == 1 else None


def _resolve_capture(traced: TracedProgram, gm: fx.GraphModule, capture: Any) -> dict[str, str]:
    """``capture=`` -> {public module path: node name of the module's output} in the analysed graph ``gm``."""
    if capture is None or capture is False:
        return {}
    if isinstance(capture, str):
        capture = [capture]
    prefix = _public_prefix(traced)
    out: dict[str, str] = {}
    for path in capture:
        if not isinstance(path, str):
            raise TypeError(f"capture= takes module paths (str), got {type(path).__name__}: {path!r}")
        full = prefix + path if path else prefix.rstrip(".")
        node = module_output_node(gm, full)
        if node is None:
            paths = {p for n in gm.graph.nodes for p in _stack_paths(n)}
            known = sorted(p[len(prefix) :] for p in paths if p.startswith(prefix) and p)
            raise DynlrpInputError(
                f"capture: no traced operation belongs to module {path!r}. Module paths in the traced graph: "
                f"{', '.join(known[:40]) or '(none)'}{' ...' if len(known) > 40 else ''} (use the names of "
                "model.named_modules())."
            )
        ann = node.meta.get("dynlrp")
        if ann is None or ann.status != FLOAT:
            raise DynlrpInputError(
                f"capture: the output of module {path!r} (node {node.name}, {node.target}) does not depend on a "
                "float or embedded input, so it carries no relevance; capture a module on the path from the inputs "
                "to the explained output."
            )
        out[path] = node.name
    return out
