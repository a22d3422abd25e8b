"""The persistent compile cache (``dynlrp_fx.cache``): what hits, what misses, and that a program read from disk
is the program the pipeline makes (bit-identical relevance), in this process and in another one.

Oracles: relevance of a cached explainer == relevance of a freshly compiled one, bit for bit (``torch.equal``), on
other weights too (programs read the live parameters); a changed option, shape spec, architecture or plain attribute
misses (the explainer traces: ``_traced`` is set); corrupted or tampered entries are never used; two processes
writing one entry leave a readable entry.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

import dynlrp_fx as dynlrp
from dynlrp_fx import cache
from tests.helpers import small_cnn, tiny_bert

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    """An empty cache folder for one test."""
    d = tmp_path / "cache"
    monkeypatch.setenv("DYNLRP_CACHE_DIR", str(d))
    monkeypatch.delenv("DYNLRP_CACHE", raising=False)
    return d


def _hit(explainer) -> bool:
    """Whether an explainer's target program came from the cache (it did not trace the model)."""
    return explainer._traced is None and explainer.program("target").from_cache


def _entries(d: Path) -> list[Path]:
    return sorted(d.glob("*.json"))


def _fresh(model, x, **kw):
    return dynlrp.compile(model, x, cache=False, **kw)


class Gated(nn.Module):
    """A small MLP whose activation is a plain attribute (as a Hugging Face config names it)."""

    def __init__(self, act: str = "relu", width: int = 6):
        super().__init__()
        self.act = act
        self.fc1, self.fc2 = nn.Linear(4, width), nn.Linear(width, 3)

    def forward(self, x):
        h = self.fc1(x)
        return self.fc2(torch.relu(h) if self.act == "relu" else torch.tanh(h))


def test_hit_is_bit_identical_and_reads_live_weights(cache_dir):
    torch.manual_seed(0)
    x = torch.randn(3, 3, 8, 8)
    a = small_cnn()
    cold = dynlrp.compile(a, x, rules="lrp0")
    assert not _hit(cold) and len(_entries(cache_dir)) == 1
    warm = dynlrp.compile(a, x, rules="lrp0")
    assert _hit(warm)
    assert torch.equal(warm(x, target=2).relevance, cold(x, target=2).relevance)
    # another instance of the architecture (other weights) hits and explains *its* weights
    b = small_cnn()
    other = dynlrp.compile(b, x, rules="lrp0")
    assert _hit(other)
    ref = _fresh(b, x, rules="lrp0")(x, target=2)
    got = other(x, target=2)
    assert torch.equal(got.relevance, ref.relevance) and not torch.equal(got.relevance, warm(x, target=2).relevance)
    # any batch size takes the cached program (the batch is keyed by its role, not its size)
    one = dynlrp.compile(b, x[:1], rules="lrp0")
    assert _hit(one)
    assert torch.equal(one(x[:2], target=1).relevance, _fresh(b, x[:1], rules="lrp0")(x[:2], target=1).relevance)


def test_seed_mode_and_introspection_from_cache(cache_dir):
    x = torch.randn(2, 3, 8, 8)
    model = small_cnn()
    cold = dynlrp.compile(model, x)
    seed = torch.randn(2, 5)
    ref = cold(x, seed=seed)  # builds and stores the seed program
    assert len(_entries(cache_dir)) == 2
    warm = dynlrp.compile(model, x)
    got = warm(x, seed=seed)
    assert warm.program("seed").from_cache and warm._traced is None
    assert torch.equal(got.relevance, ref.relevance)
    # what needs the trace (the rule table) traces on demand and keeps the cached programs
    assert warm.rule_table() == cold.rule_table()
    assert warm.program("target").from_cache


