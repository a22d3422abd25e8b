"""Faithfulness: perturbation curves of an attribution, and a search for the most faithful rules of a model.

:func:`perturbation` removes input features in the order an attribution ranks them and records the model's score
for the explained target after every step. *MoRF* (most relevant first) removes the most relevant features first:
a faithful attribution makes the score drop fast, so the area under the MoRF curve is small. *LeRF* (least relevant
first) removes the least relevant first: the score should stay high, a large area. ABPC, the area between the
perturbation curves, is ``area(LeRF) - area(MoRF)``: large and positive for a faithful attribution, about 0 for a
random ranking (both orders then remove the same features on average), negative for an anti-faithful one.

Features are pixels (all channels of a spatial position together) or regions of ``region`` pixels for inputs
``(N, C, *spatial)``, single features for ``(N, F)`` inputs, and tokens for integer inputs ``(N, T)`` (padding,
``attention_mask == 0``, is never perturbed). Ties in the relevance are broken in a fixed random order (``seed``).
A removed feature takes the value of the baseline: ``"zero"``, ``"mean"`` (the per-sample, per-channel mean),
``"blur"`` (a Gaussian blur of the input, ``sigma`` in pixels) or a tensor broadcastable to the input; tokens are
replaced by an id (``baseline=103``, a mask/unk/pad id) or removed (``baseline="remove"``: the remaining tokens
move left, the sequence is padded with ``pad_id`` at the end and ``attention_mask`` and every other per-token input
follow, so each perturbed sequence is a valid, shorter one). At every step the MoRF and LeRF inputs of all samples
run through the model as one batch.

:func:`select_rules` traces a model once, explains the inputs with each candidate rule set (one program per
candidate, all on the same trace), evaluates each with :func:`perturbation` and returns a :class:`RuleRanking`;
its ``best`` composite can be passed to :func:`dynlrp_fx.compile`.

Scores are comparable only within one model, one data set and one protocol (steps, baseline, region, score): see
``docs/faithfulness.md``.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .errors import DynlrpUnsupportedOpError

__all__ = [
    "perturbation",
    "PerturbationResult",
    "select_rules",
    "RuleRanking",
    "RankedRules",
    "default_candidates",
    "grid",
]

_SCORES = ("probability", "logit")
_METRICS = ("abpc", "morf", "lerf")


# -- results ----------------------------------------------------------------------------------------------------------
@dataclass
class PerturbationResult:
    """Perturbation curves of ``N`` samples (see the module doc).

    Attributes
    ----------
    morf, lerf: ``(N, steps + 1)`` scores after ``0 .. steps`` steps, most / least relevant first.
    fractions: ``(steps + 1,)`` the step positions ``k / steps`` (the x axis of the curves and of the areas).
    removed: ``(N, steps + 1)`` how many features (pixels, regions or tokens) each step had removed.
    score: what the curves measure: ``"probability"`` (softmax of the output at the target) or ``"logit"``.
    """

    morf: torch.Tensor
    lerf: torch.Tensor
    fractions: torch.Tensor
    removed: torch.Tensor
    score: str = "probability"
    protocol: dict[str, Any] = field(default_factory=dict)

    @property
    def morf_area(self) -> torch.Tensor:
        """``(N,)`` area under each MoRF curve (trapezoid rule over ``fractions``; smaller is more faithful)."""
        return torch.trapezoid(self.morf, self.fractions, dim=1)

    @property
    def lerf_area(self) -> torch.Tensor:
        """``(N,)`` area under each LeRF curve (larger is more faithful)."""
        return torch.trapezoid(self.lerf, self.fractions, dim=1)

    @property
    def abpc(self) -> torch.Tensor:
        """``(N,)`` area between the perturbation curves, ``lerf_area - morf_area``."""
        return self.lerf_area - self.morf_area

    @property
    def mean_abpc(self) -> float:
        """Mean ABPC over the samples."""
        return float(self.abpc.mean())

    @property
    def se_abpc(self) -> float:
        """Standard error of :attr:`mean_abpc` (sample standard deviation / sqrt(N); 0 for one sample)."""
        return _se(self.abpc)

    def metric(self, name: str = "abpc") -> torch.Tensor:
        """Per-sample values of ``"abpc"``, ``"morf"`` (MoRF area) or ``"lerf"`` (LeRF area)."""
        if name not in _METRICS:
            raise ValueError(f"metric must be one of {_METRICS}, got {name!r}")
        return {"abpc": self.abpc, "morf": self.morf_area, "lerf": self.lerf_area}[name]

    def plot(self, ax: Any = None, title: str | None = None) -> Any:
        """A matplotlib figure of the mean MoRF and LeRF curves (shaded: +- one standard error; the area between
        them is the mean ABPC). Draws into ``ax`` when given; returns the figure."""
        fig, ax = _axes(ax)
        x = self.fractions.numpy()
        for name, curve, color in (("LeRF", self.lerf, "tab:blue"), ("MoRF", self.morf, "tab:red")):
            mean, se = curve.mean(0).numpy(), _se_curve(curve).numpy()
            area = float(torch.trapezoid(curve.mean(0), self.fractions))
            ax.plot(x, mean, color=color, label=f"{name} (area {area:.3f})")
            ax.fill_between(x, mean - se, mean + se, color=color, alpha=0.2, linewidth=0)
        ax.fill_between(x, self.morf.mean(0).numpy(), self.lerf.mean(0).numpy(), color="0.8", alpha=0.4, linewidth=0)
        ax.set_xlabel("fraction of features removed")
        ax.set_ylabel(self.score)
        ax.set_title(title or f"ABPC {self.mean_abpc:.3f} +- {self.se_abpc:.3f} (N = {self.morf.shape[0]})")
        ax.legend()
        return fig

    def __repr__(self) -> str:
        return (f"PerturbationResult(N={self.morf.shape[0]}, steps={self.morf.shape[1] - 1}, score={self.score!r}, "
                f"mean_abpc={self.mean_abpc:.4f}, se={self.se_abpc:.4f}, morf_area={float(self.morf_area.mean()):.4f}, "
                f"lerf_area={float(self.lerf_area.mean()):.4f})")


def _is(value: Any, name: str) -> bool:
    """``value == name`` for a string ``value`` (a tensor baseline is never compared elementwise)."""
    return isinstance(value, str) and value == name


def _se(v: torch.Tensor) -> float:
    return float(v.std(unbiased=True) / math.sqrt(v.numel())) if v.numel() > 1 else 0.0


def _se_curve(c: torch.Tensor) -> torch.Tensor:
    return c.std(0, unbiased=True) / math.sqrt(c.shape[0]) if c.shape[0] > 1 else torch.zeros(c.shape[1])


def _axes(ax: Any) -> tuple[Any, Any]:
    if ax is not None:
        return ax.figure, ax
    try:
        from matplotlib.figure import Figure
    except ImportError as e:
        raise ImportError("plot() needs matplotlib: pip install matplotlib") from e
    fig = Figure(figsize=(6, 4), layout="constrained")
    return fig, fig.subplots()


# -- inputs -----------------------------------------------------------------------------------------------------------
def _split_inputs(x: Any, key: str | None) -> tuple[dict[str, torch.Tensor] | None, str | None, torch.Tensor]:
    """``x`` as (the kwargs dict or None, the perturbed key, the perturbed tensor)."""
    if isinstance(x, torch.Tensor):
        return None, None, x
    if isinstance(x, Mapping):
        if key is None:
            key = "input_ids" if "input_ids" in x else next(iter(x), None)
        if key not in x or not isinstance(x[key], torch.Tensor):
            raise ValueError(f"perturbation: key={key!r} names no tensor among the inputs {sorted(x)}; pass key= "
                             "with the name of the input to perturb")
        return dict(x), key, x[key]
    raise TypeError(f"perturbation: x must be a tensor or a dict of keyword inputs, got {type(x).__name__}")


def _call(model: Callable, kwargs: dict | None, key: str | None, value: torch.Tensor, extra: dict | None = None,
          output: Any = None) -> torch.Tensor:
    """Run the model on one batch and return the explained output as a tensor ``(batch, ...)``."""
    if kwargs is None:
        out = model(value)
    else:
        call = dict(kwargs)
        call[key] = value
        call.update(extra or {})
        out = model(**call)
    if callable(output):
        out = output(out)
    elif output is not None:
        out = out[output]
    elif not isinstance(out, torch.Tensor):
        if hasattr(out, "logits"):
            out = out.logits
        elif isinstance(out, Mapping) and "logits" in out:
            out = out["logits"]
        elif isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
            out = out[0]
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"perturbation: the model returned {type(out).__name__}; pass output= (a key, index or "
                        "callable) that selects the output tensor to score")
    return out


def _scores(out: torch.Tensor, target: torch.Tensor, score: str) -> torch.Tensor:
    flat = out.reshape(out.shape[0], -1).float()
    if score == "probability":
        flat = torch.sigmoid(flat) if flat.shape[1] == 1 else flat.softmax(1)
    return flat.gather(1, target[:, None])[:, 0]


def _targets(target: Any, out: torch.Tensor) -> torch.Tensor:
    n, per = out.shape[0], out.reshape(out.shape[0], -1).shape[1]
    if target is None:
        t = out.reshape(n, -1).argmax(1)
    else:
        try:
            t = torch.as_tensor(target, dtype=torch.long).reshape(-1)
        except (TypeError, ValueError, RuntimeError):
            raise ValueError(f"target must be an int, one int per sample or None (the argmax), got "
                             f"{type(target).__name__}") from None
        if t.numel() == 1:
            t = t.expand(n)
        if t.numel() != n:
            raise ValueError(f"perturbation: target has {t.numel()} entries for {n} samples; give one int, one per "
                             "sample, or None (the argmax)")
    if (t < 0).any() or (t >= per).any():
        raise ValueError(f"perturbation: target {t.tolist()[:8]} out of range: each sample's output has {per} "
                         f"entries; give 0..{per - 1}")
    return t.to(out.device)


def _relevance(relevance: Any, key: str | None) -> torch.Tensor:
    """A tensor from a tensor or an Explanation (its relevance for ``key``, or the first input's)."""
    if isinstance(relevance, torch.Tensor):
        return relevance.detach()
    inputs = getattr(relevance, "inputs", None)
    if isinstance(inputs, Mapping):
        if key is not None and key in inputs:
            return inputs[key].detach()
        if getattr(relevance, "relevance", None) is not None:
            return relevance.relevance.detach()
    raise TypeError(f"perturbation: relevance must be a tensor or a dynlrp Explanation, got {type(relevance).__name__}")


def _gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of ``(N, C, *spatial)`` along every spatial axis (replicate padding)."""
    radius = max(1, int(math.ceil(3 * sigma)))
    t = torch.arange(-radius, radius + 1, dtype=torch.float64)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = (k / k.sum()).to(x.dtype).to(x.device).reshape(1, 1, -1)
    out = x
    for d in range(2, x.ndim):
        moved = out.movedim(d, -1)
        shape = moved.shape
        flat = F.pad(moved.reshape(-1, 1, shape[-1]), (radius, radius), mode="replicate")
        out = F.conv1d(flat, k).reshape(shape).movedim(-1, d)
    return out


def _image_baseline(x: torch.Tensor, baseline: Any, sigma: float | None) -> torch.Tensor:
    """The baseline of an ``(N, C, *spatial)`` input, same shape."""
    if isinstance(baseline, torch.Tensor):
        try:
            return torch.broadcast_to(baseline.to(x.dtype).to(x.device), x.shape)
        except RuntimeError:
            raise ValueError(f"perturbation: baseline of shape {tuple(baseline.shape)} does not broadcast to the "
                             f"input's shape {tuple(x.shape)}") from None
    if isinstance(baseline, (int, float)) and not isinstance(baseline, bool):
        return torch.full_like(x, float(baseline))
    if _is(baseline, "zero"):
        return torch.zeros_like(x)
    if _is(baseline, "mean"):
        return x.mean(dim=tuple(range(2, x.ndim)), keepdim=True).expand_as(x)
    if _is(baseline, "blur"):
        if sigma is None:
            sigma = max(1.0, min(x.shape[2:]) / 16)
        if sigma <= 0:
            raise ValueError(f"perturbation: sigma must be positive (pixels), got {sigma}")
        return _gaussian_blur(x, float(sigma))
    raise ValueError(f"perturbation: unknown baseline {baseline!r} for a float input; use 'blur', 'zero', 'mean', a "
                     "number or a tensor broadcastable to the input")


def _region_ids(spatial: tuple[int, ...], region: Any) -> tuple[torch.Tensor, int]:
    """Region index of every spatial position (row-major over a grid of ``region``-sized patches) and the count."""
    if region is None:
        region = 1
    size = (region,) * len(spatial) if isinstance(region, int) else tuple(region)
    if len(size) != len(spatial) or any(not isinstance(s, int) or s < 1 for s in size):
        raise ValueError(f"perturbation: region={region!r} must be a positive int or {len(spatial)} positive ints "
                         f"(one per spatial dimension of {spatial})")
    grids = [torch.arange(n) // s for n, s in zip(spatial, size)]
    counts = [math.ceil(n / s) for n, s in zip(spatial, size)]
    ids = torch.zeros(spatial, dtype=torch.long)
    for d, g in enumerate(grids):
        view = [1] * len(spatial)
        view[d] = -1
        ids = ids * counts[d] + g.reshape(view)
    return ids, math.prod(counts)


def _order_ranks(unit_rel: torch.Tensor, valid: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank of every unit in the MoRF and the LeRF order (0 = removed first); invalid units rank last in both.
    Ties are broken by one fixed random permutation per sample."""
    n, u = unit_rel.shape
    gen = torch.Generator().manual_seed(seed)
    perm = torch.stack([torch.randperm(u, generator=gen) for _ in range(n)]).to(unit_rel.device)
    rel = unit_rel.double().gather(1, perm)
    ok = valid.gather(1, perm)
    ranks = []
    for descending in (True, False):
        key = torch.where(ok, rel, torch.tensor(-math.inf if descending else math.inf, dtype=rel.dtype))
        order = perm.gather(1, key.argsort(dim=1, descending=descending, stable=True))
        rank = torch.empty_like(order)
        rank.scatter_(1, order, torch.arange(u, device=order.device).expand(n, u))
        ranks.append(rank)
    return ranks[0], ranks[1]


def _schedule(n_valid: torch.Tensor, steps: int, per_step: int | None) -> torch.Tensor:
    """``(N, steps + 1)`` number of units removed after each step."""
    k = torch.arange(steps + 1, device=n_valid.device)
    if per_step is None:
        removed = torch.ceil(k[None, :] * n_valid[:, None].double() / steps).long()
    else:
        removed = k[None, :] * per_step
    return torch.minimum(removed, n_valid[:, None])


# -- the metric -------------------------------------------------------------------------------------------------------
def perturbation(
    model: Callable,
    x: Any,
    target: Any,
    relevance: Any,
    steps: int = 16,
    baseline: Any = "blur",
    *,
    sigma: float | None = None,
    region: int | Sequence[int] | None = None,
    per_step: int | None = None,
    score: str = "probability",
    key: str | None = None,
    mask_key: str = "attention_mask",
    keep: torch.Tensor | None = None,
    pad_id: int = 0,
    output: Any = None,
    seed: int = 0,
) -> PerturbationResult:
    """MoRF and LeRF perturbation curves of ``relevance`` on ``model`` (see the module doc).

    Parameters
    ----------
    model: the model (called as ``model(x)``, or ``model(**x)`` for a dict); never modified. Put it in eval mode.
    x: the inputs: a float tensor ``(N, C, *spatial)`` or ``(N, F)``, an integer token tensor ``(N, T)``, or a
        dict of keyword inputs (``input_ids``, ``attention_mask``, ...) of which ``key`` is perturbed.
    target: the explained output index: an int, one per sample, or ``None`` (the argmax of the unperturbed output).
    relevance: the attribution, shaped like the perturbed input (token relevance ``(N, T)``), or an
        :class:`~dynlrp_fx.Explanation`. Channels are summed: a pixel's relevance is that of its channels together.
    steps: number of perturbation steps; the curves have ``steps + 1`` points (the unperturbed input first).
    baseline: images/features: ``"blur"``, ``"zero"``, ``"mean"``, a number or a tensor; tokens: a replacement id
        (``int``) or ``"remove"``.
    sigma: Gaussian sigma of ``"blur"`` in pixels (default ``max(1, min(spatial) / 16)``).
    region: perturb patches of this many pixels per spatial dimension (an int or one per dimension) instead of
        single pixels; relevance is summed over each patch.
    per_step: features (pixels, regions or tokens) removed per step; default: all of them over ``steps`` steps,
        ``ceil(k * n / steps)`` after step ``k``.
    score: ``"probability"`` (softmax over the output, sigmoid for a single output) or ``"logit"`` (the raw
        output), at the target.
    key: the dict input to perturb (default ``input_ids`` if present, else the first). ``mask_key``: the attention
        mask of token inputs (padding is never perturbed; removal updates it).
    keep: bool ``(N, T)`` or ``(T,)``: tokens never perturbed (e.g. ``[CLS]`` / ``[SEP]``).
    pad_id: the id that fills the end of a sequence after token removal.
    output: selects the scored output from the model's return value (a key, index or callable); default: the
        tensor, ``.logits``, or the first tensor of a tuple.
    seed: seed of the random order that breaks ties in the relevance.

    Returns
    -------
    PerturbationResult: ``.morf``, ``.lerf`` (N, steps + 1), ``.abpc`` (N,), ``.mean_abpc``, ``.se_abpc``, ``.plot()``.
    """
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"perturbation: steps must be a positive int, got {steps!r}")
    if per_step is not None and (not isinstance(per_step, int) or per_step < 1):
        raise ValueError(f"perturbation: per_step must be a positive int or None, got {per_step!r}")
    if score not in _SCORES:
        raise ValueError(f"perturbation: score must be one of {_SCORES}, got {score!r}")
    if isinstance(model, nn.Module) and model.training:
        warnings.warn("perturbation: the model is in training mode (dropout, batch statistics): the curves will be "
                      "noisy; call model.eval() first", stacklevel=2)
    kwargs, key, xin = _split_inputs(x, key)
    n = xin.shape[0]
    rel = _relevance(relevance, key).to(xin.device)
    with torch.no_grad():
        out0 = _call(model, kwargs, key, xin, output=output)
        tgt = _targets(target, out0)
        if xin.is_floating_point():
            plan = _ImagePlan(xin, rel, baseline, sigma, region)
        else:
            plan = _TokenPlan(xin, rel, baseline, kwargs, mask_key, keep, pad_id)
        morf_rank, lerf_rank = _order_ranks(plan.unit_rel, plan.valid, seed)
        removed = _schedule(plan.valid.sum(1), steps, per_step)
        s0 = _scores(out0, tgt, score)
        morf, lerf = [s0], [s0]
        kw2 = None if kwargs is None else {k: torch.cat([v, v]) if isinstance(v, torch.Tensor) and v.shape[:1] == (n,)
                                           else v for k, v in kwargs.items()}
        t2 = torch.cat([tgt, tgt])
        for k in range(1, steps + 1):
            gone = removed[:, k : k + 1]
            value, extra = plan.perturb(torch.cat([morf_rank < gone, lerf_rank < gone]))
            s = _scores(_call(model, kw2, key, value, extra, output), t2, score)
            morf.append(s[:n])
            lerf.append(s[n:])
    protocol = {"steps": steps, "baseline": baseline if not isinstance(baseline, torch.Tensor) else "tensor",
                "sigma": sigma, "region": region, "per_step": per_step, "score": score, "seed": seed}
    return PerturbationResult(torch.stack(morf, 1).cpu(), torch.stack(lerf, 1).cpu(),
                              torch.arange(steps + 1, dtype=torch.float32) / steps, removed.cpu(), score, protocol)


