"""Each router's documented behaviour: selection, ties, weights, noise, bias, fp32 math."""
import pytest
import torch

from hecate.moe import MoEConfig, build_router
from hecate.moe.routers import (ExpertChoiceRouter, GroupLimitedRouter, NoisyTopKRouter, SwitchRouter,
                                TopKRouter)


def cfg(**kw):
    base = dict(hidden_size=4, ffn_hidden_size=8, num_experts=4, top_k=2)
    base.update(kw)
    return MoEConfig(**base).validate()


def with_logits(router, logits_TE):
    """Make router.logits(x) return exactly logits_TE for x = identity rows."""
    t, e = logits_TE.shape
    router.config = router.config.replace(hidden_size=t)
    router.weight_ED = torch.nn.Parameter(logits_TE.t().clone().float())
    return torch.eye(t)


def test_topk_ties_go_to_lower_expert_and_renormalize():
    r = TopKRouter(cfg())
    x = with_logits(r, torch.tensor([[1.0, 3.0, 3.0, 3.0], [0.0, 0.0, 0.0, 0.0]]))
    out = r(x)
    assert out.indices_TK.tolist() == [[1, 2], [0, 1]]
    assert torch.allclose(out.weights_TK, torch.full((2, 2), 0.5))
    assert out.tokens_per_expert_E.tolist() == [1, 2, 1, 0]
    assert out.indices_TK.dtype == torch.int64 and out.weights_TK.dtype == torch.float32


def test_topk_without_renormalize_gives_raw_softmax_probs():
    r = TopKRouter(cfg(renormalize=False))
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    out = r(with_logits(r, logits))
    probs = torch.softmax(logits, -1)
    assert out.indices_TK.tolist() == [[0, 1]]
    assert torch.allclose(out.weights_TK, probs[:, :2])
    assert torch.allclose(out.scores_TE, probs)


def test_topk_sigmoid_scores_and_override_k():
    r = TopKRouter(cfg(score_func="sigmoid", renormalize=False))
    logits = torch.tensor([[0.5, -1.0, 2.0, 0.0]])
    out = r(with_logits(r, logits), top_k=3)
    assert out.indices_TK.tolist() == [[2, 0, 3]]
    assert torch.allclose(out.weights_TK, torch.sigmoid(logits)[:, [2, 0, 3]])


def test_bias_steers_selection_only_and_update_moves_toward_underloaded():
    r = TopKRouter(cfg(top_k=1, aux_free_bias=True, bias_update_rate=0.5))
    logits = torch.tensor([[1.0, 0.9, 0.0, 0.0]])
    x = with_logits(r, logits)
    assert r(x).indices_TK.tolist() == [[0]]
    r.update_bias(torch.tensor([10, 0, 3, 7]))  # mean 5: expert 0 overloaded, 1 underloaded
    assert r.expert_bias_E.tolist() == [-0.5, 0.5, 0.5, -0.5]
    out = r(x)
    assert out.indices_TK.tolist() == [[1]]
    # the weight is the unbiased score (renormalized over k=1 -> 1), scores stay unbiased
    assert torch.allclose(out.scores_TE, torch.softmax(logits, -1))
    with pytest.raises(ValueError, match="tokens_per_expert_E"):
        r.update_bias(torch.zeros(3))


def test_bias_is_ignored_without_aux_free_flag():
    r = TopKRouter(cfg(top_k=1))
    r.expert_bias_E.fill_(100.0)
    r.expert_bias_E[3] = 200.0
    x = with_logits(r, torch.tensor([[1.0, 0.0, 0.0, 0.0]]))
    assert r(x).indices_TK.tolist() == [[0]]


