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
import sys

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


# safetensors dtype names -> torch (those torch can hold; others are refused, named)
_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
           "U8": torch.uint8, "BOOL": torch.bool}
_MAX_HEADER = 100 << 20  # safetensors' own bound on a header (100 MB)
_BLOCK = 1 << 22


def _tensor_entries(header: dict, data_bytes: int) -> list[tuple[int, int, str, torch.dtype, list[int]]]:
    """(begin, end, name, dtype, shape) of every tensor of a parsed safetensors header, sorted by
    offset, checked to fit the file's data section without overlapping (ValueError otherwise)."""
    def ints(value, count=None) -> bool:  # a JSON list of non-negative ints below 2**63 (not bools / floats)
        return type(value) is list and (count is None or len(value) == count) and \
            all(type(x) is int and 0 <= x < 1 << 63 for x in value)

    out = []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(entry, dict) or not ints(entry.get("shape")) or not ints(entry.get("data_offsets"), 2):
            raise ValueError(f"tensor {name[:80]!r}: shape and data_offsets must be lists of non-negative ints")
        dtype = _DTYPES[entry["dtype"]]
        shape, (a, b) = entry["shape"], entry["data_offsets"]
        numel, extent = 1, 1  # extent: torch's storage arithmetic, which counts a 0 dim as 1
        for d in shape:
            numel, extent = numel * d, extent * max(d, 1)
        size = torch.empty((), dtype=dtype).element_size()
        if extent * size >= 1 << 63 or not a <= b <= data_bytes or b - a != numel * size:
            raise ValueError(f"tensor {name[:80]!r}: offsets {a}..{b} do not fit shape {shape} of {entry['dtype']}")
        out.append((a, b, name, dtype, shape))
    out.sort(key=lambda e: e[:2])
    for prev, nxt in zip(out, out[1:]):
        if nxt[0] < prev[1]:
            raise ValueError(f"tensors {prev[2][:80]!r} and {nxt[2][:80]!r} overlap")
    return out


def read_verified_tensors(path: str, sha256: str | None, size: int | None,
                          materialize: bool = True) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """(`__metadata__`, {name: tensor}) of a safetensors file, its size and sha256 checked against
    the manifest before anything is returned (errors name the file). The file is read once, in
    file order: each tensor's bytes go straight into its own allocation (hashed as they arrive),
    so memory is the file's size once (safetensors.torch.load of the bytes would be twice), and
    a caller can free the tensors one by one. The header (unverified while reading) only sizes
    those allocations, which must fit in the file. materialize=False: check only, no tensors
    (constant memory). Nothing is unpickled."""
    if materialize and sys.byteorder != "little":  # tensors are filled with the file's bytes as they are
        raise CheckpointError(f"cannot read {path}: safetensors data is little-endian and this host is "
                              f"{sys.byteorder}-endian (no byte swapping is implemented)")
    h = hashlib.sha256()
    scratch = memoryview(bytearray(0))

    def skim(f, n: int) -> None:  # hash n bytes without keeping them (a block at a time)
        nonlocal scratch
        if len(scratch) < min(n, _BLOCK):
            scratch = memoryview(bytearray(min(n, _BLOCK)))
        while n > 0:
            got = f.readinto(scratch[:min(n, _BLOCK)])
            if not got:
                raise EOFError
            h.update(scratch[:got])
            n -= got

    def fill(f, view: memoryview) -> None:
        at = 0
        while at < len(view):
            got = f.readinto(view[at:at + _BLOCK])
            if not got:
                raise EOFError
            h.update(view[at:at + got])
            at += got

    with open_sized(path, size) as f:
        total = os.fstat(f.fileno()).st_size
        tensors, problem, metadata = {}, None, {}
        try:
            head = f.read(8)
            h.update(head)
            (n,) = struct.unpack("<Q", head) if len(head) == 8 else (None,)
            if n is None or n > min(total - 8, _MAX_HEADER):
                raise ValueError(f"header length {n} does not fit a file of {total} bytes")
            text = f.read(n)
            h.update(text)
            header = json.loads(text)
            if not isinstance(header, dict):
                raise ValueError("the header is not a JSON object")
            metadata = header.get("__metadata__") or {}
            if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
                raise ValueError("__metadata__ is not a mapping of strings")
            at = 0
            for a, b, name, dtype, shape in _tensor_entries(header, total - 8 - n):
                skim(f, a - at)
                t = torch.empty(shape, dtype=dtype)
                if materialize:
                    if b > a:
                        fill(f, memoryview(t.reshape(-1).view(torch.uint8).numpy()))
                    tensors[name] = t
                else:
                    skim(f, b - a)
                at = b
            skim(f, total - 8 - n - at)
        except EOFError:
            raise CheckpointError(f"checkpoint file {path} ended early while being read (truncated meanwhile); "
                                  "load an earlier step") from None
        except (ValueError, KeyError, TypeError, OverflowError, struct.error, RecursionError) as e:
            problem, tensors = e, {}
            skim(f, total - f.tell())  # the checksum still decides first what is wrong
        if f.read(1):
            raise CheckpointError(f"checkpoint file {path} grew while being read; load again once the writer is done")
    check_sha256(path, h.hexdigest(), sha256)
    if problem is not None:
        raise CheckpointError(f"{path} is not a valid safetensors file: {problem!r}")
    return metadata, tensors


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
