"""all_to_all_v: uneven / empty splits, a rank that sends nothing, byte counts, gradcheck, bad input."""
import pytest
import torch
import torch.distributed as dist

from hecate.comm import CommStats, all_to_all_v
from hecate.testing import run_distributed


def _rows(src, dst, n, D):
    """Row i sent from src to dst: recognizable values (src, dst, i)."""
    base = torch.arange(n, dtype=torch.float32).unsqueeze(1)
    return base * 100 + src * 10 + dst + torch.zeros(n, D)


def _splits(world_size, seed):
    g = torch.Generator().manual_seed(seed)
    splits = torch.randint(0, 4, (world_size, world_size), generator=g)
    splits[world_size - 1] = 0  # the last rank sends nothing
    splits[:, 0] = torch.where(splits[:, 0] > 2, 0, splits[:, 0])  # some empty splits to rank 0
    return splits


def _exchange_task(rank, world_size, seed, pass_recv):
    D = 3
    splits = _splits(world_size, seed)
    x = torch.cat([_rows(rank, d, int(splits[rank, d]), D) for d in range(world_size)])
    stats = CommStats()
    recv = splits[:, rank].tolist() if pass_recv else None
    out = all_to_all_v(x, splits[rank].tolist(), recv, stats=stats)
    expected = torch.cat([_rows(s, rank, int(splits[s, rank]), D) for s in range(world_size)])
    return torch.equal(out, expected), stats.snapshot()


@pytest.mark.parametrize("world_size", [2, 3, 4])
@pytest.mark.parametrize("pass_recv", [False, True])
def test_uneven_and_empty_splits(world_size, pass_recv):
    results = run_distributed(_exchange_task, world_size, 7 + world_size, pass_recv)
    splits = _splits(world_size, 7 + world_size)
    for rank, (ok, snap) in enumerate(results):
        assert ok, f"rank {rank} received wrong rows"
        off_sent = int(splits[rank].sum() - splits[rank, rank])
        off_recv = int(splits[:, rank].sum() - splits[rank, rank])
        assert snap["all_to_all_v"] == {"sent": off_sent * 3 * 4, "received": off_recv * 3 * 4, "calls": 1}


def _all_empty_task(rank, world_size):
    out = all_to_all_v(torch.zeros(0, 5), [0] * world_size)
    return tuple(out.shape)


def test_everything_empty():
    assert run_distributed(_all_empty_task, 3) == [(0, 5)] * 3


class _FromReplicated(torch.autograd.Function):
    """Take this rank's rows of an input replicated on every rank; backward sums all ranks' grads."""

    @staticmethod
    def forward(ctx, x_all, start, stop):
        ctx.meta = (x_all.shape, start, stop)
        return x_all[start:stop].clone()

    @staticmethod
    def backward(ctx, grad):
        shape, start, stop = ctx.meta
        full = grad.new_zeros(shape)
        full[start:stop] = grad
        dist.all_reduce(full)
        return full, None, None


class _ToReplicated(torch.autograd.Function):
    """Concatenate every rank's rows on every rank; backward keeps this rank's slice."""

    @staticmethod
    def forward(ctx, y, counts, rank):
        ctx.meta = (sum(counts[:rank]), counts[rank])
        width = max(counts)
        padded = y.new_zeros((width,) + tuple(y.shape[1:]))
        padded[: y.shape[0]] = y
        parts = [torch.empty_like(padded) for _ in counts]
        dist.all_gather(parts, padded)
        return torch.cat([p[:n] for p, n in zip(parts, counts)])

    @staticmethod
    def backward(ctx, grad):  # every rank holds the same upstream grad of the replicated output
        start, n = ctx.meta
        return grad[start:start + n], None, None


def _gradcheck_task(rank, world_size):
    # A rank-local gradcheck is meaningless for a collective (a perturbation on one rank
    # moves outputs on another), so check the global function X_all -> Y_all, replicated
    # on every rank: every rank then makes the same calls with the same perturbations.
    splits = _splits(world_size, 3)
    sent = splits.sum(1).tolist()
    received = splits.sum(0).tolist()
    start = sum(sent[:rank])
    torch.manual_seed(0)
    x_all = torch.randn(sum(sent), 2, dtype=torch.float64, requires_grad=True)

    def f(x):
        local = _FromReplicated.apply(x, start, start + sent[rank])
        out = all_to_all_v(local, splits[rank].tolist())
        return _ToReplicated.apply(out, received, rank)

    return torch.autograd.gradcheck(f, (x_all,), eps=1e-6, atol=1e-5)


@pytest.mark.parametrize("world_size", [2, 3])
def test_gradcheck(world_size):
    assert run_distributed(_gradcheck_task, world_size) == [True] * world_size


def _backward_is_mirror_task(rank, world_size):
    splits = _splits(world_size, 5)
    x = torch.randn(int(splits[rank].sum()), 4, requires_grad=True)
    out = all_to_all_v(x, splits[rank].tolist())
    g = torch.randn_like(out)
    out.backward(g)
    back = all_to_all_v(g, splits[:, rank].tolist(), splits[rank].tolist())  # route g back by hand
    return torch.equal(x.grad, back)


def test_backward_is_mirror_exchange():
    assert run_distributed(_backward_is_mirror_task, 4) == [True] * 4


def _bad_input_task(rank, world_size, case):
    if case == "length":
        all_to_all_v(torch.zeros(2, 1), [1, 1, 0, 0][: world_size + 1])
    elif case == "sum":
        all_to_all_v(torch.zeros(3, 1), [1] * world_size)
    elif case == "negative":
        all_to_all_v(torch.zeros(0, 1), [1, -1] + [0] * (world_size - 2))
    elif case == "float":
        all_to_all_v(torch.zeros(2, 1), torch.ones(world_size))


@pytest.mark.parametrize("case,match", [
    ("length", "send_splits has 3 entries; it needs one per rank"),
    ("sum", "sums to 2 but x has 3 rows"),
    ("negative", "negative entry"),
    ("float", "1-D integer tensor"),
])
def test_bad_input(case, match):
    with pytest.raises(ValueError, match=match):
        run_distributed(_bad_input_task, 2, case)
