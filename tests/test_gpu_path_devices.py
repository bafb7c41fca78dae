"""Device placement on the GPU path, checked on CPU with tensors on the 'meta' device
(a stand-in for a CUDA device: same code path, no GPU needed). The gpu-marked tests in
tests/gpu/ run the same paths on CUDA."""
from types import SimpleNamespace

import pytest
import torch

from hecate.parallel.fssdp.strategy import kept_rows
from hecate.train.checkpoint import optimizer_step_tensor


def test_reshard_keeps_rows_by_ids_on_their_device():
    # Re-sharding indexes the host placement with the held ids, which live where the rows
    # are: the mask must be computed there (CPU placement indexed by CUDA ids raises).
    new_owner_E = torch.tensor([1, 0, 1, 2])
    ids = torch.tensor([0, 2, 3])
    assert kept_rows(new_owner_E, ids, 1).tolist() == [True, True, False]
    assert kept_rows(new_owner_E, ids.to("meta"), 1).device.type == "meta"


def _optimizer(p, **flags):
    return SimpleNamespace(param_groups=[{"params": [p], **flags}])


@pytest.mark.parametrize("flags, on_param_device", [
    ({"fused": True}, True), ({"capturable": True}, True),
    ({"fused": None, "capturable": False}, False), ({}, False)])
def test_restored_adamw_step_lives_where_torch_keeps_it(flags, on_param_device):
    p = torch.nn.Parameter(torch.empty(3, device="meta"))
    step = optimizer_step_tensor(torch.tensor(7.0, dtype=torch.float64), p, _optimizer(p, **flags))
    assert step.dtype == torch.float32
    assert step.device.type == ("meta" if on_param_device else "cpu")


def test_restored_step_matches_torch_fused_adamw_on_cpu():
    p = torch.nn.Parameter(torch.randn(4))
    opt = torch.optim.AdamW([p], fused=True)
    p.grad = torch.ones(4)
    opt.step()
    got = optimizer_step_tensor(torch.tensor(1.0), p, opt)
    want = opt.state[p]["step"]
    assert (got.device, got.dtype, float(got)) == (want.device, want.dtype, float(want))


def test_sparse_plan_row_maps_move_to_the_chunks_device_once():
    from hecate.parallel.fssdp.strategy import device_plan

    owner_E = torch.tensor([0, 1, 1, 0])
    holders_WE = torch.tensor([[True, True, False, True], [False, True, True, True]])
    plan = device_plan(owner_E, holders_WE, 0, torch.device("meta"))
    assert {plan.send_rows.device.type, plan.recv_rows.device.type, plan.owned_rows_M.device.type} == {"meta"}
    assert plan.recv_ids.device.type == "cpu" and plan.recv_ids.tolist() == [1]
    assert plan.send_counts == [0, 1] and plan.recv_counts == [0, 1]


def test_owned_leaves_follow_an_empty_rows_device_move():
    # A rank owning no expert has [0, S] rows, whose data_ptr is 0 on every device: after
    # model.to(cuda) (a .data swap) the kept leaves must still be rebuilt on the new device,
    # or the node's backward returns a CPU gradient for CUDA rows (autograd raises).
    from hecate.parallel.chunks import ChunkLayout
    from hecate.parallel.fssdp.expert_exchange import owned_leaves

    layer = SimpleNamespace(expert_layout=ChunkLayout(("w1", "w2"), ((3, 2), (2, 3)), 4))
    rows = torch.nn.Parameter(torch.empty(0, 12))
    assert {t.device.type for t in owned_leaves(layer, rows).values()} == {"cpu"}
    # Module.to keeps the Parameter object (a .data swap, or swap_tensors: the meta device
    # stands in for CUDA, which .data cannot be set to from the CPU).
    torch.utils.swap_tensors(rows, torch.nn.Parameter(torch.empty(0, 12, device="meta")))
    leaves = owned_leaves(layer, rows)
    assert {t.device.type for t in leaves.values()} == {"meta"}
    assert [tuple(t.shape) for t in leaves.values()] == [(0, 3, 2), (0, 2, 3)]
    cpu_rows = torch.nn.Parameter(torch.empty(0, 12))
    owned_leaves(layer, cpu_rows)
    cpu_rows.data = torch.empty(0, 12, dtype=torch.bfloat16)  # Module.to(dtype)
    assert {t.dtype for t in owned_leaves(layer, cpu_rows).values()} == {torch.bfloat16}
    # Rows that stay put keep their leaves (the cache still serves every forward).
    assert owned_leaves(layer, rows) is owned_leaves(layer, rows)
