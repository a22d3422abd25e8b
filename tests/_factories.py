"""Model factories for the ``dynlrp export --model tests._factories:NAME`` CLI tests (importable from the repo root)."""

from __future__ import annotations

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


def not_a_module() -> str:
    """A factory returning something that is not an ``nn.Module`` (CLI error test)."""
    return "not a module"
