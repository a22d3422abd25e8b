"""Benchmark: ``python -m benchmarks.run [--quick] [--device cpu|cuda] [--json FILE] [--md FILE]``.

For each model and batch size, every method is built once, called once (compilation happens here and is timed
as ``first call``), warmed up, then timed ``--reps`` times *interleaved* (method A, B, C, A, B, C, ...) so that
load on a shared machine hits all methods alike; the median is reported. Peak extra memory is measured in a
separate call per method: on GPU ``torch.cuda.max_memory_allocated`` above the memory allocated before the call;
on CPU the peak of the bytes torch's allocator holds during the call, from the profiler's memory events (exact and
repeatable; peak RSS was blurred by the C allocator's caching). Prints a markdown table of times, ratios to eager gradient x input
and to each peer, memory, compile times and the issue-7 targets; ``--json`` writes everything.

``--cache-test MODEL`` measures Inductor compile time of our explainer cold and warm in two fresh processes that
share one new cache directory (Inductor's FX graph cache, ``torch._inductor.config.fx_graph_cache``).
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import torch

from .models import MODELS, build, sizes_for
from .peers import METHODS, Unavailable, make_method

#: DynamicLRP's published configuration, H200, fp32 (``benchmarks/results/tuning_notes.md``, "Peer reference
#: numbers"; quoted, not measured here), ms
DYNAMICLRP_H200_MS = {
    ("vgg16", 1): 34.5,
    ("vgg16", 16): 92.6,
    ("vit_b_16", 1): 242.0,  # HF ViT-B/16
    ("vit_b_16", 16): 458.0,
    ("bert_base", 1): 147.0,  # seq 128
    ("bert_base", 16): 268.0,
    ("llama_8l", 1): 210.0,  # 8 x 1024, seq 128
    ("llama_8l", 16): 286.0,
}

#: LXT (AttnLRP), H200, fp32, measured by the team in a separate environment with transformers 4.53
#: (``benchmarks/results/tuning_notes.md``, "Peer reference numbers"; quoted where LXT is not importable, as with
#: transformers 5; ``benchmarks/lxt_env.sh`` runs LXT in the same run as ours in a transformers 4.53 venv), ms
LXT_H200_MS = {
    ("vit_b_16", 1): 18.8,  # HF ViT-B/16
    ("vit_b_16", 16): 38.6,
    ("bert_base", 1): 26.7,  # seq 128
    ("bert_base", 16): 26.6,
    ("llama_8l", 1): 16.6,  # 8 x 1024, seq 128
    ("llama_8l", 16): 28.5,
}

#: methods that replay CUDA graphs (their memory lives in the graph pool)
CUDA_GRAPHS = ("ours_inductor_cg",)

OURS = ("ours_eager", "ours_eager_recompute", "ours_inductor", "ours_inductor_cg", "ours_attnlrp_eager", "ours_cp_lrp_eager")
PEERS = ("zennit_eps", "zennit_egb", "captum_lrp", "lxt")


# -- measurement --------------------------------------------------------------------------------------------------
def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _trim() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def _cpu_peak_allocated(fn: Callable[[], Any]) -> int:
    """Peak of the bytes torch's CPU allocator holds above the level before the call, from the profiler's memory
    events (every allocation and free, in order): deterministic, unlike peak RSS, which the C allocator's caching
    and page reuse blur. Memory a library allocates outside torch's allocator (oneDNN scratch space) is not seen."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn()
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as f:
            events = json.load(f)["traceEvents"]
    del out
    steps = sorted(
        (e["args"]["Ev Idx"], e["args"]["Bytes"])
        for e in events
        if e.get("name") == "[memory]" and e.get("args", {}).get("Device Type", 0) == 0
    )
    cur = peak = 0
    for _, nbytes in steps:
        cur += nbytes
        peak = max(peak, cur)
    return peak


def peak_extra_bytes(fn: Callable[[], Any], device: str) -> int | None:
    """Peak memory above the level before one call of ``fn``, the call's output included (GPU: the caching
    allocator's peak; CPU: the peak of torch's allocations, see :func:`_cpu_peak_allocated`)."""
    _trim()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        out = fn()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
        del out
        return peak
    return _cpu_peak_allocated(fn)


def _relevance_of(out: Any) -> torch.Tensor | None:
    """The input relevance a method returned (an Explanation's ``relevance`` or a plain tensor)."""
    rel = getattr(out, "relevance", out)
    return rel.detach().float() if isinstance(rel, torch.Tensor) else None


