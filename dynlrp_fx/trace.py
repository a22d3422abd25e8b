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
from .runtime import symbol_ranges

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
    output_index: int  #: position of the (first) explained output in the graph's output node (after mutations)
    output_name: str
    output_names: list[str]
    module_root: nn.Module  #: the module whose parameters/buffers the state specs name (model or wrapper)
    batch_symbol: Any = None  #: sympy symbol (or int) of the batch size in the graph's fake values
    static_batch: int | None = None  #: set when the model specialised the batch size during tracing
    max_batch: int | None = None  #: largest batch the graph is valid for, when the model's ops bound it
    #: default-dynamic dimensions the model specialised, traced static (``{"batch": 5}``; ``-1`` for a size that is
    #: not one number)
    specialised: dict[str, int] = field(default_factory=dict)
    #: dynamic size symbol -> (min, max) as traced, where narrower than [2, inf] (see runtime.symbol_ranges)
    ranges: dict[str, tuple[int | None, int | None]] = field(default_factory=dict)
    example_flat: list[Any] = field(default_factory=list)
    #: positions of every explained output in the graph's output node, in seed order (``output=[...]``: several)
    output_indices: list[int] = field(default_factory=list)
    #: names of the explained outputs, in seed order (``logits``; ``start_logits``, ``end_logits``)
    explained_outputs: list[str] = field(default_factory=list)
    #: dimension 0 of the explained outputs is the input batch; ``False``: a 0-d output or one of another leading
    #: size (a score, a loss, nodes of a graph), explained as one sample per call
    output_batched: bool = True


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


def _raised_with(exc: BaseException | None, *texts: str) -> bool:
    """Whether ``exc`` or an exception it was raised from (its ``__cause__`` chain) says one of ``texts``."""
    while exc is not None:
        if any(t in str(exc) for t in texts):
            return True
        exc = exc.__cause__
    return False


def _non_tensor_output(exc: BaseException) -> bool:
    """Whether ``torch.export`` failed on an output of a type it cannot flatten (``Found <class ...> in output``)."""
    return _raised_with(exc, "in output, which is not a known type")


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


_FIX = re.compile(r"^\s*(\w+) = (.+?)\s*$")
_DIM_FIX = re.compile(r"Dim\('(\w+)'(?:, min=(\d+))?(?:, max=(\d+))?\)")


def _suggested_fixes(exc: BaseException) -> dict[str, Any]:
    """The fixes ``torch.export`` suggests after a constraint violation, per dimension name: an ``int`` (the
    model specialised that dimension to a constant), a ``(min, max)`` pair (its ops bound it: cuDNN batch norm),
    or ``None`` for a relation to other dimensions (the dimension is not kept dynamic); ``{}`` when there are
    none."""
    text = str(exc)
    if "Suggested fixes:" not in text:
        return {}
    fixes: dict[str, Any] = {}
    for line in text.split("Suggested fixes:", 1)[1].splitlines():
        m = _FIX.match(line)
        if m is None:
            if fixes:
                break
            continue
        name, rhs = m.groups()
        if re.fullmatch(r"-?\d+", rhs):
            fixes[name] = int(rhs)
        elif (d := _DIM_FIX.fullmatch(rhs)) is not None:
            fixes[name] = (int(d.group(2)) if d.group(2) else None, int(d.group(3)) if d.group(3) else None)
        else:  # a relation to other dimensions (``2*_s``, another name): the dimension is not kept dynamic
            fixes[name] = None
    return fixes