class _ImagePlan:
    """Features of a float input ``(N, C, *spatial)`` (``(N, F)``: one channel): pixels or regions."""

    def __init__(self, x: torch.Tensor, rel: torch.Tensor, baseline: Any, sigma: float | None, region: Any):
        if rel.shape != x.shape:
            raise ValueError(f"perturbation: relevance of shape {tuple(rel.shape)} does not match the input's shape "
                             f"{tuple(x.shape)}")
        if x.ndim < 2:
            raise ValueError(f"perturbation: a float input needs a batch dimension and features, got shape "
                             f"{tuple(x.shape)}")
        self.shape = x.shape
        x3 = x if x.ndim > 2 else x.unsqueeze(1)
        if _is(baseline, "remove") or isinstance(baseline, bool):
            raise ValueError(f"perturbation: baseline={baseline!r} is for token inputs; float inputs take 'blur', "
                             "'zero', 'mean', a number or a tensor")
        if isinstance(baseline, torch.Tensor):  # broadcast against the input as given, then to the (N, C, ...) view
            baseline = _image_baseline(x, baseline, sigma).reshape(x3.shape)
        base = _image_baseline(x3, baseline, sigma)
        self.x3, self.base = x3, base
        spatial = tuple(x3.shape[2:])
        ids, units = _region_ids(spatial, region)
        self.ids = ids.reshape(-1).to(x.device)
        r = (rel if rel.ndim > 2 else rel.unsqueeze(1)).sum(1).reshape(x.shape[0], -1).double()
        self.unit_rel = torch.zeros(x.shape[0], units, dtype=torch.float64, device=x.device).index_add_(1, self.ids, r)
        self.valid = torch.ones(x.shape[0], units, dtype=torch.bool, device=x.device)

    def perturb(self, gone: torch.Tensor) -> tuple[torch.Tensor, None]:
        reps = gone.shape[0] // self.x3.shape[0]
        mask = gone[:, self.ids].reshape(gone.shape[0], 1, *self.x3.shape[2:])
        x, base = self.x3.repeat(reps, *([1] * (self.x3.ndim - 1))), self.base.repeat(reps, *([1] * (self.x3.ndim - 1)))
        out = torch.where(mask, base, x)
        return out.reshape(gone.shape[0], *self.shape[1:]), None


