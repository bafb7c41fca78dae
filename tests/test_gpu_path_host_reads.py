"""Host reads of device data in the ep baseline's MoE layer, counted on CPU (tests/host_reads.py
tells device data from host data; tests/test_host_syncs.py holds fssdp to the same budget).

On a GPU each read stalls the host until the stream catches up. ep needs one per layer: the
token counts its peers send it, read together with the counts it sends. Before, it read its
permute's row count, the received counts and its own counts separately (three stalls per
layer, against fssdp's one: a slower baseline than it has to be)."""
import torch

from hecate.comm.topology import Topology
from hecate.moe.config import MoEConfig
from hecate.moe.layer import MoELayer
from hecate.parallel import build_strategy, parallelize
from hecate.testing import run_distributed
from tests.host_reads import HostReadCounter
from tests.test_host_syncs import _Patches, steer_to_device_paths

HIDDEN, FFN, EXPERTS = 16, 32, 6


def ep_reads_case(rank, world, ep_size):
    patches = _Patches()
    try:
        steer_to_device_paths(patches)
        torch.manual_seed(0)
        cfg = MoEConfig(hidden_size=HIDDEN, ffn_hidden_size=FFN, num_experts=EXPERTS, top_k=2)
        layer = parallelize(MoELayer(cfg), build_strategy("ep", Topology(), ep_size=ep_size))
        g = torch.Generator().manual_seed(rank)

        def step():
            x = torch.randn(24 if rank else 0, HIDDEN, generator=g).requires_grad_(True)  # rank 0: no tokens
            out = layer(x)
            ((out.y * out.y).sum() + out.aux_loss).backward()
            layer.strategy.finish_backward([layer])
            return out.y.detach(), x.grad

        step()  # warm-up
        with HostReadCounter() as counter:
            counter.mark_host([layer.strategy])
            step()
        return counter.count, dict(counter.where)
    finally:
        patches.undo()


def test_one_ep_layer_reads_the_host_once():
    for ep_size in (3, 1):
        for rank, (count, where) in enumerate(run_distributed(ep_reads_case, 3, ep_size)):
            assert count <= 1, f"ep_size={ep_size} rank {rank}: {count} host reads (budget 1): {where}"
