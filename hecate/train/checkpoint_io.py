"""Crash-safe file primitives for checkpoints: atomic writes, checksums, verified reads.

A file is written to a temporary name in its final directory, flushed and
fsynced, renamed over the final name (os.replace is atomic on POSIX), and the
directory is fsynced so the rename itself survives a power loss. A reader
therefore sees either the old file or the complete new one, never a torn one.
"""
from __future__ import annotations

import hashlib
import json
import os
import struct

import torch

TMP_PREFIX = ".tmp."


class CheckpointError(RuntimeError):
    """A checkpoint on disk is missing, incomplete or corrupted (the message names the file)."""


def fsync_dir(path: str) -> None:
    """Make renames and creations inside `path` durable (no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - e.g. Windows
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover - some filesystems refuse fsync on directories
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: str, data: bytes) -> None:
    """Write `data` to `path` atomically: temp file in the same directory, fsync, rename, fsync dir."""
    directory = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(directory, f"{TMP_PREFIX}{os.path.basename(path)}.{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(directory)


def atomic_write_json(path: str, obj) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode())


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def digest_to_tensor(hexdigest: str, size: int) -> torch.Tensor:
    """[5] int64: the 32-byte sha256 as four words, then the byte size (for a tensor all-gather)."""
    words = torch.frombuffer(bytearray(bytes.fromhex(hexdigest)), dtype=torch.int64)
    return torch.cat([words, torch.tensor([size], dtype=torch.int64)])


def tensor_to_digest(t: torch.Tensor) -> tuple[str, int]:
    t = t.cpu()
    return t[:4].contiguous().numpy().tobytes().hex(), int(t[4])


def open_sized(path: str, size: int | None):
    """Open a manifest-listed file for binary reading after checking it exists and has `size`
    bytes (None: any size); errors name the file."""
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint file {path} is missing (listed in the manifest); "
                              "the checkpoint is incomplete, load an earlier step")
    f = open(path, "rb")
    actual = os.fstat(f.fileno()).st_size
    if size is not None and actual != size:
        f.close()
        raise CheckpointError(f"checkpoint file {path} has {actual} bytes, the manifest says {size} "
                              "(truncated or overwritten); load an earlier step")
    return f


def check_sha256(path: str, hexdigest: str, sha256: str | None) -> None:
    if sha256 is not None and hexdigest != sha256:
        raise CheckpointError(f"checkpoint file {path} fails its sha256 checksum (corrupted on disk); "
                              "load an earlier step")


def read_verified(path: str, sha256: str | None, size: int | None) -> bytes:
    """Read a whole file and check its size and sha256 against the manifest; errors name the file."""
    with open_sized(path, size) as f:
        data = f.read()
    check_sha256(path, sha256_hex(data), sha256)
    return data


def safetensors_header(data, path: str = "<bytes>") -> tuple[dict, int]:
    """The JSON header of a safetensors blob (u64 little-endian length, then JSON;
    `__metadata__` included) and the offset where its tensor data starts."""
    try:
        (n,) = struct.unpack("<Q", data[:8])
        header = json.loads(bytes(data[8:8 + n]))
    except Exception as e:  # noqa: BLE001 - any parse failure means a bad file
        raise CheckpointError(f"{path} is not a valid safetensors file: {e}") from e
    return header, 8 + n


def safetensors_metadata(data: bytes, path: str = "<bytes>") -> dict[str, str]:
    """The `__metadata__` of a safetensors blob."""
    return safetensors_header(data, path)[0].get("__metadata__", {}) or {}
