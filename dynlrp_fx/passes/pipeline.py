"""The pipeline: the passes as data, the context they share, and the runner that times them.

Every pass is a function ``(gm, ctx) -> gm``: a ``GraphModule`` and a :class:`CompileContext` in, a
``GraphModule`` out (the same one rewritten in place, or a new one). Analysis results ride on ``node.meta``;
what a later stage needs that is not a node fact (the names of the program's outputs, the uncovered ops, how many
buffers were reused) goes on the context. :data:`PIPELINE` lists every pass with the stage it belongs to and the
condition under which it runs; :meth:`Pipeline.run` is the only place that calls a pass, and records each pass's
time and node counts in a :class:`PipelineReport` (``print(explainer.pipeline)``).

Stages:

``analysis``
    once per explainer, on its private copy of the traced graph: canonical forms, data-ness, normalisers, rules.
``synthesis``
    once per seed mode (``target`` / ``seed``) and memory policy: the paired forward+relevance graph, lowered to
    pure ATen and cleaned up. The result is the functional program that exports and ``torch.compile`` consume.
``backend``
    once per program and backend: rewrites that only the eager backend wants (in-place buffer reuse, on a copy).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import DynlrpError, DynlrpInternalError
from . import (
    assign_rules,
    canonicalize,
    detect_normalizers,
    elide_reshape_copies,
    eliminate_common_subexpressions,
    eliminate_dead_code,
    fold_batchnorm,
    fold_broadcast_bmm,
    lower,
    mark_data,
    mask_relu_pullbacks,
    narrow_block_matmuls,
    narrow_dead_rows,
    pair,
    resolve_promises,
    reuse_buffers,
    scale_batch_norm_pullbacks,
    sink_cheap_ops,
    stack_select_pullbacks,
    transpose_convolution_pullbacks,
    unify_batch,
)
from .resolve_promises import DEFAULT_POLICY

__all__ = ["CompileContext", "Pass", "PassRecord", "Pipeline", "PipelineReport", "PIPELINE", "STAGES"]

STAGES = ("analysis", "synthesis", "backend")


@dataclass
class CompileContext:
    """What the passes of one compilation read, and the results they hand to later stages.

    Inputs (set by whoever runs the pipeline): ``traced`` (the :class:`~dynlrp_fx.trace.TracedProgram`),
    ``composite`` (the rules), ``seed_mode`` (``"target"`` or ``"seed"``), ``promise_policy``, ``backend`` (the
    resolved backend), ``params`` (parameter placeholder -> public name, ``compile(params=)``), ``capture`` (public
    module path -> node name, ``compile(capture=)``), ``gradient_form`` (``pair`` lowers rules with a gradient form
    that way), ``ledger`` (``pair`` emits the conservation ledger), ``strict`` (``assign_rules`` raises for ops without a rule;
    :func:`dynlrp_fx.coverage` clears it to list them instead).

    Results: ``uncovered`` (op -> module paths of relevant nodes without a rule), ``outputs`` (the
    :class:`~dynlrp_fx.passes.pair.ProgramOutputs` of the paired graph: which relevance each output is),
    ``buffer_rewrites`` (ops the eager backend made in-place), ``traces`` (the ATen subgraphs of rule code and
    other Python calls by trace key: ``pair`` traces them to get their fake values, ``lower`` inlines them; see
    :func:`~dynlrp_fx.passes.lower.trace_node`).
    """

    traced: Any = None
    composite: Any = None
    seed_mode: str = "target"
    promise_policy: str = DEFAULT_POLICY
    backend: Any = "eager"
    params: dict[str, str] = field(default_factory=dict)
    capture: dict[str, str] = field(default_factory=dict)
    #: ``condition=``: public module path -> (node name, feature dim) whose relevance is masked (see pair)
    conditions: dict[str, tuple[str, int]] = field(default_factory=dict)
    #: carry ``G`` (``R = value * G``) through rules that have a gradient form (``pair``); ``False``: relevance
    gradient_form: bool = True
    #: emit the conservation ledger (``pair``); ``False`` only to measure what it costs (``absorbed`` reads 0)
    ledger: bool = True
    #: compute only the rows a ``select`` reads (``narrow_dead_rows``); ``False`` where ``capture=`` reads a
    #: module's relevance whole, or for the reference the tests compare with
    narrow_rows: bool = True
    strict: bool = True
    #: how many of the program's first placeholders are the model's state (parameters, buffers, constants);
    #: ``reuse_buffers`` never shares a buffer between a value computed from state alone and any other value, so
    #: that :mod:`dynlrp_fx.weight_cache` can cut those values out (``None``: no such constraint)
    state_inputs: int | None = None
    uncovered: dict[str, list[str]] = field(default_factory=dict)
    outputs: Any = None
    buffer_rewrites: int = 0
    traces: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Pass:
    """One pass of the pipeline: ``fn(gm, ctx) -> gm`` in ``stage``, run when ``when(ctx)`` holds."""

    name: str
    fn: Callable[[torch.fx.GraphModule, CompileContext], torch.fx.GraphModule]
    stage: str
    when: Callable[[CompileContext], bool] | None = None
    condition: str = ""  #: ``when`` in words, shown by ``repr(PIPELINE)``

    def applies(self, ctx: CompileContext) -> bool:
        return self.when is None or bool(self.when(ctx))


@dataclass
class PassRecord:
    """What one pass did in one run: its stage and label (``synthesis[target]``), whether it ran, its time and the
    graph's node count before and after."""

    stage: str
    label: str
    name: str
    ran: bool
    seconds: float = 0.0
    nodes_in: int = 0
    nodes_out: int = 0


