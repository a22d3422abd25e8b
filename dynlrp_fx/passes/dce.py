"""Dead-code elimination and common-subexpression elimination over a lowered graph."""

from __future__ import annotations

import torch

__all__ = ["eliminate_dead_code"]


def eliminate_dead_code(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """Remove nodes whose values are never used (impure nodes such as asserts are kept); returns ``gm``."""
    gm.graph.eliminate_dead_code()
    gm.recompile()
    return gm
