"""Registers Mixture-of-Mamba in the Transfusion setting (architecture `mixture_of_mamba_transfusion`)."""
from hecate.models.registry import register_arch, register_preset
from hecate.models.transfusion_mamba import TransfusionMamba, TransfusionMambaConfig

register_arch("mixture_of_mamba_transfusion", TransfusionMambaConfig, TransfusionMamba,
              paper="Mixture-of-Mamba (Liang et al., 2025), Transfusion setting: diffusion loss on image patches")

register_preset("tiny-mixture-of-mamba-transfusion", "mixture_of_mamba_transfusion",
                dict(vocab_size=32, d_model=32, n_layers=2, d_state=8, num_modalities=2, moe_every=1,
                     patch_dim=12, num_timesteps=100, max_seq_len=64,
                     moe=dict(hidden_size=32, ffn_hidden_size=32, num_experts=4, top_k=2,
                              aux_loss_coeff=0.01, min_capacity=1)),
                "tests: text tokens (next-token loss) interleaved with 8x8x3 images as 16 continuous patches "
                "(noise-prediction loss), modality-specific Mamba projections, a top-2 of 4 MoE FFN per block")
