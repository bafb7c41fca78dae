"""Host-device synchronizations in the fssdp hot path, counted on CPU.

On a GPU every host read of device data (`.item()`, `.tolist()`, `.cpu()`, `bool(t)`,
`nonzero`, boolean masks, `bincount`, a kernel that reads its output size) stalls the
host until the stream catches up. One read per MoE layer per micro-batch is needed: the
all-gathered token counts every rank plans from. tests/host_reads.py tells device data
from host data on a CPU; the code is steered onto its device branches (range checks
queued on the device instead of read, permute's sync-free path), and one fssdp layer's
forward + backward is held to that budget. tests/gpu/test_gpu_path.py checks the same
on CUDA with torch.cuda.set_sync_debug_mode.
"""
import pytest
import torch

from hecate.comm.topology import Topology
from hecate.moe.config import MoEConfig
from hecate.moe.layer import MoELayer
from hecate.parallel import build_strategy, parallelize
from hecate.testing import run_distributed
from tests.host_reads import HostReadCounter

HIDDEN, FFN, EXPERTS = 16, 32, 8
# Reads one fssdp MoE layer may make per forward + backward: the counts' all-gather.
BUDGET = 1


def steer_to_device_paths(monkeypatch_like) -> None:
    """Make CPU code take the branches it takes on an accelerator."""
    from hecate import ops
    from hecate.ops import _autograd, _validate

    from hecate.parallel.fssdp.strategy import FullyShardedSparse

    monkeypatch_like(_validate, "host_reads_free", lambda device: False)
    monkeypatch_like(ops, "_device_path", lambda device: True)
    kernel = ops.op

    def op(name):
        fn = kernel(name)
        if name != "permute":
            return fn

        def permute_kernel(*args):
            out = fn(*args)
            int(out[2].sum())  # what the CUDA kernel does: read its output row count back
            return out
        return permute_kernel

    monkeypatch_like(ops, "op", op)
    monkeypatch_like(_autograd, "op", op)
    bins = FullyShardedSparse._destination_bins  # numpy on the host, torch ops on a GPU
    monkeypatch_like(FullyShardedSparse, "_destination_bins",
                     staticmethod(lambda i, c, s, compact=None: bins(i, c, s, compact=False)))


class _Patches:
    """monkeypatch for pool workers: set attributes, put the originals back on undo()
    (the workers serve later tests: nothing may leak into them)."""

    def __init__(self):
        self._saved = []

    def __call__(self, obj, name, value):
        self._saved.append((obj, name, obj.__dict__[name] if isinstance(obj, type) else getattr(obj, name)))
        setattr(obj, name, value)

    def undo(self):
        for obj, name, value in reversed(self._saved):
            setattr(obj, name, value)
        self._saved.clear()


def _layer(options, capacity_factor=None):
    cfg = MoEConfig(hidden_size=HIDDEN, ffn_hidden_size=FFN, num_experts=EXPERTS, top_k=2,
                    capacity_factor=capacity_factor, min_capacity=1, aux_loss_coeff=0.01,
                    z_loss_coeff=0.001)
    return parallelize(MoELayer(cfg), build_strategy("fssdp", Topology(), **options))


def count_case(rank, world, options, capacity_factor, tokens):
    patches = _Patches()
    try:
        steer_to_device_paths(patches)
        return _count(rank, options, capacity_factor, tokens)
    finally:
        patches.undo()


def _count(rank, options, capacity_factor, tokens):
    torch.manual_seed(0)
    layer = _layer(options, capacity_factor)
    strategy = layer.strategy
    g = torch.Generator().manual_seed(rank)

    def step():
        x = torch.randn(tokens, HIDDEN, generator=g).requires_grad_(True)
        out = layer(x)
        ((out.y * out.y).sum() + out.aux_loss).backward()
        strategy.finish_backward([layer])

    step()  # warm-up: caches, the load history the planner predicts from
    with HostReadCounter() as counter:
        counter.mark_host([strategy, layer.fssdp_state])  # host-side planning state
        step()
    replicated = int(layer.fssdp_state.last_plan.holders_WE.sum()) > EXPERTS
    return counter.count, dict(counter.where), replicated


@pytest.mark.parametrize("options", [
    {"overlap_degree": 3, "fit_replicas": False},                    # replicas, async spRS
    {"overlap_degree": 3, "fit_replicas": False, "overlap_reduce": False, "rematerialize": False},
    {"policy": "none"},                                              # no replica anywhere
])
def test_one_fssdp_layer_reads_the_host_once(options):
    results = run_distributed(count_case, 2, options, None, 24)
    for rank, (count, where, _) in enumerate(results):
        assert count <= BUDGET, f"rank {rank}: {count} host reads (budget {BUDGET}): {where}"
    if options.get("policy") != "none":
        assert any(r[2] for r in results), "the case should exercise replicas"


def test_capacity_drops_read_nothing_more():
    results = run_distributed(count_case, 2, {"overlap_degree": 3}, 1.0, 24)
    for rank, (count, where, _) in enumerate(results):
        assert count <= BUDGET, f"rank {rank}: {count} host reads (budget {BUDGET}): {where}"


def test_counter_sees_device_reads_and_ignores_host_ones():
    x = torch.randn(4, requires_grad=True)
    host = torch.tensor([1, 2, 3])
    with HostReadCounter(mark_host=[host]) as c:
        host.tolist(), int(host[0]), bool((host > 1).any())  # host data: free
        y = x * 2
        y[y > 0]                      # boolean mask: the size is data dependent
        float(y.detach().sum())       # a scalar read
        y.detach().cpu().tolist()     # a download (the .tolist() of the copy is free)
        torch.bincount(torch.zeros(3, dtype=torch.long, device=x.device))
    assert c.count == 4, c.where


@pytest.mark.parametrize("tokens, kept", [([3, 1, 0, 4], [2, 1, 0, 4]), ([0, 0, 0], [0, 0, 0]), ([5, 5], [5, 5])])
def test_moe_stats_tensors_equal_the_floats_and_read_nothing(tokens, kept):
    from hecate.moe.metrics import MoEStats

    stats = MoEStats(torch.tensor(tokens), torch.tensor(kept))
    with HostReadCounter() as counter:  # the stats' tensors are device data: nothing is read
        imbalance, dropped = stats.imbalance_tensor(), stats.dropped_fraction_tensor()
    assert counter.count == 0, counter.where
    assert float(imbalance) == pytest.approx(stats.imbalance)
    assert float(dropped) == pytest.approx(stats.dropped_fraction)
