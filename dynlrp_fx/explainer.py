"""The explainer: :func:`compile` builds an :class:`Explainer` (an ``nn.Module``) that returns :class:`Explanation` s.

An :class:`Explainer` is a thin module over three parts: its :class:`~dynlrp_fx.program.Analysis` (a private
analysed copy of the traced graph), its :class:`~dynlrp_fx.program.Program` s (one per seed mode, built on first
use through the pipeline) and the :class:`~dynlrp_fx.runtime.CallPath` that binds inputs and unpacks outputs, the
same one a loaded explainer uses.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .errors import DynlrpInputError, DynlrpShapeError, DynlrpTraceError
from .passes import PipelineReport
from .passes.resolve_promises import DEFAULT_POLICY
from .presets import resolve
from .program import Analysis, Program, build_program
from .rules.composite import Composite
from .runtime import CallPath, CallSpec, Conservation, Explanation, explain_first_that_fits
from .trace import TracedProgram, trace

__all__ = ["compile", "Explainer", "Explanation", "Conservation", "resolve_backend", "BACKENDS"]

BACKENDS = ("auto", "inductor", "eager")


def _check_backend(backend: Any) -> None:
    if not (isinstance(backend, str) or callable(backend)):
        raise ValueError(f"backend must be one of {BACKENDS} or a torch.compile backend, got {backend!r}")


def resolve_backend(backend: Any, device: torch.device | None, mode: str | None = None) -> Any:
    """``"auto"`` -> ``"inductor"`` on a GPU (or when a ``torch.compile`` ``mode`` is asked for), else ``"eager"``
    (on a CPU the eager program was faster than Inductor's in ``benchmarks/results/cpu.md``, and needs no compile
    time). Any other value is returned unchanged."""
    _check_backend(backend)
    if backend != "auto":
        return backend
    return "inductor" if mode is not None or (device is not None and device.type != "cpu") else "eager"


class Explainer(nn.Module):
    """An explainable version of a model; create it with :func:`dynlrp_fx.compile`.

    Calling it, ``explainer(*args, target=None, seed=None, **kwargs)``, runs the forward pass and the relevance
    sweep as one compiled program and returns an :class:`Explanation`. The model itself is not registered as a
    submodule (so ``explainer.eval()`` or ``.to()`` never touches it); its parameters are read at each call.

    ``Explainer(model, traced, composite, ...)`` builds an explainer on an existing trace (``dynlrp_fx.trace.trace``);
    it analyses its own copy of the traced graph, so explainers sharing a trace never change each other.
    ``analysis=`` shares an existing :class:`~dynlrp_fx.program.Analysis` (what :meth:`recompile` does); it must
    come from the same trace and composite.
    """

    def __init__(self, model: nn.Module, traced: TracedProgram, composite: Composite, backend: str = "auto",
                 dynamic: bool = True, params: Any = None, capture: Any = None, mode: str | None = None,
                 promise_policy: str = DEFAULT_POLICY, *, analysis: Analysis | None = None):
        super().__init__()
        self._model_ref = [model]  # not a submodule: .to()/.eval() on the explainer never touch the model
        self.traced = traced
        self.composite = composite
        self._backend_request = backend  # "auto" is resolved again when recompile() changes the mode
        self.backend = resolve_backend(backend, self._device(), mode)
        self.dynamic = dynamic
        self.mode = mode  # torch.compile mode, e.g. "reduce-overhead" (CUDA graphs)
        self.promise_policy = promise_policy  # passes.resolve_promises.POLICIES
        if analysis is None:
            analysis = Analysis(traced, composite, params=params, capture=capture)
        elif analysis.traced is not traced or analysis.composite is not composite:
            raise ValueError("Explainer(analysis=...) must come from the same trace and composite")
        self.analysis = analysis
        self._report = PipelineReport(analysis.report.records)
        self._programs: dict[str, Program] = {}
        self._const_cache: dict[Any, torch.Tensor] = {}
        self.call_spec = CallSpec.from_traced(traced, analysis.graph, analysis.output_node)
        vals = {n.name: n.meta.get("val") for n in analysis.graph.graph.nodes if n.op == "placeholder"}
        #: (dtype, shape) of each state tensor as traced: a model changed after compile is refused, not mis-run
        self._state_specs = [
            (v.dtype, tuple(v.shape)) if isinstance(v, torch.Tensor) else None
            for v in (vals.get(ph) for ph, _kind, _target in traced.state_specs)
        ]
        self._call = CallPath(self.call_spec, self._run)
        self._params_arg, self._capture_arg = params, capture
        #: how to trace the model again at another input shape (set by :func:`compile`; ``None``: no variants)
        self._retrace: Callable[[tuple, dict], TracedProgram] | None = None
        #: explainers for input shapes this one's program is static in, most recently used last
        self._variants: list[Explainer] = []
        self._warned_shapes = False
        self.program("target")

    # -- construction -------------------------------------------------------------------------------------------
    @property
    def model(self) -> nn.Module:
        return self._model_ref[0]

    @property
    def pipeline(self) -> PipelineReport:
        """The passes that ran for this explainer, in order, with each pass's time and node counts (``print`` it).
        :data:`dynlrp_fx.passes.PIPELINE` is the list they come from."""
        return self._report

    def program(self, mode: str = "target") -> Program:
        """The program of a seed mode (``"target"`` or ``"seed"``), built through the pipeline on first use."""
        if mode not in ("target", "seed"):
            raise ValueError(f"seed mode must be 'target' or 'seed', got {mode!r}")
        prog = self._programs.get(mode)
        if prog is None:
            prog = build_program(self.analysis, mode, promise_policy=self.promise_policy, backend=self.backend,
                                 dynamic=self.dynamic, mode=self.mode, report=self._report)
            self._programs[mode] = prog
        return prog

    def recompile(
        self, *, backend: Any = None, mode: Any = "unchanged", promise_policy: str | None = None
    ) -> Explainer:
        """A new explainer for the same model, rules and inputs with another backend, ``torch.compile`` mode or
        memory policy, built without tracing or analysing the model again (the analysis is shared; with the same
        memory policy the lowered relevance programs are shared too, and only the backend compile differs).

        ``explainer.recompile(backend="inductor", mode="reduce-overhead")`` turns an eager explainer into a
        CUDA-graph one; arguments left out keep this explainer's values. This explainer is unchanged.
        """
        new_mode = self.mode if mode == "unchanged" else mode
        request = self._backend_request if backend is None else backend
        policy = self.promise_policy if promise_policy is None else promise_policy  # checked by resolve_promises
        new = Explainer(self.model, self.traced, self.composite, backend=request, dynamic=self.dynamic,
                        params=self._params_arg, capture=self._capture_arg, mode=new_mode, promise_policy=policy,
                        analysis=self.analysis)
        new._retrace = self._retrace
        return new

    def _device(self) -> torch.device | None:
        """Where the model runs: the device of the first example input tensor, else of the first parameter."""
        return next(
            (t.device for t in self.traced.example_flat if isinstance(t, torch.Tensor)),
            next((p.device for p in self.model.parameters()), None),
        )

    # -- inspection ---------------------------------------------------------------------------------------------
    def rule_table(self) -> list[dict[str, Any]]:
        """For every op node that depends on an explained input: module path, op, rule class and rule."""
        rows = []
        for node in self.analysis.graph.graph.nodes:
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
        return self.program(mode).graph

    @property
    def analysed_graph(self) -> torch.fx.GraphModule:
        """This explainer's analysed copy of the traced graph (annotations on ``node.meta["dynlrp"]``)."""
        return self.analysis.graph

    @property
    def input_names(self) -> list[str]:
        """Names of the inputs whose relevance is returned."""
        return list(self.program("target").input_names)

    # -- calling ------------------------------------------------------------------------------------------------
    def state_tensors(self, device: torch.device | None = None) -> list[torch.Tensor]:
        """The model's parameters, buffers and constants in the order the programs take them (read live, so the
        explainer follows weight updates); constants are moved to ``device`` once."""
        root = self.traced.module_root
        out = []
        for _ph, kind, target in self.traced.state_specs:
            if kind == "PARAMETER":
                t = _state(root.get_parameter, target, kind)
            elif kind == "BUFFER":
                t = _state(root.get_buffer, target, kind)
            else:
                t = self.traced.exported.constants[target]
                if device is not None and t.device != device:
                    key = (target, device)
                    if key not in self._const_cache:
                        self._const_cache[key] = t.to(device)
                    t = self._const_cache[key]
            out.append(t.detach())
        return out

    def _check_state(self, state: list[torch.Tensor]) -> None:
        """The model's parameters and buffers still have the dtypes and shapes the programs were traced with."""
        for t, spec, (_ph, kind, target) in zip(state, self._state_specs, self.traced.state_specs):
            if spec is not None and (t.dtype != spec[0] or tuple(t.shape) != spec[1]):
                raise DynlrpInputError(
                    f"{kind.lower()} {target!r} of the model is now {t.dtype} {tuple(t.shape)} but the explainer was "
                    f"compiled for {spec[0]} {spec[1]}: the model changed after compile (e.g. .to(dtype) or a "
                    "replaced layer); compile it again"
                )

    def bind(self, *args, **kwargs) -> list[torch.Tensor]:
        """The checked tensor inputs of a call (what the programs take after the state tensors)."""
        return self._call.bind(args, kwargs)

    def _run(self, mode: str, tensors: list[torch.Tensor], extra: torch.Tensor, batch: int):
        """The call path's runner: the program of ``mode`` on the live state tensors."""
        prog = self.program(mode)
        state = self.state_tensors(tensors[0].device if tensors else None)
        self._check_state(state)
        # torch specialises size-1 dims (conv backend choice, broadcasting), so a batch (or sequence) of 1 gets its
        # own static compilation the first time it is seen; every other size shares one dynamic program
        if self.backend != "eager" and self.dynamic:
            for x, s in zip(tensors, self.call_spec.inputs):
                for d, want in enumerate(s.shape):
                    if isinstance(want, str) and x.shape[d] > 1:
                        torch._dynamo.mark_dynamic(x, d)
            if batch > 1 and extra.ndim >= 1 and self.call_spec.output_batched and any(
                    s.batched and isinstance(s.shape[0], str) for s in self.call_spec.inputs):
                torch._dynamo.mark_dynamic(extra, 0)
        graphs = self.backend != "eager" and self.mode in ("reduce-overhead", "max-autotune")
        if graphs:  # CUDA graphs: a new step, so the previous call's static outputs may be reused
            torch.compiler.cudagraph_mark_step_begin()
        with torch.no_grad(), _oblivious():
            outs = prog.fn(*state, *tensors, extra)
        if graphs:  # the next replay overwrites the graph's output buffers: an Explanation owns its tensors
            outs = [o.clone() for o in outs]
        prog.calls += 1
        return outs, prog.outputs

    def forward(self, *args, target: Any = None, seed: torch.Tensor | None = None, **kwargs) -> Explanation:
        """Explain the model on these inputs.

        Parameters
        ----------
        *args, **kwargs: the model inputs (same structure as the example inputs; any batch size).
        target: ``None`` (argmax per sample), an int (same index for every sample), or one index per sample; the
            index is into the flattened per-sample output (the class for ``(batch, classes)`` outputs). The seed
            relevance is the output value at the target, so input relevance sums to the logit. An explained output
            without a batch dimension (a 0-d score, an output over graph nodes) is one sample per call: one int
            into the flattened output, or ``None``. With several explained outputs (``compile(...,
            output=["start_logits", "end_logits"])``): a dict output name -> target (outputs left out: argmax) or
            a tuple with one target per output; all are seeded together in one relevance sweep.
        seed: an explicit output-shaped relevance seed, used as is (one-hot reproduces Zennit's default); with
            several explained outputs a dict output name -> seed (or a tuple), one for every output.
        """
        paths = [self._call, *(v._call for v in reversed(self._variants))]  # most recently used variants first
        try:
            explanation, hit = explain_first_that_fits(paths, args, kwargs, target, seed)
        except DynlrpShapeError as e:
            if self._retrace is None:
                raise
            return self._variant(args, kwargs, e)._call.explain(args, kwargs, target, seed)
        if hit:
            self._variants.append(self._variants.pop(-hit))
        return explanation

    @property
    def variants(self) -> list[Explainer]:
        """The explainers built for input shapes outside this one's program (see :meth:`forward`), least recently
        used first; each has its own trace and programs, and the rules of this one."""
        return list(self._variants)

    def _variant(self, args: tuple, kwargs: dict, mismatch: DynlrpShapeError) -> Explainer:
        """Trace the model again at the shapes of this call and build (and cache) an explainer for them."""
        if not self._warned_shapes:
            self._warned_shapes = True
            static = ", ".join(f"{k}={v}" if v >= 0 else k for k, v in self.traced.specialised.items())
            why = (f"{type(self.model).__name__} specialised {static} when traced" if static else
                   "compiled with dynamic=False" if not self.dynamic else
                   "a size outside the range the model's ops allow" if "outside the range" in str(mismatch) else
                   "the program is static in some dimensions (only batch and token sequence lengths are dynamic)")
            shapes = {s.name: tuple(x.shape) for s, x in zip(self.call_spec.inputs, _tensor_leaves(args, kwargs))}
            warnings.warn(
                f"dynlrp: explaining inputs of shapes {shapes}, which the compiled program does not take ({why}): "
                f"the model is traced again for each new input shape on first use and the explainer cached (at most "
                f"{MAX_VARIANTS}), like a recompilation in torch.compile. First mismatch: {mismatch}",
                stacklevel=5,  # _variant <- forward <- Module._call_impl <- Module.__call__ <- the caller
            )
        try:
            traced = self._retrace(args, kwargs)
        except DynlrpTraceError as e:
            raise DynlrpShapeError(f"{mismatch}\nTracing the model again at this call's shapes failed: {e}") from e
        variant = Explainer(self.model, traced, self.composite, backend=self._backend_request, dynamic=self.dynamic,
                            params=self._params_arg, capture=self._capture_arg, mode=self.mode,
                            promise_policy=self.promise_policy)
        self._variants.append(variant)
        del self._variants[:-MAX_VARIANTS]  # the least recently used beyond the bound
        return variant


