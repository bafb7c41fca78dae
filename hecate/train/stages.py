"""Progressive (multi-stage) training from one config: Uni-MoE's three stages.

A stage config is a YAML with `model:` (a `uni_moe` model section: `preset:` plus overrides, or
the full config), `parallel:` (strategy, options) and `stages:` — a list of
`{name: align | experts | lora | full, steps: N, lr: ...}` run in order on the same model:

    run_stages(load_stage_config("configs/models/tiny-uni-moe.yaml"))   # on every rank
    hecate train configs/models/tiny-uni-moe.yaml [--nproc N] [--set stages.experts.steps=5]

`hecate train` of a staged config checks it, takes the run-directory lock and runs the preflight of
normal runs (hecate.train.preflight.preflight_stages), then launches its workers like any run; each
runs `train_stages`, which writes out_dir (`train.out_dir`) metrics.jsonl (one record per step,
flushed as it goes: step, stage, stage_index, loss, lr), stages/<i>-<name>.safetensors (the full
model after each stage, export_safetensors names), stages.json (rewritten after each stage: name,
steps, end_step, trainable parameter names, snapshot file with its sha256 and size, first/last
loss) and checkpoints in checkpoints/ (save_checkpoint with the stage's optimizer; the manifest's
`extra.stage` says which stage and how many of its steps): one at the end of every stage, and
every `checkpoint.every` global steps if set. Before a snapshot or checkpoint every rank checks
its parameters are finite (refuse_nonfinite): a NaN/inf anywhere stops the run with a
NonFiniteError naming the stage, step, parameter and rank, and nothing of that step is written,
so the newest checkpoint stays the last good one. `--resume` (and the launcher's restarts,
`--max-restarts`) continue from the newest checkpoint: resume_point verifies it and every finished
stage's snapshot, checks the config still describes the run (model, seed, batch size, the finished
stages' names and steps), then the run loads it (weights, and the optimizer state when it was
taken inside a stage) and carries on from that stage and step with the same data. A SIGTERM or
SIGINT on any rank ends the run after the current step, every rank agreeing, with a checkpoint of
that step (the summary says `stopped`; the launcher says to continue with --resume).

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
import json
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
    checkpoint_every: int = 0          # also checkpoint every N global steps (0: at stage ends only)
    checkpoint_keep: int | None = None  # complete checkpoints kept (None: all)


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
    unknown = set(data) - {"model", "stages", "parallel", "data", "train", "checkpoint"}
    if unknown:
        raise ValueError(f"{path}: unknown top-level keys {sorted(unknown)} (model, stages, parallel, data, train, "
                         "checkpoint)")
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
    c = dict(data.get("checkpoint") or {})
    for section, got, known in (("parallel", p, {"strategy", "options", "nproc"}), ("data", d, {"batch_size"}),
                                ("train", t, {"seed", "out_dir"}), ("checkpoint", c, {"every", "keep"})):
        if set(got) - known:
            raise ValueError(f"{path}: unknown keys {sorted(set(got) - known)} in {section} (a staged config "
                             f"takes {sorted(known)})")
    every, keep = c.get("every", 0), c.get("keep")
    if not isinstance(every, int) or isinstance(every, bool) or every < 0:
        raise ValueError(f"{path}: checkpoint.every={every!r} must be an int >= 0 (0: at stage ends only)")
    if keep is not None and (not isinstance(keep, int) or isinstance(keep, bool) or keep < 1):
        raise ValueError(f"{path}: checkpoint.keep={keep!r} must be an int >= 1 or null (keep all)")
    return StageConfig(model=model, stages=stages, strategy=p.get("strategy", "local"),
                       strategy_options=dict(p.get("options") or {}), batch_size=d.get("batch_size", 8),
                       seed=t.get("seed", 0), out_dir=t.get("out_dir", StageConfig.out_dir),
                       checkpoint_every=every, checkpoint_keep=keep)


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


def snapshot_path(out_dir, i: int, name: str):
    """The full model after stages[i]: out_dir/stages/<i>-<name>.safetensors."""
    from pathlib import Path

    return Path(out_dir) / "stages" / f"{i}-{name}.safetensors"


def _stage_record(cfg: StageConfig) -> dict:
    """What a checkpoint of a staged run records of its config (resume checks it against the new one)."""
    import json

    return json.loads(json.dumps({"staged": True, "model": cfg.model, "stages": cfg.stages, "strategy": cfg.strategy,
                                  "seed": cfg.seed, "batch_size": cfg.batch_size}))


@dataclass
class ResumePoint:
    """Where a staged run continues: after global `step`, `stage_step` steps into stages[`stage`]
    (stage_step == that stage's steps: the stage is over, the next one starts fresh)."""
    step: int
    stage: int
    stage_step: int
    checkpoint: str
    progress: list  # stages.json entries of the stages already over (snapshots verified)


def resume_point(cfg: StageConfig) -> ResumePoint:
    """Verify the newest checkpoint under out_dir/checkpoints (every shard's size and sha256) and the
    snapshot of every stage it has finished (stages.json's sha256), check the config still describes
    the run that wrote them, and say where to continue. Errors name the file or the config key."""
    from pathlib import Path

    from hecate.train.checkpoint import read_manifest, resolve_checkpoint, verify_checkpoint
    from hecate.train.checkpoint_io import CheckpointError, read_verified

    out = Path(cfg.out_dir)
    ckpt = out / "checkpoints"
    if not ckpt.is_dir():
        raise ValueError(f"--resume: no checkpoints under {ckpt}; train the staged config without --resume first")
    step = verify_checkpoint(str(ckpt))
    step_dir = resolve_checkpoint(str(ckpt))
    manifest = read_manifest(step_dir)
    where = (manifest.get("extra") or {}).get("stage")
    saved = manifest.get("config") or {}
    if not saved.get("staged") or not isinstance(where, dict):
        raise CheckpointError(f"{step_dir} is not a staged run's checkpoint (no stage in its manifest); resume it "
                              "with its own config, or choose another train.out_dir")
    now = _stage_record(cfg)
    for key in ("model", "seed", "batch_size"):
        if saved.get(key) != now[key]:
            raise ValueError(f"--resume: {key} differs from the run in {out} (checkpoint {step_dir}): "
                             f"{saved.get(key)!r} there, {now[key]!r} now; resume with the same config")
    i, k = int(where["index"]), int(where["stage_step"])
    old = saved["stages"]
    names = [st["name"] for st in cfg.stages]
    if i >= len(cfg.stages) or cfg.stages[i]["name"] != old[i]["name"] or cfg.stages[i]["steps"] < k:
        raise ValueError(f"--resume: the checkpoint {step_dir} is {k} steps into stages[{i}] "
                         f"({old[i]['name']}, {old[i]['steps']} steps); the config's stages {names} do not "
                         "continue it (same stage there, with at least that many steps)")
    for j in range(i):
        if (cfg.stages[j]["name"], cfg.stages[j]["steps"]) != (old[j]["name"], old[j]["steps"]):
            raise ValueError(f"--resume: stages[{j}] ran as {old[j]['name']} for {old[j]['steps']} steps in "
                             f"{out}; the config now says {cfg.stages[j]['name']} for {cfg.stages[j]['steps']}")
    if step != sum(st["steps"] for st in cfg.stages[:i]) + k:
        raise CheckpointError(f"{step_dir}: step {step} does not match stage {i} step {k} of the schedule")
    over = i + 1 if k == cfg.stages[i]["steps"] else i
    progress_path = out / "stages.json"
    try:
        progress = json.loads(progress_path.read_text()) if over else []
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{progress_path} cannot be read ({e}); it records the finished stages' "
                              "snapshots the resumed run needs") from None
    if not isinstance(progress, list) or len(progress) < over:
        raise CheckpointError(f"{progress_path} records {len(progress) if isinstance(progress, list) else 0} "
                              f"finished stages, the checkpoint {step_dir} has finished {over}")
    for j, entry in enumerate(progress[:over]):
        if not isinstance(entry, dict) or entry.get("name") != cfg.stages[j]["name"] or "sha256" not in entry:
            raise CheckpointError(f"{progress_path}: entry {j} does not describe stage {cfg.stages[j]['name']!r}'s "
                                  "snapshot (name, sha256, bytes)")
        read_verified(str(snapshot_path(out, j, cfg.stages[j]["name"])), entry["sha256"], entry.get("bytes"))
    return ResumePoint(step=step, stage=i, stage_step=k, checkpoint=step_dir, progress=progress[:over])


