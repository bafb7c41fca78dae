"""DeepSpeed JSON config -> Hecate TrainConfig sections (no DeepSpeed import needed).

`translate_deepspeed_config(ds, world_size)` returns `(sections, notes)`: `sections` is a
partial TrainConfig dict (optim / data / train keys), `notes` lists keys that were accepted
but change nothing in Hecate's math (e.g. ZeRO stage 1/2 shards optimizer state that Hecate
keeps replicated for the small dense part). Every key Hecate cannot honour is collected and
reported in ONE ValueError, so a user fixes the whole file at once. See docs/deepspeed.md.
"""
from __future__ import annotations

import copy
import json
import os
from typing import Any, Optional, Tuple

# Keys accepted for their performance effect only: same result in Hecate.
_ZERO_PERF_KEYS = ("contiguous_gradients", "overlap_comm", "reduce_bucket_size", "allgather_bucket_size",
                   "reduce_scatter", "allgather_partitions", "round_robin_gradients",
                   "load_from_fp32_weights", "elastic_checkpoint", "ignore_unused_parameters")
_TOP_PERF_KEYS = ("wall_clock_breakdown", "zero_allow_untested_optimizer", "memory_breakdown",
                  "dump_state", "flops_profiler", "comms_logger", "tensorboard", "wandb", "csv_monitor")


def _number(value, key: str, problems: list, positive: bool = False) -> Optional[float]:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        problems.append(f"{key}: must be a number, got {value!r}")
        return None
    if positive and not value > 0:
        problems.append(f"{key}: must be > 0, got {value!r}")
        return None
    return float(value)


def _int(value, key: str, problems: list) -> Optional[int]:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        problems.append(f"{key}: must be a positive integer, got {value!r}")
        return None
    return value


def _batch(ds: dict, world: int, problems: list) -> Tuple[Optional[int], Optional[int]]:
    """(micro batch per rank, accumulation steps) from DeepSpeed's three batch keys."""
    tbs, mbs, gas = (ds.get(k) for k in ("train_batch_size", "train_micro_batch_size_per_gpu",
                                         "gradient_accumulation_steps"))
    tbs = None if tbs is None else _int(tbs, "train_batch_size", problems)
    mbs = None if mbs is None else _int(mbs, "train_micro_batch_size_per_gpu", problems)
    gas = None if gas is None else _int(gas, "gradient_accumulation_steps", problems)
    if problems:
        return None, None
    if tbs is None and mbs is None:
        problems.append("train_batch_size / train_micro_batch_size_per_gpu: set at least one")
        return None, None
    if mbs is not None and gas is None:
        gas = 1 if tbs is None else tbs // (mbs * world) if tbs % (mbs * world) == 0 else None
        if gas is None:
            problems.append(f"train_batch_size={tbs} is not a multiple of train_micro_batch_size_per_gpu="
                            f"{mbs} x world_size={world}")
            return None, None
    if mbs is None:
        gas = gas or 1
        if tbs % (gas * world):
            problems.append(f"train_batch_size={tbs} is not divisible by gradient_accumulation_steps={gas} "
                            f"x world_size={world}")
            return None, None
        mbs = tbs // (gas * world)
    if tbs is not None and tbs != mbs * gas * world:
        problems.append(f"train_batch_size={tbs} must equal train_micro_batch_size_per_gpu={mbs} x "
                        f"gradient_accumulation_steps={gas} x world_size={world} = {mbs * gas * world}")
        return None, None
    return mbs, gas


