"""The runtime: :func:`compile` builds an :class:`Explainer` (an ``nn.Module``) that returns :class:`Explanation`s."""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch import nn

from . import passes as P
from .errors import DynlrpInputError
from .passes.annotate import FLOAT
from .passes.promises import DEFAULT_POLICY
from .presets import resolve
from .rules.composite import Composite
from .trace import TracedProgram, _OutputWrapper, trace

__all__ = ["compile", "Explainer", "Explanation", "Conservation"]

BACKENDS = ("auto", "inductor", "eager")


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
    output: the explained model output (e.g. the logits).
    relevance: relevance of the first input, same shape (for token ids: one value per token).
    inputs: forward-parameter name -> relevance, for every input that receives relevance (float inputs; integer
        inputs that feed embeddings get the relevance of their embedding rows summed over the hidden dimension).
    absorbed: per-sample relevance absorbed by biases and stabilisers.
    conservation: the per-sample ledger (seed total, sum over inputs, absorbed).
    params: parameter name -> relevance of that parameter (shape of the parameter, summed over the batch); only
        with ``compile(..., params=...)``. See :func:`dynlrp_fx.compile` for the rule.
    captured: module path -> relevance of that module's output (shape of the output, per sample); only with
        ``compile(..., capture=...)``.
    """

    output: torch.Tensor
    relevance: torch.Tensor | None
    inputs: dict[str, torch.Tensor]
    absorbed: torch.Tensor
    conservation: Conservation
    params: dict[str, torch.Tensor] = field(default_factory=dict)
    captured: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class _Program:
    mode: str
    graph: torch.fx.GraphModule  # lowered
    fn: Any
    input_names: list[str]
    unattributed: list[str]
    param_names: list[str] = field(default_factory=list)
    capture_names: list[str] = field(default_factory=list)
    compile_seconds: float = 0.0
    calls: int = 0


def _check_backend(backend: Any) -> None:
    if not (isinstance(backend, str) or callable(backend)):
        raise ValueError(f"backend must be one of {BACKENDS} or a torch.compile backend, got {backend!r}")


def resolve_backend(backend: Any, device: torch.device | None, mode: str | None = None) -> Any:
    """``"auto"`` -> ``"inductor"`` on a GPU (or when a ``torch.compile`` ``mode`` is asked for), else ``"eager"``.

    Measured (``benchmarks/results``): on an H200 the Inductor program is 1.4-2x faster than the eager one; on a
    2-core CPU it is slower than the eager program (VGG16, batch 1: 1.17x vs 1.08x gradient x input) and its cold
    compile takes 20-40 s. Any other value is returned unchanged.
    """
    _check_backend(backend)
    if backend != "auto":
        return backend
    return "inductor" if mode is not None or (device is not None and device.type != "cpu") else "eager"


class Explainer(nn.Module):
    """An explainable version of a model; create it with :func:`dynlrp_fx.compile`.

    Calling it, ``explainer(*args, target=None, seed=None, **kwargs)``, runs the forward pass and the relevance
    sweep as one compiled program and returns an :class:`Explanation`. The model itself is not registered as a
    submodule (so ``explainer.eval()`` or ``.to()`` never touches it); its parameters are read at each call.
    """

    def __init__(self, model: nn.Module, traced: TracedProgram, composite: Composite, backend: str = "auto",
                 dynamic: bool = True, params: Any = None, capture: Any = None, mode: str | None = None,
                 promise_policy: str = DEFAULT_POLICY):
        super().__init__()
        self._model_ref = [model]
        self.traced = traced
        self._backend_request = backend  # "auto" is resolved again when recompile() changes the mode
        backend = resolve_backend(backend, self._device(), mode)
        self.composite = composite
        self.backend = backend
        self.dynamic = dynamic
        self.mode = mode  # torch.compile mode, e.g. "reduce-overhead" (CUDA graphs)
        self.promise_policy = promise_policy  # passes.promises.POLICIES
        self._programs: dict[str, _Program] = {}
        self._const_cache: dict[Any, torch.Tensor] = {}
        self._static_cache: dict[str, dict[int, int]] = {}  # placeholder -> {dim: size} the program is static in
        gm = traced.graph_module
        P.canonicalize(gm)
        if "fold_batchnorm" in getattr(composite, "canonizers", ()):
            P.fold_batchnorm(gm, {u.placeholder for u in traced.user_inputs})
        float_in = {u.placeholder for u in traced.user_inputs if u.is_float}
        index_in = {u.placeholder for u in traced.user_inputs if not u.is_float}
        out_node = next(n for n in gm.graph.nodes if n.op == "output")
        self._y_src = out_node.args[0][traced.output_index]
        P.mark_data(gm, float_in, index_in, self._y_src)
        P.detect_normalizers(gm)
        P.assign_rules(gm, composite, traced.module_root)
        self.fake_mode = torch._guards.detect_fake_mode(
            [n.meta["val"] for n in gm.graph.nodes if n.op == "placeholder" and "val" in n.meta]
        )
        self._param_map = _resolve_params(traced, params)
        self._capture_map = _resolve_capture(traced, capture)
        self._program("target")

    # -- construction -------------------------------------------------------------------------------------------
    @property
    def model(self) -> nn.Module:
        return self._model_ref[0]

    @property
    def pipeline(self) -> P.Pipeline:
        """The passes this explainer was built with."""
        return P.PIPELINE

    def _program(self, mode: str) -> _Program:
        prog = self._programs.get(mode)
        if prog is not None:
            return prog
        t0 = time.perf_counter()
        traced = self.traced
        res = P.pair(
            traced.graph_module,
            output_index=traced.output_index,
            user_inputs=traced.user_inputs,
            mode=mode,
            batch_symbol=traced.batch_symbol,
            fake_mode=self.fake_mode,
            example_batch=next(
                (int(traced.example_flat[i].shape[0]) for u, i in zip(traced.user_inputs, traced.tensor_leaf_index) if u.batched),
                None,
            ),
            params=self._param_map,
            capture=self._capture_map,
        )
        gm = P.resolve_promises(res.graph_module, self.promise_policy)
        fake_args = [n.meta["val"] for n in gm.graph.nodes if n.op == "placeholder"]
        lowered = P.lower(gm, fake_args)
        lowered = P.unify_batch(lowered, traced.batch_symbol)
        lowered = P.transpose_convolution_pullbacks(lowered)
        lowered = P.fold_broadcast_bmm(lowered)
        lowered = P.eliminate_common_subexpressions(lowered)
        lowered = P.eliminate_dead_code(lowered)
        lowered = P.sink_cheap_ops(lowered)
        fn = self._compile_backend(lowered)
        prog = _Program(
            mode, lowered, fn, res.input_names, res.unattributed, res.param_names, res.capture_names,
            time.perf_counter() - t0,
        )
        self._programs[mode] = prog
        return prog

    def recompile(
        self, *, backend: Any = None, mode: Any = "unchanged", promise_policy: str | None = None
    ) -> Explainer:
        """A new explainer for the same model, rules and inputs with another backend, ``torch.compile`` mode or
        memory policy, built without tracing the model again (the traced and analysed graph is shared; with the
        same memory policy the lowered relevance program is shared too, and only the backend compile differs).

        ``explainer.recompile(backend="inductor", mode="reduce-overhead")`` turns an eager explainer into a
        CUDA-graph one; arguments left out keep this explainer's values. This explainer is unchanged.
        """
        new_mode = self.mode if mode == "unchanged" else mode
        request = self._backend_request if backend is None else backend
        backend = resolve_backend(request, self._device(), new_mode)
        policy = self.promise_policy if promise_policy is None else promise_policy  # checked by resolve_promises
        new = Explainer.__new__(Explainer)
        nn.Module.__init__(new)
        for name in ("_model_ref", "traced", "composite", "dynamic", "_y_src", "fake_mode", "_param_map", "_capture_map"):
            setattr(new, name, getattr(self, name))
        new.backend, new._backend_request = backend, request
        new.mode = new_mode
        new.promise_policy = policy
        new._programs, new._const_cache, new._static_cache = {}, {}, dict(self._static_cache)
        if policy == self.promise_policy:
            for name, prog in self._programs.items():
                new._programs[name] = replace(prog, fn=new._compile_backend(prog.graph), calls=0)
        new._program("target")
        return new

    def _device(self) -> torch.device | None:
        """Where the model runs: the device of the first example input tensor, else of the first parameter."""
        return next(
            (t.device for t in self.traced.example_flat if isinstance(t, torch.Tensor)),
            next((p.device for p in self.model.parameters()), None),
        )

    def _compile_backend(self, lowered: torch.fx.GraphModule):
        if self.backend == "eager":  # Inductor reuses buffers itself (and would functionalise in-place ops)
            return P.reuse_buffers(lowered)[0]
        return torch.compile(lowered, backend=self.backend, dynamic=None if self.dynamic else False, mode=self.mode)

    # -- inspection ---------------------------------------------------------------------------------------------
    def rule_table(self) -> list[dict[str, Any]]:
        """For every op node that depends on an explained input: module path, op, rule class and rule."""
        rows = []
        for node in self.traced.graph_module.graph.nodes:
            ann = node.meta.get("dynlrp")
            if ann is None or node.op != "call_function":
                continue
            rows.append(
                {
                    "node": node.name,
                    "module": ann.module_path,
                    "op": str(node.target),
                    "status": ann.status,
                    "rule_class": ann.rule_class,
                    "rule": repr(ann.rule) if ann.rule is not None else None,
                    "relevant": ann.relevant,
                }
            )
        return rows

    def graph(self, mode: str = "target") -> torch.fx.GraphModule:
        """The lowered forward+relevance graph (pure ATen) for a seed mode (``"target"`` or ``"seed"``)."""
        return self._program(mode).graph

    @property
    def input_names(self) -> list[str]:
        """Names of the inputs whose relevance is returned."""
        return list(self._program("target").input_names)

    # -- calling ------------------------------------------------------------------------------------------------
    def _state(self, device: torch.device | None) -> list[torch.Tensor]:
        root = self.traced.module_root
        out = []
        for _ph, kind, target in self.traced.state_specs:
            if kind == "PARAMETER":
                t = root.get_parameter(target)
            elif kind == "BUFFER":
                t = root.get_buffer(target)
            else:
                t = self.traced.exported.constants[target]
                if device is not None and t.device != device:
                    key = (target, device)
                    if key not in self._const_cache:
                        self._const_cache[key] = t.to(device)
                    t = self._const_cache[key]
            out.append(t.detach())
        return out

    def _flatten_inputs(self, args: tuple, kwargs: dict) -> list[torch.Tensor]:
        traced = self.traced
        flat, spec = pytree.tree_flatten((args, kwargs))
        if spec != traced.in_spec:
            raise DynlrpInputError(
                "the explainer was called with inputs of another structure than the example inputs it was compiled "
                f"with.\n  compiled with: {traced.in_spec}\n  called with:   {spec}\nPass the same positional and "
                "keyword inputs (only the batch size may change)."
            )
        for i, v in traced.const_leaves.items():
            if flat[i] is not v and flat[i] != v:
                raise DynlrpInputError(
                    f"non-tensor input #{i} is {flat[i]!r} but the program was compiled for {v!r}; recompile for "
                    "other values"
                )
        tensors = []
        for ui, i in zip(traced.user_inputs, traced.tensor_leaf_index):
            x = flat[i]
            if not isinstance(x, torch.Tensor):
                raise DynlrpInputError(f"input {ui.name!r} must be a tensor, got {type(x).__name__}")
            if x.ndim != ui.ndim:
                raise DynlrpInputError(
                    f"input {ui.name!r} has {x.ndim} dimensions {tuple(x.shape)}, expected {ui.ndim} (as the example "
                    f"input {tuple(traced.example_flat[i].shape)})"
                )
            if x.dtype != ui.dtype:
                raise DynlrpInputError(f"input {ui.name!r} has dtype {x.dtype}, expected {ui.dtype}")
            if ui.batched and traced.max_batch is not None and x.ndim >= 1 and x.shape[0] > traced.max_batch:
                raise DynlrpInputError(
                    f"input {ui.name!r} has a batch of {x.shape[0]}, but this model's ops bound the batch to "
                    f"{traced.max_batch} (a torch guard found when tracing, e.g. cuDNN batch norm on CUDA); "
                    "explain it in chunks of at most that many samples"
                )
            ex = traced.example_flat[i]
            static = self._static_dims(ui.placeholder, ex)
            if any(x.shape[d] != size for d, size in static.items()):
                dyn = [d for d in range(x.ndim) if d not in static]
                raise DynlrpInputError(
                    f"input {ui.name!r} has shape {tuple(x.shape)}; only dimensions {dyn} may differ from the "
                    f"example shape {tuple(ex.shape)} (the traced program is static in the others). Compile with "
                    "dynamic_shapes= for more dynamic dimensions."
                    + (
                        f" This model specialised its batch size to {traced.static_batch} when traced."
                        if traced.static_batch is not None
                        else ""
                    )
                )
            tensors.append(x.detach())
        return tensors

    def _static_dims(self, placeholder: str, example: torch.Tensor) -> dict[int, int]:
        """``{dim: size}`` for the dims of a user input that the traced program is specialised on."""
        cache = self._static_cache
        if placeholder not in cache:
            ph = next(n for n in self.traced.graph_module.graph.nodes if n.op == "placeholder" and n.name == placeholder)
            val = ph.meta.get("val")
            shape = val.shape if isinstance(val, torch.Tensor) else example.shape
            static = {d: int(s) for d, s in enumerate(shape) if not isinstance(s, torch.SymInt)}
            if self.traced.static_batch is not None and len(shape) >= 1:
                static[0] = self.traced.static_batch
            cache[placeholder] = static
        return cache[placeholder]

    def _target_tensor(self, target: Any, batch: int, out_numel: int | None, device) -> torch.Tensor:
        if target is None:
            t = torch.full((batch,), -1, dtype=torch.long, device=device)
        elif isinstance(target, int):
            t = torch.full((batch,), int(target), dtype=torch.long, device=device)
        else:
            t = torch.as_tensor(target, dtype=torch.long, device=device).reshape(-1)
            if t.numel() != batch:
                raise DynlrpInputError(f"target has {t.numel()} entries but the batch has {batch} samples")
        if out_numel is not None and bool(((t >= out_numel) | (t < -1)).any()):
            raise DynlrpInputError(
                f"target {t.tolist()} out of range: each sample's output has {out_numel} entries (use -1/None for argmax)"
            )
        return t

    def forward(self, *args, target: Any = None, seed: torch.Tensor | None = None, **kwargs) -> Explanation:
        """Explain the model on these inputs.

        Parameters
        ----------
        *args, **kwargs: the model inputs (same structure as the example inputs; any batch size).
        target: ``None`` (argmax per sample), an int (same index for every sample), or one index per sample; the
            index is into the flattened per-sample output (the class for ``(batch, classes)`` outputs). The seed
            relevance is the output value at the target, so input relevance sums to the logit.
        seed: an explicit output-shaped relevance seed, used as is (one-hot reproduces Zennit's default).
        """
        if target is not None and seed is not None:
            raise DynlrpInputError("give either target= or seed=, not both")
        tensors = self._flatten_inputs(args, kwargs)
        batch_src = next((x for x, u in zip(tensors, self.traced.user_inputs) if u.batched), None)
        batch = batch_src.shape[0] if batch_src is not None else 1
        device = tensors[0].device if tensors else None
        state = self._state(device)
        y_val = self._y_src.meta.get("val")
        if seed is None:
            numel = None
            if y_val is not None:
                try:
                    numel = int(y_val[0].numel())
                except Exception:  # noqa: BLE001 - symbolic non-batch dims
                    numel = None
            extra = self._target_tensor(target, batch, numel, device)
            prog = self._program("target")
        else:
            if not isinstance(seed, torch.Tensor):
                raise DynlrpInputError("seed= must be a tensor shaped like the explained output")
            extra = seed.detach()
            prog = self._program("seed")
        # torch specialises size-1 dims (conv backend choice, broadcasting), so a batch of 1 gets its own static
        # compilation the first time it is seen; every other batch size shares one dynamic-batch program
        if self.backend != "eager" and self.dynamic and batch > 1:
            for x, u in zip(tensors, self.traced.user_inputs):
                if u.batched:
                    torch._dynamo.mark_dynamic(x, 0)
            if extra.ndim >= 1:
                torch._dynamo.mark_dynamic(extra, 0)
        graphs = self.backend != "eager" and self.mode in ("reduce-overhead", "max-autotune")
        if graphs:  # CUDA graphs: a new step, so the previous call's static outputs may be reused
            torch.compiler.cudagraph_mark_step_begin()
        with torch.no_grad(), _oblivious():
            outs = prog.fn(*state, *tensors, extra)
        if graphs:  # the next replay overwrites the graph's output buffers: an Explanation owns its tensors
            outs = [o.clone() for o in outs]
        prog.calls += 1
        n_in, n_par = len(prog.input_names), len(prog.param_names)
        y, seed_total, absorbed, *rest = outs
        rels = rest[:n_in]
        params = dict(zip(prog.param_names, rest[n_in : n_in + n_par]))
        captured = dict(zip(prog.capture_names, rest[n_in + n_par :]))
        inputs = dict(zip(prog.input_names, rels))
        first = self.traced.user_inputs[0].name if self.traced.user_inputs else None
        relevance = inputs.get(first) if first in inputs else (next(iter(inputs.values())) if inputs else None)
        total = sum((r.reshape(r.shape[0], -1).to(seed_total.dtype).sum(1) for r in rels), torch.zeros_like(seed_total))
        return Explanation(
            output=y,
            relevance=relevance,
            inputs=inputs,
            absorbed=absorbed,
            conservation=Conservation(seed_total, total, absorbed),
            params=params,
            captured=captured,
        )


def _public_prefix(traced: TracedProgram) -> str:
    """Prefix that the traced root adds to the user's parameter names and module paths (``output=`` callables)."""
    return "model." if isinstance(traced.module_root, _OutputWrapper) else ""


def _resolve_params(traced: TracedProgram, params: Any) -> dict[str, str]:
    """``params=`` -> {parameter placeholder name: public parameter name} (in the model's parameter order)."""
    if params is None or params is False:
        return {}
    prefix = _public_prefix(traced)
    available = {}
    for ph, kind, target in traced.state_specs:
        if kind == "PARAMETER":
            name = target[len(prefix) :] if prefix and target.startswith(prefix) else target
            available[name] = ph
    if params is True:
        return {ph: name for name, ph in available.items()}
    if isinstance(params, str):
        params = [params]
    try:
        wanted = list(params)
    except TypeError:
        raise TypeError(f"params= must be True, a parameter name or a list of names, not {type(params).__name__}") from None
    missing = [p for p in wanted if p not in available]
    if missing:
        raise DynlrpInputError(
            f"params={missing} are not parameters of the traced model; its parameters are: "
            f"{', '.join(available) or '(none)'}. Use the names of model.named_parameters() (or params=True)."
        )
    return {available[p]: p for p in dict.fromkeys(wanted)}


def _stack_paths(node: torch.fx.Node) -> list[str]:
    return [str(path) for path, _t in (node.meta.get("nn_module_stack") or {}).values()]


def module_output_node(gm: torch.fx.GraphModule, path: str) -> torch.fx.Node | None:
    """The output node of the module at ``path`` (as it appears in ``nn_module_stack``), or ``None``.

    The module's *region* is every op node whose module stack contains ``path``; its output is the last region
    node whose value is used outside the region (or returned). For a module called several times, this is its
    last call.
    """
    region = [n for n in gm.graph.nodes if n.op == "call_function" and path in _stack_paths(n)]
    members = set(region)
    outs = [n for n in region if any(u not in members for u in n.users)]
    return outs[-1] if outs else None


def _resolve_capture(traced: TracedProgram, capture: Any) -> dict[str, str]:
    """``capture=`` -> {public module path: node name of the module's output}."""
    if capture is None or capture is False:
        return {}
    if isinstance(capture, str):
        capture = [capture]
    prefix = _public_prefix(traced)
    gm = traced.graph_module
    out: dict[str, str] = {}
    for path in capture:
        if not isinstance(path, str):
            raise TypeError(f"capture= takes module paths (str), got {type(path).__name__}: {path!r}")
        full = prefix + path if path else prefix.rstrip(".")
        node = module_output_node(gm, full)
        if node is None:
            paths = {p for n in gm.graph.nodes for p in _stack_paths(n)}
            known = sorted(p[len(prefix) :] for p in paths if p.startswith(prefix) and p)
            raise DynlrpInputError(
                f"capture: no traced operation belongs to module {path!r}. Module paths in the traced graph: "
                f"{', '.join(known[:40]) or '(none)'}{' ...' if len(known) > 40 else ''} (use the names of "
                "model.named_modules())."
            )
        ann = node.meta.get("dynlrp")
        if ann is None or ann.status != FLOAT:
            raise DynlrpInputError(
                f"capture: the output of module {path!r} (node {node.name}, {node.target}) does not depend on a "
                "float or embedded input, so it carries no relevance; capture a module on the path from the inputs "
                "to the explained output."
            )
        out[path] = node.name
    return out


@contextlib.contextmanager
def _oblivious():
    """Treat the batch size obliviously (no 0/1 specialisation) where this torch has the option."""
    try:
        import torch.fx.experimental._config as fx_config

        ctx = fx_config.patch(backed_size_oblivious=True)
    except (ImportError, AttributeError):  # older torch: no such option
        ctx = contextlib.nullcontext()
    with ctx:
        yield


def compile(
    model: nn.Module,
    example_inputs: Any = (),
    *,
    example_kwargs: dict | None = None,
    rules: Any = None,
    output: Any = None,
    backend: str = "auto",
    dynamic: bool = True,
    dynamic_shapes: Any = None,
    params: Any = None,
    capture: Any = None,
    mode: str | None = None,
    promise_policy: str = DEFAULT_POLICY,
) -> Explainer:
    """Compile ``model`` into an :class:`Explainer` that returns LRP explanations.

    Parameters
    ----------
    model: any ``nn.Module`` (left untouched: no hooks, no patching; training flags restored).
    example_inputs: a tensor or tuple of positional example inputs (batch size >= 2 preferred; a batch of 1
        is traced as 2).
    example_kwargs: keyword example inputs (e.g. ``{"input_ids": ..., "attention_mask": ...}``).
    rules: a preset name (``"epsilon"`` default, ``"lrp0"``), a :class:`dynlrp_fx.Composite`, or
        ``{rule class: Rule}``.
    output: which model output to explain: ``None`` (``logits`` if present, else the first tensor), an output
        name, a flat index, or a callable on the model output.
    backend: ``"auto"`` (default: ``"inductor"`` when the model or the example inputs are on a GPU, or when a
        ``mode`` is given, ``"eager"`` on CPU, where Inductor measured slower than the eager program; see
        :func:`resolve_backend`), ``"inductor"`` (``torch.compile`` into fused kernels), ``"eager"`` (run the
        lowered ATen graph directly, no compile time; dying temporaries are reused in place) or any
        ``torch.compile`` backend name.
    dynamic: keep the batch dimension dynamic (no recompilation for new batch sizes).
    dynamic_shapes: explicit ``torch.export`` dynamic shapes.
    params: ``True`` (every parameter) or a list of parameter names: return their relevance in
        :attr:`Explanation.params`, shaped like the parameter and summed over the batch. It is a separate quantity
        that leaves the input relevance unchanged: for each op that uses the parameter ``W`` (directly or through
        route ops such as a transpose) ``R_W = W * J_W^T(R / stab(z))`` (the z-rule with ``W`` in the place of
        the data operand, epsilon of the op's rule; route/embedding ops: ``R_W = J_W^T R``), summed over uses.
        For a bias-free linear layer under LRP-0 the weight's relevance sums to the layer's input relevance; a
        bias receives the share it absorbed. Parameters used only by other op classes (softmax, normaliser
        scales, activations) get zeros.
    capture: module paths (names from ``model.named_modules()``): return the relevance of each module's output
        in :attr:`Explanation.captured` (per sample, shaped like the output). The relevance of a module whose
        output is a full cut of the network sums to the seed (exactly under LRP-0 without biases).
    mode: ``torch.compile`` mode for compiled backends, e.g. ``"reduce-overhead"`` (CUDA graphs on GPU) or
        ``"max-autotune"``; ``None`` is torch's default. With CUDA graphs each call marks a new step and copies
        the results out of the graph's static buffers, so an :class:`Explanation` stays valid after later calls.
    promise_policy: memory policy for the forward values the relevance half needs: ``"recompute"`` (default:
        rematerialise cheap pointwise/view values instead of keeping them alive) or ``"keep"``; see
        :mod:`dynlrp_fx.passes.promises`.

    Returns
    -------
    Explainer

    Raises
    ------
    DynlrpTraceError: the model cannot be exported (the message quotes the failing source line).
    DynlrpUnsupportedOpError: an op that carries relevance has no rule (all such ops are listed).

    Example
    -------
    >>> explainer = dynlrp.compile(model, torch.randn(2, 3, 32, 32), rules="epsilon")  # doctest: +SKIP
    >>> expl = explainer(x, target=3)  # doctest: +SKIP
    >>> expl.relevance.shape == x.shape  # doctest: +SKIP
    """
    composite = resolve(rules)
    traced = trace(
        model,
        example_inputs if isinstance(example_inputs, tuple) else (example_inputs,),
        example_kwargs,
        output=output,
        dynamic=dynamic,
        dynamic_shapes=dynamic_shapes,
    )
    return Explainer(model, traced, composite, backend=backend, dynamic=dynamic, params=params, capture=capture,
                     mode=mode, promise_policy=promise_policy)


