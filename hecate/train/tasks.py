"""Architecture dispatch for `hecate train | inspect | generate | sample`.

The trainer was written for the `transformer` architecture (MoETransformer on token data). This
module lets the same trainer, checkpoints, strategies and CLI drive every model-zoo architecture:
a YAML whose `model.arch` (or `model.preset`) names another architecture is parsed into an
`ArchTrainConfig` (a TrainConfig whose `model` is that architecture's config and whose `arch`
says which), and the trainer asks this module for the model, the data, the evaluation loss and
the meta-device model instead of assuming MoETransformer.

| arch | data.source | batch (x, y) | eval loss | sampling |
|---|---|---|---|---|
| transformer | embedded / text / .bin | tokens, next tokens | LM cross-entropy | `hecate generate` |
| mixture_of_mamba | `embedded` (the byte corpus interleaved with generated image tokens) or `interleaved` (generated text-like + image tokens) | tokens, next tokens | LM cross-entropy | `hecate generate` |
| switch_dit | `shapes` (generated images, 4 classes) | images, labels | noise MSE at fixed t / noise | `hecate sample` |
| mixture_of_mamba_transfusion | `transfusion` (text tokens + images as continuous patches, packed) | packed rows, next text tokens | text CE + noise MSE at fixed t / noise | - |

The trainer keeps calling `model.loss(x, y)` (every zoo model has it) and reads
`out.aux_loss` / `out.moe_stats`, which every zoo model returns.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from hecate.train.config import TrainConfig, apply_model_preset

TRANSFORMER = "transformer"
# data.source values each non-transformer architecture accepts (the first is the default).
SOURCES = {"switch_dit": ("shapes",), "mixture_of_mamba": ("embedded", "interleaved"),
           "mixture_of_mamba_transfusion": ("transfusion",)}


@dataclass
class ArchTrainConfig(TrainConfig):
    """A TrainConfig whose `model` is the config of architecture `arch` (not a transformer)."""

    arch: str = TRANSFORMER

    def to_dict(self) -> dict:
        d = super().to_dict()
        arch = d.pop("arch")
        d["model"] = {"arch": arch, **d["model"]}  # config.yaml must reload as this architecture
        return d

    def validate(self, world_size: Optional[int] = None,
                 ranks_per_node: Optional[int] = None) -> "ArchTrainConfig":
        _validate_arch(self, world_size, ranks_per_node)
        return self


def arch_of(cfg) -> str:
    return getattr(cfg, "arch", TRANSFORMER)


def arch_config_from_dict(data: dict, build) -> Optional[ArchTrainConfig]:
    """An ArchTrainConfig when the file's model section names a non-transformer architecture
    (`model.arch`, or `model.preset` of such an architecture); None for transformers.
    `build` is hecate.train.config._build (typed parsing with did-you-mean errors)."""
    from hecate.models.registry import ARCHITECTURES, _load_zoo, make_config

    arch, model = apply_model_preset(data.get("model") or {})
    if arch is None or arch == TRANSFORMER:
        return None
    _load_zoo()
    if arch not in ARCHITECTURES:
        raise ValueError(f"model.arch={arch!r} is not a model-zoo architecture; known: {sorted(ARCHITECTURES)}")
    if arch == "uni_moe":
        raise ValueError("model.arch='uni_moe' trains in stages: give the config a `stages:` list and run "
                         "`hecate train CONFIG` (hecate.train.stages.run_stages; see configs/models/tiny-uni-moe.yaml)")
    if arch not in SOURCES:
        raise ValueError(f"model.arch={arch!r} cannot be trained by `hecate train` yet "
                         f"(trainable: {sorted([TRANSFORMER, *SOURCES])})")
    rest = {k: v for k, v in data.items() if k != "model"}
    data_section = dict(rest.get("data") or {})
    data_section.setdefault("source", SOURCES[arch][0])
    rest["data"] = data_section
    cfg = build(ArchTrainConfig, rest, "")
    try:
        cfg.model = make_config(arch, model)
    except TypeError as e:
        raise ValueError(f"model[{arch}]: {e}") from None
    cfg.arch = arch
    return cfg


def _experts(cfg) -> list[int]:
    """Expert count of every MoE layer of an architecture's config (for layout checks)."""
    m = cfg.model
    if cfg.arch == "switch_dit":
        return [m.num_experts]
    if cfg.arch in ("mixture_of_mamba", "mixture_of_mamba_transfusion"):
        return [m.moe.num_experts] if m.moe_every and m.moe is not None else []
    return []


