"""Gradient form vs. relevance form vs. gradient x input, same run, at the sizes people use (issue 16).

``python -m benchmarks.gradient_form [--models resnet50,bert_base,...] [--batches 1] [--reps 5]`` builds each model
once (random weights, frozen), traces one explainer per preset, builds a second explainer on the same trace with every
rule in relevance form (``Analysis(gradient_form=False)``, the program before issue 16), and times eager gradient x
input (``benchmarks.peers``), both explainers, interleaved; medians. It checks that both forms give the same
relevance and writes ``benchmarks/results/gradient_form.{md,json}``. ``--ledger`` times a third explainer on the same
trace without the conservation ledger (``Analysis(ledger=False)``) in the same loop: the ledger's share of a call.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from .models import build
from .peers import make_method
from .run import peak_extra_bytes

#: presets per model kind (the issue's targets: lrp0 / attnlrp / cp_lrp <= 1.05x, epsilon <= 1.15x,
#: epsilon_gamma_box <= 1.6x of eager gradient x input)
PRESETS = {
    "cnn": ("lrp0", "epsilon", "epsilon_gamma_box"),
    "vit": ("attnlrp", "cp_lrp", "epsilon"),
    "transformer": ("attnlrp", "cp_lrp", "epsilon"),
}
TARGET = {"lrp0": 1.05, "attnlrp": 1.05, "cp_lrp": 1.05, "epsilon": 1.15, "epsilon_gamma_box": 1.6}
SIZES = {"res": 224, "vit_res": 224, "seq": 128}


def _relevance(e) -> torch.Tensor:
    return e.relevance if e.relevance is not None else next(iter(e.inputs.values()))


def _rel_diff(a, b) -> float:
    """Largest difference of two explanations' relevance, relative to the largest entry of ``b``'s."""
    ra, rb = _relevance(a).double(), _relevance(b).double()
    return float((ra - rb).abs().max() / rb.abs().max().clamp_min(1e-30))


def bench(name: str, batch: int, reps: int, log, sizes: dict | None = None, reference: bool = True,
          only: set | None = None, ledger: bool = False, narrow: bool = False) -> list[dict]:
    import dynlrp_fx as dynlrp
    from dynlrp_fx.explainer import Explainer
    from dynlrp_fx.program import Analysis

    bm = build(name, torch.device("cpu"), sizes or SIZES)
    bm.model.requires_grad_(False)
    args, kwargs = bm.make_inputs(batch)
    gxi = make_method("gxi", bm, args, kwargs, "cpu", {})
    rows = []
    for rules in (r for r in PRESETS[bm.kind] if only is None or r in only):
        ex_args, ex_kwargs = bm.make_inputs(2)
        ex = dynlrp.compile(bm.model, ex_args, example_kwargs=ex_kwargs, rules=rules, backend="eager")
        ref = Explainer(bm.model, ex.traced, ex.composite, backend="eager",
                        analysis=Analysis(ex.traced, ex.composite, gradient_form=False))
        fns = {"gxi": gxi, "gradient form": lambda ex=ex: ex(*args, **kwargs)}
        if reference:
            fns["relevance form"] = lambda ref=ref: ref(*args, **kwargs)
        if ledger:  # the same program without its ledger entries: what the ledger costs
            bare = Explainer(bm.model, ex.traced, ex.composite, backend="eager",
                             analysis=Analysis(ex.traced, ex.composite, ledger=False))
            fns["no ledger"] = lambda bare=bare: bare(*args, **kwargs)
        if narrow:  # the same program with every row computed (narrow_dead_rows off): what narrowing saves
            whole = Explainer(bm.model, ex.traced, ex.composite, backend="eager",
                              analysis=Analysis(ex.traced, ex.composite, narrow_rows=False))
            fns["whole rows"] = lambda whole=whole: whole(*args, **kwargs)
        a = fns["gradient form"]()
        narrow_diff = _rel_diff(a, fns["whole rows"]()) if narrow else None
        ledger_diff = None
        if ledger:  # the ledger only adds outputs: the relevance must be the same (to the kernels' rounding: the
            # programs' buffers differ, and a matmul on another layout may sum in another order)
            ledger_diff = _rel_diff(a, fns["no ledger"]())
            if not ledger_diff <= 1e-5:
                raise AssertionError(f"{name} {rules}: relevance without the ledger differs by {ledger_diff:.1e}")
        diff = None
        if reference:
            diff = _rel_diff(a, fns["relevance form"]())
        peak = {k: peak_extra_bytes(fns[k], "cpu") for k in ("gxi", "gradient form", "whole rows") if k in fns}
        for f in fns.values():  # warm-up
            f()
        times = {k: [] for k in fns}
        for _ in range(reps):
            for k, f in fns.items():
                t = time.perf_counter()
                f()
                times[k].append(time.perf_counter() - t)
        med = {k: statistics.median(v) for k, v in times.items()}
        rel = med.get("relevance form")
        bare_ms = med.get("no ledger")
        row = {"model": name, "size": bm.size, "batch": batch, "rules": rules,
               "gxi_ms": med["gxi"] * 1e3, "gradient_ms": med["gradient form"] * 1e3,
               "relevance_ms": rel * 1e3 if rel else None,
               "gradient_ratio": med["gradient form"] / med["gxi"], "relevance_ratio": rel / med["gxi"] if rel else None,
               # fastest run / fastest run: less sensitive to a busy neighbour on a shared VM than the medians
               "gradient_ratio_min": min(times["gradient form"]) / min(times["gxi"]),
               "target": TARGET.get(rules), "max_rel_diff": diff,
               "gxi_peak_bytes": peak["gxi"], "peak_bytes": peak["gradient form"],
               "peak_ratio": peak["gradient form"] / peak["gxi"] if peak["gxi"] else None,
               "conservation_error": float(a.conservation.error.max()),
               # held between calls, outside the per-call peak (dynlrp_fx.weight_cache)
               "weight_cache_bytes": ex.weight_cache_bytes,
               # the ledger's share of a call: (with - without) / with, medians of the same loop
               "no_ledger_ms": bare_ms * 1e3 if bare_ms else None, "no_ledger_max_rel_diff": ledger_diff,
               "ledger_share": (med["gradient form"] - bare_ms) / med["gradient form"] if bare_ms else None,
               # the same from the fastest runs (less sensitive to a busy neighbour than the medians)
               "ledger_share_min": (1 - min(times["no ledger"]) / min(times["gradient form"])) if bare_ms else None}
        if narrow:
            row.update(narrowed_nodes=sum("dynlrp_narrowed" in n.meta for n in ex.analysis.graph.graph.nodes),
                       whole_ms=med["whole rows"] * 1e3, whole_ratio=med["whole rows"] / med["gxi"],
                       whole_ratio_min=min(times["whole rows"]) / min(times["gxi"]),
                       whole_peak_ratio=peak["whole rows"] / peak["gxi"] if peak["gxi"] else None,
                       narrow_max_rel_diff=narrow_diff)
            log(f"  whole rows: {row['whole_ms']:.0f} ms ({row['whole_ratio']:.2f}x, fastest "
                f"{row['whole_ratio_min']:.2f}x), peak {row['whole_peak_ratio']:.3f}x; narrowed nodes "
                f"{row['narrowed_nodes']}, diff {narrow_diff:.1e}")
        if ledger:  # ops and bytes written at the example sizes (batch 2), with and without the ledger
            (ops, wb), (bare_ops, bare_wb) = _written(ex), _written(bare)
            row.update(ops=ops, no_ledger_ops=bare_ops, ledger_bytes_share=1 - bare_wb / wb)
        row["met"] = row["target"] is not None and row["gradient_ratio"] <= row["target"]
        row["peak_met"] = row["peak_ratio"] is not None and row["peak_ratio"] <= 1.0
        log(f"{name} B={batch} {rules}: gxi {row['gxi_ms']:.0f} ms, gradient form {row['gradient_ms']:.0f} ms "
            f"({row['gradient_ratio']:.2f}x, fastest {row['gradient_ratio_min']:.2f}x), relevance form "
            + (f"{row['relevance_ms']:.0f} ms ({row['relevance_ratio']:.2f}x), diff {diff:.1e}" if rel else "-")
            + f", peak {row['peak_ratio']:.2f}x of gxi"
            + (f", ledger {100 * row['ledger_share']:.1f}% of the call (fastest runs {100 * row['ledger_share_min']:.1f}%, "
               f"{100 * row['ledger_bytes_share']:.1f}% of the bytes written, ops {row['ops']} vs {row['no_ledger_ops']}, "
               f"diff {ledger_diff:.1e})" if bare_ms else ""))
        rows.append(row)
    return rows


def _written(explainer) -> tuple[int, int]:
    """``(ops, bytes)`` of an explainer's target-mode program at its example sizes: its ATen calls, and the bytes
    they write (views excluded), a deterministic measure of its elementwise work beside the noisy timings."""
    from dynlrp_fx.passes.nodes import bytes_hint
    from dynlrp_fx.rules.table import returns_alias

    nodes = [n for n in explainer.graph("target").graph.nodes if n.op == "call_function"]
    written = sum(bytes_hint(n.meta.get("val")) or 0 for n in nodes if isinstance(n.meta.get("val"), torch.Tensor)
                  and not (isinstance(n.target, torch._ops.OpOverload) and returns_alias(n.target)))
    return len(nodes), written


def _share(r: dict) -> str:
    """The ledger's share of a call, medians / fastest runs (``-`` when not measured)."""
    if r.get("ledger_share") is None:
        return "-"
    fastest = r.get("ledger_share_min")
    written = r.get("ledger_bytes_share")
    return (f"{100 * r['ledger_share']:.1f}%" + ("" if fastest is None else f" / {100 * fastest:.1f}%")
            + ("" if written is None else f" (bytes {100 * written:.0f}%)"))


