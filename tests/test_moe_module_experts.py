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


class FunctionalLinear(nn.Module):
    """F.linear on its own parameters (what a bare nn.Linear traces to): the grouped path."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(2 * D, D) / 4)
        self.b = nn.Parameter(torch.randn(2 * D) / 4)
        self.out = nn.Parameter(torch.randn(D, 2 * D) / 4)

    def forward(self, x):
        return F.linear(F.gelu(F.linear(x, self.w, bias=self.b)), self.out)


class ScaledWeight(nn.Module):
    """F.linear with a computed weight: not a plain Linear, must stay generic."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(D, D) / 4)

    def forward(self, x):
        return F.linear(x, self.w * 2)


OWN_FORMS = {"chunk_rows": ChunkRows, "raw_param": RawParam, "bare_linear": lambda: nn.Linear(D, D),
             "bare_linear_no_bias": lambda: nn.Linear(D, D, bias=False), "functional_linear": FunctionalLinear,
             "scaled_weight": ScaledWeight}
GENERIC = ("generic_norm", "chunk_rows", "raw_param", "scaled_weight")


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


@pytest.mark.parametrize("form", FORMS + list(OWN_FORMS))
@pytest.mark.parametrize("counts", [[3, 0, 5, 1], [0, 0, 0, 0], [0, 7, 0, 0]])
def test_matches_a_loop_of_module_copies(form, counts):
    expert = OWN_FORMS.get(form, lambda: make_expert(form))()
    if form == "chunk_rows" and any(c % 2 for c in counts):
        counts = [c + c % 2 for c in counts]
    expert.eval()  # dropout off here (its own test below)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        me = ModuleExperts(expert, 4).eval()
    assert me.mode == ("generic" if form in GENERIC else "grouped")
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


@pytest.mark.parametrize("bias", [True, False])
def test_bare_linear_experts_take_the_grouped_path_and_equal_the_per_expert_path(bias):
    """A bare nn.Linear expert: its stacked weights go through grouped_linear (one grouped GEMM,
    the bias added per row block), with the values and gradients of functional_call per expert."""
    calls = []
    real = module_experts.grouped_linear

    def spy(x, counts, w, b=None):
        calls.append((tuple(w.shape), None if b is None else tuple(b.shape)))
        return real(x, counts, w, b)

    grouped = ModuleExperts(nn.Linear(D, 2 * D, bias=bias), 4)
    assert grouped.mode == "grouped"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        per_expert = ModuleExperts(nn.Linear(D, 2 * D, bias=bias), 4)
    per_expert.__dict__["graph"], per_expert.mode = None, "generic"  # functional_call per expert
    with torch.no_grad():
        for n, v in distinct_weights(nn.Linear(D, 2 * D, bias=bias), 4).items():
            getattr(grouped, n).copy_(v)
            getattr(per_expert, n).copy_(v)
    counts = torch.tensor([5, 0, 2, 6])
    x = torch.randn(13, D, generator=torch.Generator().manual_seed(3))
    dy = torch.randn(13, 2 * D, generator=torch.Generator().manual_seed(4))
    xs = [x.clone().requires_grad_(True) for _ in range(2)]
    mp = pytest.MonkeyPatch()
    mp.setattr(module_experts, "grouped_linear", spy)
    try:
        y = grouped(xs[0], counts)
    finally:
        mp.undo()
    assert calls == [((4, 2 * D, D), (4, 2 * D) if bias else None)]  # one grouped call, all experts
    ref = per_expert(xs[1], counts)
    (y * dy).sum().backward()
    (ref * dy).sum().backward()
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(xs[0].grad, xs[1].grad, rtol=1e-5, atol=1e-6)
    for n, p in grouped.named_parameters():
        torch.testing.assert_close(p.grad, getattr(per_expert, n).grad, rtol=1e-5, atol=1e-6)
    assert float(grouped.weight.grad[1].abs().sum()) == 0  # expert 1 got no rows


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
