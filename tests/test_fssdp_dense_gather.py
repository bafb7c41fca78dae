"""overlap_dense_gather: under fssdp's ZeRO-1 dense optimizer, Engine.step steps the dense shard,
issues the all-gather of the shards asynchronously, steps the expert rows while it travels and
waits before returning (default on NCCL, off on gloo; forced on here). Both paths train like one
process and like each other bit for bit; a checkpoint written right after a step holds the
gathered weights; an exception in the expert step leaves no gather in flight, so the next
collective and the next steps run."""
import pytest
import torch
import torch.distributed as dist

from hecate.comm.topology import Topology
from hecate.models.transformer import MoETransformer
from hecate.parallel import build_strategy, moe_layers, parallelize
from hecate.parallel.chunks import is_expert_parameter
from hecate.testing import run_distributed
from hecate.train.engine import Engine
from tests.training_cases import batch, check_training, tiny_config, train_case

STEPS = 4


@pytest.mark.parametrize("overlap", [False, True])
def test_both_paths_train_like_one_process(overlap):
    check_training(run_distributed(train_case, 2, "fssdp", {"overlap_dense_gather": overlap}, STEPS))


def _build(overlap, seed=0):
    torch.manual_seed(seed)
    topo = Topology()
    strat = build_strategy("fssdp", topo, overlap_dense_gather=overlap)
    model = parallelize(MoETransformer(tiny_config()), strat)
    engine = Engine(model, strat, topo, lr=3e-3, weight_decay=0.01, max_grad_norm=0.5, eps=1e-6)
    return model, strat, engine


def _state(model, strat, engine):
    dense = {n: p.detach().clone() for n, p in model.named_parameters() if not is_expert_parameter(p)}
    experts = [strat.gather_experts(layer) for layer in moe_layers(model)]
    params = [p for g in engine.optimizer.param_groups for p in g["params"]]  # in the groups' order
    moments = [torch.cat([engine.optimizer.state[p][k].reshape(-1) for p in params])
               for k in ("exp_avg", "exp_avg_sq")]
    return dense, experts, moments


def _paths_case(rank, world, overlap, path):
    """Train STEPS steps, logging the order of the optimizer's calls and the dense gather; save
    a checkpoint right after the last step and load it into a fresh model."""
    from hecate.parallel import dense_shard as dense_shard_mod
    from hecate.train.checkpoint import load_checkpoint, save_checkpoint

    model, strat, engine = _build(overlap)
    assert engine.async_dense_gather is overlap
    events, real_gather = [], dense_shard_mod.all_gather_flat
    shard = engine.dense_shard.shard

    def gather(out, x, group=None, async_op=False):
        events.append(("gather", async_op))
        return real_gather(out, x, group=group, async_op=async_op)

    real_step = engine.optimizer.step

    def step(*args, **kwargs):
        with_grad = [p for g in engine.optimizer.param_groups for p in g["params"] if p.grad is not None]
        has_shard = any(p is shard for p in with_grad)
        events.append(("step", "shard" if has_shard and len(with_grad) == 1 else
                       "experts" if not has_shard else "all"))
        return real_step(*args, **kwargs)

    dense_shard_mod.all_gather_flat, engine.optimizer.step = gather, step
    try:
        losses, pending = [], []
        for s in range(STEPS):
            loss = model.loss(*batch(s, rank, False))[0]
            loss.backward()
            engine.step()
            pending.append(engine.dense_shard.gather_pending)
            losses.append(float(loss))
    finally:
        dense_shard_mod.all_gather_flat = real_gather
        del engine.optimizer.step
    # Right after a step: the checkpoint must hold the gathered dense weights.
    save_checkpoint(path, model, strat, engine, step=STEPS, topology=strat.topology)
    model2, strat2, engine2 = _build(overlap, seed=1)
    load_checkpoint(path, model2, strat2, engine2, topology=strat2.topology)
    return {"losses": losses, "events": events[:3], "pending": pending, "state": _state(model, strat, engine),
            "loaded": _state(model2, strat2, engine2)}


def _same(a, b):
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return torch.equal(a, b)


def test_the_overlapped_step_gives_the_same_bits_and_checkpoints_the_gathered_weights(tmp_path):
    sync = run_distributed(_paths_case, 2, False, str(tmp_path / "sync"))
    overlapped = run_distributed(_paths_case, 2, True, str(tmp_path / "async"))
    for s, o in zip(sync, overlapped):
        assert s["events"] == [("step", "all"), ("gather", False), ("step", "all")]
        # the shard alone, then the gather issued, then the expert rows while it travels
        assert o["events"] == [("step", "shard"), ("gather", True), ("step", "experts")]
        assert o["pending"] == [False] * STEPS  # waited for before Engine.step returned
        assert s["losses"] == o["losses"]
        assert _same(s["state"], o["state"])  # dense and expert weights, AdamW moments
        assert _same(o["loaded"][:2], o["state"][:2])  # the checkpoint written right after a step
    assert _same(overlapped[0]["state"][0], overlapped[1]["state"][0])  # every rank's dense weights


def _failure_case(rank, world):
    """The expert step raises (on every rank) after the gather was issued; then a collective on
    the same group and more training must run."""
    model, strat, engine = _build(True)
    real_step = engine.optimizer.step
    calls = []

    def step(*args, **kwargs):
        calls.append(1)
        if len(calls) == 4:  # step 2's second call: the expert rows, the gather in flight
            raise RuntimeError("injected failure in the expert step")
        return real_step(*args, **kwargs)

    engine.optimizer.step = step
    losses, raised = [], None
    for s in range(4):
        loss = model.loss(*batch(s, rank, False))[0]
        loss.backward()
        try:
            engine.step()
        except RuntimeError as err:
            raised = (s, str(err), engine.dense_shard.gather_pending)
            engine.optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss))
    del engine.optimizer.step
    x = torch.ones(3) * (rank + 1)
    dist.all_reduce(x)  # the group is not left with a collective in flight
    first = next(p for n, p in model.named_parameters() if not is_expert_parameter(p)).detach().clone()
    return raised, losses, x, first


def test_an_exception_in_the_expert_step_leaves_no_gather_in_flight():
    results = run_distributed(_failure_case, 2, timeout=120)
    for raised, losses, x, first in results:
        assert raised == (1, "injected failure in the expert step", False)
        assert all(torch.isfinite(torch.tensor(losses)))
        assert torch.equal(x, torch.full((3,), 3.0))
    assert torch.equal(results[0][3], results[1][3])  # the ranks still hold the same dense weights


def _default_case(rank, world):
    return _build(None)[2].async_dense_gather


def test_the_default_is_off_on_gloo():
    assert run_distributed(_default_case, 2) == [False, False]


def _hybrid_case(rank, world, overlap):
    topo = Topology()
    strat = build_strategy("fssdp_hybrid", topo, shard_group_size=2, overlap_dense_gather=overlap)
    model = parallelize(MoETransformer(tiny_config()), strat)
    return Engine(model, strat, topo, lr=3e-3, dense_optimizer="sharded").async_dense_gather


@pytest.mark.parametrize("overlap", [False, True])
def test_fssdp_hybrid_passes_the_option_to_the_engine(overlap):
    # The option lives on fssdp_hybrid's inner strategy; an explicit value must not be ignored.
    assert run_distributed(_hybrid_case, 4, overlap) == [overlap] * 4
