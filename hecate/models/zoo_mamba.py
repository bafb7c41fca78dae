"""Registers Mixture-of-Mamba (architecture `mixture_of_mamba`) and its presets."""
from hecate.models.mamba import MambaConfig, MixtureOfMamba
from hecate.models.registry import register_arch, register_preset

register_arch("mixture_of_mamba", MambaConfig, MixtureOfMamba,
              paper="Mixture-of-Mamba: modality-aware state-space sparsity (Liang et al., 2025, arXiv 2501.16295)")

register_preset("tiny-mixture-of-mamba", "mixture_of_mamba",
                dict(vocab_size=64, d_model=32, n_layers=2, d_state=8, num_modalities=2, moe_every=1,
                     modality_vocab_starts=[0, 32],  # hecate.data.interleaved_batch's default split
                     moe=dict(hidden_size=32, ffn_hidden_size=32, num_experts=4, top_k=2,
                              aux_loss_coeff=0.01, min_capacity=1)),
                "tests: 2 modality-aware Mamba blocks, each followed by a top-2 of 4 MoE FFN "
                "(so the expert strategies have layers to shard)")
# Paper-like sizes: Mamba-790M / 1.4B layouts (d_state 16, expand 2, d_conv 4) with a
# 65,536-token vocabulary (ids >= 57,344 = 8,192 image codes, a Chameleon-style split) and
# two modalities; pure Mamba (no MoE FFN).
_PAPER = dict(vocab_size=65536, modality_vocab_starts=[0, 57344], d_state=16, d_conv=4, expand=2,
              num_modalities=2, moe_every=0)
register_preset("mixture-of-mamba-790m", "mixture_of_mamba", dict(_PAPER, d_model=1536, n_layers=48),
                "Mixture-of-Mamba on a Mamba-790M layout, text + image modalities")
register_preset("mixture-of-mamba-1.4b", "mixture_of_mamba", dict(_PAPER, d_model=2048, n_layers=48),
                "Mixture-of-Mamba on a Mamba-1.4B layout, text + image modalities")
