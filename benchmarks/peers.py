"""The methods compared: forward, gradient x input (eager, compiled), our explainer, Zennit, Captum, LXT.

Each ``make_*`` returns a zero-argument callable that explains one batch (or raises ``Unavailable`` with the
reason). All methods explain the same scalar per sample: the model output at the argmax of the flattened
per-sample output. Parameters are frozen (``requires_grad=False``) for every method, so gradient baselines
compute input gradients only (the fastest fair gradient).

Our variants: ``ours_eager`` (eager backend, ``keep`` memory policy), ``ours_eager_recompute`` (eager, ``recompute``,
the default policy), ``ours_inductor`` / ``ours_inductor_cg`` (Inductor, without / with CUDA graphs, default
policy), ``ours_egb_eager`` (EpsilonGammaBox, eager, default policy), ``ours_attnlrp_eager`` / ``ours_cp_lrp_eager``
(the AttnLRP / CP-LRP presets, eager, default policy: the rules LXT implements, for the same-rules LXT comparison). The H200
table of 2026-11-26 predates the default change: there every variant but ``ours_eager_recompute`` used ``keep``.

``lxt`` (LXT 2.1, efficient AttnLRP) needs transformers 4.x: run it in the venv of ``benchmarks/lxt_env.sh``.
"""

from __future__ import annotations

import contextlib
import copy
import time
import warnings
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
    return _grad_x_input(bm, model, bm.model, args, kwargs)


def _grad_x_input(
    bm: BenchModel, model: Any, embedder: torch.nn.Module, args: tuple, kwargs: dict, around=contextlib.nullcontext
) -> Callable[[], Any]:
    """Gradient x input of the target logit through ``model`` (its forward pass inside ``around()``): w.r.t. the
    image, or for text models w.r.t. ``embedder``'s input embeddings, summed over the embedding."""
    if bm.embed is None:

        def run():
            x = args[0].detach().requires_grad_()
            with around():
                y = model(x, *args[1:], **kwargs)
            (g,) = torch.autograd.grad(_target_scalar(y), x)
            return g * x.detach()

        return run

    def run_text():
        kw = dict(kwargs)
        ids = kw.pop("input_ids")
        with torch.no_grad():
            emb = embedder.get_input_embeddings()(ids)
        e = emb.requires_grad_()
        with around():
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


#: the LXT 2.1 efficient-AttnLRP patch module per benchmark model (LXT supports torchvision's ViT with CP-LRP only)
_LXT_MODULES = {
    "bert_base": "transformers.models.bert.modeling_bert",
    "gpt2_small": "transformers.models.gpt2.modeling_gpt2",
    "llama_8l": "transformers.models.llama.modeling_llama",
    "vit_b_16": "torchvision.models.vision_transformer",
}


_MISSING = object()


@contextlib.contextmanager
def _lxt_patched(module: Any, patch_map: dict):
    """LXT's ``monkey_patch(module, patch_map)`` inside the block only: it rewrites attributes of classes (some of
    them torch's own: ``nn.Dropout``, ``nn.LayerNorm``, ...) and of modelling modules for the whole process, which
    would change every other method's model; on exit every patched class's and module's attributes are restored."""
    from lxt.efficient import monkey_patch

    saved = [(t, dict(vars(t))) for t in patch_map]
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            monkey_patch(module, patch_map, verbose=False)
        if caught:  # "already patched" / "Failed to patch": a leaked or partial patch
            raise RuntimeError(f"LXT patching failed: {'; '.join(str(w.message) for w in caught)}")
        yield
    finally:
        for target, before in saved:
            now = vars(target)
            for k in [k for k in now if k not in before]:
                delattr(target, k)
            for k, v in before.items():
                if now.get(k, _MISSING) is not v:
                    setattr(target, k, v)


