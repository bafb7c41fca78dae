"""Token data: the embedded corpus, byte or BPE tokens, memmaps, and rank-sharded sampling.

Sampling is a pure function of (seed, step, micro-batch, rank, world): the train split is cut
into non-overlapping windows of seq_len + 1 tokens; each epoch is a seeded permutation of the
windows, and one global micro-batch takes world * batch_size consecutive entries of it, rank r
the r-th block. So ranks never see the same window within an epoch, and a run is reproducible.
"""
from __future__ import annotations

import os
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from hecate.train.tokenizer import BPETokenizer, ByteTokenizer, split_text  # noqa: F401 (re-export)

EMBEDDED_NAME = "stdlib_corpus"


def stdlib_files() -> list[Path]:
    """The fixed, sorted list of top-level standard-library .py files of this Python."""
    root = Path(sysconfig.get_paths()["stdlib"])
    return sorted(p for p in root.glob("*.py") if p.is_file())


def embedded_corpus(cache_dir: str | None = None, max_bytes: int = 3_000_000) -> Path:
    """Write (once) and return the embedded corpus: this Python's stdlib sources, capped at max_bytes.

    Needs nothing from the network. The file is written atomically, so concurrent ranks are safe.
    """
    import sys

    base = Path(cache_dir or os.environ.get("HECATE_CACHE") or Path.home() / ".cache" / "hecate")
    ver = f"py{sys.version_info.major}{sys.version_info.minor}"
    path = base / f"{EMBEDDED_NAME}_{ver}_{max_bytes}.txt"
    if path.is_file() and path.stat().st_size > 0:
        return path
    base.mkdir(parents=True, exist_ok=True)
    chunks, total = [], 0
    for f in stdlib_files():
        data = f.read_bytes()
        chunks.append(b"# file: " + f.name.encode() + b"\n" + data + b"\n")
        total += len(chunks[-1])
        if total >= max_bytes:
            break
    blob = b"".join(chunks)[:max_bytes]
    if len(blob) < 10_000:
        raise ValueError(f"data.source='embedded': found only {len(blob)} bytes of stdlib sources under "
                         f"{sysconfig.get_paths()['stdlib']}; point data.source at a text file instead")
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    with open(tmp, "wb") as fh:
        fh.write(blob)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    return path


def load_tokens(source: str, token_dtype: str = "uint16", cache_dir: str | None = None,
                max_bytes: int = 3_000_000) -> np.ndarray:
    """All tokens of `source`: "embedded", a text file (bytes), or a .bin memmap of token ids."""
    if source == "embedded":
        return np.frombuffer(embedded_corpus(cache_dir, max_bytes).read_bytes(), dtype=np.uint8)
    path = Path(source)
    if not path.is_file():
        raise ValueError(f"data.source={source!r} is not 'embedded' nor an existing file")
    if path.suffix == ".bin":
        if token_dtype not in ("uint16", "uint32"):
            raise ValueError(f"data.token_dtype={token_dtype!r} must be uint16 or uint32")
        return np.memmap(path, dtype=np.dtype(token_dtype), mode="r")
    return np.frombuffer(path.read_bytes(), dtype=np.uint8)