def _optimizer(opt: Any, optim: dict, problems: list) -> None:
    if not isinstance(opt, dict):
        problems.append(f"optimizer: must be a mapping with 'type' and 'params', got {opt!r}")
        return
    kind = str(opt.get("type", "")).lower()
    params = dict(opt.get("params") or {})
    if kind not in ("adam", "adamw"):
        problems.append(f"optimizer.type={opt.get('type')!r}: Hecate trains with AdamW only "
                        "(use 'Adam' or 'AdamW')")
        return
    for extra in sorted(set(opt) - {"type", "params"}):
        problems.append(f"optimizer.{extra}: unknown key")
    if "lr" in params:
        optim["lr"] = _number(params.pop("lr"), "optimizer.params.lr", problems, positive=True)
    if "betas" in params:
        b = params.pop("betas")
        if not isinstance(b, (list, tuple)) or len(b) != 2:
            problems.append(f"optimizer.params.betas: must be two numbers, got {b!r}")
        else:
            optim["betas"] = [float(v) for v in b]
    if "eps" in params:
        optim["eps"] = _number(params.pop("eps"), "optimizer.params.eps", problems, positive=True)
    wd = params.pop("weight_decay", 0.0)
    optim["weight_decay"] = _number(wd, "optimizer.params.weight_decay", problems)
    # DeepSpeed's "Adam" is decoupled (AdamW) unless adam_w_mode=false.
    adam_w_mode = params.pop("adam_w_mode", True)
    if kind == "adam" and adam_w_mode is False and wd:
        problems.append("optimizer.params.adam_w_mode=false with weight_decay>0 (L2-regularized Adam): "
                        "Hecate's AdamW decouples weight decay; set adam_w_mode=true or weight_decay=0")
    params.pop("torch_adam", None)  # which kernel runs the same update
    if params.pop("amsgrad", False):
        problems.append("optimizer.params.amsgrad=true: Hecate's AdamW runs without amsgrad")
    if params.pop("bias_correction", True) is not True:
        problems.append("optimizer.params.bias_correction=false: Hecate's AdamW always bias-corrects")
    for extra in sorted(params):
        problems.append(f"optimizer.params.{extra}: not supported")


def _scheduler(sched: Any, optim: dict, train: dict, problems: list) -> None:
    if not isinstance(sched, dict):
        problems.append(f"scheduler: must be a mapping with 'type' and 'params', got {sched!r}")
        return
    kind = sched.get("type")
    p = dict(sched.get("params") or {})
    wtype = p.pop("warmup_type", "log")
    if wtype != "linear":
        problems.append(f"scheduler.params.warmup_type={wtype!r}: Hecate warms up linearly; set "
                        "\"warmup_type\": \"linear\" (DeepSpeed's default is 'log')")
    p.pop("last_batch_iteration", None)
    if kind == "WarmupLR":
        if p.pop("warmup_min_lr", 0.0):
            problems.append("scheduler.params.warmup_min_lr: Hecate's warmup starts near 0; set it to 0")
        lr = p.pop("warmup_max_lr", 0.001)
        optim["lr"] = _number(lr, "scheduler.params.warmup_max_lr", problems, positive=True)
        optim["min_lr"] = optim["lr"]  # cosine from lr to lr: constant after warmup
        optim["warmup_steps"] = int(p.pop("warmup_num_steps", 1000))
    elif kind == "WarmupCosineLR":
        if p.pop("warmup_min_ratio", 0.0):
            problems.append("scheduler.params.warmup_min_ratio: Hecate's warmup starts near 0; set it to 0")
        total = p.pop("total_num_steps", None)
        if total is None:
            problems.append("scheduler.params.total_num_steps: required for WarmupCosineLR")
        else:
            train["steps"] = _int(total, "scheduler.params.total_num_steps", problems)
        optim["warmup_steps"] = int(p.pop("warmup_num_steps", 1000))
        optim["_cos_min_ratio"] = _number(p.pop("cos_min_ratio", 0.0001), "scheduler.params.cos_min_ratio",
                                          problems)
    elif kind == "WarmupDecayLR":
        problems.append("scheduler.type='WarmupDecayLR': Hecate's trainer decays by cosine to optim.min_lr, "
                        "it has no linear decay; use WarmupCosineLR (or WarmupLR)")
        return
    else:
        problems.append(f"scheduler.type={kind!r}: supported are WarmupLR and WarmupCosineLR")
        return
    for extra in sorted(p):
        problems.append(f"scheduler.params.{extra}: not supported")


def _zero(zero: Any, parallel: dict, notes: list, problems: list) -> None:
    if not isinstance(zero, dict):
        problems.append(f"zero_optimization: must be a mapping, got {zero!r}")
        return
    z = dict(zero)
    stage = z.pop("stage", 0)
    if stage not in (0, 1, 2):
        problems.append(f"zero_optimization.stage={stage!r}: stages 0-2 translate; stage 3 shards the dense "
                        "parameters, which Hecate keeps replicated (its experts are sharded by fssdp)")
    else:
        # Stages 1 and 2 shard the dense optimizer state: Hecate's ZeRO-1 dense optimizer
        # (its gradients are reduce-scattered too, so stage 2's saving is included).
        parallel["dense_optimizer"] = "sharded" if stage else "replicated"
        notes.append(f"zero_optimization.stage={stage}: parallel.dense_optimizer="
                     f"{parallel['dense_optimizer']}; the update is identical")
    for key in ("offload_optimizer", "offload_param", "cpu_offload"):
        if z.pop(key, None) not in (None, False, {}):
            problems.append(f"zero_optimization.{key}: CPU/NVMe offload is not supported")
    for key in _ZERO_PERF_KEYS:
        if key in z:
            z.pop(key)
            notes.append(f"zero_optimization.{key}: a communication/memory knob, no effect on results")
    for extra in sorted(z):
        problems.append(f"zero_optimization.{extra}: not supported")