class _TokenPlan:
    """Tokens of an integer input ``(N, T)``: replaced by an id, or removed (sequence compacted, mask updated)."""

    def __init__(self, ids: torch.Tensor, rel: torch.Tensor, baseline: Any, kwargs: dict | None, mask_key: str,
                 keep: torch.Tensor | None, pad_id: int):
        if ids.ndim != 2:
            raise ValueError(f"perturbation: token inputs must be (N, T) ids, got shape {tuple(ids.shape)}")
        if rel.ndim == 3 and rel.shape[:2] == ids.shape:  # per-embedding-dimension relevance: one value per token
            rel = rel.sum(-1)
        if rel.shape != ids.shape:
            raise ValueError(f"perturbation: token relevance of shape {tuple(rel.shape)} does not match the ids' shape "
                             f"{tuple(ids.shape)}")
        mask = kwargs.get(mask_key) if kwargs is not None else None
        if _is(baseline, "remove"):
            if mask is None:
                raise ValueError(f"perturbation: baseline='remove' needs an attention mask to keep the shortened "
                                 f"sequences valid: pass x as a dict with {mask_key!r} (or mask_key=), or replace "
                                 "tokens with an id (baseline=<mask/unk/pad id>)")
        elif not (isinstance(baseline, int) and not isinstance(baseline, bool)):
            raise ValueError(f"perturbation: token inputs take baseline=<replacement id> (an int: mask, unk or pad "
                             f"id) or 'remove', got {baseline!r}")
        self.ids, self.baseline, self.pad_id, self.kwargs, self.mask_key = ids, baseline, pad_id, kwargs, mask_key
        self.mask = mask.bool() if mask is not None else torch.ones_like(ids, dtype=torch.bool)
        valid = self.mask.clone()
        if keep is not None:
            valid &= ~torch.as_tensor(keep, dtype=torch.bool, device=ids.device).expand_as(ids)
        self.valid = valid
        self.unit_rel = rel.double()

    def perturb(self, gone: torch.Tensor) -> tuple[torch.Tensor, dict | None]:
        reps = gone.shape[0] // self.ids.shape[0]
        ids = self.ids.repeat(reps, 1)
        gone = gone & self.valid.repeat(reps, 1)
        if not _is(self.baseline, "remove"):
            return torch.where(gone, torch.full_like(ids, self.baseline), ids), None
        kept = self.mask.repeat(reps, 1) & ~gone
        # kept tokens move to the front in their order (a stable sort of "not kept"), the rest becomes padding
        order = (~kept).to(torch.int8).argsort(dim=1, stable=True)
        new_kept = kept.gather(1, order)
        new_ids = torch.where(new_kept, ids.gather(1, order), torch.full_like(ids, self.pad_id))
        extra = {}
        for k, v in self.kwargs.items():
            if k == self.mask_key:
                extra[k] = new_kept.to(v.dtype)
            elif isinstance(v, torch.Tensor) and v.shape[:2] == self.ids.shape and k != "input_ids":
                vv = v.repeat(reps, *([1] * (v.ndim - 1)))
                idx = order.reshape(*order.shape, *([1] * (v.ndim - 2))).expand_as(vv)
                extra[k] = vv.gather(1, idx)
        return new_ids, extra


