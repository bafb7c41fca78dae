"""Training configuration: YAML -> typed dataclasses, validated before any process starts.

Every error names the dotted config key (e.g. `parallel.ep_size`) and says how to fix it.
Unknown keys get a did-you-mean suggestion; `--set key.sub=value` overrides are parsed as YAML.
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from hecate.models.transformer import TransformerConfig
from hecate.moe.config import MoEConfig
from hecate.parallel.fssdp.options import FssdpOptions  # the one list of fssdp options

STRATEGIES = ("local", "dp", "ep", "fsdp", "fssdp", "fssdp_hybrid")
TOKENIZERS = ("byte", "bpe")


@dataclass
class ParallelConfig:
    strategy: str = "fssdp"
    nproc: int = 2                 # local workers `hecate train` starts when not under torchrun
    ep_size: Optional[int] = None  # ep: ranks per expert-parallel group (None = the world)
    shard_group_size: Optional[int] = None  # fssdp_hybrid: G ranks shard the experts, W / G groups replicate
    dense_optimizer: str = "auto"  # sharded (ZeRO-1) | replicated | auto (sharded under fssdp)
    fssdp: FssdpOptions = field(default_factory=FssdpOptions)


@dataclass
class OptimConfig:
    lr: float = 3e-3
    min_lr: float = 3e-4
    weight_decay: float = 0.01
    betas: tuple = (0.9, 0.95)
    eps: float = 1e-8
    warmup_steps: int = 10
    max_grad_norm: Optional[float] = 1.0
    grad_accum: int = 1
    impl: str = "fused"            # AdamW implementation: fused | foreach | single


@dataclass
class DataConfig:
    source: str = "embedded"       # "embedded" | path to a text file | path to a .bin token memmap
    token_dtype: str = "uint16"    # for .bin sources: uint16 or uint32
    tokenizer: str = "byte"        # text sources: "byte" (256 ids) or "bpe" (trained locally, needs `tokenizers`)
    vocab_size: Optional[int] = None  # bpe: ids to learn (None = model.vocab_size); must be > 256
    embedded_max_bytes: int = 3_000_000
    cache_dir: Optional[str] = None  # embedded corpus cache (None = ~/.cache/hecate)
    seq_len: int = 64
    batch_size: int = 8            # sequences per rank per micro-batch
    val_fraction: float = 0.05


@dataclass
class RunConfig:
    steps: int = 100
    seed: int = 0
    eval_every: int = 50
    eval_batches: int = 4
    log_every: int = 10
    bf16: bool = False
    out_dir: str = "runs/default"
    init: Optional[str] = None     # `--init RUN_DIR`: start from those weights (hecate.train.init_weights)
    peak_tflops: Optional[float] = None  # per rank, for the MFU estimate (None = a guess per device)
    collective_timeout_s: float = 300.0  # a collective not done by then fails naming the ranks (not a hang)
    on_nonfinite: str = "skip"     # NaN/inf loss or gradient norm: skip the step, or stop the run
    max_nonfinite_skips: int = 3   # consecutive skipped steps before the run stops anyway


@dataclass
class CheckpointConfig:
    every: int = 0   # steps between checkpoints (0 = only none)
    keep: int = 2


@dataclass
class LoggingConfig:
    jsonl: bool = True
    tensorboard: bool = False
    wandb: bool = False
    wandb_project: str = "hecate"
    wandb_mode: str = "offline"
    progress: bool = True
    heatmap: bool = True
    trace: str = ""  # routing trace (hecate.train.routing_trace) to write, for `hecate simulate --trace`; "" = none


@dataclass
class SampleConfig:
    num_samples: int = 0
    max_new_tokens: int = 160
    temperature: float = 0.8
    top_k: int = 40
    prompt: str = "def "


@dataclass
class TrainConfig:
    model: TransformerConfig = field(default_factory=TransformerConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: RunConfig = field(default_factory=RunConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)

    def validate(self, world_size: int | None = None, ranks_per_node: int | None = None) -> "TrainConfig":
        """Check ranges and the parallel layout for `world_size` ranks (nodes of `ranks_per_node`,
        None: unknown, one node assumed only where it cannot make a layout wrong); raise ValueError
        naming the key."""
        _validate(self, world_size, ranks_per_node)
        return self

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["optim"]["betas"] = list(d["optim"]["betas"])
        return d

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


# ---- parsing ------------------------------------------------------------------------------------
def _type_name(tp) -> str:
    return getattr(tp, "__name__", str(tp))


def _convert(value: Any, tp, key: str):
    """Convert a YAML value to annotation `tp`, raising TypeError that names `key`."""
    origin = typing.get_origin(tp)
    if origin is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _convert(value, args[0], key)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise TypeError(f"{key} must be a mapping of {tp.__name__} fields, got {value!r}")
        return _build(tp, value, key + ".")
    if tp is bool:
        if not isinstance(value, bool):
            raise TypeError(f"{key} must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{key} must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "2e-3" (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"{key} must be a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise TypeError(f"{key} must be a string, got {value!r}")
        return value
    if tp is tuple or origin is tuple:
        if isinstance(value, (list, tuple)):  # YAML 1.1 reads "1e9" (no dot) as a string
            value = [_convert(v, float, key) if isinstance(v, str) else v for v in value]
        if not isinstance(value, (list, tuple)) or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
            raise TypeError(f"{key} must be a list of numbers, got {value!r}")
        return tuple(float(v) for v in value)
    return value


def _build(cls, data: dict, prefix: str):
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for k in data:
        if k not in names:
            hint = difflib.get_close_matches(str(k), names, n=1)
            raise ValueError(f"unknown config key {prefix}{k}"
                             + (f"; did you mean {prefix}{hint[0]}?" if hint else
                                f"; valid keys under {prefix.rstrip('.') or 'the top level'}: {names}"))
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name in data:
            kwargs[f.name] = _convert(data[f.name], hints[f.name], prefix + f.name)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ValueError(f"config key {prefix}{f.name} is required")
    return cls(**kwargs)


def from_dict(data: dict | None) -> TrainConfig:
    """Build a TrainConfig from a plain dict (a parsed YAML file); unknown keys are rejected."""
    data = dict(data or {})
    par = data.get("parallel")
    if isinstance(par, dict) and par.get("strategy") == "fssdp_hybrid" and isinstance(par.get("fssdp") or {}, dict):
        # fssdp_hybrid's default: no re-sharding (Algorithm 2 would place each shard group's owners
        # from its own load and the groups' rows would no longer match); written out explicitly.
        data["parallel"] = {**par, "fssdp": {"reshard_interval": 0, **(par.get("fssdp") or {})}}
    from hecate.train.tasks import arch_config_from_dict  # other model-zoo architectures

    other = arch_config_from_dict(data, _build)
    if other is not None:
        return other
    model = dict(data.get("model") or {})
    if "arch" in model or "preset" in model:
        model = _resolve_model_preset(model)
        data["model"] = model
    if "moe" in model:
        moe = dict(model["moe"] or {})
        # The MoE hidden size is the model width unless the file says otherwise.
        moe.setdefault("hidden_size", model.get("d_model", TransformerConfig.d_model))
        model["moe"] = moe
        data["model"] = model
    elif "d_model" in model:
        default = TransformerConfig().moe
        model["moe"] = dataclasses.asdict(default.replace(hidden_size=model["d_model"]))
        data["model"] = model
    return _build(TrainConfig, data, "")


def apply_model_preset(model: dict) -> tuple[Optional[str], dict]:
    """Pop `model.arch` and `model.preset` from a copy of a model section; with a preset, the
    model-zoo preset's config is the base and the section's keys override it (model.moe merged
    key by key). Returns (arch, model keys); arch is the preset's when only the preset is named,
    None when neither is. Shared by the transformer trainer and hecate.train.tasks."""
    model = dict(model)
    arch, name = model.pop("arch", None), model.pop("preset", None)
    if name is not None:
        if not isinstance(name, str):
            raise TypeError(f"model.preset must be a preset name (string), got {name!r}")
        from hecate.models.registry import get_preset

        try:
            preset = get_preset(name)
        except ValueError as e:
            raise ValueError(f"model.preset: {e}") from None
        if arch is not None and arch != preset.arch:
            raise ValueError(f"model.arch={arch!r} contradicts model.preset={name!r} (arch {preset.arch!r}); "
                             "remove model.arch")
        arch = preset.arch
        base = copy.deepcopy(dict(preset.config))
        if isinstance(base.get("moe"), dict) and isinstance(model.get("moe"), dict):
            model["moe"] = {**base["moe"], **model["moe"]}
        model = {**base, **model}
    return arch, model


def _resolve_model_preset(model: dict) -> dict:
    """Handle `model.arch` and `model.preset` (apply_model_preset). The trainer builds the
    `transformer` architecture only, so other archs are rejected here with the key named."""
    arch, model = apply_model_preset(model)
    if arch is not None and arch != "transformer":
        raise ValueError(f"model.arch={arch!r}: `hecate train` trains arch 'transformer' only; "
                         "other model-zoo architectures can be inspected with `hecate inspect PRESET`")
    return model


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply `key.sub=value` strings (values parsed as YAML) to a raw config dict in place."""
    for item in overrides or []:
        if "=" not in item:
            raise ValueError(f"override {item!r} must look like key.sub=value (e.g. train.steps=10)")
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key or any(not part for part in key.split(".")):
            raise ValueError(f"override {item!r} has an empty key part; write e.g. optim.lr=1e-3")
        value = parse_yaml(raw, f"--set {key}") if raw.strip() else None
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ValueError(f"override {item!r}: {part} is not a section")
            node = child
        node[parts[-1]] = value
    return data


