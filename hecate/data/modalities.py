"""Interleaved two-modality token streams (a stand-in for text + image tokens).

The vocabulary is split: modality 0 ("text") uses ids [0, text_vocab) drawn from a
Zipf-like bigram chain, modality 1 ("image") uses ids [text_vocab, vocab) that follow a
slowly drifting ramp (neighbouring "pixels" are close). Segments alternate with random
lengths, so a sequence reads text, image, text, ... Each sample depends only on (seed, index).
"""
from __future__ import annotations

import torch


def _text_segment(g: torch.Generator, n: int, text_vocab: int) -> torch.Tensor:
    # Bigram chain: next = (3 * prev + small Zipf-like offset) mod text_vocab.
    out = torch.empty(n, dtype=torch.long)
    prev = int(torch.randint(0, text_vocab, (), generator=g))
    probs = 1.0 / torch.arange(1, 5, dtype=torch.float32)
    for i in range(n):
        step = int(torch.multinomial(probs, 1, generator=g))
        prev = (3 * prev + 1 + step) % text_vocab
        out[i] = prev
    return out


def _image_segment(g: torch.Generator, n: int, text_vocab: int, image_vocab: int) -> torch.Tensor:
    start = int(torch.randint(0, image_vocab, (), generator=g))
    drift = torch.randint(-1, 2, (n,), generator=g).cumsum(0)
    return text_vocab + (start + drift) % image_vocab


def interleaved_batch(seed: int, batch_size: int, seq_len: int, *, text_vocab: int = 32,
                      image_vocab: int = 32, min_segment: int = 3, max_segment: int = 8,
                      start: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """tokens [B, seq_len] (long) and modality ids [B, seq_len] (0 = text, 1 = image)."""
    for name, v in (("batch_size", batch_size), ("seq_len", seq_len), ("text_vocab", text_vocab),
                    ("image_vocab", image_vocab), ("min_segment", min_segment)):
        if not isinstance(v, int) or v <= 0:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    if max_segment < min_segment:
        raise ValueError(f"max_segment={max_segment} must be >= min_segment={min_segment}")
    tokens = torch.empty(batch_size, seq_len, dtype=torch.long)
    modality = torch.empty(batch_size, seq_len, dtype=torch.long)
    for b in range(batch_size):
        g = torch.Generator().manual_seed(seed * 1_000_003 + start + b)
        pos, m = 0, int(torch.randint(0, 2, (), generator=g))
        while pos < seq_len:
            n = min(int(torch.randint(min_segment, max_segment + 1, (), generator=g)), seq_len - pos)
            seg = (_text_segment(g, n, text_vocab) if m == 0
                   else _image_segment(g, n, text_vocab, image_vocab))
            tokens[b, pos:pos + n] = seg
            modality[b, pos:pos + n] = m
            pos, m = pos + n, 1 - m
    return tokens, modality
