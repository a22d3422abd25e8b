"""Exceptions raised by dynlrp-fx.

Every error says what was wrong, where (source line, ATen op, module path) and what to do.
"""

from __future__ import annotations


class DynlrpError(Exception):
    """Base class of every dynlrp-fx error."""


class DynlrpTraceError(DynlrpError):
    """The model could not be traced to an ATen graph with ``torch.export``.

    The message quotes the failing source line when torch reports one and suggests a fix
    (for data-dependent control flow: ``torch.cond`` or moving the branch out of ``forward``).
    """


class DynlrpUnsupportedOpError(DynlrpError):
    """One or more ATen ops that carry relevance have no LRP rule.

    Attributes
    ----------
    uncovered:
        ``{op name: [module paths that use it]}`` for every uncovered op.
    """

    def __init__(self, message: str, uncovered: dict[str, list[str]] | None = None):
        super().__init__(message)
        self.uncovered = dict(uncovered or {})


class DynlrpInputError(DynlrpError, ValueError):
    """An explainer was called with inputs that do not match the compiled program."""


class DynlrpShapeError(DynlrpInputError):
    """An input's size lies outside what a program was traced for: a dimension the program is static in (the model
    specialised it, or it was compiled with ``dynamic=False``) has another size, or a dynamic one is out of its
    range. A live explainer answers it by building a program for the new shape; a loaded file cannot."""


class DynlrpLoadError(DynlrpError):
    """A saved relevance program could not be loaded or called."""


class DynlrpDatasetError(DynlrpError, ValueError):
    """A dataset run's shards cannot be resumed or merged: a shard file is missing, truncated or corrupted (the
    message names it), or the loader's batches differ from those the finished shards were computed from."""


class DynlrpInternalError(DynlrpError, RuntimeError):
    """A compiler pass failed on a graph that ``torch.export`` traced: a dynlrp-fx bug, never the user's fault. The
    message names the pass and the original error (chained as ``__cause__``); please report it with the model."""
