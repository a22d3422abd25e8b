"""Model factories for the tests, also used as ``dynlrp export --model tests._factories:NAME`` in the CLI tests
(importable from the repo root)."""

from __future__ import annotations

import torch
from torch import nn


def small_cnn() -> nn.Module:
    """Conv-BN-ReLU-MaxPool-Linear on (B, 3, 8, 8) inputs, 5 classes (piecewise linear: LRP-0 == grad x input)."""
    return nn.Sequential(
        nn.Conv2d(3, 4, 3),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(4 * 3 * 3, 5),
    ).eval()


def pooled_cnn(width: int = 8, classes: int = 5) -> nn.Module:
    """conv -> BN -> ReLU -> max-pool -> conv -> ReLU -> adaptive avg-pool -> linear (eval mode, seed 0)."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, width, 3, padding=1),
        nn.BatchNorm2d(width),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(width, width, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(4 * width, classes),
    ).eval()


def not_a_module() -> str:
    """A factory returning something that is not an ``nn.Module`` (CLI error test)."""
    return "not a module"