# -- rule search ------------------------------------------------------------------------------------------------------
@dataclass
class RankedRules:
    """One row of a :class:`RuleRanking`: a candidate rule set and its score."""

    name: str
    composite: Any  #: the :class:`~dynlrp_fx.Composite` (pass it to ``dynlrp.compile(model, x, rules=...)``)
    mean: float  #: mean of the metric over the samples
    se: float  #: its standard error
    explain_seconds: float  #: building the candidate's program and explaining the inputs
    evaluate_seconds: float  #: the perturbation curves
    result: PerturbationResult

    @property
    def seconds(self) -> float:
        """Explaining plus evaluating."""
        return self.explain_seconds + self.evaluate_seconds


@dataclass
class RuleRanking:
    """The result of :func:`select_rules`: rows best first (by ``metric``), plus what was skipped and why."""

    rows: list[RankedRules]
    metric: str
    trace_seconds: float
    skipped: dict[str, str] = field(default_factory=dict)

    @property
    def best(self) -> Any:
        """The composite of the best row: ``dynlrp.compile(model, x, rules=ranking.best)``."""
        return self.rows[0].composite

    @property
    def best_name(self) -> str:
        """The name of the best row."""
        return self.rows[0].name

    def __iter__(self):
        return iter(self.rows)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int | str) -> RankedRules:
        if isinstance(i, str):
            for r in self.rows:
                if r.name == i:
                    return r
            raise KeyError(f"no candidate named {i!r}; candidates: {[r.name for r in self.rows]}")
        return self.rows[i]

    def table(self) -> str:
        """The ranking as a Markdown table (rank, rules, mean, SE, MoRF / LeRF areas, seconds)."""
        head = f"| rank | rules | {self.metric} | SE | MoRF area | LeRF area | time (s) |"
        lines = [head, "|---:|---|---:|---:|---:|---:|---:|"]
        for i, r in enumerate(self.rows, 1):
            lines.append(f"| {i} | {r.name} | {r.mean:.3f} | {r.se:.3f} | {float(r.result.morf_area.mean()):.3f} | "
                         f"{float(r.result.lerf_area.mean()):.3f} | {r.seconds:.2f} |")
        return "\n".join(lines)

    def __str__(self) -> str:
        text = self.table()
        if self.skipped:
            text += "\nskipped: " + "; ".join(f"{k}: {v}" for k, v in self.skipped.items())
        return text

    def plot(self) -> Any:
        """A matplotlib figure: the mean MoRF (left) and LeRF (right) curves of every candidate."""
        fig, _ = _axes(None)
        fig.clear()
        fig.set_size_inches(11, 4)
        axes = fig.subplots(1, 2, sharey=True)
        for r in self.rows:
            x = r.result.fractions.numpy()
            axes[0].plot(x, r.result.morf.mean(0).numpy(), label=f"{r.name} ({r.mean:.3f})")
            axes[1].plot(x, r.result.lerf.mean(0).numpy(), label=r.name)
        for ax, name in zip(axes, ("MoRF (lower is better)", "LeRF (higher is better)")):
            ax.set_title(name)
            ax.set_xlabel("fraction of features removed")
        axes[0].set_ylabel(self.rows[0].result.score if self.rows else "")
        axes[0].legend(title=self.metric, fontsize="small")
        return fig


