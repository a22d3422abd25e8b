"""Which output, which target: ``output=`` helpers for common explanation targets, and token relevance.

Every helper returns a small callable object for :func:`dynlrp_fx.compile`'s ``output=``; it is applied to the
model's output *inside* the traced graph (so the explained quantity is part of the compiled program), and its
``repr`` says what it selects. ``target=`` at call time then indexes the flattened per-sample result:

=================================  =========================  ===============================================
helper                             explained tensor           ``target=``
=================================  =========================  ===============================================
``sequence_logit()``               ``logits`` ``(B, C)``      the class (``None``: predicted class)
``sequence_logit(label=c)``        ``logits[:, c]`` ``(B,1)`` -- (always class ``c``)
``next_token(position=-1)``        ``logits[:, pos]`` (B, V)  the token id (``None``: the predicted token)
``qa_start()`` / ``qa_end()``      ``start/end_logits``       the token position (``None``: predicted span)
``contrastive(a, b)``              ``logit a - logit b``      -- (``(B, 1)``; "why a rather than b")
``field(name)``                    any named output           as the output's shape
(default: ``logits`` (B, L, V))    causal-LM logits           ``each_token()``: every next token at once
=================================  =========================  ===============================================

>>> explainer = dynlrp.compile(gpt2, example_kwargs=..., output=dynlrp.targets.next_token())  # doctest: +SKIP
>>> expl = explainer(input_ids=ids, attention_mask=mask)                                      # doctest: +SKIP
>>> dynlrp.targets.token_relevance(expl, ids, tokenizer)[0]  # [(token, relevance), ...]     # doctest: +SKIP

``target=`` may also be a :class:`TargetRule`, resolved at call time from the inputs: ``each_token()`` explains,
at every position ``t`` of a causal LM's input, the logit of the token at ``t + 1`` (teacher forcing), as ``K``
targets per sample in one forward pass and one batched sweep: ``inputs["input_ids"]`` is then the source x target
matrix ``(B, K, L)`` (row ``j``: the relevance of every input token for predicting token ``positions[j] + 1``).

LRP rules are linear in the seed relevance, so ``contrastive(a, b)`` gives exactly the relevance for ``a`` minus
the relevance for ``b`` under LRP-0 (with epsilon > 0 up to the stabiliser of the subtraction).

Several outputs are explained together by naming them: ``output=["start_logits", "end_logits"]`` seeds both
(each at its own target, ``target={"start_logits": s, "end_logits": e}``, argmax by default) in one relevance
sweep, which equals the sum of the two single-output explanations (DynamicLRP's SQuAD setting; ``qa_start()`` and
``qa_end()`` explain one of them). An output without a batch dimension (a 0-d score or loss) is explained as one
sample per call, its ``target=`` an index into the flattened output.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

__all__ = [
    "OutputSelector",
    "field",
    "sequence_logit",
    "next_token",
    "qa_start",
    "qa_end",
    "contrastive",
    "token_relevance",
    "TargetRule",
    "each_token",
    "Features",
]


class OutputSelector:
    """A named, composable ``output=`` callable (``fn(model_output) -> tensor``)."""

    def __init__(self, fn: Callable[[Any], torch.Tensor], description: str):
        self.fn = fn
        self.description = description

    def __call__(self, out: Any) -> torch.Tensor:
        return self.fn(out)

    def __repr__(self) -> str:
        return f"dynlrp.targets.{self.description}"


def _get(out: Any, name: str | int) -> torch.Tensor:
    """``out.name`` / ``out[name]``; a bare tensor output stands for ``logits``."""
    if isinstance(out, torch.Tensor):
        if name in ("logits", 0):
            return out
        raise ValueError(f"the model returned a single tensor, which has no output named {name!r}")
    if isinstance(name, int):
        return out[name]
    if isinstance(out, Mapping) or hasattr(out, "keys"):
        if name in out.keys():
            return out[name]
    elif hasattr(out, name):
        return getattr(out, name)
    have = list(out.keys()) if hasattr(out, "keys") else type(out).__name__
    raise KeyError(f"the model output has no {name!r}; it has {have}")


def field(name: str | int) -> OutputSelector:
    """The model output called ``name`` (``"logits"``, ``"last_hidden_state"``...) or at tuple position ``name``."""
    return OutputSelector(lambda out: _get(out, name), f"field({name!r})")


def sequence_logit(label: int | None = None, *, name: str = "logits") -> OutputSelector:
    """Sequence classification logits ``(B, C)``; with ``label``, only that class's logit ``(B, 1)``."""
    if label is None:
        return OutputSelector(lambda out: _get(out, name), f"sequence_logit(name={name!r})")

    def fn(out: Any) -> torch.Tensor:
        logits = _get(out, name)
        return logits[:, label].unsqueeze(1)

    return OutputSelector(fn, f"sequence_logit(label={label}, name={name!r})")


