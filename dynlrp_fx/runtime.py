"""The call path shared by live and loaded explainers: bind and check inputs, build the target or seed, run a
program, unpack its outputs into an :class:`Explanation`.

:class:`CallSpec` says what a program accepts (the input structure, each tensor input's dtype and sizes, the
explained output's shape); it is built from a traced graph (:meth:`CallSpec.from_traced`) or from an exported
file's metadata (:meth:`CallSpec.from_metadata`). :class:`CallPath` turns ``(*args, target=, seed=, **kwargs)``
into program arguments, calls a *runner* (the live explainer's compiled program, or a loaded one) and returns the
:class:`Explanation`. Every check raises :class:`~dynlrp_fx.DynlrpInputError` saying what was wrong and what to do.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.utils._pytree as pytree

from .errors import DynlrpInputError, DynlrpShapeError

__all__ = ["Conservation", "Explanation", "InputSpec", "CallSpec", "CallPath", "Runner", "dim_spec", "is_symbol",
           "explain_first_that_fits"]


@dataclass
class Conservation:
    """Per-sample conservation ledger: ``seed == inputs + absorbed`` up to floating-point error."""

    seed: torch.Tensor  #: total seed relevance per sample (the explained logit for a target)
    inputs: torch.Tensor  #: sum of all input relevance per sample
    absorbed: torch.Tensor  #: relevance absorbed by biases, stabilisers, masks, per sample

    @property
    def error(self) -> torch.Tensor:
        """Per-sample ``|seed - inputs - absorbed| / max(|seed|, tiny)``."""
        denom = self.seed.abs().clamp_min(torch.finfo(self.seed.dtype).tiny)
        return (self.seed - self.inputs - self.absorbed).abs() / denom

    def __repr__(self) -> str:
        def f(t):
            return "[" + ", ".join(f"{v:.6g}" for v in t.detach().flatten().tolist()[:8]) + "]"

        return f"Conservation(seed={f(self.seed)}, inputs={f(self.inputs)}, absorbed={f(self.absorbed)})"


@dataclass
class Explanation:
    """Result of an explainer call.

    Attributes
    ----------
    output: the explained model output (e.g. the logits); with several explained outputs (``compile(...,
        output=["start_logits", "end_logits"])``) a dict name -> output.
    relevance: relevance of the first input, same shape (for token ids: one value per token).
    inputs: forward-parameter name -> relevance, for every input that receives relevance (float inputs; integer
        inputs that feed embeddings get the relevance of their embedding rows summed over the hidden dimension).
    absorbed: per-sample relevance absorbed by biases and stabilisers.
    conservation: the per-sample ledger (seed total, sum over inputs, absorbed). The seed total is the sum of
        the seeds of every explained output. For an output without a batch dimension (a 0-d score, an output over
        graph nodes) the call is one sample: the ledger's tensors have one entry, totals over the whole call.
    params: parameter name -> relevance of that parameter (shape of the parameter, summed over the batch); only
        with ``compile(..., params=...)``. See :func:`dynlrp_fx.compile` for the rule.
    captured: module path -> relevance of that module's output (shape of the output, per sample); only with
        ``compile(..., capture=...)``.

    With ``K`` targets per sample (``target=`` of shape ``(B, K)``, or ``seed=`` with a target axis after the
    batch) every relevance has a target axis after the batch (``relevance`` ``(B, K, *x.shape[1:])``), the ledger's
    tensors and ``absorbed`` are ``(B, K)``, ``params`` gain a leading ``K`` axis, and ``output`` is the model
    output once (batch ``B``). ``targets`` is then the ``(B, K)`` target tensor (``None`` for seeds).

    conditioned: with ``condition={path: features}``, module path -> the relevance that reached that module's
        output per feature, before the condition's mask (``(B, C)``, or ``(B, K, C)``).
    """

    output: torch.Tensor | dict[str, torch.Tensor]
    relevance: torch.Tensor | None
    inputs: dict[str, torch.Tensor]
    absorbed: torch.Tensor
    conservation: Conservation
    params: dict[str, torch.Tensor] = field(default_factory=dict)
    captured: dict[str, torch.Tensor] = field(default_factory=dict)
    targets: torch.Tensor | None = None
    conditioned: dict[str, torch.Tensor] = field(default_factory=dict)


def dim_spec(size: Any) -> int | str:
    """An int for a static size, else the name (expression) of the symbol of a dynamic one."""
    if isinstance(size, torch.SymInt):
        expr = size.node.expr
        return int(expr) if getattr(expr, "is_number", False) else str(expr)
    return int(size)


def symbol_ranges(values: Any) -> dict[str, tuple[int | None, int | None]]:
    """The value range of every single-symbol size of these fake tensors that is narrower than ``[2, inf]``
    (torch traces dynamic sizes as ``>= 2``; a size of 1 still runs, as the batch does, unless the range says
    more): ``{symbol: (min, max)}``, ``None`` for an open end."""
    out: dict[str, tuple[int | None, int | None]] = {}
    for v in values:
        for size in getattr(v, "shape", ()) if isinstance(v, torch.Tensor) else ():
            if not isinstance(size, torch.SymInt) or not is_symbol(name := str(size.node.expr)):
                continue
            try:
                rng = size.node.shape_env.var_to_range.get(size.node.expr)
                lo = int(rng.lower) if rng is not None and int(rng.lower) > 2 else None
                hi = int(rng.upper) if rng is not None and rng.upper.is_finite else None
            except (AttributeError, TypeError, ValueError, OverflowError):
                continue
            if lo is not None or hi is not None:
                out[name] = (lo, hi)
    return out


def is_symbol(dim: int | str) -> bool:
    """A dynamic size that is one symbol (``s0``), not an expression of several (``2*s0``)."""
    return isinstance(dim, str) and re.fullmatch(r"[A-Za-z_]\w*", dim) is not None


@dataclass
class InputSpec:
    """One tensor input of a program: its forward-parameter name, dtype and sizes (an int where the program is
    static in a dimension, a symbol name where it is dynamic), and whether dimension 0 is the batch."""

    name: str
    dtype: torch.dtype
    shape: list[int | str]
    batched: bool

    @property
    def ndim(self) -> int:
        return len(self.shape)


@dataclass
class CallSpec:
    """What a program accepts and returns, as far as the call path checks it.

    ``in_spec`` is the pytree structure of ``(args, kwargs)``; ``const_leaves`` the non-tensor leaves the program
    was specialised on (flat index -> value); ``tensor_leaf_index`` the flat index of each tensor input;
    ``max_batch`` the largest batch the model's ops allow; ``output_shape`` the explained output's sizes (as
    :class:`InputSpec` shapes; ``None`` when unknown); ``extra_specs`` (loaded files only): per seed mode the
    ``{"dtype", "shape"}`` the target/seed tensor must have; ``hint`` is added to size errors.

    ``output_names``/``output_shapes`` list every explained output when there are several (``output_name`` and
    ``output_shape`` are the first's); ``output_batched`` is false when dimension 0 of the explained output is not
    the batch (a 0-d score): a call is then one sample, with one target.
    """

    in_spec: Any
    const_leaves: dict[int, Any]
    tensor_leaf_index: list[int]
    inputs: list[InputSpec]
    output_name: str
    output_shape: list[int | str] | None = None
    max_batch: int | None = None
    static_batch: int | None = None
    extra_specs: dict[str, dict] | None = None
    hint: str = ""
    #: dynamic dimension name -> (min, max) it was traced for, where narrower than (1, unbounded)
    ranges: dict[str, tuple[int | None, int | None]] = field(default_factory=dict)
    output_names: list[str] = field(default_factory=list)
    output_shapes: list[list[int | str] | None] = field(default_factory=list)
    output_batched: bool = True

    @classmethod
    def from_traced(cls, traced: Any, graph: torch.fx.GraphModule, output: torch.fx.Node) -> CallSpec:
        """The call spec of a traced program: sizes from the fake values of ``graph``'s user-input placeholders
        (a model that specialised its batch size is static in dimension 0), the output's from ``output``."""
        vals = {n.name: n.meta.get("val") for n in graph.graph.nodes if n.op == "placeholder"}
        inputs = []
        for ui, i in zip(traced.user_inputs, traced.tensor_leaf_index):
            val = vals.get(ui.placeholder)
            shape = [dim_spec(s) for s in (val.shape if isinstance(val, torch.Tensor) else traced.example_flat[i].shape)]
            if traced.static_batch is not None and shape:
                shape[0] = traced.static_batch
            inputs.append(InputSpec(ui.name, ui.dtype, shape, ui.batched))
        y = output.meta.get("val")
        graph_outs = next(n for n in graph.graph.nodes if n.op == "output").args[0]
        ys = [graph_outs[i].meta.get("val") for i in (traced.output_indices or [traced.output_index])]
        hint = ""
        if traced.static_batch is not None:
            hint = f"This model specialised its batch size to {traced.static_batch} when traced."
        return cls(
            traced.in_spec, dict(traced.const_leaves), list(traced.tensor_leaf_index), inputs, traced.output_name,
            [dim_spec(s) for s in y.shape] if isinstance(y, torch.Tensor) else None, traced.max_batch,
            traced.static_batch, None, hint, ranges=dict(getattr(traced, "ranges", {})),
            output_names=list(traced.explained_outputs or [traced.output_name]),
            output_shapes=[[dim_spec(s) for s in v.shape] if isinstance(v, torch.Tensor) else None for v in ys],
            output_batched=bool(getattr(traced, "output_batched", True)),
        )

    @classmethod
    def from_metadata(cls, meta: dict, dtype: Callable[[str], torch.dtype]) -> CallSpec:
        """The call spec stored in an exported file's metadata (see :mod:`dynlrp_fx.export`); ``dtype`` maps a
        dtype name to a ``torch.dtype`` (and raises for unknown names)."""
        inputs = [InputSpec(s["name"], dtype(s["dtype"]), list(s["shape"]), bool(s["batched"])) for s in meta["inputs"]]
        return cls(
            pytree.treespec_loads(meta["in_spec"]),
            {int(k): v for k, v in meta["const_leaves"].items()},
            list(meta["tensor_leaf_index"]),
            inputs,
            meta["output"]["name"],
            meta["output"].get("shape"),
            meta.get("max_batch"),
            None,
            dict(meta["extra_inputs"]),
            "",
            ranges={str(k): (v[0], v[1]) for k, v in (meta.get("ranges") or {}).items()},
            output_names=[o["name"] for o in meta.get("outputs") or [meta["output"]]],
            output_shapes=[o.get("shape") for o in meta.get("outputs") or [meta["output"]]],
            output_batched=bool(meta.get("output_batched", True)),
        )

    @property
    def explained(self) -> list[tuple[str, list[int | str] | None]]:
        """``(name, shape)`` of every explained output, in seed order (one entry for a single output)."""
        if len(self.output_names) > 1:
            return list(zip(self.output_names, self.output_shapes))
        return [(self.output_name, self.output_shape)]

    def per_sample_numel(self, shape: list[int | str] | None | str = "first") -> int | None:
        """Entries of one sample of an output (what a target indexes), when static: the whole output when it has
        no batch dimension. ``shape`` defaults to the first explained output's."""
        shape = self.output_shape if shape == "first" else shape
        rest = (shape[1:] if self.output_batched else shape) if shape is not None else None
        if rest is None or not all(isinstance(d, int) for d in rest):
            return None
        return math.prod(rest)


def explain_first_that_fits(paths: list[CallPath], args: tuple, kwargs: dict, target: Any,
                            seed: Any, sweep_batch: int | None = None, condition: Any = None) -> tuple[Explanation, int]:
    """Explain with the first of ``paths`` whose program takes these input shapes (a live explainer and those it
    built for other shapes, or a loaded file's programs): ``(explanation, index of that path)``. Raises the first
    path's :class:`~dynlrp_fx.DynlrpShapeError` when none takes them; any other error at once."""
    first = None
    for i, path in enumerate(paths):
        try:
            return path.explain(args, kwargs, target, seed, sweep_batch, condition), i
        except DynlrpShapeError as e:
            first = first or e
    raise first


#: ``runner(mode, tensors, extra, batch) -> (outputs, ProgramOutputs)``: runs the program of a seed mode
Runner = Callable[[str, list, torch.Tensor, int], tuple]
#: ``multi_runner(mode, tensors, extra, batch, k, sweep_batch, condition) -> (outputs, ProgramOutputs)``: ``extra`` holds
#: ``batch * k`` rows (sample ``b``'s target ``j`` at row ``b * k + j``); the outputs are the explained outputs at
#: batch ``batch``, then ``seed_total``/``absorbed`` ``(batch, k)`` and every relevance ``(batch, k, ...)``
MultiRunner = Callable[..., tuple]


class CallPath:
    """Binds ``(*args, target=, seed=, **kwargs)`` to a program's arguments, runs it through ``runner`` and
    unpacks the outputs into an :class:`Explanation` (see the module doc)."""

    def __init__(self, spec: CallSpec, runner: Runner, multi_runner: MultiRunner | None = None):
        self.spec = spec
        self.runner = runner
        #: runs K targets with one forward pass (live explainers); without it the inputs are repeated K times
        self.multi_runner = multi_runner

    # -- inputs ---------------------------------------------------------------------------------------------------
    def bind(self, args: tuple, kwargs: dict) -> list[torch.Tensor]:
        """The tensor inputs of a call, checked against the spec: structure, non-tensor values, rank, dtype, batch
        bound, static sizes, and one size per dynamic dimension across inputs."""
        spec = self.spec
        flat, tree = pytree.tree_flatten((args, kwargs))
        if tree != spec.in_spec:
            raise DynlrpInputError(
                "the explainer was called with inputs of another structure than the example inputs it was compiled "
                f"with.\n  compiled with: {spec.in_spec}\n  called with:   {tree}\nPass the same positional and "
                "keyword inputs (only the batch size may change)."
            )
        for i, v in spec.const_leaves.items():
            if flat[i] is not v and flat[i] != v:
                raise DynlrpInputError(
                    f"non-tensor input #{i} is {flat[i]!r} but the program was compiled for {v!r}; recompile for "
                    "other values"
                )
        tensors = []
        sizes: dict[str, tuple[int, str]] = {}  # dynamic dimension -> (size, input that set it)
        for s, i in zip(spec.inputs, spec.tensor_leaf_index):
            x = flat[i]
            if not isinstance(x, torch.Tensor):
                raise DynlrpInputError(f"input {s.name!r} must be a tensor, got {type(x).__name__}")
            if x.ndim != s.ndim:
                raise DynlrpInputError(
                    f"input {s.name!r} has {x.ndim} dimensions {tuple(x.shape)}, expected {s.ndim} (shape "
                    f"{self._shape_text(s)})"
                )
            if x.dtype != s.dtype:
                raise DynlrpInputError(f"input {s.name!r} has dtype {x.dtype}, expected {s.dtype}")
            if x.device.type == "meta":
                raise DynlrpInputError(
                    f"input {s.name!r} is on the meta device (it has a shape but no values); pass real tensors"
                )
            if s.batched and x.ndim >= 1 and x.shape[0] == 0:
                raise DynlrpInputError(
                    f"input {s.name!r} has an empty batch (shape {tuple(x.shape)}); explain at least one sample"
                )
            if s.batched and spec.max_batch is not None and x.ndim >= 1 and x.shape[0] > spec.max_batch:
                raise DynlrpInputError(
                    f"input {s.name!r} has a batch of {x.shape[0]}, but this model's ops bound the batch to "
                    f"{spec.max_batch} (a torch guard found when tracing, e.g. cuDNN batch norm on CUDA); "
                    "explain it in chunks of at most that many samples"
                )
            for d, want in enumerate(s.shape):
                got = int(x.shape[d])
                if isinstance(want, int) and got != want:
                    dyn = [k for k, w in enumerate(s.shape) if not isinstance(w, int)]
                    raise DynlrpShapeError(
                        f"input {s.name!r} has shape {tuple(x.shape)}, but dimension {d} must be {want}: only "
                        f"dimensions {dyn} may differ from {self._shape_text(s)} (the program is static in the "
                        f"others). {spec.hint}".rstrip()
                    )
                lo, hi = spec.ranges.get(want, (None, None)) if isinstance(want, str) else (None, None)
                if (lo is not None and got < lo) or (hi is not None and got > hi):
                    raise DynlrpShapeError(
                        f"input {s.name!r} has size {got} in dimension {d}, outside the range [{lo or 1}, "
                        f"{'inf' if hi is None else hi}] the program was traced for (the model's ops bound it, e.g. "
                        f"its number of position embeddings). {spec.hint}".rstrip()
                    )
                if is_symbol(want):
                    prev = sizes.setdefault(want, (got, s.name))
                    if prev[0] != got:
                        raise DynlrpInputError(
                            f"input {s.name!r} dimension {d} is {got} but input {prev[1]!r} has {prev[0]} for the same "
                            f"dynamic dimension {want} (e.g. the batch size): give every input the same size there"
                        )
            tensors.append(x.detach())
        return tensors

    @staticmethod
    def _shape_text(s: InputSpec) -> str:
        return "(" + ", ".join(str(d) for d in s.shape) + ")"

    def batch_size(self, tensors: list[torch.Tensor]) -> int:
        """The batch of a call: dimension 0 of the first batched input (1 without one)."""
        src = next((x for x, s in zip(tensors, self.spec.inputs) if s.batched), None)
        return int(src.shape[0]) if src is not None else 1

    def per_output(self, value: Any, what: str) -> list[Any]:
        """``target=``/``seed=`` of an explainer with several explained outputs, one entry per output in seed order:
        ``None`` (the default for every output), a dict output name -> value (outputs left out get ``None``) or a
        tuple/list with one value per output."""
        names = [n for n, _ in self.spec.explained]
        if value is None:
            return [None] * len(names)
        if isinstance(value, Mapping):
            unknown = [k for k in value if k not in names]
            if unknown:
                raise DynlrpInputError(
                    f"{what}= names {unknown}, which are not explained outputs; this explainer explains {names}"
                )
            return [value.get(n) for n in names]
        if isinstance(value, (tuple, list)) and len(value) == len(names):
            return list(value)
        raise DynlrpInputError(
            f"this explainer explains {len(names)} outputs {names}: give {what}= as a dict output name -> {what} "
            f"(e.g. {{{names[0]!r}: ...}}) or a tuple with one {what} per output, not {type(value).__name__}"
        )

    def target_tensor(self, target: Any, batch: int, device: Any) -> torch.Tensor:
        """``target=`` as an int64 tensor (``-1``: argmax), checked against the output size: ``(batch,)`` for one
        output (an int or one integer per sample, as a list or an integer tensor; floats and bools are refused, not
        truncated), ``(batch, K)`` for ``K`` explained outputs (see :meth:`per_output`; column ``k`` is output
        ``k``'s). An output without a batch dimension is one sample: ``batch`` is then 1."""
        outs = self.spec.explained
        b = batch if self.spec.output_batched else 1
        if len(outs) == 1:
            return self._one_target(target, b, device, *outs[0])
        per = self.per_output(target, "target")
        return torch.stack([self._one_target(t, b, device, n, sh) for t, (n, sh) in zip(per, outs)], 1)

    def _one_target(self, target: Any, batch: int, device: Any, name: str, shape: Any) -> torch.Tensor:
        """The ``(batch,)`` target of one explained output."""
        if target is None:
            t = torch.full((batch,), -1, dtype=torch.long, device=device)
        elif isinstance(target, int) and not isinstance(target, bool):
            t = torch.full((batch,), int(target), dtype=torch.long, device=device)
        else:
            try:
                raw = target if isinstance(target, torch.Tensor) else torch.as_tensor(target)
            except (TypeError, ValueError, RuntimeError) as e:
                raise DynlrpInputError(
                    f"target={target!r} is not an index: give an int, None (argmax) or one int per sample ({e})"
                ) from None
            if raw.dtype == torch.bool or raw.dtype.is_floating_point or raw.dtype.is_complex:
                raise DynlrpInputError(
                    f"target must hold integer indices into each sample's output, got {raw.dtype} values "
                    f"{raw.flatten()[:8].tolist()}; give an int, None (argmax) or one int per sample"
                )
            t = raw.to(dtype=torch.long, device=device).reshape(-1)
            if t.numel() != batch and not self.spec.output_batched:
                raise DynlrpInputError(
                    f"target has {t.numel()} entries, but the explained output {name!r} (shape "
                    f"{tuple(shape or ())}) has no batch dimension, so a call is explained as one sample: give one "
                    "int (an index into the flattened output) or None (argmax)"
                )
            if t.numel() != batch:
                raise DynlrpInputError(f"target has {t.numel()} entries but the batch has {batch} samples")
        numel = self.spec.per_sample_numel(shape)
        if numel is not None and bool(((t >= numel) | (t < -1)).any()):
            where = "each sample's output" if self.spec.output_batched else "the output (flattened)"
            raise DynlrpInputError(
                f"target {t.tolist()} out of range for {name!r}: {where} has {numel} entries (use -1/None for argmax)"
            )
        return t

    def _expected_shape(self, shape: list[int | str], tensors: list[torch.Tensor]) -> list[int | None]:
        """``shape`` (a spec shape) in this call's sizes: static sizes as they are, a dynamic dimension as the size
        the bound inputs have there, ``None`` for one no input has (an expression of symbols)."""
        sizes = {w: int(x.shape[d]) for x, s in zip(tensors, self.spec.inputs) for d, w in enumerate(s.shape)
                 if is_symbol(w)}
        return [d if isinstance(d, int) else sizes.get(d) for d in shape]

    def seed_tensor(self, seed: Any, tensors: list[torch.Tensor], k: int | None = None) -> torch.Tensor:
        """``seed=`` checked: a floating tensor of the explained output's shape (static sizes as traced, sizes the
        output shares with a dynamic input dimension, such as the batch, as in this call's inputs). With ``K``
        explained outputs one seed per output (see :meth:`per_output`), packed into one ``(B, n_1 + ... + n_K)``
        tensor (each output's per-sample seed flattened; ``B`` is 1 for outputs without a batch dimension).

        With ``k`` targets per sample each seed has a target axis after the batch, ``(B, k, *out.shape[1:])``; the
        result then has ``B * k`` rows (sample ``b``'s target ``j`` at row ``b * k + j``)."""
        outs = self.spec.explained

        def one(p: Any, name: str, shape: Any) -> torch.Tensor:
            if k is None:
                return self._one_seed(p, tensors, name, shape)
            if not isinstance(p, torch.Tensor) or p.ndim < 2 or int(p.shape[1]) != k:
                got = tuple(p.shape) if isinstance(p, torch.Tensor) else type(p).__name__
                raise DynlrpInputError(
                    f"seed= for {name!r} is {got}; with {k} targets per sample give (batch, {k}, *output shape[1:])"
                )
            self._one_seed(p[:, 0], tensors, name, shape)  # dtype and the per-target shape
            return p.detach().reshape(int(p.shape[0]) * k, *p.shape[2:])

        if len(outs) == 1:
            return one(seed, *outs[0])
        per = self.per_output(seed, "seed")
        missing = [n for (n, _), p in zip(outs, per) if p is None]
        if missing:
            raise DynlrpInputError(
                f"seed= gives no seed for {missing}; give one for every explained output (zeros leave one out)"
            )
        checked = [one(p, n, sh) for p, (n, sh) in zip(per, outs)]
        b = checked[0].shape[0] if self.spec.output_batched and checked[0].ndim else 1
        stored = (self.spec.extra_specs or {}).get("seed", {}).get("dtype")
        dtype = getattr(torch, stored) if isinstance(stored, str) and hasattr(torch, stored) else None
        if not isinstance(dtype, torch.dtype):
            dtype = torch.promote_types(torch.result_type(*checked[:2]) if len(checked) > 1 else checked[0].dtype,
                                        torch.float32)
        return torch.cat([c.reshape(b, -1).to(dtype) for c in checked], 1)

    def _one_seed(self, seed: Any, tensors: list[torch.Tensor], name: str, shape: Any) -> torch.Tensor:
        """The checked seed of one explained output."""
        if not isinstance(seed, torch.Tensor):
            raise DynlrpInputError(
                f"seed= must be a tensor shaped like the explained output {name!r}, got {type(seed).__name__}"
            )
        if not seed.dtype.is_floating_point:
            raise DynlrpInputError(
                f"seed= must be a floating tensor (relevance values), got dtype {seed.dtype}; e.g. a one-hot "
                "seed as float: torch.nn.functional.one_hot(t, n).float()"
            )
        if shape is not None:
            want = self._expected_shape(shape, tensors)
            if seed.ndim != len(want) or any(w is not None and int(seed.shape[d]) != w for d, w in enumerate(want)):
                shown = tuple(w if w is not None else d for w, d in zip(want, shape))
                raise DynlrpInputError(
                    f"seed= has shape {tuple(seed.shape)}; expected the explained output's shape {shown} (one seed "
                    f"per output entry of every sample, output {name!r})"
                )
        return seed.detach()

    def _check_extra(self, mode: str, extra: torch.Tensor, tensors: list[torch.Tensor]) -> None:
        """Shape and dtype of the target/seed tensor against the file's spec (loaded explainers)."""
        spec = (self.spec.extra_specs or {}).get(mode)
        if spec is None:
            return
        want = self._expected_shape(spec["shape"], tensors)
        dt = getattr(torch, spec["dtype"], None)
        bad = extra.ndim != len(want) or extra.dtype != dt or any(
            w is not None and int(extra.shape[d]) != w for d, w in enumerate(want)
        )
        if bad:
            shown = tuple(w if w is not None else d for w, d in zip(want, spec["shape"]))
            raise DynlrpInputError(
                f"{mode}= has shape {tuple(extra.shape)} and dtype {extra.dtype}; expected shape {shown} and dtype "
                f"{dt} (shaped like the explained output {self.spec.output_name!r})"
            )

    # -- a call ---------------------------------------------------------------------------------------------------
    def explain(self, args: tuple, kwargs: dict, target: Any = None, seed: torch.Tensor | None = None,
                sweep_batch: int | None = None, condition: Any = None) -> Explanation:
        """Explain one call: see :meth:`dynlrp_fx.Explainer.forward`."""
        if target is not None and seed is not None:
            raise DynlrpInputError("give either target= or seed=, not both")
        tensors = self.bind(args, kwargs)
        rule = target if hasattr(target, "resolve") and callable(target.resolve) else None
        if rule is not None:  # a targets.TargetRule, e.g. each_token()
            target = self.resolve_target(rule, tensors)
            plan = self.prefix_plan(rule, tensors, target) if seed is None and condition is None else None
            if plan is not None:
                return rule.combine(self.explain_prefixes(tensors, target, plan, sweep_batch))
        k = self.targets_per_sample(target, seed)
        if condition is not None and k is None:  # one target per sample: the K = 1 path, without the target axis
            return _drop_target_axis(self.explain_targets(tensors, _with_axis(target), _with_axis(seed), 1,
                                                          sweep_batch, condition))
        if k is not None:
            expl = self.explain_targets(tensors, target, seed, k, sweep_batch, condition)
            return rule.combine(expl) if rule is not None and hasattr(rule, "combine") else expl
        batch = self.batch_size(tensors)
        device = tensors[0].device if tensors else None
        if seed is None:
            mode, extra = "target", self.target_tensor(target, batch, device)
        else:
            mode, extra = "seed", self.seed_tensor(seed, tensors)
        self._check_extra(mode, extra, tensors)
        outs, names = self.runner(mode, tensors, extra, batch)
        return self.unpack(outs, names)

    # -- several targets per sample -------------------------------------------------------------------------------
    def resolve_target(self, rule: Any, tensors: list[torch.Tensor]) -> torch.Tensor:
        """A :class:`~dynlrp_fx.targets.TargetRule` worked out for this call's inputs: ``(B, K)`` indices."""
        if len(self.spec.explained) > 1:
            raise DynlrpInputError(f"target={rule!r} needs a single explained output; this explainer explains "
                                   f"{[n for n, _ in self.spec.explained]}")
        shape = self._expected_shape(self.spec.output_shape, tensors) if self.spec.output_shape is not None else []
        try:
            return rule.resolve({s.name: x for s, x in zip(self.spec.inputs, tensors)}, shape)
        except ValueError as e:
            raise DynlrpInputError(str(e)) from None

    def prefix_plan(self, rule: Any, tensors: list[torch.Tensor], target: torch.Tensor) -> tuple | None:
        """For a causal-LM target rule that allows it (``each_token(prefixes=True)``): ``(symbol, groups)``, the
        sequence dimension's symbol and groups of target columns, each with the prefix length it is explained on
        (the last group: the whole sequence), where that is estimated to cost less than the whole sequence for
        every target; else ``None``. Needs the rule's input to be ``(batch, length)`` with a dynamic length that
        the explained ``(batch, length, vocab)`` output shares, and the same positions in every sample."""
        names = [s.name for s in self.spec.inputs]
        out = self.spec.output_shape
        if not getattr(rule, "prefixes", False) or getattr(rule, "input", None) not in names or out is None:
            return None
        i = names.index(rule.input)
        shape = self.spec.inputs[i].shape
        if len(shape) != 2 or not is_symbol(shape[1]) or shape[1] == shape[0] or len(out) != 3 or out[1] != shape[1]:
            return None
        vocab = self._expected_shape(out, tensors)[2]
        if vocab is None or target.ndim != 2 or target.shape[1] < 2:
            return None
        pos = target // vocab  # the position of each target (the tokens differ between samples)
        if not bool((pos == pos[:1]).all()):
            return None
        lo = (self.spec.ranges.get(shape[1]) or (None, None))[0]
        groups = prefix_groups(pos[0].tolist(), int(tensors[i].shape[1]), max(2, lo or 2))
        return (shape[1], groups) if len(groups) > 1 else None

    def explain_prefixes(self, tensors: list[torch.Tensor], target: torch.Tensor, plan: tuple,
                         sweep_batch: int | None) -> Explanation:
        """Explain the ``(B, K)`` targets of a causal LM group by group (:meth:`prefix_plan`), each group on its
        prefix of the sequence with its relevance padded with zeros, and put the groups back in target order. The
        last group runs on the whole sequence and gives the output. A group whose prefix logits differ from the
        whole sequence's (a model that is not causal) and every group after it, or every group when the program
        also returns captured, conditioned or parameter relevance, is explained on the whole sequence."""
        symbol, groups = plan
        seq_dims = {s.name: [d for d, size in enumerate(s.shape) if size == symbol] for s in self.spec.inputs}
        length = next(int(x.shape[d]) for x, s in zip(tensors, self.spec.inputs) for d in seq_dims[s.name])
        parts: list[tuple[list[int], Explanation]] = []
        whole: Explanation | None = None
        prefixes = True  # ruled out by a non-causal model or by relevance the padding does not cover
        for plen, cols in reversed(groups):  # the whole sequence first: its output checks the prefixes
            sub = target[:, torch.tensor(cols, device=target.device)]
            e = None
            if whole is not None and prefixes and plen < length:
                short = list(tensors)
                for j, s in enumerate(self.spec.inputs):
                    for d in seq_dims[s.name]:
                        short[j] = short[j].narrow(d, 0, plen).contiguous()  # strides as a fresh input's
                e = self.explain_targets(short, sub, None, len(cols), sweep_batch)
                ref = whole.output.narrow(1, 0, plen)
                if torch.allclose(e.output, ref, rtol=0, atol=1e-4 * float(ref.abs().max())):
                    for name, r in e.inputs.items():  # (B, k, *x.shape[1:]): sequence dim d is at d + 1
                        for d in seq_dims.get(name, ()):
                            pad = [0, 0] * (r.ndim - d - 2) + [0, length - plen]
                            r = torch.nn.functional.pad(r, pad)
                        e.inputs[name] = r
                else:  # not causal: the prefix's logits are not the sequence's; no other prefix is tried
                    e, prefixes = None, False
            if e is None:  # on the whole sequence
                e = self.explain_targets(tensors, sub, None, len(cols), sweep_batch)
            if whole is None:
                whole = e
                # every group on the whole sequence: captured/param/conditioned relevance has no zero padding
                prefixes = not (e.captured or e.params or e.conditioned)
            parts.append((cols, e))
        return _merge_target_groups(whole, parts, target.shape[1])

    def targets_per_sample(self, target: Any, seed: Any) -> int | None:
        """``K`` when ``target=`` (shape ``(B, K)``) or ``seed=`` (a target axis after the batch) asks for several
        targets per sample, else ``None``."""
        outs = self.spec.explained
        ks: set[int] = set()
        if seed is not None:
            per = [seed] if len(outs) == 1 else self.per_output(seed, "seed")
            for p, (_, sh) in zip(per, outs):
                if isinstance(p, torch.Tensor) and sh is not None and p.ndim == len(sh) + 1 and p.ndim >= 2:
                    ks.add(int(p.shape[1]))
        else:
            per = [target] if len(outs) == 1 else self.per_output(target, "target")
            for p in per:
                if p is None or isinstance(p, (int, bool)):
                    continue
                try:
                    t = p if isinstance(p, torch.Tensor) else torch.as_tensor(p)
                except (TypeError, ValueError, RuntimeError):
                    continue  # _one_target says what is wrong
                if t.ndim == 2:
                    ks.add(int(t.shape[1]))
        if not ks:
            return None
        if len(ks) > 1:
            raise DynlrpInputError(f"the explained outputs are given different numbers of targets per sample "
                                   f"{sorted(ks)}; give every output the same K (or one target per sample)")
        if not self.spec.output_batched:
            raise DynlrpInputError(
                f"several targets per sample need an explained output with a batch dimension; "
                f"{self.spec.output_name!r} has none: explain one target per call"
            )
        return ks.pop()

    def multi_target_tensor(self, target: Any, batch: int, k: int, device: Any) -> torch.Tensor:
        """``target=`` with ``k`` targets per sample as ``(batch * k,)`` int64 (``(batch * k, n)`` for ``n``
        explained outputs): a ``(batch, k)`` index tensor as is, one index per sample (or an int, or ``None``) the
        same for every target."""
        outs = self.spec.explained

        def one(t: Any, name: str, shape: Any) -> torch.Tensor:
            if t is None or (isinstance(t, int) and not isinstance(t, bool)):
                return self._one_target(t, batch * k, device, name, shape)
            raw = t if isinstance(t, torch.Tensor) else torch.as_tensor(t)
            if raw.ndim == 2:
                if tuple(raw.shape) != (batch, k):
                    raise DynlrpInputError(
                        f"target for {name!r} has shape {tuple(raw.shape)}; expected (batch, targets) = ({batch}, {k})"
                    )
                return self._one_target(raw.reshape(-1), batch * k, device, name, shape)
            return self._one_target(raw, batch, device, name, shape).repeat_interleave(k)

        if len(outs) == 1:
            return one(target, *outs[0])
        per = self.per_output(target, "target")
        return torch.stack([one(t, n, sh) for t, (n, sh) in zip(per, outs)], 1)

    def explain_targets(self, tensors: list[torch.Tensor], target: Any, seed: Any, k: int,
                        sweep_batch: int | None = None, condition: Any = None) -> Explanation:
        """Explain ``k`` targets per sample of bound inputs (see :meth:`dynlrp_fx.Explainer.forward`)."""
        if sweep_batch is not None and (isinstance(sweep_batch, bool) or not isinstance(sweep_batch, int)
                                        or sweep_batch < 1):
            raise DynlrpInputError(f"sweep_batch= must be a positive int (relevance rows per sweep), got {sweep_batch!r}")
        batch = self.batch_size(tensors)
        device = tensors[0].device if tensors else None
        if seed is None:
            mode, extra = "target", self.multi_target_tensor(target, batch, k, device)
        else:
            mode, extra = "seed", self.seed_tensor(seed, tensors, k)
        if self.multi_runner is not None:
            outs, names = self.multi_runner(mode, tensors, extra, batch, k, sweep_batch, condition)
        elif condition is not None:
            raise DynlrpInputError("condition= needs a live explainer (dynlrp.compile): a loaded file's program "
                                   "has no conditioned form")
        else:
            outs, names = self._repeated(mode, tensors, extra, batch, k)
        expl = self.unpack(outs, names, k=k)
        expl.targets = extra.reshape(batch, k, *extra.shape[1:]) if mode == "target" else None
        return expl

    def _repeated(self, mode: str, tensors: list[torch.Tensor], extra: torch.Tensor, batch: int, k: int) -> tuple:
        """``k`` targets by running the program once on every sample repeated ``k`` times (a runner without a
        one-forward form, e.g. a loaded file): the outputs in the multi-runner layout."""
        rep = [x.repeat_interleave(k, 0) if s.batched and x.ndim else x for x, s in zip(tensors, self.spec.inputs)]
        self._check_extra(mode, extra, rep)
        outs, names = self.runner(mode, rep, extra, batch * k)
        if names.param_names:
            raise DynlrpInputError("params= relevance with several targets per sample needs a live explainer "
                                   "(dynlrp.compile); explain one target per call")
        n_y = max(1, len(names.output_names))
        rest = []
        for r in outs[n_y:]:
            if r.ndim == 0 or int(r.shape[0]) != batch * k:
                raise DynlrpInputError("an input without a batch dimension cannot be explained for several targets "
                                       "per sample by this explainer; explain one target per call")
            rest.append(r.reshape(batch, k, *r.shape[1:]))
        return [y[::k] for y in outs[:n_y]] + rest, names

    def unpack(self, outs: Any, names: Any, k: int | None = None) -> Explanation:
        """``(*outputs, seed_total, absorbed, *inputs, *params, *captured)`` -> :class:`Explanation`; ``names`` is
        the program's :class:`~dynlrp_fx.passes.pair.ProgramOutputs` (several outputs when it names several).
        With ``k`` targets per sample the ledger and relevance have a target axis after the batch."""
        out_names = list(getattr(names, "output_names", None) or [])
        k = max(1, len(out_names))
        n_in, n_par, n_cap = len(names.input_names), len(names.param_names), len(names.capture_names)
        cond_names = list(getattr(names, "condition_names", None) or [])
        ys = list(outs[:k])
        seed_total, absorbed, *rest = outs[k:]
        rels = rest[:n_in]
        inputs = dict(zip(names.input_names, rels))
        first = self.spec.inputs[0].name if self.spec.inputs else None
        relevance = inputs.get(first) if first in inputs else (next(iter(inputs.values())) if inputs else None)
        batched = {s.name: s.batched for s in self.spec.inputs}
        total = torch.zeros_like(seed_total)
        for name, r in zip(names.input_names, rels):
            r = r.to(seed_total.dtype)
            if k is not None:  # (B, K, ...) relevance; an input without a batch: (K, ...), spread over the batch
                if batched.get(name, True):
                    total = total + r.reshape(*total.shape, -1).sum(-1)
                else:
                    total = total + r.reshape(k, -1).sum(1) / total.shape[0]
            elif self.spec.output_batched and batched.get(name, True) and r.ndim >= 1:
                total = total + r.reshape(r.shape[0], -1).sum(1)
            else:  # a whole-call total (one sample), or an input without a batch dimension: spread evenly
                total = total + r.sum() / total.shape[0]
        return Explanation(
            output=ys[0] if k == 1 else dict(zip(out_names, ys)),
            relevance=relevance,
            inputs=inputs,
            absorbed=absorbed,
            conservation=Conservation(seed_total, total, absorbed),
            params=dict(zip(names.param_names, rest[n_in : n_in + n_par])),
            captured=dict(zip(names.capture_names, rest[n_in + n_par : n_in + n_par + n_cap])),
            conditioned=dict(zip(cond_names, rest[n_in + n_par + n_cap :])),
        )


def prefix_groups(positions: list[int], length: int, shortest: int = 2, most: int = 8) -> list[tuple[int, list[int]]]:
    """Target columns grouped by position for :meth:`CallPath.explain_prefixes`: ``[(prefix length, columns)]`` in
    increasing order, the last group with the whole ``length``. Tries 1 to ``most`` groups of about equal numbers of
    targets (a position is never split) and keeps the cheapest by ``sum(prefix * (1 + targets))``: one forward pass
    and one sweep per target, each costing about the same per token (GPT-2 small on a CPU, 128 tokens, batch 2:
    0.59 s forward, 0.52 s per sweep). ``most`` bounds the prefix lengths a compiled program sees."""
    order = sorted(range(len(positions)), key=lambda c: positions[c])
    best: tuple[float, list] | None = None
    for n in range(1, min(most, len(order)) + 1):
        groups: list[list[int]] = []
        for j, c in enumerate(order):
            # a new group starts after each n-th of the targets, unless it would split a position
            if not groups or (len(groups) < n and j >= len(groups) * len(order) / n
                              and positions[c] != positions[groups[-1][-1]]):
                groups.append([])
            groups[-1].append(c)
        plan = [(max(shortest, positions[g[-1]] + 1), g) for g in groups[:-1]] + [(length, groups[-1])]
        cost = sum(p * (1 + len(g)) for p, g in plan)
        if best is None or cost < best[0]:
            best = (cost, plan)
    return best[1] if best is not None else []


def _merge_target_groups(whole: Explanation, parts: list[tuple[list[int], Explanation]], k: int) -> Explanation:
    """One ``K``-target explanation from explanations of groups of its target columns (``parts``: columns and
    explanation), in column order; ``whole``'s output."""
    cols = torch.tensor([c for cs, _ in parts for c in cs])
    inv = torch.empty(k, dtype=torch.long)
    inv[cols] = torch.arange(k)

    def rows(get: Callable[[Explanation], torch.Tensor], dim: int = 1) -> torch.Tensor:
        t = torch.cat([get(e) for _, e in parts], dim)
        return t.index_select(dim, inv.to(t.device))

    inputs = {n: rows(lambda e, n=n: e.inputs[n]) for n in whole.inputs}
    first = next((n for n, r in whole.inputs.items() if r is whole.relevance), None)
    c = [rows(lambda e, f=f: getattr(e.conservation, f)) for f in ("seed", "inputs", "absorbed")]
    return Explanation(
        output=whole.output,
        relevance=inputs.get(first) if first is not None else None,
        inputs=inputs,
        absorbed=rows(lambda e: e.absorbed),
        conservation=Conservation(*c),
        params={n: rows(lambda e, n=n: e.params[n], 0) for n in whole.params},
        captured={n: rows(lambda e, n=n: e.captured[n]) for n in whole.captured},
        targets=None if whole.targets is None else rows(lambda e: e.targets),
        conditioned={n: rows(lambda e, n=n: e.conditioned[n]) for n in whole.conditioned},
    )


def _with_axis(value: Any) -> Any:
    """A one-target-per-sample ``target=``/``seed=`` with a target axis of size 1 (dicts and tuples per output)."""
    if value is None or isinstance(value, (int, bool)):
        return value
    if isinstance(value, Mapping):
        return {k: _with_axis(v) for k, v in value.items()}
    if isinstance(value, tuple):
        return tuple(_with_axis(v) for v in value)
    t = value if isinstance(value, torch.Tensor) else torch.as_tensor(value)
    return t.unsqueeze(1) if t.ndim >= 1 else t


def map_target_axis(expl: Explanation, per_row: Callable[[torch.Tensor], torch.Tensor],
                    per_call: Callable[[torch.Tensor], torch.Tensor]) -> Explanation:
    """Apply ``per_row`` to every tensor of a K-target explanation with a target axis after the batch (relevance,
    ledger, captured, conditioned) and ``per_call`` to those with the target axis in front (``params``)."""
    expl.relevance = None if expl.relevance is None else per_row(expl.relevance)
    expl.inputs = {k: per_row(v) for k, v in expl.inputs.items()}
    expl.absorbed = per_row(expl.absorbed)
    c = expl.conservation
    expl.conservation = Conservation(per_row(c.seed), per_row(c.inputs), per_row(c.absorbed))
    expl.params = {k: per_call(v) for k, v in expl.params.items()}
    expl.captured = {k: per_row(v) for k, v in expl.captured.items()}
    expl.conditioned = {k: per_row(v) for k, v in expl.conditioned.items()}
    return expl


def _drop_target_axis(expl: Explanation) -> Explanation:
    """An explanation of one target per sample from the ``K = 1`` path: the target axis removed."""
    map_target_axis(expl, lambda t: t.squeeze(1) if t.ndim >= 2 else t, lambda t: t.squeeze(0))
    expl.targets = None if expl.targets is None else expl.targets.squeeze(1)
    return expl
