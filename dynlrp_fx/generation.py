"""Explain a generated text: every generated token's relevance over the prompt and the tokens before it.

:func:`explain_generation` generates with the model's own ``generate`` (greedy by default), then explains every
generated token at once with :func:`dynlrp_fx.targets.each_token` (teacher forcing on prompt + generation: one
forward pass, one batched relevance sweep) and returns the source x target matrix with the tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .runtime import Explanation
from .targets import each_token

__all__ = ["GenerationExplanation", "explain_generation"]


@dataclass
class GenerationExplanation:
    """What :func:`explain_generation` returns.

    ``ids`` (``(L,)``) are the prompt's and the generated token ids, ``tokens`` their strings, ``prompt_length``
    how many of them the prompt has; ``matrix`` (``(G, L)``, ``G = L - prompt_length``) holds in row ``g`` the
    relevance of every token for generating token ``prompt_length + g`` (zero from that token on: the model is
    causal); ``explanation`` is the full :class:`~dynlrp_fx.Explanation` (ledger per generated token).
    """

    ids: torch.Tensor
    tokens: list[str]
    prompt_length: int
    matrix: torch.Tensor
    explanation: Explanation

    @property
    def generated(self) -> list[str]:
        """The generated tokens."""
        return self.tokens[self.prompt_length :]

    def html(self, path: Any = None, *, normalize: str | float = "symmetric") -> str:
        """The matrix as an interactive HTML page (:func:`dynlrp_fx.viz.matrix_html`; click a generated token to
        see its heatmap over the text)."""
        from .viz import matrix_html

        return matrix_html(self.tokens, self.generated, self.matrix, path=path, normalize=normalize,
                           title="Relevance of each token for each generated token")

    def token_html(self, path: Any = None) -> str:
        """One token heatmap per generated token (:func:`dynlrp_fx.viz.token_html`), labelled with that token."""
        from .viz import token_html

        return token_html([self.tokens] * len(self.generated), self.matrix,
                          labels=[f"-> {t}" for t in self.generated], path=path)


def explain_generation(model: torch.nn.Module, tokenizer: Any, prompt: str, max_new_tokens: int = 20, *,
                       rules: Any = "epsilon", explainer: Any = None, **generate_kwargs: Any) -> GenerationExplanation:
    """Generate from ``prompt`` and explain every generated token.

    ``model`` is a causal LM with ``generate`` (Hugging Face); ``tokenizer`` turns ``prompt`` into ``input_ids`` and
    ids back into tokens. ``generate_kwargs`` go to ``model.generate`` (greedy decoding unless they say otherwise).
    The explainer is compiled for the model with ``rules`` (pass ``explainer=`` to reuse one; its sequence length is
    dynamic, so one explainer serves any prompt). The model is not changed.

    >>> g = dynlrp.explain_generation(gpt2, tokenizer, "The capital of France is", 5)   # doctest: +SKIP
    >>> g.generated, g.matrix.shape                                                      # doctest: +SKIP
    (['Ġthe', 'Ġcapital', ...], torch.Size([5, 10]))
    """
    from .explainer import compile as compile_explainer

    if not hasattr(model, "generate"):
        raise TypeError(f"explain_generation needs a model with generate(); {type(model).__name__} has none")
    enc = tokenizer(prompt, return_tensors="pt")
    ids = enc["input_ids"]
    if ids.ndim != 2 or ids.shape[0] != 1 or ids.shape[1] < 1:
        raise ValueError(f"explain_generation takes one prompt; the tokenizer gave input_ids of shape {tuple(ids.shape)}")
    device = next(model.parameters()).device
    kwargs = {"do_sample": False, **generate_kwargs}
    if getattr(tokenizer, "pad_token_id", None) is None and getattr(tokenizer, "eos_token_id", None) is not None:
        kwargs.setdefault("pad_token_id", tokenizer.eos_token_id)
    with torch.no_grad():
        full = model.generate(input_ids=ids.to(device), attention_mask=torch.ones_like(ids).to(device),
                              max_new_tokens=max_new_tokens, **kwargs)
    full = full[:1].detach()
    prompt_length, length = int(ids.shape[1]), int(full.shape[1])
    if length == prompt_length:
        raise ValueError("the model generated no token (it stopped at once); nothing to explain")
    if explainer is None:
        explainer = compile_explainer(model, example_kwargs={"input_ids": full}, rules=rules)
    expl = explainer(input_ids=full, target=each_token(positions=range(prompt_length - 1, length - 1)))
    tokens = tokenizer.convert_ids_to_tokens(full[0].tolist())
    return GenerationExplanation(full[0].cpu(), list(tokens), prompt_length, expl.inputs["input_ids"][0].cpu(), expl)
