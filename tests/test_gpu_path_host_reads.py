"""Host reads of device data in the baselines' MoE layers (ep, dp, fsdp), counted on CPU
(tests/host_reads.py tells device data from host data; tests/test_host_syncs.py holds fssdp to
the same budget).

On a GPU each read stalls the host until the stream catches up. One per layer is needed: ep
reads the token counts its peers send it together with the counts it sends; dp and fsdp read
their expert counts (the grouped MLP's splits). Before, ep read its permute's row count, the
received counts and its own counts separately (three stalls per layer, against fssdp's one:
a slower baseline than it has to be), and dp / fsdp read the permute's row count and then the
counts again in the per-expert loop (fp32 on CUDA)."""
import pytest
import torch

from hecate.comm.topology import Topology
from hecate.moe.config import MoEConfig
from hecate.moe.layer import MoELayer
from hecate.parallel import build_strategy, parallelize
from hecate.testing import run_distributed
from tests.host_reads import HostReadCounter
from tests.test_host_syncs import _Patches, steer_to_device_paths

HIDDEN, FFN, EXPERTS = 16, 32, 6


def reads_case(rank, world, name, options):
    from hecate.moe import experts

    patches = _Patches()
    try:
        steer_to_device_paths(patches)
        # The per-expert loop, as fp32 runs on CUDA (the CPU prefers torch._grouped_mm).
        patches(experts, "auto_impl", lambda device, dtype: "loop")
        torch.manual_seed(0)
        cfg = MoEConfig(hidden_size=HIDDEN, ffn_hidden_size=FFN, num_experts=EXPERTS, top_k=2)
        layer = parallelize(MoELayer(cfg), build_strategy(name, Topology(), **options))
        g = torch.Generator().manual_seed(rank)

        def step():
            x = torch.randn(24 if rank else 0, HIDDEN, generator=g).requires_grad_(True)  # rank 0: no tokens
            out = layer(x)
            ((out.y * out.y).sum() + out.aux_loss).backward()
            layer.strategy.finish_backward([layer])
            return out.y.detach(), x.grad

        step()  # warm-up
        with HostReadCounter() as counter:
            counter.mark_host([layer.strategy])
            step()
        return counter.count, dict(counter.where)
    finally:
        patches.undo()


@pytest.mark.parametrize("name, options", [("ep", {}), ("ep", {"ep_size": 1}), ("dp", {}), ("fsdp", {})])
def test_one_baseline_layer_reads_the_host_once(name, options):
    for rank, (count, where) in enumerate(run_distributed(reads_case, 2, name, options)):
        assert count <= 1, f"{name} {options} rank {rank}: {count} host reads (budget 1): {where}"


def step_reads_case(rank, world, name):
    from hecate.models.transformer import MoETransformer
    from hecate.train.engine import Engine
    from tests.training_cases import batch, tiny_config

    patches = _Patches()
    try:
        steer_to_device_paths(patches)
        torch.manual_seed(0)
        strategy = build_strategy(name, Topology())
        model = parallelize(MoETransformer(tiny_config()), strategy)
        engine = Engine(model, strategy, Topology(), lr=1e-3, max_grad_norm=0.5)
        for step in range(2):  # step 0 warms up (optimizer state, the fssdp planner's history)
            x, y = batch(step, rank, True)
            model.loss(x, y)[0].backward()
            if step == 0:
                engine.step()
        with HostReadCounter() as counter:
            counter.mark_host([strategy, engine.optimizer.state])
            norm = engine.step()
        return counter.count, dict(counter.where), norm
    finally:
        patches.undo()


@pytest.mark.parametrize("name", ["ep", "fssdp"])  # replicated dense optimizer / sharded (ZeRO-1)
def test_an_optimizer_step_reads_the_gradient_norm_once(name):
    results = run_distributed(step_reads_case, 2, name)
    for rank, (count, where, _) in enumerate(results):
        assert count <= 1, f"{name} rank {rank}: {count} host reads (budget 1): {where}"
    assert results[0][2] == results[1][2] > 0  # the global norm, the same on every rank


# ---- the same on CUDA (unverified here: no GPU on the machines this was written on) -----------
@pytest.mark.gpu
@pytest.mark.parametrize("name", ["ep", "dp", "fsdp"])
def test_one_baseline_layer_step_synchronizes_once_on_cuda(name):
    from tests.gpu.test_gpu_path import sync_case

    for syncs in run_distributed(sync_case, 1, name, backend="nccl"):
        assert len(syncs) <= 1, syncs  # the expert counts


def edp_calls_case(rank, world):
    from tests.collective_spy import spy_collectives

    torch.manual_seed(0)
    cfg = MoEConfig(hidden_size=HIDDEN, ffn_hidden_size=FFN, num_experts=EXPERTS, top_k=2, activation="swiglu")
    layers = [parallelize(MoELayer(cfg), build_strategy("ep", Topology(), ep_size=1)) for _ in range(2)]
    x = torch.randn(24, HIDDEN, generator=torch.Generator().manual_seed(rank))
    for layer in layers:
        out = layer(x)
        ((out.y * out.y).sum() + out.aux_loss).backward()
    with spy_collectives() as calls:
        layers[0].strategy.finish_backward(layers)
    return calls, [p.grad.clone() for layer in layers for p in layer.experts.parameters()]


def test_ep_expert_data_parallel_reduce_is_one_collective_per_layer():
    # ep_size 1 on 2 ranks: every expert replicated over the expert-data-parallel group. Three
    # parameters per layer (swiglu) took three all-reduces each; one per layer is enough.
    results = run_distributed(edp_calls_case, 2)
    for calls, _ in results:
        assert calls == ["all_reduce", "all_reduce"], calls
    for a, b in zip(results[0][1], results[1][1]):  # the same averaged gradients on both ranks
        assert torch.equal(a, b)
