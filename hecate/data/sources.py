"""Trainer-shaped data sources over the generated sets: `train_batch(step, micro, grad_accum,
rank, world) -> (x, y)` and `val_batches(num_batches, rank, world)`, matching
hecate.train.data.TokenData, so a trainer that calls `model.loss(x, y)` can drive Switch-DiT
(x = images, y = labels) and Mixture-of-Mamba (x = input tokens, y = next tokens; the model
reads each token's modality from its id). Every rank reads a disjoint slice of each step.
"""
from __future__ import annotations

from dataclasses import dataclass

from hecate.data.images import shapes_batch
from hecate.data.modalities import interleaved_batch


def _check(batch_size, micro, grad_accum, rank, world):
    if not 0 <= rank < world:
        raise ValueError(f"rank={rank} must be in [0, world={world})")
    if not 0 <= micro < grad_accum:
        raise ValueError(f"micro={micro} must be in [0, grad_accum={grad_accum})")
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")


@dataclass
class ShapeImageData:
    """Generated shapes for diffusion: batch_size images per rank and micro-batch."""
    batch_size: int
    image_size: int = 8
    channels: int = 3
    seed: int = 0
    val_seed: int = 1

    def _index(self, step, micro, grad_accum, rank, world):
        return ((step * grad_accum + micro) * world + rank) * self.batch_size

    def train_batch(self, step: int, micro: int = 0, grad_accum: int = 1, rank: int = 0, world: int = 1):
        _check(self.batch_size, micro, grad_accum, rank, world)
        return shapes_batch(self.seed, self.batch_size, channels=self.channels, size=self.image_size,
                            start=self._index(step, micro, grad_accum, rank, world))

    def val_batches(self, num_batches: int, rank: int = 0, world: int = 1):
        return [shapes_batch(self.val_seed, self.batch_size, channels=self.channels, size=self.image_size,
                             start=self._index(i, 0, 1, rank, world)) for i in range(num_batches)]


@dataclass
class InterleavedTokenData:
    """Interleaved text/image token streams for next-token prediction (seq_len inputs)."""
    batch_size: int
    seq_len: int
    text_vocab: int = 32
    image_vocab: int = 32
    seed: int = 0
    val_seed: int = 1

    def _batch(self, seed, start):
        tokens, _ = interleaved_batch(seed, self.batch_size, self.seq_len + 1, text_vocab=self.text_vocab,
                                      image_vocab=self.image_vocab, start=start)
        return tokens[:, :-1], tokens[:, 1:]

    def train_batch(self, step: int, micro: int = 0, grad_accum: int = 1, rank: int = 0, world: int = 1):
        _check(self.batch_size, micro, grad_accum, rank, world)
        return self._batch(self.seed, ((step * grad_accum + micro) * world + rank) * self.batch_size)

    def val_batches(self, num_batches: int, rank: int = 0, world: int = 1):
        return [self._batch(self.val_seed, (i * world + rank) * self.batch_size) for i in range(num_batches)]