def translate_deepspeed_config(ds_config, world_size: int) -> Tuple[dict, list]:
    """(partial TrainConfig dict, notes) for a DeepSpeed config dict or JSON path on
    `world_size` ranks; ValueError listing every unsupported key at once."""
    if isinstance(ds_config, (str, os.PathLike)):
        with open(ds_config) as f:
            ds_config = json.load(f)
    if not isinstance(ds_config, dict):
        raise TypeError(f"ds_config must be a dict or a path to a JSON file, got {type(ds_config).__name__}")
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be a positive int, got {world_size!r}")
    ds = copy.deepcopy(ds_config)
    problems, notes = [], []
    optim, data, train, parallel = {}, {}, {}, {}
    mbs, gas = _batch(ds, world_size, problems)
    for k in ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps"):
        ds.pop(k, None)
    if mbs is not None:
        data["batch_size"], optim["grad_accum"] = mbs, gas
    if "optimizer" in ds:
        _optimizer(ds.pop("optimizer"), optim, problems)
    if "scheduler" in ds:
        _scheduler(ds.pop("scheduler"), optim, train, problems)
    else:
        optim["warmup_steps"] = 0
        optim["_constant"] = True
    bf16 = ds.pop("bf16", None) or ds.pop("bfloat16", None) or {}
    fp16 = ds.pop("fp16", None) or {}
    if fp16.get("enabled", False):
        problems.append("fp16.enabled=true: Hecate has no fp16 loss scaling; use \"bf16\": {\"enabled\": true}")
    train["bf16"] = bool(bf16.get("enabled", False))
    for extra in sorted(set(bf16) - {"enabled"}):
        problems.append(f"bf16.{extra}: not supported")
    clip = ds.pop("gradient_clipping", 0.0)
    c = _number(clip, "gradient_clipping", problems)
    if c is not None and c < 0:
        problems.append(f"gradient_clipping: must be >= 0, got {clip}")
    optim["max_grad_norm"] = c if c else None
    if "zero_optimization" in ds:
        _zero(ds.pop("zero_optimization"), parallel, notes, problems)
    if "steps_per_print" in ds:
        train["log_every"] = _int(ds.pop("steps_per_print"), "steps_per_print", problems)
    for key in _TOP_PERF_KEYS:
        if key in ds:
            ds.pop(key)
            notes.append(f"{key}: logging/debug only, not translated")
    for extra in sorted(ds):
        problems.append(f"{extra}: not supported by the translation")
    if problems:
        raise ValueError("DeepSpeed config cannot be translated to Hecate; fix these keys:\n  - "
                         + "\n  - ".join(problems))
    # Resolve the schedule's lr-relative values once the optimizer lr is known.
    lr = optim.get("lr", 1e-3)
    optim["lr"] = lr
    if optim.pop("_constant", False):
        optim["min_lr"] = lr
    ratio = optim.pop("_cos_min_ratio", None)
    if ratio is not None:
        optim["min_lr"] = lr * ratio
    sections = {"optim": optim, "data": data, "train": train}
    if parallel:
        sections["parallel"] = parallel
    return sections, notes


def deepspeed_to_train_config(ds_config, world_size: int, base: Optional[dict] = None):
    """A validated TrainConfig: `base` (a Hecate config dict: model, parallel, data source, ...)
    with the DeepSpeed-derived sections merged over it."""
    from hecate.train.config import from_dict

    sections, _ = translate_deepspeed_config(ds_config, world_size)
    merged = copy.deepcopy(base or {})
    for name, values in sections.items():
        merged.setdefault(name, {}).update(values)
    merged.setdefault("parallel", {}).setdefault("nproc", world_size)
    return from_dict(merged).validate(world_size)