def _has_attention(traced: Any) -> bool:
    names = ("softmax", "scaled_dot_product", "_safe_softmax")
    return any(n.op == "call_function" and any(s in str(n.target) for s in names)
               for n in traced.graph_module.graph.nodes)


def default_candidates(model: nn.Module, x: Any = None, traced: Any = None) -> dict[str, Any]:
    """The presets that apply to ``model``: ``epsilon`` and ``lrp0`` always; Zennit's convolution composites when
    it has convolutions (``epsilon_gamma_box`` with the data's range, ``x.min()`` / ``x.max()``, as its box); the
    attention presets (``attnlrp``, ``cp_lrp``, ``dynamiclrp``) when its graph has a softmax or attention; and
    ``gradient`` (gradient x input) as the reference. Returns ``{name: Composite}``."""
    from . import presets

    out: dict[str, Any] = {"epsilon": presets.epsilon(), "lrp0": presets.lrp0()}
    if any(isinstance(m, presets.CONV_TYPES) for m in model.modules()):
        xin = _split_inputs(x, None)[2] if x is not None else None
        if xin is not None and xin.is_floating_point():
            out["epsilon_gamma_box"] = presets.epsilon_gamma_box(low=float(xin.min()), high=float(xin.max()))
        for name in ("epsilon_plus", "epsilon_plus_flat", "epsilon_alpha2_beta1", "epsilon_alpha2_beta1_flat"):
            out[name] = presets.PRESETS[name]()
    if traced is not None and _has_attention(traced):
        for name in ("attnlrp", "cp_lrp", "dynamiclrp"):
            out[name] = presets.PRESETS[name]()
    out["gradient"] = presets.gradient()
    return out