def test_what_misses(cache_dir):
    torch.manual_seed(0)
    x = torch.randn(4, 4)
    base = Gated()
    dynlrp.compile(base, x, rules="epsilon")
    assert _hit(dynlrp.compile(Gated(), x, rules="epsilon"))
    misses = {
        "rules": lambda: dynlrp.compile(base, x, rules="lrp0"),
        "rule setting": lambda: dynlrp.compile(base, x, rules={"linear": dynlrp.rules.Epsilon(0.1)}),
        "policy": lambda: dynlrp.compile(base, x, rules="epsilon", promise_policy="keep"),
        "shape spec": lambda: dynlrp.compile(base, x, rules="epsilon", dynamic=False),
        "input dtype": lambda: dynlrp.compile(Gated().double(), x.double(), rules="epsilon"),
        "architecture": lambda: dynlrp.compile(Gated(width=7), x, rules="epsilon"),
        "plain attribute": lambda: dynlrp.compile(Gated(act="tanh"), x, rules="epsilon"),
        "output": lambda: dynlrp.compile(base, x, rules="epsilon", output=lambda y: y[:, :2]),
        "params": lambda: dynlrp.compile(base, x, rules="epsilon", params=True),
    }
    for what, make in misses.items():
        assert not _hit(make()), what
    # and each of them hits the second time
    for what, make in misses.items():
        assert _hit(make()), what
    tanh = dynlrp.compile(Gated(act="tanh"), x, rules="epsilon")
    assert torch.equal(tanh(x, target=0).relevance, _fresh(tanh.model, x, rules="epsilon")(x, target=0).relevance)


def test_hf_config_attribute_misses(cache_dir):
    """The activation named in a Hugging Face config is part of the key; a new model from the same config hits."""
    ids = torch.randint(0, 128, (2, 8))
    kw = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    gelu = dynlrp.compile(tiny_bert(num_hidden_layers=1), example_kwargs=kw)
    again = dynlrp.compile(tiny_bert(num_hidden_layers=1), example_kwargs=kw)
    relu = dynlrp.compile(tiny_bert(num_hidden_layers=1, hidden_act="relu"), example_kwargs=kw)
    assert not _hit(gelu) and _hit(again) and not _hit(relu)
    # another text length takes the same program
    ids2 = torch.randint(0, 128, (3, 13))
    kw2 = {"input_ids": ids2, "attention_mask": torch.ones_like(ids2)}
    longer = dynlrp.compile(again.model, example_kwargs=kw2)
    assert _hit(longer)
    ref = dynlrp.compile(again.model, example_kwargs=kw, cache=False)
    assert torch.equal(longer(**kw2, target=1).relevance, ref(**kw2, target=1).relevance)


