"""Inference-time routing overrides: change how a trained MoE routes, for the scope of a `with`.

    with routing_overrides(model, disabled={0: [3]}, top_k=1, temperature=2.0, forced=[5]):
        logits = model(tokens).logits

Each knob is one value for every MoE layer, or a dict {MoE layer index: value} (the index
counts MoE layers in `model.moe_layers()` order, from 0; a bare MoELayer is layer 0):

- top_k: experts per token (instead of the config's).
- disabled: experts that receive no token. Their router logits become -inf (and their
  aux-free selection bias -inf), so softmax weights renormalise over the remaining experts:
  the layer computes what a layer with those experts and their router rows removed computes.
- forced: experts every token uses. They take the lowest-ranked of the k slots (the best
  k - len(forced) other experts keep theirs); weights are the experts' scores,
  renormalised over the k chosen when the config renormalises.
- temperature: router logits divided by it before scoring (>1 flattens, <1 sharpens the weights).
- ranks: 1-based ranks kept (e.g. [2]: each token uses only its second-ranked expert, the
  weak activation of SCMoE); the router ranks max(ranks) experts and keeps these slots.

Overrides nest: an inner `with` keeps the outer one's settings it does not set, and
disabled/forced lists are unioned. Leaving the `with` (also by an exception) restores
exactly what was there before. Expert-choice routers support temperature only.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Iterator, Mapping, Optional, Sequence

import torch

from hecate import ops
from hecate.moe.routing import Routing


@dataclass(frozen=True)
class RoutingOverride:
    """The overrides of one MoE layer (see the module doc)."""

    top_k: Optional[int] = None
    disabled: tuple = ()
    forced: tuple = ()
    temperature: Optional[float] = None
    ranks: tuple = ()

    def merged_with(self, inner: "RoutingOverride") -> "RoutingOverride":
        """`inner` applied on top of self: its set fields win, disabled/forced are unioned."""
        return RoutingOverride(
            top_k=inner.top_k if inner.top_k is not None else self.top_k,
            disabled=tuple(sorted(set(self.disabled) | set(inner.disabled))),
            forced=tuple(sorted(set(self.forced) | set(inner.forced))),
            temperature=inner.temperature if inner.temperature is not None else self.temperature,
            ranks=inner.ranks or self.ranks)

    def validate(self, config, where: str = "layer") -> "RoutingOverride":
        E = config.num_experts
        for name in ("disabled", "forced"):
            bad = [e for e in getattr(self, name) if isinstance(e, bool) or not isinstance(e, int) or not 0 <= e < E]
            if bad:
                raise ValueError(f"routing override {name}={list(getattr(self, name))} on MoE {where}: "
                                 f"expert ids must be ints in [0, num_experts={E})")
        both = set(self.disabled) & set(self.forced)
        if both:
            raise ValueError(f"routing override on MoE {where}: experts {sorted(both)} are both disabled and forced")
        enabled = E - len(self.disabled)
        k = config.top_k if self.top_k is None else self.top_k
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= enabled:
            raise ValueError(f"routing override top_k={k} on MoE {where} must be an int in [1, {enabled}] "
                             f"(num_experts={E} minus {len(self.disabled)} disabled)")
        if len(self.forced) > k:
            raise ValueError(f"routing override forces {len(self.forced)} experts on MoE {where} "
                             f"but a token uses only top_k={k}; raise top_k or force fewer")
        if self.temperature is not None and not (self.temperature > 0 and math.isfinite(self.temperature)):
            raise ValueError(f"routing override temperature={self.temperature} on MoE {where} must be finite and > 0")
        bad_ranks = [r for r in self.ranks if isinstance(r, bool) or not isinstance(r, int) or not 1 <= r <= enabled]
        if bad_ranks or len(set(self.ranks)) != len(self.ranks):
            raise ValueError(f"routing override ranks={list(self.ranks)} on MoE {where} must be distinct ints "
                             f"in [1, {enabled}] (the enabled experts)")
        if self.ranks and self.forced:
            raise ValueError(f"routing override on MoE {where}: ranks and forced cannot be combined")
        if config.router == "expert_choice" and (self.disabled or self.forced or self.ranks or self.top_k):
            raise ValueError(f"routing override on MoE {where}: the expert_choice router supports "
                             "temperature only (experts pick tokens, not tokens experts)")
        if config.router == "switch" and (self.router_top_k(k) > 1):
            raise ValueError(f"routing override top_k={k}, ranks={list(self.ranks)} on MoE {where}: the switch "
                             "router ranks one expert only (top-1)")
        return self

    # ---- hooks the router and the layer call ----------------------------------------------------
    def router_top_k(self, k: int) -> int:
        """How many experts the router must rank for this override to pick from."""
        return max(self.ranks) if self.ranks else k

    def adjust_logits(self, logits_TE: torch.Tensor) -> torch.Tensor:
        if self.temperature is not None:
            logits_TE = logits_TE / self.temperature
        if self.disabled:
            logits_TE = logits_TE.index_fill(1, _ids(self.disabled, logits_TE.device), float("-inf"))
        return logits_TE

    def adjust_bias(self, bias_E: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        if bias_E is None or not self.disabled:
            return bias_E
        return bias_E.index_fill(0, _ids(self.disabled, bias_E.device), float("-inf"))

    def adjust_routing(self, routing: Routing, config) -> Routing:
        """Apply ranks / forced experts to the router's choice; check no disabled expert was chosen."""
        indices_TK = routing.indices_TK
        if self.ranks:
            indices_TK = indices_TK[:, [r - 1 for r in self.ranks]]
        if self.forced:
            indices_TK = _force(indices_TK, self.forced)
        if self.ranks or self.forced:
            weights_TK = routing.scores_TE.gather(1, indices_TK)
            if config.renormalize and config.router != "switch":
                weights_TK = weights_TK / weights_TK.sum(-1, keepdim=True).clamp_min(1e-20)
            counts_E = ops.expert_histogram(indices_TK.contiguous(), config.num_experts)
            routing = routing.replace(indices_TK=indices_TK.contiguous(), weights_TK=weights_TK,
                                      tokens_per_expert_E=counts_E)
        if self.disabled and routing.num_tokens:
            hit = torch.isin(routing.indices_TK, _ids(self.disabled, routing.indices_TK.device))
            if bool(hit.any()):
                raise RuntimeError(f"the router chose disabled experts {list(self.disabled)}: fewer than top_k "
                                   "experts have a nonzero score; lower top_k")
        return routing


