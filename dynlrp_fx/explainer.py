"""The explainer: :func:`compile` builds an :class:`Explainer` (an ``nn.Module``) that returns :class:`Explanation` s.

An :class:`Explainer` is a thin module over three parts: its :class:`~dynlrp_fx.program.Analysis` (a private
analysed copy of the traced graph), its :class:`~dynlrp_fx.program.Program` s (one per seed mode, built on first
use through the pipeline) and the :class:`~dynlrp_fx.runtime.CallPath` that binds inputs and unpacks outputs, the
same one a loaded explainer uses.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from . import cache
from .errors import DynlrpInputError, DynlrpShapeError, DynlrpTraceError
from .multi import SplitProgram, split_program, sweep_size
from .passes import PIPELINE, CompileContext, PipelineReport
from .passes.pair import ProgramOutputs, Routed
from .passes.pipeline import PassRecord
from .passes.resolve_promises import DEFAULT_POLICY
from .presets import resolve
from .program import Analysis, Program, _public_prefix, _resolve_capture, build_program, compiled, routed_experts
from .progress import compile_progress
from .progress import stage as progress_stage
from .rules.composite import Composite
from .runtime import CallPath, CallSpec, Conservation, Explanation, explain_first_that_fits
from .targets import Features
from .trace import TracedProgram, _OutputWrapper, trace
from .weight_cache import WeightCache, split_state

__all__ = ["compile", "Explainer", "Explanation", "Conservation", "resolve_backend", "BACKENDS"]

BACKENDS = ("auto", "inductor", "eager")
#: torch.compile modes that capture CUDA graphs: their outputs are static buffers, overwritten by the next replay
_CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")


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

    def __init__(self, model: nn.Module, traced: TracedProgram | None, composite: Composite, backend: str = "auto",
                 dynamic: bool = True, params: Any = None, capture: Any = None, mode: str | None = None,
                 promise_policy: str = DEFAULT_POLICY, *, analysis: Analysis | None = None,
                 cached: _CacheLink | None = None, cache_weights: bool = True):
        super().__init__()
        self._model_ref = [model]  # not a submodule: .to()/.eval() on the explainer never touch the model
        self.composite = composite
        self._backend_request = backend  # "auto" is resolved again when recompile() changes the mode
        self.dynamic = dynamic
        self.mode = mode  # torch.compile mode, e.g. "reduce-overhead" (CUDA graphs)
        self.promise_policy = promise_policy  # passes.resolve_promises.POLICIES
        #: compute what depends on the weights alone once per weight change (:mod:`dynlrp_fx.weight_cache`)
        self.cache_weights = bool(cache_weights)
        self._runners: dict[str, tuple[Program, Any]] = {}  # seed mode -> (program, what runs it)
        self._params_arg, self._capture_arg = params, capture
        self._traced, self._analysis = traced, analysis
        #: the compile cache entry this explainer reads and writes its programs through (``None``: no cache)
        self._cache = cached
        self._programs: dict[str, Program] = {}
        #: (seed mode, conditions) -> the program cut for several targets per sample and condition= (see split())
        self._splits: dict[tuple, SplitProgram] = {}
        self._const_cache: dict[Any, torch.Tensor] = {}
        #: how to build an explainer for another input shape (set by :func:`compile`; ``None``: no variants)
        self._rebuild: Callable[[tuple, dict, frozenset], Explainer] | None = None
        #: explainers for input shapes this one's program is static in, most recently used last
        self._variants: list[Explainer] = []
        self._warned_shapes = False
        if traced is None:  # everything the call path needs comes from the compile cache; tracing waits until asked
            if cached is None or cached.entry is None:
                raise ValueError("Explainer(traced=None) needs a compile cache entry")
            self._device_hint = cached.device
            self.backend = resolve_backend(backend, self._device_hint, mode)
            self._report = PipelineReport()
            self._from_entry(cached.entry)
            self._programs["target"] = self._load_program("target", cached.entry)
            return
        self._device_hint = _device_of(traced.example_flat, model)
        self.backend = resolve_backend(backend, self._device_hint, mode)
        if analysis is not None and (analysis.traced is not traced or analysis.composite is not composite):
            raise ValueError("Explainer(analysis=...) must come from the same trace and composite")
        self._report = PipelineReport()
        self._from_trace()
        self.program("target")

    def _from_trace(self) -> None:
        """Call spec and state inputs from the trace and this explainer's analysis of it."""
        traced = self._traced
        # the analysis passes first, then what this explainer already did (cache loads, when it materialises late)
        self._report = PipelineReport([*self.analysis.report.records, *self._report.records])
        self.call_spec = CallSpec.from_traced(traced, self.analysis.graph, self.analysis.output_node)
        vals = {n.name: n.meta.get("val") for n in self.analysis.graph.graph.nodes if n.op == "placeholder"}
        #: (kind, target, dtype, shape) of each state input as traced: a model changed after compile is refused
        self._state_plan = []
        for ph, kind, target in traced.state_specs:
            v = vals.get(ph)
            spec = (v.dtype, tuple(v.shape)) if isinstance(v, torch.Tensor) else None
            self._state_plan.append((kind, target, spec))
        self._root_ref = [traced.module_root]  # a list: a module attribute would register the model as a submodule
        self._constants = traced.exported.constants
        self._specialised = dict(traced.specialised)
        self._call = CallPath(self.call_spec, self._run, self._run_targets)

    def _from_entry(self, entry: cache.Entry) -> None:
        """Call spec and state inputs from a compile cache entry (constants are read from the model when it holds
        a tensor of the same name, else from the entry)."""
        self.call_spec = entry.spec
        self._state_plan = list(entry.state_plan)
        self._root_ref = [_OutputWrapper(self.model, None) if entry.prefix else self.model]
        self._constants = {}
        for target, stored in entry.tensors.items():
            live = _tensor_at(self._root_ref[0], target)
            self._constants[target] = live if live is not None else stored
        self._specialised = dict(entry.specialised)
        self._call = CallPath(self.call_spec, self._run, self._run_targets)

    @property
    def traced(self) -> TracedProgram:
        """The model's trace (made now if this explainer came from the compile cache)."""
        if self._traced is None:
            self._materialise()
        return self._traced

    @property
    def analysis(self) -> Analysis:
        """This explainer's analysis of the trace (made on first use)."""
        if self._analysis is None:
            if self._traced is None:
                self._materialise()
            else:
                self._analysis = Analysis(self._traced, self.composite, params=self._params_arg,
                                          capture=self._capture_arg)
        return self._analysis

    def _materialise(self) -> None:
        """Trace and analyse the model for an explainer made from the compile cache (for :meth:`rule_table`,
        :meth:`graph`, a seed mode the cache lacks, export). Programs read from the cache are kept when the trace
        has the same state inputs; otherwise the cache trusted something that changed, and they are dropped."""
        cached_plan = [(k, t) for k, t, _ in self._state_plan]
        with compile_progress(None, type(self.model).__name__):
            progress_stage("trace (torch.export)")
            self._traced = self._cache.trace()
            self._analysis = Analysis(self._traced, self.composite, params=self._params_arg, capture=self._capture_arg)
        self._from_trace()
        if [(k, t) for k, t, _ in self._state_plan] != cached_plan:
            warnings.warn("dynlrp: the compile cache entry does not match the model's trace (the model depends on "
                          "something the cache key cannot see); its programs are replaced. Clear the cache with "
                          "`dynlrp cache clear`.", stacklevel=3)
            self._programs.clear()
            self._cache.drop()

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
        if prog is None and self._traced is None and (entry := self._cache.load(mode)) is not None:
            prog = self._load_program(mode, entry)
        if prog is None:
            prog = build_program(self.analysis, mode, promise_policy=self.promise_policy, backend=self.backend,
                                 dynamic=self.dynamic, mode=self.mode, report=self._report)
            if self._cache is not None:
                self._cache.save(mode, self, prog)
        self._programs[mode] = prog
        return prog

    def _load_program(self, mode: str, entry: cache.Entry) -> Program:
        """A program rebuilt from a compile cache entry, compiled for this explainer's backend."""
        t0 = time.perf_counter()
        runnable = entry.program
        outputs = ProgramOutputs(**{k: list(v) for k, v in entry.outputs.items()})
        fn = runnable if self.backend == "eager" else compiled(runnable, self.backend, self.dynamic, self.mode)
        seconds = time.perf_counter() - t0
        self._report.records.append(PassRecord("cache", f"cache[{mode}]", "load", True, seconds, 0,
                                               len(runnable.graph.nodes)))
        return Program(mode, None, fn, outputs, seconds, from_cache=True,
                       make_graph=lambda: self.analysis.lowered(mode, self.promise_policy)[0], runnable=runnable)

    def recompile(
        self, *, backend: Any = None, mode: Any = "unchanged", promise_policy: str | None = None,
        cache_weights: bool | None = None,
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
                        analysis=self.analysis,
                        cache_weights=self.cache_weights if cache_weights is None else cache_weights,
                        cached=self._cache.with_options(resolve_backend(request, self._device(), new_mode), policy)
                        if self._cache else None)
        new._rebuild = self._rebuild
        return new

    def _device(self) -> torch.device | None:
        """Where the model runs: the device of the first example input tensor, else of the first parameter."""
        return self._device_hint

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
        """The lowered forward+relevance graph (pure ATen, functional, with fake values on its nodes) for a seed
        mode (``"target"`` or ``"seed"``); for a program read from the compile cache it is made by tracing and
        lowering the model now."""
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
        out = []
        root = self._root_ref[0]
        owners: dict[str, Any] = {}  # module path -> module, walked once per call
        for kind, target, _spec in self._state_plan:
            if kind in ("PARAMETER", "BUFFER"):
                # the owner's _parameters/_buffers dict read directly: get_parameter walks the path through
                # nn.Module.__getattr__ for each of the hundreds of tensors (~7 ms per ResNet-50 call); anything
                # unusual (a missing entry, a None, a parameter stored as a buffer) takes get_parameter's checks
                path, _, name = target.rpartition(".")
                t = _registered(_owner(root, path, owners), name, kind)
                if t is None:
                    t = _state(root.get_parameter if kind == "PARAMETER" else root.get_buffer, target, kind)
            else:
                t = self._constants[target]
                if device is not None and t.device != device:
                    key = (target, device)
                    if key not in self._const_cache:
                        self._const_cache[key] = t.to(device)
                    t = self._const_cache[key]
            out.append(t.detach())
        return out

    def _check_state(self, state: list[torch.Tensor]) -> None:
        """The model's parameters and buffers still have the dtypes and shapes the programs were traced with."""
        for t, (kind, target, spec) in zip(state, self._state_plan):
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
        graphs = self.backend != "eager" and self.mode in _CUDA_GRAPH_MODES
        if graphs:  # CUDA graphs: a new step, so the previous call's static outputs may be reused
            torch.compiler.cudagraph_mark_step_begin()
        run = self._runner(mode, prog)
        with torch.no_grad(), _oblivious():
            outs = run(*state, *tensors, extra)
        if graphs:  # the next replay overwrites the graph's output buffers: an Explanation owns its tensors
            outs = [o.clone() for o in outs]
        prog.calls += 1
        return outs, prog.outputs

    def _runner(self, mode: str, prog: Program) -> Any:
        """What runs ``prog``: its compiled form, or with ``cache_weights`` a :class:`~dynlrp_fx.weight_cache.
        WeightCache` over its cut into a prologue (the values that depend on the weights alone) and the rest.
        CUDA-graph modes keep the whole program (their replays copy every non-parameter input)."""
        entry = self._runners.get(mode)
        if entry is not None and entry[0] is prog:
            return entry[1]
        run = self._weight_cached(prog.runnable, self.mode) if prog.runnable is not None else None
        self._runners[mode] = (prog, run or prog.fn)
        return run or prog.fn

    def _weight_cached(self, runnable: Any, mode: str | None) -> WeightCache | None:
        """A :class:`~dynlrp_fx.weight_cache.WeightCache` over ``runnable`` (a graph whose first inputs are the
        model's state), its main part compiled for this explainer's backend in torch.compile ``mode``; ``None``
        with ``cache_weights=False``, under CUDA graphs, or when nothing depends on the weights alone."""
        if not self.cache_weights or (self.backend != "eager" and mode in _CUDA_GRAPH_MODES):
            return None
        split = split_state(runnable, len(self._state_plan))
        if split is None:
            return None
        return WeightCache(split, split.main if self.backend == "eager" else compiled(split.main, self.backend,
                                                                                      self.dynamic, mode))

    @property
    def weight_cache_bytes(self) -> int:
        """Bytes held between calls by the values this explainer computed from the weights alone (batch-norm
        folds, modified weights; see :mod:`dynlrp_fx.weight_cache`); 0 with ``cache_weights=False``."""
        runs = [run for _, run in self._runners.values()] + [sp.forward for sp in self._splits.values()]
        return sum(run.nbytes for run in runs if isinstance(run, WeightCache))

    def split(self, mode: str = "target", conditions: tuple = ()) -> SplitProgram:
        """The program of a seed mode cut into a forward and a relevance graph, compiled for this explainer's
        backend (made on first use; see :mod:`dynlrp_fx.multi`). This is what several targets per sample and
        ``condition=`` run; ``conditions`` (``((path, node name, dim), ...)``) selects a conditioned program."""
        sp = self._splits.get((mode, conditions))
        if sp is None:
            if conditions:  # a program with condition masks: lowered from the analysis, not cached on disk
                graph, outputs, synth = self.analysis.lowered(mode, self.promise_policy, conditions)
                self._report.records.extend(synth.records)
            else:
                prog = self.program(mode)
                graph, outputs = prog.graph, prog.outputs
            inputs = [n for n in graph.graph.nodes if n.op == "placeholder"]
            n_state = len(self._state_plan)
            bsym = None
            for s, ph in zip(self.call_spec.inputs, inputs[n_state:]):
                v = ph.meta.get("val")
                if s.batched and isinstance(v, torch.Tensor) and v.ndim and isinstance(v.shape[0], torch.SymInt):
                    bsym = v.shape[0].node.expr
                    break
            sp = split_program(graph, outputs, n_state + len(self.call_spec.inputs), bsym)
            if self.backend == "eager":  # the backend stage (buffer reuse) on each half
                fwd = PIPELINE.run(sp.forward_graph, CompileContext(backend="eager", state_inputs=n_state),
                                   stage="backend", report=self._report, label=f"backend[{mode} forward half]")
                sp.forward = self._weight_cached(fwd, None) or fwd
                sp.relevance = PIPELINE.run(sp.relevance_graph, CompileContext(backend="eager"), stage="backend",
                                            report=self._report, label=f"backend[{mode} relevance half]")
            else:  # CUDA-graph modes would replay over the forward values between sweeps: plain compiles
                mode_ = None if self.mode in _CUDA_GRAPH_MODES else self.mode
                sp.forward = (self._weight_cached(sp.forward_graph, mode_)
                              or compiled(sp.forward_graph, self.backend, self.dynamic, mode_))
                sp.relevance = compiled(sp.relevance_graph, self.backend, self.dynamic, mode_)
            self._splits[(mode, conditions)] = sp
        return sp

    def _run_targets(self, mode: str, tensors: list[torch.Tensor], extra: torch.Tensor, batch: int, k: int,
                     sweep_batch: int | None, condition: Any = None, masks: tuple | None = None):
        """The call path's multi-target runner: the forward graph once, then the relevance graph over the targets
        in sweeps of as many as fit (one at a time where the program cannot widen its batch). ``condition`` is
        the call's ``condition=``; ``masks`` (``(conditions key, [(batch * k, C) masks])``) gives rows directly."""
        if condition is not None:
            key, per_sample = self._condition_masks(condition, batch, tensors[0].device if tensors else None)
            masks = (key, [m.repeat_interleave(k, 0) for m in per_sample])
        key, mask_rows = masks if masks is not None else ((), [])
        sp = self.split(mode, key)
        state = self.state_tensors(tensors[0].device if tensors else None)
        self._check_state(state)
        program_inputs = [*state, *tensors]
        row_inputs = [extra, *mask_rows]
        with torch.no_grad(), _oblivious():
            fwd = list(sp.forward(*program_inputs))
            cut = sp.cut_inputs(program_inputs, fwd[sp.n_outputs:])
            per = sweep_size(sp, cut, batch, k, sweep_batch, tensors[0].device if tensors else self._device())
            rows = [r.reshape(batch, k, *r.shape[1:]) for r in row_inputs]
            parts = []
            for j in range(0, k, per):
                kc = min(per, k - j)
                chunk = [r[:, j : j + kc].reshape(batch * kc, *r.shape[2:]) for r in rows]
                parts.append((kc, list(sp.relevance(kc, batch, *cut, *chunk))))
        names = sp.outputs
        batched = {s.name: s.batched for s in self.call_spec.inputs}
        # which outputs have a row per (sample, target): the ledger, batched inputs' and captured relevance;
        # params= and inputs without a batch are one value per call, stacked over the targets in front
        rowwise = [True, True, *(batched.get(n, True) for n in names.input_names),
                   *(False for _ in names.param_names), *(True for _ in names.capture_names),
                   *(True for _ in names.condition_names)]
        labels = ["seed", "absorbed", *names.input_names, *names.param_names, *names.capture_names,
                  *names.condition_names]
        out = []
        for i, per_sample in enumerate(rowwise):
            if per_sample and any(res[i].ndim == 0 or res[i].shape[0] != batch * kc for kc, res in parts):
                # a captured node whose rows merge the batch with other dims (a mixture-of-experts layer's
                # (tokens, hidden)): its rows cannot be told apart per target here
                raise DynlrpInputError(
                    f"capture: the relevance of {labels[i]!r} has shape {tuple(parts[0][1][i].shape)}, whose first "
                    f"dim merges the batch ({batch}) with other dims; such a capture works with one target per "
                    "sample and no condition=. Capture a module whose output has the batch first, or make "
                    "separate calls."
                )
            if per_sample:
                out.append(torch.cat([res[i].reshape(batch, kc, *res[i].shape[1:]) for kc, res in parts], 1))
            else:
                out.append(torch.stack([res[i] for _, res in parts], 0))
        if not key:
            self.program(mode).calls += 1
        return [*fwd[: sp.n_outputs], *out], sp.outputs

    def _condition_masks(self, condition: Any, batch: int, device: Any) -> tuple[tuple, list[torch.Tensor]]:
        """``condition=`` -> the conditions key ``((path, node name, dim), ...)`` and one ``(batch, C)`` mask per
        conditioned module (see :meth:`forward`)."""
        if not isinstance(condition, Mapping) or not condition:
            raise DynlrpInputError(
                f"condition= must be a dict module path -> features (e.g. {{'layer3': [0, 5]}}), got {condition!r}"
            )
        key, masks = [], []
        for path, spec in condition.items():
            node_name, dim, size, dtype = self._feature_axis(path, spec.dim if isinstance(spec, Features) else None)
            index = spec.index if isinstance(spec, Features) else spec
            key.append((path, node_name, dim))
            masks.append(_feature_mask(index, batch, size, dtype, device, path))
        return tuple(key), masks

    def _feature_axis(self, path: str, dim: int | None) -> tuple[str, int | Routed, int, torch.dtype]:
        """``(node name, feature dim, its size, mask dtype)`` of module ``path``'s output; ``dim`` ``None``: the
        channels of a 4-D/5-D output (dim 1), else the last dim (hidden units, or per-head features). For a
        mixture-of-experts layer (a module with ``num_experts``) the features are its experts: the node is its
        ``(N, k, H)`` top-k contributions and the "dim" a :class:`~dynlrp_fx.passes.pair.Routed`."""
        node_name = _resolve_capture(self.traced, self.analysis.graph, [path])[path]
        experts = self._experts_axis(path, dim)
        if experts is not None:
            return experts
        node = next(n for n in self.analysis.graph.graph.nodes if n.name == node_name)
        v = node.meta.get("val")
        if not isinstance(v, torch.Tensor) or v.ndim < 2:
            raise DynlrpInputError(f"condition: the output of {path!r} is not a batched tensor with features")
        whole = node.meta.get("dynlrp_narrowed")
        if whole is not None and dim is not None:  # narrowed to one row: only the last dim is still there
            if int(dim) % len(whole) != len(whole) - 1:
                raise DynlrpInputError(
                    f"condition: only one row of {path!r}'s output {tuple(whole)} reaches the explained output (a "
                    f"select reads it), so the program computes that row alone, shape {tuple(v.shape)}; condition "
                    f"its last dim, or compile with capture=[{path!r}] to keep the output whole"
                )
            dim = -1
        d = (1 if v.ndim >= 4 else v.ndim - 1) if dim is None else int(dim) % v.ndim
        if d == 0:
            raise DynlrpInputError(f"condition: dim 0 of {path!r} is the batch; choose a feature dim")
        size = v.shape[d]
        if not isinstance(size, int):
            raise DynlrpInputError(f"condition: dim {d} of {path!r}'s output has a dynamic size ({size}); choose "
                                   "a feature dim of fixed size")
        return node_name, d, size, torch.promote_types(v.dtype, torch.float32)

    def _experts_axis(self, path: str, dim: int | None) -> tuple[str, Routed, int, torch.dtype] | None:
        """:meth:`_feature_axis` for a mixture-of-experts layer (``None``: ``path`` is not one)."""
        try:
            module = self.model.get_submodule(path)
        except AttributeError:
            return None
        experts = getattr(module, "num_experts", None)
        if not isinstance(experts, int) or isinstance(experts, bool) or experts < 1:
            return None
        if dim is not None:
            raise DynlrpInputError(f"condition: {path!r} is a mixture-of-experts layer whose features are its "
                                   f"{experts} experts; give expert indices without a dim")
        found = routed_experts(self.analysis.graph, _public_prefix(self.traced) + path)
        if found is None:
            impl = getattr(getattr(module, "config", None), "_experts_implementation", None)
            raise DynlrpInputError(
                f"condition: {path!r} has {experts} experts, but its traced ops do not end in a sum over top-k "
                f"contributions ((tokens, k, hidden) summed over k, with the router's (tokens, k) expert ids read "
                f"from outside){f' (experts implementation {impl!r})' if impl else ''}; transformers' default "
                "'grouped_mm' and 'batched_mm' implementations do. Condition the experts' input or output module "
                "instead, or use one of those implementations."
            )
        contrib, ids = found
        v = contrib.meta["val"]
        return contrib.name, Routed(ids.name, experts), experts, torch.promote_types(v.dtype, torch.float32)

    def concepts(self, *args, target: Any = None, layer: str, channels: Any = None, dim: int | None = None,
                 sweep_batch: int | None = None, **kwargs) -> ConceptExplanation:
        """Concept relevance (CRP, Achtibat et al. 2023): one input heatmap per feature of ``layer``'s output, in
        one forward pass and one batched sweep.

        Each heatmap is the relevance of the explained target that flows through one channel (``dim`` as in
        ``condition=``: channels of a conv output, hidden units or per-head features of a transformer's, the
        experts of a mixture-of-experts layer); where
        ``layer`` is a cut of the graph (every path from the input to the output passes through it) the heatmaps
        sum to the unconditional relevance. Where it is not (a residual block's branch), relevance that bypasses
        the layer is in every heatmap: ``explainer(x, target=t, condition={layer: torch.zeros(C)})`` is that share. ``channels`` (default: all) picks the features; ``target`` is one
        target per sample (as in :meth:`forward`).
        Returns a :class:`ConceptExplanation`: ``heatmaps`` ``(B, C, *x.shape[1:])``, ``relevance`` ``(B, C)`` (the
        relevance reaching each channel: a channel's share of the target), ``channels``.
        """
        tensors = self._call.bind(args, kwargs)
        batch = self._call.batch_size(tensors)
        device = tensors[0].device if tensors else None
        node_name, d, size, dtype = self._feature_axis(layer, dim)
        chans = list(range(size)) if channels is None else [int(c) for c in torch.as_tensor(channels).reshape(-1)]
        if not chans or any(not 0 <= c < size for c in chans):
            raise DynlrpInputError(f"concepts: channels {chans[:8]} out of range for {layer!r} ({size} features)")
        k = len(chans)
        if isinstance(target, torch.Tensor) and target.ndim == 2 or self._call.targets_per_sample(target, None):
            raise DynlrpInputError("concepts() takes one target per sample (the channels are the second axis)")
        extra = self._call.multi_target_tensor(target, batch, k, device)
        onehot = torch.zeros(k, size, dtype=dtype, device=device)
        onehot[torch.arange(k), torch.tensor(chans)] = 1
        masks = (((layer, node_name, d),), [onehot.repeat(batch, 1)])
        outs, names = self._run_targets("target", tensors, extra, batch, k, sweep_batch, masks=masks)
        expl = self._call.unpack(outs, names, k=k)
        per_channel = expl.conditioned[layer]  # (B, K, C): relevance at the layer per feature, before each mask
        rel = per_channel[:, torch.arange(k), torch.tensor(chans)]
        return ConceptExplanation(chans, expl.relevance, rel, expl)

    def forward(self, *args, target: Any = None, seed: torch.Tensor | None = None, sweep_batch: int | None = None,
                condition: Any = None, **kwargs) -> Explanation:
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

        **Several targets per sample.** ``target=`` of shape ``(B, K)`` (or a seed with a target axis after the
        batch, ``(B, K, *output.shape[1:])``) explains ``K`` targets of every sample with one forward pass and one
        relevance sweep over ``B * K`` rows: the relevance gets a target axis, ``(B, K, *x.shape[1:])``, and the
        ledger is per (sample, target); the result equals ``K`` separate calls. ``sweep_batch`` bounds the rows of
        one sweep (the targets are then swept in chunks; default: on a CPU 2 rows, where wider sweeps measured
        slower; on a GPU as many as keep the widened forward values under ``DYNLRP_SWEEP_BYTES``, 2 GiB). With several explained outputs, a ``(B, K)`` target for one output and one
        index per sample for another seeds both at each of the K targets. See :mod:`dynlrp_fx.multi`.

        **Conditions (CRP).** ``condition={"layer3": [0, 5]}`` keeps only the relevance that flows through features
        0 and 5 of module ``layer3``'s output (channels of a conv output: dim 1; else the last dim; use
        ``dynlrp.targets.Features(index, dim=)`` for another dim; a float/bool mask ``(C,)`` or ``(B, C)`` weights
        the features per sample). The features of a mixture-of-experts layer (a module with ``num_experts``, such
        as transformers' ``...mlp.experts``) are its experts: ``condition={"model.layers.3.mlp.experts": [2]}``
        keeps the relevance of the top-k slots routed to expert 2, per token. What the mask removes is absorbed in
        the ledger; ``Explanation.conditioned[path]`` is the relevance that reached each feature. The first call
        with a new set of conditioned modules builds a program for it (the trace is reused). See :meth:`concepts`
        for one heatmap per channel (or expert).
        """
        paths = [self._call, *(v._call for v in reversed(self._variants))]  # most recently used variants first
        try:
            explanation, hit = explain_first_that_fits(paths, args, kwargs, target, seed, sweep_batch, condition)
        except DynlrpShapeError as e:
            if self._rebuild is None:
                raise
            return self._variant(args, kwargs, e)._call.explain(args, kwargs, target, seed, sweep_batch, condition)
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
            static = ", ".join(f"{k}={v}" if v >= 0 else k for k, v in self._specialised.items())
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
            variant = self._rebuild(args, kwargs, frozenset(self._specialised))
        except DynlrpTraceError as e:
            raise DynlrpShapeError(f"{mismatch}\nTracing the model again at this call's shapes failed: {e}") from e
        variant.cache_weights = self.cache_weights  # (runners are made at the first call; recompile may change it)
        self._variants.append(variant)
        del self._variants[:-MAX_VARIANTS]  # the least recently used beyond the bound
        return variant


def _tensor_leaves(args: tuple, kwargs: dict) -> list[torch.Tensor]:
    """The tensor leaves of a call's inputs, in flat order (the order of ``CallSpec.inputs``)."""
    return [x for x in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(x, torch.Tensor)]


#: how many per-shape explainers one explainer keeps (least recently used ones are dropped beyond it)
MAX_VARIANTS = 16


def _owner(root: torch.nn.Module, path: str, memo: dict[str, Any]) -> Any:
    """The submodule at ``path`` (``""``: ``root``) through the ``_modules`` dicts, prefixes memoised in ``memo``;
    ``None`` where the path no longer leads to a module."""
    if path in memo:
        return memo[path]
    if not path:
        mod = root
    else:
        parent, _, atom = path.rpartition(".")
        base = _owner(root, parent, memo)
        mod = base._modules.get(atom) if isinstance(base, torch.nn.Module) else None
    memo[path] = mod
    return mod


def _registered(mod: Any, name: str, kind: str) -> torch.Tensor | None:
    """``mod``'s registered parameter (``kind == "PARAMETER"``) or buffer ``name``, or ``None`` when it has none."""
    if mod is None:
        return None
    t = (mod._parameters if kind == "PARAMETER" else mod._buffers).get(name)
    return t if isinstance(t, torch.Tensor) else None


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
    cache: bool | None = None,
    progress: bool | None = None,
    cache_weights: bool = True,
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
    cache: read and write the persistent compile cache (:mod:`dynlrp_fx.cache`): a compile of the same model
        code, configuration, parameter shapes, input spec and options (in this or another process) reads its
        program from disk instead of tracing the model. ``None`` (default) uses it unless ``DYNLRP_CACHE=0``;
        weights are never part of the key (programs read the live parameters). Not used with ``dynamic_shapes=``.
    progress: show a progress bar over the compile's stages (tracing, passes, backend) once it runs longer than
        2 s: ``None`` (default) when standard error is a terminal or ``DYNLRP_PROGRESS=1``; ``True``/``False``.
    cache_weights: compute what the program derives from the weights alone (a batch norm folded into a
        convolution, the gamma rule's modified weights) once, and again only after a parameter or buffer changes
        (written in place, e.g. by an optimiser step or ``load_state_dict``, or replaced); default ``True``. The
        values stay in memory between calls (:attr:`Explainer.weight_cache_bytes`; up to about twice the
        model's weights under ``epsilon_gamma_box``); ``False`` recomputes them at every call. See
        :mod:`dynlrp_fx.weight_cache`.

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
    args = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    options = _Options(composite, output, backend, dynamic, dynamic_shapes, params, capture, mode, promise_policy,
                       cache, bool(cache_weights))
    with compile_progress(progress, type(model).__name__):
        return _build(model, args, dict(example_kwargs or {}), options, frozenset())


@dataclass(frozen=True)
class _Options:
    """The options of one :func:`compile` call, shared by the explainers it builds for other input shapes."""

    composite: Composite
    output: Any
    backend: Any
    dynamic: bool
    dynamic_shapes: Any
    params: Any
    capture: Any
    mode: str | None
    promise_policy: str
    cache: bool | None
    cache_weights: bool = True  #: not part of the cache key: it changes how a program runs, not the program

    def key_data(self, backend: Any, policy: str, static: frozenset[str]) -> dict[str, Any]:
        """What of these options determines a program (the compile cache key's options part); the backend counts
        only as eager (the stored program reuses buffers) or compiled (the functional program)."""
        return {"rules": self.composite, "output": self.output, "dynamic": self.dynamic, "params": self.params,
                "capture": self.capture, "promise_policy": policy, "static": sorted(static),
                "backend": "eager" if backend == "eager" else "compiled"}


def _build(model: nn.Module, args: tuple, kwargs: dict, o: _Options, static: frozenset[str]) -> Explainer:
    """An explainer for these example inputs: its target program from the compile cache when there is one that
    takes them, else traced and compiled (and stored); ``static`` names dimensions the model is known to
    specialise (a variant for another input shape)."""
    device = _device_of(torch.utils._pytree.tree_leaves((args, kwargs)), model)
    backend = resolve_backend(o.backend, device, o.mode)

    def trace_now() -> TracedProgram:
        return trace(model, args, kwargs, output=o.output, dynamic=o.dynamic, dynamic_shapes=o.dynamic_shapes,
                     static_dims=static)

    progress_stage("compile cache")
    link = _CacheLink.open(model, args, kwargs, o, backend, static, trace_now, device)
    common = dict(backend=o.backend, dynamic=o.dynamic, params=o.params, capture=o.capture, mode=o.mode,
                  promise_policy=o.promise_policy, cached=link, cache_weights=o.cache_weights)
    if link is not None and link.entry is not None:
        explainer = Explainer(model, None, o.composite, **common)
    else:
        progress_stage("trace (torch.export)")
        explainer = Explainer(model, trace_now(), o.composite, **common)
    explainer._rebuild = lambda a, k, st: _build(model, a, k, o, st)
    return explainer


#: the fields of ProgramOutputs a cache entry stores
_OUTPUT_FIELDS = tuple(f.name for f in dataclasses.fields(ProgramOutputs))


class _CacheLink:
    """An explainer's place in the compile cache: the key of its compile and how to trace the model when the
    cache does not have what is asked (see :mod:`dynlrp_fx.cache`).

    Two keys are tried: one that leaves out the sizes of the dimensions traced dynamic (so any batch size or
    text length finds a program that takes it) and one with every size (for a model that specialised one). An
    entry counts only if the example inputs pass its call spec's checks."""

    def __init__(self, keys: dict[str, str], key_of: Callable[[Any, str], dict[str, str]], trace: Callable[[], Any],
                 device: Any):
        self.keys, self._key_of, self.trace, self.device = keys, key_of, trace, device
        self.key: str | None = None  #: the key in use (set by a hit, or when the first program is stored)
        self.entry: cache.Entry | None = None  #: the target program's entry, on a hit

    @classmethod
    def open(cls, model: nn.Module, args: tuple, kwargs: dict, o: _Options, backend: Any, static: frozenset[str],
             trace: Callable[[], Any], device: Any, lookup: bool = True) -> _CacheLink | None:
        """The link of one compile (``None`` when the cache is off, or the compile cannot be keyed)."""
        if not cache.enabled(o.cache) or o.dynamic_shapes is not None:
            return None
        flat = torch.utils._pytree.tree_leaves((args, kwargs))
        dims = _dynamic_dims(flat, o.dynamic, static)

        def key_of(backend: Any, policy: str) -> dict[str, str]:
            opts = o.key_data(backend, policy, static)
            return {"dynamic": cache.fingerprint(tree, cache.input_spec(args, kwargs, dims), opts),
                    "exact": cache.fingerprint(tree, cache.input_spec(args, kwargs, {}), opts)}

        try:
            tree = cache.model_data(model)
            link = cls(key_of(backend, o.promise_policy), key_of, trace, device)
        except cache.Unkeyable as e:
            warnings.warn(f"dynlrp: this compile is not cached: {e}", stacklevel=4)
            return None
        if lookup:
            for key in link.keys.values():
                entry = cache.load(key, "target")
                if entry is not None and _takes(entry, args, kwargs):
                    link.key, link.entry = key, entry
                    break
        return link

    def load(self, mode: str) -> cache.Entry | None:
        return cache.load(self.key, mode) if self.key is not None else None

    def save(self, mode: str, explainer: Explainer, prog: Program) -> None:
        """Store a program made by the pipeline (once the key is known: the exact one if the model specialised
        a dynamic dimension)."""
        if self.key is None:
            self.key = self.keys["exact" if explainer._specialised else "dynamic"]
        try:
            entry = _entry_of(explainer, prog)
        except cache.Unkeyable as e:
            warnings.warn(f"dynlrp: this program is not cached: {e}", stacklevel=4)
            return
        cache.store(self.key, mode, entry)

    def drop(self) -> None:
        """Remove this key's entries (they did not match the model's trace)."""
        if self.key is not None:
            cache.remove(self.key)

    def with_options(self, backend: Any, policy: str) -> _CacheLink:
        """The link of a recompiled explainer (``backend``: its resolved backend; memory policy): same model and
        inputs."""
        return _CacheLink(self._key_of(backend, policy), self._key_of, self.trace, self.device)


def _dynamic_dims(flat: list, dynamic: bool, static: frozenset[str]) -> dict[int, dict[int, str]]:
    """{leaf index: {dim: role}} of the dimensions the default dynamic plan traces dynamic (see
    ``trace._DynamicPlan``): dimension 0 of every tensor (batch; a batch of 1 is traced as 2), dimension 1 of an
    integer tensor of rank >= 2 of length >= 2 (a sequence)."""
    out: dict[int, dict[int, str]] = {}
    if not dynamic:
        return out
    for i, x in enumerate(flat):
        if not isinstance(x, torch.Tensor) or x.ndim == 0:
            continue
        dims = {}
        if "batch" not in static and x.shape[0] >= 1:
            dims[0] = "batch"
        if x.ndim >= 2 and not (x.dtype.is_floating_point or x.dtype.is_complex or x.dtype == torch.bool) and (
                x.shape[1] >= 2 and not any(s.startswith("seq") for s in static)):
            dims[1] = "seq"
        if dims:
            out[i] = dims
    return out


def _takes(entry: cache.Entry, args: tuple, kwargs: dict) -> bool:
    """Whether the program of a cache entry takes these example inputs (their sizes pass its call spec)."""
    try:
        CallPath(entry.spec, None).bind(args, kwargs)
    except (DynlrpShapeError, DynlrpInputError):
        return False
    return True


def _entry_of(explainer: Explainer, prog: Program) -> cache.Entry:
    """The cache entry of a program the pipeline made."""
    graph = prog.fn if explainer.backend == "eager" else prog.graph
    state = [[kind, target, str(spec[0]).removeprefix("torch.") if spec else None, list(spec[1]) if spec else None]
             for kind, target, spec in explainer._state_plan]
    constants = {t: cache.tensor_to_data(explainer._constants[t]) for k, t, _ in explainer._state_plan
                 if k not in ("PARAMETER", "BUFFER")}
    return cache.Entry(call_spec=cache.call_spec_to_data(explainer.call_spec), state=state,
                       graph=cache.graph_to_data(graph),
                       outputs={f: list(getattr(prog.outputs, f)) for f in _OUTPUT_FIELDS}, constants=constants,
                       prefix="model." if isinstance(explainer._root_ref[0], _OutputWrapper) else "",
                       specialised=dict(explainer._specialised))


def _device_of(leaves: list, model: nn.Module) -> torch.device | None:
    """The device of the first tensor among example input leaves, else of the model's first parameter."""
    return next((t.device for t in leaves if isinstance(t, torch.Tensor)),
                next((p.device for p in model.parameters()), None))


def _tensor_at(root: nn.Module, target: str) -> torch.Tensor | None:
    """The tensor the model holds at a dotted attribute path (a buffer or plain tensor attribute), or ``None``."""
    obj: Any = root
    for part in target.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj if isinstance(obj, torch.Tensor) else None


@dataclass
class ConceptExplanation:
    """What :meth:`Explainer.concepts` returns: ``heatmaps`` (``(B, C, *x.shape[1:])``, one input relevance map per
    channel), ``relevance`` (``(B, C)``, the relevance reaching each channel) for ``channels`` (the feature indices,
    in order), and the full :class:`Explanation` (ledger per (sample, channel))."""

    channels: list[int]
    heatmaps: torch.Tensor
    relevance: torch.Tensor
    explanation: Explanation


def _feature_mask(index: Any, batch: int, size: int, dtype: torch.dtype, device: Any, path: str) -> torch.Tensor:
    """A ``condition=`` value as a ``(batch, size)`` mask: feature indices (int, list, integer tensor) select, a
    float/bool tensor ``(size,)`` or ``(batch, size)`` weights."""
    if index is None:  # every feature: the explanation is unchanged, Explanation.conditioned reports the features
        return torch.ones(batch, size, dtype=dtype, device=device)
    t = torch.as_tensor(index, device=device) if not isinstance(index, torch.Tensor) else index.to(device)
    if t.dtype == torch.bool or t.dtype.is_floating_point:
        if tuple(t.shape) not in ((size,), (batch, size)):
            raise DynlrpInputError(f"condition mask for {path!r} has shape {tuple(t.shape)}; expected ({size},) or "
                                   f"({batch}, {size})")
        return t.to(dtype).expand(batch, size).contiguous()
    idx = t.reshape(-1).long()
    if idx.numel() == 0 or bool(((idx < 0) | (idx >= size)).any()):
        raise DynlrpInputError(f"condition for {path!r}: feature indices {idx.tolist()[:8]} out of range "
                               f"[0, {size})")
    mask = torch.zeros(size, dtype=dtype, device=device)
    mask[idx] = 1
    return mask.expand(batch, size).contiguous()
