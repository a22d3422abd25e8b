"""Dataset runs under faults: runs killed mid-shard (a loader that raises, a process killed with SIGKILL), damaged
shards (truncated, flipped bytes, deleted, unrecorded), a changed dataset on resume, manifests of an older version."""

from __future__ import annotations

import inspect
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import dynlrp_fx as dynlrp
from dynlrp_fx.dataset import shard_name

ROOT = Path(__file__).resolve().parents[1]
SHARD_SIZE = 2  # 26 samples in batches of 4: 7 batches -> shards 0, 1, 2 (2 batches each) and 3 (1 batch)


def _mlp() -> nn.Module:
    torch.manual_seed(11)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)).eval()


def _data(n: int = 26) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    return torch.randn(n, 6, generator=g), torch.randint(0, 3, (n,), generator=g)


def _loader(x: torch.Tensor, y: torch.Tensor, **kw) -> DataLoader:
    return DataLoader(TensorDataset(x, y), batch_size=4, **kw)


class Counting:
    def __init__(self, explainer):
        self.explainer, self.calls = explainer, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.explainer(*args, **kwargs)


class RaisingLoader:
    """Yields the first ``fail_at`` batches of ``loader``, then raises (a crash of the data pipeline)."""

    def __init__(self, loader, fail_at: int):
        self.loader, self.fail_at = loader, fail_at

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        for b, batch in enumerate(self.loader):
            if b == self.fail_at:
                raise OSError(f"simulated loader failure at batch {b}")
            yield batch
        if self.fail_at >= len(self.loader):
            raise OSError("simulated loader failure at the end")


def _run(explainer, loader, out, **kw):
    return dynlrp.attribute_dataset(explainer, loader, out, shard_size=SHARD_SIZE, progress=False, **kw)


