"""Registers Uni-MoE (architecture `uni_moe`) and its tiny preset."""
from hecate.data.multimodal import AUDIO_DIM, IMAGE_DIM
from hecate.models.registry import register_arch, register_preset
from hecate.models.uni_moe import UniMoE, UniMoEConfig

register_arch("uni_moe", UniMoEConfig, UniMoE,
              paper="Uni-MoE: Scaling Unified Multimodal LLMs with Mixture of Experts (Li et al., 2024)")

register_preset("tiny-uni-moe", "uni_moe", dict(
    lm=dict(vocab_size=64, d_model=32, n_layers=2, n_heads=4, max_seq_len=32, dense_ffn_hidden=48, moe_every=1,
            rope=True, dense_activation="swiglu",
            moe=dict(hidden_size=32, ffn_hidden_size=32, num_experts=4, top_k=2, aux_loss_coeff=0.01)),
    modalities={"image": IMAGE_DIM, "audio": AUDIO_DIM}, enc_dim=32,
    expert_groups={"image": [0, 1], "audio": [2, 3], "text": [0, 1, 2, 3]}, lora_rank=4),
    "tests: image-like patches and audio-like frames -> MLP encoders -> connectors -> a 2-layer MoE LM "
    "(4 experts top-2: image group {0, 1}, audio group {2, 3}), LoRA experts of rank 4")