@dataclass
class _DynamicPlan:
    """Which input dimensions are traced as dynamic by default, and how export's suggestions narrow them.

    Dimension 0 of every tensor input is one shared ``batch``. Dimension 1 of an integer tensor of rank >= 2 (token
    ids, attention masks, token types, positions) is a sequence length: inputs of equal length there share one
    dimension (``seq``, ``seq_2`` for a second length, as an encoder-decoder's decoder ids). Sizes 0 and 1 are left
    static, because ``torch.export`` specialises them. The batch is a named ``Dim``: a batch the model specialises
    (``len(x)``) becomes static, a bound export finds is applied (both from export's suggested fixes). Lengths are
    ``Dim.AUTO``: export bounds them (``max_position_embeddings``), unifies equal ones and keeps specialised ones
    static by itself.
    """

    dims: dict[str, tuple[int | None, int | None]] = field(default_factory=dict)  #: name -> (min, max)
    static: dict[str, int] = field(default_factory=dict)  #: dimensions the model specialised -> traced size
    seq_sizes: dict[int, str] = field(default_factory=dict)  #: example length -> dimension name
    objects: dict[tuple, Any] = field(default_factory=dict, repr=False)  #: (name, min, max) -> Dim

    def apply(self, fixes: dict[str, Any]) -> bool:
        """Apply export's suggested fixes; ``False`` when none of them concerns a dimension of this plan (retrying
        would fail the same way)."""
        changed = False
        for name, fix in fixes.items():
            if name not in self.dims:
                continue
            changed = True
            if isinstance(fix, tuple):
                lo, hi = self.dims[name]
                self.dims[name] = (fix[0] if fix[0] is not None else lo, fix[1] if fix[1] is not None else hi)
            else:
                self.static[name] = fix if isinstance(fix, int) else -1
                del self.dims[name]
        return changed

    def dim(self, name: str) -> Any:
        """The ``Dim`` of a dimension name, ``None`` when it is static."""
        if name not in self.dims:
            return None
        if name.startswith("seq"):
            # Dim.AUTO: export keeps a length dynamic where it can, bounds it where the model's ops do (position
            # embeddings) and unifies lengths that must be equal, without failing and tracing again
            return torch.export.Dim.AUTO
        lo, hi = self.dims[name]
        key = (name, lo, hi)
        if key not in self.objects:  # one Dim object per name and range, shared by every input that has it
            self.objects[key] = torch.export.Dim(name, min=lo or 1, max=hi) if hi is not None else torch.export.Dim(name, min=lo or 1)
        return self.objects[key]

    def leaf_spec(self, v: torch.Tensor) -> dict[int, Any] | None:
        """``{dim: Dim}`` of one tensor input."""
        if not isinstance(v, torch.Tensor) or v.ndim == 0:
            return None
        out = {}
        if v.shape[0] >= 2 and (d := self.dim("batch")) is not None:
            out[0] = d
        if v.ndim >= 2 and not (v.dtype.is_floating_point or v.dtype.is_complex or v.dtype == torch.bool):
            n = int(v.shape[1])
            if n >= 2:
                if n not in self.seq_sizes:
                    self.seq_sizes[n] = "seq" if not self.seq_sizes else f"seq_{len(self.seq_sizes) + 1}"
                    if self.seq_sizes[n] not in self.static:
                        self.dims.setdefault(self.seq_sizes[n], (2, None))
                if (d := self.dim(self.seq_sizes[n])) is not None:
                    out[1] = d
        return out or None

    @classmethod
    def default(cls, static: frozenset[str] = frozenset()) -> _DynamicPlan:
        """Batch and sequence lengths dynamic (sequence dimensions are added as inputs are seen), except the
        dimension names in ``static`` (known to be specialised by the model)."""
        plan = cls(static={name: -1 for name in static})
        if "batch" not in static:
            plan.dims["batch"] = (1, None)
        return plan


def dynamic_shapes_for(fn_sig: inspect.Signature, args: tuple, kwargs: dict,
                       leaf_spec: Callable[[torch.Tensor], Any]) -> dict:
    """``torch.export`` dynamic shapes for ``(args, kwargs)`` keyed like the signature ``fn_sig``: ``leaf_spec``
    gives each tensor's ``{dim: Dim}`` (or ``None``); nested tuples, lists and dicts follow the input's structure,
    ``*args``/``**kwargs`` parameters get a tuple/dict. Used with a :class:`_DynamicPlan` by :func:`trace` and with
    a batch-only rule by :func:`dynlrp_fx.zoo.batch_dynamic_shapes`."""
    bound = fn_sig.bind(*args, **kwargs)
    out = {}

    def spec(v):
        if isinstance(v, torch.Tensor):
            return leaf_spec(v)
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


