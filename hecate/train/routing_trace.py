"""Routing traces: every rank's token count per expert, per MoE layer, per step (JSON lines).

`hecate train --set logging.trace=FILE` records one; `hecate simulate --trace FILE` replays
it through the runtime's planners. Line 1 is a header, then one line per step:

    {"format": "hecate-routing-trace", "version": 1, "world_size": W, "ranks_per_node": R,
     "num_experts": [E_0, E_1, ...], "d_model": D, "top_k": K}
    {"step": 0, "counts": [[[c(rank 0, e) for e], ...W rows], ...one [W, E] matrix per MoE layer]}

Lines are appended and flushed as steps finish, so a run that stops early leaves a valid
prefix. A step costs one all-gather of L x E int64 per rank (counted as "trace.counts").
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

FORMAT, VERSION = "hecate-routing-trace", 1


class RoutingTraceWriter:
    """Collective: every rank calls `record` each step; rank 0 writes the file."""

    def __init__(self, path, topology, num_experts_L: list[int], **meta):
        self.topology, self.sizes = topology, [int(e) for e in num_experts_L]
        self.file = None
        if topology.rank == 0:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            self.file = open(path, "w")
            header = {"format": FORMAT, "version": VERSION, "world_size": topology.world_size,
                      "ranks_per_node": topology.ranks_per_node, "num_experts": self.sizes, **meta}
            self.file.write(json.dumps(header) + "\n")
            self.file.flush()

    def record(self, step: int, counts_L) -> None:
        """`counts_L`: this rank's counts per expert of every MoE layer (a list of [E_l] tensors,
        or one flat vector of them all, in layer order)."""
        if isinstance(counts_L, torch.Tensor):
            flat = counts_L.detach().cpu().to(torch.int64).reshape(-1)
        else:
            flat = torch.cat([torch.as_tensor(c).detach().cpu().to(torch.int64).reshape(-1) for c in counts_L])
        if flat.numel() != sum(self.sizes):
            raise ValueError(f"routing trace: got {flat.numel()} counts, expected {sum(self.sizes)} "
                             f"(experts per MoE layer {self.sizes})")
        W = self.topology.world_size
        if W > 1:
            from hecate.comm.all_to_all import all_gather_flat, comm_device

            dev = comm_device(None)
            out = torch.empty(W * flat.numel(), dtype=torch.int64, device=dev)
            all_gather_flat(out, flat.to(dev))
            crossing = (W - 1) * flat.numel() * 8
            if self.topology.stats is not None:
                self.topology.stats.record("trace.counts", crossing, crossing)
            gathered = out.cpu().view(W, -1)
        else:
            gathered = flat.view(1, -1)
        if self.file is None:
            return
        layers, start = [], 0
        for E in self.sizes:
            layers.append(gathered[:, start:start + E].tolist())
            start += E
        self.file.write(json.dumps({"step": int(step), "counts": layers}) + "\n")
        self.file.flush()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None


class RoutingTrace:
    """A trace read back: `header` (dict) and `steps`: per step, a list of int64 [W, E] arrays."""

    def __init__(self, header: dict, steps: list[list[np.ndarray]]):
        self.header, self.steps = header, steps

    @property
    def world_size(self) -> int:
        return int(self.header["world_size"])

    @property
    def ranks_per_node(self) -> int:
        return int(self.header["ranks_per_node"])

    @property
    def num_experts(self) -> list[int]:
        return list(self.header["num_experts"])


def read_routing_trace(path) -> RoutingTrace:
    """Parse and check a trace file; a ValueError names the line and what is wrong."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"routing trace {path} does not exist (record one with "
                         "`hecate train CONFIG --set logging.trace=FILE`)")
    lines = path.read_text().splitlines()
    if not lines:
        raise ValueError(f"routing trace {path} is empty")
    try:
        header = json.loads(lines[0])
    except json.JSONDecodeError as e:
        raise ValueError(f"routing trace {path}: line 1 is not JSON ({e})") from None
    if header.get("format") != FORMAT or header.get("version") != VERSION:
        raise ValueError(f"routing trace {path}: line 1 must be a {FORMAT} v{VERSION} header, got "
                         f"{ {k: header.get(k) for k in ('format', 'version')} }")
    W, sizes = int(header["world_size"]), [int(e) for e in header["num_experts"]]
    steps = []
    for i, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"routing trace {path}: line {i} is not JSON ({e})") from None
        mats = [np.asarray(m, dtype=np.int64) for m in rec.get("counts", [])]
        if [m.shape for m in mats] != [(W, E) for E in sizes] or any((m < 0).any() for m in mats):
            raise ValueError(f"routing trace {path}: line {i} must hold one non-negative [W={W}, E] count "
                             f"matrix per MoE layer (E = {sizes}), got shapes {[m.shape for m in mats]}")
        steps.append(mats)
    if not steps:
        raise ValueError(f"routing trace {path} has a header but no step")
    return RoutingTrace(header, steps)


def write_routing_trace(path, steps: list[list[np.ndarray]], ranks_per_node: int, **meta) -> None:
    """Write a trace from count matrices (synthetic traces, tests)."""
    W = int(np.asarray(steps[0][0]).shape[0])
    sizes = [int(np.asarray(m).shape[1]) for m in steps[0]]
    with open(path, "w") as f:
        f.write(json.dumps({"format": FORMAT, "version": VERSION, "world_size": W,
                            "ranks_per_node": ranks_per_node, "num_experts": sizes, **meta}) + "\n")
        for s, mats in enumerate(steps):
            f.write(json.dumps({"step": s, "counts": [np.asarray(m).tolist() for m in mats]}) + "\n")