def _assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def _snapshot(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


def _manifest(d: Path, rank: int = 0) -> dict:
    return json.loads((d / f"manifest-{rank:03d}.json").read_text())


def _assert_same_run(a: Path, b: Path) -> None:
    """The same files with the same tensors and manifest entries (safetensors orders the metadata of a file at
    random, so the bytes and checksums of equal shards differ)."""
    assert sorted(p.name for p in a.iterdir()) == sorted(p.name for p in b.iterdir())
    for p in a.glob("shard-*"):
        _assert_same(load_file(p), load_file(b / p.name))
    ma, mb = _manifest(a), _manifest(b)
    for m in (ma, mb):
        for e in m["shards"].values():
            del e["sha256"]
    assert ma == mb
    for name in ("config.json", "done-000.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes()


@pytest.fixture(scope="module")
def explainer():
    return dynlrp.compile(_mlp(), torch.randn(2, 6), rules="lrp0", backend="eager")


@pytest.fixture(scope="module")
def reference(explainer, tmp_path_factory):
    """An uninterrupted run: its directory (do not modify) and merged results."""
    out = tmp_path_factory.mktemp("full")
    run = _run(explainer, _loader(*_data()), out)
    assert run.computed == [0, 1, 2, 3]
    return out, dynlrp.merge_shards(out)


def _copy_of(reference, tmp_path) -> Path:
    out = tmp_path / "run"
    out.mkdir()
    for name, data in _snapshot(reference[0]).items():
        (out / name).write_bytes(data)
    return out


# -- killed runs -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("fail_at", "finished"),
    [(1, []), (4, [0, 1]), (5, [0, 1]), (7, [0, 1, 2])],
    ids=["in-shard-0", "at-shard-boundary", "mid-shard-2", "in-last-partial-shard"],
)
def test_loader_raising_mid_run_resumes_exactly_the_unfinished_shards(
    explainer, reference, tmp_path, fail_at, finished
):
    out = tmp_path / "run"
    with pytest.raises(OSError, match="simulated loader failure"):
        _run(explainer, RaisingLoader(_loader(*_data()), fail_at), out)
    assert sorted(p.name for p in out.glob("shard-*")) == [shard_name(0, k) for k in finished]
    assert not [p.name for p in out.iterdir() if ".tmp-" in p.name]  # no temporary files left behind
    entries = _manifest(out)["shards"] if finished else {}
    assert sorted(int(k) for k in entries) == finished
    for k, e in entries.items():
        assert e["file"] == shard_name(0, int(k)) and e["bytes"] == (out / e["file"]).stat().st_size
        assert e["samples"] == [8 * int(k), 8 * int(k) + 8] and e["num_samples"] == 8 and e["batches"] == 2
        assert len(e["sha256"]) == len(e["fingerprint"]) == 64

    counting = Counting(explainer)
    run = _run(counting, _loader(*_data()), out)
    todo = [k for k in range(4) if k not in finished]
    assert run.skipped == finished and run.computed == todo
    assert counting.calls == 7 - 2 * len(finished)
    _assert_same(dynlrp.merge_shards(out), reference[1])
    _assert_same_run(out, reference[0])  # byte for byte the files of an uninterrupted run


_CHILD = """
import os, signal, sys, time
sys.path.insert(0, {root!r})
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
import dynlrp_fx as dynlrp

{mlp}
{data}
out, mode, shard_size = sys.argv[1], sys.argv[2], int(sys.argv[3])
x, y = _data(int(sys.argv[4]))
loader = DataLoader(TensorDataset(x, y), batch_size=4)


class Loader:
    def __len__(self):
        return len(loader)

    def __iter__(self):
        for b, batch in enumerate(loader):
            if mode == "self-kill" and b == 5:  # mid-shard 2, after batch 4 was explained
                os.kill(os.getpid(), signal.SIGKILL)
            if mode == "paced":  # one shard per batch, 10 ms apart; never finishes (waits to be killed)
                time.sleep(0.01 if b < 16 else 60)
            yield batch


ex = dynlrp.compile(_mlp(), torch.randn(2, 6), rules="lrp0", backend="eager")
print("READY", flush=True)
dynlrp.attribute_dataset(ex, Loader(), out, shard_size=shard_size, progress=False)
print("FINISHED", flush=True)
"""


def _child(tmp_path: Path) -> Path:
    script = tmp_path / "child.py"
    script.write_text(
        textwrap.dedent(_CHILD).format(root=str(ROOT), mlp=inspect.getsource(_mlp), data=inspect.getsource(_data))
    )
    return script


def _child_env() -> dict:
    env = dict(os.environ)
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    return env


def test_sigkill_mid_shard_then_resume_equals_uninterrupted_run(explainer, reference, tmp_path):
    out = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, str(_child(tmp_path)), str(out), "self-kill", str(SHARD_SIZE), "26"],
        cwd=ROOT,
        env=_child_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "READY" in proc.stdout and "FINISHED" not in proc.stdout
    assert sorted(_manifest(out)["shards"]) == ["0", "1"]  # valid JSON, the two finished shards
    assert sorted(p.name for p in out.glob("shard-*")) == [shard_name(0, 0), shard_name(0, 1)]

    counting = Counting(explainer)
    run = _run(counting, _loader(*_data()), out)
    assert run.skipped == [0, 1] and run.computed == [2, 3] and counting.calls == 3
    _assert_same(dynlrp.merge_shards(out), reference[1])


def test_sigkill_at_any_moment_leaves_a_valid_manifest_and_resumes(explainer, tmp_path):
    """Killed from outside while it writes one shard per batch (the kill lands anywhere in the write cycle)."""
    n, shard_size = 80, 1  # 20 batches, 20 shards
    out = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, str(_child(tmp_path)), str(out), "paced", str(shard_size), str(n)],
        cwd=ROOT,
        env=_child_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            if len(list(out.glob("shard-*"))) >= 8:
                break
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL, err[-4000:]
    entries = _manifest(out)["shards"]  # valid JSON whatever the moment of the kill
    assert 7 <= len(entries) <= 16
    recorded = sorted(int(k) for k in entries)
    assert recorded == list(range(len(recorded)))

    x, y = _data(n)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run = dynlrp.attribute_dataset(explainer, _loader(x, y), out, shard_size=shard_size, progress=False)
    # killed between renaming a shard into place and recording it: that shard is recomputed, with a warning
    assert all(f"recomputing shard {len(recorded)}: " in str(w.message) for w in caught), [
        str(w.message) for w in caught
    ]
    assert run.skipped == recorded and run.computed == list(range(len(recorded), 20))
    ref = tmp_path / "ref"
    dynlrp.attribute_dataset(explainer, _loader(x, y), ref, shard_size=shard_size, progress=False)
    _assert_same(dynlrp.merge_shards(out), dynlrp.merge_shards(ref))
    assert not [p.name for p in out.iterdir() if ".tmp-" in p.name]  # a killed write's temporary file is cleaned


