"""Procedural images: small shapes and gradients, a pure function of (seed, index).

Every image is [C, H, W] in [-1, 1]; its class is the shape kind. Deterministic across
machines (CPU generator, no randomness outside the seeded torch.Generator).
"""
from __future__ import annotations

import torch

SHAPES = ("disk", "square", "hstripes", "vgradient")
NUM_SHAPE_CLASSES = len(SHAPES)


def _one_image(g: torch.Generator, kind: int, channels: int, size: int) -> torch.Tensor:
    yy, xx = torch.meshgrid(torch.arange(size, dtype=torch.float32),
                            torch.arange(size, dtype=torch.float32), indexing="ij")
    cy, cx = (torch.rand(2, generator=g) * 0.5 + 0.25) * (size - 1)
    r = float(torch.rand((), generator=g)) * size * 0.2 + size * 0.15
    if kind == 0:
        mask = ((yy - cy) ** 2 + (xx - cx) ** 2 <= r * r).float()
    elif kind == 1:
        mask = (((yy - cy).abs() <= r) & ((xx - cx).abs() <= r)).float()
    elif kind == 2:
        period = 2 + int(torch.randint(0, 3, (), generator=g))
        mask = ((yy.long() // period) % 2).float()
    else:
        mask = yy / max(size - 1, 1)
    fg = torch.rand(channels, generator=g) * 2 - 1
    bg = torch.rand(channels, generator=g) * 0.5 - 0.25
    return bg[:, None, None] + (fg - bg)[:, None, None] * mask


def shapes_batch(seed: int, batch_size: int, *, channels: int = 3, size: int = 8,
                 start: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Images [B, C, size, size] in [-1, 1] and class labels [B] for indices start..start+B-1.

    Image i depends only on (seed, i), so ranks can take disjoint index ranges of one data set.
    """
    for name, v in (("batch_size", batch_size), ("channels", channels), ("size", size)):
        if not isinstance(v, int) or v <= 0:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    if size < 4:
        raise ValueError(f"size={size} is too small for shapes; use size >= 4")
    images, labels = [], []
    for i in range(start, start + batch_size):
        g = torch.Generator().manual_seed(seed * 1_000_003 + i)
        kind = int(torch.randint(0, NUM_SHAPE_CLASSES, (), generator=g))
        images.append(_one_image(g, kind, channels, size).clamp(-1, 1))
        labels.append(kind)
    return torch.stack(images), torch.tensor(labels, dtype=torch.long)