def next_token(position: int = -1, token: int | None = None, *, name: str = "logits") -> OutputSelector:
    """Causal-LM next-token logits at sequence ``position`` (default: the last): ``(B, vocab)``.

    ``target=`` picks the token id (``None``: the predicted next token); with ``token`` the output is that
    token's logit ``(B, 1)``. With left padding the last position is the last real token for every sample.
    """

    def fn(out: Any) -> torch.Tensor:
        logits = _get(out, name)
        if logits.ndim != 3:
            raise ValueError(f"next_token expects (batch, sequence, vocab) logits, got shape {tuple(logits.shape)}")
        step = logits[:, position, :]
        return step if token is None else step[:, token].unsqueeze(1)

    return OutputSelector(fn, f"next_token(position={position}, token={token}, name={name!r})")


def qa_start(*, name: str = "start_logits") -> OutputSelector:
    """Extractive question answering: start-position logits ``(B, T)``; ``target=`` is a token position."""
    return OutputSelector(lambda out: _get(out, name), f"qa_start(name={name!r})")


def qa_end(*, name: str = "end_logits") -> OutputSelector:
    """Extractive question answering: end-position logits ``(B, T)``; ``target=`` is a token position."""
    return OutputSelector(lambda out: _get(out, name), f"qa_end(name={name!r})")


def contrastive(a: int, b: int, base: Callable[[Any], torch.Tensor] | None = None) -> OutputSelector:
    """``base(out)[:, a] - base(out)[:, b]`` as ``(B, 1)``: why class/token ``a`` rather than ``b``.

    ``base`` is another selector giving ``(B, C)`` scores (default :func:`sequence_logit`; use
    ``next_token()`` for language models).
    """
    base = base or sequence_logit()

    def fn(out: Any) -> torch.Tensor:
        s = base(out)
        if s.ndim != 2:
            raise ValueError(f"contrastive needs (batch, classes) scores from {base!r}, got shape {tuple(s.shape)}")
        return (s[:, a] - s[:, b]).unsqueeze(1)

    return OutputSelector(fn, f"contrastive({a}, {b}, base={base!r})")


def token_relevance(
    explanation: Any,
    input_ids: torch.Tensor,
    tokenizer: Any,
    *,
    input: str = "input_ids",
    attention_mask: torch.Tensor | None = None,
) -> list[list[tuple[str, float]]]:
    """Pair every token with its relevance: one list of ``(token, relevance)`` per sample.

    ``tokenizer`` is a Hugging Face tokenizer (anything with ``convert_ids_to_tokens``). ``input`` names the
    explained integer input whose relevance is used (``explanation.inputs[input]``, one value per token);
    positions where ``attention_mask`` is 0 (padding) are left out.

    Raises
    ------
    KeyError: the explanation has no relevance for ``input``.
    ValueError: the relevance and ``input_ids`` shapes differ.
    """
    rel = explanation.inputs.get(input) if hasattr(explanation, "inputs") else None
    if rel is None:
        have = list(getattr(explanation, "inputs", {}))
        raise KeyError(f"token_relevance: the explanation has no relevance for input {input!r} (it has {have})")
    ids = torch.as_tensor(input_ids)
    if ids.ndim == 1:
        ids = ids.unsqueeze(0)
    if tuple(rel.shape) != tuple(ids.shape):
        raise ValueError(
            f"token_relevance: relevance of {input!r} has shape {tuple(rel.shape)} but input_ids have "
            f"shape {tuple(ids.shape)}; pass the ids the explanation was computed on"
        )
    keep = torch.ones_like(ids, dtype=torch.bool) if attention_mask is None else torch.as_tensor(attention_mask).bool()
    keep = keep.reshape(ids.shape)
    rows = []
    for i in range(ids.shape[0]):
        toks = tokenizer.convert_ids_to_tokens(ids[i].tolist())
        rows.append([(t, float(r)) for t, r, k in zip(toks, rel[i].tolist(), keep[i].tolist()) if k])
    return rows


class TargetRule:
    """A ``target=`` worked out at call time from the call's inputs and the explained output's sizes (subclasses
    implement :meth:`resolve`)."""

    def resolve(self, inputs: Mapping[str, torch.Tensor], output_shape: list[int | None]) -> torch.Tensor:
        """The ``(B, K)`` int64 targets (indices into each sample's flattened output) for these named inputs;
        ``output_shape`` is the explained output's size in this call (``None`` where unknown)."""
        raise NotImplementedError