def train_stages(cfg: StageConfig, resume: bool | str = False) -> dict:
    """One rank of `hecate train STAGED_CONFIG`: run every stage, writing out_dir (module docstring).
    resume: False, True (--resume: a checkpoint must exist) or "if_any" (a launcher's restart).
    Returns a summary (stages, steps, first/last loss, checkpoint) for the launcher's rank-0 line."""
    import os
    import time
    from pathlib import Path

    from hecate.comm.topology import Topology
    from hecate.train.checkpoint import export_safetensors, save_checkpoint
    from hecate.train.checkpoint_io import atomic_write_json, sha256_hex
    from hecate.train.faults import RunLock, StopRequest, injected_fault
    from hecate.train.metrics import truncate_metrics
    from hecate.train.trainer import init_distributed

    t0 = time.time()
    device, owns_group = init_distributed()  # NCCL on a GPU machine: the model and batches go there
    lock = None
    stop = StopRequest().install()  # SIGTERM / SIGINT: finish the step, checkpoint it, leave together
    try:
        topology = Topology()
        rank, world = topology.rank, topology.world_size
        check_world(cfg, world)
        out = Path(cfg.out_dir)
        ckpt_dir = out / "checkpoints"
        if rank == 0:
            out.mkdir(parents=True, exist_ok=True)
            if not os.environ.get("HECATE_RUN_LOCK_HELD"):  # hecate's launcher holds it for the whole run
                lock = RunLock(out).acquire()
        if resume == "if_any":
            resume = ckpt_dir.is_dir() and any((d / "manifest.json").is_file() for d in ckpt_dir.glob("step_*"))
        point = resume_point(cfg) if resume else None
        start = point.step if point else 0
        progress = list(point.progress) if point else []
        losses: dict[int, list] = {}  # rank 0: stage index -> losses of its logged steps
        if rank == 0:
            (out / "stages").mkdir(parents=True, exist_ok=True)
            path = out / "metrics.jsonl"
            if point:
                truncate_metrics(path, start)  # the steps after the checkpoint are about to run again
                for line in path.read_text().splitlines():
                    rec = json.loads(line)
                    losses.setdefault(rec.get("stage_index"), []).append(rec["loss"])
            metrics = open(path, "a" if point else "w")
        state = {"checkpoint": point.checkpoint if point else None}

        def save(step, i, k, model, engine):
            refuse_nonfinite(model, world, f"stages[{i}] {cfg.stages[i]['name']!r}, step {step} (stage step {k})",
                             ckpt_dir)
            state["saved"] = True
            state["checkpoint"] = save_checkpoint(
                str(ckpt_dir), model, engine.strategy, engine, step, config_dict=_stage_record(cfg),
                topology=topology, extra={"stage": {"index": i, "name": cfg.stages[i]["name"], "stage_step": k}},
                keep=cfg.checkpoint_keep)

        def on_step_end(i, k, step, loss, model, engine):
            if rank == 0:
                losses.setdefault(i, []).append(loss)
                metrics.write(json.dumps({"step": step, "stage": cfg.stages[i]["name"], "stage_index": i,
                                          "loss": loss, "lr": cfg.stages[i].get("lr", 1e-3)}) + "\n")
                metrics.flush()
            if k == cfg.stages[i]["steps"]:  # the stage is over: its snapshot, then its checkpoint
                st = cfg.stages[i]
                # a NaN'd stage must not leave a snapshot either (save checks again: cheap, agreed)
                refuse_nonfinite(model, world, f"stages[{i}] {st['name']!r}, step {step} (stage step {k})", ckpt_dir)
                snapshot = snapshot_path(out, i, st["name"])
                export_safetensors(snapshot, model, engine.strategy, topology)  # collective
                if rank == 0:
                    data = snapshot.read_bytes()
                    run = losses.get(i, [])
                    del progress[i:]
                    progress.append({"name": st["name"], "steps": st["steps"], "end_step": step,
                                     "trainable": sorted(n for n, p in model.named_parameters() if p.requires_grad),
                                     "snapshot": str(snapshot), "sha256": sha256_hex(data), "bytes": len(data),
                                     "first_loss": run[0] if run else None, "last_loss": run[-1] if run else None})
                    atomic_write_json(str(out / "stages.json"), progress)
                save(step, i, k, model, engine)
            elif cfg.checkpoint_every and step % cfg.checkpoint_every == 0:
                save(step, i, k, model, engine)
            else:
                state["saved"] = False
            injected_fault(rank, step + 1)  # tests: HECATE_FAULT (hecate.train.faults)
            if _agreed(stop.requested, world):  # some rank was asked to stop: all checkpoint and leave
                if not state.get("saved", True):
                    save(step, i, k, model, engine)
                raise _Stopped(step)

        def load(model, strategy, engine):
            from hecate.train.checkpoint import load_checkpoint

            load_checkpoint(point.checkpoint, model, strategy, engine, topology)

        stopped_at = None
        try:
            run_stages(cfg, rank, world, topology, on_step_end=on_step_end,
                       resume_from=(point.stage, point.stage_step, load) if point else None, device=device)
        except _Stopped as e:
            stopped_at = e.step
        if rank == 0:
            metrics.close()
        if stopped_at is not None:
            return {"stopped": True, "stopped_at": stopped_at, "checkpoint": state["checkpoint"],
                    "seconds": time.time() - t0}
        steps = sum(st["steps"] for st in cfg.stages)
        firsts = [losses[i][0] for i in sorted(k for k in losses if k is not None) if losses[i]]
        lasts = [losses[i][-1] for i in sorted(k for k in losses if k is not None) if losses[i]]
        return {"stages": [st["name"] for st in cfg.stages], "steps": steps, "resumed_from": start if point else None,
                "checkpoint": state["checkpoint"], "first_loss": firsts[0] if firsts else None,
                "last_loss": lasts[-1] if lasts else None, "seconds": time.time() - t0}
    finally:
        stop.uninstall()
        if lock is not None:
            lock.release()
        if owns_group:
            import torch.distributed as dist

            dist.destroy_process_group()