#: cross-checks on the first call's relevance: (method, reference method); "rel diff" = ||a - b|| / ||b||
CHECKS = (
    ("ours_eager", "gxi"),  # LRP-epsilon(1e-6) ~ gradient x input on ReLU CNNs (not on transformers)
    ("ours_eager_recompute", "ours_eager"),
    ("ours_inductor", "ours_eager"),
    ("ours_inductor_cg", "ours_eager"),
    ("zennit_eps", "ours_eager"),
    ("captum_lrp", "ours_eager"),
    ("zennit_egb", "ours_egb_eager"),
)


def cross_checks(rels: dict[str, torch.Tensor], kind: str) -> dict[str, str]:
    """Relative differences between methods' relevance (same inputs, same target) for the checks in CHECKS."""
    out = {}
    for m, ref in CHECKS:
        if ref == "gxi" and kind != "cnn":
            continue  # LRP differs from the gradient on transformers by design
        a, b = rels.get(m), rels.get(ref)
        if a is None or b is None or a.shape != b.shape:
            continue
        a, b = a.double(), b.double()  # float32 norms overflow on exploding peer relevance
        d = (a - b).norm() / b.norm().clamp_min(1e-30)
        out[m] = f"rel diff vs {ref} {d.item():.1e}"
    return out


def time_once(fn: Callable[[], Any], device: str) -> float:
    _sync(device)
    t = time.perf_counter()
    out = fn()
    _sync(device)
    dt = time.perf_counter() - t
    del out
    return dt


# -- one model ----------------------------------------------------------------------------------------------------
def bench_model(
    name: str, device: str, sizes: dict, methods: list[str], reps: int, warmup: int, log: Callable[[str], None]
) -> list[dict]:
    """Benchmark all ``methods`` on model ``name`` at each batch size; returns one row per (batch, method)."""
    dev = torch.device(device)
    bm = build(name, dev, sizes)
    bm.model.requires_grad_(False)
    rows = []
    for batch in sizes["batches"]:
        args, kwargs = bm.make_inputs(batch)
        fns: dict[str, Callable] = {}
        info: dict[str, dict] = {}
        status: dict[str, str] = {}
        rels: dict[str, torch.Tensor] = {}
        for m in methods:
            info[m] = {}
            try:
                fn = make_method(m, bm, args, kwargs, device, info[m])
                t = time.perf_counter()
                rel = _relevance_of(fn())
                _sync(device)
                if rel is not None:
                    rels[m] = rel
                info[m].setdefault("first_call_s", time.perf_counter() - t)
                fns[m] = fn
                log(f"  {name} b={batch} {m}: first call {info[m]['first_call_s']:.2f}s")
            except Unavailable as e:
                status[m] = f"n/a: {e}"
            except Exception as e:  # noqa: BLE001 - a failing peer is a result, not a crash
                status[m] = f"error: {type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
                log(f"  {name} b={batch} {m}: {status[m]}")
        checks = cross_checks(rels, bm.kind)
        rels.clear()
        for m, c in checks.items():
            info[m]["check"] = c
            log(f"  {name} b={batch} {m}: {c}")
        for _ in range(warmup):
            for fn in fns.values():
                time_once(fn, device)
        times: dict[str, list[float]] = {m: [] for m in fns}
        for _ in range(reps):
            for m, fn in fns.items():
                times[m].append(time_once(fn, device))
        # a CUDA-graph program allocates from its graph's private pool when captured, not per call: its peak
        # is not comparable (it would read ~0), so it is not reported
        mem = {m: None if m in CUDA_GRAPHS else peak_extra_bytes(fn, device) for m, fn in fns.items()}
        for m in methods:
            row = {"model": name, "size": bm.size, "batch": batch, "method": m, **info.get(m, {})}
            if m in fns:
                row["median_s"] = statistics.median(times[m])
                row["times_s"] = times[m]
                row["peak_extra_bytes"] = mem[m]
            else:
                row["status"] = status.get(m, "skipped")
            rows.append(row)
        fns.clear()
        _trim()
        log(f"  {name} b={batch}: " + ", ".join(f"{m} {statistics.median(t) * 1e3:.1f}ms" for m, t in times.items()))
    del bm
    _trim()
    return rows