def parse_yaml(text: str, where: str):
    """yaml.safe_load (never constructs Python objects), with errors as one ValueError line
    naming `where` (the file) and the line: `configs/x.yaml:3: mapping values are not allowed here`."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e)
        context = getattr(e, "context", None)
        raise ValueError(f"{where}{line}: invalid YAML: {' '.join(str(problem).split())}"
                         + (f" ({' '.join(str(context).split())})" if context else "")) from None


def configs_dir() -> Path:
    """The repository's configs/ folder (presets are looked up there by name)."""
    return Path(__file__).resolve().parents[2] / "configs"


def resolve_config_path(name_or_path: str) -> Path:
    """A YAML path as given, or `configs/<name>.yaml` for a preset name."""
    p = Path(name_or_path)
    if p.is_file():
        return p
    preset = configs_dir() / f"{name_or_path}.yaml"
    if preset.is_file():
        return preset
    names = sorted(q.stem for q in configs_dir().glob("*.yaml"))
    hint = difflib.get_close_matches(name_or_path, names, n=1)
    raise ValueError(f"config {name_or_path!r} is neither a file nor a preset in {configs_dir()}"
                     + (f"; did you mean {hint[0]!r}?" if hint else f"; presets: {names}"))


def load_config(path: str, overrides: list[str] | None = None, world_size: int | None = None) -> TrainConfig:
    """Read YAML `path` (or a preset name), apply overrides, build and validate the config."""
    resolved = resolve_config_path(path)
    try:
        text = resolved.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"config {resolved} is not UTF-8 text (byte {e.start}); is it a YAML file?") from None
    data = parse_yaml(text, str(resolved)) or {}
    if not isinstance(data, dict):
        raise ValueError(f"config {resolved} must be a YAML mapping at the top level, got {type(data).__name__}")
    apply_overrides(data, overrides or [])
    return from_dict(data).validate(world_size)