def test_corrupted_entry_is_recomputed(cache_dir):
    x = torch.randn(2, 3, 8, 8)
    model = small_cnn()
    ref = dynlrp.compile(model, x)(x, target=1).relevance
    (entry,) = _entries(cache_dir)
    key = _key(entry)
    raw = entry.read_bytes()
    for bad in (raw[: len(raw) // 2], raw.replace(b"op:aten::convolution", b"op:aten::convolutiox"), b"\x00" * 64):
        entry.write_bytes(bad)
        with pytest.warns(UserWarning, match="corrupted"):
            ex = dynlrp.compile(model, x)
        assert not _hit(ex)
        assert torch.equal(ex(x, target=1).relevance, ref)
        assert cache.load(key, "target") is not None  # written again, whole


def _key(entry: Path) -> str:
    return json.loads(entry.read_bytes().partition(b"\n")[0])["key"]


def _rewrite(entry: Path, edit) -> None:
    """Tamper with an entry's body and fix its checksum (what an attacker with write access could do)."""
    import hashlib

    head, _, body = entry.read_bytes().partition(b"\n")
    data = json.loads(body)
    edit(data)
    body = json.dumps(data).encode()
    header = json.loads(head)
    header["sha256"] = hashlib.sha256(body).hexdigest()
    entry.write_bytes(json.dumps(header).encode() + b"\n" + body)


@pytest.mark.parametrize("attack", ["target", "name", "tensor"])
def test_tampered_entry_runs_no_code(cache_dir, attack):
    """A checksummed entry that names a Python function, injects code in a node name or has a malformed tensor is
    refused before anything runs."""
    x = torch.randn(2, 3, 8, 8)
    model = small_cnn()
    dynlrp.compile(model, x)
    (entry,) = _entries(cache_dir)
    marker = cache_dir / "pwned"

    def edit(data):
        calls = [n for n in data["graph"]["nodes"] if n[0] == "call"]
        if attack == "target":
            calls[0][2] = "builtins.exec"
        elif attack == "name":
            calls[0][1] = f"x = open({str(marker)!r}, 'w'); y"
        else:
            data["constants"]["fake"] = {"dtype": "float32", "shape": [10**6], "data": "AAAA"}

    _rewrite(entry, edit)
    with pytest.warns(UserWarning, match="corrupted"):
        ex = dynlrp.compile(model, x)
    assert not _hit(ex) and not marker.exists()


def test_cache_off_and_unkeyable(cache_dir, monkeypatch):
    x = torch.randn(2, 4)
    dynlrp.compile(Gated(), x, cache=False)
    monkeypatch.setenv("DYNLRP_CACHE", "0")
    dynlrp.compile(Gated(), x)
    assert _entries(cache_dir) == []
    monkeypatch.delenv("DYNLRP_CACHE")

    model = Gated()
    model.helper = object()  # an attribute the key cannot describe (no fields, its repr an address)
    with pytest.warns(UserWarning, match="not cached"):
        ex = dynlrp.compile(model, x)
    assert ex(x).relevance.shape == x.shape and _entries(cache_dir) == []


def test_size_bound_evicts_least_recently_used(cache_dir, monkeypatch):
    x = torch.randn(2, 4)
    dynlrp.compile(Gated(width=5), x)
    first = _entries(cache_dir)
    size = first[0].stat().st_size
    monkeypatch.setenv("DYNLRP_CACHE_SIZE_MB", str(1.5 * size / 2**20))  # room for one entry
    dynlrp.compile(Gated(width=6), x)
    (left,) = _entries(cache_dir)
    assert left not in first
    assert cache.info()["entries"] == 1 and cache.clear() == 1 and _entries(cache_dir) == []


_WORKER = textwrap.dedent("""
    import sys, torch
    import dynlrp_fx as dynlrp
    from tests.helpers import small_cnn
    torch.manual_seed(0)
    model, x = small_cnn(), torch.randn(3, 3, 8, 8)
    ex = dynlrp.compile(model, x, rules="epsilon_gamma_box")
    torch.save({"hit": ex._traced is None, "relevance": ex(x, target=4).relevance}, sys.argv[1])
""")


def test_second_process_and_concurrent_writers(cache_dir, tmp_path):
    """Two processes compiling the same model at once into an empty cache both succeed and leave one whole entry;
    a third process reads it (no trace) and gets bit-identical relevance."""
    env = {**os.environ, "DYNLRP_CACHE_DIR": str(cache_dir), "PYTHONPATH": str(ROOT)}
    outs = [tmp_path / f"out{i}.pt" for i in range(3)]
    procs = [subprocess.Popen([sys.executable, "-c", _WORKER, str(o)], cwd=ROOT, env=env) for o in outs[:2]]
    assert [p.wait(timeout=300) for p in procs] == [0, 0]
    assert len(_entries(cache_dir)) == 1 and not list(cache_dir.glob(".tmp-*"))
    subprocess.run([sys.executable, "-W", "error::UserWarning", "-c", _WORKER, str(outs[2])], cwd=ROOT, env=env,
                   check=True, timeout=300)
    results = [torch.load(o) for o in outs]
    assert results[2]["hit"]
    assert all(torch.equal(r["relevance"], results[0]["relevance"]) for r in results)


def test_store_is_atomic_under_concurrent_writes(cache_dir, tmp_path):
    """Writers replacing one entry many times while it is read: every read sees a whole entry."""
    x = torch.randn(2, 4)
    dynlrp.compile(Gated(), x)
    (entry,) = _entries(cache_dir)
    key = _key(entry)
    writer = textwrap.dedent(f"""
        from dynlrp_fx import cache
        e = cache.load({key!r}, "target")
        for _ in range(40):
            cache.store({key!r}, "target", e)
    """)
    env = {**os.environ, "DYNLRP_CACHE_DIR": str(cache_dir), "PYTHONPATH": str(ROOT)}
    procs = [subprocess.Popen([sys.executable, "-c", writer], cwd=ROOT, env=env) for _ in range(2)]
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a corrupted read would warn
        while any(p.poll() is None for p in procs):
            assert cache.load(key, "target") is not None
    assert [p.wait() for p in procs] == [0, 0]
    assert len(_entries(cache_dir)) == 1


def test_progress_bar_shows_stages(cache_dir, capsys, monkeypatch):
    from dynlrp_fx import progress

    monkeypatch.setattr(progress, "DELAY", 0.0)  # show at once (the default waits 2 s)
    x = torch.randn(2, 3, 8, 8)
    dynlrp.compile(small_cnn(), x, progress=True, cache=False)
    err = capsys.readouterr().err
    for stage in ("trace (torch.export)", "analysis passes", "synthesis passes [target]", "backend [eager]"):
        assert stage in err, stage
    dynlrp.compile(small_cnn(), x, progress=False, cache=False)
    assert capsys.readouterr().err == ""


def test_cli_info_and_clear(cache_dir, capsys):
    from dynlrp_fx.cli import main

    dynlrp.compile(Gated(), torch.randn(2, 4))
    assert main(["cache"]) == 0
    out = capsys.readouterr().out
    assert str(cache_dir) in out and "1 entries" in out
    assert main(["cache", "clear"]) == 0
    assert "removed 1 compile cache entry" in capsys.readouterr().out and _entries(cache_dir) == []


def test_export_from_a_cached_explainer(cache_dir, tmp_path):
    """Exporting needs the functional graph: a cached explainer traces for it, and the file equals the live one."""
    x = torch.randn(2, 3, 8, 8)
    model = small_cnn()
    dynlrp.compile(model, x)
    warm = dynlrp.compile(model, x)
    assert _hit(warm)
    path = dynlrp.export(warm, tmp_path / "cnn.pt2", modes=("target",))
    loaded = dynlrp.load(path)
    assert torch.equal(loaded(x, target=3).relevance, warm(x, target=3).relevance)


def test_generative_hf_model_key_is_the_same_in_every_process():
    """transformers' GenerationConfig stores a per-process hash of itself: the key must not see it."""
    script = textwrap.dedent("""
        import hashlib, torch, transformers as tf
        from dynlrp_fx import cache
        torch.manual_seed(int(__import__("sys").argv[1]))
        cfg = tf.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64, n_positions=32)
        print(hashlib.sha256(cache.model_data(tf.GPT2LMHeadModel(cfg).eval()).encode()).hexdigest())
    """)
    keys = {
        subprocess.run([sys.executable, "-c", script, str(seed)], cwd=ROOT, capture_output=True, text=True, check=True,
                       env={**os.environ, "PYTHONPATH": str(ROOT), "PYTHONHASHSEED": str(seed)}).stdout.strip()
        for seed in (1, 2)
    }
    assert len(keys) == 1


def test_recompile_stores_under_its_own_backend(cache_dir):
    """An eager explainer recompiled for Inductor (a torch.compile mode) stores the functional program under the
    compiled backend's key; the eager entry keeps the buffer-reusing program."""
    x = torch.randn(2, 3, 8, 8)
    model = small_cnn()
    eager = dynlrp.compile(model, x)
    assert eager.recompile(mode="max-autotune").backend == "inductor"
    assert len(_entries(cache_dir)) == 2
    warm = dynlrp.compile(model, x)
    assert _hit(warm)

    def targets(gm):
        return [str(n.target) for n in gm.graph.nodes]

    assert targets(warm.program("target").fn) == targets(eager.program("target").fn)
