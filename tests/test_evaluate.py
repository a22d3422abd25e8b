"""Faithfulness metrics (``dynlrp.evaluate.perturbation``), the rule search (``dynlrp.select_rules``) and
``dynlrp evaluate``, against known answers: on a linear model the MoRF curve of ``w * x`` is the logit minus the
largest contributions, its negation swaps MoRF and LeRF (ABPC negated), random relevance scores ~0; one region is the
full removal; token removal leaves valid, right-padded sequences whose masks count the kept tokens.

Tiny models only, eager explainers (no inductor).
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import dynlrp_fx as dynlrp
from dynlrp_fx.cli import main
from dynlrp_fx.evaluate import default_candidates, grid, perturbation

N, F = 256, 32


@pytest.fixture(scope="module")
def linear():
    torch.manual_seed(0)
    model = nn.Linear(F, 1).eval()
    x = torch.randn(N, F)
    return model, x, model.weight.detach()[0] * x


def _logit_after_removing(model, x, contrib, k, largest):
    """The linear model's logit after zeroing the k largest (or smallest) contributions of every sample."""
    order = contrib.argsort(dim=1, descending=largest)[:, :k]
    return (model.bias + contrib.sum(1) - contrib.gather(1, order).sum(1)).detach()


# -- perturbation on a linear model ------------------------------------------------------------------------------------
def test_linear_morf_and_lerf_are_the_sorted_contributions(linear):
    model, x, contrib = linear
    res = perturbation(model, x, 0, contrib, steps=8, baseline="zero", score="logit")
    assert res.morf.shape == res.lerf.shape == (N, 9) and res.abpc.shape == (N,)
    for step in range(9):  # 32 features over 8 steps: 4 per step
        torch.testing.assert_close(res.morf[:, step], _logit_after_removing(model, x, contrib, 4 * step, True))
        torch.testing.assert_close(res.lerf[:, step], _logit_after_removing(model, x, contrib, 4 * step, False))
    assert (res.removed == torch.arange(0, 33, 4)).all()
    # the curves end at the baseline's logit (the bias), and removing the most relevant first drops fastest
    torch.testing.assert_close(res.morf[:, -1], model.bias.detach().expand(N))
    assert res.mean_abpc > 10 * res.se_abpc > 0


def test_negated_relevance_swaps_the_curves(linear):
    model, x, contrib = linear
    pos = perturbation(model, x, 0, contrib, steps=8, baseline="zero", score="logit")
    neg = perturbation(model, x, 0, -contrib, steps=8, baseline="zero", score="logit")
    torch.testing.assert_close(neg.morf, pos.lerf)
    torch.testing.assert_close(neg.abpc, -pos.abpc)
    assert neg.mean_abpc < -10 * neg.se_abpc


def test_random_relevance_scores_about_zero(linear):
    model, x, contrib = linear
    pos = perturbation(model, x, 0, contrib, steps=8, baseline="zero", score="logit")
    rnd = perturbation(model, x, 0, torch.randn(N, F, generator=torch.Generator().manual_seed(1)), steps=8,
                       baseline="zero", score="logit")
    assert abs(rnd.mean_abpc) < 3 * rnd.se_abpc
    assert abs(rnd.mean_abpc) < 0.1 * pos.mean_abpc


def test_ties_are_broken_in_one_fixed_random_order(linear):
    model, x, _ = linear
    flat = torch.ones(N, F)
    a = perturbation(model, x, 0, flat, steps=4, baseline="zero", score="logit", seed=3)
    b = perturbation(model, x, 0, flat, steps=4, baseline="zero", score="logit", seed=3)
    c = perturbation(model, x, 0, flat, steps=4, baseline="zero", score="logit", seed=4)
    torch.testing.assert_close(a.morf, b.morf)
    assert not torch.allclose(a.morf[:, 1], c.morf[:, 1])
    # all tied: MoRF and LeRF remove in the same order, so the attribution says nothing and ABPC is exactly 0
    torch.testing.assert_close(a.morf, a.lerf)
    assert (a.abpc == 0).all()


# -- images ------------------------------------------------------------------------------------------------------------
class ZeroCounter(nn.Module):
    """Outputs (N, 1): how many input values are exactly 0 (inputs are never 0, so: how many were removed)."""

    def forward(self, x):
        return (x == 0).flatten(1).sum(1, keepdim=True).float()


def _zero_counter() -> nn.Module:
    return ZeroCounter().eval()