# -- damaged shards ----------------------------------------------------------------------------------------------------
def _damage(path: Path, how: str) -> None:
    data = path.read_bytes()
    if how == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif how == "flipped":  # in the tensor bytes at the end: the file still parses, with other values
        path.write_bytes(data[:-6] + bytes(b ^ 0x5A for b in data[-6:]))
    elif how == "deleted":
        path.unlink()
    else:
        raise AssertionError(how)


@pytest.mark.parametrize("how", ["truncated", "flipped", "deleted"])
def test_damaged_shard_is_named_by_merge_and_recomputed_on_resume(explainer, reference, tmp_path, how):
    out = _copy_of(reference, tmp_path)
    bad = out / shard_name(0, 1)
    _damage(bad, how)
    problem = {"truncated": "truncated", "flipped": "corrupted", "deleted": "missing"}[how]
    if how == "flipped":  # the damage the checksums are for: without them these values would be results
        damaged, intact = load_file(bad), load_file(reference[0] / bad.name)
        assert any(not torch.equal(damaged[k], intact[k]) for k in intact)

    for strict in (True, False):
        with pytest.raises(dynlrp.DynlrpDatasetError, match=f"shard 1 .*{bad.name} is {problem}") as info:
            dynlrp.merge_shards(out, strict=strict)
        assert str(bad) in str(info.value) and "Rerun attribute_dataset" in str(info.value)
    with pytest.raises(dynlrp.DynlrpDatasetError, match=bad.name):
        list(dynlrp.load_shards(out))

    counting = Counting(explainer)
    with pytest.warns(UserWarning, match=f"recomputing shard 1: .*{bad.name} is {problem}"):
        run = _run(counting, _loader(*_data()), out)
    assert run.computed == [1] and run.skipped == [0, 2, 3] and counting.calls == 2
    _assert_same(dynlrp.merge_shards(out), reference[1])
    _assert_same_run(out, reference[0])


def test_unrecorded_shard_file_is_recomputed(explainer, reference, tmp_path):
    """Killed between renaming a shard into place and recording it: the file is not trusted."""
    out = _copy_of(reference, tmp_path)
    manifest = _manifest(out)
    del manifest["shards"]["2"]
    (out / "manifest-000.json").write_text(json.dumps(manifest))
    with pytest.warns(UserWarning, match=shard_name(0, 2)), pytest.raises(dynlrp.DynlrpDatasetError, match=r"\[2\]"):
        dynlrp.merge_shards(out)
    with pytest.warns(UserWarning, match=f"recomputing shard 2: .*{shard_name(0, 2)} is not recorded"):
        run = _run(explainer, _loader(*_data()), out)
    assert run.computed == [2] and run.skipped == [0, 1, 3]
    _assert_same(dynlrp.merge_shards(out), reference[1])


# -- a changed dataset -------------------------------------------------------------------------------------------------
class Unsized:
    """An iterable without ``len()``."""

    def __init__(self, loader):
        self.loader = loader

    def __iter__(self):
        return iter(self.loader)


def _changed(kind: str):
    x, y = _data()
    if kind == "values":
        x = x.clone()
        x[1, 3] += 1e-3
    elif kind == "shuffled":
        return _loader(x, y, shuffle=True, generator=torch.Generator().manual_seed(0))
    elif kind == "labels":
        y = y.clone()
        y[0] = (y[0] + 1) % 3
    elif kind.startswith("shorter"):
        x, y = x[:24], y[:24]
    elif kind.startswith("longer"):  # the same 26 samples, then 4 more
        x, y = torch.cat([x, x[:4] + 1]), torch.cat([y, y[:4]])
    return Unsized(_loader(x, y)) if kind.endswith("unsized") else _loader(x, y)


