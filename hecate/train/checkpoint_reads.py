"""Which shard files of a checkpoint one rank reads: only those holding something it needs.

A rank needs the dense parameters (and their optimizer state) and the expert elements it
will own under its NEW layout. What each file holds is taken from its safetensors header
and, for a rows layout, its expert-id tensor: a few kilobytes read without the rest of the
file. Those bytes are UNVERIFIED and only choose files: every file whose tensors a rank
uses is then read whole and checked against the manifest's size and sha256 before a byte of
it is parsed, and the rank checks that the verified files cover everything it needs. A
damaged header can therefore make a rank read more, or fail with "... in no shard file",
never load wrong values. A file whose header cannot be read is read (and verified) in full.
verify_checkpoint still reads and hashes every file.

Elements are positions in a layer's flat [E * S] expert buffer (E chunk rows of S):
whole rows for row strategies, a range that may start and end mid-row for fsdp.
"""
from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from hecate.train.checkpoint_io import CheckpointError, open_sized

Intervals = list[tuple[int, int]]  # sorted, disjoint [lo, hi) element ranges
_MAX_HEADER = 100 << 20  # safetensors' own bound on a header (100 MB)


@dataclass(frozen=True)
class ShardHolds:
    """What one shard file says it holds (from its unverified header)."""
    fname: str
    known: bool = True   # False: the header could not be read; read the whole file to know
    dense: bool = False  # dense.* / optim.* entries (rank 0's shard)
    pieces: dict = field(default_factory=dict)  # layer -> ("rows", ids int64) | ("flat", start, numel)
    peek_bytes: int = 0  # bytes read to learn this


def peek_shard(path: str, fname: str, size: int) -> ShardHolds:
    """Read `path`'s safetensors header and expert-id tensors only. A missing file or one of
    the wrong size raises CheckpointError (as a full read would); an unparseable header gives
    known=False (the caller then reads and verifies the file, which names the damage)."""
    with open_sized(path, size) as f:
        raw = f.read(8)
        read = len(raw)

        def unknown() -> ShardHolds:
            return ShardHolds(fname, known=False, peek_bytes=read)
        if len(raw) < 8:
            return unknown()
        (n,) = struct.unpack("<Q", raw)
        if n > min(size - 8, _MAX_HEADER):
            return unknown()
        text = f.read(n)
        read += len(text)
        try:
            header = json.loads(text)
            layers = json.loads((header.get("__metadata__") or {}).get("hecate.layers", "{}"))
            dense = any(k.startswith(("dense.", "optim.")) for k in header)
            pieces = {}
            for key, info in layers.items():
                i = int(key)
                if info["kind"] == "flat":
                    start, numel = int(info["start"]), int(info["numel"])
                    if start < 0 or numel < 0:
                        return unknown()
                    pieces[i] = ("flat", start, numel)
                elif info["kind"] == "rows":
                    entry = header[f"experts.{i}.ids"]
                    a, b = (int(x) for x in entry["data_offsets"])
                    count = int(entry["shape"][0]) if entry["shape"] else 1
                    if entry["dtype"] != "I64" or b - a != 8 * count or a < 0 or 8 + n + b > size:
                        return unknown()
                    f.seek(8 + n + a)
                    blob = f.read(b - a)
                    read += len(blob)
                    ids = torch.frombuffer(bytearray(blob), dtype=torch.int64) if blob else \
                        torch.zeros(0, dtype=torch.int64)
                    pieces[i] = ("rows", ids.clone())
                else:
                    return unknown()
        except (ValueError, KeyError, TypeError, AttributeError, IndexError, RuntimeError, OverflowError):
            return unknown()
    return ShardHolds(fname, True, dense, pieces, read)


def rows_to_intervals(ids: torch.Tensor, S: int) -> Intervals:
    """The element ranges of whole chunk rows `ids`, consecutive rows merged."""
    out: Intervals = []
    for e in sorted(set(ids.tolist())):
        if out and out[-1][1] == e * S:
            out[-1] = (out[-1][0], (e + 1) * S)
        else:
            out.append((e * S, (e + 1) * S))
    return out