def test_regions_remove_whole_patches():
    x = torch.rand(3, 2, 8, 8) + 0.5
    res = perturbation(_zero_counter(), x, 0, torch.randn(3, 2, 8, 8), steps=16, baseline="zero", score="logit",
                       region=2, per_step=1)
    # 16 patches of 2x2 pixels, all channels: step k has zeroed k patches = 8k values
    torch.testing.assert_close(res.morf, 8.0 * torch.arange(17.0).expand(3, 17))
    rect = perturbation(_zero_counter(), x, 0, torch.randn(3, 2, 8, 8), steps=2, baseline="zero", score="logit",
                        region=(8, 4))
    torch.testing.assert_close(rect.lerf, torch.tensor([0.0, 64.0, 128.0]).expand(3, 3))


@pytest.mark.parametrize("baseline", ["blur", "zero", "mean", "tensor"])
def test_one_region_is_the_full_removal(baseline):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 36, 5)).eval()
    x = torch.randn(4, 3, 8, 8)
    base = torch.randn(1, 3, 1, 1) if baseline == "tensor" else baseline
    res = perturbation(model, x, None, torch.randn_like(x), steps=4, baseline=base, region=8, sigma=1.5)
    if baseline == "blur":
        removed = dynlrp.evaluate._gaussian_blur(x, 1.5)
    elif baseline == "zero":
        removed = torch.zeros_like(x)
    elif baseline == "mean":
        removed = x.mean((2, 3), keepdim=True).expand_as(x)
    else:
        removed = base.expand_as(x)
    with torch.no_grad():
        target = model(x).argmax(1)
        full = model(removed).softmax(1)[torch.arange(4), target]
    for curve in (res.morf, res.lerf):
        torch.testing.assert_close(curve[:, 1:], full[:, None].expand(4, 4))
    assert (res.removed[:, 1:] == 1).all()


def test_blur_is_a_normalised_gaussian():
    x = torch.zeros(1, 1, 9, 9)
    x[0, 0, 4, 4] = 1.0
    b = dynlrp.evaluate._gaussian_blur(x, 1.0)
    torch.testing.assert_close(b.sum(), torch.tensor(1.0))
    assert b[0, 0, 4, 4] == b.max() and torch.allclose(b[0, 0], b[0, 0].T)
    flat = torch.full((1, 2, 5, 5), 3.0)  # a constant image stays constant (replicate padding)
    torch.testing.assert_close(dynlrp.evaluate._gaussian_blur(flat, 2.0), flat)


# -- tokens ------------------------------------------------------------------------------------------------------------
class BagOfTokens(nn.Module):
    """Sum of a per-id weight over the attended tokens; checks that every batch it sees is valid and records it."""

    def __init__(self, vocab: int = 50, pad_id: int = 0):
        super().__init__()
        self.w = nn.Embedding(vocab, 1)
        self.pad_id = pad_id
        self.seen: list[tuple[torch.Tensor, torch.Tensor]] = []

    def forward(self, input_ids, attention_mask):
        m = attention_mask.bool()
        # right-padded: the mask is 1...1 0...0, and padding holds the pad id
        assert (m[:, 1:] <= m[:, :-1]).all(), "attended token after padding"
        assert (input_ids[~m] == self.pad_id).all(), "padding with a non-pad id"
        self.seen.append((input_ids.clone(), attention_mask.clone()))
        return (self.w(input_ids)[..., 0] * m).sum(1, keepdim=True)


def _tokens(n=6, t=10, vocab=50):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, vocab, (n, t), generator=g)
    lengths = torch.tensor([10, 9, 7, 5, 3, 10])[:n]
    mask = (torch.arange(t)[None, :] < lengths[:, None]).long()
    return ids * mask, mask, lengths


def test_token_removal_keeps_sequences_valid():
    torch.manual_seed(0)
    model = BagOfTokens().eval()
    ids, mask, lengths = _tokens()
    contrib = model.w(ids)[..., 0].detach() * mask
    keep = torch.zeros_like(ids, dtype=torch.bool)
    keep[:, 0] = True  # a [CLS]-like first token that is never removed
    res = perturbation(model, {"input_ids": ids, "attention_mask": mask}, 0, contrib, steps=3, baseline="remove",
                       score="logit", keep=keep)
    removable = lengths - 1
    assert (res.removed[:, -1] == removable).all()
    for step, (seen_ids, seen_mask) in enumerate(model.seen[1:], 1):
        assert seen_ids.shape == (12, 10)  # MoRF and LeRF of all 6 samples in one batch
        kept = seen_mask.sum(1)
        assert (kept == (lengths - res.removed[:, step]).repeat(2)).all()
        assert (seen_ids[:, 0] == ids[:, 0].repeat(2)).all()  # the kept first token
    # MoRF of a bag of tokens: the logit minus the largest removable contributions
    c = contrib.masked_fill(~mask.bool() | keep, -torch.inf)  # padding and the kept token are never removed
    for step in range(4):
        k = res.removed[:, step]
        top = c.sort(1, descending=True).values
        drop = torch.stack([top[i, : int(k[i])].sum() for i in range(6)])
        torch.testing.assert_close(res.morf[:, step], (contrib.sum(1) - drop).detach())


