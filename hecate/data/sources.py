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