# -- reporting ----------------------------------------------------------------------------------------------------
def _fmt_ms(s: float | None) -> str:
    return "-" if s is None else (f"{s * 1e3:.1f}" if s < 10 else f"{s * 1e3:.0f}")


def _fmt_mb(b: int | None) -> str:
    return "-" if b is None else f"{b / 2**20:.0f}"


def _group(rows: list[dict]) -> dict[tuple, dict[str, dict]]:
    out: dict[tuple, dict[str, dict]] = {}
    for r in rows:
        out.setdefault((r["model"], r["size"], r["batch"]), {})[r["method"]] = r
    return out


def targets(rows: list[dict], device: str) -> list[dict]:
    """Evaluate the issue-7 targets on measured rows; each entry says met / not met with the numbers."""
    res = []
    for (model, _size, batch), g in _group(rows).items():
        gx = g.get("gxi", {}).get("median_s")
        ours = {m: g[m]["median_s"] for m in OURS if m in g and "median_s" in g[m]}
        if not gx or not ours:
            continue
        best_m = min(ours, key=ours.get)
        best = ours[best_m]

        def add(
            name: str,
            value: float | None,
            limit: float,
            lower_is_better: bool = True,
            note: str = "",
            model: str = model,
            batch: int = batch,
        ) -> None:
            if value is None:
                res.append({"model": model, "batch": batch, "target": name, "value": None, "met": None, "note": note})
                return
            met = value <= limit if lower_is_better else value >= limit
            res.append({"model": model, "batch": batch, "target": name, "value": value, "met": met, "note": note})

        if device == "cpu":
            add("ours <= 1.5x eager grad x input", best / gx, 1.5, note=best_m)
        else:
            if batch >= 16 and "ours_inductor" in ours:
                add("ours (inductor) <= 1.0x eager grad x input, B=16", ours["ours_inductor"] / gx, 1.0)
            if batch == 1:
                cg = ours.get("ours_inductor_cg")
                add("ours (CUDA graphs) <= 0.5x eager grad x input, B=1", None if cg is None else cg / gx, 0.5)
        zg = g.get("zennit_egb", {}).get("median_s")
        og = g.get("ours_egb_eager", {}).get("median_s")
        if zg:
            # same composite on both sides when ours_egb ran; else our fastest (epsilon) variant
            add(
                ">= 10x faster than Zennit EpsilonGammaBox",
                zg / (og or best),
                10.0,
                lower_is_better=False,
                note="ours_egb_eager" if og else best_m,
            )
        if device == "cuda" and (model, batch) in DYNAMICLRP_H200_MS:
            add(
                ">= 10x faster than DynamicLRP (published H200 ms, not measured)",
                DYNAMICLRP_H200_MS[(model, batch)] / (best * 1e3),
                10.0,
                lower_is_better=False,
                note=best_m,
            )
        if device == "cuda" and batch == 1 and (model, batch) in LXT_H200_MS:
            add(
                ">= 2x faster than LXT, B=1 (quoted H200 ms, not measured)",
                LXT_H200_MS[(model, batch)] / (best * 1e3),
                2.0,
                lower_is_better=False,
                note=best_m,
            )
        if g.get("lxt") and batch == 1 and "targets transformers" not in g["lxt"].get("status", ""):
            lx = g["lxt"].get("median_s")
            same_m = "ours_cp_lrp_eager" if model == "vit_b_16" else "ours_attnlrp_eager"  # LXT's rules
            same = g.get(same_m, {}).get("median_s")
            add(
                ">= 2x faster than LXT, B=1",
                None if lx is None else lx / (same or best),
                2.0,
                lower_is_better=False,
                note="; ".join(x for x in (same_m if same else best_m, g["lxt"].get("status", "")) if x),
            )
        gm = g.get("gxi", {}).get("peak_extra_bytes")
        mems = {m: g[m]["peak_extra_bytes"] for m in ours if g[m].get("peak_extra_bytes") is not None}
        if gm and mems:
            low = min(mems, key=mems.get)  # the memory policy is a choice: report the leanest of our variants
            add("peak extra memory <= eager grad x input", mems[low] / gm, 1.0, note=low)
    return res


