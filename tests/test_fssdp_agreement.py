"""fssdp's per-layer agreement check: the counts all-gather carries a digest of each rank's
placement (owner_E) and predicted load; a rank whose state differs (another checkpoint, a
skipped update) is named in an AgreementError on every rank, before any plan is made from it."""
import pytest
import torch

from hecate.comm.agreement import AgreementError
from hecate.comm.topology import Topology
from hecate.models.transformer import MoETransformer
from hecate.parallel import build_strategy, moe_layers, parallelize
from hecate.testing import run_distributed
from hecate.train.engine import Engine
from tests.training_cases import batch, tiny_config


def _diverge_case(rank, world, what):
    torch.manual_seed(0)
    topo = Topology()
    strat = build_strategy("fssdp", topo)
    model = parallelize(MoETransformer(tiny_config()), strat)
    engine = Engine(model, strat, topo)
    model.loss(*batch(0, rank, False))[0].backward()  # agreed state: no error
    engine.step()
    state = moe_layers(model)[1].fssdp_state
    if rank == 1 and what == "load":  # one extra predictor update on rank 1 only
        state.predictor.update(torch.arange(state.owner_E.numel(), dtype=torch.float64))
    if rank == 1 and what == "owner":  # rank 1 believes two experts have swapped owners
        a = int((state.owner_E == 0).nonzero()[0])
        b = int((state.owner_E == 1).nonzero()[0])
        state.owner_E[a], state.owner_E[b] = 1, 0
    try:
        model.loss(*batch(1, rank, False))
    except AgreementError as e:
        return str(e)
    return None


@pytest.mark.parametrize("what", ["load", "owner"])
def test_differing_placement_or_load_state_is_named_on_every_rank(what):
    for message in run_distributed(_diverge_case, 2, what):
        assert message is not None and "ranks [1] hold a different placement/load state than ranks [0]" in message
        assert "MoE layer 1" in message