def _validate_arch(cfg: ArchTrainConfig, world: Optional[int], ranks_per_node: Optional[int] = None) -> None:
    """TrainConfig's checks of every section but `model` (run on a stand-in transformer whose
    experts and lengths are the architecture's), then the architecture's own checks."""
    from hecate.models.transformer import TransformerConfig
    from hecate.moe.config import MoEConfig
    from hecate.train.config import _validate

    try:
        cfg.model.validate()
    except (ValueError, TypeError) as e:
        raise ValueError(f"model ({cfg.arch}): {e}") from None
    d = cfg.data
    if d.source not in SOURCES[cfg.arch]:
        raise ValueError(f"data.source={d.source!r}: model.arch={cfg.arch!r} trains on generated data; "
                         f"use one of {list(SOURCES[cfg.arch])}")
    if d.tokenizer != "byte":
        raise ValueError(f"data.tokenizer={d.tokenizer!r}: model.arch={cfg.arch!r} uses byte ids; set byte")
    experts = _experts(cfg)
    # The stand-in's expert count passes TrainConfig's layout checks; the real counts are checked
    # below with this architecture's key names.
    E = (cfg.parallel.ep_size or world or 1) * max(1, cfg.parallel.fssdp.memory_slots or 1)
    if cfg.arch == "mixture_of_mamba":
        max_len, vocab = cfg.model.max_seq_len, cfg.model.vocab_size
        if d.source == "embedded":
            starts = cfg.model.modality_vocab_starts
            if cfg.model.num_modalities != 2 or starts is None or starts[1] != 256:
                raise ValueError("data.source='embedded' for mixture_of_mamba puts the byte corpus (ids 0-255) in "
                                 "modality 0 and image tokens from 256 on: set model.num_modalities=2 and "
                                 "model.modality_vocab_starts=[0, 256] (vocab_size = 256 + image tokens)")
    elif cfg.arch == "mixture_of_mamba_transfusion":
        max_len, vocab = cfg.model.max_seq_len, 256
    else:
        max_len, vocab = 10 ** 9, 256
    stand_in = dataclasses.replace(
        cfg, model=TransformerConfig(vocab_size=max(vocab, 256), max_seq_len=max_len, d_model=8, n_heads=1,
                                     moe=MoEConfig(hidden_size=8, ffn_hidden_size=8, num_experts=E,
                                                   top_k=min(2, E))))
    object.__setattr__(stand_in, "arch", TRANSFORMER)
    _validate(stand_in, world, ranks_per_node)
    slots = cfg.parallel.fssdp.memory_slots
    if cfg.parallel.strategy == "fssdp" and slots is not None and any(slots > e for e in experts):
        raise ValueError(f"parallel.fssdp.memory_slots={slots} exceeds the {min(experts)} experts of "
                         f"model.arch={cfg.arch!r}")
    if world and cfg.parallel.strategy == "ep":
        ep = cfg.parallel.ep_size or world
        for e in experts:
            if e % ep:
                raise ValueError(f"parallel.ep_size={ep} must divide the {e} experts of every MoE layer "
                                 f"of model.arch={cfg.arch!r}")


# ---- what the trainer asks for -------------------------------------------------------------------
def build_model(cfg, device: str | torch.device | None = None):
    """The configured model (MoETransformer for transformers), on `device` (default: the current)."""
    from hecate.models.registry import build_model as build_arch
    from hecate.models.transformer import MoETransformer

    if arch_of(cfg) == TRANSFORMER:
        if device is None:
            return MoETransformer(cfg.model)
        with torch.device(device):
            return MoETransformer(cfg.model)
    return build_arch(cfg.arch, cfg.model, device or torch.get_default_device())


def build_meta_model(cfg):
    return build_model(cfg, "meta")