def markdown(rows: list[dict], meta: dict, tgt: list[dict]) -> str:
    lines = [
        f"# dynlrp-fx benchmark: {meta['device_name']}",
        "",
        f"- device: {meta['device_name']} ({meta['device']}), torch {meta['torch']}, date {meta['date']}",
        f"- mode: {'quick' if meta['quick'] else 'full'}, median of {meta['reps']} interleaved runs after "
        f"{meta['warmup']} warm-up call(s) (plus the first call, which compiles), fp32, random weights, "
        "parameters frozen (input gradients only)",
        f"- command: `{meta['command']}`",
        "- x gxi: time / eager gradient x input (same run); peak extra: "
        + (
            "`max_memory_allocated` above the allocated memory before the call"
            if meta["device"] == "cuda"
            else "peak of torch's CPU allocations during the call (profiler memory events; exact, output included)"
        ),
        "",
        "| model | input | B | method | median ms | x gxi | x fwd | peak extra MiB | first call s | notes |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for (model, size, batch), g in _group(rows).items():
        gx = g.get("gxi", {}).get("median_s")
        fw = g.get("forward", {}).get("median_s")
        for m, r in g.items():
            t = r.get("median_s")
            notes = r.get("status", "")
            if "build_s" in r:
                what = "recompile" if r.get("derived") else "trace+passes"
                notes = (notes + " " if notes else "") + f"{what} {r['build_s']:.1f}s"
            if "check" in r:
                notes = (notes + "; " if notes else "") + r["check"]
            xg = f"{t / gx:.2f}" if t and gx else "-"
            xf = f"{t / fw:.2f}" if t and fw else "-"
            fc = f"{r['first_call_s']:.1f}" if "first_call_s" in r else "-"
            mb = _fmt_mb(r.get("peak_extra_bytes"))
            lines.append(f"| {model} | {size} | {batch} | {m} | {_fmt_ms(t)} | {xg} | {xf} | {mb} | {fc} | {notes} |")
    lines += ["", "## Ours vs peers (same run): peer time / our best time (>1: we are faster)", ""]
    lines += ["| model | B | our best | " + " | ".join(PEERS) + " |", "|---|---|---|" + "---|" * len(PEERS)]
    for (model, _size, batch), g in _group(rows).items():
        ours = {m: g[m]["median_s"] for m in OURS if m in g and "median_s" in g[m]}
        if not ours:
            continue
        bm = min(ours, key=ours.get)
        cells = []
        for p in PEERS:
            r = g.get(p)
            if r is None:
                cells.append("-")
            elif "median_s" in r:
                cells.append(f"{r['median_s'] / ours[bm]:.1f}x")
            else:
                cells.append("n/a" if r.get("status", "").startswith("n/a") else "error")
        lines.append(f"| {model} | {batch} | {bm} {ours[bm] * 1e3:.1f} ms | " + " | ".join(cells) + " |")
    lines += ["", "## Targets (issue 7)", "", "| model | B | target | value | met |", "|---|---|---|---|---|"]
    for t in tgt:
        v = "not measured" if t["value"] is None else f"{t['value']:.2f}"
        met = "n/a" if t["met"] is None else ("yes" if t["met"] else "**no**")
        lines.append(f"| {t['model']} | {t['batch']} | {t['target']} | {v} {t['note']} | {met} |")
    return "\n".join(lines) + "\n"


# -- compile cache ------------------------------------------------------------------------------------------------
_CACHE_CHILD = r"""
import sys, time, json, torch
from benchmarks.models import build, sizes_for
import dynlrp_fx as dynlrp
name, device = sys.argv[1], sys.argv[2]
bm = build(name, torch.device(device), sizes_for(device, True))
bm.model.requires_grad_(False)
a, kw = bm.make_inputs(2)
t = time.perf_counter()
ex = dynlrp.compile(bm.model, a, example_kwargs=kw, backend="inductor")
t1 = time.perf_counter()
ex(*a, **kw)
if device == "cuda": torch.cuda.synchronize()
t2 = time.perf_counter()
print(json.dumps({"trace_passes_s": t1 - t, "first_call_s": t2 - t1}))
"""


def cache_test(name: str, device: str) -> dict:
    """Compile our explainer for ``name`` in two fresh processes sharing a new Inductor cache directory."""
    with tempfile.TemporaryDirectory(prefix="dynlrp_inductor_cache_") as d:
        env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=d)
        out = {}
        for label in ("cold", "warm"):
            p = subprocess.run(
                [sys.executable, "-c", _CACHE_CHILD, name, device],
                env=env,
                capture_output=True,
                text=True,
                cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
            )
            if p.returncode != 0:
                raise RuntimeError(f"cache-test child failed:\n{p.stderr[-2000:]}")
            out[label] = json.loads(p.stdout.strip().splitlines()[-1])
        import torch._inductor.config as ic

        out["fx_graph_cache"] = bool(ic.fx_graph_cache)
        return out