# ---- validation ---------------------------------------------------------------------------------
def _check(cond: bool, key: str, msg: str) -> None:
    if not cond:
        raise ValueError(f"{key}{msg}" if msg.startswith("=") else f"{key} {msg}")


def _nonfinite_keys(obj, prefix: str = "") -> list[str]:
    """Dotted keys of every float in the config (nested dataclasses, lists) that is NaN or inf."""
    import math

    bad = []
    if dataclasses.is_dataclass(obj):
        for f in dataclasses.fields(obj):
            bad += _nonfinite_keys(getattr(obj, f.name), f"{prefix}{f.name}.")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            bad += _nonfinite_keys(v, f"{prefix.rstrip('.')}[{i}].")
    elif isinstance(obj, float) and not math.isfinite(obj):
        bad.append(prefix.rstrip("."))
    return bad


def _validate(cfg: TrainConfig, world: int | None, ranks_per_node: int | None = None) -> None:
    bad = _nonfinite_keys(cfg)
    if bad:
        raise ValueError(f"{bad[0]} must be a finite number, got {_get_key(cfg, bad[0])}"
                         + (f" (also non-finite: {', '.join(bad[1:])})" if len(bad) > 1 else ""))
    try:
        cfg.model.validate()
    except ValueError as e:
        raise ValueError(str(e).replace("MoEConfig.", "model.moe.")) from None
    p, o, d, t = cfg.parallel, cfg.optim, cfg.data, cfg.train
    _check(p.strategy in STRATEGIES, "parallel.strategy",
           f"={p.strategy!r} must be one of {STRATEGIES}"
           + "".join(f"; did you mean {h!r}?" for h in difflib.get_close_matches(p.strategy, STRATEGIES, n=1)))
    _check(p.nproc >= 1, "parallel.nproc", f"must be >= 1, got {p.nproc}")
    p.fssdp.validate()  # ValueError naming the parallel.fssdp key
    if p.strategy == "fssdp_hybrid":
        _check(p.shard_group_size is not None, "parallel.shard_group_size",
               "is required by strategy 'fssdp_hybrid' (ranks per shard group, e.g. the ranks of a node)")
        _check(p.shard_group_size >= 1, "parallel.shard_group_size", f"must be >= 1, got {p.shard_group_size}")
        _check(p.fssdp.reshard_interval == 0, "parallel.fssdp.reshard_interval",
               f"={p.fssdp.reshard_interval} is not supported by fssdp_hybrid (each shard group would re-place "
               "its owners from its own load and the groups' rows would no longer match); set it to 0")
    elif p.shard_group_size is not None:
        _check(False, "parallel.shard_group_size",
               f"is only used by strategy 'fssdp_hybrid' (strategy is {p.strategy!r}); remove it")
    _check(o.lr > 0, "optim.lr", f"must be > 0, got {o.lr}")
    _check(0 <= o.min_lr <= o.lr, "optim.min_lr", f"must be in [0, optim.lr={o.lr}], got {o.min_lr}")
    _check(o.weight_decay >= 0, "optim.weight_decay", f"must be >= 0, got {o.weight_decay}")
    _check(len(o.betas) == 2 and all(0 <= b < 1 for b in o.betas), "optim.betas",
           f"must be two numbers in [0, 1), got {list(o.betas)}")
    _check(o.eps > 0, "optim.eps", "must be > 0")
    _check(o.warmup_steps >= 0, "optim.warmup_steps", f"must be >= 0, got {o.warmup_steps}")
    _check(o.max_grad_norm is None or o.max_grad_norm > 0, "optim.max_grad_norm", "must be > 0 or null")
    _check(o.grad_accum >= 1, "optim.grad_accum", f"must be >= 1, got {o.grad_accum}")
    _check(p.dense_optimizer in ("auto", "sharded", "replicated"), "parallel.dense_optimizer",
           f"={p.dense_optimizer!r} must be auto, sharded or replicated")
    _check(o.impl in ("fused", "foreach", "single"), "optim.impl",
           f"={o.impl!r} must be fused, foreach or single")
    _check(d.token_dtype in ("uint16", "uint32"), "data.token_dtype", f"={d.token_dtype!r} must be uint16 or uint32")
    _check(d.seq_len >= 1, "data.seq_len", f"must be >= 1, got {d.seq_len}")
    _check(d.seq_len <= cfg.model.max_seq_len, "data.seq_len",
           f"={d.seq_len} exceeds model.max_seq_len={cfg.model.max_seq_len}; lower it or raise max_seq_len")
    _check(d.batch_size >= 1, "data.batch_size", f"must be >= 1, got {d.batch_size}")
    _check(0 < d.val_fraction < 1, "data.val_fraction", f"must be in (0, 1), got {d.val_fraction}")
    _check(d.embedded_max_bytes >= 10_000, "data.embedded_max_bytes", "must be >= 10000")
    _check(t.steps >= 1, "train.steps", f"must be >= 1, got {t.steps}")
    for name in ("eval_every", "eval_batches", "log_every"):
        _check(getattr(t, name) >= 1, f"train.{name}", f"must be >= 1, got {getattr(t, name)}")
    _check(t.peak_tflops is None or t.peak_tflops > 0, "train.peak_tflops", "must be > 0 or null")
    _check(t.collective_timeout_s > 0, "train.collective_timeout_s",
           f"must be > 0 seconds, got {t.collective_timeout_s}")
    _check(t.on_nonfinite in ("skip", "stop"), "train.on_nonfinite", f"={t.on_nonfinite!r} must be skip or stop")
    _check(t.max_nonfinite_skips >= 1, "train.max_nonfinite_skips", f"must be >= 1, got {t.max_nonfinite_skips}")
    _check(cfg.checkpoint.every >= 0, "checkpoint.every", "must be >= 0 (0 = off)")
    _check(cfg.checkpoint.keep >= 1, "checkpoint.keep", "must be >= 1")
    _check(cfg.logging.wandb_mode in ("offline", "online", "disabled"), "logging.wandb_mode",
           "must be offline, online or disabled")
    s = cfg.sample
    _check(s.num_samples >= 0 and s.max_new_tokens >= 1, "sample.num_samples",
           "and sample.max_new_tokens must be >= 0 and >= 1")
    _check(s.temperature > 0 and s.top_k >= 1, "sample.temperature", "must be > 0 (and sample.top_k >= 1)")
    _check(d.tokenizer in TOKENIZERS, "data.tokenizer",
           f"={d.tokenizer!r} must be one of {TOKENIZERS}"
           + "".join(f"; did you mean {h!r}?" for h in difflib.get_close_matches(d.tokenizer, TOKENIZERS, n=1)))
    if d.tokenizer == "bpe":
        _check(_is_text(d.source), "data.tokenizer",
               f"='bpe' needs a text data.source, got the pre-tokenized {d.source!r}; use data.tokenizer=byte")
        bpe_vocab = d.vocab_size or cfg.model.vocab_size
        _check(bpe_vocab > 256, "data.vocab_size",
               f"={bpe_vocab} must be > 256 for BPE (256 byte symbols + merges); raise it or model.vocab_size")
        _check(bpe_vocab <= cfg.model.vocab_size, "data.vocab_size",
               f"={bpe_vocab} exceeds model.vocab_size={cfg.model.vocab_size}; raise model.vocab_size")
    else:
        _check(d.vocab_size is None, "data.vocab_size",
               f"={d.vocab_size} is only used with data.tokenizer=bpe; remove it or set data.tokenizer=bpe")
        _check(not _is_text(d.source) or cfg.model.vocab_size >= 256, "model.vocab_size",
               f"={cfg.model.vocab_size} is too small for byte-level text (needs 256)")
    if world is not None:
        _validate_layout(cfg, world, ranks_per_node)


