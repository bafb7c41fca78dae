"""Token data: the embedded corpus, a byte tokenizer, memmaps, and rank-sharded sampling.

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

import numpy as np
import torch

EMBEDDED_NAME = "stdlib_corpus"


class ByteTokenizer:
    """UTF-8 bytes as token ids (vocab 256); decoding replaces invalid sequences."""

    vocab_size = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids) -> str:
        return bytes(int(i) % 256 for i in ids).decode("utf-8", errors="replace")


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

    def __post_init__(self):
        n = len(self.tokens)
        win = self.seq_len + 1
        n_val = max(int(n * self.val_fraction), win)
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


def build_data(cfg) -> TokenData:
    """TokenData for a TrainConfig's data section and seed."""
    d = cfg.data
    tokens = load_tokens(d.source, d.token_dtype, d.cache_dir, d.embedded_max_bytes)
    if len(tokens) and int(tokens.max()) >= cfg.model.vocab_size:
        raise ValueError(f"data.source={d.source!r} holds token id {int(tokens.max())} >= "
                         f"model.vocab_size={cfg.model.vocab_size}; raise model.vocab_size")
    return TokenData(tokens, d.seq_len, d.batch_size, d.val_fraction, cfg.train.seed)
