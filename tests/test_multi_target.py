"""Several targets per sample in one forward pass and one batched sweep (``target=`` of shape ``(B, K)``).

The oracle: every rule is linear in the relevance it receives once the forward values are fixed, so one call with
``K`` targets must equal ``K`` separate calls, relevance, ledger and all (float64, to rounding of a bigger batch).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import dynlrp_fx as dynlrp
from dynlrp_fx import targets
from dynlrp_fx.errors import DynlrpInputError
from tests.helpers import small_cnn, tiny_bert

transformers = pytest.importorskip("transformers")


def _same(multi, singles, j, *, exact=False):
    """Target ``j`` of a K-target explanation equals the single explanation of that target."""
    tol = dict(rtol=0, atol=0) if exact else dict(rtol=1e-10, atol=1e-12)
    one = singles[j]
    torch.testing.assert_close(multi.relevance[:, j], one.relevance, **tol)
    for name, r in one.inputs.items():
        torch.testing.assert_close(multi.inputs[name][:, j], r, **tol)
    torch.testing.assert_close(multi.conservation.seed[:, j], one.conservation.seed, **tol)
    torch.testing.assert_close(multi.conservation.inputs[:, j], one.conservation.inputs, **tol)
    torch.testing.assert_close(multi.absorbed[:, j], one.absorbed, **tol)
    for name, r in one.params.items():
        torch.testing.assert_close(multi.params[name][j], r, **tol)
    for name, r in one.captured.items():
        torch.testing.assert_close(multi.captured[name][:, j], r, **tol)


def _cnn():
    torch.manual_seed(0)
    return small_cnn().double(), torch.randn(3, 3, 8, 8, dtype=torch.float64)


def _bert(model_cls="BertForSequenceClassification"):
    torch.manual_seed(0)
    labels = 2 if model_cls == "BertForQuestionAnswering" else 3
    return tiny_bert(model_cls, num_labels=labels).double(), torch.randint(0, 100, (2, 9))


@pytest.mark.parametrize("policy", ["recompute", "keep"])
@pytest.mark.parametrize("rules", ["epsilon", "lrp0", "epsilon_gamma_box"])
def test_cnn_k_targets_equal_k_calls(rules, policy):
    model, x = _cnn()
    ex = dynlrp.compile(model, x, rules=rules, backend="eager", promise_policy=policy)
    t = torch.tensor([[0, 4, 2, 2], [1, 1, 3, 0], [4, 3, 2, 1]])
    multi = ex(x, target=t)
    assert multi.relevance.shape == (3, 4, 3, 8, 8) and multi.conservation.seed.shape == (3, 4)
    assert multi.output.shape == (3, 5) and torch.equal(multi.targets, t)
    assert ex.split().batched, ex.split().why
    singles = [ex(x, target=t[:, j]) for j in range(4)]
    for j in range(4):
        _same(multi, singles, j)
    # the seed of each target is that logit
    torch.testing.assert_close(multi.conservation.seed, model(x).gather(1, t))


@pytest.mark.slow
@pytest.mark.parametrize("rules", ["epsilon", "attnlrp"])
def test_bert_k_targets_and_any_batch(rules):
    model, ids = _bert()
    ex = dynlrp.compile(model, (ids,), rules=rules, backend="eager")
    for b in (2, 3):  # the batch stays dynamic
        x = torch.randint(0, 100, (b, 9))
        t = torch.randint(0, 3, (b, 3))
        multi = ex(x, target=t)
        assert multi.relevance.shape == (b, 3, 9)
        singles = [ex(x, target=t[:, j]) for j in range(3)]
        for j in range(3):
            _same(multi, singles, j)


def test_seeds_with_a_target_axis_equal_k_seed_calls():
    model, x = _cnn()
    ex = dynlrp.compile(model, x, rules="epsilon", backend="eager")
    seeds = torch.randn(3, 2, 5, dtype=torch.float64)
    multi = ex(x, seed=seeds)
    assert multi.relevance.shape == (3, 2, 3, 8, 8) and multi.targets is None
    singles = [ex(x, seed=seeds[:, j]) for j in range(2)]
    for j in range(2):
        _same(multi, singles, j)


def test_stabilisers_are_recomputed_per_sweep_not_cut():
    """The epsilon rule's ``|z| + eps`` does not depend on the target, but it is read only by the relevance half:
    it is recomputed in each sweep (two passes) instead of being returned by the forward half and kept alive
    across all sweeps (one more activation per layer for the whole call). The forward half computes no ``abs``;
    K targets still equal K single calls."""
    model, x = _cnn()
    ex = dynlrp.compile(model, x, rules="epsilon", backend="eager")
    t = torch.tensor([[0, 3], [1, 2], [4, 4]])
    multi = ex(x, target=t)
    sp = ex.split()
    fwd_ops = {n.target for n in sp.forward_graph.graph.nodes if n.op == "call_function"}
    rel_ops = {n.target for n in sp.relevance_graph.graph.nodes if n.op == "call_function"}
    assert torch.ops.aten.abs.default not in fwd_ops and torch.ops.aten.abs.default in rel_ops
    singles = [ex(x, target=t[:, j]) for j in range(2)]
    for j in range(2):
        _same(multi, singles, j)


@pytest.mark.slow
def test_sweep_batch_chunks_the_targets_without_changing_them():
    model, ids = _bert()
    ex = dynlrp.compile(model, (ids,), backend="eager")
    t = torch.randint(0, 3, (2, 5))
    whole = ex(ids, target=t)
    for rows in (2, 4, 7, 100):  # one target per sweep, 2, 3 (the last sweep shorter), all
        part = ex(ids, target=t, sweep_batch=rows)
        torch.testing.assert_close(part.relevance, whole.relevance, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(part.absorbed, whole.absorbed, rtol=1e-12, atol=1e-14)
    with pytest.raises(DynlrpInputError, match="sweep_batch"):
        ex(ids, target=t, sweep_batch=0)


def test_params_and_capture_per_target():
    """params= sums over the batch, so the relevance graph cannot widen: it sweeps one target at a time (still one
    forward pass) and params get a leading target axis; capture= stays per (sample, target)."""
    model, x = _cnn()
    ex = dynlrp.compile(model, x, rules="epsilon", backend="eager", params=["5.weight"], capture=["2"])
    t = torch.tensor([[0, 3], [1, 4], [2, 2]])
    multi = ex(x, target=t)
    assert not ex.split().batched and "batch" in ex.split().why
    assert multi.params["5.weight"].shape == (2, 5, 36) and multi.captured["2"].shape == (3, 2, 4, 6, 6)
    singles = [ex(x, target=t[:, j]) for j in range(2)]
    for j in range(2):
        _same(multi, singles, j, exact=True)


def test_model_with_a_fixed_batch_sweeps_one_target_at_a_time():
    class Fixed(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(6, 4)

        def forward(self, x):
            return self.lin(x.reshape(2, 6))  # the batch size is a Python int in the model's code

    torch.manual_seed(1)
    model, x = Fixed().double().eval(), torch.randn(2, 6, dtype=torch.float64)
    ex = dynlrp.compile(model, x, rules="epsilon", backend="eager")
    t = torch.tensor([[0, 1, 3], [2, 2, 0]])
    multi = ex(x, target=t)
    assert not ex.split().batched
    singles = [ex(x, target=t[:, j]) for j in range(3)]
    for j in range(3):
        _same(multi, singles, j, exact=True)


@pytest.mark.slow
def test_question_answering_k_spans_over_two_outputs():
    """DynamicLRP's SQuAD setting: start and end logits seeded together, K spans per sample in one call."""
    model, ids = _bert("BertForQuestionAnswering")
    ex = dynlrp.compile(model, (ids,), backend="eager", output=["start_logits", "end_logits"])
    starts, ends = torch.randint(0, 9, (2, 3)), torch.randint(0, 9, (2, 3))
    multi = ex(ids, target={"start_logits": starts, "end_logits": ends})
    assert set(multi.output) == {"start_logits", "end_logits"} and multi.relevance.shape == (2, 3, 9)
    singles = [ex(ids, target={"start_logits": starts[:, j], "end_logits": ends[:, j]}) for j in range(3)]
    for j in range(3):
        _same(multi, singles, j)
    # one index per sample for one output: the same end at every start
    mixed = ex(ids, target={"start_logits": starts, "end_logits": ends[:, 0]})
    _same(mixed, [ex(ids, target={"start_logits": starts[:, j], "end_logits": ends[:, 0]}) for j in range(3)], 2)
    with pytest.raises(DynlrpInputError, match="different numbers of targets"):
        ex(ids, target={"start_logits": torch.zeros(2, 2, dtype=torch.long),
                        "end_logits": torch.zeros(2, 3, dtype=torch.long)})


