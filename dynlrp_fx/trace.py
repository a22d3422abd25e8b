"""Tracing: ``nn.Module`` + example inputs -> Core-ATen FX graph with a dynamic batch dimension.

We use non-strict :func:`torch.export.export` (the tracing path that handles CNNs and Hugging Face models such
as BERT, GPT-2 and Llama with a dynamic batch) followed by :meth:`ExportedProgram.run_decompositions` with the
default Core-ATen table *minus* scaled-dot-product attention, which keeps SDPA as one op with an explicit LRP rule
(its decomposition breaks some models, and the VJP of the fused CPU kernel does not match a decomposed forward,
which gives wrong relevance). See ``docs/design.md`` (section 2, "Tracing").

The model is never modified: during export it is put in eval mode (LRP explains the inference function: batch
norm uses running statistics, dropout is off) and every submodule's ``training`` flag is restored afterwards.
"""

from __future__ import annotations

import inspect
import linecache
import os
import re
import traceback
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch import nn

from .errors import DynlrpTraceError

__all__ = ["TracedProgram", "UserInput", "trace", "decomposition_table"]

_PKG_DIR = os.path.dirname(os.path.abspath(__file__))
_TORCH_DIR = os.path.dirname(os.path.abspath(torch.__file__))

#: ops kept whole (not decomposed) because they get explicit rules.
KEEP_WHOLE = tuple(
    op
    for op in (
        getattr(torch.ops.aten.scaled_dot_product_attention, "default", None),
        getattr(getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None), "default", None),
    )
    if op is not None
)


def decomposition_table() -> dict:
    """The Core-ATen decomposition table used for tracing: torch's default minus SDPA (:data:`KEEP_WHOLE`), plus
    custom ops traced through their implementation and ATen ops torch leaves whole
    (:func:`dynlrp_fx.decompositions.extra_decompositions`)."""
    from .decompositions import extra_decompositions

    table = torch.export.default_decompositions()
    for op in KEEP_WHOLE:
        table.pop(op, None)
    table.update(extra_decompositions())
    return table


@dataclass
class UserInput:
    """One tensor leaf of the model's inputs, as a placeholder of the traced graph."""

    name: str  #: forward-parameter name (``x``, ``input_ids``; nested leaves as ``x[0]``)
    placeholder: str  #: placeholder node name in the graph
    dtype: torch.dtype
    ndim: int
    batched: bool  #: dimension 0 is the (dynamic) batch dimension

    @property
    def is_float(self) -> bool:
        return self.dtype.is_floating_point or self.dtype.is_complex


@dataclass
class TracedProgram:
    """The result of :func:`trace`: a Core-ATen graph plus what is needed to call it."""

    graph_module: torch.fx.GraphModule
    exported: torch.export.ExportedProgram
    state_specs: list[tuple[str, str, str]]  #: (placeholder name, kind, target) for params/buffers/constants
    user_inputs: list[UserInput]
    in_spec: pytree.TreeSpec
    const_leaves: dict[int, Any]  #: flat index -> non-tensor leaf value the program specialised on
    tensor_leaf_index: list[int]  #: flat index of each user input in the flattened (args, kwargs)
    output_index: int  #: index of the explained leaf among the graph's user outputs
    output_name: str
    output_names: list[str]
    module_root: nn.Module  #: the module whose parameters/buffers the state specs name (model or wrapper)
    batch_symbol: Any = None  #: sympy symbol (or int) of the batch size in the graph's fake values
    static_batch: int | None = None  #: set when the model specialised the batch size during tracing
    max_batch: int | None = None  #: largest batch the graph is valid for, when the model's ops bound it
    example_flat: list[Any] = field(default_factory=list)


class _OutputWrapper(nn.Module):
    """Applies a user callable to the model output so that it becomes part of the traced graph.

    Called as ``wrapper(args, kwargs)``: two plain parameters rather than ``*args, **kwargs``, whose dynamic
    shapes torch 2.11's export mis-combines ("Must provide a tree_name"). The flat input order is unchanged.
    """

    def __init__(self, model: nn.Module, fn: Callable[[Any], torch.Tensor]):
        super().__init__()
        self.model = model
        self.fn = fn

    def forward(self, args, kwargs):
        return self.fn(self.model(*args, **kwargs))


