"""The worked example of ``docs/faithfulness.md``: ``dynlrp.select_rules`` on the demo's digits CNN.

``python -m benchmarks.faithfulness_digits [--model cnn|vit] [--baseline blur] [--steps 16]`` trains the digits CNN
of the demo (``dynlrp_fx.demo.train_digits_cnn``, seed 0) or :class:`DigitsViT` (a two-block ViT with 2x2 patches,
trained the same way), ranks the presets that apply to it by ABPC on the 297 test digits (target: the predicted
class) and prints the Markdown table, a random-relevance reference row, and the times: the whole search, and one
``perturbation`` call (297 images x 16 steps, the evaluation alone).
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn

import dynlrp_fx as dynlrp
from dynlrp_fx.demo import fit_digits, train_digits_cnn


class _Block(nn.Module):
    """Pre-norm transformer block with explicit softmax attention (so the attention rules see q k^T, softmax, p v)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).reshape(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        att = (q @ k.transpose(-1, -2) / (d // self.heads) ** 0.5).softmax(-1)
        x = x + self.proj((att @ v).transpose(1, 2).reshape(b, t, d))
        return x + self.mlp(self.norm2(x))


class DigitsViT(nn.Module):
    """A small ViT for 8x8 digits: 2x2 patches (16 tokens) + a class token, two blocks of width 32, 4 heads."""

    def __init__(self, dim: int = 32, depth: int = 2, heads: int = 4):
        super().__init__()
        self.patch = nn.Conv2d(1, dim, 2, stride=2)
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Parameter(torch.randn(1, 17, dim) * 0.02)
        self.blocks = nn.Sequential(*[_Block(dim, heads) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, 10)

    def forward(self, x):
        tok = self.patch(x).flatten(2).transpose(1, 2)
        tok = torch.cat([self.cls.expand(x.shape[0], -1, -1), tok], 1) + self.pos
        return self.head(self.norm(self.blocks(tok))[:, 0])


def train_digits_vit(epochs: int = 40, seed: int = 0) -> tuple[DigitsViT, float, torch.Tensor, torch.Tensor]:
    """Train :class:`DigitsViT` like the demo's CNN (Adam, batches of 64, the same split); returns ``(model in eval
    mode, test accuracy, x_test, y_test)``."""
    return fit_digits(DigitsViT, epochs, seed)


def main() -> None:
    """Run the search and print what the guide quotes."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="cnn", choices=("cnn", "vit"))
    p.add_argument("--epochs", type=int, default=None, help="training epochs (default: 8 for the CNN, 40 for the ViT)")
    p.add_argument("--baseline", default="blur", choices=("blur", "zero", "mean"))
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--score", default="probability", choices=("probability", "logit"))
    p.add_argument("--grid", action="store_true",
                   help="candidates: epsilon over eps and epsilon_gamma_box over gamma (box [0, 1]) instead of presets")
    args = p.parse_args()

    t0 = time.perf_counter()
    train = train_digits_cnn if args.model == "cnn" else train_digits_vit
    model, acc, x, _ = train(**({} if args.epochs is None else {"epochs": args.epochs}))
    print(f"digits {args.model}: test accuracy {acc:.3f}, {len(x)} test images, "
          f"trained in {time.perf_counter() - t0:.1f} s; "
          f"torch threads {torch.get_num_threads()}")
    t0 = time.perf_counter()
    candidates = None
    if args.grid:
        grid = dynlrp.evaluate.grid
        candidates = {**grid("epsilon", eps=[1e-6, 0.1, 1.0]),
                      **grid("epsilon_gamma_box", gamma=[0.05, 0.25, 1.0], low=[0.0], high=[1.0])}
    ranking = dynlrp.select_rules(model, x, candidates=candidates, steps=args.steps, baseline=args.baseline, score=args.score)
    total = time.perf_counter() - t0
    print(ranking)
    print(f"select_rules: {total:.1f} s in all ({len(ranking)} candidates, trace {ranking.trace_seconds:.2f} s)")

    with torch.no_grad():
        target = model(x).argmax(1)
    rnd = torch.randn(x.shape, generator=torch.Generator().manual_seed(0))
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        res = dynlrp.evaluate.perturbation(model, x, target, rnd, steps=args.steps, baseline=args.baseline,
                                           score=args.score)
        times.append(time.perf_counter() - t0)
    print(f"random relevance: ABPC {res.mean_abpc:.3f} +- {res.se_abpc:.3f}")
    print(f"perturbation, {len(x)} images x {args.steps} steps: best of 3 {min(times):.2f} s "
          f"(all: {', '.join(f'{t:.2f}' for t in times)})")


if __name__ == "__main__":
    main()