def build_data(cfg, tokenizer=None):
    """The trainer's data source: train_batch(step, micro, A, rank, world), val_batches(n, rank, world)."""
    from hecate.data.sources import CorpusInterleavedData, InterleavedTokenData, ShapeImageData
    from hecate.train.data import build_data as build_token_data
    from hecate.train.data import load_tokens

    arch, d, seed = arch_of(cfg), cfg.data, cfg.train.seed
    if arch == TRANSFORMER:
        return build_token_data(cfg, tokenizer)
    m = cfg.model
    if arch == "mixture_of_mamba_transfusion":
        from hecate.data.sources import TransfusionData

        return TransfusionData(d.batch_size, d.seq_len, text_vocab=m.vocab_size, seed=seed, val_seed=seed + 1)
    if arch == "switch_dit":
        return ShapeImageData(d.batch_size, m.image_size, m.in_channels, seed=seed, val_seed=seed + 1)
    if d.source == "embedded":
        text = load_tokens("embedded", cache_dir=d.cache_dir, max_bytes=d.embedded_max_bytes)
        return CorpusInterleavedData(text, d.batch_size, d.seq_len, image_vocab=m.vocab_size - 256,
                                     val_fraction=d.val_fraction, seed=seed)
    starts = m.modality_vocab_starts or [0, m.vocab_size // 2]
    return InterleavedTokenData(d.batch_size, d.seq_len, text_vocab=starts[1],
                                image_vocab=m.vocab_size - starts[1], seed=seed, val_seed=seed + 1)


def eval_loss(cfg, model, x, y, index: int = 0) -> torch.Tensor:
    """The validation loss of one batch: LM cross-entropy, or for diffusion the noise MSE at
    timesteps and noise drawn from a generator seeded by the batch index (same on every call)."""
    if arch_of(cfg) == "switch_dit":
        g = torch.Generator().manual_seed(10_000 + index)
        t = torch.randint(0, cfg.model.num_timesteps, (x.shape[0],), generator=g).to(x.device)
        noise = torch.randn(x.shape, generator=g).to(x.device, x.dtype)
        from hecate.models.diffusion import q_sample

        eps = model(q_sample(x, t, noise, model.alphas_cumprod_T), t, y if cfg.model.num_classes else None).eps
        return F.mse_loss(eps.float(), noise.float())
    if arch_of(cfg) == "mixture_of_mamba_transfusion":  # text CE + diffusion MSE at fixed t / noise
        return model.loss(x, y, generator=torch.Generator().manual_seed(10_000 + index))[0]
    return F.cross_entropy(model(x).logits.flatten(0, 1).float(), y.flatten())


def train_loss(cfg, model, x, y):
    """`model.loss(x, y)`; an unconditional Switch-DiT gets no labels."""
    if arch_of(cfg) == "switch_dit" and not cfg.model.num_classes:
        return model.loss(x, None)
    return model.loss(x, y)


def decode(cfg, tokenizer, ids) -> str:
    """Text of generated ids: bytes for text ids; Mixture-of-Mamba image ids as <img:k>."""
    if arch_of(cfg) != "mixture_of_mamba":
        return tokenizer.decode(ids)
    parts, run = [], []
    for i in ids:
        if i < 256:
            run.append(i)
            continue
        if run:
            parts.append(tokenizer.decode(run))
            run = []
        parts.append(f"<img:{i - 256}>")
    if run:
        parts.append(tokenizer.decode(run))
    return "".join(parts)


def inspect(cfg, world: int) -> dict:
    """`hecate inspect CONFIG` for a non-transformer config: counts and the per-rank estimate."""
    from hecate.models.registry import count_parameters
    from hecate.train.model_stats import expert_state_estimate

    model = build_meta_model(cfg)
    layers = model.moe_layers()
    p = cfg.parallel
    return {"arch": cfg.arch, **count_parameters(model), "moe_layers": len(layers),
            "routed_expert_params": sum(q.numel() for m in layers for q in m.experts.parameters()),
            "memory_per_rank": expert_state_estimate(model, p.strategy, world, p.ep_size, p.fssdp.memory_slots,
                                                     p.dense_optimizer)}