def tensor_outputs(out: Any) -> Any:
    """A model output without its non-tensor parts: mappings (a Hugging Face ``ModelOutput``) keep their tensor
    entries under their names, tuples and lists their tensor items; anything else (a ``DynamicCache``, ``None``, a
    string) is left out. ``None`` when nothing is left."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, Mapping):
        kept = {k: tensor_outputs(v) for k, v in out.items()}
        kept = {k: v for k, v in kept.items() if v is not None}
        if not kept:
            return None
        try:  # the same output class (a ModelOutput), so outputs keep their names (``logits``)
            return type(out)(**kept)
        except TypeError:
            return kept
    if isinstance(out, (list, tuple)):
        kept = [v for v in map(tensor_outputs, out) if v is not None]
        return tuple(kept) or None
    return None


def _non_tensor_output(exc: BaseException) -> bool:
    """Whether ``torch.export`` failed on an output of a type it cannot flatten (``Found <class ...> in output``)."""
    while exc is not None:
        if "in output, which is not a known type" in str(exc):
            return True
        exc = exc.__cause__
    return False


def _wrapper_dynamic_shapes(fn_sig: inspect.Signature, args: tuple, kwargs: dict, spec: Any) -> dict:
    """Re-key a user ``dynamic_shapes`` given for the model's signature to the wrapper's ``(args, kwargs)``."""
    if spec is None:
        return None
    if isinstance(spec, (tuple, list)):
        spec = list(spec)
        return {"args": tuple(spec[: len(args)]), "kwargs": dict(zip(kwargs, spec[len(args) :]))}
    params = [p.name for p in fn_sig.parameters.values()]
    return {
        "args": tuple(spec.get(params[i]) if i < len(params) else None for i in range(len(args))),
        "kwargs": {k: spec.get(k) for k in kwargs},
    }


def _user_frame(exc: BaseException) -> tuple[str, int, str] | None:
    """The innermost traceback frame of the exception that lies in user code (not torch, not dynlrp_fx)."""
    found = None
    tb = exc.__traceback__
    for frame, lineno in traceback.walk_tb(tb):
        fname = os.path.abspath(frame.f_code.co_filename)
        if fname.startswith(_TORCH_DIR) or fname.startswith(_PKG_DIR) or "<" in fname:
            continue
        if "/site-packages/" in fname and "/transformers/" not in fname and "/torchvision/" not in fname:
            continue
        found = (fname, lineno, linecache.getline(fname, lineno).strip())
    if found is None and exc.__cause__ is not None and exc.__cause__ is not exc:
        return _user_frame(exc.__cause__)
    return found


def _trace_error(exc: BaseException) -> DynlrpTraceError:
    where = _user_frame(exc)
    text = str(exc).strip().splitlines()
    first = text[0] if text else type(exc).__name__
    lines = [f"torch.export could not trace the model: {type(exc).__name__}: {first}"]
    if where is not None:
        fname, lineno, src = where
        lines.append(f'  at {fname}, line {lineno}:\n      {src}')
    msg = str(exc)
    if "data-dependent" in msg.lower() or "GuardOnDataDependent" in type(exc).__name__ or "Could not guard" in msg:
        lines.append(
            "This is Python control flow that depends on tensor values. LRP needs a static graph: move the "
            "branch out of forward(), make it depend on shapes only, or express it with torch.cond "
            "(dynlrp-fx rejects torch.cond subgraphs for now)."
        )
    elif "Constraints violated" in msg or "specializ" in msg.lower():
        lines.append(
            "The batch dimension could not stay dynamic (the model specialised it). Pass dynamic=False, or give "
            "dynamic_shapes= explicitly (torch.export format)."
        )
    else:
        lines.append("Check that the model runs on the example inputs and is exportable with torch.export.")
    return DynlrpTraceError("\n".join(lines))


def _suggested_max_batch(exc: BaseException) -> int | None:
    """The upper batch bound torch.export suggests when the model's ops bound the batch dimension
    (``Suggested fixes: batch = Dim('batch', max=N)``), or ``None``."""
    m = re.search(r"batch = Dim\('batch'(?:, min=\d+)?, max=(\d+)\)", str(exc))
    return int(m.group(1)) if m else None


def _default_dynamic_shapes(fn_sig: inspect.Signature, args: tuple, kwargs: dict, batch) -> Any:
    bound = fn_sig.bind(*args, **kwargs)
    out = {}

    def spec(v):
        if isinstance(v, torch.Tensor):
            return {0: batch} if v.ndim >= 1 else None
        if isinstance(v, (list, tuple)):
            return type(v)(spec(x) for x in v)
        if isinstance(v, dict):
            return {k: spec(x) for k, x in v.items()}
        return None

    for name, value in bound.arguments.items():
        param = fn_sig.parameters[name]
        if param.kind == inspect.Parameter.VAR_POSITIONAL:
            out[name] = tuple(spec(x) for x in value)
        elif param.kind == inspect.Parameter.VAR_KEYWORD:
            out[name] = {k: spec(x) for k, x in value.items()}
        else:
            out[name] = spec(value)
    return out


def _leaf_names(fn_sig: inspect.Signature, args: tuple, kwargs: dict) -> list[str]:
    """Human names for the leaves of pytree-flattened (args, kwargs), in flat order."""
    names: list[str] = []
    params = [
        p.name
        for p in fn_sig.parameters.values()
        if p.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    ]
    for i, a in enumerate(args):
        base = params[i] if i < len(params) else f"args[{i}]"
        for path, _ in pytree.tree_flatten_with_path(a)[0]:
            names.append(base + pytree.keystr(path))
    for k, v in kwargs.items():
        for path, _ in pytree.tree_flatten_with_path(v)[0]:
            names.append(k + pytree.keystr(path))
    return names


def _output_names(out_spec: pytree.TreeSpec, n: int) -> list[str]:
    struct = pytree.tree_unflatten(list(range(n)), out_spec)
    names = [""] * n
    try:
        flat = [(pytree.keystr(path), idx) for path, idx in pytree.tree_flatten_with_path(struct)[0]]
    except ValueError:  # a pytree node registered without key paths (transformers < 5's ModelOutput)
        flat = list(zip(_spec_paths(out_spec), range(n)))
    for s, idx in flat:
        names[idx] = s.lstrip(".") if s else "output"
    return names


def _spec_paths(spec: pytree.TreeSpec, prefix: str = "") -> list[str]:
    """Leaf paths of a TreeSpec in ``keystr`` style, from its context: ``['key']`` for string keys, else ``[i]``."""
    if spec.is_leaf():
        return [prefix]
    ctx = spec.context
    keys = list(ctx) if isinstance(ctx, (list, tuple)) and len(ctx) == spec.num_children else None
    children = spec.children() if callable(getattr(spec, "children", None)) else spec.children_specs  # torch < 2.10
    out = []
    for i, child in enumerate(children):
        key = keys[i] if keys is not None else i
        out += _spec_paths(child, prefix + (f"[{key!r}]" if isinstance(key, str) else f"[{i}]"))
    return out


def _select_output(output: Any, names: list[str], n_user: int) -> int:
    def norm(s: str) -> str:
        return s.strip(".").replace("['", "").replace("']", "")

    if output is None:
        for i, nm in enumerate(names):
            if norm(nm) == "logits":
                return i
        return 0
    if isinstance(output, int):
        if not -n_user <= output < n_user:
            raise ValueError(f"output={output} is out of range: the model has {n_user} tensor outputs {names}")
        return output % n_user
    if isinstance(output, str):
        for i, nm in enumerate(names):
            if norm(nm) == output or nm == output:
                return i
        raise ValueError(f"output={output!r} is not an output of the model; tensor outputs are {[norm(n) for n in names]}")
    raise TypeError(f"output= must be None, an int, a str or a callable, not {type(output).__name__}")


def _maybe_grow_batch(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """torch.export specialises size-1 dims: trace a batch of 1 as a batch of 2 (the sample repeated)."""
    leaves = [x for x in pytree.tree_leaves((args, kwargs)) if isinstance(x, torch.Tensor) and x.ndim >= 1]
    if not leaves or any(x.shape[0] != 1 for x in leaves):
        return args, kwargs
    return pytree.tree_map(
        lambda x: torch.cat([x, x], 0) if isinstance(x, torch.Tensor) and x.ndim >= 1 else x, (args, kwargs)
    )


def trace(
    model: nn.Module,
    example_inputs: tuple = (),
    example_kwargs: dict | None = None,
    *,
    output: Any = None,
    dynamic: bool = True,
    dynamic_shapes: Any = None,
) -> TracedProgram:
    """Trace ``model`` to a Core-ATen FX graph.

    Parameters
    ----------
    model:
        Any ``nn.Module``; it is left untouched (training flags are restored after export).
    example_inputs, example_kwargs:
        Positional and keyword example inputs (e.g. ``input_ids=..., attention_mask=...``).
    output:
        Which model output is explained: ``None`` (``logits`` if present, else the first tensor), an output
        name (``"logits"``), a flat index, or a callable applied to the model output (traced with the model).
    dynamic:
        Make dimension 0 of every tensor input a shared dynamic batch dimension.
    dynamic_shapes:
        Explicit ``torch.export`` dynamic shapes (overrides ``dynamic``).

    Returns
    -------
    TracedProgram
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"dynlrp: model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(example_inputs, tuple):
        example_inputs = (example_inputs,)
    kwargs = dict(example_kwargs or {})
    args = example_inputs
    if dynamic and dynamic_shapes is None:
        args, kwargs = _maybe_grow_batch(args, kwargs)
    fn_sig = inspect.signature(model.forward)
    try:
        fn_sig.bind(*args, **kwargs)
    except TypeError as e:
        raise DynlrpTraceError(f"example inputs do not match {type(model).__name__}.forward{fn_sig}: {e}") from None

    root: nn.Module = model
    export_args, export_kwargs = args, kwargs
    user_fn = callable(output) and not isinstance(output, (str, int))
    if user_fn:
        root = _OutputWrapper(model, output)
        export_args, export_kwargs = (args, kwargs), {}
    try:
        ep, max_batch = _export(model, root, export_args, export_kwargs,
                                _wrapper_dynamic_shapes(fn_sig, args, kwargs, dynamic_shapes) if user_fn else dynamic_shapes,
                                dynamic)
    except DynlrpTraceError as e:
        if user_fn or not _non_tensor_output(e):
            raise
        # the model returns objects that are not tensors (the key/value cache of a generative model built with its
        # default use_cache=True): trace it with those outputs left out; they carry no relevance
        root = _OutputWrapper(model, tensor_outputs)
        export_args, export_kwargs = (args, kwargs), {}
        ep, max_batch = _export(model, root, export_args, export_kwargs,
                                _wrapper_dynamic_shapes(fn_sig, args, kwargs, dynamic_shapes), dynamic)
    gm = ep.graph_module
    _reject_higher_order_ops(gm)
    state_specs, user_ph = _split_placeholders(ep)
    flat, in_spec = pytree.tree_flatten((args, kwargs))
    names = _leaf_names(fn_sig, args, kwargs)
    tensor_idx = [i for i, x in enumerate(flat) if isinstance(x, torch.Tensor)]
    const_leaves = {i: x for i, x in enumerate(flat) if not isinstance(x, torch.Tensor)}
    if len(user_ph) == len(flat) and const_leaves:
        user_ph = _inline_constants(gm, user_ph, const_leaves)
    if len(tensor_idx) != len(user_ph):
        raise DynlrpTraceError(
            f"internal: {len(tensor_idx)} tensor inputs but {len(user_ph)} user placeholders in the exported graph"
        )
    user_inputs, batch_symbol = _user_inputs(user_ph, tensor_idx, flat, names)

    sig = ep.graph_signature
    n_user = sum(1 for s in sig.output_specs if s.kind.name == "USER_OUTPUT")
    out_names = _output_names(ep.call_spec.out_spec, n_user)
    out_index = _select_output(None if user_fn else output, out_names, n_user)
    static_batch = _specialised_batch(gm, out_index, batch_symbol, flat[tensor_idx[0]] if tensor_idx else None)
    if static_batch is not None:
        batch_symbol = static_batch
        warnings.warn(
            f"{type(model).__name__} specialised its batch size to {static_batch} during tracing; the explainer "
            f"accepts batches of exactly {static_batch} samples.",
            stacklevel=3,
        )
    return TracedProgram(
        graph_module=gm,
        exported=ep,
        state_specs=state_specs,
        user_inputs=user_inputs,
        in_spec=in_spec,
        const_leaves=const_leaves,
        tensor_leaf_index=tensor_idx,
        output_index=out_index,
        output_name=out_names[out_index],
        output_names=out_names,
        module_root=root,
        batch_symbol=batch_symbol,
        static_batch=static_batch,
        max_batch=max_batch,
        example_flat=flat,
    )


