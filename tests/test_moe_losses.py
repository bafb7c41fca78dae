"""Balancing losses: constructed values, formulas, and the gradient-accumulation rule."""
import math

import pytest
import torch

from hecate.moe import MoEConfig, MoELayer, losses


def test_switch_aux_loss_uniform_is_one_and_collapse_is_E():
    t, e = 8, 4
    probs = torch.full((t, e), 1 / e)
    idx = torch.arange(t).remainder(e).unsqueeze(1)
    assert losses.switch_aux_loss(probs, idx).item() == pytest.approx(1.0)
    onehot = torch.zeros(t, e)
    onehot[:, 2] = 1
    assert losses.switch_aux_loss(onehot, torch.full((t, 1), 2)).item() == pytest.approx(e)


def test_layer_aux_loss_on_uniform_routing_equals_coefficient():
    c = MoEConfig(hidden_size=4, ffn_hidden_size=4, num_experts=4, top_k=1, aux_loss_coeff=0.25,
                  renormalize=False)
    layer = MoELayer(c)
    with torch.no_grad():
        layer.router.weight_ED.zero_()  # uniform probs; ties put every token on expert 0
    out = layer(torch.randn(6, 4))
    # f = [1, 0, 0, 0], P = 1/4 each: 4 * (1 * 1/4) = 1
    assert out.aux_losses["aux_loss"].item() == pytest.approx(0.25)
    assert out.aux_loss.item() == pytest.approx(0.25)


def test_z_loss_constructed():
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]])
    # logsumexp: log 2 and log 4
    expect = (math.log(2) ** 2 + math.log(4) ** 2) / 2
    assert losses.z_loss(logits).item() == pytest.approx(expect, rel=1e-6)


def test_expert_and_device_balance_formulas():
    probs = torch.tensor([[0.7, 0.1, 0.1, 0.1], [0.1, 0.7, 0.1, 0.1], [0.4, 0.4, 0.1, 0.1]])
    idx = torch.tensor([[0, 1], [1, 0], [0, 1]])
    f_prime = torch.tensor([3, 3, 0, 0]) * 4 / (2 * 3)
    p = probs.mean(0)
    assert losses.expert_balance_loss(probs, idx).item() == pytest.approx(float((f_prime * p).sum()))
    # 2 devices: f'' = mean over {0,1} and {2,3}; P'' = sums
    f_dev = torch.tensor([f_prime[:2].mean(), f_prime[2:].mean()])
    p_dev = torch.tensor([p[:2].sum(), p[2:].sum()])
    got = losses.device_balance_loss(probs, idx, 2).item()
    assert got == pytest.approx(float((f_dev * p_dev).sum()))
    with pytest.raises(ValueError, match="num_devices"):
        losses.device_balance_loss(probs, idx, 3)


def test_seq_aux_loss_is_mean_of_per_sequence_losses():
    torch.manual_seed(0)
    probs = torch.softmax(torch.randn(6, 4), -1)
    idx = torch.randint(0, 4, (6, 2))
    per_seq = [losses.expert_balance_loss(probs[s:s + 3], idx[s:s + 3]) for s in (0, 3)]
    got = losses.seq_aux_loss(probs, idx, 3)
    assert got.item() == pytest.approx(float(sum(per_seq) / 2), rel=1e-6)
    with pytest.raises(ValueError, match="seq_len"):
        losses.seq_aux_loss(probs, idx, 4)


def test_dropped_slots_are_ignored_and_empty_is_zero_with_grad():
    probs = torch.full((2, 2), 0.5, requires_grad=True)
    idx = torch.tensor([[0, -1], [1, -1]])
    assert losses.switch_aux_loss(probs, idx).item() == pytest.approx(0.5)  # f=[1/4,1/4]
    empty = losses.switch_aux_loss(torch.zeros(0, 3, requires_grad=True), torch.zeros(0, 2, dtype=torch.long))
    assert empty.item() == 0.0 and empty.requires_grad
    assert losses.z_loss(torch.zeros(0, 3)).item() == 0.0


def test_sigmoid_probs_are_normalized_per_token():
    s = torch.tensor([[0.5, 0.5, 1.0]])
    assert torch.allclose(losses.normalized_probs(s, "sigmoid"), torch.tensor([[0.25, 0.25, 0.5]]))
    assert torch.equal(losses.normalized_probs(s, "softmax"), s)


def _aux_layer():
    c = MoEConfig(hidden_size=8, ffn_hidden_size=8, num_experts=4, top_k=2, aux_loss_coeff=0.1,
                  z_loss_coeff=0.01, seq_aux_loss_coeff=0.05, expert_balance_coeff=0.03,
                  device_balance_coeff=0.02, num_devices=2)
    torch.manual_seed(0)
    return MoELayer(c)


def test_gradient_accumulation_equals_one_batch_with_group_sizes():
    """Rule: two equal micro-batches with loss/2 each == one batch with group_sizes=[T/2, T/2]."""
    layer = _aux_layer()
    torch.manual_seed(1)
    x = torch.randn(2, 6, 8)  # 2 sequences of 6 tokens: each micro-batch is one sequence
    layer.zero_grad()
    for m in range(2):
        (layer(x[m:m + 1]).aux_loss / 2).backward()
    accumulated = layer.router.weight_ED.grad.clone()
    layer.zero_grad()
    layer(x, group_sizes=[6, 6]).aux_loss.backward()
    assert torch.allclose(layer.router.weight_ED.grad, accumulated, atol=1e-7)
    # ...while one group over the whole batch is a different (non-linear) function
    layer.zero_grad()
    layer(x).aux_loss.backward()
    assert not torch.allclose(layer.router.weight_ED.grad, accumulated, atol=1e-7)
