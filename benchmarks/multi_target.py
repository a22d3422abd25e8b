"""K targets per sample: ``python -m benchmarks.multi_target [--models resnet50,gpt2_small] [--ks 8,32] [--md F]``.

``--matrix --models gpt2_small``: the whole each_token matrix of a 128-token text, with and without the causal
prefixes (:func:`matrix`).

For each model and K, a fresh worker process (so its peak memory is its own) builds the model as its library
builds it by default (random weights, eager backend, the default ``epsilon`` rules, batch 2) and times

* **ours, one call**: ``explainer(x, target=T)`` with ``T`` of shape ``(2, K)``: one forward pass, one batched
  relevance sweep (chunked by the default memory bound; the chunk is reported);
* **ours, K calls**: K single-target calls of the same explainer, timed in the same process, interleaved with
  the one-call timing (so that drift between processes does not skew the ratio);
* **autograd, K backward passes**: gradient x input with one forward pass and ``K`` ``torch.autograd.grad`` calls
  (``retain_graph``), the loop a Captum-style attribution of K targets runs (timed at the first K, scaled to the
  others), and ``K x`` one forward+backward;
* with ``--captum``, on the text models: **Captum's ``LLMGradientAttribution``** (gradient x embedding activation,
  Captum's gradient method for LLMs) of the same K tokens, one text at a time, each token's log-probability on its
  prefix with one forward and one backward pass (:func:`_captum_llm`; a word-per-id tokenizer stands in for GPT-2's,
  which is not available offline).

ResNet-50 at 224x224 explains K classes per image; GPT-2 small at 128 tokens explains the last K positions'
next tokens with ``dynlrp.targets.each_token(positions=...)``. The compile cache is on (a private folder), so
workers after the first compile in about a second. Peak memory is the worker's peak RSS (``ru_maxrss``), which
includes the model and the framework (the one-call worker also runs the K single calls). Times are medians over
``--reps`` repetitions after one warm-up. The sweep is chunked by the explainer's default (one target per sweep
on a CPU; ``targets per sweep``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).parent / "results"


def _median_time(fn, reps: int) -> float:
    fn()  # warm-up
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def worker(name: str, k: int, reps: int, what: str, rules: str | None = None, lxt: bool = False) -> dict[str, Any]:
    """One measurement in this process: ``what`` is ``"one"`` (K targets in one call), ``"single"`` (one target
    per call, ours and autograd; with ``lxt``, also LXT's one forward + K backward passes, and its relevance
    against our one call's) or ``"captum"`` (Captum's ``LLMGradientAttribution`` of the same K tokens, text models
    only; see :func:`_captum_llm`)."""
    import torch

    import dynlrp_fx as dynlrp
    from benchmarks.models import build

    device = torch.device("cpu")
    bm = build(name, device, {"res": 224, "vit_res": 224, "seq": 128})
    for p in bm.model.parameters():
        p.requires_grad_(False)
    args, kwargs = bm.make_inputs(2)
    t0 = time.perf_counter()
    ex = dynlrp.compile(bm.model, args, example_kwargs=kwargs, **({"rules": rules} if rules else {}))
    compile_s = time.perf_counter() - t0
    gen = torch.Generator().manual_seed(k)
    with torch.no_grad():
        y = bm.model(*args, **kwargs)
    if bm.kind == "transformer":
        ids = kwargs["input_ids"]
        seq, vocab = ids.shape[1], y.logits.shape[-1]
        positions = list(range(seq - 1 - k, seq - 1))
        target: Any = dynlrp.targets.each_token(positions=positions)
        pos = torch.tensor(positions)
        flat = pos * vocab + ids[:, pos + 1]  # (2, K) flat logit indices, what each_token resolves to
    else:
        classes = y.shape[1]
        flat = torch.stack([torch.randperm(classes, generator=gen)[:k] for _ in range(2)])
        target = flat
    out: dict[str, Any] = {"model": name, "k": k, "what": what, "compile_s": compile_s}
    if what == "captum":
        ids = kwargs["input_ids"]
        out["captum_s"] = _median_time(lambda: _captum_llm(bm.model, ids, k), max(1, reps - 1))
        out["captum_check"] = _captum_check(bm.model, ids, k)
    elif what == "one":
        box = {}

        def one():
            box["e"] = ex(*args, target=target, **kwargs)

        def k_calls():
            for j in range(k):
                ex(*args, target=flat[:, j], **kwargs)

        one()
        k_calls()  # warm-up
        ts_one, ts_k = [], []
        for _ in range(reps):  # interleaved, in this process: the ratio is not skewed by drift between workers
            t0 = time.perf_counter()
            one()
            ts_one.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            k_calls()
            ts_k.append(time.perf_counter() - t0)
        out["seconds"] = statistics.median(ts_one)
        out["k_calls_s"] = statistics.median(ts_k)
        e = box["e"]
        sp = ex.split()
        from dynlrp_fx.multi import sweep_size

        state = ex.state_tensors()
        tensors = ex.bind(*args, **kwargs)
        fwd = list(sp.forward(*state, *tensors))
        out["targets_per_sweep"] = sweep_size(sp, sp.cut_inputs([*state, *tensors], fwd[sp.n_outputs:]), 2, k, None,
                                              device)
        out["batched"] = sp.batched
        out["relevance_shape"] = list(e.relevance.shape if e.relevance is not None else [])
        out["max_ledger_error"] = float(e.conservation.error.max())
    else:
        out["ours_single_s"] = _median_time(lambda: ex(*args, target=flat[:, 0], **kwargs), reps)
        out["autograd_single_s"] = _median_time(lambda: _autograd(bm, args, kwargs, flat[:, :1]), reps)
        out["autograd_retain_s"] = _median_time(lambda: _autograd(bm, args, kwargs, flat), max(1, reps - 1))
        if lxt and bm.kind == "transformer":
            from benchmarks.peers import _lxt_model

            patched = _lxt_model(bm)
            out["lxt_retain_s"] = _median_time(lambda: _autograd(bm, args, kwargs, flat, patched), max(1, reps - 1))
            theirs = torch.stack(_autograd(bm, args, kwargs, flat, patched), 1).double()  # (2, K, L)
            ours = ex(*args, target=target, **kwargs).inputs["input_ids"].double()
            out["lxt_rel_diff"] = float((theirs - ours).norm() / ours.norm().clamp_min(1e-30))
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return out


def _autograd(bm, args: tuple, kwargs: dict, flat, lxt: tuple | None = None):
    """Gradient x input for each column of ``flat`` (flat indices into each sample's output): one forward pass,
    one ``autograd.grad`` per target. ``lxt``: ``(model, module, patch_map)`` of ``benchmarks.peers._lxt_model``,
    LXT's efficient AttnLRP (its patches applied around the forward pass only)."""
    import torch

    if bm.kind == "transformer":
        emb, fwd = bm.embed(args, kwargs)
        x = emb.detach().requires_grad_(True)
        if lxt is None:
            y = fwd(x)
        else:
            from benchmarks.peers import _lxt_patched

            kw = {k: v for k, v in kwargs.items() if k != "input_ids"}
            with _lxt_patched(lxt[1], lxt[2]):
                y = lxt[0](inputs_embeds=x, **kw).logits
    else:
        x = args[0].detach().requires_grad_(True)
        y = bm.model(x)
    y = y.reshape(y.shape[0], -1)
    rel = []
    for j in range(flat.shape[1]):
        (g,) = torch.autograd.grad(y.gather(1, flat[:, j : j + 1]).sum(), x, retain_graph=j + 1 < flat.shape[1])
        r = g * x
        rel.append(r.sum(-1) if bm.kind == "transformer" else r)
    return rel


class _IdTokenizer:
    """Token ``i`` <-> the word ``t<i>``: what Captum's LLM attribution needs of a tokenizer (encode, decode,
    offsets), for a model built from its config with no tokenizer files available offline. The texts are made of
    these words, so Captum explains exactly the token ids our explainer gets."""

    def encode(self, text: str, add_special_tokens: bool = True, return_tensors: str | None = None):
        import torch

        ids = [int(w[1:]) for w in text.split()]
        return torch.tensor([ids]) if return_tensors == "pt" else ids

    def decode(self, token_ids) -> str:
        return " ".join(f"t{int(i)}" for i in (token_ids.tolist() if hasattr(token_ids, "tolist") else token_ids))

    def convert_ids_to_tokens(self, token_ids):
        return f"t{int(token_ids)}" if isinstance(token_ids, int) else [f"t{int(i)}" for i in token_ids]

    def convert_tokens_to_ids(self, tokens):
        return int(tokens[1:]) if isinstance(tokens, str) else [int(t[1:]) for t in tokens]

    def __call__(self, text: str, add_special_tokens: bool = True, return_offsets_mapping: bool = False):
        ids, offsets, pos = [], [], 0
        for w in text.split(" "):
            ids.append(int(w[1:]))
            offsets.append((pos, pos + len(w)))
            pos += len(w) + 1
        return {"input_ids": ids, **({"offset_mapping": offsets} if return_offsets_mapping else {})}


def _captum_llm(model, ids, k: int) -> list:
    """Captum's ``LLMGradientAttribution`` with gradient x activation at the token embeddings (its gradient method
    for LLMs) of the last ``k`` tokens of each text, as our ``each_token(positions=...)`` explains them: for target
    ``j`` Captum runs the model on the prefix and the targets before ``j`` and back-propagates the log-probability of
    target ``j`` (one forward and one backward pass per target, one text at a time)."""
    from captum.attr import LayerGradientXActivation, LLMGradientAttribution, TextTokenInput

    tok = _IdTokenizer()
    llm = LLMGradientAttribution(LayerGradientXActivation(model, model.get_input_embeddings()), tok)
    out = []
    for row in ids:
        out.append(llm.attribute(TextTokenInput(tok.decode(row[:-k]), tok), target=row[-k:]).token_attr)
    return out


def _captum_check(model, ids, k: int) -> float:
    """Captum's first target row against gradient x embedding of the same log-probability by autograd (relative
    max difference): that Captum computed what it says."""
    import torch

    theirs = _captum_llm(model, ids[:1], k)[0][0]
    prefix = ids[0, :-k][None]
    emb = model.get_input_embeddings()(prefix).detach().requires_grad_(True)
    logp = torch.log_softmax(model(inputs_embeds=emb).logits[0, -1], -1)[ids[0, -k]]
    (g,) = torch.autograd.grad(logp, emb)
    ref = (g * emb).sum(-1)[0].detach()
    return float((theirs - ref).abs().max() / ref.abs().max())


def _version(dist: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return "-"


def _captum_cells(r: dict) -> str:
    if r.get("captum_s") is None:
        return " - | - |"
    return f" {r['captum_s']:.2f} | **{r['captum_s'] / r['one_call_s']:.2f}** |"


def _lxt_cells(r: dict) -> str:
    if r["lxt_k_backward_s"] is None:
        return " - | - | - |"
    diff = "-" if r["lxt_rel_diff"] is None else f"{r['lxt_rel_diff']:.1e}"
    return f" {r['lxt_k_backward_s']:.2f} | **{r['lxt_k_backward_s'] / r['one_call_s']:.2f}** | {diff} |"


def matrix(name: str, batch: int, reps: int) -> dict[str, Any]:
    """``each_token()`` over every position of a 128-token text (the whole source x target matrix, K = 127), with
    the causal prefixes (the default) and on the whole sequence (``prefixes=False``), interleaved in this process."""
    import torch

    import dynlrp_fx as dynlrp
    from benchmarks.models import build
    from dynlrp_fx.runtime import prefix_groups

    bm = build(name, torch.device("cpu"), {"res": 224, "vit_res": 224, "seq": 128})
    bm.model.requires_grad_(False)
    args, kwargs = bm.make_inputs(batch)
    ex = dynlrp.compile(bm.model, args, example_kwargs=kwargs)
    fns = {
        "prefixes": lambda: ex(*args, target=dynlrp.targets.each_token(), **kwargs),
        "whole": lambda: ex(*args, target=dynlrp.targets.each_token(prefixes=False), **kwargs),
    }
    first = {k: f().inputs["input_ids"] for k, f in fns.items()}  # also the warm-up
    ts: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(reps):
        for k, f in fns.items():
            t0 = time.perf_counter()
            f()
            ts[k].append(time.perf_counter() - t0)
    length = int(kwargs["input_ids"].shape[1])
    med = {k: statistics.median(v) for k, v in ts.items()}
    return {
        "model": name, "batch": batch, "length": length, "k": length - 1,
        "groups": [[p, len(c)] for p, c in prefix_groups(list(range(length - 1)), length)],
        "prefixes_s": med["prefixes"], "whole_s": med["whole"], "ratio": med["prefixes"] / med["whole"],
        "max_rel_diff": float((first["prefixes"] - first["whole"]).abs().max() / first["whole"].abs().max()),
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="resnet50,gpt2_small")
    ap.add_argument("--ks", default="8,32")
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--md", default=str(RESULTS / "multi_target.md"))
    ap.add_argument("--json", default=str(RESULTS / "multi_target.json"))
    ap.add_argument("--rules", default=None, help="rules preset (default: compile's default, epsilon)")
    ap.add_argument("--lxt", action="store_true",
                    help="also LXT's one forward + K backward passes on the text models (run in the venv of "
                         "benchmarks/lxt_env.sh; use --rules attnlrp, LXT's rule, for the relevance cross-check)")
    ap.add_argument("--captum", action="store_true",
                    help="also Captum's LLMGradientAttribution (gradient x embedding) of the same K tokens, per K")
    ap.add_argument("--worker", nargs=3, metavar=("MODEL", "K", "WHAT"), help=argparse.SUPPRESS)
    ap.add_argument("--matrix", action="store_true",
                    help="instead: each_token() over all 127 positions of GPT-2 small (--models, batch 1), with the "
                         "causal prefixes vs on the whole sequence; writes results/each_token_matrix.json")
    a = ap.parse_args(argv)
    if a.matrix:
        rows = [matrix(name, 1, a.reps) for name in a.models.split(",")]
        (RESULTS / "each_token_matrix.json").write_text(json.dumps({"date": datetime.date.today().isoformat(),
                                                                   "rows": rows}, indent=1))
        for r in rows:
            print(f"| {r['model']} | {r['batch']} | {r['length']} | {r['k']} | {r['prefixes_s']:.2f} | "
                  f"{r['whole_s']:.2f} | **{r['ratio']:.2f}** | {r['max_rel_diff']:.1e} | {r['groups']} |")
        return
    if a.worker:
        print("RESULT " + json.dumps(worker(a.worker[0], int(a.worker[1]), a.reps, a.worker[2], a.rules, a.lxt)),
              flush=True)
        return
    import torch

    env = dict(os.environ)
    env.setdefault("DYNLRP_CACHE_DIR", tempfile.mkdtemp(prefix="dynlrp-bench-cache-"))
    ks = [int(k) for k in a.ks.split(",")]
    rows = []
    for name in a.models.split(","):
        res = {}
        jobs = [(ks[0], "single"), *((k, "one") for k in ks)]
        if a.captum and name not in ("resnet50", "vgg16", "vit_b_16"):
            jobs += [(k, "captum") for k in ks]
        for k, what in jobs:
            cmd = [sys.executable, "-m", "benchmarks.multi_target", "--reps", str(a.reps), "--worker", name, str(k), what,
                   *(["--rules", a.rules] if a.rules else []), *(["--lxt"] if a.lxt else [])]
            p = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=Path(__file__).parent.parent)
            line = next((ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")), None)
            if line is None:
                raise SystemExit(f"worker {cmd} failed:\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
            res[(k, what)] = json.loads(line[7:])
            print(res[(k, what)], flush=True)
        single = res[(ks[0], "single")]
        for k in ks:
            one = res[(k, "one")]
            rows.append({
                "model": name, "k": k, "one_call_s": one["seconds"], "k_calls_s": one["k_calls_s"],
                "ratio": one["seconds"] / one["k_calls_s"],
                "autograd_k_backward_s": single["autograd_retain_s"] * k / ks[0],
                "autograd_k_calls_s": k * single["autograd_single_s"],
                "targets_per_sweep": one["targets_per_sweep"], "batched": one["batched"],
                "peak_rss_one_mb": one["peak_rss_mb"], "peak_rss_single_mb": single["peak_rss_mb"],
                "max_ledger_error": one["max_ledger_error"],
                "lxt_k_backward_s": single["lxt_retain_s"] * k / ks[0] if "lxt_retain_s" in single else None,
                "lxt_rel_diff": single.get("lxt_rel_diff") if k == ks[0] else None,
                "captum_s": res[(k, "captum")]["captum_s"] if (k, "captum") in res else None,
                "captum_check": res[(k, "captum")]["captum_check"] if (k, "captum") in res else None,
            })
    meta = {"date": datetime.date.today().isoformat(), "torch": torch.__version__, "python": platform.python_version(),
            "threads": torch.get_num_threads(), "cpu": platform.processor() or platform.machine(), "batch": 2,
            "rules": a.rules or "epsilon (default)", "transformers": _version("transformers"), "lxt": _version("lxt")}
    with_lxt = any(r["lxt_k_backward_s"] is not None for r in rows)
    with_captum = any(r["captum_s"] is not None for r in rows)
    Path(a.json).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    lines = [
        "# K targets per sample in one call (CPU)",
        "",
        f"{meta['date']}, torch {meta['torch']}, transformers {meta['transformers']}, {meta['threads']} threads, "
        f"batch 2, eager backend, rules: {meta['rules']}, models as their libraries build them (random weights). "
        f"`python -m benchmarks.multi_target {' '.join(argv if argv is not None else sys.argv[1:])}`.",
        "ResNet-50 224x224: K classes per image; GPT-2 small, 128 tokens: `each_token` over the last K positions.",
        "",
        "| model | K | ours, one call (s) | ours, K calls (s) | one / K calls | autograd gxi, 1 fwd + K bwd (s) | "
        "autograd gxi, K calls (s) | targets per sweep | peak RSS one call / single (MB) |"
        + (" LXT, 1 fwd + K bwd (s) | LXT / ours one call | rel diff LXT vs ours |" if with_lxt else "")
        + (" Captum LLMGradientAttribution (s) | Captum / ours one call |" if with_captum else ""),
        "|---|---|---|---|---|---|---|---|---|" + ("---|---|---|" if with_lxt else "")
        + ("---|---|" if with_captum else ""),
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['k']} | {r['one_call_s']:.2f} | {r['k_calls_s']:.2f} | **{r['ratio']:.2f}** | "
            f"{r['autograd_k_backward_s']:.2f} | {r['autograd_k_calls_s']:.2f} | {r['targets_per_sweep']}"
            f"{'' if r['batched'] else ' (one at a time)'} | {r['peak_rss_one_mb']:.0f} / {r['peak_rss_single_mb']:.0f} |"
            + (_lxt_cells(r) if with_lxt else "") + (_captum_cells(r) if with_captum else "")
        )
    lines += ["", "Target: one / K calls <= 0.5 on CPU. "
              + ", ".join(f"{r['model']} K={r['k']}: {'met' if r['ratio'] <= 0.5 else 'NOT met'} ({r['ratio']:.2f})"
                          for r in rows) + "."]
    if with_captum:
        lines += ["", "Captum (`--captum`): `LLMGradientAttribution(LayerGradientXActivation(model, embeddings))`, one "
                  "text at a time, the log-probability of each of the K tokens given its prefix (one forward and one "
                  "backward pass per token). Its first row against autograd's gradient x embedding of that "
                  "log-probability: " + ", ".join(f"K={r['k']} {r['captum_check']:.1e}" for r in rows
                                                  if r.get("captum_check") is not None) + "."]
    Path(a.md).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
