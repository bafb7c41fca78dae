"""FSSDP keeps about 1/W of the experts' persistent memory (rows + grads + AdamW state) per rank."""
import torch

from hecate.comm.topology import Topology
from hecate.models.transformer import MoETransformer
from hecate.parallel import build_strategy, moe_layers, parallelize
from hecate.parallel.chunks import is_expert_parameter
from hecate.testing import run_distributed
from hecate.train.engine import Engine
from tests.training_cases import batch, tiny_config


def measured_expert_bytes(model, optimizer) -> int:
    """Bytes of every storage behind this rank's expert parameters, their gradients and their
    optimizer state, found from the model and the optimizer (not the strategy's own count);
    each storage once, whole (a view of a bigger buffer counts the buffer)."""
    storages = {}
    for p in model.parameters():
        if not is_expert_parameter(p):
            continue
        tensors = [p, p.grad] + [v for v in optimizer.state.get(p, {}).values() if torch.is_tensor(v)]
        for t in tensors:
            if t is not None and t.dim() > 0:  # AdamW's scalar step is not per-row state
                storage = t.untyped_storage()
                storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


def memory_case(rank, world, reshard):
    torch.manual_seed(0)
    cfg = tiny_config(num_experts=8)
    full_model = MoETransformer(cfg)
    layers_full = moe_layers(full_model)
    total_rows = sum(l.experts.w1_EFD.shape[0] for l in layers_full)
    chunk_bytes = sum(p[0].numel() * 4 for p in layers_full[0].experts.parameters())
    strat = build_strategy("fssdp", Topology(), overlap_degree=1, reshard_interval=2 if reshard else 0)
    model = parallelize(full_model, strat)
    engine = Engine(model, strat, strat.topology)
    for step in range(4):
        x, y = batch(step, rank, skew=True)
        loss, _ = model.loss(x, y)
        loss.backward()
        engine.sync_gradients()
        engine.optimizer.step()
        layers = moe_layers(model)
        mine = measured_expert_bytes(model, engine.optimizer)
        reported = sum(strat.persistent_bytes(l, engine.optimizer) for l in layers)
        engine.optimizer.zero_grad(set_to_none=False)  # keep grads allocated: count them as persistent
        strat.step_end(layers, engine.optimizer)
    rows = sum(l.expert_chunks.shape[0] for l in moe_layers(model))
    return {"mine": mine, "reported": reported, "rows": rows, "total_rows": total_rows,
            "chunk_bytes": chunk_bytes, "reshards": strat.reshards}


def _check(results, world):
    total_rows = results[0]["total_rows"]
    assert sum(r["rows"] for r in results) == total_rows  # one owner per chunk, none lost
    per_chunk = 4 * results[0]["chunk_bytes"]  # fp32 row + grad + exp_avg + exp_avg_sq
    total = total_rows * per_chunk
    for r in results:
        assert abs(r["mine"] - total / world) <= per_chunk, (r["mine"], total / world)
        assert r["reported"] == r["mine"]  # the strategy's own count agrees with the measurement


def test_persistent_expert_memory_is_one_over_w():
    _check(run_distributed(memory_case, 4, False), 4)
    _check(run_distributed(memory_case, 3, False), 3)


def test_persistent_expert_memory_after_reshard():
    results = run_distributed(memory_case, 4, True)
    assert results[0]["reshards"] >= 1
    _check(results, 4)