def test_token_replacement_keeps_the_mask_and_padding():
    model = BagOfTokens(pad_id=0).eval()
    ids, mask, lengths = _tokens()
    res = perturbation(model, {"input_ids": ids, "attention_mask": mask}, 0, torch.randn(ids.shape), steps=2,
                       baseline=0, score="logit")
    last_ids, last_mask = model.seen[-1]
    assert (last_mask == mask.repeat(2, 1)).all() and (last_ids == 0).all()
    torch.testing.assert_close(res.morf[:, -1], (model.w.weight[0, 0] * lengths).detach())
    assert (res.removed[:, -1] == lengths).all()  # padding is never counted or perturbed


def test_token_removal_needs_a_mask():
    ids, _, _ = _tokens()
    with pytest.raises(ValueError, match="attention mask"):
        perturbation(nn.Embedding(50, 3).eval(), ids, 0, torch.randn(ids.shape), baseline="remove")


# -- errors and plots --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"baseline": "remove"}, "token inputs"),
        ({"baseline": "noise"}, "unknown baseline"),
        ({"relevance": torch.randn(2, 3)}, "does not match"),
        ({"target": 7}, "out of range"),
        ({"target": {"a": 1}}, "target must be an int"),
        ({"steps": 0}, "steps"),
        ({"score": "loss"}, "score"),
        ({"region": (2, 2)}, "region"),
    ],
)
def test_clear_errors(linear, kwargs, match):
    model, x, contrib = linear
    call = {"model": model, "x": x[:4], "target": 0, "relevance": contrib[:4], "baseline": "zero", **kwargs}
    with pytest.raises(ValueError, match=match):
        perturbation(**call)


def test_plot_draws_both_curves(linear):
    model, x, contrib = linear
    res = perturbation(model, x[:16], 0, contrib[:16], steps=4, baseline="zero", score="logit")
    fig = res.plot()
    ax = fig.axes[0]
    labels = [line.get_label() for line in ax.get_lines()]
    assert any(lb.startswith("MoRF") for lb in labels) and any(lb.startswith("LeRF") for lb in labels)
    assert f"{res.mean_abpc:.3f}" in ax.get_title()


# -- select_rules ------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cnn():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                          nn.Linear(4 * 16, 3)).eval()
    return model, torch.rand(24, 1, 8, 8)


def test_select_rules_ranks_and_hands_back_a_compilable_best(cnn):
    model, x = cnn
    before = copy.deepcopy(model.state_dict())
    ranking = dynlrp.select_rules(model, x, candidates=["lrp0", "gradient", "epsilon_plus"], steps=4)
    assert [r.mean for r in ranking] == sorted((r.mean for r in ranking), reverse=True)
    assert {r.name for r in ranking} == {"lrp0", "gradient", "epsilon_plus"}
    # piecewise-linear net: LRP-0 is gradient x input, so the two score the same
    assert ranking["lrp0"].mean == pytest.approx(ranking["gradient"].mean, abs=1e-5)
    # each row is perturbation() of that preset's explanation
    expl = dynlrp.compile(model, x[:2], rules="epsilon_plus", backend="eager")(x)
    direct = perturbation(model, x, expl.output.argmax(1), expl, steps=4)
    torch.testing.assert_close(ranking["epsilon_plus"].result.abpc, direct.abpc, atol=1e-5, rtol=1e-4)
    assert ranking["epsilon_plus"].se == pytest.approx(direct.se_abpc, rel=1e-3)
    # the best entry compiles as it is; the model is unchanged
    assert dynlrp.compile(model, x[:2], rules=ranking.best, backend="eager")(x).relevance.shape == x.shape
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()) and not model.training
    assert "| rank | rules | abpc |" in ranking.table() and ranking.best_name in str(ranking)
    assert len(ranking.plot().axes) == 2


def test_select_rules_metrics_and_batches(cnn):
    model, x = cnn
    by_morf = dynlrp.select_rules(model, x, candidates={"lrp0": "lrp0", "plus": dynlrp.presets.epsilon_plus()},
                                  metric="morf", steps=4, batch_size=7)
    assert [r.mean for r in by_morf] == sorted(r.mean for r in by_morf)  # smaller MoRF area first
    torch.testing.assert_close(torch.tensor(by_morf["lrp0"].mean), by_morf["lrp0"].result.morf_area.mean())
    with pytest.raises(ValueError, match="metric"):
        dynlrp.select_rules(model, x, metric="auc")
    with pytest.raises(ValueError, match="no_such"):
        dynlrp.select_rules(model, x, candidates=["no_such"])


