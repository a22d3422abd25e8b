"""Models and inputs from the shell: ``--model MODULE:CALLABLE``, ``--input-shape B,...``, ``--input FILE``.

Shared by the ``export``, ``coverage`` and ``explain`` subcommands. Errors are :class:`DynlrpError` (or
``ValueError`` / ``FileNotFoundError`` for input files) whose messages name the flag (and the file).
"""

from __future__ import annotations

import argparse
import importlib
import os
import re
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import DynlrpError

__all__ = ["import_callable", "parse_shape", "model_from_args", "load_factory", "load_input"]


def import_callable(spec: str) -> Any:
    """``module:callable`` -> the callable (``torchvision:NAME`` means ``torchvision.models:NAME``).

    ``callable`` may be a dotted attribute path (``module:attr.attr``); modules of the working directory are
    importable, as with ``python -m``.

    Raises
    ------
    DynlrpError: the spec has no ``:``, or the module or attribute is missing.
    """
    if ":" not in spec:
        raise DynlrpError(f"--model {spec!r}: expected MODULE:CALLABLE, e.g. torchvision.models:resnet18")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())  # factories in the working directory, as with python -m
    mod_name, _, attr = spec.partition(":")
    candidates = [mod_name] + ([f"{mod_name}.models"] if mod_name == "torchvision" else [])
    for name in candidates:
        try:
            mod = importlib.import_module(name)
        except ImportError as e:
            raise DynlrpError(f"--model {spec!r}: cannot import {name}: {e}") from e
        obj = mod
        for part in attr.split("."):
            obj = getattr(obj, part, None)
            if obj is None:
                break
        if obj is not None:
            return obj
    raise DynlrpError(f"--model {spec!r}: {mod_name} has no attribute {attr!r}")


def parse_shape(text: str) -> tuple[int, ...]:
    """``"2,3,224,224"`` -> ``(2, 3, 224, 224)``; a :class:`DynlrpError` naming ``--input-shape`` otherwise."""
    try:
        shape = tuple(int(s) for s in text.split(","))
    except ValueError:
        raise DynlrpError(f"--input-shape {text!r}: expected comma-separated sizes such as 2,3,224,224") from None
    if not shape or any(s <= 0 for s in shape):
        raise DynlrpError(f"--input-shape {text!r}: expected positive sizes such as 2,3,224,224")
    return shape


def model_from_args(args: argparse.Namespace) -> tuple[nn.Module, tuple]:
    """``--model MODULE:CALLABLE --input-shape ... --dtype --seed`` -> (model in eval mode, random example inputs).

    Shared by the ``export`` and ``coverage`` subcommands.
    """
    dtype = getattr(torch, args.dtype, None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise DynlrpError(
            f"--dtype {args.dtype!r}: expected a floating dtype (float32, float64, bfloat16, "
            "float16); for token inputs use the Python API"
        )
    if not args.input_shape:
        raise DynlrpError("--model needs at least one --input-shape B,...")
    torch.manual_seed(args.seed)
    model = import_callable(args.model)()
    if not isinstance(model, nn.Module):
        raise DynlrpError(f"--model {args.model!r} returned {type(model).__name__}, not an nn.Module")
    model = model.to(dtype).eval()
    return model, tuple(torch.randn(parse_shape(s), dtype=dtype) for s in args.input_shape)


def load_factory(spec: str) -> nn.Module:
    """Import ``module:factory`` (or ``module:attr.attr``) and call it with no arguments; returns the model.

    The spec is resolved like ``dynlrp export --model`` (:func:`import_callable`); an ``nn.Module`` instance is
    returned as it is (in eval mode).

    Raises
    ------
    DynlrpError: the spec has no ``:``, the module or attribute is missing, or the factory returns no
        ``nn.Module``.
    """
    obj = import_callable(spec)
    model = obj if isinstance(obj, nn.Module) else obj()
    if not isinstance(model, nn.Module):
        raise DynlrpError(f"--model {spec!r} returned {type(model).__name__}, expected a torch.nn.Module")
    return model.eval()


def _load_problem(exc: BaseException) -> str:
    """The line of a ``torch.load`` / ``numpy.load`` failure that says what is wrong with the file."""
    text = str(exc)
    m = re.search(r"WeightsUnpickler error:\s*(.+?)(?:\n\s*\n|$)", text, re.S)
    if m:
        text = m.group(1)
    lines = [" ".join(ln.split()) for ln in text.splitlines() if ln.strip()]
    if not lines:
        return {"EOFError": "the file is empty or truncated"}.get(type(exc).__name__, type(exc).__name__)
    first = lines[0]
    cut = first.find(". ")
    return (first[:cut] if cut > 0 else first.rstrip(".")).strip()


def load_input(path: str | Path) -> torch.Tensor:
    """Load a ``.pt`` tensor (``torch.save``; read with ``torch.load(weights_only=True)``, so no pickled object is
    ever run) or a ``.npy`` array (``numpy.load(allow_pickle=False)``) as a tensor.

    Raises
    ------
    FileNotFoundError: there is no such file (the message names ``--input`` and the path).
    DynlrpError: the file cannot be read as a tensor (garbage, truncated, or pickled objects); the message names
        the file and says how to save an input.
    ValueError: the file holds something other than a tensor.
    """
    p = Path(path)
    if p.is_dir():
        raise FileNotFoundError(f"--input {p}: is a directory, not a .pt or .npy file")
    if not p.is_file():
        raise FileNotFoundError(f"--input {p}: no such file")
    if p.suffix == ".npy":
        import numpy as np

        try:
            return torch.from_numpy(np.load(p, allow_pickle=False))
        except (ValueError, OSError, EOFError) as e:
            raise DynlrpError(
                f"--input {p}: cannot read it with numpy.load: {_load_problem(e)}; save a plain numeric array with "
                "numpy.save(path, array)"
            ) from e
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - pickle, zip and EOF errors: one message naming the file
        raise DynlrpError(
            f"--input {p}: cannot read it with torch.load(weights_only=True): {_load_problem(e)}; save the input "
            "as a plain tensor with torch.save(tensor, path) (or a .npy array with numpy.save)"
        ) from e
    if not isinstance(obj, torch.Tensor):
        raise ValueError(f"--input {p}: expected a tensor saved with torch.save, got {type(obj).__name__}")
    return obj
