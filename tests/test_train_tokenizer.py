"""Optional BPE tokenizer: trained on the training split only, saved beside the run, reloaded on resume."""
import builtins
import json
import shutil

import numpy as np
import pytest
import torch.distributed as dist

from hecate.train.config import from_dict, load_config
from hecate.train.data import TokenData, build_data, train_bpe
from hecate.train.tokenizer import BPETokenizer, split_text

FRESH_GROUP = pytest.mark.skipif(dist.is_available() and dist.is_initialized(), reason="needs a fresh process group")


def _text_file(tmp_path):
    # The tail (about 15%, inside the 20% validation split) is a word the training part never has.
    train = "alphaword beta gamma\n" * 1000
    val = "zqxjvk\n" * 530
    path = tmp_path / "corpus.txt"
    path.write_text(train + val)
    return path


def _bpe_cfg(path, vocab=300):
    return from_dict({"data": {"source": str(path), "tokenizer": "bpe", "vocab_size": vocab, "seq_len": 8,
                               "val_fraction": 0.2}, "model": {"vocab_size": 512}}).validate()


def test_bpe_learns_from_the_training_split_only(tmp_path):
    pytest.importorskip("tokenizers")
    cfg = _bpe_cfg(_text_file(tmp_path))
    tok = train_bpe(cfg)
    assert 256 < tok.vocab_size <= 300
    assert len(tok.encode("alphaword")) == 1           # frequent in training: merged into one id
    assert len(tok.encode("zqxjvk")) >= 4              # only in validation: never merged
    text = "def f(x):\n    return 'héllo' + x\n"
    assert tok.decode(tok.encode(text)) == text          # byte-level: any text round-trips
    data = build_data(cfg, tok)
    train_text, val_text = split_text(_text_file(tmp_path).read_text(), 0.2)
    assert "zqxjvk" not in train_text and val_text.startswith("alphaword")  # cut at a line start
    assert data.split == len(tok.encode_lines(train_text))
    assert np.asarray(data.tokens[data.split:]).tolist() == tok.encode_lines(val_text)
    with pytest.raises(ValueError, match="needs the trained tokenizer"):
        build_data(cfg)


def test_bpe_save_load_roundtrip(tmp_path):
    pytest.importorskip("tokenizers")
    tok = train_bpe(_bpe_cfg(_text_file(tmp_path)))
    path = tok.save(tmp_path / "tokenizer.json")
    again = BPETokenizer.load(path)
    assert again.encode("alphaword zz\n") == tok.encode("alphaword zz\n") and again.vocab_size == tok.vocab_size
    with pytest.raises(ValueError, match="tokenizer.json is missing"):
        BPETokenizer.load(tmp_path / "nope" / "tokenizer.json")
    with pytest.raises(ValueError, match="must be > 256"):
        BPETokenizer.train(["abc"], 256)


def test_bpe_without_the_package_says_how_to_install(tmp_path, monkeypatch):
    real_import = builtins.__import__

    def no_tokenizers(name, *args, **kwargs):
        if name == "tokenizers" or name.startswith("tokenizers."):
            raise ImportError("No module named 'tokenizers'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_tokenizers)
    with pytest.raises(ValueError, match="pip install tokenizers"):
        train_bpe(_bpe_cfg(_text_file(tmp_path)))


@pytest.mark.parametrize("data,model,match", [
    ({"tokenizer": "bpx"}, {}, r"data.tokenizer='bpx' must be one of .*did you mean 'bpe'"),
    ({"tokenizer": "bpe", "source": "tokens.bin"}, {"vocab_size": 1024}, r"data.tokenizer='bpe' needs a text"),
    ({"tokenizer": "bpe", "vocab_size": 2048}, {"vocab_size": 1024}, r"data.vocab_size=2048 exceeds model"),
    ({"tokenizer": "bpe"}, {"vocab_size": 256}, r"data.vocab_size=256 must be > 256"),
    ({"vocab_size": 512}, {"vocab_size": 1024}, r"data.vocab_size=512 is only used with data.tokenizer=bpe"),
])
def test_tokenizer_config_errors(data, model, match):
    with pytest.raises(ValueError, match=match):
        from_dict({"data": data, "model": model}).validate()


def _run_cfg(tmp_path, name, *extra):
    return load_config("tiny_dp", ["parallel.strategy=local", "parallel.nproc=1", "train.steps=4",
                                   "train.log_every=1", "train.eval_every=4", "data.embedded_max_bytes=100000",
                                   f"data.cache_dir={tmp_path}/cache", f"train.out_dir={tmp_path}/{name}",
                                   "logging.progress=false", "logging.heatmap=false", "data.tokenizer=bpe",
                                   "model.vocab_size=320", "checkpoint.every=2", *extra])


def _losses(path):
    return {r["step"]: r["loss"] for r in map(json.loads, path.read_text().splitlines()) if "loss" in r}


@FRESH_GROUP
def test_bpe_run_saves_tokenizer_and_resume_reloads_it(tmp_path):
    pytest.importorskip("tokenizers")
    pytest.importorskip("hecate.train.checkpoint")
    from hecate.train.trainer import train

    summary = train(_run_cfg(tmp_path, "full", "sample.num_samples=1", "sample.max_new_tokens=3"))
    saved = tmp_path / "full" / "tokenizer.json"
    assert saved.is_file() and BPETokenizer.load(saved).vocab_size == 320
    assert summary["samples"][0].startswith("def ")  # decoded with the BPE
    step2 = tmp_path / "full" / "checkpoints" / "step_00000002"
    shutil.copytree(step2, tmp_path / "resumed" / "checkpoints" / step2.name)
    with pytest.raises(ValueError, match="tokenizer.json is missing"):
        train(_run_cfg(tmp_path, "resumed"), resume=True)
    shutil.copy(saved, tmp_path / "resumed" / "tokenizer.json")
    train(_run_cfg(tmp_path, "resumed"), resume=True)
    full, resumed = _losses(tmp_path / "full" / "metrics.jsonl"), _losses(tmp_path / "resumed" / "metrics.jsonl")
    assert sorted(resumed) == [3, 4] and all(resumed[s] == full[s] for s in (3, 4))


def test_token_data_val_start():
    tokens = np.arange(100, dtype=np.uint16)
    data = TokenData(tokens, 4, 2, val_start=80)
    assert data.split == 80 and data.num_train_windows == 16 and data.num_val_windows == 4
    x, y = data.val_batches(1)[0]
    assert int(x[0, 0]) == 80 and y[0].tolist() == [81, 82, 83, 84]
    with pytest.raises(ValueError, match=r"val_start=101 must be in \[0, 100\]"):
        TokenData(tokens, 4, 2, val_start=101)
