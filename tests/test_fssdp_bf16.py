"""fssdp under bf16 autocast: master rows and their gradients stay fp32, experts compute in
bf16, replicas and their gradients travel in bf16 (half the bytes), and the result equals a
single-process bf16 run of the same model."""
import copy

import pytest
import torch

from hecate.comm.topology import Topology
from hecate.models.transformer import MoETransformer
from hecate.moe.experts import grouped_mlp
from hecate.parallel import build_strategy, parallelize
from hecate.testing import run_distributed
from tests.training_cases import batch, tiny_config


def bf16_case(rank, world, rematerialize):
    torch.manual_seed(0)
    base = MoETransformer(tiny_config())
    topo = Topology()
    strat = build_strategy("fssdp", topo, overlap_degree=2, fit_replicas=False, rematerialize=rematerialize)
    model = parallelize(copy.deepcopy(base), strat)
    x, y = batch(0, rank, False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _ = model.loss(x, y)
    loss.backward()
    strat.finish_backward(model.moe_layers())
    # The same model on one process, every rank's batch, the mean loss (the strategies' rule).
    ref_losses = []
    for r in range(world):
        xr, yr = batch(0, r, False)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            ref_losses.append(base.loss(xr, yr)[0])
    torch.stack(ref_losses).mean().backward()
    layers = model.moe_layers()
    S = layers[0].expert_layout.chunk_numel
    replica_rows = 0
    for layer in layers:
        holders, owner = layer.fssdp_state.last_plan.holders_WE, layer.fssdp_state.owner_E
        replica_rows += int(holders[rank].sum()) - int((owner == rank).sum())
    grads, want = [], []
    for layer, ref_layer in zip(layers, base.moe_layers()):
        mine = layer.fssdp_state.owner_E == rank
        ref_rows = layer.expert_layout.flatten({n: getattr(ref_layer.experts, n).grad
                                                for n in layer.expert_layout.names})
        grads.append(layer.expert_chunks.grad)
        want.append(ref_rows[mine])
    return {"loss": float(loss.detach()), "ref_loss": float(ref_losses[rank].detach()),
            "dtypes": {str(layer.expert_chunks.dtype) for layer in layers},
            "grad_dtypes": {str(g.dtype) for g in grads}, "grads": grads, "want": want,
            "spag_received": topo.stats.received("fssdp.spAG"), "sprs_sent": topo.stats.sent("fssdp.spRS"),
            "replica_rows": replica_rows, "S": S}


@pytest.mark.parametrize("rematerialize", [True, False])
def test_fssdp_bf16_autocast_matches_single_process_and_halves_bytes(rematerialize):
    results = run_distributed(bf16_case, 2, rematerialize)
    assert sum(r["replica_rows"] for r in results) > 0
    for r in results:
        assert r["dtypes"] == {"torch.float32"} and r["grad_dtypes"] == {"torch.float32"}
        assert abs(r["loss"] - r["ref_loss"]) < 1e-2 * abs(r["ref_loss"])
        for got, want in zip(r["grads"], r["want"]):
            torch.testing.assert_close(got, want, rtol=5e-2, atol=2e-3)
        passes = 2 if rematerialize else 1  # forward gather (+ the re-gather for backward)
        assert r["spag_received"] == passes * r["replica_rows"] * r["S"] * 2  # 2 bytes: bf16
        assert r["sprs_sent"] == r["replica_rows"] * r["S"] * 2


def test_grouped_mlp_computes_in_autocast_dtype_and_returns_input_dtype():
    torch.manual_seed(0)
    x = torch.randn(10, 16)
    w1, w2 = torch.randn(3, 32, 16, requires_grad=True), torch.randn(3, 16, 32, requires_grad=True)
    counts = torch.tensor([4, 0, 6])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = grouped_mlp(x, counts, w1, w2)
    want = grouped_mlp(x.bfloat16(), counts, w1.bfloat16(), w2.bfloat16()).float()
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, want, rtol=0, atol=0)
    y.sum().backward()
    assert w1.grad.dtype == torch.float32 and w2.grad.dtype == torch.float32


def _bf16_training_case(rank, world, steps):
    from tests.training_cases import train_side_by_side

    torch.manual_seed(0)
    base = MoETransformer(tiny_config())

    def loss_of(model, step, r):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return model.loss(*batch(step, r, True))[0]

    # Prefetch (from step 2 on, with load history), overlap_reduce and RM on; replicas kept
    # (fit_replicas off: this tiny model's tokens are cheaper to move than its chunks).
    options = {"overlap_degree": 2, "fit_replicas": False}
    strat, out = train_side_by_side(rank, world, base, "fssdp", options, steps, loss_of,
                                    lr=3e-3, weight_decay=0.01, max_grad_norm=0.5, eps=1e-6)
    out["prefetched_layers"] = strat.timings.get("prefetched_layers", 0)
    return out


def test_fssdp_bf16_training_with_prefetch_tracks_single_process():
    for out in run_distributed(_bf16_training_case, 2, 4):
        losses, ref = out["losses"]
        for a, b in zip(losses, ref):
            assert abs(a - b) < 2e-2 * abs(b)
        assert out["prefetched_layers"] > 0  # the bf16 prefetch path ran
        experts, ref_experts = out["experts"]
        for got, want in zip(experts, ref_experts):
            for n in want:
                torch.testing.assert_close(got[n], want[n], rtol=5e-2, atol=5e-3)
