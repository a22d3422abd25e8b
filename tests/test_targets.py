"""Output helpers (``dynlrp.targets``) and token relevance."""

from __future__ import annotations

import html

import pytest
import torch
from torch import nn

import dynlrp_fx as dynlrp
from dynlrp_fx import targets
from tests.helpers import tiny_bert

transformers = pytest.importorskip("transformers")


def _mlp() -> nn.Module:
    torch.manual_seed(4)
    return nn.Sequential(nn.Linear(5, 7, bias=False), nn.ReLU(), nn.Linear(7, 4, bias=False)).double().eval()


def test_contrastive_is_the_difference_of_two_explanations_under_lrp0():
    model = _mlp()
    x = torch.randn(6, 5, dtype=torch.float64)
    plain = dynlrp.compile(model, x, rules="lrp0", backend="eager")
    con = dynlrp.compile(model, x, rules="lrp0", backend="eager", output=targets.contrastive(1, 3))
    e = con(x)
    y = model(x).detach()
    torch.testing.assert_close(e.output, (y[:, 1] - y[:, 3]).unsqueeze(1))
    ref = plain(x, target=1).relevance - plain(x, target=3).relevance
    torch.testing.assert_close(e.relevance, ref, rtol=1e-10, atol=1e-12)


def test_sequence_logit_with_a_label_equals_that_target():
    model = _mlp()
    x = torch.randn(3, 5, dtype=torch.float64)
    plain = dynlrp.compile(model, x, rules="lrp0", backend="eager")
    one = dynlrp.compile(model, x, rules="lrp0", backend="eager", output=targets.sequence_logit(label=2))
    torch.testing.assert_close(one(x).relevance, plain(x, target=2).relevance, rtol=1e-12, atol=1e-12)
    assert "sequence_logit(label=2" in repr(targets.sequence_logit(label=2))


@pytest.mark.slow  # ~24 s: in CI's slow step (test-slow-ci)
def test_next_token_on_gpt2_equals_a_seed_at_the_last_position():
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=40, n_positions=16, n_embd=16, n_layer=1, n_head=2)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    ids = torch.randint(0, 40, (2, 6))
    kw = {"input_ids": ids}
    nt = dynlrp.compile(model, example_kwargs=kw, backend="eager", output=targets.next_token())
    e = nt(**kw, target=7)
    logits = model(input_ids=ids).logits.detach()
    torch.testing.assert_close(e.conservation.seed, logits[:, -1, 7])
    full = dynlrp.compile(model, example_kwargs=kw, backend="eager")
    seed = torch.zeros_like(logits)
    seed[:, -1, 7] = logits[:, -1, 7]
    ref = full(**kw, seed=seed)
    torch.testing.assert_close(e.inputs["input_ids"], ref.inputs["input_ids"], rtol=1e-4, atol=1e-6)


def test_qa_start_end_targets_pick_token_positions():
    torch.manual_seed(1)
    model = tiny_bert(
        "BertForQuestionAnswering", vocab_size=30, hidden_size=16, num_hidden_layers=1, intermediate_size=32,
        max_position_embeddings=16, num_labels=2,
    )
    ids = torch.randint(1, 30, (2, 8))
    out = model(input_ids=ids)
    for sel, logits in ((targets.qa_start(), out.start_logits), (targets.qa_end(), out.end_logits)):
        ex = dynlrp.compile(model, example_kwargs={"input_ids": ids}, backend="eager", output=sel)
        e = ex(input_ids=ids, target=torch.tensor([3, 5]))
        torch.testing.assert_close(e.conservation.seed, logits.detach()[[0, 1], [3, 5]])
        assert e.inputs["input_ids"].shape == ids.shape
        assert float(e.conservation.error.max()) < 1e-4


def test_token_relevance_is_aligned_with_the_tokens_and_rendered_as_html():
    from dynlrp_fx import viz
    from dynlrp_fx.demo import minilm_path

    tokenizer = transformers.AutoTokenizer.from_pretrained(minilm_path(), local_files_only=True)
    torch.manual_seed(2)
    model = tiny_bert(
        vocab_size=tokenizer.vocab_size, hidden_size=16, num_hidden_layers=1, intermediate_size=32, num_labels=2
    )
    enc = tokenizer(
        ["Relevance <flows> back to tokens.", "Short one"], padding="max_length", max_length=12, return_tensors="pt"
    )
    kw = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
    ex = dynlrp.compile(model, example_kwargs=kw, backend="eager", output=targets.sequence_logit())
    e = ex(**kw, target=1)
    rows = targets.token_relevance(e, enc["input_ids"], tokenizer, attention_mask=enc["attention_mask"])
    for i, row in enumerate(rows):
        n = int(enc["attention_mask"][i].sum())
        toks = tokenizer.convert_ids_to_tokens(enc["input_ids"][i][:n].tolist())
        assert [t for t, _ in row] == toks
        assert [v for _, v in row] == e.inputs["input_ids"][i][:n].tolist()
    page = viz.token_html([[t for t, _ in r] for r in rows], [[v for _, v in r] for r in rows])
    assert page.count('<span class="tok"') == sum(len(r) for r in rows)
    for row in rows:
        for tok, _ in row:
            assert f'title="{html.escape(tok)}:' in page
    with pytest.raises(KeyError, match="attention_mask"):
        targets.token_relevance(e, enc["input_ids"], tokenizer, input="attention_mask")
