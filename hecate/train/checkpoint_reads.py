"""Which shard files of a checkpoint one rank reads: only those holding something it needs.

A rank needs the dense parameters (and their optimizer state: the checkpoint's dense file,
read by every rank; in a format-version-1 checkpoint, rank 0's shard) and the expert elements
it will own under its NEW layout. What each shard holds is recorded in the manifest at save time
(`files.<name>.holds`); for a checkpoint written before that, it is taken from each file's
safetensors header and, for a rows layout, its expert-id tensor (a few kilobytes read without
the rest of the file; a file whose header cannot be parsed is read in full). Either way these
facts only CHOOSE files: every file whose tensors a rank uses is read whole and checked
against the manifest's size and sha256 before a byte of it is parsed, and the rank checks
that the verified files cover everything it needs. A wrong record or a damaged header can
therefore make a rank read a file it did not need, or fail with "... in no shard file", never
load wrong values. verify_checkpoint still reads and hashes every file.

Elements are positions in a layer's flat [E * S] expert buffer (E chunk rows of S):
whole rows for row strategies, a range that may start and end mid-row for fsdp.
"""
from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist

from hecate.train.checkpoint_io import CheckpointError, open_sized

Intervals = list[tuple[int, int]]  # sorted, disjoint [lo, hi) element ranges
_MAX_HEADER = 100 << 20  # safetensors' own bound on a header (100 MB)


@dataclass(frozen=True)
class ShardHolds:
    """What one shard file holds, as the manifest records it or its header says (unverified)."""
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


# ---- what each shard holds, recorded in the manifest at save time ----------------------------------
# Each rank encodes its pieces as int64 words, all-gathered with its digest (one collective):
# per MoE layer [kind (0 none, 1 rows, 2 flat), start, numel, expert-id bitmask words], then
# a dense flag. Rank 0 writes them as manifest["files"][name]["holds"], so a load needs no header.
_NONE, _ROWS, _FLAT = 0, 1, 2


def _mask_words(E: int) -> int:
    return -(-E // 64)


def encode_holdings(layer_infos: dict, tensors: dict, num_experts: list[int], dense: bool) -> torch.Tensor:
    """This rank's shard contents as int64 [sum over layers of (3 + words)] + [1]."""
    out = []
    for i, E in enumerate(num_experts):
        info = layer_infos.get(str(i))
        words = torch.zeros(_mask_words(E) * 64, dtype=torch.bool)
        if info is None:
            head = [_NONE, 0, 0]
        elif info["kind"] == "flat":
            head = [_FLAT, int(info["start"]), int(info["numel"])]
        else:
            head = [_ROWS, 0, 0]
            words[tensors[f"experts.{i}.ids"].cpu().to(torch.int64)] = True
        packed = torch.from_numpy(np.packbits(words.numpy(), bitorder="little").view(np.int64).copy())
        out += [torch.tensor(head, dtype=torch.int64), packed]
    out.append(torch.tensor([int(dense)], dtype=torch.int64))
    return torch.cat(out)


def decode_holdings(t: torch.Tensor, num_experts: list[int]) -> dict:
    """The manifest's JSON form of one shard's encode_holdings words:
    {"dense": bool, "experts": {"i": {"kind": "rows", "ids": [...]} | {"kind": "flat", "start", "numel"}}}."""
    t = t.cpu()
    experts, at = {}, 0
    for i, E in enumerate(num_experts):
        kind, start, numel = (int(v) for v in t[at:at + 3])
        n = _mask_words(E)
        bits = np.unpackbits(t[at + 3:at + 3 + n].numpy().view(np.uint8), bitorder="little")[:E]
        at += 3 + n
        if kind == _ROWS:
            experts[str(i)] = {"kind": "rows", "ids": np.flatnonzero(bits).tolist()}
        elif kind == _FLAT:
            experts[str(i)] = {"kind": "flat", "start": start, "numel": numel}
    return {"dense": bool(t[at]), "experts": experts}


def holds_from_manifest(manifest: dict, manifest_path: str, separate_dense: bool = False) -> list[ShardHolds] | None:
    """Every listed shard's contents as the manifest records them (sorted by name), or None when
    a shard's entry has no `holds` (a checkpoint written before they were recorded: peek_shard).
    separate_dense: the dense entries are in their own file (format version 2), so no shard
    holds them; otherwise (version 1) one shard, rank 0's, must. Values are checked; a bad one
    is a CheckpointError naming the manifest key."""
    files, layers = manifest["files"], manifest["layers"]
    if not all(isinstance(meta, dict) and "holds" in meta for meta in files.values()):
        return None
    out = []
    for fname in sorted(files):
        def bad(what: str, fname=fname) -> CheckpointError:
            return CheckpointError(f"{manifest_path}: key 'files.{fname}.holds' {what}; the manifest is "
                                   "damaged (load an earlier step)")

        holds = files[fname]["holds"]
        if not isinstance(holds, dict) or not isinstance(holds.get("dense"), bool) \
                or not isinstance(holds.get("experts"), dict):
            raise bad("is not a mapping with dense (bool) and experts (mapping)")
        pieces = {}
        for k, info in holds["experts"].items():
            if not (isinstance(k, str) and k.isdigit() and int(k) < len(layers)) or not isinstance(info, dict):
                raise bad(f"names MoE layer {k[:20]!r}, not one of 0..{len(layers) - 1}")
            i, E = int(k), layers[int(k)]["num_experts"]
            if info.get("kind") == "rows":
                ids = info.get("ids")
                if not isinstance(ids, list) or not all(type(e) is int and 0 <= e < E for e in ids):
                    raise bad(f"has layer {i} ids that are not a list of expert ids in [0, {E})")
                pieces[i] = ("rows", torch.tensor(ids, dtype=torch.int64))
            elif info.get("kind") == "flat":
                start, numel = info.get("start"), info.get("numel")
                if not all(type(v) is int and v >= 0 for v in (start, numel)):
                    raise bad(f"has layer {i} flat start / numel that are not non-negative ints")
                pieces[i] = ("flat", start, numel)
            else:
                raise bad(f"has layer {i} kind {str(info.get('kind'))[:20]!r}, not 'rows' or 'flat'")
        out.append(ShardHolds(fname, True, holds["dense"], pieces))
    if not separate_dense and not any(h.dense for h in out):  # version 1: rank 0's shard has them
        raise CheckpointError(f"{manifest_path}: no shard's 'holds' has the dense entries; the manifest is "
                              "damaged (load an earlier step)")
    return out


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