def test_switch_is_top1_unrenormalized_with_training_only_jitter():
    r = SwitchRouter(cfg(router="switch", top_k=1, jitter_eps=0.5))
    torch.manual_seed(0)
    x = torch.randn(16, 4)
    r.eval()
    a, b = r(x), r(x)
    assert torch.equal(a.logits_TE, b.logits_TE)
    assert a.indices_TK.shape == (16, 1)
    assert torch.allclose(a.weights_TK, a.scores_TE.max(dim=-1, keepdim=True).values)
    assert (a.weights_TK < 1).all()  # not renormalized
    r.train()
    assert not torch.equal(r(x).logits_TE, a.logits_TE)
    with pytest.raises(ValueError, match="top_k"):
        r(x, top_k=2)


def test_noisy_topk_noise_only_in_training_and_std_is_learned():
    r = NoisyTopKRouter(cfg(router="noisy_topk"))
    x = torch.randn(32, 4)
    r.eval()
    assert torch.equal(r(x).logits_TE, r.logits(x))
    r.train()
    torch.manual_seed(1)
    out = r(x)
    assert not torch.equal(out.logits_TE, r.logits(x))
    (out.weights_TK.sum() + out.scores_TE[:, 0].sum()).backward()
    assert r.noise_weight_ED.grad is not None and r.noise_weight_ED.grad.abs().sum() > 0


def test_expert_choice_capacity_per_expert_and_representation():
    r = ExpertChoiceRouter(cfg(router="expert_choice", top_k=1, capacity_factor=1.0, min_capacity=0))
    torch.manual_seed(0)
    x = torch.randn(8, 4)
    out = r(x)
    # capacity per expert = ceil(1.0 * 8 * 1 / 4) = 2
    assert out.indices_TK.shape == (8, 4)
    assert out.tokens_per_expert_E.tolist() == [2, 2, 2, 2]
    for e in range(4):
        col = out.indices_TK[:, e]
        assert set(col.tolist()) <= {e, -1}
        chosen = (col == e).nonzero().flatten()
        expected = torch.sort(out.scores_TE[:, e], descending=True, stable=True).indices[:2]
        assert sorted(chosen.tolist()) == sorted(expected.tolist())
    assert torch.equal(out.weights_TK == 0, out.indices_TK < 0)
    # a per-call capacity factor and group sizes: capacity = ceil(2 * 4 / 4) = 2 per group
    grouped = r(x, capacity_factor=2.0, group_sizes=[4, 4])
    assert grouped.tokens_per_expert_E.tolist() == [4, 4, 4, 4]
    assert torch.equal(grouped.indices_TK[:4], r(x[:4], capacity_factor=2.0).indices_TK)


def test_expert_choice_ties_prefer_lower_token():
    r = ExpertChoiceRouter(cfg(router="expert_choice", top_k=1, capacity_factor=1.0, min_capacity=0))
    x = with_logits(r, torch.zeros(8, 4))
    out = r(x)
    assert ((out.indices_TK >= 0).nonzero()[:, 0]).unique().tolist() == [0, 1]