class TinyText(nn.Module):
    """Embedding -> masked mean -> linear: linear in the embeddings for a fixed mask (LRP-0 == gradient x input)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb, self.out = nn.Embedding(50, 8), nn.Linear(8, 3)

    def forward(self, input_ids, attention_mask):
        m = attention_mask.unsqueeze(-1).to(self.emb.weight.dtype)
        return self.out((self.emb(input_ids) * m).sum(1) / m.sum(1).clamp_min(1))


def test_select_rules_on_tokens_with_removal():
    model = TinyText().eval()
    ids, mask, _ = _tokens()
    x = {"input_ids": ids, "attention_mask": mask}
    ranking = dynlrp.select_rules(model, x, candidates=["lrp0", "gradient"], steps=3, baseline="remove")
    assert ranking["lrp0"].mean == pytest.approx(ranking["gradient"].mean, abs=1e-5)
    expl = dynlrp.compile(model, example_kwargs=x, rules="lrp0", backend="eager")(**x)
    direct = perturbation(model, x, expl.output.argmax(1), expl, steps=3, baseline="remove")
    torch.testing.assert_close(ranking["lrp0"].result.morf, direct.morf)


def test_default_candidates_follow_the_model(cnn):
    model, x = cnn
    conv = default_candidates(model, x)
    assert {"epsilon", "lrp0", "gradient", "epsilon_gamma_box", "epsilon_plus_flat"} <= set(conv)
    assert "attnlrp" not in conv
    mlp = default_candidates(nn.Sequential(nn.Linear(4, 3)), torch.randn(2, 4))
    assert set(mlp) == {"epsilon", "lrp0", "gradient"}
    # the box of epsilon_gamma_box is the data's range, not ImageNet's
    box = conv["epsilon_gamma_box"].first_layer
    assert float(box.low) == pytest.approx(float(x.min())) and float(box.high) == pytest.approx(float(x.max()))


# -- CLI ---------------------------------------------------------------------------------------------------------------
def test_cli_evaluate_prints_the_table_and_writes_the_plot(capsys, tmp_path):
    x = tmp_path / "x.pt"
    torch.save(torch.randn(6, 3, 8, 8), x)
    plot = tmp_path / "out" / "curves.png"
    rc = main(["evaluate", "--model", "tests.helpers:small_cnn", "--input", str(x), "--rules", "lrp0,gradient",
               "--steps", "4", "--plot", str(plot)])
    out = capsys.readouterr().out
    assert rc == 0
    rows = [ln for ln in out.splitlines() if ln.startswith("| 1 ") or ln.startswith("| 2 ")]
    assert len(rows) == 2 and {"lrp0", "gradient"} == {r.split("|")[2].strip() for r in rows}
    assert plot.is_file() and plot.read_bytes()[:4] == b"\x89PNG"


def test_cli_evaluate_unknown_preset_is_one_line(capsys, tmp_path):
    x = tmp_path / "x.pt"
    torch.save(torch.randn(2, 3, 8, 8), x)
    rc = main(["evaluate", "--model", "tests.helpers:small_cnn", "--input", str(x), "--rules", "lrp0,no_such"])
    err = capsys.readouterr().err
    assert rc == 2 and len(err.splitlines()) == 1
    assert err.startswith("dynlrp evaluate: error: --rules: unknown preset 'no_such'") and "lrp0" in err


def test_grid_builds_one_candidate_per_combination(cnn):
    model, x = cnn
    cands = grid("epsilon_gamma_box", gamma=[0.1, 1.0], low=[0.0], high=[1.0, 2.0])
    assert list(cands) == [f"epsilon_gamma_box(gamma={g:g}, low=0, high={h:g})" for g in (0.1, 1.0) for h in (1.0, 2.0)]
    rule = cands["epsilon_gamma_box(gamma=1, low=0, high=2)"]
    assert float(rule.first_layer.high) == 2.0
    ranking = dynlrp.select_rules(model, x, candidates={**grid("epsilon", eps=[1e-6, 10.0])}, steps=2)
    assert {r.name for r in ranking} == {"epsilon(eps=1e-06)", "epsilon(eps=10)"}
    # a huge epsilon absorbs relevance but is a different attribution: the two rows differ
    assert ranking.rows[0].mean != ranking.rows[1].mean
    with pytest.raises(ValueError, match="no parameter 'gama'"):
        grid("epsilon_gamma_box", gama=[0.1])