def refuse_nonfinite(model, world: int, where: str, ckpt_dir) -> None:
    """Raise NonFiniteError, on every rank, when any rank holds a NaN/inf parameter: a staged run
    must neither save nor later resume from a diverged stage. The message names the stage and
    step (`where`), the first such parameter and its rank (collective: every rank calls it)."""
    from hecate.train.faults import NonFiniteError

    bad = next((n for n, p in model.named_parameters() if not bool(torch.isfinite(p).all())), None)
    rank = 0
    if world > 1:
        import torch.distributed as dist

        from hecate.comm.all_to_all import comm_device

        flag = torch.tensor([0.0 if bad is None else 1.0], device=comm_device(None))
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if not float(flag):
            return
        names = [None] * world
        dist.all_gather_object(names, bad)  # only on the error path: every rank agreed to be here
        rank = next(r for r, n in enumerate(names) if n is not None)
        bad = names[rank]
    if bad is not None:
        raise NonFiniteError(f"{where}: parameter {bad} is not finite (NaN/inf) on rank {rank}; no stage "
                             f"snapshot or checkpoint written (the newest good one stays under {ckpt_dir}); "
                             "lower that stage's lr and --resume")


class _Stopped(Exception):
    """A stop request ended the staged run after `step` (its checkpoint written)."""

    def __init__(self, step: int):
        super().__init__(f"stopped after step {step}")
        self.step = step


