"""fssdp memory and bytes on the GPU path, checked on CPU (gloo, W = 2):

- under autocast the tokens travel in the autocast dtype: half the dispatch / combine bytes
  of fp32, and the same numbers;
- with gradient accumulation, the pending gradient reduces of one micro-batch are completed
  when its backward pass ends instead of all living until the optimizer step;
- with re-materialization, the backward re-gather lands in the replicas' re-grown storage
  (no second [R, S] buffer alive beside it).
"""
import pytest
import torch

from hecate.comm.topology import Topology
from hecate.moe.config import MoEConfig
from hecate.moe.layer import MoELayer
from hecate.parallel import build_strategy, parallelize
from hecate.testing import run_distributed

HIDDEN, FFN, EXPERTS = 16, 32, 8
TOKEN_EXCHANGES = ("fssdp.dispatch", "fssdp.combine", "fssdp.combine.backward", "fssdp.dispatch.backward")


def _layer(topo, **options):
    cfg = MoEConfig(hidden_size=HIDDEN, ffn_hidden_size=FFN, num_experts=EXPERTS, top_k=2)
    return parallelize(MoELayer(cfg), build_strategy("fssdp", topo, overlap_degree=3, fit_replicas=False,
                                                     **options))


def token_bytes_case(rank, world, autocast):
    torch.manual_seed(0)
    topo = Topology()
    layer = _layer(topo)
    x = torch.randn(24, HIDDEN, generator=torch.Generator().manual_seed(rank)).requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = layer(x)
    (out.y.float() * torch.linspace(-1, 1, HIDDEN)).sum().backward()
    layer.strategy.finish_backward([layer])
    sent = {n: topo.stats.sent(n) for n in TOKEN_EXCHANGES}
    return sent, out.y.detach().float(), x.grad


def test_autocast_tokens_travel_in_bf16_half_the_bytes():
    fp32 = run_distributed(token_bytes_case, 2, False)
    bf16 = run_distributed(token_bytes_case, 2, True)
    assert sum(sum(r[0].values()) for r in fp32) > 0
    for (sent32, y32, g32), (sent16, y16, g16) in zip(fp32, bf16):
        for name in TOKEN_EXCHANGES:
            assert sent16[name] * 2 == sent32[name], (name, sent16[name], sent32[name])
        # bf16 experts: close to fp32, not equal (the point is the bytes, not the rounding)
        assert torch.allclose(y16, y32, atol=5e-2, rtol=5e-2)
        assert torch.allclose(g16, g32, atol=5e-2, rtol=5e-2)


def grad_accum_case(rank, world, overlap_reduce, micro_batches):
    from hecate.models.transformer import MoETransformer
    from tests.training_cases import batch, tiny_config

    torch.manual_seed(0)
    strat = build_strategy("fssdp", Topology(), overlap_degree=2, fit_replicas=False,
                           overlap_reduce=overlap_reduce)
    model = parallelize(MoETransformer(tiny_config()), strat)
    layers = model.moe_layers()
    alive = []
    for micro in range(micro_batches):
        loss, _ = model.loss(*batch(micro, rank, True))
        (loss / micro_batches).backward()
        alive.append(len(strat._pending))  # reduces in flight after this micro-batch's backward
    strat.finish_backward(layers)
    return alive, [layer.expert_chunks.grad.clone() for layer in layers], len(layers)


def test_grad_accumulation_drains_reduces_at_the_next_forward():
    overlapped = run_distributed(grad_accum_case, 2, True, 4)
    blocking = run_distributed(grad_accum_case, 2, False, 4)
    for (alive, grads, num_layers), (alive_b, want, _) in zip(overlapped, blocking):
        # each backward pass completes its own reduces when it ends (overlap.ReduceQueue)
        assert alive == [0, 0, 0, 0], alive
        assert alive_b == [0, 0, 0, 0]
        for g, w in zip(grads, want):
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-7)


def regather_case(rank, world, prefetch):
    from hecate.models.transformer import MoETransformer
    from hecate.parallel.fssdp import overlap
    from tests.training_cases import batch, tiny_config

    torch.manual_seed(0)
    strat = build_strategy("fssdp", Topology(), overlap_degree=2, fit_replicas=False, prefetch=prefetch)
    model = parallelize(MoETransformer(tiny_config()), strat)
    calls, real = [], overlap.start_replica_gather

    def spy(owned_OS, plan, group, async_op=False, wire_dtype=None, out=None):
        pending = real(owned_OS, plan, group, async_op=async_op, wire_dtype=wire_dtype, out=out)
        calls.append(out)
        return pending

    overlap.start_replica_gather = spy
    try:
        loss, _ = model.loss(*batch(0, rank, True))
        forward_calls = len(calls)
        loss.backward()
    finally:
        overlap.start_replica_gather = real
    strat.finish_backward(model.moe_layers())
    backward = calls[forward_calls:]
    return forward_calls, [out is not None for out in backward], [out is None for out in calls[:forward_calls]]


@pytest.mark.parametrize("prefetch", [True, False])
def test_rematerialized_replicas_are_regathered_into_their_own_storage(prefetch):
    for forward_calls, backward_into_storage, forward_fresh in run_distributed(regather_case, 2, prefetch):
        assert forward_calls > 0 and all(forward_fresh)
        # every re-gather of the backward receives into the replicas' re-grown storage
        assert backward_into_storage and all(backward_into_storage)