def _norm_name(name: str) -> str:
    """An output name as users write it: ``['start_logits']`` -> ``start_logits`` (tuple positions stay ``[1]``)."""
    return name.strip(".").replace("['", "").replace("']", "")


def _is_float_output(v: Any) -> bool:
    """Whether a graph output entry is a floating tensor (the only kind of output that carries relevance)."""
    val = v.meta.get("val") if isinstance(v, torch.fx.Node) else None
    return isinstance(val, torch.Tensor) and (val.dtype.is_floating_point or val.dtype.is_complex)


def _describe_output(v: Any) -> str:
    """``tensor float32 (2, 4)`` / ``tensor int64 (2,)`` / ``None`` / ``str 'hi'``: what a user output is."""
    val = v.meta.get("val") if isinstance(v, torch.fx.Node) else None
    if isinstance(val, torch.Tensor):  # dynamic sizes as traced (the example's)
        shape = tuple(int(s.node.hint) if isinstance(s, torch.SymInt) and s.node.hint is not None else s
                      for s in val.shape)
        return f"tensor {str(val.dtype).replace('torch.', '')} {shape}"
    return repr(v) if v is None else f"{type(v).__name__} {v!r}"


def _select_output(output: Any, names: list[str], vals: list[Any]) -> list[int]:
    """The user outputs to explain, as indices into ``names``/``vals`` (the user outputs in flat order).

    ``None``: ``logits`` when it is a floating tensor, else the first floating tensor (integer and bool outputs,
    such as an argmax, and non-tensor outputs carry no relevance and are skipped). A name or a flat index selects
    one output, a list or tuple of them several (seeded together, one relevance sweep). Naming an output that is
    not a floating tensor is an error.
    """
    listing = ", ".join(f"{_norm_name(nm)}: {_describe_output(v)}" for nm, v in zip(names, vals)) or "(none)"
    if output is None:
        floats = [i for i, v in enumerate(vals) if _is_float_output(v)]
        if not floats:
            raise DynlrpTraceError(
                "the model returns no floating tensor, so there is nothing to explain (LRP explains a floating "
                f"output such as logits or a score). Its outputs: {listing}. Return the logits from forward(), or "
                "pass output= a callable that computes the floating tensor to explain from the model output."
            )
        return next(([i] for i in floats if _norm_name(names[i]) == "logits"), [floats[0]])
    if isinstance(output, (list, tuple)):
        if not output:
            raise ValueError("output= is an empty list; name at least one output to explain")
        chosen = [i for o in output for i in _select_output(o, names, vals)]
        dup = sorted({_norm_name(names[i]) for i in chosen if chosen.count(i) > 1})
        if dup:
            raise ValueError(f"output= names {dup} more than once; name each explained output once")
        return chosen
    if isinstance(output, bool) or not isinstance(output, (int, str)):
        raise TypeError(
            f"output= must be None, an int, a str, a list of them or a callable, not {type(output).__name__}"
        )
    if isinstance(output, int):
        if not -len(vals) <= output < len(vals):
            raise ValueError(f"output={output} is out of range: the model has {len(vals)} outputs ({listing})")
        i = output % len(vals)
    else:
        i = next((k for k, nm in enumerate(names) if _norm_name(nm) == output or nm == output), None)
        if i is None:
            raise ValueError(f"output={output!r} is not an output of the model; its outputs are {listing}")
    if not _is_float_output(vals[i]):
        raise DynlrpTraceError(
            f"output={output!r} selects {_norm_name(names[i])!r}, which is a {_describe_output(vals[i])}: only "
            f"floating tensors carry relevance. Choose a floating output (the model's outputs: {listing})."
        )
    return [i]


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
    static_dims: frozenset[str] = frozenset(),
) -> TracedProgram:
    """Trace ``model`` to a Core-ATen FX graph.

    Parameters
    ----------
    model:
        Any ``nn.Module``; it is left untouched (training flags are restored after export).
    example_inputs, example_kwargs:
        Positional and keyword example inputs (e.g. ``input_ids=..., attention_mask=...``).
    output:
        Which model output is explained: ``None`` (``logits`` if present, else the first floating tensor), an
        output name (``"logits"``), a flat index, a list of names/indices (several outputs, seeded together), or
        a callable applied to the model output (traced with the model). Mutation outputs (updated buffers,
        mutated inputs) are never explained; see :func:`_select_output`.
    dynamic:
        Trace the batch (dimension 0 of every tensor input, shared) and the sequence lengths (dimension 1 of
        integer inputs of rank >= 2: token ids, masks) as dynamic dimensions. Dimensions the model specialises
        (``len(x)``, Python arithmetic on a size) are traced static; they are listed in
        :attr:`TracedProgram.specialised`. ``False`` traces every size as given.
    dynamic_shapes:
        Explicit ``torch.export`` dynamic shapes (overrides ``dynamic``).
    static_dims:
        Names of default-dynamic dimensions (``"batch"``, ``"seq"``) to trace static from the start: the
        :attr:`TracedProgram.specialised` of an earlier trace of the same model, which saves the failed attempts.

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
    fn_sig = inspect.signature(model.forward)
    try:
        fn_sig.bind(*args, **kwargs)
    except TypeError as e:
        raise DynlrpTraceError(f"example inputs do not match {type(model).__name__}.forward{fn_sig}: {e}") from None
    if dynamic and dynamic_shapes is None and "batch" not in static_dims:
        grown_args, grown_kwargs = _maybe_grow_batch(args, kwargs)
        if grown_args is not args or grown_kwargs is not kwargs:
            try:
                return _trace_at(model, grown_args, grown_kwargs, fn_sig, output, dynamic, dynamic_shapes, static_dims)
            except DynlrpTraceError:
                # a model that refuses the doubled batch (a sequence classifier without a pad token takes one
                # sample only): trace the user's batch of 1, static; other batch sizes get programs of their own
                static_dims = static_dims | {"batch"}
    return _trace_at(model, args, kwargs, fn_sig, output, dynamic, dynamic_shapes, static_dims)


def _trace_at(model: nn.Module, args: tuple, kwargs: dict, fn_sig: inspect.Signature, output: Any, dynamic: bool,
              dynamic_shapes: Any, static_dims: frozenset[str]) -> TracedProgram:
    """:func:`trace` at these example inputs (already grown to a batch of 2 where that is wanted)."""
    root: nn.Module = model
    export_args, export_kwargs = args, kwargs
    user_fn = callable(output) and not isinstance(output, (str, int))
    if user_fn:
        root = _OutputWrapper(model, output)
        export_args, export_kwargs = (args, kwargs), {}
    try:
        ep, max_batch, plan = _export(model, root, export_args, export_kwargs,
                                _wrapper_dynamic_shapes(fn_sig, args, kwargs, dynamic_shapes) if user_fn else dynamic_shapes,
                                dynamic, static_dims)
    except DynlrpTraceError as e:
        if user_fn or not _non_tensor_output(e):
            raise
        # the model returns objects that are not tensors (the key/value cache of a generative model built with its
        # default use_cache=True): trace it with those outputs left out; they carry no relevance
        root = _OutputWrapper(model, tensor_outputs)
        export_args, export_kwargs = (args, kwargs), {}
        ep, max_batch, plan = _export(model, root, export_args, export_kwargs,
                                _wrapper_dynamic_shapes(fn_sig, args, kwargs, dynamic_shapes), dynamic, static_dims)
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
    # value ranges of the dynamic sizes as export left them: later passes (pair, lower) re-run fake kernels on this
    # graph's shape environment, and their guards may narrow a range that the traced program does not need
    ranges = symbol_ranges(ph.meta.get("val") for ph in user_ph)
    if plan is not None:  # lengths export kept static (Dim.AUTO specialised them) are known for later traces
        for ph, i in zip(user_ph, tensor_idx):
            x, val = flat[i], ph.meta.get("val")
            if (x.ndim >= 2 and int(x.shape[1]) in plan.seq_sizes and isinstance(val, torch.Tensor)
                    and not isinstance(val.shape[1], torch.SymInt)):
                plan.static.setdefault(plan.seq_sizes[int(x.shape[1])], int(x.shape[1]))

    # the graph's output node lists mutation outputs (new buffer values, mutated inputs) before the user outputs
    positions = [i for i, s in enumerate(ep.graph_signature.output_specs) if s.kind.name == "USER_OUTPUT"]
    out_names = _output_names(ep.call_spec.out_spec, len(positions))
    graph_outs = next(n for n in gm.graph.nodes if n.op == "output").args[0]
    selected = _select_output(None if user_fn else output, out_names, [graph_outs[p] for p in positions])
    out_indices = [positions[i] for i in selected]
    out_index = out_indices[0]
    static_batch = _specialised_batch(gm, out_indices, batch_symbol, flat[tensor_idx[0]] if tensor_idx else None)
    out_batched = _outputs_batched([graph_outs[p] for p in out_indices], [out_names[i] for i in selected],
                                   static_batch if static_batch is not None else batch_symbol)
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
        output_name=out_names[selected[0]],
        output_names=out_names,
        output_indices=out_indices,
        explained_outputs=[_norm_name(out_names[i]) for i in selected],
        output_batched=out_batched,
        module_root=root,
        batch_symbol=batch_symbol,
        static_batch=static_batch,
        max_batch=max_batch,
        example_flat=flat,
        specialised=dict(plan.static) if plan is not None else {},
        ranges=ranges,
    )


def _export(model: nn.Module, root: nn.Module, args: tuple, kwargs: dict, dynamic_shapes: Any,
            dynamic: bool, static_dims: frozenset[str] = frozenset()) -> tuple[torch.export.ExportedProgram, int | None, _DynamicPlan | None]:
    """``torch.export`` (non-strict) of ``root`` in eval mode, decomposed to Core ATen; ``(program, max_batch,
    plan)``.

    With the default dynamic shapes (:class:`_DynamicPlan`: batch and sequence lengths) the model is traced again
    with what export suggests when a dimension cannot stay as asked: a bound its ops set (cuDNN batch norm on CUDA
    bounds the batch to 65535, returned as ``max_batch``), a dimension it specialised (traced static). ``plan`` is
    the plan that traced (``None`` for user-given shapes). Every submodule's ``training`` flag is restored
    afterwards.

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

    plan = _DynamicPlan.default(static_dims) if dynamic_shapes is None and dynamic else None
    sig = inspect.signature(root.forward)
    flags = [(m, m.training) for m in model.modules()]
    with quiet_torch_logs():
        try:
            model.eval()
            try:
                ep = _export_with_plan(root, args, kwargs, plan, sig, dynamic_shapes)
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
    max_batch = plan.dims.get("batch", (None, None))[1] if plan is not None else None
    return ep, max_batch, plan