class _EachToken(TargetRule):
    def __init__(self, positions: Any, input: str, alternative: Any = None, prefixes: bool = True):
        self.positions = positions
        self.input = input
        self.alternative = alternative
        #: the call path may explain early positions on prefixes of the sequence (see :func:`each_token`)
        self.prefixes = bool(prefixes)

    def __repr__(self) -> str:
        alt = "" if self.alternative is None else f", alternative={self.alternative!r}"
        pre = "" if self.prefixes else ", prefixes=False"
        return f"dynlrp.targets.each_token(positions={self.positions!r}, input={self.input!r}{alt}{pre})"

    def combine(self, expl: Any) -> Any:
        """With ``alternative=``: the first K targets' explanation minus the last K's (LRP is linear in the seed),
        i.e. the relevance for ``logit(token) - logit(alternative)`` at every position."""
        if self.alternative is None:
            return expl
        from .runtime import map_target_axis

        def diff(t: torch.Tensor, axis: int = 1) -> torch.Tensor:
            k = t.shape[axis] // 2
            return t.narrow(axis, 0, k) - t.narrow(axis, k, k)

        return map_target_axis(expl, diff, lambda t: diff(t, 0))

    def resolve(self, inputs: Mapping[str, torch.Tensor], output_shape: list[int | None]) -> torch.Tensor:
        if self.input not in inputs:
            raise ValueError(f"each_token: the call has no input {self.input!r} (it has {list(inputs)}); pass input=")
        ids = inputs[self.input]
        if ids.ndim != 2 or ids.dtype.is_floating_point:
            raise ValueError(f"each_token: {self.input!r} must be (batch, length) token ids, got {ids.dtype} "
                             f"{tuple(ids.shape)}")
        length = int(ids.shape[1])
        if len(output_shape) != 3 or output_shape[1] not in (None, length) or output_shape[2] is None:
            raise ValueError(
                f"each_token explains (batch, length, vocab) next-token logits; the explained output has shape "
                f"{tuple(output_shape)} (compile the causal LM with its default output, or output='logits')"
            )
        vocab = int(output_shape[2])
        if self.positions is None:
            pos = list(range(length - 1))
        else:
            pos = [int(p) + length if int(p) < 0 else int(p) for p in self.positions]
        bad = [p for p in pos if not 0 <= p < length - 1]
        if bad or not pos:
            raise ValueError(
                f"each_token: positions {bad or '(none)'} have no next token in a sequence of {length}: give "
                f"positions in [0, {length - 2}] (position t explains the logit of the token at t + 1)"
            )
        t = torch.tensor(pos, dtype=torch.long, device=ids.device)
        targets = t * vocab + ids[:, t + 1].long()
        if self.alternative is None:
            return targets
        alt = torch.as_tensor(self.alternative, device=ids.device)
        if alt.ndim == 0:
            alt = alt.expand(ids.shape)
        if tuple(alt.shape) != tuple(ids.shape) or alt.dtype.is_floating_point:
            raise ValueError(f"each_token: alternative= must be one token id or ids shaped like {self.input!r} "
                             f"{tuple(ids.shape)} (the alternative to the token at each position), got "
                             f"{alt.dtype} {tuple(alt.shape)}")
        if bool(((alt < 0) | (alt >= vocab)).any()):
            raise ValueError(f"each_token: alternative token ids must be in [0, {vocab})")
        return torch.cat([targets, t * vocab + alt[:, t + 1].long()], 1)


def each_token(positions: Any = None, *, input: str = "input_ids", alternative: Any = None,
               prefixes: bool = True) -> TargetRule:
    """``target=`` for a causal LM: at each position ``t`` (default: every position but the last), the logit of the
    token the input holds at ``t + 1`` (teacher forcing: pass the prompt and the generated ids). One forward pass and
    one batched relevance sweep explain them all; ``inputs[input]`` of the explanation is the ``(B, K, L)`` matrix
    (``K = len(positions)``, or ``L - 1``), ``explanation.targets`` the flat logit indices.

    >>> expl = explainer(input_ids=ids, target=dynlrp.targets.each_token())   # doctest: +SKIP
    >>> expl.inputs["input_ids"].shape                                         # doctest: +SKIP
    torch.Size([1, 11, 12])

    Row ``j`` equals a single explanation of ``logits[:, positions[j]]`` at target ``ids[:, positions[j] + 1]``;
    by causality the relevance of tokens after ``positions[j]`` is zero. Negative positions count from the end.

    ``alternative=`` (one token id, or ids shaped like the input: the alternative to the token at each position)
    makes it contrastive: each row explains ``logit(token) - logit(alternative)``, computed as 2K targets in the
    same sweep and subtracted (LRP is linear in the seed).

    ``prefixes=True`` (default) exploits the causal mask: nothing after position ``t`` can matter to the logit at
    ``t``, so where it saves work (many early positions, as in the whole matrix of a generation) the targets are
    split into groups by position and each group is explained on the prefix of the sequence that ends at its last
    position, its relevance padded with zeros; the group with the last positions runs on the whole sequence and
    gives the output. A group's prefix logits must equal the whole sequence's (to ``1e-4`` of their largest
    magnitude), else the model is not causal and the group is explained on the whole sequence instead. This needs
    a sequence length the program accepts at any size (the default trace; not a program specialised to one
    length, nor ``condition=``, ``capture=`` or ``params=``, which are explained on the whole sequence).
    ``prefixes=False`` always uses the whole sequence.
    """
    return _EachToken(None if positions is None else list(positions), input, alternative, prefixes)


class Features:
    """A ``condition=`` value with an explicit feature dim: ``Features([0, 3], dim=-1)`` selects features 0 and 3
    of the last dim of a module's output (``index`` as in ``condition=``: indices, or a float/bool mask; ``None``
    keeps every feature, which leaves the explanation as it is and reports each feature's relevance)."""

    def __init__(self, index: Any, dim: int | None = None):
        self.index = index
        self.dim = dim

    def __repr__(self) -> str:
        return f"dynlrp.targets.Features({self.index!r}, dim={self.dim!r})"