def _agreed(flag: bool, world: int) -> bool:
    """Whether any rank's flag is set (an all-reduce: every rank calls it every step)."""
    if world == 1:
        return flag
    import torch.distributed as dist

    from hecate.comm.all_to_all import comm_device

    t = torch.tensor([1.0 if flag else 0.0], device=comm_device(None))
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def _to_device(batch, targets, device):
    """((tokens, {modality: features}), targets) on `device` (pinned, non-blocking from the host)."""
    from hecate import ops

    tokens, features = batch
    return ((ops.to_device(tokens, device), {k: ops.to_device(v, device) for k, v in features.items()}),
            ops.to_device(targets, device))


def run_stages(cfg: StageConfig, rank: int = 0, world: int = 1, topology=None, model=None,
               on_stage_end=None, on_step_end=None, resume_from=None, device=None) -> list[dict]:
    """Train every stage in order; returns one record per stage run here: name, trainable parameter
    names, losses. `on_stage_end(stage, model, engine)` (optional) sees the state after each stage;
    `on_step_end(stage_index, stage_step, step, loss, model, engine)` after every step (1-based
    stage_step and global step). `resume_from=(i, k, load)`: skip to k steps into stages[i], where
    `load(model, strategy, engine)` restores the checkpoint taken there (engine None when k is the
    stage's last step: the next stage starts with a fresh optimizer). `device`: where the model is
    moved and trained (train_stages passes init_distributed's, the rank's GPU under NCCL); None
    keeps the model where it is. The batches follow the model."""
    from hecate.data.multimodal import multimodal_batch
    from hecate.models.registry import build_model
    from hecate.parallel import build_strategy, parallelize
    from hecate.train.engine import Engine

    if model is None:
        torch.manual_seed(cfg.seed)
        model = build_model("uni_moe", cfg.model)  # on the host: the same weights on any device
    if device is not None:
        model.to(device)
    # Batches go where the model is (on a GPU the NCCL collectives take CUDA tensors only).
    device = next(model.parameters()).device
    strategy = build_strategy(cfg.strategy, None if cfg.strategy == "local" else topology, **cfg.strategy_options)
    parallelize(model, strategy)
    first, skip, load = resume_from if resume_from is not None else (0, 0, None)
    if load is not None and skip == cfg.stages[first]["steps"]:  # resumed at a stage boundary: weights only
        load(model, strategy, None)
        first, skip, load = first + 1, 0, None
    records, step = [], sum(st["steps"] for st in cfg.stages[:first]) + skip
    for i in range(first, len(cfg.stages)):
        st = cfg.stages[i]
        names = model.set_stage(st["name"])
        engine = Engine(model, strategy, topology, lr=st.get("lr", 1e-3), weight_decay=cfg.weight_decay,
                        max_grad_norm=cfg.max_grad_norm, dense_optimizer="replicated")
        done = 0
        if load is not None:  # resumed inside this stage: its weights and optimizer state
            load(model, strategy, engine)
            done, load = skip, None
        losses = []
        for k in range(done + 1, st["steps"] + 1):
            batch, targets = multimodal_batch(cfg.seed, cfg.batch_size, start=(step * world + rank) * cfg.batch_size)
            loss, _ = model.loss(*_to_device(batch, targets, device))
            loss.backward()
            engine.step()
            # fssdp computes expert gradients with its own autograd and writes them into the owned
            # chunks even when they are frozen: drop every gradient the stage's optimizer did not
            # consume, so nothing leaks into a later stage.
            for p in model.parameters():
                p.grad = None
            losses.append(float(loss.detach()))
            step += 1
            if on_step_end is not None:
                on_step_end(i, k, step, losses[-1], model, engine)
        records.append({"name": st["name"], "trainable": names, "losses": losses})
        if on_stage_end is not None:
            on_stage_end(st, model, engine)
    return records


