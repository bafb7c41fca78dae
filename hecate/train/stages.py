"""Progressive (multi-stage) training from one config: Uni-MoE's three stages.

A stage config is a YAML with `model:` (a `uni_moe` model section: `preset:` plus overrides, or
the full config), `parallel:` (strategy, options) and `stages:` — a list of
`{name: align | experts | lora | full, steps: N, lr: ...}` run in order on the same model:

    run_stages(load_stage_config("configs/models/tiny-uni-moe.yaml"))   # on every rank

Each stage freezes all but its parameters (UniMoE.set_stage) and builds a fresh Engine over
exactly the trainable ones, so a frozen parameter is neither changed nor given optimizer state
(the replicated dense optimizer is used so that the optimizer holds per-parameter state); the
gradients a frozen parameter still receives (fssdp reduces expert gradients whatever their
requires_grad) are dropped after every step. Expert
weights live in the strategy's (sharded) MoE layers as in any run. Data: hecate.data.multimodal
(image-like patches, audio-like frames, captions), rank r of W reading its slice of each step.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch

from hecate.models.uni_moe import STAGES


@dataclass
class StageConfig:
    model: dict
    stages: list
    strategy: str = "local"
    strategy_options: dict = field(default_factory=dict)
    batch_size: int = 8
    seed: int = 0
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0


def load_stage_config(path: str, overrides: dict | None = None) -> StageConfig:
    import yaml

    from hecate.models.registry import get_preset

    with open(path) as f:
        data = yaml.safe_load(f) or {}
    data.update(overrides or {})
    unknown = set(data) - {"model", "stages", "parallel", "data", "train"}
    if unknown:
        raise ValueError(f"{path}: unknown top-level keys {sorted(unknown)} (model, stages, parallel, data, train)")
    model = dict(data.get("model") or {})
    name = model.pop("preset", None)
    if model.pop("arch", "uni_moe") != "uni_moe":
        raise ValueError(f"{path}: model.arch must be uni_moe for a staged run")
    if name is not None:
        model = {**copy.deepcopy(get_preset(name).config), **model}
    stages = data.get("stages")
    if not isinstance(stages, list) or not stages:
        raise ValueError(f"{path}: stages must be a non-empty list of {{name, steps, lr}}")
    for i, st in enumerate(stages):
        if not isinstance(st, dict) or st.get("name") not in STAGES or not isinstance(st.get("steps"), int) \
                or st["steps"] < 1:
            raise ValueError(f"{path}: stages[{i}]={st!r} needs name in {STAGES} and steps >= 1")
    p = dict(data.get("parallel") or {})
    d, t = dict(data.get("data") or {}), dict(data.get("train") or {})
    return StageConfig(model=model, stages=stages, strategy=p.get("strategy", "local"),
                       strategy_options=dict(p.get("options") or {}), batch_size=d.get("batch_size", 8),
                       seed=t.get("seed", 0))


def run_stages(cfg: StageConfig, rank: int = 0, world: int = 1, topology=None, model=None,
               on_stage_end=None) -> list[dict]:
    """Train every stage in order; returns one record per stage: name, trainable parameter names,
    losses. `on_stage_end(stage, model, engine)` (optional) sees the state after each stage."""
    from hecate.data.multimodal import multimodal_batch
    from hecate.models.registry import build_model
    from hecate.parallel import build_strategy, parallelize
    from hecate.train.engine import Engine

    if model is None:
        torch.manual_seed(cfg.seed)
        model = build_model("uni_moe", cfg.model)
    strategy = build_strategy(cfg.strategy, None if cfg.strategy == "local" else topology, **cfg.strategy_options)
    parallelize(model, strategy)
    records, step = [], 0
    for st in cfg.stages:
        names = model.set_stage(st["name"])
        engine = Engine(model, strategy, topology, lr=st.get("lr", 1e-3), weight_decay=cfg.weight_decay,
                        max_grad_norm=cfg.max_grad_norm, dense_optimizer="replicated")
        losses = []
        for _ in range(st["steps"]):
            batch, targets = multimodal_batch(cfg.seed, cfg.batch_size, start=(step * world + rank) * cfg.batch_size)
            loss, _ = model.loss(batch, targets)
            loss.backward()
            engine.step()
            # fssdp computes expert gradients with its own autograd and writes them into the owned
            # chunks even when they are frozen: drop every gradient the stage's optimizer did not
            # consume, so nothing leaks into a later stage.
            for p in model.parameters():
                p.grad = None
            losses.append(float(loss.detach()))
            step += 1
        records.append({"name": st["name"], "trainable": names, "losses": losses})
        if on_stage_end is not None:
            on_stage_end(st, model, engine)
    return records
