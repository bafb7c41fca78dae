"""spAG / spRS against naive dense collectives on random placements, bytes, autograd, bad input."""
import pytest
import torch
import torch.distributed as dist

from hecate.comm import AgreementError, CommStats, sparse_all_gather, sparse_reduce_scatter
from hecate.testing import run_distributed

S = 5


def random_placement(world_size, seed):
    """owner_C, holders_WC: random owners, random extra holders (often none), owners hold their chunks."""
    g = torch.Generator().manual_seed(seed)
    C = int(torch.randint(0, 3 * world_size + 1, (1,), generator=g))
    owner_C = torch.randint(0, world_size, (C,), generator=g)
    if seed % 4 == 0 and C:  # a rank that owns nothing
        owner_C[owner_C == 0] = 1
    p = float(torch.rand(1, generator=g)) * 0.6
    holders_WC = torch.rand(world_size, C, generator=g) < p
    if seed % 5 == 0:  # a rank that receives nothing
        holders_WC[world_size - 1] = False
    holders_WC[owner_C, torch.arange(C)] = True
    return owner_C, holders_WC


def chunk_values(C, seed):
    """The true content of every chunk (integer-valued, so sums are exact in any order)."""
    return torch.randint(-50, 50, (C, S), generator=torch.Generator().manual_seed(seed)).float()


def _dense_gather_then_select(owned_OS, owner_C, holders_WC, rank):
    full_CS = torch.zeros(owner_C.numel(), S)
    full_CS[owner_C == rank] = owned_OS
    dist.all_reduce(full_CS)
    return full_CS[holders_WC[rank]]


def _dense_reduce_then_slice(grads_MS, owner_C, holders_WC, rank):
    full_CS = torch.zeros(owner_C.numel(), S)
    full_CS[holders_WC[rank]] = grads_MS
    dist.all_reduce(full_CS)
    return full_CS[owner_C == rank]


def _expected_bytes(owner_C, holders_WC, rank, elsize=4):
    owned = owner_C == rank
    others = holders_WC.clone()
    others[rank] = False
    ag_sent = int(others[:, owned].sum()) * S * elsize
    ag_recv = int((holders_WC[rank] & ~owned).sum()) * S * elsize
    return ag_sent, ag_recv


def _random_placements_task(rank, world_size, seeds):
    failures = []
    for seed in seeds:
        owner_C, holders_WC = random_placement(world_size, seed)
        values_CS = chunk_values(owner_C.numel(), seed)
        stats = CommStats()
        owned_OS = values_CS[owner_C == rank]
        out_MS, ids_M = sparse_all_gather(owned_OS, owner_C, holders_WC, stats=stats)
        if not torch.equal(ids_M, holders_WC[rank].nonzero().view(-1)):
            failures.append((seed, "spAG ids"))
        if not torch.equal(out_MS, _dense_gather_then_select(owned_OS, owner_C, holders_WC, rank)):
            failures.append((seed, "spAG values"))
        if not torch.equal(out_MS, values_CS[ids_M]):
            failures.append((seed, "spAG vs truth"))
        grads_MS = chunk_values(int(holders_WC[rank].sum()), 1000 * seed + rank)
        red_OS = sparse_reduce_scatter(grads_MS, owner_C, holders_WC, stats=stats)
        if not torch.equal(red_OS, _dense_reduce_then_slice(grads_MS, owner_C, holders_WC, rank)):
            failures.append((seed, "spRS values"))
        sent, recv = _expected_bytes(owner_C, holders_WC, rank)
        snap = stats.snapshot()
        if (snap["spAG"]["sent"], snap["spAG"]["received"]) != (sent, recv):
            failures.append((seed, "spAG bytes", snap["spAG"], sent, recv))
        if (snap["spRS"]["sent"], snap["spRS"]["received"]) != (recv, sent):
            failures.append((seed, "spRS bytes", snap["spRS"], recv, sent))
    return failures


@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_matches_dense_collectives(world_size):
    results = run_distributed(_random_placements_task, world_size, list(range(20)))
    for rank, failures in enumerate(results):
        assert failures == [], f"rank {rank}: {failures}"


def _autograd_task(rank, world_size):
    owner_C, holders_WC = random_placement(world_size, 11)
    owner_C, holders_WC = owner_C, holders_WC
    torch.manual_seed(rank)
    owned_OS = torch.randn(int((owner_C == rank).sum()), S, dtype=torch.float64, requires_grad=True)
    out_MS, _ = sparse_all_gather(owned_OS, owner_C, holders_WC)
    g_MS = torch.randn_like(out_MS)
    (out_MS * g_MS).sum().backward()
    ag_backward_ok = torch.allclose(owned_OS.grad, sparse_reduce_scatter(g_MS, owner_C, holders_WC))

    grads_MS = torch.randn(int(holders_WC[rank].sum()), S, dtype=torch.float64, requires_grad=True)
    red_OS = sparse_reduce_scatter(grads_MS, owner_C, holders_WC)
    h_OS = torch.randn_like(red_OS)
    (red_OS * h_OS).sum().backward()
    rs_backward_ok = torch.allclose(grads_MS.grad, sparse_all_gather(h_OS, owner_C, holders_WC)[0])

    # Adjoint: sum over ranks <spAG(x), y> == sum over ranks <x, spRS(y)>.
    with torch.no_grad():
        x, y = owned_OS.detach(), grads_MS.detach()
        lhs = (sparse_all_gather(x, owner_C, holders_WC)[0] * y).sum().view(1)
        rhs = (x * sparse_reduce_scatter(y, owner_C, holders_WC)).sum().view(1)
        dist.all_reduce(lhs)
        dist.all_reduce(rhs)
    return ag_backward_ok, rs_backward_ok, torch.allclose(lhs, rhs)