def markdown(rows: list[dict], meta: dict) -> str:
    lines = [
        "<!-- Generated by `python -m benchmarks.gradient_form` -->",
        "# Gradient form vs. relevance form (issue 16), same run",
        "",
        f"- {meta['date']}, {meta['machine']}, torch {meta['torch']}, {meta['threads']} threads; eager backend, frozen "
        f"random weights, median of {meta['reps']} interleaved runs after a warm-up",
        "- ratio = time / eager gradient x input (autograd, input gradient only, times the input); relevance form = "
        "the same trace with every rule in relevance form (the program before issue 16); weight cache = what the "
        "explainer holds between calls (values computed from the weights alone), outside the per-call peak; ledger share = "
        "(gradient form - the same program without the conservation ledger) / gradient form, same loop (`--ledger`)",
        "",
        "| model | size | batch | rules | gxi ms | gradient form ms | ratio | ratio of fastest runs | target | met "
        "| relevance form ms "
        "| ratio | peak extra MiB (gxi / ours) | peak ratio | peak <= gxi | max rel. diff | conservation error "
        "| weight cache MiB | ledger share of the time, median / fastest (of the bytes written) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]

    def opt(v, fmt):
        return "-" if v is None else format(v, fmt)

    for r in rows:
        mib = f"{opt(r['gxi_peak_bytes'] and r['gxi_peak_bytes'] / 2**20, '.1f')} / {opt(r['peak_bytes'] and r['peak_bytes'] / 2**20, '.1f')}"
        lines.append(
            f"| {r['model']} | {r['size']} | {r['batch']} | {r['rules']} | {r['gxi_ms']:.0f} | {r['gradient_ms']:.0f} "
            f"| {r['gradient_ratio']:.2f} | {opt(r.get('gradient_ratio_min'), '.2f')} | <= {r['target']} | {'yes' if r['met'] else '**no**'} | "
            f"{opt(r['relevance_ms'], '.0f')} | {opt(r['relevance_ratio'], '.2f')} | {mib} | "
            f"{opt(r['peak_ratio'], '.2f')} | {'yes' if r['peak_met'] else '**no**'} | {opt(r['max_rel_diff'], '.1e')} | "
            f"{r['conservation_error']:.1e} | {opt(r.get('weight_cache_bytes') and r['weight_cache_bytes'] / 2**20, '.1f')} | "
            f"{_share(r)} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="resnet50,vgg16,vit_b_16,bert_base,gpt2_small,llama_8l")
    ap.add_argument("--batches", default="1")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--rules", default=None, help="comma list of presets to run (default: all of each model's)")
    ap.add_argument("--no-reference", action="store_true",
                    help="skip the relevance-form column (the A/B against the program before issue 16)")
    ap.add_argument("--append", action="store_true", help="add the rows to the existing results (replacing rows of the same model, batch and preset)")
    ap.add_argument("--ledger", action="store_true",
                    help="also time each program without its conservation ledger (the ledger's share of a call)")
    ap.add_argument("--narrow", action="store_true",
                    help="also time each program with every row computed (narrow_dead_rows off): what it saves")
    ap.add_argument("--smoke", action="store_true", help="64x64 images and 16 tokens (checks the script, not a result)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "gradient_form"))
    a = ap.parse_args(argv)
    torch.manual_seed(0)
    rows = []
    for name in a.models.split(","):
        for b in (int(x) for x in a.batches.split(",")):
            rows += bench(name, b, a.reps, lambda m: print(m, flush=True),
                          {"res": 64, "vit_res": 64, "seq": 16} if a.smoke else None, reference=not a.no_reference,
                          only=set(a.rules.split(",")) if a.rules else None, ledger=a.ledger, narrow=a.narrow)
    meta = {"date": datetime.date.today().isoformat(), "machine": f"{platform.machine()} {torch.get_num_threads()} threads",
            "torch": torch.__version__, "threads": torch.get_num_threads(), "reps": a.reps}
    if a.smoke:
        print(markdown(rows, meta))
        return 0
    if a.append and Path(a.out + ".json").exists():
        # a new row replaces the old one of the same model, batch and preset
        key = lambda r: (r["model"], r["batch"], r["rules"])  # noqa: E731
        new = {key(r) for r in rows}
        rows = [r for r in json.loads(Path(a.out + ".json").read_text())["rows"] if key(r) not in new] + rows
    Path(a.out + ".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    Path(a.out + ".md").write_text(markdown(rows, meta))
    print(markdown(rows, meta))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
