"""Engine: the global gradient norm counts every parameter exactly once, under any strategy."""
import torch
from torch import nn

from hecate.models.transformer import MoETransformer
from hecate.parallel import build_strategy, parallelize
from hecate.train.engine import Engine
from tests.training_cases import batch, tiny_config


def test_grad_norm_under_local_counts_experts_once():
    torch.manual_seed(0)
    strategy = build_strategy("local")
    model = parallelize(MoETransformer(tiny_config()), strategy)
    engine = Engine(model, strategy, max_grad_norm=None)
    x, y = batch(0, 0, False)
    model.loss(x, y)[0].backward()
    want = torch.nn.utils.get_total_norm([p.grad for p in model.parameters() if p.grad is not None])
    assert abs(engine.grad_norm() - float(want)) < 1e-5 * float(want)


def test_clip_scales_to_max_norm():
    torch.manual_seed(0)
    strategy = build_strategy("local")
    model = parallelize(MoETransformer(tiny_config()), strategy)
    engine = Engine(model, strategy, max_grad_norm=0.01)
    x, y = batch(0, 0, False)
    model.loss(x, y)[0].backward()
    before = engine.clip()
    assert before > 0.01
    after = float(torch.nn.utils.get_total_norm([p.grad for p in model.parameters() if p.grad is not None]))
    assert abs(after - 0.01) < 1e-4


def _adamw_after_steps(impl, steps=4):
    from hecate.train.engine import build_adamw

    torch.manual_seed(0)
    # Odd sizes put elements in the vectorized body and in the scalar tail of the kernels.
    params = [nn.Parameter(torch.randn(3, 1037)), nn.Parameter(torch.randn(17))]
    opt = build_adamw(params, impl, lr=1e-2, weight_decay=0.1, betas=(0.9, 0.95), eps=1e-8)
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=g)
        opt.step()
    return opt, [p.detach().clone() for p in params]


def test_adamw_impls_agree_and_fused_is_the_default():
    single_opt, single = _adamw_after_steps("single")
    assert single_opt.defaults["foreach"] is False and not single_opt.defaults["fused"]
    for impl in ("fused", "foreach"):
        opt, got = _adamw_after_steps(impl)
        assert opt.defaults["fused" if impl == "fused" else "foreach"] is True
        for a, b in zip(got, single):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    strategy = build_strategy("local")
    model = parallelize(MoETransformer(tiny_config()), strategy)
    assert Engine(model, strategy).optimizer.defaults["fused"] is True


def test_adamw_impl_is_checked():
    import pytest

    from hecate.train.engine import build_adamw

    with pytest.raises(ValueError, match=r"optim\.impl='fast' must be one of"):
        build_adamw([nn.Parameter(torch.zeros(2))], "fast", lr=1e-3)