def test_autograd_each_is_the_others_backward():
    results = run_distributed(_autograd_task, 3)
    assert results == [(True, True, True)] * 3


def _mismatch_task(rank, world_size):
    owner_C, holders_WC = random_placement(world_size, 3)
    if rank == 2:
        holders_WC = holders_WC.clone()
        holders_WC[:, 0] = True  # rank 2 planned a different P1
    owned_OS = torch.zeros(int((owner_C == rank).sum()), S)
    try:
        sparse_all_gather(owned_OS, owner_C, holders_WC, name="layer3.spAG")
    except AgreementError as exc:
        return exc.minority_ranks, exc.majority_ranks, str(exc)
    return None


def test_placement_mismatch_raises_on_every_rank_naming_ranks():
    results = run_distributed(_mismatch_task, 4)
    for minority, majority, message in results:
        assert (minority, majority) == ([2], [0, 1, 3])
        assert "layer3.spAG" in message and "ranks [2] differ from ranks [0, 1, 3]" in message


def _bad_input_task(rank, world_size, case):
    owner_C = torch.tensor([0, 1, 1, 0])
    holders_WC = torch.tensor([[True, False, True, True], [False, True, True, False]])
    owned_OS = torch.zeros(2, S)
    if case == "rows":
        owned_OS = torch.zeros(3, S)
    elif case == "rows_one_rank" and rank == 1:
        owned_OS = torch.zeros(3, S)
    elif case == "holders_shape":
        holders_WC = holders_WC[:1]
    elif case == "holders_dtype":
        holders_WC = holders_WC.int()
    elif case == "owner_shape":
        owner_C = owner_C[:3]
    elif case == "owner_range":
        owner_C = torch.tensor([0, 1, 2, 0])
    elif case == "owner_not_holder":
        holders_WC = holders_WC.clone()
        holders_WC[1, 1] = False
    elif case == "owned_1d":
        owned_OS = torch.zeros(2)
    elif case == "grads_rows":
        return sparse_reduce_scatter(torch.zeros(1, S), owner_C, holders_WC)
    return sparse_all_gather(owned_OS, owner_C, holders_WC)


@pytest.mark.parametrize("case,error,match", [
    ("rows", ValueError, "owned_OS has 3 rows but rank 0 owns 2 chunks"),
    ("rows_one_rank", AgreementError, "ranks \\[1\\] differ from ranks \\[0\\]"),
    ("holders_shape", ValueError, "holders_WC has 1 rows but the group has 2 ranks"),
    ("holders_dtype", ValueError, "holders_WC must be a bool tensor"),
    ("owner_shape", ValueError, "owner_C has 3 entries but holders_WC has C=4"),
    ("owner_range", ValueError, "owner_C\\[2\\] = 2 is out of range"),
    ("owner_not_holder", ValueError, "owner 1 of chunk 1 does not hold it"),
    ("owned_1d", ValueError, "owned_OS must be a 2-D tensor"),
    ("grads_rows", ValueError, "grads_MS has 1 rows but rank 0 holds 3 chunks"),
])
def test_bad_input(case, error, match):
    with pytest.raises(error, match=match):
        run_distributed(_bad_input_task, 2, case, timeout=60)


def _nccl_task(rank, world_size):
    device = torch.device("cuda", torch.cuda.current_device())
    owner_C, holders_WC = random_placement(world_size, 6)
    values_CS = chunk_values(owner_C.numel(), 6).to(device)
    out_MS, ids_M = sparse_all_gather(values_CS[(owner_C == rank).to(device)], owner_C.to(device),
                                      holders_WC.to(device))
    return torch.equal(out_MS.cpu(), values_CS.cpu()[ids_M.cpu()])


@pytest.mark.gpu
def test_nccl_on_cuda():
    world_size = min(torch.cuda.device_count(), 2)
    assert run_distributed(_nccl_task, world_size, backend="nccl") == [True] * world_size


def _replica_task(rank, world_size, seeds, wire):
    from hecate.comm.sparse import plan_sparse, start_replica_gather, start_replica_reduce

    wire = getattr(torch, wire) if wire else None
    ok = []
    for seed in seeds:
        owner_C, holders_WC = random_placement(world_size, seed)
        C = owner_C.numel()
        full = chunk_values(C, seed)
        plan = plan_sparse(owner_C, holders_WC, rank)
        owned = full[owner_C == rank].clone()
        replicas, _ = start_replica_gather(owned, plan, None, async_op=seed % 2 == 1,
                                           wire_dtype=wire).wait()
        # Only the chunks held but not owned arrive, in recv_ids order, in the wire dtype.
        ok.append(replicas.dtype == (wire or torch.float32))
        ok.append(torch.equal(replicas.float(), full[plan.recv_ids]))
        # Gradients: every holder contributes (rank + 1) * chunk; owners get the sum over holders.
        grads = ((rank + 1) * full[plan.recv_ids]).to(wire or torch.float32)
        own_grads = (rank + 1) * owned
        summed, _ = start_replica_reduce(grads, own_grads, plan, None, async_op=seed % 2 == 0).wait()
        weight_C = ((torch.arange(world_size) + 1).unsqueeze(1) * holders_WC).sum(0).float()
        ok.append(torch.equal(summed, (weight_C.unsqueeze(1) * full)[owner_C == rank]))
    return all(ok)


@pytest.mark.parametrize("wire", [None, "bfloat16"])
def test_replica_gather_and_reduce_move_only_replicas(wire):
    assert run_distributed(_replica_task, 3, list(range(12)), wire) == [True] * 3