# -- main ---------------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small inputs, few repetitions (the 2-core CPU budget)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    ap.add_argument("--models", default=",".join(MODELS), help=f"comma list from {MODELS}")
    ap.add_argument("--methods", default=None, help=f"comma list from {METHODS}")
    ap.add_argument(
        "--inductor-models",
        default=None,
        help="models on which compiled methods run, or 'none' (default: all; --quick on CPU: vgg16)",
    )
    ap.add_argument(
        "--batches",
        default=None,
        help="comma list of batch sizes, replacing the mode's (CPU full: 1,4; --quick: 1; GPU: 1,16)",
    )
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--warmup", type=int, default=None)
    ap.add_argument("--json", default=None, help="write all rows and targets to this JSON file")
    ap.add_argument("--md", default=None, help="write the markdown table to this file")
    ap.add_argument(
        "--cache-test",
        default=None,
        metavar="MODEL",
        help="measure cold vs warm Inductor compile of our explainer in two processes, then exit",
    )
    a = ap.parse_args(argv)

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    if a.cache_test:
        print(json.dumps(cache_test(a.cache_test, a.device), indent=1))
        return 0
    cpu_quick = a.quick and a.device == "cpu"
    sizes = sizes_for(a.device, a.quick)
    if a.batches:
        sizes["batches"] = [int(b) for b in a.batches.split(",")]
    reps = a.reps or (3 if a.quick else 10)
    warmup = a.warmup if a.warmup is not None else (0 if a.quick else 3)  # the first call already warms up
    methods = (
        a.methods.split(",") if a.methods else [m for m in METHODS if a.device == "cuda" or m != "ours_inductor_cg"]
    )
    if a.inductor_models is not None:
        ind_models = set(a.inductor_models.split(",")) - {"none", ""}
        skip_reason = "skipped (--inductor-models)"
    else:
        ind_models = {"vgg16"} if cpu_quick else set(MODELS)
        skip_reason = "skipped (cold Inductor compile too slow for the --quick CPU budget)"
    compiled = {"gxi_compiled", "ours_inductor", "ours_inductor_cg"}
    rows: list[dict] = []
    t_start = time.perf_counter()
    dev_name = (
        torch.cuda.get_device_name() if a.device == "cuda" else f"{os.cpu_count()}-core CPU ({platform.machine()})"
    )
    meta = {
        "device": a.device,
        "device_name": dev_name,
        "torch": torch.__version__,
        "date": datetime.date.today().isoformat(),
        "quick": a.quick,
        "reps": reps,
        "warmup": warmup,
        "threads": torch.get_num_threads(),
        "command": "python -m benchmarks.run " + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    model_names = a.models.split(",")
    for i, name in enumerate(model_names):
        ms = [m for m in methods if m not in compiled or name in ind_models]
        log(f"{name}: {ms}")
        rows += bench_model(name, a.device, sizes, ms, reps, warmup, log)
        for m in methods:
            if m in compiled and name not in ind_models:
                for b in sizes["batches"]:
                    rows.append({"model": name, "size": "", "batch": b, "method": m, "status": skip_reason})
        # write after every model, so that a run stopped by a time limit keeps what it measured
        last = i == len(model_names) - 1
        write_report(rows, dict(meta, total_s=time.perf_counter() - t_start, partial=not last), a, echo=last)
    return 0


def write_report(rows: list[dict], meta: dict, a: argparse.Namespace, echo: bool) -> None:
    """Render the markdown and JSON reports of ``rows``; print the markdown when ``echo``."""
    sizes_by_model = {r["model"]: r["size"] for r in rows if r.get("size")}
    for r in rows:  # keep the skipped rows' size column consistent
        r["size"] = r["size"] or sizes_by_model.get(r["model"], "")
    tgt = targets(rows, meta["device"])
    md = markdown(rows, meta, tgt)
    md += (
        f"\nTotal benchmark time {meta['total_s']:.0f} s"
        + (" (partial: the run did not finish)" if meta["partial"] else "")
        + ".\n"
    )
    if echo:
        print(md)
    if a.md:
        with open(a.md, "w") as f:
            f.write(md)
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"meta": meta, "rows": rows, "targets": tgt}, f, indent=1)


if __name__ == "__main__":
    sys.exit(main())