def overlaps(need: Intervals, lo: int, hi: int) -> bool:
    return any(a < hi and lo < b for a, b in need)


def rows_touched(need: Intervals, E: int, S: int) -> torch.Tensor:
    """[E] bool: chunk rows that hold at least one needed element."""
    mask = torch.zeros(E, dtype=torch.bool)
    for lo, hi in need:
        if lo < hi:
            mask[lo // S:min(E, (hi - 1) // S + 1)] = True
    return mask


def needed_elements(strategy, layer, rank: int, world: int, E: int, S: int) -> Intervals:
    """The expert elements this rank keeps under `strategy` after loading: exactly what
    hecate.train.checkpoint_layout.local_params_and_state and each strategy's load_experts
    slice out of the full rows (call after the owners are final, e.g. after a fssdp restore)."""
    name = strategy.name
    if name == "fssdp_hybrid":  # owners are shard indices within the group
        return rows_to_intervals((layer.fssdp_state.owner_E == strategy.inner.topology.rank).nonzero().flatten(), S)
    if name == "fssdp":
        return rows_to_intervals((layer.fssdp_state.owner_E == rank).nonzero().flatten(), S)
    if name == "fsdp":
        n = layer.expert_shard.numel()
        lo, hi = rank * n, min((rank + 1) * n, E * S)
        return [(lo, hi)] if lo < hi else []
    if name == "ep":
        first, local = layer.expert_slice
        return [(first * S, (first + local) * S)] if local else []
    return [(0, E * S)]  # dp, local and any strategy that keeps every expert


def piece_needed(piece: tuple, need: Intervals, E: int, S: int) -> bool:
    """Whether a file's piece of one layer holds a needed element. Ids outside [0, E) (a
    damaged id tensor) count as needed: reading the file then names the damage."""
    if piece[0] == "flat":
        return overlaps(need, piece[1], piece[1] + piece[2])
    ids = piece[1]
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= E):
        return True
    return bool(rows_touched(need, E, S)[ids].any())


def files_to_read(holds: list[ShardHolds], need: dict[int, Intervals], sizes: dict[int, tuple[int, int]],
                  dense: bool = True) -> list[str]:
    """Names of the files this rank must read, in manifest order: those with dense entries
    (when `dense`), those holding a needed element of some layer (need: layer -> intervals;
    sizes: layer -> (E, S)), and those whose header could not be read."""
    out = []
    for h in holds:
        if not h.known or (dense and h.dense) or any(
                i in need and piece_needed(p, need[i], *sizes[i]) for i, p in h.pieces.items()):
            out.append(h.fname)
    return out


def agree_on_failure(error: BaseException | None, bad_file: str | None, names: list[str], world: int,
                     step_dir: str) -> None:
    """Collective (when world > 1): ranks read different files, so one rank may fail where the
    others succeed. Every rank learns whether any failed; the failing rank raises its own error,
    the others a CheckpointError naming that rank and file, so nobody walks on into a collective
    its failed peer will never join."""
    if world > 1 and dist.is_initialized():
        from hecate.comm.all_to_all import comm_device

        index = names.index(bad_file) if bad_file in names else -1
        mine = torch.tensor([int(error is not None), index], dtype=torch.int64)
        dev = comm_device(None)
        out = torch.empty(world * 2, dtype=torch.int64, device=dev)
        dist.all_gather_into_tensor(out, mine.to(dev))
        status = out.cpu().view(world, 2)
        if error is None and bool(status[:, 0].any()):
            r = int(status[:, 0].nonzero()[0])
            f = int(status[r, 1])
            what = f": {names[f]} is missing, truncated or corrupted" if f >= 0 else ""
            raise CheckpointError(f"rank {r} could not load its part of checkpoint {step_dir}{what} "
                                  f"(rank {r}'s own error names the cause); load an earlier step")
    if error is not None:
        raise error
