"""Model factories for the workflow tests (``dynlrp explain --model tests._workflow_factories:make_mlp``)."""

from __future__ import annotations

import torch
from torch import nn


def make_mlp() -> nn.Module:
    """A seeded 6 -> 8 -> 3 MLP with biases."""
    torch.manual_seed(11)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)).eval()


def make_cnn() -> nn.Module:
    """A seeded tiny CNN on (1, 8, 8) images."""
    torch.manual_seed(12)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 64, 5)).eval()
