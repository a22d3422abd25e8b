"""The methods compared: forward, gradient x input (eager, compiled), our explainer, Zennit, Captum, LXT.

Each ``make_*`` returns a zero-argument callable that explains one batch (or raises ``Unavailable`` with the
reason). All methods explain the same scalar per sample: the model output at the argmax of the flattened
per-sample output. Parameters are frozen (``requires_grad=False``) for every method, so gradient baselines
compute input gradients only (the fastest fair gradient).

Our variants: ``ours_eager`` (eager backend, ``keep`` memory policy), ``ours_eager_recompute`` (eager, ``recompute``,
the default policy), ``ours_inductor`` / ``ours_inductor_cg`` (Inductor, without / with CUDA graphs, default
policy), ``ours_egb_eager`` (EpsilonGammaBox, eager, default policy). The H200 table of 2026-11-26 predates the
default change: there every variant but ``ours_eager_recompute`` used ``keep``.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from typing import Any

import torch

from .models import BenchModel

__all__ = ["Unavailable", "METHODS", "make_method"]


_EXPLAINERS: dict[tuple, Any] = {}


class Unavailable(Exception):
    """A method cannot run on this model/device (the message says why)."""


def _target_scalar(y: torch.Tensor) -> torch.Tensor:
    flat = y.reshape(y.shape[0], -1)
    return flat.gather(1, flat.argmax(1, keepdim=True)).sum()


def _forward(bm: BenchModel, args: tuple, kwargs: dict) -> Callable[[], Any]:
    def run():
        with torch.no_grad():
            return bm.model(*args, **kwargs)

    return run


_COMPILED: dict[int, Any] = {}


def _gxi(bm: BenchModel, args: tuple, kwargs: dict, compiled: bool) -> Callable[[], Any]:
    model = bm.model
    if compiled:  # one dynamic-shape compilation per model serves every batch size (as ours does)
        if id(bm.model) not in _COMPILED:
            _COMPILED.clear()
            _COMPILED[id(bm.model)] = torch.compile(bm.model, dynamic=True)
        model = _COMPILED[id(bm.model)]
    if bm.embed is None:

        def run():
            x = args[0].detach().requires_grad_()
            y = model(x, *args[1:], **kwargs)
            (g,) = torch.autograd.grad(_target_scalar(y), x)
            return g * x.detach()

        return run

    def run_text():
        kw = dict(kwargs)
        ids = kw.pop("input_ids")
        with torch.no_grad():
            emb = bm.model.get_input_embeddings()(ids)
        e = emb.requires_grad_()
        y = model(inputs_embeds=e, **kw).logits
        (g,) = torch.autograd.grad(_target_scalar(y), e)
        return (g * emb.detach()).sum(-1)

    return run_text


def _ours(
    bm: BenchModel, args: tuple, kwargs: dict, backend: str, mode: str | None, policy: str, info: dict, rules=None
):
    import dynlrp_fx as dynlrp

    rules_name = getattr(rules, "name", rules)
    key = (bm.name, backend, mode, policy, rules_name)
    if any(e.model is not bm.model for e in _EXPLAINERS.values()):
        _EXPLAINERS.clear()  # a new model (or a new run): drop the previous model's explainers
    if key not in _EXPLAINERS:  # one explainer per model and variant serves every batch size (dynamic batch)
        base = next((e for k, e in _EXPLAINERS.items() if k[4] == rules_name), None)
        t0 = time.perf_counter()
        if base is not None:  # same model and rules: reuse the traced, analysed graph (Explainer.recompile)
            explainer = base.recompile(backend=backend, mode=mode, promise_policy=policy)
            info["derived"] = True
        else:
            ex_args, ex_kwargs = bm.make_inputs(2)
            explainer = dynlrp.compile(
                bm.model, ex_args, example_kwargs=ex_kwargs, backend=backend, mode=mode, promise_policy=policy,
                rules=rules,
            )
        info["build_s"] = time.perf_counter() - t0
        _EXPLAINERS[key] = explainer
    explainer = _EXPLAINERS[key]
    first = [True]

    def run():
        if first[0]:
            first[0] = False
            t = time.perf_counter()
            out = explainer(*args, **kwargs)
            if args and args[0].is_cuda or any(getattr(v, "is_cuda", False) for v in kwargs.values()):
                torch.cuda.synchronize()
            info["first_call_s"] = time.perf_counter() - t
            return out
        return explainer(*args, **kwargs)

    return run


def _zennit(bm: BenchModel, args: tuple, composite_name: str) -> Callable[[], Any]:
    if bm.kind != "cnn":
        raise Unavailable("Zennit composites are module-based; no transformer canonizers")
    try:
        import zennit.composites as zc
        import zennit.rules as zr
        import zennit.torchvision as ztv
        import zennit.types as zt
        from zennit.attribution import Gradient
    except ImportError as e:
        raise Unavailable(f"zennit not importable: {e}") from e
    model = copy.deepcopy(bm.model)
    canon = [ztv.ResNetCanonizer()] if bm.name.startswith("resnet") else [ztv.VGGCanonizer()]
    if composite_name == "EpsilonGammaBox":
        comp = zc.EpsilonGammaBox(low=-3.0, high=3.0, canonizers=canon)
    else:  # the same composite as dynlrp's "epsilon" preset
        comp = zc.LayerMapComposite(
            layer_map=[
                (zt.Activation, zr.Pass()),
                (zt.Convolution, zr.Epsilon(1e-6)),
                (torch.nn.Linear, zr.Epsilon(1e-6)),
                (zt.AvgPool, zr.Epsilon(1e-6)),
            ],
            canonizers=canon,
        )
    attributor = Gradient(model, comp)
    attributor.__enter__()  # registered for the lifetime of the benchmark copy (the copy is private)
    x = args[0]

    def one_hot(y: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(y).scatter(1, y.argmax(1, keepdim=True), 1.0) * y

    def run():
        _, rel = attributor(x, one_hot)
        return rel

    run._keep = (attributor, model)  # type: ignore[attr-defined]
    return run


def _captum(bm: BenchModel, args: tuple) -> Callable[[], Any]:
    if bm.kind != "cnn":
        raise Unavailable("Captum LRP supports only module-based CNN layers")
    try:
        from captum.attr import LRP
    except ImportError as e:
        raise Unavailable(f"captum not importable: {e}") from e
    model = copy.deepcopy(bm.model)
    for mod in model.modules():  # captum needs out-of-place ReLUs
        if isinstance(mod, torch.nn.ReLU):
            mod.inplace = False
    lrp = LRP(model)
    x = args[0]
    with torch.no_grad():
        target = model(x).argmax(1)

    def run():
        return lrp.attribute(x, target=target)

    return run


def _lxt(bm: BenchModel) -> Callable[[], Any]:
    if bm.kind == "cnn":
        raise Unavailable("LXT targets transformers")
    try:
        import lxt  # noqa: F401
    except ImportError as e:
        raise Unavailable(f"LXT not importable ({e}); LXT's patch maps also predate transformers 5") from e
    raise Unavailable("LXT is importable but its monkey-patching is not supported with transformers 5")


METHODS = (
    "forward",
    "gxi",
    "gxi_compiled",
    "ours_eager",
    "ours_eager_recompute",
    "ours_inductor",
    "ours_inductor_cg",
    "ours_egb_eager",
    "zennit_eps",
    "zennit_egb",
    "captum_lrp",
    "lxt",
)


def make_method(name: str, bm: BenchModel, args: tuple, kwargs: dict, device: str, info: dict) -> Callable[[], Any]:
    """Build method ``name`` for one model and batch; raises :class:`Unavailable` with a reason."""
    if name == "forward":
        return _forward(bm, args, kwargs)
    if name == "gxi":
        return _gxi(bm, args, kwargs, compiled=False)
    if name == "gxi_compiled":
        return _gxi(bm, args, kwargs, compiled=True)
    if name == "ours_eager":
        return _ours(bm, args, kwargs, "eager", None, "keep", info)
    if name == "ours_eager_recompute":
        return _ours(bm, args, kwargs, "eager", None, "recompute", info)
    if name == "ours_inductor":  # the default memory policy (recompute)
        return _ours(bm, args, kwargs, "inductor", None, "recompute", info)
    if name == "ours_inductor_cg":
        if device != "cuda":
            raise Unavailable("CUDA graphs need a GPU")
        return _ours(bm, args, kwargs, "inductor", "reduce-overhead", "recompute", info)
    if name == "ours_egb_eager":
        if bm.kind != "cnn":
            raise Unavailable("EpsilonGammaBox is a CNN composite")
        from dynlrp_fx import presets

        return _ours(bm, args, kwargs, "eager", None, "recompute", info, rules=presets.epsilon_gamma_box(-3.0, 3.0))
    if name == "zennit_eps":
        return _zennit(bm, args, "Epsilon")
    if name == "zennit_egb":
        return _zennit(bm, args, "EpsilonGammaBox")
    if name == "captum_lrp":
        return _captum(bm, args)
    if name == "lxt":
        return _lxt(bm)
    raise ValueError(f"unknown method {name!r}; choose from {METHODS}")
