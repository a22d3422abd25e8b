"""Dataset runs: shards, resume after an interruption, torchrun with two processes."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import dynlrp_fx as dynlrp
from tests import _workflow_factories as factories

ROOT = Path(__file__).resolve().parents[1]


class Interrupted(Exception):
    pass


class Counting:
    """Wraps an explainer, counts calls and optionally 'crashes' on call number ``fail_at``."""

    def __init__(self, explainer, fail_at: int | None = None):
        self.explainer = explainer
        self.fail_at = fail_at
        self.calls = 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        if self.fail_at is not None and self.calls == self.fail_at:
            raise Interrupted(f"simulated interruption at call {self.calls}")
        return self.explainer(*args, **kwargs)


def _data(n: int = 26):
    g = torch.Generator().manual_seed(5)
    x = torch.randn(n, 6, generator=g)
    y = torch.randint(0, 3, (n,), generator=g)
    return x, y


@pytest.fixture(scope="module")
def explainer():
    model = factories.make_mlp()
    return dynlrp.compile(model, torch.randn(2, 6), rules="lrp0", backend="eager", params=True, capture=["1"])


def test_interrupted_run_resumes_without_recomputing_finished_shards(tmp_path, explainer):
    x, y = _data()
    loader = DataLoader(TensorDataset(x, y), batch_size=4)  # 7 batches -> shards of 2 batches: 0, 1, 2, 3 (partial)
    full = dynlrp.attribute_dataset(Counting(explainer), loader, tmp_path / "full", shard_size=2, progress=False)
    assert full.computed == [0, 1, 2, 3] and full.num_samples == 26 and full.explainer_calls == 7
    ref = dynlrp.merge_shards(tmp_path / "full")

    crashing = Counting(explainer, fail_at=6)  # dies inside shard 2 after shards 0 and 1 were written
    with pytest.raises(Interrupted):
        dynlrp.attribute_dataset(crashing, loader, tmp_path / "run", shard_size=2, progress=False)
    assert sorted(p.name for p in (tmp_path / "run").glob("shard-*")) == [
        "shard-000-000000.safetensors",
        "shard-000-000001.safetensors",
    ]
    with pytest.raises(ValueError, match="did not finish"):
        dynlrp.merge_shards(tmp_path / "run")

    again = Counting(explainer)
    res = dynlrp.attribute_dataset(again, loader, tmp_path / "run", shard_size=2, progress=True)
    assert again.calls == 3  # batches 4, 5, 6 only
    assert res.computed == [2, 3] and res.skipped == [0, 1]
    merged = dynlrp.merge_shards(tmp_path / "run")
    assert merged.keys() == ref.keys()
    for k in ref:
        assert torch.equal(merged[k], ref[k]), k

    # the merged results are the explanations of the whole dataset
    direct = explainer(x)
    assert torch.equal(merged["index"], torch.arange(26))
    torch.testing.assert_close(merged["relevance.input"], direct.relevance)
    torch.testing.assert_close(merged["captured.1"], direct.captured["1"])
    torch.testing.assert_close(merged["target"], direct.output.argmax(1))
    for name, p in direct.params.items():
        torch.testing.assert_close(merged[f"params.{name}"], p, rtol=1e-5, atol=1e-6)

    with pytest.raises(ValueError, match="shard_size"):
        dynlrp.attribute_dataset(explainer, loader, tmp_path / "run", shard_size=3, progress=False)


def test_label_targets_and_dict_batches(tmp_path):
    x, y = _data(10)
    explainer = dynlrp.compile(factories.make_mlp(), example_kwargs={"input": x[:2]}, rules="lrp0", backend="eager")
    loader = [{"input": x[i : i + 4], "label": y[i : i + 4]} for i in range(0, 10, 4)]
    dynlrp.attribute_dataset(
        explainer, loader, tmp_path, target="label", shard_size=1, progress=False, save_inputs=True
    )
    m = dynlrp.merge_shards(tmp_path)
    assert torch.equal(m["target"], y)
    assert torch.equal(m["input.input"], x)
    torch.testing.assert_close(m["relevance.input"], explainer(input=x, target=y).relevance)


_SCRIPT = """
import sys
sys.path.insert(0, {root!r})
import torch
from torch.utils.data import DataLoader, TensorDataset
import dynlrp_fx as dynlrp
from tests import _workflow_factories as factories

g = torch.Generator().manual_seed(5)
x = torch.randn(26, 6, generator=g)
y = torch.randint(0, 3, (26,), generator=g)
ex = dynlrp.compile(factories.make_mlp(), torch.randn(2, 6), rules="lrp0", backend="eager")
run = dynlrp.attribute_dataset(ex, DataLoader(TensorDataset(x, y), batch_size=4), sys.argv[1], shard_size=1,
                               target="label", progress=False)
# one file per rank: the two processes' stdout interleaves
with open(sys.argv[1] + f"-rank{{run.rank}}.txt", "w") as f:
    f.write(f"RANK {{run.rank}} WORLD {{run.world_size}} COMPUTED {{run.computed}}")
"""


@pytest.mark.slow
def test_torchrun_two_processes_equal_one_process(tmp_path):
    """Two gloo processes under torchrun (10-28 s on the shared 2-core machine, hence slow)."""
    script = tmp_path / "run.py"
    script.write_text(textwrap.dedent(_SCRIPT.format(root=str(ROOT))))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node=2",
            "--standalone",
            str(script),
            str(tmp_path / "dist"),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert (tmp_path / "dist-rank0.txt").read_text() == "RANK 0 WORLD 2 COMPUTED [0, 2, 4, 6]"
    assert (tmp_path / "dist-rank1.txt").read_text() == "RANK 1 WORLD 2 COMPUTED [1, 3, 5]"
    names = sorted(p.name for p in (tmp_path / "dist").glob("shard-*"))
    assert names == sorted(
        [f"shard-000-{k:06d}.safetensors" for k in (0, 2, 4, 6)] + [f"shard-001-{k:06d}.safetensors" for k in (1, 3, 5)]
    )
    dist = dynlrp.merge_shards(tmp_path / "dist")

    x, y = _data()
    ex = dynlrp.compile(factories.make_mlp(), torch.randn(2, 6), rules="lrp0", backend="eager")
    dynlrp.attribute_dataset(
        ex,
        DataLoader(TensorDataset(x, y), batch_size=4),
        tmp_path / "one",
        shard_size=1,
        target="label",
        progress=False,
    )
    one = dynlrp.merge_shards(tmp_path / "one")
    assert dist.keys() == one.keys()
    for k in one:
        torch.testing.assert_close(dist[k], one[k], rtol=1e-6, atol=1e-7)
