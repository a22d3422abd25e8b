"""Helpers shared by the tests (import them from here, never from ``conftest``): pipeline helpers, reference
computations and model factories.

The factories are also CLI model specs (``dynlrp export --model tests.helpers:small_cnn``, ``dynlrp coverage --model
tests.helpers:custom_op_model``; importable from the repo root). ``custom_op_model`` calls a custom
``torch.library`` op (namespace ``dynlrp_cov``, distinct from the one in ``tests/test_foundation.py``) that has no
LRP rule, inside the submodule ``block.act``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from dynlrp_fx.passes import PIPELINE, CompileContext


def run_pass(name: str, gm: torch.fx.GraphModule, **ctx: Any) -> tuple[torch.fx.GraphModule, CompileContext]:
    """Run one pass of the pipeline on ``gm`` through the runner (the way the compiler calls it); ``ctx`` sets fields
    of the :class:`~dynlrp_fx.passes.CompileContext` (e.g. ``promise_policy="keep"``). Returns the resulting graph
    module and the context (whose result fields the pass may have set)."""
    context = CompileContext(**ctx)
    return PIPELINE.run(gm, context, only=[name]), context


def call_args(explainer: Any, args: tuple, kwargs: dict, extra: torch.Tensor | None = None) -> list:
    """The arguments an explainer's target-mode program is called with: state tensors, the checked inputs and the
    target (argmax for every sample unless ``extra`` is given)."""
    tensors = explainer.bind(*args, **kwargs)
    if extra is None:
        extra = torch.full((tensors[0].shape[0],), -1, dtype=torch.long)
    return [*explainer.state_tensors(None), *tensors, extra]


# -- references ------------------------------------------------------------------------------------------------------
def grad_x_input(model, x, target):
    """Gradient x input of output[:, target] (a reference for LRP-0 on piecewise-linear nets)."""
    x = x.clone().requires_grad_(True)
    y = model(x)
    sel = y.reshape(y.shape[0], -1)[torch.arange(y.shape[0]), target]
    (g,) = torch.autograd.grad(sel.sum(), x)
    return (g * x).detach()


# -- model factories -------------------------------------------------------------------------------------------------
def tiny_bert(model_cls: str = "BertForSequenceClassification", *, sdpa: bool = False, **config):
    """A tiny BERT from a config with random weights (eval mode); ``config`` overrides the defaults below."""
    import transformers

    cfg = dict(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
               max_position_embeddings=32, num_labels=3)
    cfg.update(config)
    cls = getattr(transformers, model_cls)
    bert_config = transformers.BertConfig(**cfg)
    model = cls._from_config(bert_config, attn_implementation="sdpa") if sdpa else cls(bert_config)
    return model.eval()


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


# the custom op of ``custom_op_model`` (no LRP rule)
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
