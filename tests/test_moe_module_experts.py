"""ModuleExperts: any expert nn.Module, grouped (fx) or generic (functional_call), equals a
plain loop calling one copy of the module per expert, forward and backward."""
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import hecate.moe.module_experts as module_experts
from hecate.moe.module_experts import ModuleExperts
from tests.ds_expert_cases import FORMS, distinct_weights, make_expert

D = 16


class ChunkRows(nn.Module):
    """chunk along dim 0 mixes rows: must not take the grouped path."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(D, D)

    def forward(self, x):
        a, b = self.fc(x).chunk(2, dim=0)
        return torch.cat([b, a])


class RawParam(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(D, D) / 4)

    def forward(self, x):
        return torch.tanh(x @ self.w)


def _loop(expert, full, x, counts):
    """The oracle: a fresh copy of the module per expert with that expert's weights."""
    outs, start = [], 0
    for e, c in enumerate(counts):
        m = make_copy(expert, {n: v[e] for n, v in full.items()})
        outs.append(m(x[start:start + c]))
        start += c
    return torch.cat(outs)


def make_copy(expert, params):
    import copy

    m = copy.deepcopy(expert)
    with torch.no_grad():
        for n, p in m.named_parameters():
            p.copy_(params[n.replace(".", "__")])
    return m


@pytest.mark.parametrize("form", FORMS + ["chunk_rows", "raw_param"])
@pytest.mark.parametrize("counts", [[3, 0, 5, 1], [0, 0, 0, 0], [0, 7, 0, 0]])
def test_matches_a_loop_of_module_copies(form, counts):
    expert = {"chunk_rows": ChunkRows, "raw_param": RawParam}.get(form, lambda: make_expert(form))()
    if form == "chunk_rows" and any(c % 2 for c in counts):
        counts = [c + c % 2 for c in counts]
    expert.eval()  # dropout off here (its own test below)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        me = ModuleExperts(expert, 4).eval()
    assert me.mode == ("generic" if form in ("generic_norm", "chunk_rows", "raw_param") else "grouped")
    full = distinct_weights(expert, 4)
    with torch.no_grad():
        for n, v in full.items():
            getattr(me, n).copy_(v)
    x = torch.randn(sum(counts), D, generator=torch.Generator().manual_seed(1), requires_grad=True)
    y = me(x, torch.tensor(counts))
    assert y.shape == x.shape
    dy = torch.randn_like(y)
    (y * dy).sum().backward()
    for n, p in me.named_parameters():
        assert p.grad is not None and p.grad.shape == p.shape, n
    if not sum(counts):
        assert all(float(p.grad.abs().sum()) == 0 for p in me.parameters())
        return
    ref_x = x.detach().clone().requires_grad_(True)
    copies = [make_copy(expert, {n: v[e] for n, v in full.items()}) for e in range(4)]
    outs, start = [], 0
    for e, c in enumerate(counts):
        outs.append(copies[e](ref_x[start:start + c]))
        start += c
    ref = torch.cat(outs)
    (ref * dy).sum().backward()
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x.grad, ref_x.grad, rtol=1e-5, atol=1e-6)
    for e, m in enumerate(copies):
        for n, p in m.named_parameters():
            got = getattr(me, n.replace(".", "__")).grad[e]
            want = p.grad if p.grad is not None else torch.zeros_like(p)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_dropout_inside_the_expert_follows_train_and_eval():
    expert = nn.Sequential(nn.Linear(D, 32), nn.GELU(), nn.Dropout(0.5), nn.Linear(32, D))
    me = ModuleExperts(expert, 3)
    x, counts = torch.randn(12, D), torch.tensor([4, 4, 4])
    me.eval()
    a, b = me(x, counts), me(x, counts)
    assert torch.equal(a, b)
    me.train()
    torch.manual_seed(0)
    c = me(x, counts)
    assert not torch.allclose(a, c)  # half the hidden units dropped (and the rest scaled by 2)


def test_refusals_and_one_time_warning(monkeypatch):
    with pytest.raises(ValueError, match="buffers"):
        ModuleExperts(nn.Sequential(nn.Linear(D, D), nn.BatchNorm1d(D)), 2)
    with pytest.raises(ValueError, match="no parameters"):
        ModuleExperts(nn.ReLU(), 2)
    monkeypatch.setattr(module_experts, "_WARNED", False)
    with pytest.warns(UserWarning, match="functional_call"):
        ModuleExperts(RawParam(), 2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ModuleExperts(RawParam(), 2)  # once per process


def test_template_parameters_stay_out_of_the_model():
    me = ModuleExperts(make_expert("swiglu"), 5)
    names = [n for n, _ in me.named_parameters()]
    assert names == ["gate__weight", "up__weight", "down__weight"]
    assert all(p.shape[0] == 5 for p in me.parameters())
    assert not list(me.children())


def test_drop_in_accepts_any_expert_with_deepspeed_defaults():
    from hecate.integrations.deepspeed import MoE

    moe = MoE(16, nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 16)), num_experts=4, k=1,
              use_rts=False, strategy="local")
    y, l_aux, counts = moe(torch.randn(2, 5, 16))
    assert y.shape == (2, 5, 16) and int(counts.sum()) == 10
    with pytest.raises(ValueError, match="hidden_size=16"):
        MoE(16, nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8)), num_experts=4, strategy="local")
    with pytest.raises(TypeError):
        MoE(16, lambda x: x, num_experts=4, strategy="local")
    assert F is not None


@pytest.mark.parametrize("form,residual", [("swiglu_bias", False), ("linear_bias_gelu", True), ("relu", True)])
def test_deepspeed_checkpoint_names_round_trip(form, residual):
    """DeepSpeed's names for a custom expert (deepspeed_experts.E.<module key>, mlp.<key>) <-> the
    drop-in's ModuleExperts names: the converted dict loads strictly and converts back unchanged."""
    from hecate.integrations.convert_deepspeed import deepspeed_to_hecate, hecate_to_deepspeed
    from hecate.integrations.deepspeed import MoE

    torch.manual_seed(0)
    expert = make_expert(form)
    moe = MoE(16, expert, num_experts=4, k=2, use_residual=residual, strategy="local")
    with torch.no_grad():
        for n, v in distinct_weights(expert, 4).items():
            getattr(moe.moe.experts, n).copy_(v)
    state = {f"layer.{k}": v for k, v in moe.state_dict().items()}
    ds = hecate_to_deepspeed(state)
    assert "layer.deepspeed_moe.experts.deepspeed_experts.3." + next(iter(dict(expert.named_parameters()))) in ds
    back = deepspeed_to_hecate(ds, layout="module")
    assert set(back) == set(state)
    for k, v in state.items():
        assert torch.equal(back[k], v), k
    fresh = MoE(16, make_expert(form), num_experts=4, k=2, use_residual=residual, strategy="local")
    fresh.load_state_dict({k[len("layer."):]: v for k, v in back.items()})  # strict
    if form != "relu":  # biases: "auto" sees more than two weight matrices and picks the module layout
        assert set(deepspeed_to_hecate(ds)) == set(state)