def grid(preset: str, **values: Sequence[Any]) -> dict[str, Any]:
    """Candidates for :func:`select_rules` on a parameter grid of one preset: every combination of ``values``
    (each a list of values for one keyword argument of the preset's function in :mod:`dynlrp_fx.presets`).

    ``grid("epsilon", eps=[1e-6, 1e-2, 0.25])`` or ``grid("epsilon_gamma_box", gamma=[0.1, 0.25, 1.0], low=[0.0],
    high=[1.0])`` (the first-layer box as a grid too) returns ``{"epsilon_gamma_box(gamma=0.1, low=0, high=1)":
    Composite, ...}``; merge grids of several presets with ``{**a, **b}``.
    """
    import inspect
    import itertools

    from .presets import PRESETS

    if preset not in PRESETS:
        raise ValueError(f"grid: unknown preset {preset!r}; presets: {sorted(PRESETS)}")
    fn = PRESETS[preset]
    params = inspect.signature(fn).parameters
    unknown = [k for k in values if k not in params]
    if unknown:
        raise ValueError(f"grid: {preset} has no parameter {', '.join(map(repr, unknown))}; its parameters: "
                         f"{list(params)}")
    lists = {k: list(v) if isinstance(v, (list, tuple)) else [v] for k, v in values.items()}
    if any(not v for v in lists.values()):
        raise ValueError(f"grid: every parameter needs at least one value, got {values}")
    out: dict[str, Any] = {}
    for combo in itertools.product(*lists.values()):
        kw = dict(zip(lists, combo))
        comp = fn(**kw)
        name = f"{preset}(" + ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}"
                                        for k, v in kw.items()) + ")"
        comp.name = name
        out[name] = comp
    return out


