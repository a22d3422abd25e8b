"""Model factories for the ``dynlrp coverage --model tests._cov_factories:NAME`` CLI tests.

``custom_op_model`` calls a custom ``torch.library`` op (namespace ``dynlrp_cov``, distinct from the one in
``tests/test_foundation.py``) that has no LRP rule, inside the submodule ``block.act``.
"""

from __future__ import annotations

import torch
from torch import nn

_lib = torch.library.Library("dynlrp_cov", "DEF")
_lib.define("squish(Tensor x) -> Tensor")


@torch.library.impl(_lib, "squish", "CompositeExplicitAutograd")
def _squish(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(x)


@torch.library.register_fake("dynlrp_cov::squish")
def _squish_fake(x: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x)


class Squish(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.dynlrp_cov.squish(x)


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.act = Squish()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.lin(x))


def custom_op_model() -> nn.Module:
    """Linear -> custom op ``dynlrp_cov.squish`` (in module ``block.act``) -> Linear, on (B, 4) inputs."""
    return _CustomNet()


class _CustomNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.block = Block()
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.block(x))


def covered_model() -> nn.Module:
    """A small fully covered MLP on (B, 4) inputs (the CLI's exit-0 case)."""
    return nn.Sequential(nn.Linear(4, 8), nn.GELU(), nn.LayerNorm(8), nn.Linear(8, 3))