def _export(model: nn.Module, root: nn.Module, args: tuple, kwargs: dict, dynamic_shapes: Any,
            dynamic: bool) -> tuple[torch.export.ExportedProgram, int | None]:
    """``torch.export`` (non-strict) of ``root`` in eval mode, decomposed to Core ATen; ``(program, max_batch)``.

    With the default dynamic shapes (dimension 0 of every tensor input is one ``batch`` dimension) a model whose
    ops bound the batch (cuDNN batch norm on CUDA: at most 65535) is traced again within the bound torch suggests,
    returned as ``max_batch``. Every submodule's ``training`` flag is restored afterwards.

    Torch's logging is quiet meanwhile: torch.export, dynamo, fake tensors and the symbolic-shape machinery log
    failures we handle (a first export retried within a batch bound, an error re-raised as
    :class:`DynlrpTraceError`) at ERROR level with a traceback, and data-dependent guards as warnings with graph
    dumps. While this function runs, every existing logger named ``torch._dynamo``, ``torch._export``,
    ``torch.export``, ``torch._subclasses``, ``torch._functorch``, ``torch._guards`` or ``torch.fx.experimental``
    (``symbolic_shapes``, ``recording``, ...), or below one of them, has its level raised to CRITICAL; the levels
    are restored exactly afterwards, also on errors. No other logging state changes (no logger is created, no
    handler or filter touched). The logs stay on when the user asked for them: the environment variable
    ``TORCH_LOGS`` is set (non-empty), or ``DYNLRP_VERBOSE=1``."""
    import contextlib
    import logging

    @contextlib.contextmanager
    def quiet_torch_logs():
        verbose = os.environ.get("DYNLRP_VERBOSE", "").strip().lower() not in ("", "0", "false", "no", "off")
        if os.environ.get("TORCH_LOGS", "").strip() or verbose:
            yield
            return
        prefixes = ("torch._dynamo", "torch._export", "torch.export", "torch._subclasses", "torch._functorch",
                    "torch._guards", "torch.fx.experimental")
        saved = [
            (lg, lg.level)
            for name, lg in list(logging.Logger.manager.loggerDict.items())
            if isinstance(lg, logging.Logger) and any(name == p or name.startswith(p + ".") for p in prefixes)
        ]
        try:
            for lg, level in saved:
                lg.setLevel(max(level, logging.CRITICAL))
            yield
        finally:
            for lg, level in reversed(saved):
                lg.setLevel(level)

    default_shapes = dynamic_shapes is None and dynamic

    def batch_shapes(max_batch: int | None) -> Any:
        dim = torch.export.Dim("batch", min=1) if max_batch is None else torch.export.Dim("batch", min=1, max=max_batch)
        return _default_dynamic_shapes(inspect.signature(root.forward), args, kwargs, dim)

    if default_shapes:
        dynamic_shapes = batch_shapes(None)
    max_batch = None
    flags = [(m, m.training) for m in model.modules()]
    with quiet_torch_logs():
        try:
            model.eval()

            def export(shapes: Any) -> torch.export.ExportedProgram:
                return torch.export.export(root, args, kwargs, dynamic_shapes=shapes, strict=False)

            try:
                try:
                    ep = export(dynamic_shapes)
                except Exception as e:  # noqa: BLE001
                    max_batch = _suggested_max_batch(e) if default_shapes else None
                    if max_batch is None:
                        raise
                    ep = export(batch_shapes(max_batch))
            except Exception as e:  # noqa: BLE001 - re-raised with a clear message
                raise _trace_error(e) from e
            if root is not model and hasattr(ep, "_guards_code"):
                ep._guards_code = []  # guards on the wrapper's **kwargs (L['kwargs'][...]) break run_decompositions
            try:
                ep = ep.run_decompositions(decomposition_table())
            except Exception as e:  # noqa: BLE001
                raise DynlrpTraceError(f"decomposing the exported graph to Core ATen failed: {type(e).__name__}: {e}") from e
        finally:
            for m, t in flags:
                m.training = t
    return ep, max_batch


