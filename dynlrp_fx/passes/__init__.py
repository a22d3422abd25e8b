"""Compiler passes. Each is a function over a GraphModule with no hidden state; results ride on ``node.meta``.

The pipeline run by :func:`dynlrp_fx.compile` (``print(explainer.pipeline)`` shows it)::

    canonicalize -> fold_batchnorm -> mark_data -> detect_normalizers -> assign_rules   (analysis, once;
                                                                      fold_batchnorm when the composite asks)
    pair -> resolve_promises -> lower -> unify_batch -> transpose_convolution_pullbacks -> fold_broadcast_bmm
    -> eliminate_common_subexpressions -> eliminate_dead_code -> sink_cheap_ops          (per seed mode: target / seed)
    reuse_buffers                                                           (backend="eager" only, on a copy)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from .annotate import assign_rules, detect_normalizers, mark_data
from .canonicalize import canonicalize
from .dce import eliminate_common_subexpressions, eliminate_dead_code
from .fold_batchnorm import fold_batchnorm
from .inplace import reuse_buffers
from .lower import lower, unify_batch
from .matmul import fold_broadcast_bmm
from .pair import pair
from .promises import resolve_promises
from .pullbacks import transpose_convolution_pullbacks
from .schedule import sink_cheap_ops

__all__ = [
    "Pipeline",
    "canonicalize",
    "fold_batchnorm",
    "mark_data",
    "detect_normalizers",
    "assign_rules",
    "pair",
    "resolve_promises",
    "lower",
    "unify_batch",
    "transpose_convolution_pullbacks",
    "fold_broadcast_bmm",
    "eliminate_common_subexpressions",
    "eliminate_dead_code",
    "sink_cheap_ops",
    "reuse_buffers",
    "PIPELINE",
]


@dataclass(frozen=True)
class Pipeline:
    """An ordered, printable list of passes."""

    stages: tuple[tuple[str, tuple[Callable, ...]], ...]

    def __repr__(self) -> str:
        lines = []
        for stage, fns in self.stages:
            lines.append(f"{stage}: " + " -> ".join(f.__name__ for f in fns))
        return "\n".join(lines)

    def names(self) -> list[str]:
        return [f.__name__ for _, fns in self.stages for f in fns]


PIPELINE = Pipeline(
    (
        ("analysis", (canonicalize, fold_batchnorm, mark_data, detect_normalizers, assign_rules)),
        (
            "synthesis",
            (
                pair,
                resolve_promises,
                lower,
                unify_batch,
                transpose_convolution_pullbacks,
                fold_broadcast_bmm,
                eliminate_common_subexpressions,
                eliminate_dead_code,
                sink_cheap_ops,
            ),
        ),
        ("eager backend", (reuse_buffers,)),
    )
)