def _ids(experts: Sequence[int], device) -> torch.Tensor:
    return torch.tensor(list(experts), dtype=torch.int64, device=device)


def _force(indices_TK: torch.Tensor, forced: Sequence[int]) -> torch.Tensor:
    """Forced experts first, then each token's best other experts, k slots in all."""
    T, K = indices_TK.shape
    f = _ids(forced, indices_TK.device)
    is_forced_TK = torch.isin(indices_TK, f)
    # stable sort puts the token's non-forced choices first, in their rank order
    order_TK = torch.sort(is_forced_TK.to(torch.int8), dim=1, stable=True).indices
    others_TK = indices_TK.gather(1, order_TK)[:, :K - len(forced)]
    return torch.cat([f.expand(T, len(forced)), others_TK], dim=1)


def _per_layer(value, n_layers: int, name: str) -> list:
    """A value for all layers, or {layer: value}, as one entry per MoE layer (None = not set)."""
    if isinstance(value, Mapping):
        bad = [i for i in value if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < n_layers]
        if bad:
            raise ValueError(f"routing override {name}: layer indices {bad} are not MoE layers; "
                             f"the model has {n_layers} MoE layers, numbered 0..{n_layers - 1}")
        return [value.get(i) for i in range(n_layers)]
    return [value] * n_layers


def moe_layers_of(model) -> list:
    from hecate.moe.layer import MoELayer

    if isinstance(model, MoELayer):
        return [model]
    layers = [m for m in model.modules() if isinstance(m, MoELayer)]
    if not layers:
        raise ValueError(f"{type(model).__name__} has no MoE layer to override routing of")
    return layers


def build_overrides(n_layers: int, *, top_k=None, disabled=None, forced=None, temperature=None,
                    ranks=None) -> list[Optional[RoutingOverride]]:
    """One RoutingOverride (or None) per MoE layer from the knobs of routing_overrides."""
    per = {name: _per_layer(v, n_layers, name) for name, v in
           (("top_k", top_k), ("disabled", disabled), ("forced", forced), ("temperature", temperature),
            ("ranks", ranks))}
    out = []
    for i in range(n_layers):
        fields = {"top_k": per["top_k"][i], "temperature": per["temperature"][i],
                  **{n: tuple(sorted(set(per[n][i] or ()))) if n != "ranks" else tuple(per[n][i] or ())
                     for n in ("disabled", "forced", "ranks")}}
        o = RoutingOverride(**fields)
        out.append(None if o == RoutingOverride() else o)
    return out


