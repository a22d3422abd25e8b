"""Helpers shared by the tests (import them from here, never from ``conftest``): pipeline helpers, reference
computations and model factories.

The factories are also CLI model specs (``dynlrp export --model tests.helpers:small_cnn``, ``dynlrp coverage --model
tests.helpers:custom_op_model``; importable from the repo root). ``custom_op_model`` calls a custom
``torch.library`` op (namespace ``dynlrp_cov``, distinct from the one in ``tests/test_foundation.py``) that has no
LRP rule, inside the submodule ``block.act``.
"""

from __future__ import annotations

import copy
import inspect
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

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


class EmbeddingLookups(TorchFunctionMode):
    """Records ``(ids, looked-up rows)`` of every embedding lookup (``F.embedding`` / ``torch.embedding``; a
    function mode sees them whether or not an ``nn.Embedding`` makes them)."""

    def __init__(self):
        super().__init__()
        self.lookups: list[tuple[torch.Tensor, torch.Tensor]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func is F.embedding:
            self.lookups.append((kwargs.get("input", args[0] if args else None), out))
        elif func is torch.embedding:
            self.lookups.append((args[1] if len(args) > 1 else kwargs["indices"], out))
        return out


def _same_storage(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


def _named_inputs(model, args: tuple, kwargs: dict) -> dict[str, torch.Tensor]:
    params = list(inspect.signature(model.forward).parameters)
    named = {params[i]: a for i, a in enumerate(args)}
    named.update(kwargs)
    return {k: v for k, v in named.items() if isinstance(v, torch.Tensor)}


def autograd_gradient_x_input(model, args: tuple, kwargs: dict, output: str | None, target: torch.Tensor):
    """Autograd's gradient x input of ``sum_b y[b, target_b]`` (``y`` the explained output, flattened per sample:
    ``dynlrp_fx.zoo.select_output(model(...), output)``), computed on a deep copy of ``model`` (the model itself is
    never touched), the reference of ``rules="gradient"``. Returns ``(reference, magnitude, y)``:

    * ``reference``: ``{input name: x * dy/dx}`` for the float inputs, and for the integer inputs that feed an
      embedding lookup ``e = E[ids]`` (ids that are the input or a view of it) ``sum_d e_d * dy/de_d`` summed over
      lookups, what the gradient preset's embedding rule (``EmbeddingRows``) gives token ids;
    * ``magnitude``: the same sums over absolute values (``|x * g|``, ``sum_d |e_d * g_d|``), the scale of the
      rounding errors (a sum is exact to float rounding relative to its terms, not to its cancelled result);
    * ``y``: the explained output.
    """
    from dynlrp_fx import zoo

    model = copy.deepcopy(model)

    def leaf(v):
        return v.detach().clone().requires_grad_(True) if isinstance(v, torch.Tensor) and v.is_floating_point() else v

    args = tuple(leaf(a) for a in args)
    kwargs = {k: leaf(v) for k, v in kwargs.items()}
    named = _named_inputs(model, args, kwargs)
    mode = EmbeddingLookups()
    with torch.enable_grad(), mode:
        y = zoo.select_output(model(*args, **kwargs), output)
    sel = y.reshape(y.shape[0], -1)[torch.arange(y.shape[0]), target].sum()
    floats = {k: v for k, v in named.items() if v.is_floating_point()}
    ids = {k: v for k, v in named.items() if not v.is_floating_point()}
    # lookups of an input's ids (or a view of them); position ids and the like are the model's own
    mine = [(k, e) for i, e in mode.lookups for k, v in ids.items() if _same_storage(i, v) and e.requires_grad]
    wrt = list(floats.values()) + [e for _k, e in mine]
    grads = torch.autograd.grad(sel, wrt, allow_unused=True)
    ref: dict[str, torch.Tensor] = {}
    mag: dict[str, torch.Tensor] = {}
    for (k, x), g in zip(floats.items(), grads):
        ref[k] = torch.zeros_like(x) if g is None else (g * x).detach()
        mag[k] = ref[k].abs()
    for (k, e), g in zip(mine, grads[len(floats):]):
        ge = torch.zeros_like(e) if g is None else (g * e).detach()
        ref[k] = ref.get(k, 0) + ge.sum(-1).reshape(ids[k].shape)
        mag[k] = mag.get(k, 0) + ge.abs().sum(-1).reshape(ids[k].shape)
    return ref, mag, y.detach()


#: tolerance of the gradient x input oracles, relative to the largest magnitude of an input (float32 rounding over
#: a graph of up to a few hundred ops; derivation and measurements: ``tests/test_zoo_gradient.py``)
GRADIENT_TOL = 2**13 * torch.finfo(torch.float32).eps


def gradient_oracle_errors(expl: Any, model, args: tuple, kwargs: dict, output: str | None = None, *,
                           output_rtol: float = 1e-4) -> dict[str, float]:
    """Compare an explanation made with ``rules="gradient"`` (or LRP-0 on a piecewise-linear model) at the argmax
    target with :func:`autograd_gradient_x_input`: ``{input: max |R - reference| / max magnitude}`` (compare with
    :data:`GRADIENT_TOL`). Asserts that the outputs agree, that only float inputs and token ids feeding an embedding
    receive relevance and that the reference is not zero everywhere (the oracle would be vacuous). An input whose
    reference is exactly zero (a float mask that only selects) is measured against the largest magnitude of all.
    ``output_rtol``: how close the explained output must be to the reference model's (its precision)."""
    out = expl.output
    target = out.reshape(out.shape[0], -1).argmax(1)
    ref, mag, y = autograd_gradient_x_input(model, args, kwargs, output, target)
    scale = float(y.abs().max())
    assert torch.allclose(out.float(), y.float(), rtol=output_rtol, atol=output_rtol * scale / 10), "outputs differ"
    extra = set(expl.inputs) - set(ref)
    assert not extra, f"inputs {sorted(extra)} got relevance but feed no embedding and are not float"
    top = max((float(m.max()) for m in mag.values()), default=0.0)
    assert top > 0, "gradient x input is zero for every input (the oracle would be vacuous)"
    errs = {}
    for k, r in ref.items():
        got = expl.inputs.get(k)
        if got is None:  # an input the explainer gives no relevance must have no gradient x input either
            errs[k] = float(r.abs().max()) / top
            continue
        assert got.shape == r.shape, f"{k}: relevance shape {tuple(got.shape)} != {tuple(r.shape)}"
        errs[k] = float((got.double() - r.double()).abs().max()) / (float(mag[k].max()) or top)
    return errs

# -- model factories -------------------------------------------------------------------------------------------------
def tiny_qwen3_moe():
    """A one-layer Qwen3-MoE from its default config, sizes shrunk (4 experts, top-2; transformers' default
    ``grouped_mm`` experts; float32: CPU grouped_mm takes no float64). Skips where transformers has none."""
    import pytest

    transformers = pytest.importorskip("transformers")
    if not hasattr(transformers, "Qwen3MoeForCausalLM"):
        pytest.skip("this transformers has no Qwen3-MoE")
    cfg = transformers.Qwen3MoeConfig(
        vocab_size=64, hidden_size=16, intermediate_size=32, moe_intermediate_size=8, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, head_dim=8, num_experts=4, num_experts_per_tok=2,
    )
    torch.manual_seed(0)
    return transformers.Qwen3MoeForCausalLM(cfg).eval()


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
