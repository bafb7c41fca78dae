"""hecate.testing.run_distributed: results by rank, errors naming the rank, recovery from hangs."""
import pytest
import torch
import torch.distributed as dist

from hecate.testing import run_distributed


def _rank_info(rank, world_size, offset, scale=1):
    t = torch.tensor([float(rank + 1)])
    dist.all_reduce(t)
    return (rank, world_size, dist.get_rank(), (rank + offset) * scale, t.item())


def _raise_on_rank(rank, world_size, bad_rank):
    if rank == bad_rank:
        raise ValueError(f"boom from {rank}")
    return rank


def _hang_on_rank0(rank, world_size):
    if rank == 0:
        dist.all_reduce(torch.ones(1))  # rank 1 never joins: blocks until killed
    return rank


def _pid(rank, world_size):
    import os

    return os.getpid()


@pytest.mark.parametrize("world_size", [2, 3])
def test_results_in_rank_order(world_size):
    out = run_distributed(_rank_info, world_size, 10, scale=2)
    total = world_size * (world_size + 1) / 2
    assert out == [(r, world_size, r, (r + 10) * 2, total) for r in range(world_size)]


def test_exception_names_rank_and_pool_survives():
    pids = run_distributed(_pid, 2)
    with pytest.raises(ValueError, match=r"rank 1 of 2.*boom from 1") as info:
        run_distributed(_raise_on_rank, 2, 1)
    assert info.value.rank == 1
    assert "_raise_on_rank" in str(info.value.__cause__)  # the remote traceback text
    # All ranks returned and the group is in step: the same workers serve the next call.
    assert run_distributed(_pid, 2) == pids


def test_hang_times_out_and_pool_recovers():
    pids = run_distributed(_pid, 2)
    with pytest.raises(TimeoutError, match="ranks \\[0\\]"):
        run_distributed(_hang_on_rank0, 2, timeout=3.0)
    new_pids = run_distributed(_pid, 2)
    assert set(new_pids).isdisjoint(pids)  # a fresh pool, not the broken one
    assert run_distributed(_rank_info, 2, 0)[1][4] == 3.0


def test_rejects_local_function():
    def local(rank, world_size):
        return rank

    with pytest.raises(ValueError, match="module-level"):
        run_distributed(local, 2)


def _destroy_group(rank, world_size):
    dist.destroy_process_group()
    return rank


def test_task_that_destroys_the_group_retires_the_pool():
    pids = run_distributed(_pid, 2)
    assert run_distributed(_destroy_group, 2) == [0, 1]
    assert set(run_distributed(_pid, 2)).isdisjoint(pids)


def _draw(rank, world_size):
    grad_mode = torch.is_grad_enabled()
    torch.set_grad_enabled(False)  # must not leak into the next task
    return grad_mode, torch.rand(2).tolist()


def test_each_task_starts_from_the_same_rng_state():
    first = run_distributed(_draw, 2)
    assert run_distributed(_draw, 2) == first
    assert all(grad_mode for grad_mode, _ in first)


def test_health_check_runs_on_the_backend_device(monkeypatch):
    # NCCL reduces only CUDA tensors: a CPU health check would fail after every failed task.
    from hecate.testing.pool import health_check_device

    assert health_check_device("gloo") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    assert health_check_device("nccl") == torch.device("cuda", 3)
