"""Progressive (multi-stage) training from one config: Uni-MoE's three stages.

A stage config is a YAML with `model:` (a `uni_moe` model section: `preset:` plus overrides, or
the full config), `parallel:` (strategy, options) and `stages:` — a list of
`{name: align | experts | lora | full, steps: N, lr: ...}` run in order on the same model:

    run_stages(load_stage_config("configs/models/tiny-uni-moe.yaml"))   # on every rank
    hecate train configs/models/tiny-uni-moe.yaml [--nproc N] [--set stages.experts.steps=5]

`hecate train` of a staged config launches its workers like any run; each runs `train_stages`,
which writes out_dir (`train.out_dir`) metrics.jsonl (one record per step: step, stage, loss, lr),
stages/<i>-<name>.safetensors (the full model after each stage, export_safetensors names),
stages.json (per stage: name, steps, trainable parameter names, snapshot file, first/last loss)
and a final checkpoint in checkpoints/ (save_checkpoint, the last stage's optimizer).

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
    out_dir: str = "runs/uni-moe"


def is_stage_config(path: str) -> bool:
    """Whether config `path` (file or configs/ name) is a staged run (a top-level `stages:` key)."""
    from hecate.train.config import parse_yaml, resolve_config_path

    resolved = resolve_config_path(path)
    try:
        text = resolved.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        return False  # not ours: hecate.train.config.load_config names the bad byte
    data = parse_yaml(text, str(resolved))
    return isinstance(data, dict) and "stages" in data


def apply_stage_overrides(data: dict, overrides: list[str]) -> dict:
    """`--set` for a staged config: `stages.<index or name>.<key>=v` sets one stage's key,
    `stages.<key>=v` (steps, lr) sets it in every stage; other keys as in hecate.train.config."""
    from hecate.train.config import apply_overrides, parse_yaml

    rest = []
    for item in overrides or []:
        key, _, raw = item.partition("=")
        parts = key.strip().split(".")
        if parts[0] != "stages":
            rest.append(item)
            continue
        stages = data.get("stages")
        if not isinstance(stages, list) or len(parts) not in (2, 3) or not raw.strip():
            raise ValueError(f"override {item!r}: write stages.<index|name>.<key>=VALUE or stages.<key>=VALUE "
                             "(e.g. stages.steps=2, stages.experts.lr=1e-3)")
        value = parse_yaml(raw, f"--set {key}")
        if len(parts) == 2:
            targets = stages
        else:
            sel = parts[1]
            targets = [st for i, st in enumerate(stages) if str(i) == sel or (isinstance(st, dict) and st.get("name") == sel)]
            if not targets:
                names = [st.get("name") if isinstance(st, dict) else st for st in stages]
                raise ValueError(f"override {item!r}: no stage {sel!r}; stages are {names} (index 0..{len(stages) - 1})")
        for st in targets:
            if not isinstance(st, dict):
                raise ValueError(f"override {item!r}: stage {st!r} is not a mapping")
            st[parts[-1]] = value
    return apply_overrides(data, rest)


def load_stage_config(path: str, overrides: dict | list[str] | None = None) -> StageConfig:
    """`overrides`: a dict replacing top-level sections, or `--set` strings (apply_stage_overrides)."""
    from hecate.models.registry import get_preset
    from hecate.train.config import parse_yaml, resolve_config_path

    resolved = resolve_config_path(path)
    data = parse_yaml(resolved.read_text(), str(resolved)) or {}
    if isinstance(overrides, list):
        apply_stage_overrides(data, overrides)
    else:
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
    for section, got, known in (("parallel", p, {"strategy", "options", "nproc"}), ("data", d, {"batch_size"}),
                                ("train", t, {"seed", "out_dir"})):
        if set(got) - known:
            raise ValueError(f"{path}: unknown keys {sorted(set(got) - known)} in {section} (a staged config "
                             f"takes {sorted(known)})")
    return StageConfig(model=model, stages=stages, strategy=p.get("strategy", "local"),
                       strategy_options=dict(p.get("options") or {}), batch_size=d.get("batch_size", 8),
                       seed=t.get("seed", 0), out_dir=t.get("out_dir", StageConfig.out_dir))


def stage_nproc(path: str, overrides: list[str] | None = None) -> int:
    """parallel.nproc of a staged config (default 1)."""
    from hecate.train.config import apply_overrides, parse_yaml, resolve_config_path

    resolved = resolve_config_path(path)
    data = apply_overrides(parse_yaml(resolved.read_text(), str(resolved)) or {},
                           [o for o in overrides or [] if not o.startswith("stages.")])
    return int((data.get("parallel") or {}).get("nproc", 1))


def check_world(cfg: StageConfig, world: int) -> None:
    """A clear error before any worker starts: `local` runs on one rank only."""
    if cfg.strategy == "local" and world != 1:
        raise ValueError(f"parallel.strategy=local runs on 1 rank, got {world}; pass --nproc 1 or "
                         "--set parallel.strategy=ep (or dp, fsdp, fssdp)")


def train_stages(cfg: StageConfig) -> dict:
    """One rank of `hecate train STAGED_CONFIG`: run every stage, writing out_dir (module docstring).
    Returns a summary (stages, steps, first/last loss, checkpoint) for the launcher's rank-0 line."""
    import json
    import time
    from pathlib import Path

    from hecate.comm.topology import Topology
    from hecate.train.checkpoint import export_safetensors, save_checkpoint
    from hecate.train.checkpoint_io import atomic_write_json
    from hecate.train.trainer import init_distributed

    t0 = time.time()
    _, owns_group = init_distributed()
    try:
        topology = Topology()
        rank, world = topology.rank, topology.world_size
        check_world(cfg, world)
        out = Path(cfg.out_dir)
        if rank == 0:
            (out / "stages").mkdir(parents=True, exist_ok=True)
            metrics = open(out / "metrics.jsonl", "w")
        done, state = [], {"step": 0}

        def on_stage_end(st, model, engine):
            i = len(done)
            snapshot = out / "stages" / f"{i}-{st['name']}.safetensors"
            export_safetensors(snapshot, model, engine.strategy, topology)  # collective
            state["model"], state["engine"] = model, engine
            done.append((st, snapshot))

        records = run_stages(cfg, rank, world, topology, on_stage_end=on_stage_end)
        summary_stages = []
        for (st, snapshot), rec in zip(done, records):
            if rank == 0:
                for loss in rec["losses"]:
                    state["step"] += 1
                    metrics.write(json.dumps({"step": state["step"], "stage": st["name"], "loss": loss,
                                              "lr": st.get("lr", 1e-3)}) + "\n")
            summary_stages.append({"name": st["name"], "steps": st["steps"], "trainable": rec["trainable"],
                                   "snapshot": str(snapshot), "first_loss": rec["losses"][0],
                                   "last_loss": rec["losses"][-1]})
        steps = sum(st["steps"] for st in cfg.stages)
        model, engine = state["model"], state["engine"]
        ckpt = save_checkpoint(str(out / "checkpoints"), model, engine.strategy, engine, steps,
                               config_dict={"staged": True, "model": cfg.model, "stages": cfg.stages,
                                            "strategy": cfg.strategy},
                               topology=topology)
        if rank == 0:
            metrics.close()
            atomic_write_json(str(out / "stages.json"), summary_stages)
        return {"stages": [s["name"] for s in summary_stages], "steps": steps, "checkpoint": ckpt,
                "first_loss": records[0]["losses"][0], "last_loss": records[-1]["losses"][-1],
                "seconds": time.time() - t0}
    finally:
        if owns_group:
            import torch.distributed as dist

            dist.destroy_process_group()


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