def _nodes(gm: torch.fx.GraphModule) -> int:
    return len(gm.graph.nodes)


class PipelineReport:
    """The passes that ran for one explainer, in order, with their times and node counts (``print`` it)."""

    def __init__(self, records: Iterable[PassRecord] = ()):
        self.records: list[PassRecord] = list(records)

    def names(self) -> list[str]:
        """Names of the passes that ran, in order (a pass that ran for several programs appears once per run)."""
        return [r.name for r in self.records if r.ran]

    def seconds(self, stage: str | None = None) -> float:
        """Total time of the passes (of one stage)."""
        return sum(r.seconds for r in self.records if stage is None or r.stage == stage)

    def __repr__(self) -> str:
        lines: list[str] = []
        label = None
        for r in self.records:
            if r.label != label:
                label = r.label
                total = sum(x.seconds for x in self.records if x.label == label)
                lines.append(f"{label}: {total:.3f} s")
            if r.ran:
                lines.append(f"  {r.name:<34} {r.seconds:8.3f} s  {r.nodes_in:>6} -> {r.nodes_out:<6} nodes")
            else:
                lines.append(f"  {r.name:<34}  skipped")
        return "\n".join(lines) if lines else "(no passes ran)"


class Pipeline:
    """An ordered list of :class:`Pass` es, grouped in :data:`STAGES`; :meth:`run` runs them."""

    def __init__(self, passes: Iterable[Pass]):
        self.passes = tuple(passes)
        for p in self.passes:
            if p.stage not in STAGES:
                raise ValueError(f"pass {p.name}: unknown stage {p.stage!r}; stages are {STAGES}")

    def names(self, stage: str | None = None) -> list[str]:
        """Pass names in order (of one stage)."""
        return [p.name for p in self.passes if stage is None or p.stage == stage]

    def __getitem__(self, name: str) -> Pass:
        for p in self.passes:
            if p.name == name:
                return p
        raise KeyError(f"no pass {name!r}; passes: {', '.join(self.names())}")

    def run(
        self,
        gm: torch.fx.GraphModule,
        ctx: CompileContext,
        *,
        stage: str | None = None,
        only: Iterable[str] | None = None,
        report: PipelineReport | None = None,
        label: str | None = None,
    ) -> torch.fx.GraphModule:
        """Run the passes of ``stage`` (all stages when ``None``; only those named in ``only``, if given) on
        ``gm`` in order, each when its condition holds for ``ctx``; returns the resulting graph module.

        Each pass's time and node counts are appended to ``report`` under ``label`` (default: the stage name)."""
        wanted = None if only is None else set(only)
        if wanted is not None and not wanted <= set(self.names()):
            raise KeyError(f"unknown passes {sorted(wanted - set(self.names()))}; passes: {', '.join(self.names())}")
        for p in self.passes:
            if (stage is not None and p.stage != stage) or (wanted is not None and p.name not in wanted):
                continue
            rec = PassRecord(p.stage, label or p.stage, p.name, p.applies(ctx))
            if rec.ran:
                rec.nodes_in = _nodes(gm)
                t0 = time.perf_counter()
                try:
                    gm = p.fn(gm, ctx)
                except (DynlrpError, ValueError):  # errors meant for the user (an op without a rule, a bad option)
                    raise
                except Exception as e:  # noqa: BLE001 - a raw error from inside a pass is a bug: say where it came from
                    first = (str(e).strip().splitlines() or [""])[0][:500]
                    raise DynlrpInternalError(
                        f"dynlrp-fx's compiler pass {p.name!r} ({p.stage} stage) failed: {type(e).__name__}: {first}\n"
                        "The model traced, so this is a dynlrp-fx bug, not a problem with the model. Please report it "
                        "with the model (the full traceback is chained below); meanwhile another rules preset or "
                        "promise_policy='keep' may avoid it."
                    ) from e
                rec.seconds = time.perf_counter() - t0
                rec.nodes_out = _nodes(gm)
            if report is not None:
                report.records.append(rec)
        return gm

    def __repr__(self) -> str:
        lines = []
        for stage in STAGES:
            parts = [p.name + (f" ({p.condition})" if p.condition else "") for p in self.passes if p.stage == stage]
            if parts:
                lines.append(f"{stage}: " + " -> ".join(parts))
        return "\n".join(lines)


