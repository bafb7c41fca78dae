"""`hecate sample RUN_DIR`: draw images from a trained Switch-DiT run's newest checkpoint.

The run's config rebuilds the model with all experts local; the (sharded) checkpoint is
resharded on load. Images are DDPM samples in [-1, 1]; they are written as one grid image
(binary PPM for 3 channels, PGM otherwise; any image viewer reads them) and as a safetensors
file of the raw [N, C, H, W] tensor.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch


def _grid(images_NCHW: torch.Tensor, cols: int) -> torch.Tensor:
    n, c, h, w = images_NCHW.shape
    rows = -(-n // cols)
    grid = torch.full((c, rows * (h + 1) + 1, cols * (w + 1) + 1), -1.0)
    for i, img in enumerate(images_NCHW):
        r, q = divmod(i, cols)
        grid[:, 1 + r * (h + 1):1 + r * (h + 1) + h, 1 + q * (w + 1):1 + q * (w + 1) + w] = img
    return grid


def write_pnm(path: Path, image_CHW: torch.Tensor) -> None:
    """Atomically write [C, H, W] in [-1, 1] as binary PPM (C = 3) or PGM (channel 0)."""
    c, h, w = image_CHW.shape
    pixels = ((image_CHW.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    body = pixels.permute(1, 2, 0).contiguous() if c == 3 else pixels[0].contiguous()
    header = f"{'P6' if c == 3 else 'P5'}\n{w} {h}\n255\n".encode()
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_bytes(header + body.numpy().tobytes())
    os.replace(tmp, path)


def sample_images(run_dir: str | Path, num_images: int = 8, out: str | Path | None = None, seed: int = 0,
                  labels: list[int] | None = None) -> dict:
    """Sample `num_images` from the run (labels cycle over the classes unless given); write
    out (default RUN_DIR/samples.ppm or .pgm) and its .safetensors; return paths and step."""
    from safetensors.torch import save_file

    from hecate.train.generate import load_run

    run = Path(run_dir)
    model, _, step = load_run(run)
    cfg = model.cfg
    if not hasattr(model, "sample") or not hasattr(cfg, "image_size"):
        raise ValueError(f"{run} did not train an image model; use `hecate generate {run}` for text")
    if num_images < 1:
        raise ValueError(f"--images must be >= 1, got {num_images}")
    y = None
    if cfg.num_classes:
        labels = labels if labels else [i % cfg.num_classes for i in range(num_images)]
        if len(labels) != num_images or any(not 0 <= k < cfg.num_classes for k in labels):
            raise ValueError(f"--labels must give {num_images} class ids in [0, {cfg.num_classes})")
        y = torch.tensor(labels)
    elif labels:
        raise ValueError("--labels: this model is unconditional (num_classes = 0)")
    g = torch.Generator().manual_seed(seed)
    images = model.sample(num_images, y, generator=g)
    suffix = ".ppm" if cfg.in_channels == 3 else ".pgm"
    path = Path(out) if out else run / f"samples{suffix}"
    write_pnm(path, _grid(images.float().cpu(), min(8, num_images)))
    tensors = path.with_suffix(".safetensors")
    tmp = tensors.with_name(tensors.name + f".tmp{os.getpid()}")
    save_file({"images": images.float().cpu().contiguous()}, str(tmp))
    os.replace(tmp, tensors)
    return {"image": str(path), "tensors": str(tensors), "step": step, "num_images": num_images}
