"""Registers the base MoE transformer (GPT-MoE skeleton) as architecture `transformer`."""
from hecate.models.registry import register_arch
from hecate.models.transformer import MoETransformer, TransformerConfig

register_arch("transformer", TransformerConfig, MoETransformer,
              paper="GShard / Switch Transformer style decoder-only MoE")
