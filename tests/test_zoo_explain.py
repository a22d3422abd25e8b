"""Every zoo architecture (``dynlrp_fx.zoo``) at 100% node coverage, with finite relevance and a closed ledger.

Each entry is traced, analysed and explained once (``backend="eager"``, ``rules="epsilon"``, float32, tiny configs
with random weights) through :func:`dynlrp_fx.coverage`. The default run covers the DynamicLRP paper's 15
architectures plus CLIP and BART (the multimodal/encoder-decoder input checks); the other entries are marked
``slow`` (the whole zoo takes tens of minutes on 2 shared CPU cores), and so are the full-size configurations.

Conservation tolerance: the epsilon preset routes every stabiliser share and bias share into ``absorbed``, so the
ledger ``seed == inputs + absorbed`` holds up to float32 rounding of sums over the graph; relative to the seed (the
explained logit) that is ~1e-7 .. 1e-5 on the paper's models and up to ~1e-4 on the slow entries (the measured values
are in ``benchmarks/results/tuning_notes.md``). :data:`TOL` = 1e-3 leaves room for small seeds (a logit near zero
inflates the relative error) while still catching any leaked share (a lost residual branch or head is > 1e-2).

Outputs that mix samples (CLIP/SigLIP ``logits_per_image``: image i against every text j) send relevance from
sample i's seed to sample j's inputs, so only the batch-total ledger can close; those entries are checked with
``conservation_error_total``. :data:`KNOWN_LEDGER_GAPS` are entries whose per-sample ledger does not close today
(strict xfail: they flip to a failure when fixed, so the mark gets removed).
"""

from __future__ import annotations

import pytest

from dynlrp_fx import zoo
from dynlrp_fx.coverage import entry_coverage

TOL = 1e-3
#: entries whose explained output compares every sample with every other (checked on batch totals)
CROSS_SAMPLE = {"clip", "siglip2"}
#: per-sample ledger gaps found by this test, reported to the pipeline owners
KNOWN_LEDGER_GAPS = {
    "swin": "torchvision Swin: per-sample error 452 while the batch total closes; absorbed is identical for both "
    "samples (13.80), pointing at the per-sample attribution of relevance absorbed by batch-less constants "
    "(relative position bias / shift mask) in passes/pair.py",
    "wavlm": "per-sample error 4.0e-3 while the batch total closes (1.9e-5); WavLM adds a gated relative position "
    "bias, the same pattern as swin",
}
DEFAULT = set(zoo.names(paper_only=True)) | {"clip", "bart"}

#: inputs that must receive relevance (encoder-decoder and multimodal models explain with all their inputs)
MUST_EXPLAIN = {
    "clip": {"pixel_values", "input_ids"},
    "siglip2": {"pixel_values", "input_ids"},
    "bart": {"input_ids", "decoder_input_ids"},
    "flan_t5": {"input_ids", "decoder_input_ids"},
}


def _explained_inputs(args: tuple, kwargs: dict, model) -> set[str]:
    """Inputs that must receive relevance: float tensors other than masks, and token ids (``*_ids``)."""
    import inspect

    import torch

    params = list(inspect.signature(model.forward).parameters)
    named = [(params[i], a) for i, a in enumerate(args)] + list(kwargs.items())
    return {
        n
        for n, v in named
        if isinstance(v, torch.Tensor)
        and ((v.is_floating_point() and "mask" not in n) or (not v.is_floating_point() and n.endswith("_ids")))
    }


def _check(name: str, full: bool = False, explain: bool = True):
    entry = zoo.get(name)
    rep = entry_coverage(entry, full=full, explain=explain)
    assert rep.uncovered == {}, f"{name}: uncovered ops {rep.uncovered}"
    assert rep.relevant > 0 and rep.covered_nodes == rep.relevant and rep.node_coverage == 100.0
    if explain:
        assert rep.finite, f"{name}: non-finite relevance"
        err = rep.conservation_error_total if name in CROSS_SAMPLE else rep.conservation_error
        assert err < TOL, f"{name}: conservation error {err:.3g} (batch total {rep.conservation_error_total:.3g})"
        model, args, kwargs = entry.build(full=full)  # deterministic: the inputs the report explained
        wanted = _explained_inputs(tuple(args), dict(kwargs or {}), model)
        wanted |= MUST_EXPLAIN.get(name, set())
        missing = wanted - set(rep.inputs)
        assert not missing, f"{name}: inputs {sorted(missing)} got no relevance (explained: {rep.inputs})"
    return rep


def _marks(name: str) -> list:
    marks = [] if name in DEFAULT else [pytest.mark.slow]
    if name in KNOWN_LEDGER_GAPS:
        marks.append(pytest.mark.xfail(strict=True, reason=KNOWN_LEDGER_GAPS[name]))
    return marks


@pytest.mark.parametrize("name", [pytest.param(n, marks=_marks(n)) for n in zoo.names()])
def test_zoo_entry_full_coverage_and_ledger(name):
    _check(name)


def test_zoo_size_and_paper_architectures():
    assert len(zoo.names()) >= 40
    assert len(zoo.names(paper_only=True)) == 15
    assert set(MUST_EXPLAIN) <= set(zoo.names())


@pytest.mark.slow
@pytest.mark.parametrize("name", zoo.names(paper_only=True))
def test_zoo_full_size_paper_coverage(name):
    """The paper's architectures at full size: coverage only (explaining them on CPU takes minutes each)."""
    _check(name, full=True, explain=False)


@pytest.mark.slow
def test_cli_zoo_json_acceptance():
    """``dynlrp coverage --zoo --json`` exits 0 with at least 40 models, every one at 100%."""
    import json
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    p = subprocess.run(
        [sys.executable, "-m", "dynlrp_fx", "coverage", "--zoo", "--json"],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=7200,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    data = json.loads(p.stdout)
    assert len(data["models"]) >= 40
    assert all(m["covered"] == 100.0 and m["ok"] for m in data["models"])
