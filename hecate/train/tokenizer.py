"""Tokenizers for text sources: bytes (default) or a byte-level BPE trained locally.

The BPE uses the optional `tokenizers` package (pip install tokenizers) and is trained on
the training split only, so validation text never shapes the vocabulary. It is saved as
out_dir/tokenizer.json beside the run and reloaded from there on --resume.
"""
from __future__ import annotations

import os
from pathlib import Path

TOKENIZER_FILE = "tokenizer.json"


class ByteTokenizer:
    """UTF-8 bytes as token ids (vocab 256); decoding replaces invalid sequences."""

    vocab_size = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids) -> str:
        return bytes(int(i) % 256 for i in ids).decode("utf-8", errors="replace")


def _tokenizers():
    try:
        import tokenizers
    except ImportError:
        raise ValueError("data.tokenizer='bpe' needs the optional `tokenizers` package: "
                         "pip install tokenizers (or use data.tokenizer=byte)") from None
    return tokenizers


class BPETokenizer:
    """Byte-level BPE (GPT-2 style pre-tokenization): any text encodes, decode(encode(t)) == t."""

    def __init__(self, tokenizer):
        self.tok = tokenizer

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size()

    @classmethod
    def train(cls, texts, vocab_size: int) -> "BPETokenizer":
        """Learn merges from an iterable of strings up to `vocab_size` ids (256 byte symbols + merges)."""
        if vocab_size <= 256:
            raise ValueError(f"data.vocab_size={vocab_size} must be > 256 for BPE (256 byte symbols + merges)")
        tk = _tokenizers()
        tok = tk.Tokenizer(tk.models.BPE())
        tok.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = tk.decoders.ByteLevel()
        trainer = tk.trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False, special_tokens=[],
                                         initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet())
        tok.train_from_iterator(texts, trainer)
        return cls(tok)

    @classmethod
    def load(cls, path: str | Path) -> "BPETokenizer":
        tk = _tokenizers()
        if not Path(path).is_file():
            raise ValueError(f"BPE tokenizer file {path} is missing; a resumed run needs the "
                             f"{TOKENIZER_FILE} its first run saved in train.out_dir")
        return cls(tk.Tokenizer.from_file(str(path)))

    def save(self, path: str | Path) -> Path:
        """Write atomically (temporary file, fsync, rename) so a reader never sees half a file."""
        path = Path(path)
        tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
        tmp.write_text(self.tok.to_str())
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        return path

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text).ids

    def encode_lines(self, text: str) -> list[int]:
        """Encode a long text line by line (batched, in parallel); concatenating is exact for
        byte-level BPE up to pre-token boundaries, and deterministic."""
        ids: list[int] = []
        for enc in self.tok.encode_batch(text.splitlines(keepends=True)):
            ids.extend(enc.ids)
        return ids

    def decode(self, ids) -> str:
        return self.tok.decode([int(i) for i in ids])


def split_text(text: str, val_fraction: float) -> tuple[str, str]:
    """(train, validation) text: validation is the tail, cut at a line start when there is one."""
    cut = len(text) - max(1, int(len(text) * val_fraction))
    nl = text.rfind("\n", 0, cut)
    if nl >= 0 and cut - nl <= 4096:  # prefer a line boundary near the cut
        cut = nl + 1
    return text[:cut], text[cut:]