@pytest.mark.slow
def test_each_token_row_equals_the_explanation_at_that_position():
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=2)
    model = transformers.GPT2LMHeadModel(cfg).eval().double()  # the library's defaults (use_cache and all)
    ids = torch.randint(0, 64, (2, 10))
    ex = dynlrp.compile(model, example_kwargs={"input_ids": ids}, backend="eager")
    expl = ex(input_ids=ids, target=targets.each_token())
    matrix = expl.inputs["input_ids"]
    assert matrix.shape == (2, 9, 10)
    logits = model(ids).logits.detach()
    for t in (0, 4, 8):
        one = dynlrp.compile(model, example_kwargs={"input_ids": ids}, backend="eager",
                             output=targets.next_token(position=t))(input_ids=ids, target=ids[:, t + 1])
        torch.testing.assert_close(matrix[:, t], one.inputs["input_ids"], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(expl.conservation.seed[:, t], logits[torch.arange(2), t, ids[:, t + 1]])
        assert not matrix[:, t, t + 1 :].any()  # causal: later tokens cannot matter
    # positions= restricts the rows (negative positions count from the end)
    some = ex(input_ids=ids, target=targets.each_token(positions=[2, -2]))
    torch.testing.assert_close(some.inputs["input_ids"], matrix[:, [2, 8]], rtol=1e-10, atol=1e-12)
    with pytest.raises(DynlrpInputError, match="no next token"):
        ex(input_ids=ids, target=targets.each_token(positions=[9]))
    # contrastive: the token minus an alternative at every position (2K targets in one sweep, subtracted)
    alt = torch.randint(0, 64, (2, 10))
    con = ex(input_ids=ids, target=targets.each_token(alternative=alt))
    assert con.inputs["input_ids"].shape == (2, 9, 10)
    for t in (1, 7):
        a = ex(input_ids=ids, target=t * 64 + ids[:, t + 1])
        b = ex(input_ids=ids, target=t * 64 + alt[:, t + 1])
        torch.testing.assert_close(con.inputs["input_ids"][:, t], a.inputs["input_ids"] - b.inputs["input_ids"],
                                   rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(con.conservation.seed[:, t],
                                   logits[torch.arange(2), t, ids[:, t + 1]] - logits[torch.arange(2), t, alt[:, t + 1]])
    with pytest.raises(DynlrpInputError, match="alternative"):
        ex(input_ids=ids, target=targets.each_token(alternative=torch.zeros(2, 3, dtype=torch.long)))


def test_each_token_rows_equal_single_targets_of_the_same_explainer():
    """The default run's each_token check (the slow test compares with next_token explainers and contrastive rows):
    row t is the explanation of the flat logit index t * V + ids[t + 1], and nothing after t is relevant."""
    torch.manual_seed(1)
    cfg = transformers.GPT2Config(vocab_size=48, n_positions=16, n_embd=16, n_layer=1, n_head=2)
    model = transformers.GPT2LMHeadModel(cfg).eval().double()
    ids = torch.randint(0, 48, (2, 7))
    ex = dynlrp.compile(model, example_kwargs={"input_ids": ids}, backend="eager")
    # one batched sweep: the LayerNorms' rstd (held from the forward pass) is cut as a tensor, not as its tuple
    assert ex.split().batched, ex.split().why
    matrix = ex(input_ids=ids, target=targets.each_token()).inputs["input_ids"]
    assert matrix.shape == (2, 6, 7)
    for t in (0, 3, 5):
        one = ex(input_ids=ids, target=t * 48 + ids[:, t + 1])
        torch.testing.assert_close(matrix[:, t], one.inputs["input_ids"], rtol=1e-10, atol=1e-12)
        assert not matrix[:, t, t + 1 :].any()


def _lengths_seen(monkeypatch) -> list[int]:
    """The sequence lengths the call path explains targets on (a spy on our own CallPath)."""
    from dynlrp_fx.runtime import CallPath

    seen: list[int] = []
    inner = CallPath.explain_targets

    def spy(self, tensors, *a, **k):
        seen.append(int(tensors[0].shape[1]))
        return inner(self, tensors, *a, **k)

    monkeypatch.setattr(CallPath, "explain_targets", spy)
    return seen


def test_each_token_on_prefixes_equals_the_whole_sequence(monkeypatch):
    """each_token() explains early positions on prefixes of the sequence (causal mask: nothing after t can matter
    to the logit at t): the same matrix, ledger and targets as on the whole sequence (prefixes=False), plain and
    contrastive, with the groups on shorter prefixes."""
    from dynlrp_fx.runtime import prefix_groups

    torch.manual_seed(2)
    cfg = transformers.GPT2Config(vocab_size=40, n_positions=32, n_embd=16, n_layer=2, n_head=2)
    model = transformers.GPT2LMHeadModel(cfg).eval().double()  # the library's defaults (use_cache and all)
    ids = torch.randint(0, 40, (2, 14))
    ex = dynlrp.compile(model, example_kwargs={"input_ids": ids}, backend="eager")
    alt = torch.randint(0, 40, (2, 14))
    groups = prefix_groups(list(range(13)), 14)
    assert len(groups) > 2 and groups[-1][0] == 14
    for kw in ({}, {"alternative": alt}):
        seen = _lengths_seen(monkeypatch)
        a = ex(input_ids=ids, target=targets.each_token(**kw))
        assert seen[0] == 14 and min(seen) < 14 and len(seen) > 2  # the whole sequence first, then prefixes
        b = ex(input_ids=ids, target=targets.each_token(prefixes=False, **kw))
        assert seen[len(seen) - 1] == 14 and len(seen) == len(set(seen)) + 1  # one more call, on the whole sequence
        assert a.inputs["input_ids"].shape == (2, 13, 14)
        torch.testing.assert_close(a.inputs["input_ids"], b.inputs["input_ids"], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(a.output, b.output, rtol=0, atol=0)
        for f in ("seed", "inputs", "absorbed"):
            torch.testing.assert_close(getattr(a.conservation, f), getattr(b.conservation, f), rtol=1e-10, atol=1e-12)
        if not kw:
            assert torch.equal(a.targets, b.targets)
        monkeypatch.undo()


@pytest.mark.slow
def test_each_token_on_a_model_that_is_not_causal_uses_the_whole_sequence(monkeypatch):
    """A masked LM has (B, L, V) logits too, but every position sees the whole sequence: its prefix logits differ,
    so after the first group's the groups are explained on the whole sequence and the matrix is the prefixes=False
    one (later tokens do matter here)."""
    torch.manual_seed(3)
    model = tiny_bert("BertForMaskedLM", vocab_size=40).double()
    ids = torch.randint(0, 40, (2, 14))
    ex = dynlrp.compile(model, example_kwargs={"input_ids": ids}, backend="eager")
    seen = _lengths_seen(monkeypatch)
    a = ex(input_ids=ids, target=targets.each_token())
    assert min(seen) < 14 and seen.count(14) == len(seen) - 1  # one prefix tried, then only the whole sequence
    b = ex(input_ids=ids, target=targets.each_token(prefixes=False))
    torch.testing.assert_close(a.inputs["input_ids"], b.inputs["input_ids"], rtol=1e-10, atol=1e-12)
    assert a.inputs["input_ids"][:, 0, 2:].abs().sum() > 0  # tokens after position 0 carry relevance


def test_each_token_needs_next_token_logits():
    model, x = _cnn()
    ex = dynlrp.compile(model, x, rules="epsilon", backend="eager")
    with pytest.raises(DynlrpInputError, match="each_token: the call has no input 'input_ids'"):
        ex(x, target=targets.each_token())
    with pytest.raises(DynlrpInputError, match="must be \\(batch, length\\) token ids"):
        ex(x, target=targets.each_token(input="input"))


def test_bad_multi_target_calls_say_what_to_do():
    model, x = _cnn()
    ex = dynlrp.compile(model, x, rules="epsilon", backend="eager")
    with pytest.raises(DynlrpInputError, match=r"expected \(batch, targets\) = \(3, 2\)"):
        ex(x, target=torch.zeros(2, 2, dtype=torch.long))
    with pytest.raises(DynlrpInputError, match="out of range"):
        ex(x, target=torch.full((3, 2), 7))
    with pytest.raises(DynlrpInputError, match="integer indices"):
        ex(x, target=torch.zeros(3, 2))
    with pytest.raises(DynlrpInputError, match="seed="):
        ex(x, seed=torch.randn(3, 2, 4, dtype=torch.float64))


@pytest.mark.slow
def test_cached_explainer_and_loaded_file_give_the_same_k_targets(tmp_path):
    """A compile-cache hit (no trace until the split needs the functional graph) and an exported file (which runs
    the inputs repeated K times) both equal the live explainer."""
    model, x = _cnn()
    live = dynlrp.compile(model, x, rules="epsilon", backend="eager")
    hit = dynlrp.compile(model, x, rules="epsilon", backend="eager")
    assert hit.program("target").from_cache
    t = torch.tensor([[0, 4], [1, 1], [3, 2]])
    ref = live(x, target=t)
    torch.testing.assert_close(hit(x, target=t).relevance, ref.relevance, rtol=0, atol=0)
    loaded = dynlrp.load(dynlrp.export(live, tmp_path / "cnn.pt2", modes=("target", "seed")))
    got = loaded(x, target=t)
    assert got.relevance.shape == (3, 2, 3, 8, 8) and got.output.shape == (3, 5)
    torch.testing.assert_close(got.relevance, ref.relevance, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(got.conservation.seed, ref.conservation.seed, rtol=1e-10, atol=1e-12)
    seeds = torch.randn(3, 2, 5, dtype=torch.float64)
    torch.testing.assert_close(loaded(x, seed=seeds).relevance, live(x, seed=seeds).relevance, rtol=1e-10,
                               atol=1e-12)


@pytest.mark.slow
def test_compiled_k_targets_equal_eager():
    """Inductor compiles the forward and relevance graphs separately; K targets equal the eager explainer's."""
    model, x = _cnn()
    model = model.float()
    x = x.float()
    eager = dynlrp.compile(model, x, rules="epsilon", backend="eager")
    ind = dynlrp.compile(model, x, rules="epsilon", backend="inductor")
    t = torch.tensor([[0, 4, 1], [1, 1, 2], [3, 2, 0]])
    got, ref = ind(x, target=t), eager(x, target=t)
    torch.testing.assert_close(got.relevance, ref.relevance, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(got.conservation.inputs, ref.conservation.inputs, rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_explain_generation_matrix_rows_equal_single_explanations(tmp_path):
    """Generate with the model's own generate(), explain every generated token in one call: row g equals the
    explanation of that token's logit alone; the HTML matrix has one row per generated token, one cell per token."""
    from dynlrp_fx.demo import minilm_path

    tok = transformers.AutoTokenizer.from_pretrained(str(minilm_path()))
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=tok.vocab_size, n_positions=64, n_embd=32, n_layer=2, n_head=2)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    g = dynlrp.explain_generation(model, tok, "the cat sat on the", max_new_tokens=4)
    length = g.ids.shape[0]
    assert len(g.generated) == 4 and g.matrix.shape == (4, length) and len(g.tokens) == length
    ref = model.generate(**tok("the cat sat on the", return_tensors="pt"), max_new_tokens=4, do_sample=False,
                         pad_token_id=tok.pad_token_id)
    assert torch.equal(g.ids, ref[0])  # the model's own greedy generation
    ids = g.ids.unsqueeze(0)
    for r in range(4):
        pos = g.prompt_length - 1 + r
        one = dynlrp.compile(model, example_kwargs={"input_ids": ids}, backend="eager",
                             output=targets.next_token(position=pos))(input_ids=ids, target=ids[:, pos + 1])
        torch.testing.assert_close(g.matrix[r], one.inputs["input_ids"][0], rtol=1e-4, atol=1e-6)
        assert not g.matrix[r, pos + 1 :].any()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    doc = g.html(tmp_path / "m.html")
    assert doc.count('<tr class="row"') == 4 and doc.count("<td ") == 4 * length
    assert (tmp_path / "m.html").read_text(encoding="utf-8") == doc
    assert g.token_html().count('<span class="tok"') == 4 * length