@pytest.mark.parametrize("group_score", ["max", "top2_sum"])
def test_group_limited_never_leaves_chosen_groups(group_score):
    c = cfg(router="group_limited", num_experts=8, top_k=3, num_groups=4, topk_groups=2,
            group_score=group_score, hidden_size=6, score_func="sigmoid")
    r = GroupLimitedRouter(c)
    torch.manual_seed(3)
    x = torch.randn(64, 6)
    out = r(x)
    s = out.scores_TE.view(64, 4, 2)
    gs = s.max(-1).values if group_score == "max" else s.sum(-1)
    chosen_groups = torch.sort(gs, dim=-1, descending=True, stable=True).indices[:, :2]
    for t in range(64):
        groups = set((out.indices_TK[t] // 2).tolist())
        assert groups <= set(chosen_groups[t].tolist())
        # within the allowed experts it is plain top-k
        allowed = [e for e in range(8) if e // 2 in set(chosen_groups[t].tolist())]
        best = sorted(allowed, key=lambda e: (-out.scores_TE[t, e].item(), e))[:3]
        assert out.indices_TK[t].tolist() == best
    assert torch.allclose(out.weights_TK.sum(-1), torch.ones(64))


def test_group_limited_differs_from_plain_topk_when_groups_bind():
    c = cfg(router="group_limited", num_experts=4, top_k=2, num_groups=2, topk_groups=1)
    r = GroupLimitedRouter(c)
    # best two experts live in different groups; group 0 (max 3.0) wins, so 0 and 1 are picked
    x = with_logits(r, torch.tensor([[3.0, 0.0, 2.9, 2.8]]))
    assert r(x).indices_TK.tolist() == [[0, 1]]


def test_router_math_is_fp32_under_bf16_autocast():
    r = TopKRouter(cfg(hidden_size=8))
    x = torch.randn(5, 8, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = r(x)
    for t in (out.logits_TE, out.scores_TE, out.weights_TK):
        assert t.dtype == torch.float32


def test_router_weights_carry_grad():
    r = build_router(cfg(router="topk"))
    out = r(torch.randn(6, 4))
    out.weights_TK.sum().backward()
    assert r.weight_ED.grad is not None


def test_build_router_unknown_kind():
    c = cfg()
    c.router = "bogus"
    with pytest.raises(ValueError, match="router"):
        build_router(c)


def _plain_topk(logits_TE, k, score_func, renormalize, bias_E):
    """The router's math in plain PyTorch (the oracle of the fused gating kernel's path)."""
    scores_TE = torch.softmax(logits_TE, -1) if score_func == "softmax" else torch.sigmoid(logits_TE)
    select_TE = scores_TE.detach() + (0 if bias_E is None else bias_E)
    indices_TK = torch.sort(select_TE, dim=-1, descending=True, stable=True).indices[:, :k]
    weights_TK = scores_TE.gather(1, indices_TK)
    if renormalize:
        weights_TK = weights_TK / weights_TK.sum(-1, keepdim=True)
    return weights_TK, indices_TK, scores_TE


@pytest.mark.parametrize("score_func", ["softmax", "sigmoid"])
@pytest.mark.parametrize("renormalize", [True, False])
@pytest.mark.parametrize("biased", [False, True])
def test_topk_router_uses_the_gating_kernels_outputs_and_gradients(monkeypatch, score_func, renormalize,
                                                                    biased):
    import hecate.moe.routers as routers

    calls = []
    kernel = routers.ops.topk_gating

    def spy(*args, **kwargs):
        out = kernel(*args, **kwargs)
        calls.append(out)
        return out

    monkeypatch.setattr(routers.ops, "topk_gating", spy)
    torch.manual_seed(0)
    r = TopKRouter(cfg(hidden_size=8, num_experts=6, top_k=2, score_func=score_func,
                       renormalize=renormalize, aux_free_bias=biased))
    if biased:
        r.expert_bias_E.copy_(torch.randn(6) * 0.1)
    x = torch.randn(40, 8)
    out = r(x)
    # The routing IS the kernel's output (weights, indices, scores), not a recomputation.
    assert len(calls) == 1
    weights, indices, scores = calls[0]
    assert out.weights_TK is weights and out.indices_TK is indices and out.scores_TE is scores
    g_w, g_s = torch.randn_like(out.weights_TK), torch.randn_like(out.scores_TE)
    ((out.weights_TK * g_w).sum() + (out.scores_TE * g_s).sum()).backward()

    w_ED = r.weight_ED.detach().clone().requires_grad_(True)
    want_w, want_i, want_s = _plain_topk(x @ w_ED.T, 2, score_func, renormalize,
                                         r.expert_bias_E if biased else None)
    ((want_w * g_w).sum() + (want_s * g_s).sum()).backward()
    assert torch.equal(out.indices_TK, want_i)
    torch.testing.assert_close(out.weights_TK, want_w)
    torch.testing.assert_close(out.scores_TE, want_s)
    torch.testing.assert_close(r.weight_ED.grad, w_ED.grad, rtol=1e-5, atol=1e-6)
