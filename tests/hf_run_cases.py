"""Worker functions of tests/test_integration_hf_run.py, kept free of `transformers` so the
pool's workers import only what they run."""
from __future__ import annotations

import torch

from hecate.comm.topology import Topology
from hecate.train.config import load_config

IDS = torch.randint(0, 300, (2, 9), generator=torch.Generator().manual_seed(5))


def init_case(rank, world, run_dir, strategy):
    """Build the run's model under `strategy` from different random weights per rank, load
    RUN_DIR with --init's loader, return the logits of IDS."""
    from hecate.train.init_weights import load_initial_weights
    from hecate.train.trainer import build_model

    cfg = load_config(f"{run_dir}/config.yaml", [f"parallel.strategy={strategy}"])
    torch.manual_seed(100 + rank)
    topo = Topology()
    model, strat = build_model(cfg, topo, torch.device("cpu"))
    load_initial_weights(run_dir, model, strat, cfg.model, topo)
    with torch.no_grad():
        return model(IDS).logits
