"""A Megatron-core ModuleSpec that puts Hecate's MoE layer where Megatron's MoELayer goes.

Needs megatron-core (pip install -e .[megatron]); importing this module without it raises
ImportError naming the extra. The Hecate layer itself runs anywhere (CPU included); a full
Megatron TransformerLayer around it needs what Megatron needs (CUDA for its MoE path).

    from hecate.integrations.megatron_spec import gpt_layer_spec_with_hecate_moe
    spec = gpt_layer_spec_with_hecate_moe(num_experts=8, strategy="fssdp")
    # pass `spec` as transformer_layer_spec to megatron.core.models.gpt.GPTModel
"""
from __future__ import annotations

import copy
from typing import Optional

import torch

try:
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler
    from megatron.core.transformer.spec_utils import ModuleSpec
except ImportError as exc:  # pragma: no cover - exercised by the skip path
    raise ImportError("hecate.integrations.megatron_spec needs megatron-core: "
                      "pip install -e .[megatron]") from exc

from hecate.integrations.megatron import megatron_moe_config
from hecate.integrations.strategy_choice import attach, resolve_strategy
from hecate.moe.layer import MoELayer


class HecateMegatronMoE(MoELayer):
    """Hecate's MoELayer with Megatron's MLP-submodule interface.

    Built by Megatron as `build_module(spec, config=TransformerConfig)`; the MoE settings
    come from that config through hecate.integrations.megatron (unsupported ones raise).
    forward(hidden_states [S, B, D]) -> (output [S, B, D], None); the aux losses ride on
    the output through Megatron's MoEAuxLossAutoScaler, exactly like its own router does,
    so pipeline schedules scale them the same way.
    """

    def __init__(self, config, strategy="fssdp", strategy_options: Optional[dict] = None,
                 layer_number: Optional[int] = None, **_megatron_kwargs):
        moe_cfg = megatron_moe_config(config)
        super().__init__(moe_cfg)
        self.megatron_config = config
        self.layer_number = layer_number
        ep = getattr(config, "expert_model_parallel_size", 1) or 1
        attach(self, resolve_strategy(strategy, strategy_options, None, ep))

    def set_layer_number(self, layer_number: int) -> None:
        self.layer_number = layer_number

    def forward(self, hidden_states: torch.Tensor, padding_mask=None, **_):  # noqa: D401
        if padding_mask is not None:
            raise ValueError("padding_mask is not supported by Hecate's MoE layer; pack sequences instead")
        x_BSD = hidden_states.transpose(0, 1)  # Megatron is sequence-first; Hecate's seq loss wants [B, S, D]
        out = super().forward(x_BSD)
        y = out.y.transpose(0, 1)
        if out.aux_losses and self.training:
            y = MoEAuxLossAutoScaler.apply(y, out.aux_loss)
        return y, None


def hecate_moe_spec(strategy="fssdp", strategy_options: Optional[dict] = None) -> ModuleSpec:
    """The ModuleSpec of the Hecate MoE layer (for TransformerLayerSubmodules.mlp)."""
    return ModuleSpec(module=HecateMegatronMoE,
                      params={"strategy": strategy, "strategy_options": strategy_options})


def gpt_layer_spec_with_hecate_moe(layer_spec: Optional[ModuleSpec] = None, num_experts: int = 8,
                                   strategy="fssdp", strategy_options: Optional[dict] = None,
                                   **local_spec_kwargs) -> ModuleSpec:
    """A GPT layer spec (Megatron's local spec by default) whose mlp is Hecate's MoE layer."""
    if layer_spec is None:
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

        layer_spec = get_gpt_layer_local_spec(num_experts=num_experts, **local_spec_kwargs)
    spec = copy.deepcopy(layer_spec)
    if not hasattr(spec, "submodules") or not hasattr(spec.submodules, "mlp"):
        raise ValueError("layer_spec must be a TransformerLayer ModuleSpec with submodules.mlp")
    spec.submodules.mlp = hecate_moe_spec(strategy, strategy_options)
    return spec
