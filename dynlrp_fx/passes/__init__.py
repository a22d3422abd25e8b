"""Compiler passes, one module per pass (named after it), and the pipeline that runs them.

Every pass is ``fn(gm, ctx) -> gm`` over a ``GraphModule`` and a :class:`CompileContext`; results ride on
``node.meta``. :data:`PIPELINE` is the list that :func:`dynlrp_fx.compile`, ``Explainer.recompile``,
:func:`dynlrp_fx.coverage` and :func:`dynlrp_fx.export` all run (``print(PIPELINE)`` shows it,
``print(explainer.pipeline)`` what ran for one explainer, with times and node counts). Shared analyses that are not
passes: :mod:`.nodes` (node annotations), :mod:`.values` (value numbering), :mod:`.nonnegative`, :mod:`.memory`.
"""

from __future__ import annotations

from .pipeline import PIPELINE, STAGES, CompileContext, Pass, PassRecord, Pipeline, PipelineReport

__all__ = ["PIPELINE", "STAGES", "CompileContext", "Pass", "PassRecord", "Pipeline", "PipelineReport"]
