"""fssdp's asynchronous spRS (overlap_reduce) free their send and receive buffers by the end of
the backward pass that issued them (overlap.ReduceQueue: a finished exchange at the start of the
next layer's backward, without waiting; the rest in an autograd-engine callback when the pass
ends), not at finish_backward after the dense gradient sync: the same gradients as the blocking
spRS, and a pass that raises leaves its reduces queued for the next drain, never lost."""
import gc
import weakref

import pytest
import torch

from hecate.comm.topology import Topology
from hecate.moe.config import MoEConfig
from hecate.moe.layer import MoELayer
from hecate.parallel import build_strategy, parallelize
from hecate.parallel.fssdp.overlap import ReduceQueue
from hecate.testing import run_distributed


class _Reduce:
    def __init__(self, name, done):
        self.name, self.done = name, done

    def is_completed(self):
        return self.done


class _Issue(torch.autograd.Function):
    """An identity whose backward queues a reduce (as FssdpExperts' backward does)."""

    @staticmethod
    def forward(ctx, x, queue, reduce):
        ctx.queue, ctx.reduce = queue, reduce
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        ctx.queue.reap()
        ctx.queue.add(ctx.reduce)
        return grad, None, None


def test_reap_completes_the_finished_head_in_issue_order_and_never_waits():
    done = []
    q = ReduceQueue(lambda r: done.append(r.name))
    a, b, c = _Reduce("a", True), _Reduce("b", False), _Reduce("c", True)
    q._items.extend([a, b, c])
    q.reap()
    assert done == ["a"] and len(q) == 2  # c has finished, but b (issued before it) has not
    b.done = True
    q.reap()
    assert done == ["a", "b", "c"] and len(q) == 0


def test_the_backward_pass_drains_the_queue_when_it_ends():
    done = []
    q = ReduceQueue(lambda r: done.append(r.name))
    x = torch.ones(3, requires_grad=True)
    y = _Issue.apply(_Issue.apply(x, q, _Reduce("second", False)), q, _Reduce("first", False))
    y.sum().backward()
    assert done == ["first", "second"] and len(q) == 0  # issue order: backward meets "first" first


def test_a_backward_that_raises_leaves_its_reduces_queued_for_the_next_drain():
    done = []
    q = ReduceQueue(lambda r: done.append(r.name))

    class Boom(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.clone()

        @staticmethod
        def backward(ctx, grad):
            raise RuntimeError("boom")

    x = torch.ones(3, requires_grad=True)
    y = _Issue.apply(Boom.apply(_Issue.apply(x, q, _Reduce("late", False))), q, _Reduce("early", False))
    with pytest.raises(RuntimeError, match="boom"):
        y.sum().backward()
    assert done == [] and len(q) == 1  # queued, not completed (the pass ended with the error)
    q.drain()
    assert done == ["early"] and len(q) == 0
    # the next pass queues and drains again
    z = _Issue.apply(x, q, _Reduce("next", False))
    z.sum().backward()
    assert done == ["early", "next"]


def buffers_case(rank, world, overlap_reduce):
    from hecate.parallel.fssdp import overlap

    torch.manual_seed(0)
    cfg = MoEConfig(hidden_size=16, ffn_hidden_size=32, num_experts=8, top_k=2)
    strat = build_strategy("fssdp", Topology(), overlap_degree=3, fit_replicas=False,
                           overlap_reduce=overlap_reduce)
    layers = [parallelize(MoELayer(cfg), strat) for _ in range(2)]
    sent, real = [], overlap.start_replica_reduce

    def spy(grads_RS, owned_grads_OS, plan, group, async_op=False):
        pending = real(grads_RS, owned_grads_OS, plan, group, async_op=async_op)
        sent.append((weakref.ref(grads_RS), pending))
        return pending

    overlap.start_replica_reduce = spy
    try:
        x = torch.randn(24, 16, generator=torch.Generator().manual_seed(rank)).requires_grad_(True)
        h = x
        for layer in layers:
            h = layer(h).y
        (h * torch.linspace(-1, 1, 16)).sum().backward()
    finally:
        overlap.start_replica_reduce = real
    gc.collect()
    # After backward returned: no reduce queued, every exchange completed, its send buffer freed.
    freed = [ref() is None and pending._work is None and pending._finish is None for ref, pending in sent]
    queued = len(strat._pending)
    strat.finish_backward(layers)
    return len(sent), freed, queued, [layer.expert_chunks.grad.clone() for layer in layers], x.grad


def test_spRS_buffers_are_freed_when_backward_ends_with_the_blocking_gradients():
    overlapped = run_distributed(buffers_case, 2, True)
    blocking = run_distributed(buffers_case, 2, False)
    for (n, freed, queued, grads, gx), (_, _, _, want, want_gx) in zip(overlapped, blocking):
        assert n == 2 and all(freed) and queued == 0  # both layers' spRS ran, none outlived backward
        for g, w in zip(grads, want):
            torch.testing.assert_close(g, w, rtol=0, atol=0)
        torch.testing.assert_close(gx, want_gx, rtol=0, atol=0)