def _asks_fold_batchnorm(ctx: CompileContext) -> bool:
    return ctx.composite is not None and "fold_batchnorm" in getattr(ctx.composite, "canonizers", ())


def _narrows(ctx: CompileContext) -> bool:
    return ctx.narrow_rows


def _eager(ctx: CompileContext) -> bool:
    return ctx.backend == "eager"


#: every pass, in the order it runs
PIPELINE = Pipeline(
    [
        Pass("canonicalize", canonicalize.canonicalize, "analysis"),
        Pass("narrow_dead_rows", narrow_dead_rows.narrow_dead_rows, "analysis", _narrows,
             "unless capture= reads a module's relevance"),
        Pass("fold_batchnorm", fold_batchnorm.fold_batchnorm, "analysis", _asks_fold_batchnorm,
             "when the composite asks for it"),
        Pass("mark_data", mark_data.mark_data, "analysis"),
        Pass("detect_normalizers", detect_normalizers.detect_normalizers, "analysis"),
        Pass("assign_rules", assign_rules.assign_rules, "analysis"),
        Pass("pair", pair.pair, "synthesis"),
        Pass("resolve_promises", resolve_promises.resolve_promises, "synthesis"),
        Pass("lower", lower.lower, "synthesis"),
        Pass("hold_small_outputs", resolve_promises.hold_small_outputs, "synthesis"),
        Pass("unify_batch", unify_batch.unify_batch, "synthesis"),
        Pass("transpose_convolution_pullbacks", transpose_convolution_pullbacks.transpose_convolution_pullbacks,
             "synthesis"),
        Pass("scale_batch_norm_pullbacks", scale_batch_norm_pullbacks.scale_batch_norm_pullbacks, "synthesis"),
        Pass("mask_relu_pullbacks", mask_relu_pullbacks.mask_relu_pullbacks, "synthesis"),
        Pass("fold_broadcast_bmm", fold_broadcast_bmm.fold_broadcast_bmm, "synthesis"),
        Pass("narrow_block_matmuls", narrow_block_matmuls.narrow_block_matmuls, "synthesis"),
        Pass("stack_select_pullbacks", stack_select_pullbacks.stack_select_pullbacks, "synthesis"),
        Pass("eliminate_common_subexpressions", eliminate_common_subexpressions.eliminate_common_subexpressions,
             "synthesis"),
        Pass("eliminate_dead_code", eliminate_dead_code.eliminate_dead_code, "synthesis"),
        Pass("hold_outputs_not_inputs", resolve_promises.hold_outputs_not_inputs, "synthesis"),
        Pass("step_back_residual_streams", resolve_promises.step_back_residual_streams, "synthesis"),
        Pass("hold_activation_ratios", resolve_promises.hold_activation_ratios, "synthesis"),
        Pass("elide_reshape_copies", elide_reshape_copies.elide_reshape_copies, "synthesis"),
        Pass("sink_cheap_ops", sink_cheap_ops.sink_cheap_ops, "synthesis"),
        Pass("reuse_buffers", reuse_buffers.reuse_buffers, "backend", _eager, 'backend="eager" only, on a copy'),
    ]
)
