"""Relevance of every zoo entry under a few presets, saved to one file, or compared bit for bit with a saved file.

A refactoring check: ``python -m benchmarks.zoo_snapshot save before.pt`` on the old code, then
``python -m benchmarks.zoo_snapshot compare before.pt`` on the new code reports every entry whose output, input
relevance, ledger, parameter or captured relevance differs in any bit (``torch.equal``), and exits 1 if any does.

Each entry is compiled with ``backend="eager"`` and explained in target mode (argmax) and in seed mode (a seed of
ones); vision entries also under ``epsilon_gamma_box`` (batch-norm folding, gamma's modified weights) and text
entries under ``attnlrp``.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

import dynlrp_fx as dynlrp
from dynlrp_fx import zoo


def _presets(entry) -> list[str]:
    extra = {"vision": "epsilon_gamma_box", "text": "attnlrp"}.get(entry.modality)
    return ["epsilon"] + ([extra] if extra else [])


def _flat(expl) -> dict[str, torch.Tensor]:
    out = {"output": expl.output, "absorbed": expl.absorbed, "seed": expl.conservation.seed}
    out.update({f"inputs.{k}": v for k, v in expl.inputs.items()})
    out.update({f"params.{k}": v for k, v in expl.params.items()})
    out.update({f"captured.{k}": v for k, v in expl.captured.items()})
    return {k: v.detach().clone() for k, v in out.items()}


def snapshot(names: list[str]) -> dict[str, dict[str, torch.Tensor]]:
    res: dict[str, dict[str, torch.Tensor]] = {}
    for name in names:
        entry = zoo.get(name)
        for preset in _presets(entry):
            key = f"{name}/{preset}"
            t0 = time.perf_counter()
            try:
                torch.manual_seed(0)
                model, args, kwargs = entry.build()
                ex = dynlrp.compile(model, tuple(args), example_kwargs=dict(kwargs or {}), output=entry.output,
                                    rules=preset, backend="eager")
                target = _flat(ex(*args, **kwargs))
                seed = torch.ones_like(target["output"])
                res[key] = {**{f"target.{k}": v for k, v in target.items()},
                            **{f"seed.{k}": v for k, v in _flat(ex(*args, seed=seed, **kwargs)).items()}}
                status = "ok"
            except Exception as e:  # noqa: BLE001 - recorded: an entry that fails must fail the same way after
                res[key] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"}
                status = res[key]["error"]
            print(f"{key}: {status} ({time.perf_counter() - t0:.1f} s)", file=sys.stderr, flush=True)
    return res


def compare(before: dict, after: dict) -> list[str]:
    bad = []
    for key in sorted(set(before) | set(after)):
        a, b = before.get(key), after.get(key)
        if a is None or b is None:
            bad.append(f"{key}: only in {'after' if a is None else 'before'}")
            continue
        if set(a) != set(b):
            bad.append(f"{key}: fields differ: {sorted(set(a) ^ set(b))}")
            continue
        for f in a:
            x, y = a[f], b[f]
            if isinstance(x, str) or isinstance(y, str):
                if x != y:
                    bad.append(f"{key}.{f}: {x!r} != {y!r}")
            elif x.shape != y.shape or x.dtype != y.dtype or not torch.equal(x, y):
                diff = (x.double() - y.double()).abs().max().item() if x.shape == y.shape else float("nan")
                bad.append(f"{key}.{f}: not bit-identical (max abs diff {diff:.3g})")
    return bad


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("action", choices=("save", "compare"))
    p.add_argument("path")
    p.add_argument("--names", default="", help="comma-separated zoo entries (default: all)")
    a = p.parse_args(argv)
    names = [n for n in a.names.split(",") if n] or zoo.names()
    res = snapshot(names)
    if a.action == "save":
        torch.save(res, a.path)
        print(f"saved {len(res)} explanations to {a.path}")
        return 0
    before = torch.load(a.path, weights_only=True)
    if a.names:
        before = {k: v for k, v in before.items() if k.split("/")[0] in names}
    bad = compare(before, res)
    print("\n".join(bad) if bad else f"all {len(res)} explanations bit-identical")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