def _tensor_leaves(args: tuple, kwargs: dict) -> list[torch.Tensor]:
    """The tensor leaves of a call's inputs, in flat order (the order of ``CallSpec.inputs``)."""
    return [x for x in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(x, torch.Tensor)]


#: how many per-shape explainers one explainer keeps (least recently used ones are dropped beyond it)
MAX_VARIANTS = 16


def _state(get: Any, target: str, kind: str) -> torch.Tensor:
    """``root.get_parameter(target)`` / ``get_buffer``, with a clear error when the model no longer has it."""
    try:
        return get(target)
    except AttributeError as e:
        raise DynlrpInputError(
            f"the model no longer has the {kind.lower()} {target!r} it was compiled with ({e}); compile it again"
        ) from None


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
    output: which model output to explain: ``None`` (``logits`` if present, else the first floating tensor;
        integer and bool outputs such as an argmax, and non-tensor outputs, are skipped), an output name, a flat
        index, a list of names/indices (several outputs seeded together in one relevance sweep, each at its own
        target: ``output=["start_logits", "end_logits"]``; :attr:`Explanation.output` is then a dict), or a
        callable on the model output. Outputs the model writes in place (an updated buffer, a mutated input) are
        never explained. An output whose dimension 0 is not the batch (a 0-d score or loss) is explained as one
        sample per call.
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
        :mod:`dynlrp_fx.passes.resolve_promises`.

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
    explainer = Explainer(model, traced, composite, backend=backend, dynamic=dynamic, params=params, capture=capture,
                          mode=mode, promise_policy=promise_policy)
    static = frozenset(traced.specialised)  # a variant skips the dynamic dimensions this model is known to specialise
    explainer._retrace = lambda args, kwargs: trace(model, args, kwargs, output=output, dynamic=dynamic,
                                                    static_dims=static)
    return explainer


