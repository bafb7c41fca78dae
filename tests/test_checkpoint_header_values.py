"""read_verified_tensors on well-hashed files whose safetensors header lies in ways JSON allows:
every one is a CheckpointError naming the file (never a raw OverflowError / RuntimeError, never
a shape silently coerced from a float, string or bool), and values are read little-endian."""
import hashlib
import json
import struct
import sys

import pytest
import safetensors.torch
import torch

from hecate.train.checkpoint_io import CheckpointError, read_verified_tensors

DATA = safetensors.torch.save({"a": torch.randn(3, 5), "z": torch.zeros(0, 4)})
(N,) = struct.unpack("<Q", DATA[:8])
HEADER = json.loads(DATA[8:8 + N])

LIES = {
    "infinite offset": lambda h: h["a"].update(data_offsets=[0, float("inf")]),
    "infinite dim": lambda h: h["a"].update(shape=[float("inf"), 5]),
    "dim past int64 next to a zero": lambda h: h["z"].update(shape=[2 ** 64, 0]),
    "dims whose strides overflow next to a zero": lambda h: h["z"].update(shape=[2 ** 62, 2 ** 62, 0]),
    "fractional dim": lambda h: h["a"].update(shape=[3.7, 5]),
    "dim as a string": lambda h: h["a"].update(shape=["3", 5]),
    "dim as a bool": lambda h: h["a"].update(shape=[True, 15]),
    "shape as a string": lambda h: h["a"].update(shape="35"),
    "offsets as a string": lambda h: h["a"].update(data_offsets="06"),
    "fractional offset": lambda h: h["a"].update(data_offsets=[0.0, 60.0]),
    "entry not a mapping": lambda h: h.update(a=[1, 2]),
}


@pytest.mark.parametrize("lie", sorted(LIES))
def test_a_lying_header_is_named(tmp_path, lie):
    bad = json.loads(json.dumps(HEADER))
    LIES[lie](bad)
    text = json.dumps(bad).encode()
    blob = struct.pack("<Q", len(text)) + text + DATA[8 + N:]
    path = tmp_path / "bad.safetensors"
    path.write_bytes(blob)
    with pytest.raises(CheckpointError, match="bad.safetensors is not a valid safetensors file"):
        read_verified_tensors(str(path), hashlib.sha256(blob).hexdigest(), len(blob))


def test_the_checksum_still_decides_first(tmp_path):
    # A lie that used to escape as OverflowError before the whole file was hashed: a wrong
    # checksum must be reported as such.
    bad = json.loads(json.dumps(HEADER))
    LIES["infinite offset"](bad)
    text = json.dumps(bad).encode()
    blob = struct.pack("<Q", len(text)) + text + DATA[8 + N:]
    path = tmp_path / "bad.safetensors"
    path.write_bytes(blob)
    with pytest.raises(CheckpointError, match="fails its sha256"):
        read_verified_tensors(str(path), "0" * 64, len(blob))


def test_a_big_endian_host_is_refused_not_misread(tmp_path, monkeypatch):
    path = tmp_path / "f.safetensors"
    path.write_bytes(DATA)
    monkeypatch.setattr(sys, "byteorder", "big")
    with pytest.raises(CheckpointError, match="little-endian"):
        read_verified_tensors(str(path), hashlib.sha256(DATA).hexdigest(), len(DATA))
