"""Every zoo architecture (``dynlrp_fx.zoo``) at 100% node coverage, with finite relevance and a closed ledger.

Each entry is traced, analysed and explained once (``backend="eager"``, ``rules="epsilon"``, float32, tiny configs
with random weights) through :func:`dynlrp_fx.coverage`. The default run covers the DynamicLRP paper's 15
architectures plus CLIP and BART (the multimodal/encoder-decoder input checks); the other entries are marked
``slow`` (the whole zoo takes tens of minutes on 2 shared CPU cores), and so are the full-size configurations.

Conservation tolerance: the epsilon preset routes every stabiliser share and bias share into ``absorbed``, so the
ledger ``seed == inputs + absorbed`` holds up to float32 rounding of sums over the graph; relative to the seed (the
explained logit) that is ~1e-7 .. 1e-5 on these models. :data:`TOL` = 1e-3 leaves room for small seeds (a logit near
zero inflates the relative error) while still catching any leaked share (a lost residual branch or head is > 1e-2).
"""

from __future__ import annotations

import pytest

from dynlrp_fx import zoo
from dynlrp_fx.coverage import coverage

TOL = 1e-3
DEFAULT = set(zoo.names(paper_only=True)) | {"clip", "bart"}

#: inputs that must receive relevance (encoder-decoder and multimodal models explain with all their inputs)
MUST_EXPLAIN = {
    "clip": {"pixel_values", "input_ids"},
    "siglip2": {"pixel_values", "input_ids"},
    "bart": {"input_ids", "decoder_input_ids"},
    "flan_t5": {"input_ids", "decoder_input_ids"},
}


def _tensor_inputs(args: tuple, kwargs: dict, model) -> set[str]:
    import inspect

    import torch

    params = list(inspect.signature(model.forward).parameters)
    names = {params[i] for i, a in enumerate(args) if isinstance(a, torch.Tensor)}
    names |= {k for k, v in kwargs.items() if isinstance(v, torch.Tensor)}
    return names


def _check(name: str, full: bool = False, explain: bool = True):
    entry = zoo.get(name)
    model, args, kwargs = entry.build(full=full)
    rep = coverage(
        model,
        tuple(args),
        example_kwargs=dict(kwargs or {}),
        output=entry.output,
        explain=explain,
        name=name,
        modality=entry.modality,
    )
    assert rep.uncovered == {}, f"{name}: uncovered ops {rep.uncovered}"
    assert rep.relevant > 0 and rep.covered_nodes == rep.relevant and rep.node_coverage == 100.0
    if explain:
        assert rep.finite, f"{name}: non-finite relevance"
        assert rep.conservation_error < TOL, f"{name}: conservation error {rep.conservation_error:.3g}"
        # every tensor input except masks receives relevance (float inputs, and token ids through embeddings)
        wanted = {n for n in _tensor_inputs(tuple(args), dict(kwargs or {}), model) if "mask" not in n}
        wanted |= MUST_EXPLAIN.get(name, set())
        missing = wanted - set(rep.inputs)
        assert not missing, f"{name}: inputs {sorted(missing)} got no relevance (explained: {rep.inputs})"
    return rep


@pytest.mark.parametrize("name", [pytest.param(n, marks=() if n in DEFAULT else pytest.mark.slow) for n in zoo.names()])
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
