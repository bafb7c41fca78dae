"""Worker for tests/test_models_uni_moe.py: the staged Uni-MoE run under a strategy on every rank."""
import torch


def staged_case(rank, world, strategy, options, stages=None, model_overrides=None):
    from hecate.comm.topology import Topology
    from hecate.parallel import moe_layers
    from hecate.train.stages import StageConfig, load_stage_config, run_stages

    base = load_stage_config("configs/models/tiny-uni-moe.yaml")
    cfg = StageConfig(model={**base.model, **(model_overrides or {})}, stages=stages or [{"name": "align", "steps": 2, "lr": 3e-3},
                                                          {"name": "experts", "steps": 3, "lr": 3e-3},
                                                          {"name": "lora", "steps": 2, "lr": 3e-3}],
                      strategy=strategy, strategy_options=options, batch_size=4)
    topology = Topology()
    snaps = []

    def experts_of(model, strat):
        return [{n: w.detach().clone() for n, w in strat.gather_experts(layer).items()} for layer in moe_layers(model)]

    def on_end(stage, model, engine):
        strat = moe_layers(model)[0].strategy
        local = [p.numel() for layer in moe_layers(model) for p in strat.expert_parameters(layer)]
        snaps.append({"experts": experts_of(model, strat), "local_expert_numel": sum(local),
                      "dense": {n: p.detach().clone() for n, p in model.named_parameters() if ".ffn.experts." not in n}})

    records = run_stages(cfg, rank, world, topology, on_stage_end=on_end)
    return {"losses": [r["losses"] for r in records], "snaps": snaps}
