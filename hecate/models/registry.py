"""Model zoo registry: architectures (config class + builder) and named presets.

`hecate inspect PRESET` and the trainer find models here. An architecture registers
its config dataclass and a builder; a preset is a named config of an architecture
(tiny ones that train in tests, paper-size ones that are inspected on the meta device).

A model may define `active_parameters() -> int` (parameters used per token); without
it, `count_parameters` assumes every MoELayer activates top_k / num_experts of its
routed experts and everything else is always active.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn


@dataclass(frozen=True)
class Architecture:
    name: str
    config_cls: type
    build: Callable[[Any], nn.Module]
    paper: str = ""


@dataclass(frozen=True)
class Preset:
    name: str
    arch: str
    config: dict
    description: str = ""


ARCHITECTURES: dict[str, Architecture] = {}
PRESETS: dict[str, Preset] = {}


def register_arch(name: str, config_cls: type, build: Callable[[Any], nn.Module], paper: str = "") -> None:
    if name in ARCHITECTURES:
        raise ValueError(f"architecture {name!r} is already registered")
    ARCHITECTURES[name] = Architecture(name, config_cls, build, paper)


def register_preset(name: str, arch: str, config: dict, description: str = "") -> None:
    if name in PRESETS:
        raise ValueError(f"preset {name!r} is already registered")
    PRESETS[name] = Preset(name, arch, config, description)


def _load_zoo() -> None:
    # Importing hecate.models registers every architecture and preset of the zoo.
    import hecate.models  # noqa: F401


def get_preset(name: str) -> Preset:
    _load_zoo()
    if name not in PRESETS:
        import difflib

        hint = difflib.get_close_matches(name, list(PRESETS), n=1)
        raise ValueError(f"unknown preset {name!r}" + (f"; did you mean {hint[0]!r}?" if hint else "")
                         + f" (known: {', '.join(sorted(PRESETS))})")
    return PRESETS[name]


def make_config(arch: str, config: dict):
    """Build the architecture's config dataclass from a plain dict (nested dataclasses too)."""
    _load_zoo()
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown model.arch {arch!r}; known: {sorted(ARCHITECTURES)}")
    return _from_dict(ARCHITECTURES[arch].config_cls, config, f"model[{arch}]")


def _from_dict(cls, data: dict, where: str):
    if not dataclasses.is_dataclass(cls) or not isinstance(data, dict):
        return data
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(data) - set(fields)
    if unknown:
        raise ValueError(f"{where}: unknown keys {sorted(unknown)} for {cls.__name__}")
    kwargs = {}
    hints = _type_hints(cls)
    for k, v in data.items():
        tp = hints.get(k)
        kwargs[k] = _from_dict(tp, v, f"{where}.{k}") if dataclasses.is_dataclass(tp) else v
    return cls(**kwargs)


def _type_hints(cls) -> dict:
    import typing

    try:
        return typing.get_type_hints(cls)
    except Exception:  # forward references that cannot resolve: leave values as given
        return {}


def build_model(arch: str, config, device: str | torch.device = "cpu") -> nn.Module:
    _load_zoo()
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown model.arch {arch!r}; known: {sorted(ARCHITECTURES)}")
    if isinstance(config, dict):
        config = make_config(arch, config)
    with torch.device(device):
        return ARCHITECTURES[arch].build(config)


def embedding_parameters(model: nn.Module) -> int:
    """Parameters of the token/position embedding tables and of an untied output head (`model.head`
    when it is a Linear): what papers that report "non-embedding" sizes leave out."""
    n = sum(p.numel() for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters())
    head = getattr(model, "head", None)
    if isinstance(head, nn.Linear) and hasattr(model, "embed") and head.out_features == model.embed.num_embeddings:
        n += sum(p.numel() for p in head.parameters())
    return n


def count_parameters(model: nn.Module) -> dict:
    """total_params, active_params (per token) and embedding_params of a model, meta tensors included."""
    from hecate.moe.layer import MoELayer

    total = sum(p.numel() for p in model.parameters())
    if hasattr(model, "active_parameters"):
        active = int(model.active_parameters())
    else:
        inactive = 0
        for layer in model.modules():
            if isinstance(layer, MoELayer):
                n = sum(p.numel() for p in layer.experts.parameters())
                inactive += n - n * layer.config.top_k // layer.config.num_experts
        active = total - inactive
    return {"total_params": total, "active_params": active, "embedding_params": embedding_parameters(model)}
