"""Mixture-of-Mamba in the Transfusion setting: text tokens with a next-token loss, images as
continuous patch vectors with a diffusion (noise-prediction) loss, in one sequence.

One packed input row per position, x_BLC (C = 2 + patch_dim), so the trainer's `batch.to(device)`
and `model.loss(x, y)` work unchanged:
  x[..., 0] token id (text positions), x[..., 1] modality (0 text, 1 image), x[..., 2:] the clean
  image patch (image positions; zeros elsewhere).
Image positions are embedded as patch_in(x_t) + t_embed(t), with x_t = q_sample(patch, t, noise)
for one timestep t per sequence; the same Mixture-of-Mamba blocks (modality-specific projections)
run over the sequence; text positions predict the next token (logits), image positions predict
the noise (patch_out). Loss = cross-entropy over targets >= 0 (y = -100 where the next element is
not a text token) + diffusion_loss_weight * MSE(predicted noise, noise) over image positions + MoE
aux losses. t and noise come from `generator` (default torch's global RNG).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from hecate.models.diffusion import SCHEDULES, alphas_cumprod, q_sample
from hecate.models.mamba import MambaConfig, MambaOutput, MixtureOfMamba


@dataclass
class TransfusionMambaConfig(MambaConfig):
    patch_dim: int = 12
    num_timesteps: int = 1000
    noise_schedule: str = "linear"
    diffusion_loss_weight: float = 1.0

    def validate(self) -> "TransfusionMambaConfig":
        super().validate()
        if self.num_modalities != 2:
            raise ValueError("TransfusionMambaConfig.num_modalities must be 2 (text, image)")
        if self.patch_dim < 1 or self.num_timesteps < 1 or self.diffusion_loss_weight < 0:
            raise ValueError("TransfusionMambaConfig.patch_dim, num_timesteps must be >= 1 and "
                             "diffusion_loss_weight >= 0")
        if self.noise_schedule not in SCHEDULES:
            raise ValueError(f"TransfusionMambaConfig.noise_schedule={self.noise_schedule!r}; choose one of {SCHEDULES}")
        return self


@dataclass
class TransfusionOutput(MambaOutput):
    eps: Optional[torch.Tensor] = None      # predicted noise at every position [B, L, patch_dim]
    mse: Optional[torch.Tensor] = None


class TransfusionMamba(MixtureOfMamba):
    def __init__(self, cfg: TransfusionMambaConfig):
        super().__init__(cfg)
        d = cfg.d_model
        self.patch_in = nn.Linear(cfg.patch_dim, d)
        self.t_embed = nn.Sequential(nn.Linear(64, d), nn.SiLU(), nn.Linear(d, d))
        self.patch_out = nn.Linear(d, cfg.patch_dim)
        self.register_buffer("alphas_cumprod_T", alphas_cumprod(cfg.num_timesteps, cfg.noise_schedule).float(),
                             persistent=False)

    def _t_features(self, t_B: torch.Tensor) -> torch.Tensor:
        half = 32
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t_B.device) / half)
        args = t_B.float()[:, None] * freqs[None]
        return torch.cat([torch.cos(args), torch.sin(args)], -1)

    def unpack(self, x_BLC: torch.Tensor):
        if x_BLC.dim() != 3 or x_BLC.shape[-1] != 2 + self.cfg.patch_dim:
            raise ValueError(f"packed input must be [B, L, 2 + patch_dim={2 + self.cfg.patch_dim}], got "
                             f"{tuple(x_BLC.shape)}")
        return x_BLC[..., 0].long(), x_BLC[..., 1].long(), x_BLC[..., 2:]

    def forward_packed(self, x_BLC, t_B, noise_BLP) -> TransfusionOutput:
        tokens, modality, patches = self.unpack(x_BLC)
        image = (modality == 1).unsqueeze(-1)
        noisy = q_sample(patches, t_B, noise_BLP, self.alphas_cumprod_T)
        img_emb = self.patch_in(noisy) + self.t_embed(self._t_features(t_B))[:, None]
        x = torch.where(image, img_emb, self.embed(tokens * (~image[..., 0])))
        aux, stats = [], []
        for block in self.blocks:
            x = block(x, modality, aux, stats)
        x = self.norm(x)
        logits = x @ self.embed.weight.t() if self.head is None else self.head(x)
        aux_loss = torch.stack(aux).sum() if aux else x.new_zeros(())
        return TransfusionOutput(logits, aux_loss, stats, eps=self.patch_out(x))

    def loss(self, x_BLC, targets_BL, generator: Optional[torch.Generator] = None):
        _, modality, patches = self.unpack(x_BLC)
        B = x_BLC.shape[0]
        if generator is None:
            t = torch.randint(0, self.cfg.num_timesteps, (B,), device=x_BLC.device)
            noise = torch.randn_like(patches)
        else:
            t = torch.randint(0, self.cfg.num_timesteps, (B,), generator=generator).to(x_BLC.device)
            noise = torch.randn(patches.shape, generator=generator).to(x_BLC.device, patches.dtype)
        out = self.forward_packed(x_BLC, t, noise)
        image = modality == 1
        text = targets_BL >= 0
        ce = (F.cross_entropy(out.logits[text].float(), targets_BL[text]) if text.any()
              else out.logits.sum() * 0.0)
        mse = (F.mse_loss(out.eps[image].float(), noise[image].float()) if image.any()
               else out.eps.sum() * 0.0)
        out.mse = mse
        return ce + self.cfg.diffusion_loss_weight * mse + out.aux_loss, out