@contextlib.contextmanager
def routing_overrides(model, *, top_k=None, disabled=None, forced=None, temperature=None,
                      ranks=None) -> Iterator[list]:
    """Apply routing overrides to every MoE layer of `model` (or one MoELayer) inside the `with`.

    Yields the per-layer RoutingOverride list in effect (None where a layer is untouched).
    """
    if all(v is None for v in (top_k, disabled, forced, temperature, ranks)):
        yield []  # nothing to override (a dense model needs no MoE layer for this)
        return
    layers = moe_layers_of(model)
    new = build_overrides(len(layers), top_k=top_k, disabled=disabled, forced=forced,
                          temperature=temperature, ranks=ranks)
    saved = [layer.router.override for layer in layers]
    merged = []
    for i, (layer, old, o) in enumerate(zip(layers, saved, new)):
        m = o if old is None else (old if o is None else old.merged_with(o))
        if m is not None:
            m.validate(layer.config, f"layer {i}")
        merged.append(m)
    try:
        for layer, m in zip(layers, merged):
            layer.router.override = m
        yield merged
    finally:
        for layer, old in zip(layers, saved):
            layer.router.override = old


def stacked_overrides(model, overrides: Sequence[Mapping]) -> contextlib.ExitStack:
    """One context applying each routing_overrides keyword set in turn (later ones merge over
    earlier ones), e.g. a run's --routing and then SCMoE's weak pass."""
    stack = contextlib.ExitStack()
    for kw in overrides:
        stack.enter_context(routing_overrides(model, **kw))
    return stack


def parse_routing(spec: str) -> dict:
    """The CLI's --routing string -> routing_overrides keywords.

    Comma-separated items: `top_k=1`, `temperature=2`, `disable=3`, `disable=L:3`,
    `force=5`, `force=L:5`, `rank=2`, `mask=NAME` (a saved mask, returned as key "mask").
    Repeated disable/force items accumulate; `L:` restricts an item to MoE layer L.
    """
    out: dict = {}
    for item in filter(None, (s.strip() for s in spec.split(","))):
        key, sep, val = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not val:
            raise ValueError(f"--routing item {item!r} must be KEY=VALUE (keys: top_k, temperature, disable, "
                             "force, rank, mask)")
        try:
            if key == "top_k":
                out["top_k"] = int(val)
            elif key == "temperature":
                out["temperature"] = float(val)
            elif key == "mask":
                out["mask"] = val
            elif key in ("disable", "force", "rank"):
                name = {"disable": "disabled", "force": "forced", "rank": "ranks"}[key]
                layer, _, expert = val.rpartition(":")
                entry = out.setdefault(name, {})
                target = int(layer) if layer else "all"
                entry.setdefault(target, []).append(int(expert))
            else:
                raise ValueError(f"--routing key {key!r} is unknown; use top_k, temperature, disable, force, "
                                 "rank or mask")
        except ValueError as e:
            if "--routing" in str(e):
                raise
            raise ValueError(f"--routing item {item!r}: {val!r} is not a number") from None
    for name in ("disabled", "forced", "ranks"):
        if name in out:
            out[name] = _expand_all(out[name])
    return out


def _expand_all(entry: dict):
    """{'all': [..]} -> [..]; per-layer entries also get the 'all' experts."""
    common = entry.pop("all", [])
    if not entry:
        return common
    return _AllLayers(common, {i: v + common for i, v in entry.items()})


class _AllLayers(dict):
    """{layer: experts} whose unnamed layers get `common` (built by parse_routing)."""

    def __init__(self, common: list, per_layer: dict):
        super().__init__(per_layer)
        self.common = common

    def get(self, key, default=None):
        return super().get(key, self.common or default)


def apply_mask_file(kwargs: dict, mask: Mapping) -> dict:
    """Union a saved mask {"disabled": {layer: [experts]}} into routing_overrides keywords."""
    disabled = {int(k): list(v) for k, v in mask.get("disabled", {}).items()}
    have = kwargs.get("disabled")
    if have is None:
        return {**kwargs, "disabled": disabled}
    common = list(getattr(have, "common", [])) if isinstance(have, Mapping) else list(have)
    per = dict(have) if isinstance(have, Mapping) else {}
    merged = {i: sorted(set(per.get(i, common)) | set(disabled.get(i, []))) for i in set(per) | set(disabled)}
    return {**kwargs, "disabled": _AllLayers(common, merged) if common else merged}


__all__ = ["RoutingOverride", "routing_overrides", "build_overrides", "parse_routing", "apply_mask_file",
           "moe_layers_of"]
