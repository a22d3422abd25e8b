"""The worked example of ``docs/faithfulness.md``: ``dynlrp.select_rules`` on the demo's digits CNN.

``python -m benchmarks.faithfulness_digits [--baseline blur] [--steps 16]`` trains the digits CNN of the demo
(``dynlrp_fx.demo.train_digits_cnn``, seed 0), ranks the presets that apply to it by ABPC on the 297 test digits
(target: the predicted class) and prints the Markdown table, a random-relevance reference row, and the times: the
whole search, and one ``perturbation`` call (297 images x 16 steps, the evaluation alone).
"""

from __future__ import annotations

import argparse
import time

import torch

import dynlrp_fx as dynlrp
from dynlrp_fx.demo import train_digits_cnn


def main() -> None:
    """Run the search and print what the guide quotes."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--baseline", default="blur", choices=("blur", "zero", "mean"))
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--score", default="probability", choices=("probability", "logit"))
    args = p.parse_args()

    t0 = time.perf_counter()
    model, acc, x, _ = train_digits_cnn()
    print(f"digits CNN: test accuracy {acc:.3f}, {len(x)} test images, trained in {time.perf_counter() - t0:.1f} s; "
          f"torch threads {torch.get_num_threads()}")
    t0 = time.perf_counter()
    ranking = dynlrp.select_rules(model, x, steps=args.steps, baseline=args.baseline, score=args.score)
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