def _export_with_plan(root: nn.Module, args: tuple, kwargs: dict, plan: _DynamicPlan | None, sig: inspect.Signature,
                      dynamic_shapes: Any) -> torch.export.ExportedProgram:
    """``torch.export.export`` with the user's ``dynamic_shapes``, or with the default ``plan`` narrowed by export's
    own suggestions until it traces: a bound (``max_position_embeddings``), a dimension the model specialised (it
    becomes static), two dimensions that must be equal. A constraint violation that suggests nothing usable makes
    every dimension static (the explainer then builds a program per new shape)."""
    if plan is None:
        return torch.export.export(root, args, kwargs, dynamic_shapes=dynamic_shapes, strict=False)
    for _attempt in range(8):
        try:
            return torch.export.export(root, args, kwargs, dynamic_shapes=dynamic_shapes_for(sig, args, kwargs, plan.leaf_spec),
                                       strict=False)
        except Exception as e:  # noqa: BLE001
            if plan.apply(_suggested_fixes(e)):
                continue
            if not plan.dims or not _constraint_violation(e):
                raise
            plan.static.update({name: -1 for name in plan.dims})
            plan.dims.clear()
    return torch.export.export(root, args, kwargs, dynamic_shapes=None, strict=False)


def _constraint_violation(exc: BaseException) -> bool:
    """Whether ``torch.export`` failed because a dimension marked dynamic could not stay dynamic."""
    return _raised_with(exc, "Constraints violated", "specialized", "specialised")