@dataclass
class TokenData:
    """Train / validation splits of one token array and the deterministic batch sampler."""

    tokens: np.ndarray
    seq_len: int
    batch_size: int
    val_fraction: float = 0.05
    seed: int = 0
    val_start: Optional[int] = None  # where validation begins (None: the last val_fraction of tokens)

    def __post_init__(self):
        n = len(self.tokens)
        win = self.seq_len + 1
        if self.val_start is None:
            n_val = max(int(n * self.val_fraction), win)
        else:
            if not 0 <= self.val_start <= n:
                raise ValueError(f"val_start={self.val_start} must be in [0, {n}] (the number of tokens)")
            n_val = n - self.val_start
        self.split = n - n_val  # validation is the tail, so it never overlaps training windows
        self.num_train_windows = self.split // win
        self.num_val_windows = n_val // win
        if self.num_train_windows < 1 or self.num_val_windows < 1:
            raise ValueError(f"data: {n} tokens are too few for data.seq_len={self.seq_len} "
                             f"with data.val_fraction={self.val_fraction}; use a bigger source")

    def _window(self, start: int) -> torch.Tensor:
        chunk = np.asarray(self.tokens[start:start + self.seq_len + 1], dtype=np.int64)
        return torch.from_numpy(chunk)

    def train_indices(self, step: int, micro: int, grad_accum: int, rank: int, world: int) -> list[int]:
        """Window indices rank `rank` trains on at (step, micro): disjoint across ranks."""
        per_batch = world * self.batch_size
        first = (step * grad_accum + micro) * per_batch + rank * self.batch_size
        out = []
        for pos in range(first, first + self.batch_size):
            epoch, offset = divmod(pos, self.num_train_windows)
            perm = self._perm(epoch)
            out.append(int(perm[offset]))
        return out

    def _perm(self, epoch: int) -> np.ndarray:
        cache = getattr(self, "_perm_cache", None)
        if cache is None or cache[0] != epoch:
            rng = np.random.default_rng([self.seed, epoch])
            cache = (epoch, rng.permutation(self.num_train_windows))
            self._perm_cache = cache
        return cache[1]

    def train_batch(self, step: int, micro: int = 0, grad_accum: int = 1, rank: int = 0, world: int = 1):
        """(inputs_BS, targets_BS) for this rank at (step, micro)."""
        win = self.seq_len + 1
        rows = torch.stack([self._window(i * win) for i in
                            self.train_indices(step, micro, grad_accum, rank, world)])
        return rows[:, :-1], rows[:, 1:]

    def val_batches(self, num_batches: int, rank: int = 0, world: int = 1):
        """Fixed validation batches for this rank (windows rank, rank + world, ...; cycles if short)."""
        win = self.seq_len + 1
        out = []
        for b in range(num_batches):
            idx = [((b * self.batch_size + i) * world + rank) % self.num_val_windows
                   for i in range(self.batch_size)]
            rows = torch.stack([self._window(self.split + j * win) for j in idx])
            out.append((rows[:, :-1], rows[:, 1:]))
        return out


def load_text(source: str, cache_dir: str | None = None, max_bytes: int = 3_000_000) -> str:
    """The text of a text source ("embedded" or a text file), UTF-8 with invalid bytes replaced."""
    if source.endswith(".bin"):
        raise ValueError(f"data.source={source!r} is pre-tokenized; data.tokenizer='bpe' needs a text "
                         "source (or use data.tokenizer=byte for .bin files)")
    return bytes(load_tokens(source, "uint16", cache_dir, max_bytes)).decode("utf-8", errors="replace")


def train_bpe(cfg) -> BPETokenizer:
    """A BPE of data.vocab_size (default model.vocab_size) ids, learned from the training split only."""
    d = cfg.data
    train_text, _ = split_text(load_text(d.source, d.cache_dir, d.embedded_max_bytes), d.val_fraction)
    return BPETokenizer.train(train_text.splitlines(keepends=True), d.vocab_size or cfg.model.vocab_size)


def build_data(cfg, tokenizer=None) -> TokenData:
    """TokenData for a TrainConfig's data section and seed.

    With data.tokenizer='bpe', pass the trained BPETokenizer: the text is split into train and
    validation first and each part is encoded alone, so the splits match the tokenizer's.
    """
    d = cfg.data
    val_start = None
    if getattr(d, "tokenizer", "byte") == "bpe":
        if tokenizer is None:
            raise ValueError("build_data: data.tokenizer='bpe' needs the trained tokenizer "
                             "(hecate.train.data.train_bpe(cfg) or BPETokenizer.load(path))")
        train_text, val_text = split_text(load_text(d.source, d.cache_dir, d.embedded_max_bytes),
                                          d.val_fraction)
        train_ids, val_ids = tokenizer.encode_lines(train_text), tokenizer.encode_lines(val_text)
        dtype = np.uint16 if tokenizer.vocab_size <= 2 ** 16 else np.uint32
        tokens = np.asarray(train_ids + val_ids, dtype=dtype)
        val_start = len(train_ids)
    else:
        tokens = load_tokens(d.source, d.token_dtype, d.cache_dir, d.embedded_max_bytes)
    if len(tokens) and int(tokens.max()) >= cfg.model.vocab_size:
        raise ValueError(f"data.source={d.source!r} holds token id {int(tokens.max())} >= "
                         f"model.vocab_size={cfg.model.vocab_size}; raise model.vocab_size")
    return TokenData(tokens, d.seq_len, d.batch_size, d.val_fraction, cfg.train.seed, val_start)
