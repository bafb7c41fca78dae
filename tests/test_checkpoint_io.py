"""checkpoint_io.read_verified_tensors: a safetensors file read once, each tensor straight into its
own allocation, its size and sha256 checked before anything is returned; never unpickled."""
import hashlib
import json
import struct

import pytest
import safetensors.torch
import torch

from hecate.train.checkpoint_io import CheckpointError, read_verified_tensors

TENSORS = {"a": torch.randn(3, 5), "ids": torch.arange(7), "step": torch.tensor(2.0), "empty": torch.zeros(0, 4),
           "h": torch.randn(3).half(), "bf": torch.randn(2).bfloat16(), "mask": torch.tensor([True, False])}


def _write(path, data):
    path.write_bytes(data)
    return str(path), hashlib.sha256(data).hexdigest(), len(data)


def test_round_trip_in_own_allocations(tmp_path):
    path, sha, size = _write(tmp_path / "f.safetensors", safetensors.torch.save(TENSORS, metadata={"k": "v"}))
    metadata, got = read_verified_tensors(path, sha, size)
    assert metadata == {"k": "v"} and set(got) == set(TENSORS)
    for k, v in TENSORS.items():
        assert got[k].dtype == v.dtype and got[k].shape == v.shape and torch.equal(got[k], v), k
    storages = {got[k].untyped_storage().data_ptr() for k in got if got[k].numel()}
    assert len(storages) == sum(1 for v in got.values() if v.numel())  # one allocation each: freeable one by one
    assert read_verified_tensors(path, sha, size, materialize=False) == ({"k": "v"}, {})


def test_checksum_first_then_format(tmp_path):
    data = safetensors.torch.save(TENSORS)
    path, sha, size = _write(tmp_path / "f.safetensors", data)
    flipped = bytearray(data)
    flipped[-3] ^= 1
    _write(tmp_path / "f.safetensors", bytes(flipped))
    with pytest.raises(CheckpointError, match="f.safetensors fails its sha256"):
        read_verified_tensors(path, sha, size)
    with pytest.raises(CheckpointError, match="has [0-9]+ bytes, the manifest says 3"):
        read_verified_tensors(path, sha, 3)
    # A well-hashed file whose header lies (overlapping tensors, offsets past the end, a length
    # past the file, not JSON) is named as not safetensors, and nothing is allocated for it.
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    for edit in (lambda h: h["a"].update(data_offsets=[0, 60]),
                 lambda h: h["a"].update(data_offsets=[0, 10 ** 12]),
                 lambda h: h["a"].update(dtype="F8_E4M3"),
                 lambda h: h.update(x="y"),
                 lambda h: h.update(__metadata__=["not", "a", "mapping"])):
        bad = json.loads(json.dumps(header))
        edit(bad)
        text = json.dumps(bad).encode()
        path, sha, size = _write(tmp_path / "bad.safetensors", struct.pack("<Q", len(text)) + text + data[8 + n:])
        with pytest.raises(CheckpointError, match="bad.safetensors is not a valid safetensors file"):
            read_verified_tensors(path, sha, size)
    path, sha, size = _write(tmp_path / "bad.safetensors", struct.pack("<Q", 10 ** 9) + data[8:])
    with pytest.raises(CheckpointError, match="bad.safetensors is not a valid safetensors file"):
        read_verified_tensors(path, sha, size)