def _reject_higher_order_ops(gm: torch.fx.GraphModule) -> None:
    """Raise for ``torch.cond`` / ``while_loop`` / ``map`` subgraphs, which relevance cannot pass yet."""
    for node in gm.graph.nodes:
        if node.op == "call_function" and "torch.ops.higher_order" in str(node.target.__module__ if hasattr(node.target, "__module__") else ""):
            if getattr(node.target, "__name__", "") == "with_effects" and len(node.args) > 1:
                from .passes.nodes import module_path

                raise DynlrpTraceError(
                    f"the traced graph contains {node.args[1]} (node {node.name}, module {module_path(node) or '<root>'!r}), an "
                    "op with side effects that torch.export wraps in with_effects (e.g. the error checks of "
                    "torch.linalg.inv/solve, a print or a custom op declared with effects); dynlrp-fx cannot pass "
                    "relevance through it. Use an equivalent without side effects (torch.linalg.inv_ex, "
                    "torch.linalg.solve_ex) or move it out of the explained forward pass."
                )
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
        # a static batch (the model specialised it, or dynamic=False): dimension 0 of the inputs of the first one's
        # size is still the batch, so per-sample targets and ledgers keep working at that size
        batch_symbol = int(flat[tensor_idx[0]].shape[0])
        for ui, i in zip(user_inputs, tensor_idx):
            ui.batched = ui.ndim >= 1 and int(flat[i].shape[0]) == batch_symbol
    return user_inputs, batch_symbol