def _named_candidates(candidates: Any) -> dict[str, Any]:
    from .presets import resolve

    if isinstance(candidates, Mapping):
        items = list(candidates.items())
    else:
        if isinstance(candidates, str) or not isinstance(candidates, Sequence):
            candidates = [candidates]
        items = []
        for c in candidates:
            if isinstance(c, tuple) and len(c) == 2 and isinstance(c[0], str):
                items.append(c)
            else:
                items.append((c if isinstance(c, str) else getattr(c, "name", None) or f"candidate{len(items)}", c))
    out: dict[str, Any] = {}
    for name, c in items:
        try:
            comp = resolve(c)
        except (ValueError, TypeError) as e:
            raise ValueError(f"select_rules: candidate {name!r}: {e}") from None
        if name in out:
            name = f"{name}#{len(out)}"
        out[name] = comp
    if not out:
        raise ValueError("select_rules: candidates is empty; give preset names or composites, or None for the "
                         "presets that apply to the model")
    return out


def select_rules(
    model: nn.Module,
    x: Any,
    target: Any = None,
    candidates: Any = None,
    metric: str = "abpc",
    *,
    steps: int = 16,
    baseline: Any = "blur",
    backend: str = "eager",
    batch_size: int | None = None,
    **perturbation_kwargs: Any,
) -> RuleRanking:
    """Explain ``x`` with every candidate rule set, evaluate each with :func:`perturbation`, rank them.

    The model is traced once (:func:`dynlrp_fx.trace.trace`); every candidate gets its own program on that trace.

    Parameters
    ----------
    model: the model (eval mode; never modified).
    x: the inputs (a tensor or a dict of keyword inputs), as for :func:`perturbation`.
    target: int, one per sample, or ``None``: the argmax of the model's output (the same targets for all).
    candidates: preset names, :class:`~dynlrp_fx.Composite` s, ``(name, rules)`` pairs or a dict name -> rules;
        ``None``: :func:`default_candidates` (a default candidate whose rules do not cover the model's ops is
        skipped and listed in ``skipped``; a given one raises).
    metric: ``"abpc"`` (default, higher is better), ``"morf"`` (MoRF area, lower is better) or ``"lerf"`` (LeRF
        area, higher is better).
    steps, baseline, **perturbation_kwargs: the protocol, passed to :func:`perturbation` (same for every candidate).
    backend: the explainers' backend (``"eager"``: no compile time).
    batch_size: explain at most this many samples per call (default: all at once).

    Returns
    -------
    RuleRanking: rows best first with name, mean, SE and seconds; ``.best`` is the winning composite.
    """
    from .explainer import Explainer
    from .trace import trace

    if metric not in _METRICS:
        raise ValueError(f"select_rules: metric must be one of {_METRICS}, got {metric!r}")
    if isinstance(model, nn.Module) and model.training:
        warnings.warn("select_rules: the model is in training mode; call model.eval() first", stacklevel=2)
    kwargs, key, xin = _split_inputs(x, perturbation_kwargs.get("key"))
    n = xin.shape[0]
    t0 = time.perf_counter()
    ex_args, ex_kwargs = ((), {k: v[:2] if isinstance(v, torch.Tensor) and v.shape[:1] == (n,) else v
                               for k, v in kwargs.items()}) if kwargs is not None else ((xin[:2],), None)
    traced = trace(model, ex_args, ex_kwargs)
    trace_s = time.perf_counter() - t0
    with torch.no_grad():
        tgt = _targets(target, _call(model, kwargs, key, xin, output=perturbation_kwargs.get("output")))
    given = candidates is not None
    named = _named_candidates(candidates) if given else default_candidates(model, x, traced)
    rows, skipped = [], {}
    step = batch_size or n
    for name, comp in named.items():
        t1 = time.perf_counter()
        try:
            explainer = Explainer(model, traced, comp, backend=backend)
        except DynlrpUnsupportedOpError as e:
            if given:
                raise
            skipped[name] = str(e).splitlines()[0]
            continue
        parts = []
        for i in range(0, n, step):
            sl = slice(i, i + step)
            if kwargs is None:
                e = explainer(xin[sl], target=tgt[sl])
            else:
                e = explainer(**{k: v[sl] if isinstance(v, torch.Tensor) and v.shape[:1] == (n,) else v
                                 for k, v in kwargs.items()}, target=tgt[sl])
            parts.append(_relevance(e, key))
        rel = torch.cat(parts)
        t2 = time.perf_counter()
        res = perturbation(model, x, tgt, rel, steps=steps, baseline=baseline, **perturbation_kwargs)
        t3 = time.perf_counter()
        values = res.metric(metric)
        rows.append(RankedRules(name, comp, float(values.mean()), _se(values), t2 - t1, t3 - t2, res))
    rows.sort(key=lambda r: r.mean, reverse=metric != "morf")
    return RuleRanking(rows, metric, trace_s, skipped)
