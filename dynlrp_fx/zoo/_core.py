"""Core data structures and helpers of the model zoo (see ``dynlrp_fx.zoo``)."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

__all__ = [
    "ZooEntry",
    "ZOO",
    "register",
    "get",
    "names",
    "batch_dynamic_shapes",
    "decomposition_table",
    "export_entry",
    "BATCH",
    "select_output",
    "TensorOutputs",
]

BATCH = 2  # example batch size of every zoo input (never 0/1: export would specialize)


@dataclass(frozen=True)
class ZooEntry:
    """One architecture of the zoo.

    ``build(full=False) -> (model, args, kwargs)`` returns the model in eval mode and
    example inputs (batch size 2).  It is deterministic (seeds inside).  ``full=True``
    builds the real-size configuration where the entry supports it (slow; paper
    entries always do); other entries ignore the flag.
    """

    name: str
    modality: str  # "vision" | "text" | "audio" | "multimodal" | "sequence"
    family: str  # "torchvision" | "transformers" | ...
    build: Callable[..., tuple]
    paper: bool = False
    output: str | None = None

    def __call__(self, full: bool = False) -> tuple:  # convenience: entry() == entry.build()
        return self.build(full=full)


ZOO: dict[str, ZooEntry] = {}

_MODALITIES = {"vision", "text", "audio", "multimodal", "sequence"}


def register(entry: ZooEntry) -> ZooEntry:
    if entry.name in ZOO:
        raise ValueError(f"duplicate zoo entry {entry.name!r}")
    if entry.modality not in _MODALITIES:
        raise ValueError(f"bad modality {entry.modality!r} for {entry.name!r}")
    ZOO[entry.name] = entry
    return entry


def get(name: str) -> ZooEntry:
    try:
        return ZOO[name]
    except KeyError:
        raise KeyError(f"unknown zoo entry {name!r}; valid names: {', '.join(sorted(ZOO))}") from None


def names(paper_only: bool = False) -> list[str]:
    return [n for n, e in ZOO.items() if e.paper or not paper_only]


def batch_dynamic_shapes(model: torch.nn.Module, args: tuple, kwargs: dict, batch=None) -> dict:
    """``dynamic_shapes`` for :func:`torch.export.export` making dim 0 of every tensor input (ndim >= 1) one shared
    ``Dim("batch", min=1)``, keyed like ``model.forward``'s signature (nested tuples, lists and dicts follow the
    input's structure; ``*args``/``**kwargs`` parameters get a tuple/dict)."""
    from ..trace import dynamic_shapes_for

    if batch is None:
        batch = torch.export.Dim("batch", min=1)
    return dynamic_shapes_for(inspect.signature(model.forward), tuple(args), dict(kwargs or {}),
                              lambda v: {0: batch} if v.ndim >= 1 else None)


class TensorOutputs(torch.nn.Module):
    """Calls ``model`` and returns its output without the non-tensor parts (``dynlrp_fx.trace.tensor_outputs``: a
    generative Hugging Face model's key/value cache, ``None`` entries), so that :func:`torch.export.export` can
    return it. The model is a submodule, so parameter names get a ``model.`` prefix; the model is not changed."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        from ..trace import tensor_outputs

        return tensor_outputs(self.model(*args, **kwargs))


def decomposition_table() -> dict:
    """Default core-ATen decompositions, keeping SDPA as one op."""
    table = torch.export.default_decompositions()
    table.pop(torch.ops.aten.scaled_dot_product_attention.default, None)
    table.pop(torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default, None)
    return table


def export_entry(entry: ZooEntry | str, full: bool = False, built: tuple | None = None,
                 decompose: bool = True) -> torch.export.ExportedProgram:
    """Build ``entry`` and export it with a dynamic batch dim (non-strict), then run the
    decompositions of :func:`decomposition_table`.  ``built`` may pass an already built
    ``(model, args, kwargs)`` triple.

    A model whose output holds objects ``torch.export`` cannot return (the key/value cache of a
    generative model with the library's default ``use_cache=True``) is exported through
    :class:`TensorOutputs`, as ``dynlrp.compile`` traces it; the program is called like the model
    (``ep.module()(*args, **kwargs)``) and returns its tensor outputs under their names."""
    if isinstance(entry, str):
        entry = get(entry)
    model, args, kwargs = built if built is not None else entry.build(full=full)
    root = model
    try:
        ep = torch.export.export(model, tuple(args), dict(kwargs), dynamic_shapes=batch_dynamic_shapes(model, args, kwargs),
                                 strict=False)
    except Exception as e:  # noqa: BLE001 - only an output export cannot return is retried
        from ..trace import _non_tensor_output

        if not _non_tensor_output(e):
            raise
        root = TensorOutputs(model)
        ep = torch.export.export(root, tuple(args), dict(kwargs), dynamic_shapes=batch_dynamic_shapes(root, args, kwargs),
                                 strict=False)
    if root is not model:
        _drop_wrapper_guards(ep)
    if decompose:
        ep = ep.run_decompositions(decomposition_table())
        if root is not model:
            _drop_wrapper_guards(ep)
    return ep


def _drop_wrapper_guards(ep: torch.export.ExportedProgram) -> None:
    """Export words the guards of a ``**kwargs`` wrapper on ``L['kwargs'][...]``, names its flat inputs do not define,
    so decompositions and ``ep.module()`` would fail on them; the batch guards are in the dynamic shapes."""
    if hasattr(ep, "_guards_code"):
        ep._guards_code = []


def select_output(out: Any, output: str | None = None) -> torch.Tensor:
    """The tensor to explain in a model output: ``output`` (attribute / key) if given, else
    ``logits`` if present, else the first tensor leaf (tensor, tuple or HF ``ModelOutput``)."""
    if output is not None:
        if hasattr(out, "keys") and output in out.keys():
            return out[output]
        return getattr(out, output)
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "keys") and "logits" in out.keys():
        return out["logits"]
    leaves = torch.utils._pytree.tree_leaves(out)
    for leaf in leaves:
        if isinstance(leaf, torch.Tensor):
            return leaf
    if hasattr(out, "to_tuple"):
        for leaf in out.to_tuple():
            if isinstance(leaf, torch.Tensor):
                return leaf
    raise TypeError(f"no tensor in model output of type {type(out).__name__}")