def _reject_higher_order_ops(gm: torch.fx.GraphModule) -> None:
    """Raise for ``torch.cond`` / ``while_loop`` / ``map`` subgraphs, which relevance cannot pass yet."""
    for node in gm.graph.nodes:
        if node.op == "call_function" and "torch.ops.higher_order" in str(node.target.__module__ if hasattr(node.target, "__module__") else ""):
            raise DynlrpTraceError(
                f"the traced graph contains the higher-order op {node.target} (node {node.name}); dynlrp-fx does not "
                "propagate relevance through torch.cond / while_loop / map subgraphs yet. Move the data-dependent "
                "branch out of the explained forward pass."
            )


def _split_placeholders(ep: torch.export.ExportedProgram) -> tuple[list[tuple[str, str, str]], list[torch.fx.Node]]:
    """``(state specs, user-input placeholders)``: (name, kind, target) of every parameter, buffer and constant."""
    placeholders = [n for n in ep.graph_module.graph.nodes if n.op == "placeholder"]
    state_specs: list[tuple[str, str, str]] = []
    user_ph: list[torch.fx.Node] = []
    for spec, ph in zip(ep.graph_signature.input_specs, placeholders):
        kind = spec.kind.name
        if kind == "USER_INPUT":
            user_ph.append(ph)
        elif kind in ("PARAMETER", "BUFFER", "CONSTANT_TENSOR"):
            state_specs.append((ph.name, kind, spec.target))
        else:
            raise DynlrpTraceError(f"unsupported exported input kind {kind} for placeholder {ph.name}")
    return state_specs, user_ph