def _lxt_model(bm: BenchModel) -> tuple[torch.nn.Module, Any, dict]:
    """LXT's model, patch module and the patch map applied around each of its forward passes."""
    import importlib

    from lxt.efficient.models import get_default_map

    module = importlib.import_module(_LXT_MODULES[bm.name])
    patch_map = dict(get_default_map(module))
    if bm.name != "bert_base":  # LXT patches the model's own classes (and the module's attention functions)
        return bm.model, module, patch_map
    # LXT's BERT is its own copy of transformers' modelling code (swapped into modeling_bert by monkey_patch):
    # build that model with the benchmark's weights; its forward passes then need only the torch-class patches
    from lxt.efficient.models import bert as lxt_bert

    del patch_map[module]
    model = lxt_bert.BertForSequenceClassification._from_config(
        bm.model.config, attn_implementation=bm.model.config._attn_implementation)  # the benchmark model's attention
    model.load_state_dict(bm.model.state_dict())
    return model.eval().to(next(bm.model.parameters()).device).requires_grad_(False), module, patch_map


def _lxt(bm: BenchModel, args: tuple, kwargs: dict, info: dict) -> Callable[[], Any]:
    """LXT 2.1's efficient AttnLRP (CP-LRP for torchvision's ViT, LXT's only ViT map): the patched model's gradient
    x input w.r.t. the input embeddings (the image for ViT), the same target as every method. Its monkey patches
    are applied around each forward pass only (the backward runs LXT's recorded autograd functions); the build
    checks that eager gradient x input is bitwise the same before and after LXT ran, and compares the relevance with
    our explainer's under the same rules (``info["check"]``)."""
    if bm.name not in _LXT_MODULES:
        raise Unavailable("LXT targets transformers" if bm.kind == "cnn" else f"LXT has no patch map for {bm.name}")
    try:
        import lxt.efficient  # noqa: F401
    except ImportError as e:
        raise Unavailable(f"LXT not importable ({e}); LXT's patch maps also predate transformers 5") from e
    gxi_before = _gxi(bm, args, kwargs, compiled=False)()
    model, module, patch_map = _lxt_model(bm)

    run = _grad_x_input(bm, model, model, args, kwargs, around=lambda: _lxt_patched(module, patch_map))
    rel = run()
    gxi_after = _gxi(bm, args, kwargs, compiled=False)()
    if not torch.equal(gxi_before, gxi_after):
        d = (gxi_after - gxi_before).abs().max().item()
        raise RuntimeError(f"LXT's monkey patch leaked: eager gradient x input changed by {d:.2e}")
    t = time.perf_counter()
    for _ in range(10):
        with _lxt_patched(module, patch_map):
            pass
    patch_ms = (time.perf_counter() - t) * 100
    from dynlrp_fx import presets

    if bm.kind == "vit":
        ours_name, rules = "ours_cp_lrp_eager", presets.cp_lrp()
    else:
        ours_name, rules = "ours_attnlrp_eager", presets.attnlrp()
    try:
        ours = _ours(bm, args, kwargs, "eager", None, "recompute", {}, rules=rules)().relevance.detach().double()
        if not ours.any() and not rel.any():
            check = f"relevance all zero here and in {ours_name} (zero logits)"
        else:
            d = (rel.double() - ours).norm() / ours.norm().clamp_min(1e-30)
            check = f"rel diff vs {ours_name} {d.item():.1e}"
    except Exception as e:  # noqa: BLE001 - the cross-check is a note; LXT itself ran
        check = f"no cross-check ({ours_name}: {type(e).__name__})"
    info["check"] = f"{check}; patch+restore {patch_ms:.2f} ms/call; no leak into gxi"
    return run


METHODS = (
    "forward",
    "gxi",
    "gxi_compiled",
    "ours_eager",
    "ours_eager_recompute",
    "ours_inductor",
    "ours_inductor_cg",
    "ours_egb_eager",
    "ours_attnlrp_eager",
    "ours_cp_lrp_eager",
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
    if name in ("ours_attnlrp_eager", "ours_cp_lrp_eager"):  # the rules LXT implements
        if bm.kind == "cnn":
            raise Unavailable("AttnLRP / CP-LRP are transformer presets")
        from dynlrp_fx import presets

        rules = presets.attnlrp() if name == "ours_attnlrp_eager" else presets.cp_lrp()
        return _ours(bm, args, kwargs, "eager", None, "recompute", info, rules=rules)
    if name == "zennit_eps":
        return _zennit(bm, args, "Epsilon")
    if name == "zennit_egb":
        return _zennit(bm, args, "EpsilonGammaBox")
    if name == "captum_lrp":
        return _captum(bm, args)
    if name == "lxt":
        return _lxt(bm, args, kwargs, info)
    raise ValueError(f"unknown method {name!r}; choose from {METHODS}")
