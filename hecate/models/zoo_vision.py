"""Registers Switch-DiT (architecture `switch_dit`) and its presets."""
from hecate.models.registry import register_arch, register_preset
from hecate.models.switch_dit import SwitchDiT, SwitchDiTConfig

register_arch("switch_dit", SwitchDiTConfig, SwitchDiT,
              paper="Switch Diffusion Transformer (Park et al., ECCV 2024, arXiv 2403.09176)")

_PAPER = dict(image_size=32, in_channels=4, patch_size=2, num_classes=1000, num_experts=3, top_k=2,
              num_timesteps=1000, noise_schedule="linear")  # 256x256 images as 32x32x4 SD-VAE latents

register_preset("tiny-switch-dit", "switch_dit",
                dict(image_size=8, in_channels=3, patch_size=2, d_model=32, n_layers=2, n_heads=4,
                     num_classes=4, num_experts=3, top_k=2, expert_type="linear"),
                "tests: 8x8 generated shapes, 16 tokens, top-2 of 3 timestep-gated experts")
register_preset("switch-dit-s2", "switch_dit", dict(_PAPER, d_model=384, n_layers=12, n_heads=6),
                "Switch-DiT-S/2 (DiT-S/2 + a 3-expert switch per block)")
register_preset("switch-dit-b2", "switch_dit", dict(_PAPER, d_model=768, n_layers=12, n_heads=12),
                "Switch-DiT-B/2 (DiT-B/2 + a 3-expert switch per block)")
register_preset("switch-dit-l2", "switch_dit", dict(_PAPER, d_model=1024, n_layers=24, n_heads=16),
                "Switch-DiT-L/2 (DiT-L/2 + a 3-expert switch per block)")
register_preset("switch-dit-xl2", "switch_dit", dict(_PAPER, d_model=1152, n_layers=28, n_heads=16),
                "Switch-DiT-XL/2 (DiT-XL/2 + a 3-expert switch per block)")
