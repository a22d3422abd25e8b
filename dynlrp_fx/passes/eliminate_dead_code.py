"""``eliminate_dead_code``: remove nodes whose values are never used."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

__all__ = ["eliminate_dead_code"]

if TYPE_CHECKING:
    from .pipeline import CompileContext


def eliminate_dead_code(gm: torch.fx.GraphModule, ctx: CompileContext) -> torch.fx.GraphModule:
    """Remove nodes whose values are never used (impure nodes such as asserts are kept); returns ``gm``."""
    del ctx  # reads nothing from the context
    gm.graph.eliminate_dead_code()
    gm.recompile()
    return gm
