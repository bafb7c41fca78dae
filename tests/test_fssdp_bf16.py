"""fssdp under bf16 autocast: master rows stay fp32, chunks travel fp32, experts compute in bf16,
and the result tracks an fp32 single-process run closely."""
import copy

import torch

from hecate.comm.topology import Topology
from hecate.models.transformer import MoETransformer
from hecate.parallel import build_strategy, parallelize
from hecate.testing import run_distributed
from tests.training_cases import batch, tiny_config


def bf16_case(rank, world):
    torch.manual_seed(0)
    base = MoETransformer(tiny_config())
    strat = build_strategy("fssdp", Topology(), overlap_degree=2, fit_replicas=False)
    model = parallelize(copy.deepcopy(base), strat)
    x, y = batch(0, rank, False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _ = model.loss(x, y)
    loss.backward()
    strat.finish_backward(model.moe_layers())
    ref_loss, _ = base.loss(x, y)
    grads = [layer.expert_chunks.grad for layer in model.moe_layers()]
    return (float(loss), float(ref_loss), [str(layer.expert_chunks.dtype) for layer in model.moe_layers()],
            [str(g.dtype) for g in grads], all(bool(torch.isfinite(g).all()) for g in grads))


def test_fssdp_bf16_autocast():
    for loss, ref_loss, dtypes, grad_dtypes, finite in run_distributed(bf16_case, 2):
        assert dtypes == ["torch.float32"] * 2 and grad_dtypes == ["torch.float32"] * 2 and finite
        assert abs(loss - ref_loss) < 0.05 * abs(ref_loss)
