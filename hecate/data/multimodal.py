"""Generated image-like and audio-like samples with captions, for Uni-MoE (no downloads).

Sample i of seed s has an image class c_i and a sound class c_a (4 each). The image is a shapes
image (hecate.data.images) cut into patch features [16, 12] (8x8x3, patch 2); the sound is a
sequence of 8 frames of 16 samples of a sine whose frequency is set by c_a, with noise. The caption
is [BOS, 10 + c_i, 20 + c_a, 30 + (c_i + c_a) % 4, EOS]: reading it needs both modalities.
"""
from __future__ import annotations

import math

import torch

from hecate.data.images import shapes_batch

BOS, EOS = 1, 2
IMAGE_DIM, AUDIO_DIM = 12, 16
IMAGE_TOKENS, AUDIO_FRAMES = 16, 8


def _patches(images_BCHW: torch.Tensor, p: int = 2) -> torch.Tensor:
    b, c, h, w = images_BCHW.shape
    x = images_BCHW.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // p) * (w // p), c * p * p)


def multimodal_batch(seed: int, batch_size: int, start: int = 0):
    """((tokens [B, 4], {"image": [B, 16, 12], "audio": [B, 8, 16]}), targets [B, 4])."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    images, c_img = shapes_batch(seed, batch_size, start=start)
    g = torch.Generator().manual_seed(seed * 7919 + start)
    c_aud = torch.randint(0, 4, (batch_size,), generator=g)
    t = torch.arange(AUDIO_FRAMES * AUDIO_DIM, dtype=torch.float32)
    freq = (1 + c_aud.float())[:, None] * 2 * math.pi / 32
    phase = torch.rand(batch_size, 1, generator=g) * 2 * math.pi
    audio = torch.sin(freq * t + phase) + 0.1 * torch.randn(batch_size, t.numel(), generator=g)
    caption = torch.stack([torch.full_like(c_img, BOS), 10 + c_img, 20 + c_aud, 30 + (c_img + c_aud) % 4,
                           torch.full_like(c_img, EOS)], 1)
    features = {"image": _patches(images), "audio": audio.view(batch_size, AUDIO_FRAMES, AUDIO_DIM)}
    return (caption[:, :-1], features), caption[:, 1:]
