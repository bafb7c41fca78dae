"""MoHD (hecate.models.mohd): a token uses exactly its shared + selected sub-dimensions, the
activation scaling keeps the activation norm, all-active MoHD is the dense FFN, config errors name
the key, and tiny-mohd trains under dp, ep, fsdp and fssdp at W = 2 like one process."""
import pytest
import torch

from hecate.models.mohd import MoHDFFN
from hecate.models.registry import build_model, count_parameters, get_preset, make_config
from hecate.models.transformer import DenseMLP, TransformerConfig
from hecate.testing import run_distributed
from tests.zoo_cases import train_case


def _ffn(**kw):
    torch.manual_seed(0)
    args = dict(d_model=16, d_ffn=24, sub_dims=6, shared=2, top_k=2, activation="swiglu")
    args.update(kw)
    return MoHDFFN(**args)


def _active_groups(ffn, x_D):
    m, _ = ffn.gates(x_D[None])
    return set(torch.nonzero(m[0]).flatten().tolist())


@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
def test_token_uses_exactly_its_shared_and_selected_sub_dimensions(activation):
    ffn = _ffn(activation=activation)
    with torch.no_grad():  # a non-identity fusion, so the test also covers it
        ffn.fusion_NWW.add_(0.3 * torch.randn_like(ffn.fusion_NWW))
    x = torch.randn(12, 16)
    seen = set()
    for t in range(12):
        active = _active_groups(ffn, x[t])
        assert len(active) == 2 + 2 and {0, 1} <= active  # shared 0, 1 always; 2 routed
        seen |= active
        ffn.zero_grad()
        y, _ = ffn(x[t:t + 1])
        y.square().sum().backward()
        w = ffn.width
        for name, grad, axis in (("fc1", ffn.fc1.weight.grad, 0), ("fc2", ffn.fc2.weight.grad, 1),
                                 ("fc3", None if ffn.fc3 is None else ffn.fc3.weight.grad, 0)):
            if grad is None:
                continue
            used = {g for g in range(6) if grad.narrow(axis, g * w, w).abs().sum() > 0}
            assert used == active, f"token {t}: {name} touched groups {used}, active {active}"
        fused = {g for g in range(6) if ffn.fusion_NWW.grad[g].abs().sum() > 0}
        assert fused == active
        # The output does not move when an inactive group's weights change.
        inactive = sorted(set(range(6)) - active)
        with torch.no_grad():
            saved = ffn.fc1.weight.clone()
            for g in inactive:
                ffn.fc1.weight[g * w:(g + 1) * w] += 5.0
            torch.testing.assert_close(ffn(x[t:t + 1])[0], y, rtol=0, atol=0)
            ffn.fc1.weight.copy_(saved)
    assert len(seen - {0, 1}) >= 2  # different tokens pick different routed groups


def test_activation_scaling_keeps_the_activation_norm():
    ffn = _ffn(sub_dims=8, shared=1, top_k=1, d_ffn=64)  # 2 of 8 groups: scale sqrt(4) = 2
    with torch.no_grad():
        ffn.router.weight.zero_()  # uniform router: every active gate is 1
    assert ffn.scale == pytest.approx(2.0)
    x = torch.randn(500, 16)
    m, _ = ffn.gates(x)
    assert torch.all(m.sum(-1) == 2)
    # Every group carries the same energy: exactly the dense norm.
    signs = torch.randint(0, 2, (500, 64)).float() * 2 - 1
    z = ffn.sparse(signs, m)
    torch.testing.assert_close(z.norm(dim=-1), signs.norm(dim=-1))
    # I.i.d. units: the norm is kept in expectation (and without the scaling it would halve).
    a = torch.randn(500, 64)
    ratio = (ffn.sparse(a, m).square().sum(-1) / a.square().sum(-1)).mean()
    assert abs(float(ratio.detach()) - 1.0) < 0.06


def test_all_sub_dimensions_active_is_the_dense_ffn():
    ffn = _ffn(shared=2, top_k=4)  # 2 + 4 = all 6 groups: scale 1
    with torch.no_grad():
        ffn.router.weight.zero_()
    dense = DenseMLP(16, 24, "swiglu")
    dense.load_state_dict({k: v for k, v in ffn.state_dict().items() if k.startswith(("fc1", "fc2", "fc3"))})
    x = torch.randn(5, 16)
    torch.testing.assert_close(ffn(x)[0], dense(x))


def test_balance_loss_and_active_count():
    ffn = _ffn()
    _, loss = ffn(torch.randn(32, 16))
    assert loss > 0
    ffn.eval()
    assert ffn(torch.randn(4, 16))[1] == 0
    # 2 skipped groups of 4 units: W1, W3 columns (4*16 each), W2 rows (16*4), fusion 4*4
    assert ffn.inactive_parameters() == 2 * (3 * 4 * 16 + 16)
    p = get_preset("tiny-mohd")
    c = count_parameters(build_model(p.arch, p.config, "meta"))
    experts = 4 * 2 * 48 * 32
    assert c["total_params"] - c["active_params"] == (3 * 12 * 32 + 144) + experts // 2


@pytest.mark.parametrize("kw,match", [
    (dict(mohd_sub_dims=5), "divisible by model.mohd_sub_dims"),
    (dict(mohd_sub_dims=4, mohd_shared=4), "mohd_shared"),
    (dict(mohd_sub_dims=4, mohd_shared=1, mohd_top_k=4), "mohd_top_k"),
    (dict(mohd_sub_dims=1), "mohd_sub_dims must be >= 2"),
    (dict(mohd_sub_dims=4, mohd_balance_coeff=-1.0), "mohd_balance_coeff"),
])
def test_config_errors_name_the_key(kw, match):
    p = get_preset("tiny-mohd")
    cfg = make_config(p.arch, {**p.config, **kw})
    with pytest.raises(ValueError, match=match):
        cfg.validate()


def test_off_by_default():
    assert TransformerConfig().mohd_sub_dims == 0


@pytest.mark.parametrize("strategy", ["dp", "ep", "fsdp", "fssdp"])
def test_tiny_mohd_trains_like_single_process(strategy):
    results = run_distributed(train_case, 2, "tiny-mohd", strategy, 4)
    for r in results:
        losses, ref = torch.tensor(r["losses"]), torch.tensor(r["ref_losses"])
        assert losses[2:].mean() < losses[:2].mean() - 0.3, f"loss did not fall: {losses.tolist()}"
        torch.testing.assert_close(losses, ref, rtol=0, atol=2e-3)
        dense, ref_dense = r["dense"]
        assert any(".ffn.fusion_NWW" in n for n in dense) and set(dense) == set(ref_dense)
        for n in dense:
            torch.testing.assert_close(dense[n], ref_dense[n], rtol=1e-3, atol=3e-4, msg=lambda m: f"{n}: {m}")
        for got, want in zip(*r["experts"]):
            for n in want:
                torch.testing.assert_close(got[n], want[n], rtol=1e-3, atol=3e-4)


def test_yaml_config_is_the_tiny_preset():
    from pathlib import Path

    from hecate.train.config import load_config

    cfg = load_config(str(Path(__file__).resolve().parents[1] / "configs" / "models" / "tiny-mohd.yaml"),
                      world_size=2)
    p = get_preset("tiny-mohd")
    assert cfg.model == make_config(p.arch, p.config)