@dataclass
class CorpusInterleavedData:
    """Real text interleaved with generated image tokens, for Mixture-of-Mamba through the trainer.

    `text` is a byte array (e.g. the embedded corpus, ids 0-255, modality 0); image segments are
    the drifting ramps of hecate.data.modalities over ids [text_vocab, text_vocab + image_vocab)
    (modality 1). Each sequence alternates a text slice (16-48 bytes at a random offset of the
    split) and an image segment (8-16 tokens), starting with text. The last val_fraction of the
    text is the validation split; a sample depends only on (seed, index)."""
    text: object           # 1-D uint8 array
    batch_size: int
    seq_len: int
    image_vocab: int = 32
    text_vocab: int = 256
    val_fraction: float = 0.05
    seed: int = 0

    def __post_init__(self):
        if len(self.text) < 10 * (self.seq_len + 1):
            raise ValueError(f"the text source holds {len(self.text)} bytes, too few for seq_len={self.seq_len}")
        self.split = int(len(self.text) * (1 - self.val_fraction))

    def _sequence(self, index: int, val: bool):
        import torch

        g = torch.Generator().manual_seed((2 * self.seed + int(val)) * 1_000_003 + index)
        lo, hi = (self.split, len(self.text)) if val else (0, self.split)
        out, pos, text_turn = [], 0, True
        while pos < self.seq_len + 1:
            if text_turn:
                n = int(torch.randint(16, 49, (), generator=g))
                at = lo + int(torch.randint(0, max(1, hi - lo - n), (), generator=g))
                seg = torch.as_tensor(self.text[at:at + n].astype("int64"))
            else:
                n = int(torch.randint(8, 17, (), generator=g))
                start = int(torch.randint(0, self.image_vocab, (), generator=g))
                seg = self.text_vocab + (start + torch.randint(-1, 2, (n,), generator=g).cumsum(0)) % self.image_vocab
            out.append(seg)
            pos += len(seg)
            text_turn = not text_turn
        return torch.cat(out)[:self.seq_len + 1]

    def _batch(self, first: int, val: bool):
        import torch

        rows = torch.stack([self._sequence(first + b, val) for b in range(self.batch_size)])
        return rows[:, :-1], rows[:, 1:]

    def train_batch(self, step: int, micro: int = 0, grad_accum: int = 1, rank: int = 0, world: int = 1):
        _check(self.batch_size, micro, grad_accum, rank, world)
        return self._batch(((step * grad_accum + micro) * world + rank) * self.batch_size, False)

    def val_batches(self, num_batches: int, rank: int = 0, world: int = 1):
        return [self._batch((i * world + rank) * self.batch_size, True) for i in range(num_batches)]


@dataclass
class TransfusionData:
    """Text-like tokens interleaved with whole images as continuous patches (Transfusion setting),
    packed for hecate.models.transfusion_mamba: x [B, L, 2 + 12] (token, modality, patch), y [B, L]
    the next text token or -100 (no text loss where the next element is an image patch or at an
    image position). Each sequence: text (6-12 tokens of the bigram chain), an 8x8x3 shapes image
    (16 patches of 12 values), text, ... cut to seq_len."""
    batch_size: int
    seq_len: int
    text_vocab: int = 32
    seed: int = 0
    val_seed: int = 1

    def _row(self, seed: int, index: int):
        import torch

        from hecate.data.modalities import _text_segment

        g = torch.Generator().manual_seed(seed * 1_000_003 + index)
        rows, pos, k = [], 0, 0
        while pos < self.seq_len + 1:
            n = int(torch.randint(6, 13, (), generator=g))
            tok = _text_segment(g, n, self.text_vocab)
            rows.append(torch.cat([tok[:, None].float(), torch.zeros(n, 1), torch.zeros(n, 12)], 1))
            img, _ = shapes_batch(seed, 1, start=index * 64 + k)
            patches = img.reshape(1, 3, 4, 2, 4, 2).permute(0, 2, 4, 1, 3, 5).reshape(16, 12)
            rows.append(torch.cat([torch.zeros(16, 1), torch.ones(16, 1), patches], 1))
            pos += n + 16
            k += 1
        seq = torch.cat(rows)[:self.seq_len + 1]
        x = seq[:-1]
        nxt = seq[1:]
        y = torch.where((nxt[:, 1] == 0) & (x[:, 1] == 0), nxt[:, 0].long(), torch.full_like(nxt[:, 0].long(), -100))
        return x, y

    def _batch(self, seed: int, first: int):
        import torch

        xs, ys = zip(*(self._row(seed, first + b) for b in range(self.batch_size)))
        return torch.stack(xs), torch.stack(ys)

    def train_batch(self, step: int, micro: int = 0, grad_accum: int = 1, rank: int = 0, world: int = 1):
        _check(self.batch_size, micro, grad_accum, rank, world)
        return self._batch(self.seed, ((step * grad_accum + micro) * world + rank) * self.batch_size)

    def val_batches(self, num_batches: int, rank: int = 0, world: int = 1):
        return [self._batch(self.val_seed, (i * world + rank) * self.batch_size) for i in range(num_batches)]
