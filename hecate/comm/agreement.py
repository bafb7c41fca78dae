"""check_agreement: prove every rank holds the same plan before a collective uses it.

A collective whose split sizes come from a plan that differs across ranks
hangs or silently corrupts data. Hashing the plan and all-gathering one
64-bit digest per rank turns that into an immediate error, raised on every
rank, naming the plan and the ranks that disagree.
"""
from __future__ import annotations

import hashlib
from collections import Counter
import torch
import torch.distributed as dist

from hecate.comm.all_to_all import all_gather_flat, comm_device


class AgreementError(RuntimeError):
    """Ranks disagree on a value that must be identical everywhere (e.g. a placement)."""

    def __init__(self, message: str, name: str, minority_ranks: list[int], majority_ranks: list[int]):
        super().__init__(message)
        self.name = name
        self.minority_ranks = minority_ranks
        self.majority_ranks = majority_ranks

    def __reduce__(self):  # picklable, so it can cross process boundaries intact
        return type(self), (self.args[0], self.name, self.minority_ranks, self.majority_ranks)


def _feed(h, value) -> None:
    if isinstance(value, torch.Tensor):
        t = value.detach()
        h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
        t = t.to("cpu").contiguous()
        if t.numel():
            if t.dtype == torch.bool:
                t = t.to(torch.uint8)
            h.update(t.view(-1).view(torch.uint8).numpy().tobytes())
    elif isinstance(value, (bytes, bytearray, memoryview)):
        h.update(b"B" + bytes(value))
    elif isinstance(value, (list, tuple)):
        h.update(f"L{len(value)}".encode())
        for item in value:
            _feed(h, item)
    elif isinstance(value, (int, float, str, bool, torch.dtype)) or value is None:
        h.update(f"V{type(value).__name__}:{value!r}".encode())
    else:
        raise TypeError(f"check_agreement cannot hash a {type(value).__name__}; pass tensors, bytes, "
                        "numbers, strings or lists of them")


def digest(value) -> int:
    """A 63-bit hash of tensors (dtype, shape and contents), bytes, numbers and nested lists."""
    h = hashlib.blake2b(digest_size=8)
    _feed(h, value)
    return int.from_bytes(h.digest(), "little") >> 1  # fits in int64


def check_agreement(name: str, value, group=None) -> None:
    """Raise AgreementError on every rank of `group` unless all ranks pass an equal `value`.

    `value`: a tensor, bytes, or a (nested) list of tensors / bytes / numbers. The
    message names `name` (e.g. the layer), the majority ranks and the minority ranks.
    Collective: every rank of `group` must call it at the same point.
    """
    world_size = dist.get_world_size(group)
    mine = torch.tensor([digest(value)], dtype=torch.int64, device=comm_device(group))
    if world_size == 1:
        return
    gathered = torch.empty(world_size, dtype=torch.int64, device=mine.device)
    all_gather_flat(gathered, mine, group=group)
    hashes = gathered.tolist()
    if len(set(hashes)) == 1:
        return
    counts = Counter(hashes)
    # Majority: the most common digest; ties go to the digest of the lowest rank.
    top = max(counts.values())
    majority_hash = next(h for h in hashes if counts[h] == top)
    group_ranks = _global_ranks(group, world_size)
    majority = [group_ranks[i] for i, h in enumerate(hashes) if h == majority_hash]
    minority = [group_ranks[i] for i, h in enumerate(hashes) if h != majority_hash]
    raise AgreementError(
        f"ranks disagree on {name!r}: ranks {minority} differ from ranks {majority} "
        f"({len(counts)} distinct values); every rank must compute {name!r} from the same inputs",
        name, minority, majority,
    )


def _global_ranks(group, world_size: int) -> list[int]:
    if group is None or group is dist.group.WORLD:
        return list(range(world_size))
    return [dist.get_global_rank(group, i) for i in range(world_size)]

