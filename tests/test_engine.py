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