@pytest.mark.parametrize(
    ("kind", "interrupted"),
    [(k, i) for k in ("values", "shuffled", "labels", "shorter", "longer") for i in (True, False)]
    + [("shorter-unsized", False), ("longer-unsized", False)],  # interrupted: a prefix of the new dataset, valid
)
def test_changed_dataset_on_resume_raises_and_writes_nothing(explainer, reference, tmp_path, kind, interrupted):
    out = _copy_of(reference, tmp_path)
    if interrupted:  # shards 0 and 1 finished, as after a kill in shard 2
        for k in (2, 3):
            (out / shard_name(0, k)).unlink()
        manifest = _manifest(out)
        for k in ("2", "3"):
            del manifest["shards"][k]
        (out / "manifest-000.json").write_text(json.dumps(manifest))
        (out / "done-000.json").unlink()
    before = _snapshot(out)
    counting = Counting(explainer)
    with pytest.raises(dynlrp.DynlrpDatasetError, match="the dataset changed") as info:
        _run(counting, _changed(kind), out)
    msg = str(info.value)
    assert "new out_dir" in msg and str(out) in msg and "nothing was written" in msg
    if kind in ("values", "shuffled", "labels"):
        assert "shard 0 (samples 0..7" in msg
    elif kind == "shorter-unsized":
        assert "shard 3 (samples 24..25" in msg and "shorter" in msg
    elif kind == "longer-unsized":
        assert "shard 3 has samples 24..25 in 1 batches" in msg
    else:
        assert "the loader has " in msg and "a loader of 7 batches" in msg
    assert _snapshot(out) == before
    assert counting.calls == 0  # found before any explanation
    if not interrupted:
        _assert_same(dynlrp.merge_shards(out), reference[1])  # the finished run is intact


def test_changed_dataset_after_a_recomputed_shard_keeps_nothing(explainer, reference, tmp_path):
    """Shard 1 is damaged (recomputed first), shard 3's inputs changed: the recomputed shard 1 is not committed."""
    out = _copy_of(reference, tmp_path)
    _damage(out / shard_name(0, 1), "truncated")
    before = _snapshot(out)
    x, y = _data()
    x = x.clone()
    x[25, 0] = 7.0  # in the last batch (shard 3)
    counting = Counting(explainer)
    with pytest.warns(UserWarning, match="recomputing shard 1"):
        with pytest.raises(dynlrp.DynlrpDatasetError, match="shard 3 .*samples 24..25"):
            _run(counting, _loader(x, y), out)
    assert counting.calls == 2  # shard 1 was recomputed, then discarded
    assert _snapshot(out) == before


# -- older versions ----------------------------------------------------------------------------------------------------
def test_shards_without_checksums_are_unverified(explainer, reference, tmp_path):
    """Manifest entries of an older version: merge reads them with a warning, resume recomputes them."""
    out = _copy_of(reference, tmp_path)
    manifest = _manifest(out)
    legacy = {
        "shards": {
            k: {"file": e["file"], "samples": e["samples"], "batches": e["batches"]}
            for k, e in manifest["shards"].items()
        }
    }
    (out / "manifest-000.json").write_text(json.dumps(legacy))
    with pytest.warns(UserWarning, match="older dynlrp-fx without a checksum"):
        _assert_same(dynlrp.merge_shards(out), reference[1])
    _damage(out / shard_name(0, 2), "truncated")
    with (
        pytest.warns(UserWarning),
        pytest.raises(dynlrp.DynlrpDatasetError, match=f"{shard_name(0, 2)} cannot be read"),
    ):
        dynlrp.merge_shards(out)

    with pytest.warns(UserWarning, match="older dynlrp-fx without a checksum"):
        run = _run(explainer, _loader(*_data()), out)
    assert run.computed == [0, 1, 2, 3] and run.skipped == []
    _assert_same_run(out, reference[0])  # now with checksums and fingerprints


def test_unreadable_manifest_is_named_by_merge_and_its_shards_recomputed(explainer, reference, tmp_path):
    out = _copy_of(reference, tmp_path)
    path = out / "manifest-000.json"
    path.write_bytes(path.read_bytes()[:40])
    with pytest.raises(dynlrp.DynlrpDatasetError, match="manifest-000.json is unreadable"):
        dynlrp.merge_shards(out)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run = _run(explainer, _loader(*_data()), out)
    msgs = [str(w.message) for w in caught]
    assert "manifest-000.json is unreadable" in msgs[0]
    assert [m.split(": ")[1] for m in msgs[1:]] == [f"recomputing shard {k}" for k in range(4)]  # now unrecorded
    assert run.computed == [0, 1, 2, 3]
    _assert_same_run(out, reference[0])
