"""On ep's path (no replica anywhere) fssdp holds no more tensor bytes than ep.

The layer and the tokens are those of tests/test_fssdp_ep_path.py: P1 = P0 under gloo's default
collective latency, so fssdp moves ep's token bytes and issues ep's collectives. Its memory must
then be ep's too. Bytes are counted exactly, tensor by tensor (hecate.testing.tensor_bytes: the
profiler's allocator events), not from the process's resident memory: what the forward keeps
for backward, and the peak over forward + backward + finish_backward.

The counts can only err upwards (a buffer freed on gloo's worker thread is not seen freed), so
each strategy is measured REPEATS times on a fresh layer and the smallest figures are compared.
The slack (SMALL_BYTES) covers plan-sized tensors (a few [E] and [W, E] index tensors), far below
one [N, D] token buffer (~75 KB here): fssdp's expert graph once kept two of those per layer
that ep does not (the received tokens, held by their leaf's gradient accumulator, and the
expert outputs, held for autograd.grad), ~10% of the tiny benchmark model's peak per rank.
"""
import copy

import torch

from hecate.comm.topology import Topology
from hecate.moe.layer import MoELayer
from hecate.parallel import build_strategy, parallelize
from hecate.testing import run_distributed
from hecate.testing.tensor_bytes import TensorBytes
from tests.test_strategies_layer import HIDDEN, _config, _inputs

SMALL_BYTES = 4096
COUNTS = [600, 560]  # tests/test_fssdp_ep_path.py's tokens per rank
REPEATS = 4


def _layer_bytes(rank, strategy, seed):
    torch.manual_seed(seed)
    base = MoELayer(_config(2, None))
    xs, gs = _inputs(len(COUNTS), COUNTS, seed + 1)
    layer = parallelize(copy.deepcopy(base), build_strategy(strategy, Topology()))
    x, g = xs[rank].clone().requires_grad_(True), gs[rank]
    with TensorBytes() as fwd:
        out = layer(x)
        loss = (out.y * g).sum() + out.aux_loss
    with TensorBytes() as bwd:
        loss.backward()
        layer.strategy.finish_backward([layer])
    replicas = layer.fssdp_state.last_plan.num_replicas if strategy == "fssdp" else 0
    return {"kept": fwd.net, "peak": max(fwd.peak, fwd.net + bwd.peak), "replicas": replicas,
            "tokens_received": int(x.shape[0]) * 2}


def ep_path_memory_case(rank, world, seed):
    runs = [{s: _layer_bytes(rank, s, seed) for s in ("ep", "fssdp")} for _ in range(REPEATS)]
    return {s: {**runs[0][s], "kept": min(r[s]["kept"] for r in runs), "peak": min(r[s]["peak"] for r in runs)}
            for s in ("ep", "fssdp")}


def test_fssdp_on_eps_path_keeps_and_peaks_at_no_more_tensor_bytes_than_ep():
    token_buffer = min(COUNTS) * 2 * HIDDEN * 4  # a rank's [N, D] fp32 tokens, top-2, ~ what it receives
    for rank, r in enumerate(run_distributed(ep_path_memory_case, len(COUNTS), 3, timeout=240)):
        ep, fssdp = r["ep"], r["fssdp"]
        assert fssdp["replicas"] == 0, f"rank {rank}: not ep's path, the comparison would not hold"
        assert ep["kept"] > token_buffer, (rank, ep)  # the counting works: ep keeps its activations
        assert fssdp["kept"] <= ep["kept"] + SMALL_BYTES, (
            f"rank {rank}: fssdp's forward keeps {fssdp['kept']} B for backward, ep's {ep['kept']} B")
        assert fssdp["peak"] <= ep["peak"] + SMALL_BYTES, (
            f"rank {rank}: fssdp's peak is {fssdp['peak']} B, ep's {ep['peak']} B")