def _get_key(cfg, dotted: str):
    import re

    obj = cfg
    for part in dotted.split("."):
        m = re.fullmatch(r"(\w+)((?:\[\d+\])*)", part)
        obj = getattr(obj, m.group(1))
        for idx in re.findall(r"\[(\d+)\]", m.group(2)):
            obj = obj[int(idx)]
    return obj


def _is_text(source: str) -> bool:
    return not source.endswith(".bin")


def _validate_layout(cfg: TrainConfig, world: int, ranks_per_node: int | None = None) -> None:
    """Reject a strategy / world-size combination that cannot run, before launching anything."""
    p, E = cfg.parallel, cfg.model.moe.num_experts
    _check(world >= 1, "parallel.nproc", f"(world size) must be >= 1, got {world}")
    _check(p.strategy != "local" or world == 1, "parallel.strategy",
           f"='local' keeps all experts on one process; it needs world size 1, got {world} (use dp/ep/fsdp/fssdp)")
    if p.strategy == "ep":
        ep = world if p.ep_size is None else p.ep_size
        _check(ep >= 1 and world % ep == 0, "parallel.ep_size",
               f"={ep} must divide the world size {world}")
        _check(E % ep == 0, "parallel.ep_size",
               f"={ep} must divide model.moe.num_experts={E} (each EP rank holds the same number of experts)")
        for j, e in enumerate(cfg.model.moe_experts_per_layer or []):
            _check(e % ep == 0, "parallel.ep_size",
                   f"={ep} must divide model.moe_experts_per_layer[{j}]={e} (each EP rank holds the same "
                   "number of experts of every layer)")
    elif p.ep_size is not None:
        _check(False, "parallel.ep_size", f"is only used by strategy 'ep' (strategy is {p.strategy!r}); remove it")
    if p.strategy == "fssdp_hybrid":
        G = p.shard_group_size
        _check(world % G == 0, "parallel.shard_group_size",
               f"={G} must divide the world size {world} (one of "
               f"{[d for d in range(1, world + 1) if world % d == 0]})")
        rpn = ranks_per_node or world
        _check(G <= rpn and rpn % G == 0 or G % rpn == 0, "parallel.shard_group_size",
               f"={G} must divide the {rpn} ranks of a node or be a multiple of them (shard groups are "
               "parts of one node or whole nodes)")
    if p.strategy in ("fssdp", "fssdp_hybrid") and p.fssdp.memory_slots is not None:
        _check(p.fssdp.memory_slots <= E, "parallel.fssdp.memory_slots",
               f"={p.fssdp.memory_slots} exceeds model.moe.num_experts={E}")