def _specialised_batch(gm: torch.fx.GraphModule, out_indices: list[int], batch_symbol: Any, first: Any) -> int | None:
    """The traced batch size when the model's code specialised it, else ``None``; the graph then only runs at that
    size. Specialised means: the inputs' batch is symbolic, an explained output is entirely static with the example
    batch as dimension 0, and some op turned a value that carries the batch symbol into a static one of the example
    batch's size (shape arithmetic in Python). A static output that never came from the batch that way (an
    ``expand`` to a literal size) is simply not batched (see :func:`_outputs_batched`)."""
    if not hasattr(batch_symbol, "free_symbols") or first is None or first.ndim == 0:
        return None
    size = int(first.shape[0])

    def static_with_batch(v: Any) -> bool:
        return (isinstance(v, torch.Tensor) and v.ndim >= 1 and size in [int(s) for s in v.shape
                if not isinstance(s, torch.SymInt)] and not any(isinstance(s, torch.SymInt) for s in v.shape))

    def carries_batch(v: Any) -> bool:
        return isinstance(v, torch.Tensor) and any(
            isinstance(s, torch.SymInt) and batch_symbol in s.node.expr.free_symbols for s in v.shape)

    outs = next(n for n in gm.graph.nodes if n.op == "output").args[0]
    vals = [outs[i].meta.get("val") if isinstance(outs[i], torch.fx.Node) else None for i in out_indices]
    if not any(static_with_batch(v) and int(v.shape[0]) == size for v in vals):
        return None
    for n in gm.graph.nodes:
        if n.op == "call_function" and static_with_batch(n.meta.get("val")) and any(
                carries_batch(a.meta.get("val")) for a in n.all_input_nodes):
            return size
    return None


def _outputs_batched(outs: list[Any], names: list[str], batch: Any) -> bool:
    """Whether dimension 0 of the explained outputs is the input batch ``batch`` (a symbol, or an int for a static
    batch). ``False`` when none is: a 0-d score or loss, an output over the nodes of a graph, a ``chunk`` or
    ``diagonal`` along dimension 0; those are explained as one sample per call. Several outputs must agree, since
    their seeds add up per sample."""
    flags = []
    for v in outs:
        val = v.meta.get("val")
        d0 = val.shape[0] if val.ndim >= 1 else None
        d0 = d0.node.expr if isinstance(d0, torch.SymInt) else (int(d0) if d0 is not None else None)
        flags.append(batch is not None and d0 is not None and d0 == batch)
    if len(set(flags)) > 1:
        shapes = ", ".join(f"{_norm_name(n)} {tuple(v.meta['val'].shape)}" for n, v in zip(names, outs))
        raise DynlrpTraceError(
            f"output= mixes outputs whose dimension 0 is the batch with outputs that have none ({shapes}); their "
            "seeds cannot be added per sample. Explain them in separate explainers."
        )
    return flags[0]
