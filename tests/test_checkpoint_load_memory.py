"""A checkpoint load allocates expert rows and AdamW moments only for what the rank keeps:
fssdp / ep the rows it owns under the new layout, fsdp its flat range (to the element), dp
every row. Measured with a spy on checkpoint_layout.expert_buffer, the one function a load
allocates expert buffers with (its total must equal the kept elements' bytes, so a full-size
[E, S] buffer would show). The loaded rows, moments and dense state equal the saved ones."""
import os

import pytest
import torch

import hecate.train.checkpoint_layout as layout_mod
from hecate.models.transformer import MoETransformer
from hecate.parallel import moe_layers
from hecate.testing import run_distributed
from hecate.train.checkpoint import load_checkpoint, save_checkpoint
from hecate.train.checkpoint_layout import full_layout
from tests.test_checkpoint import FSSDP, _fixed_loss, _train
from tests.test_checkpoint_read_set import _build, _kept, _same_state
from tests.training_cases import tiny_config

MOMENTS = 2  # AdamW's exp_avg and exp_avg_sq, stored like the rows


def save_fssdp(rank, world, out):
    model, strat, engine, _ = _build("fssdp", FSSDP, seed=0)
    _train(model, engine, rank, world, 1)
    save_checkpoint(out, model, strat, engine, 1)
    return _fixed_loss(model)


def load_measured(rank, world, src, loads):
    """loads: [(dst, strategy, options)]: load with the optimizer, counting the bytes of every
    expert buffer the load allocates, then save to dst."""
    out = []
    for dst, name, options in loads:
        model, strat, engine, _ = _build(name, options, seed=7)
        allocated = []
        real_buffer = layout_mod.expert_buffer

        def buffer(shape):
            t = real_buffer(shape)
            allocated.append(t.numel() * t.element_size())
            return t

        layout_mod.expert_buffer = buffer
        try:
            load_checkpoint(src, model, strat, engine)
        finally:
            layout_mod.expert_buffer = real_buffer
        save_checkpoint(dst, model, strat, engine, 1)
        kept = sum(hi - lo for layer in _kept(strat, model, rank) for lo, hi in layer)
        if name == "fsdp":  # the shard's zero padding past E*S is kept too
            kept = sum(layer.expert_shard.numel() for layer in moe_layers(model))
        out.append({"allocated": sum(allocated), "kept_elements": kept, "loss": _fixed_loss(model)})
    return out


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("load_memory")
    src = str(root / "fssdp4")
    loss = run_distributed(save_fssdp, 4, src)[0]
    layers = moe_layers(MoETransformer(tiny_config()))
    total = sum(full_layout(layer).num_experts * full_layout(layer).chunk_numel for layer in layers)
    return root, src, loss, total * 4 * (1 + MOMENTS)  # fp32 rows + two moments


def test_fssdp_four_ranks_allocate_a_quarter(saved):
    """W=4 -> W=4 (placement restored): each rank allocates exactly its own rows and moments,
    together exactly the model's expert state once; the state equals the saved one."""
    root, src, loss, total = saved
    dst = str(root / "fssdp4_again")
    got = [r[0] for r in run_distributed(load_measured, 4, src, [(dst, "fssdp", FSSDP)])]
    for rank, r in enumerate(got):
        assert r["allocated"] == r["kept_elements"] * 4 * (1 + MOMENTS), (rank, r)
        assert r["loss"] == loss
    assert sum(r["allocated"] for r in got) == total  # one copy of every row and moment in the world
    assert max(r["allocated"] for r in got) <= total // 2, got  # 8 rows over 4 ranks: not every row
    _same_state(src, dst)


def test_two_ranks_allocate_their_half_and_dp_all(saved):
    """W=4 -> W=2: fssdp and ep ranks allocate the rows they own, fsdp its flat range (to the
    element), dp all of them, each with its moments; every load equals the saved state."""
    root, src, loss, total = saved
    loads = [(str(root / f"{n}2"), n, o) for n, o in (("fssdp", FSSDP), ("ep", {"ep_size": 2}),
                                                       ("fsdp", {}), ("dp", {}))]
    got = run_distributed(load_measured, 2, src, loads)
    for j, (_, name, _) in enumerate(loads):
        per_rank = [got[rank][j] for rank in range(2)]
        for rank, r in enumerate(per_rank):
            assert r["allocated"] == r["kept_elements"] * 4 * (1 + MOMENTS), (name, rank, r)
            assert r["loss"] == pytest.approx(loss, rel=1e-5), name  # another strategy's summation order
        if name == "dp":
            assert all(r["allocated"] == total for r in per_rank)
        elif name == "fsdp":  # the ranges tile E*S (plus padding under one row's worth)
            assert total <= sum(r["allocated"] for r in per_rank) < total + 2 * 4 * (1 + MOMENTS)
        else:
            assert sum(r["allocated"] for r in per_rank) == total
            assert all(r["allocated"] < total for r in per_rank), (name, per_rank)
        _same_state(src, os.path.join(root, f"{name}2"))
