"""Where the comm layer puts its small control tensors on NCCL, checked on CPU with a stand-in
group (NCCL is not built into this torch): the device the group is bound to, which NCCL
requires of every tensor (init_process_group(device_id=...) binds the world and every group
made after it), not whatever CUDA device happens to be current."""
from types import SimpleNamespace

import torch
import torch.distributed as dist

from hecate.comm import all_to_all


def test_nccl_control_tensors_live_on_the_groups_bound_device(monkeypatch):
    monkeypatch.setattr(all_to_all.dist, "get_backend", lambda group=None: "nccl")
    monkeypatch.setattr(all_to_all.torch.cuda, "current_device", lambda: 0)
    group = SimpleNamespace(bound_device_id=torch.device("meta"))  # meta stands in for cuda:1
    assert all_to_all.comm_device(group) == torch.device("meta")
    # The default group (None) is looked up the same way.
    monkeypatch.setattr(dist.distributed_c10d, "_get_default_group", lambda: group)
    assert all_to_all.comm_device(None) == torch.device("meta")
    # A group bound to no device (NCCL's lazy init): the current device, as before.
    assert all_to_all.comm_device(SimpleNamespace(bound_device_id=None)) == torch.device("cuda", 0)


def test_gloo_control_tensors_stay_on_the_host(monkeypatch):
    monkeypatch.setattr(all_to_all.dist, "get_backend", lambda group=None: "gloo")
    assert all_to_all.comm_device(SimpleNamespace(bound_device_id=None)) == torch.device("cpu")
