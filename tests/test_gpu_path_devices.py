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