def inspect_stages(cfg: StageConfig, world: int) -> dict:
    """`hecate inspect STAGED_CONFIG`: the model's counts (meta device), the per-rank estimate under
    parallel.strategy, and per stage the parameters it trains (the others are frozen)."""
    from hecate.models.registry import build_model, count_parameters
    from hecate.parallel import build_strategy, parallelize
    from hecate.train.model_stats import expert_state_estimate

    if world < 1:
        raise ValueError(f"--nproc={world} must be >= 1")
    check_world(cfg, world)
    model = build_model("uni_moe", cfg.model, device="meta")
    layers = model.moe_layers()
    for m in layers:
        if cfg.strategy == "ep" and m.config.num_experts % world:
            raise ValueError(f"--nproc={world} must divide num_experts={m.config.num_experts} for parallel.strategy=ep")
    info = {"arch": "uni_moe", **count_parameters(model), "moe_layers": len(layers),
            "routed_expert_params": sum(q.numel() for m in layers for q in m.experts.parameters()),
            # AdamW state counted for every parameter: an upper bound for any one stage
            "memory_per_rank": expert_state_estimate(model, cfg.strategy, world, dense_optimizer="replicated")}
    parallelize(model, build_strategy("local", None))  # stage_parameters names the experts as a strategy holds them
    sizes = dict((n, p.numel()) for n, p in model.named_parameters())
    info["stages"] = [{"name": st["name"], "steps": st["steps"], "lr": st.get("lr", 1e-3),
                       "trainable_params": sum(sizes[n] for n in model.stage_parameters(st["name"]))}
                      for st in cfg.stages]
    return info
