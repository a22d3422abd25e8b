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
    """``dynamic_shapes`` for :func:`torch.export.export` making dim 0 of every tensor
    input (ndim >= 1) one shared ``Dim("batch", min=1)`` (the same rule :func:`dynlrp_fx.trace.trace` uses)."""
    from ..trace import _default_dynamic_shapes

    if batch is None:
        batch = torch.export.Dim("batch", min=1)
    return _default_dynamic_shapes(inspect.signature(model.forward), tuple(args), dict(kwargs or {}), batch)


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
    ``(model, args, kwargs)`` triple."""
    if isinstance(entry, str):
        entry = get(entry)
    model, args, kwargs = built if built is not None else entry.build(full=full)
    dyn = batch_dynamic_shapes(model, args, kwargs)
    ep = torch.export.export(model, tuple(args), dict(kwargs), dynamic_shapes=dyn, strict=False)
    if decompose:
        ep = ep.run_decompositions(decomposition_table())
    return ep


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
