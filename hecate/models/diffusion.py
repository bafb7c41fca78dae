"""Gaussian diffusion pieces for epsilon-prediction training (DDPM, Ho et al. 2020).

Kept apart from the network so that a test can check the schedule on its own and so the
model's loss takes (t, noise) as inputs: every rank and the single-process oracle then
see exactly the same noise.
"""
from __future__ import annotations

import math

import torch

SCHEDULES = ("linear", "cosine")


def alphas_cumprod(num_timesteps: int, schedule: str = "linear") -> torch.Tensor:
    """alpha-bar_t for t = 0..T-1 (float64): linear betas 1e-4..0.02 scaled by 1000 / T, or the
    cosine schedule of Nichol & Dhariwal (2021) with betas clipped at 0.999."""
    if not isinstance(num_timesteps, int) or num_timesteps <= 0:
        raise ValueError(f"num_timesteps must be a positive int, got {num_timesteps!r}")
    if schedule == "linear":
        scale = 1000.0 / num_timesteps
        betas = torch.linspace(scale * 1e-4, scale * 0.02, num_timesteps, dtype=torch.float64).clamp(max=0.999)
        return torch.cumprod(1.0 - betas, 0)
    if schedule == "cosine":
        s = 0.008
        steps = torch.arange(num_timesteps + 1, dtype=torch.float64) / num_timesteps
        f = torch.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
        betas = (1 - f[1:] / f[:-1]).clamp(max=0.999)
        return torch.cumprod(1.0 - betas, 0)
    raise ValueError(f"noise schedule {schedule!r} is unknown; choose one of {SCHEDULES}")


def q_sample(x0: torch.Tensor, t_B: torch.Tensor, noise: torch.Tensor,
             alphas_cumprod_T: torch.Tensor) -> torch.Tensor:
    """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise (per sample t)."""
    abar = alphas_cumprod_T.to(x0.device)[t_B].to(x0.dtype).view(-1, *([1] * (x0.dim() - 1)))
    return abar.sqrt() * x0 + (1 - abar).sqrt() * noise


def sample_t_and_noise(x0: torch.Tensor, num_timesteps: int,
                       generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Uniform timesteps [B] and standard normal noise shaped like x0 (CPU generator)."""
    t_B = torch.randint(0, num_timesteps, (x0.shape[0],), generator=generator)
    noise = torch.randn(x0.shape, generator=generator, dtype=x0.dtype)
    return t_B.to(x0.device), noise.to(x0.device)