def _inline_constants(gm: torch.fx.GraphModule, user_ph: list, const_leaves: dict[int, Any]) -> list:
    """Non-tensor inputs (``use_cache=False``, ``None``...) that export kept as placeholders were specialised:
    inline their values and drop the placeholders; returns the remaining user placeholders."""
    for i, ph in enumerate(list(user_ph)):
        if i in const_leaves:
            value = const_leaves[i]
            for user in list(ph.users):
                user.args = torch.fx.node.map_arg(user.args, lambda a, ph=ph, v=value: v if a is ph else a)
                user.kwargs = torch.fx.node.map_arg(user.kwargs, lambda a, ph=ph, v=value: v if a is ph else a)
            gm.graph.erase_node(ph)
    gm.recompile()
    return [ph for i, ph in enumerate(user_ph) if i not in const_leaves]


def _user_inputs(user_ph: list, tensor_idx: list[int], flat: list, names: list[str]) -> tuple[list[UserInput], Any]:
    """The :class:`UserInput` of every tensor input, and the batch symbol (that of the first input whose dimension
    0 is symbolic; the first input's size when none is)."""
    batch_symbol = None
    user_inputs = []
    for i, ph in zip(tensor_idx, user_ph):
        val = ph.meta.get("val")
        dim0 = val.shape[0] if val is not None and val.ndim >= 1 else None
        batched = dim0 is not None and isinstance(dim0, torch.SymInt)
        if batched and batch_symbol is None:
            batch_symbol = dim0.node.expr
        user_inputs.append(UserInput(names[i], ph.name, flat[i].dtype, flat[i].ndim, batched))
    if batch_symbol is None and user_inputs and user_inputs[0].ndim >= 1:
        batch_symbol = int(flat[tensor_idx[0]].shape[0])
    return user_inputs, batch_symbol


def _specialised_batch(gm: torch.fx.GraphModule, out_index: int, batch_symbol: Any, first: Any) -> int | None:
    """The traced batch size when the model's code specialised it (shape arithmetic in Python: the inputs' batch
    is symbolic but the explained output's is not), else ``None``; the graph then only runs at that size."""
    out = next(n for n in gm.graph.nodes if n.op == "output").args[0][out_index]
    y_val = out.meta.get("val") if isinstance(out, torch.fx.Node) else None
    if (
        hasattr(batch_symbol, "free_symbols")
        and isinstance(y_val, torch.Tensor)
        and y_val.ndim >= 1
        and not isinstance(y_val.shape[0], torch.SymInt)
    ):
        return int(first.shape[0])
    return None
