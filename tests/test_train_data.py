"""Data: embedded corpus, tokenizer, memmaps, deterministic rank-disjoint sampling, LR schedule."""
import math

import numpy as np
import pytest
import torch

from hecate.train.config import OptimConfig, from_dict
from hecate.train.data import ByteTokenizer, TokenData, build_data, embedded_corpus, load_tokens
from hecate.train.trainer import lr_at


def test_embedded_corpus_is_deterministic_and_capped(tmp_path):
    a = embedded_corpus(str(tmp_path / "a"), max_bytes=200_000)
    b = embedded_corpus(str(tmp_path / "b"), max_bytes=200_000)
    assert a.read_bytes() == b.read_bytes() and a.stat().st_size == 200_000
    assert b"def " in a.read_bytes()
    assert embedded_corpus(str(tmp_path / "a"), max_bytes=200_000) == a  # cached


def test_byte_tokenizer_roundtrip():
    tok = ByteTokenizer()
    text = "héllo, wörld\n"
    assert tok.decode(tok.encode(text)) == text and max(tok.encode(text)) < 256


def test_text_and_memmap_sources(tmp_path):
    txt = tmp_path / "t.txt"
    txt.write_bytes(b"abc" * 10)
    assert load_tokens(str(txt)).tolist() == list(b"abc" * 10)
    ids = np.arange(1000, dtype=np.uint32) * 7
    ids.tofile(tmp_path / "t.bin")
    got = load_tokens(str(tmp_path / "t.bin"), "uint32")
    assert np.array_equal(np.asarray(got), ids)
    with pytest.raises(ValueError, match="data.source"):
        load_tokens(str(tmp_path / "missing.txt"))
    cfg = from_dict({"data": {"source": str(tmp_path / "t.bin"), "token_dtype": "uint32", "seq_len": 8},
                     "model": {"vocab_size": 256}})
    with pytest.raises(ValueError, match=r"token id 6993 >= model\.vocab_size=256"):
        build_data(cfg)


def _data(n=5000, seq=9, batch=3, seed=0):
    return TokenData(np.arange(n) % 251, seq, batch, 0.1, seed)


def test_sampling_deterministic_and_disjoint_across_ranks():
    d, world = _data(), 4
    for step in range(3):
        per_rank = [d.train_indices(step, 0, 1, r, world) for r in range(world)]
        flat = sum(per_rank, [])
        assert len(set(flat)) == len(flat)  # no window twice in one global batch
        assert per_rank == [_data().train_indices(step, 0, 1, r, world) for r in range(world)]
    # Over a whole epoch the ranks together see every window exactly once.
    steps = d.num_train_windows // (world * d.batch_size)
    seen = [i for s in range(steps) for r in range(world) for i in d.train_indices(s, 0, 1, r, world)]
    assert len(seen) == len(set(seen))
    assert _data(seed=1).train_indices(0, 0, 1, 0, world) != d.train_indices(0, 0, 1, 0, world)
    x, y = d.train_batch(2, 0, 1, 1, world)
    assert x.shape == (3, 9) and torch.equal(x[:, 1:], y[:, :-1])


def test_validation_split_is_held_out():
    d = _data()
    (x, y), = d.val_batches(1, rank=0, world=2)
    win = d.seq_len + 1
    # validation windows start at or after the split, training windows end before it
    assert d.num_train_windows * win <= d.split
    assert int(x[0, 0]) == int(d.tokens[d.split])
    with pytest.raises(ValueError, match="too few"):
        TokenData(np.arange(20), 16, 1, 0.1)


def test_lr_schedule_values():
    o = OptimConfig(lr=1.0, min_lr=0.1, warmup_steps=4)
    assert [lr_at(s, o, 14) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_at(4, o, 14) == pytest.approx(1.0)
    assert lr_at(9, o, 14) == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * 0.5)))
    assert lr_at(14, o, 14) == pytest.approx(0.1) and lr_at(100, o, 14) == pytest.approx(0.1)
    assert lr_at(0, OptimConfig(lr=2.0, min_lr=0.0, warmup_steps=0), 10) == pytest.approx(2.0)
