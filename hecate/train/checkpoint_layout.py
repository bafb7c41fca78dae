"""Where each strategy keeps expert weights and optimizer state, in checkpoint terms.

On disk every MoE layer's experts are pieces of the same full matrix rows_ES
(one flat chunk row per expert, hecate.parallel.chunks.ChunkLayout):
  kind "rows": whole chunk rows with their expert ids (fssdp owners, ep slices, dp/local all);
  kind "flat": a contiguous range of the flattened, zero-padded [E*S] buffer (fsdp shards).
Per-element optimizer state (AdamW exp_avg, exp_avg_sq) is stored in the same layout as
the weights, so reassembling it is the same operation, and any strategy can slice the
full state like its parameters: that is what makes optimizer state survive resharding.
A load assembles only what the rank keeps (kept_elements, KeptAssembly), never the full
rows, for every strategy listed here (a strategy this module does not know: every row, which
its load_experts slices); `assemble` (full rows from pieces in memory) serves tools and tests.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from hecate.parallel.chunks import ChunkLayout
from hecate.train.checkpoint_io import CheckpointError
from hecate.train.checkpoint_reads import rows_to_intervals

ROW_STRATEGIES = ("local", "dp", "ep", "fssdp", "fssdp_hybrid")


def full_layout(layer) -> ChunkLayout:
    """The layer's chunk layout with the full expert count (ep keeps only a slice locally)."""
    layout = getattr(layer, "expert_layout", None) or ChunkLayout.of(layer.experts)
    return ChunkLayout(layout.names, layout.shapes, layer.config.num_experts)


def _named_params(layer, layout) -> dict[str, torch.nn.Parameter]:
    return {n: getattr(layer.experts, n) for n in layout.names}


def _per_element_state(optimizer, p) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
    """({key: tensor shaped like p}, step) from the optimizer's state for p (empty before any step)."""
    if optimizer is None or p not in optimizer.state:
        return {}, None
    st = optimizer.state[p]
    elems = {k: v.detach() for k, v in st.items() if torch.is_tensor(v) and v.shape == p.shape and v.dim() > 0}
    step = st.get("step")
    step = torch.as_tensor(step, dtype=torch.float32).detach().clone().reshape(()) if step is not None else None
    return elems, step


def save_part(strategy, layer, optimizer, rank: int):
    """This rank's piece of the layer: (info, tensors) or None when another rank writes it."""
    name, layout = strategy.name, full_layout(layer)
    if name == "fssdp_hybrid":
        # Every shard group holds the same rows (same owners, all-reduced gradients, same steps):
        # shard group 0 writes them once, like fssdp at W = G.
        if strategy.groups.edp_rank != 0:
            return None
        name, rank = "fssdp", strategy.inner.topology.rank
    if name == "fssdp":
        p = layer.expert_chunks
        ids = (layer.fssdp_state.owner_E == rank).nonzero().flatten()
        elems, step = _per_element_state(optimizer, p)
        return _rows(ids, p.detach(), elems, step)
    if name == "fsdp":
        p = layer.expert_shard
        elems, step = _per_element_state(optimizer, p)
        tensors = {"flat": p.detach(), **{f"state.{k}": v for k, v in elems.items()}}
        if step is not None:
            tensors["step"] = step
        return {"kind": "flat", "start": rank * p.numel(), "numel": p.numel()}, tensors
    if name in ("local", "dp", "ep"):
        if name == "ep":
            groups = strategy.groups
            if groups.edp_rank != 0:  # identical replica of an EP group that edp_rank 0 writes
                return None
            first, local = layer.expert_slice
        else:
            if rank != 0:
                return None
            first, local = 0, layout.num_experts
        params = _named_params(layer, layout)
        per_name = {n: _per_element_state(optimizer, p) for n, p in params.items()}
        keys = set.intersection(*(set(e) for e, _ in per_name.values())) if per_name else set()
        elems = {k: layout.flatten({n: per_name[n][0][k] for n in layout.names}) for k in sorted(keys)}
        step = per_name[layout.names[0]][1]
        rows = layout.flatten({n: p.detach() for n, p in params.items()})
        return _rows(torch.arange(first, first + local), rows, elems, step)
    raise ValueError(f"checkpoints do not know strategy {name!r}; supported: {ROW_STRATEGIES + ('fsdp',)}")


def _rows(ids, rows, elems, step):
    tensors = {"ids": ids.to(torch.int64).contiguous(), "rows": rows.contiguous(),
               **{f"state.{k}": v.contiguous() for k, v in elems.items()}}
    if step is not None:
        tensors["step"] = step
    return {"kind": "rows"}, tensors


def check_covered(parts, layout: ChunkLayout, layer_index: int, need=None) -> None:
    """Raise CheckpointError unless the pieces hold every needed element of the layer's flat
    [E*S] buffer: need = sorted [lo, hi) element ranges, None for all of it. Row pieces
    cover whole rows (by id); flat pieces cover [start, start + numel)."""
    E, S = layout.num_experts, layout.chunk_numel
    kinds = {info["kind"] for _, info, _ in parts}
    if len(kinds) > 1:
        raise CheckpointError(f"MoE layer {layer_index}: shards mix layouts {sorted(kinds)}")
    if need is None:
        need = [(0, E * S)]
    if kinds == {"flat"}:
        ordered = sorted(parts, key=lambda p: p[1]["start"])
        if need == [(0, E * S)]:  # everything: the pieces must tile [0, E*S) from 0
            expect = 0
            for fname, info, _ in ordered:
                if info["start"] != expect:
                    raise CheckpointError(f"MoE layer {layer_index}: flat shard in {fname} starts at "
                                          f"{info['start']}, expected {expect} (a shard is missing)")
                expect += info["numel"]
            if expect < E * S:
                raise CheckpointError(f"MoE layer {layer_index}: flat shards cover {expect} of {E * S} elements")
            return
        for lo, hi in need:
            at = lo  # the first needed element not yet covered
            for _, info, _ in ordered:
                if info["start"] <= at < info["start"] + info["numel"]:
                    at = info["start"] + info["numel"]
            if at < hi:
                raise CheckpointError(f"MoE layer {layer_index}: experts {list(range(at // S, (hi - 1) // S + 1))} "
                                      f"are in no shard file (elements {at}..{hi} of the flat buffer)")
        return
    seen = torch.zeros(E, dtype=torch.bool)
    for _, _, t in parts:
        seen[t["ids"]] = True
    wanted = torch.zeros(E, dtype=torch.bool)
    for lo, hi in need:
        if lo < hi:
            wanted[lo // S:(hi - 1) // S + 1] = True
    if bool((wanted & ~seen).any()):
        missing = (wanted & ~seen).nonzero().flatten().tolist()
        raise CheckpointError(f"MoE layer {layer_index}: experts {missing} are in no shard file")


def assemble(parts, layout: ChunkLayout, layer_index: int, need=None):
    """Rebuild full rows [E, S], full per-element state {key: [E, S]} and step from the pieces.

    parts: list of (file name, info, tensors). State is returned only when every piece has it.
    need: the [lo, hi) ranges of the flat [E*S] buffer that must be present (None: all of it);
    elements outside them are left zero (a rank that read only the files it needs).
    """
    check_covered(parts, layout, layer_index, need)
    E, S = layout.num_experts, layout.chunk_numel
    rows = torch.zeros(E, S, dtype=torch.float32)
    state_keys = None
    step = None
    for _, _, t in parts:
        keys = {k[len("state."):] for k in t if k.startswith("state.")}
        state_keys = keys if state_keys is None else state_keys & keys
        if "step" in t:
            step = t["step"]
    # Sorted: ranks iterate this dict in lockstep later (fssdp moves state key by key with
    # collectives), and set order differs between processes.
    state = {k: torch.zeros(E, S, dtype=torch.float32) for k in sorted(state_keys or ())}
    kinds = {info["kind"] for _, info, _ in parts}
    if kinds == {"rows"}:
        for _, _, t in parts:
            ids = t["ids"]
            rows[ids] = t["rows"].float()
            for k in state:
                state[k][ids] = t[f"state.{k}"].float()
    elif kinds == {"flat"}:
        for dst, key in [(rows, "flat")] + [(state[k], f"state.{k}") for k in state]:
            flat = dst.view(-1)
            for _, info, t in parts:  # the zero padding past E*S is dropped
                start = int(info["start"])
                n = max(0, min(int(info["numel"]), E * S - start))
                flat[start:start + n] = t[key][:n].float()
    return rows, state, step


def local_params_and_state(strategy, layer, state_ES: dict[str, torch.Tensor], rank: int, world: int):
    """[(param, {key: tensor shaped like param})]: the full state sliced the way the strategy
    slices the parameters, ready to be put into the optimizer."""
    name, layout = strategy.name, full_layout(layer)
    if name == "fssdp_hybrid":  # owners are shard indices within the group; every group reads the same rows
        name, rank = "fssdp", strategy.inner.topology.rank
    if name == "fssdp":
        mine = layer.fssdp_state.owner_E == rank
        return [(layer.expert_chunks, {k: state_ES[k][mine] for k in sorted(state_ES)})]
    if name == "fsdp":
        p = layer.expert_shard
        out = {}
        for k, v in state_ES.items():
            flat = v.reshape(-1)
            flat = torch.cat([flat, flat.new_zeros(p.numel() * world - flat.numel())])
            out[k] = flat[rank * p.numel():(rank + 1) * p.numel()]
        return [(p, out)]
    if name in ("local", "dp", "ep"):
        first, local = layer.expert_slice if name == "ep" else (0, layout.num_experts)
        per_key = {k: layout.unflatten(v) for k, v in state_ES.items()}
        return [(p, {k: per_key[k][n][first:first + local] for k in per_key})
                for n, p in _named_params(layer, layout).items()]
    raise ValueError(f"checkpoints do not know strategy {name!r}")


# ---- what one rank keeps, assembled without the full rows -------------------------------------------
@dataclass(frozen=True)
class Kept:
    """The expert elements of one layer's flat [E*S] buffer that one rank keeps, in the order and
    shape it keeps them: ids given, whole chunk rows in that order ([len(ids), S]: fssdp owners,
    an ep slice, all rows for dp / local); ids None, the range [start, start + numel) of the
    zero-padded flat buffer ([numel]: an fsdp shard, which may start and end mid-row)."""
    ids: torch.Tensor | None = None
    start: int = 0
    numel: int = 0

    def shape(self, S: int) -> tuple[int, ...]:
        return (self.ids.numel(), S) if self.ids is not None else (self.numel,)

    def intervals(self, E: int, S: int) -> list[tuple[int, int]]:
        """The [lo, hi) element ranges that must be in the checkpoint (padding past E*S is not)."""
        if self.ids is not None:
            return rows_to_intervals(self.ids, S)
        lo, hi = self.start, min(self.start + self.numel, E * S)
        return [(lo, hi)] if lo < hi else []


def kept_elements(strategy, layer, rank: int) -> Kept | None:
    """What `strategy` keeps of the layer's experts on this rank (after the owners are final), or
    None for a strategy this module does not know (its load goes through full rows and
    strategy.load_experts). Mirrors each strategy's load_experts and local_params_and_state."""
    name, E = strategy.name, full_layout(layer).num_experts
    if name == "fssdp_hybrid":  # owners are shard indices within the group
        return Kept((layer.fssdp_state.owner_E == strategy.inner.topology.rank).nonzero().flatten())
    if name == "fssdp":
        return Kept((layer.fssdp_state.owner_E == rank).nonzero().flatten())
    if name == "fsdp":
        n = layer.expert_shard.numel()
        return Kept(None, rank * n, n)
    if name == "ep":
        first, local = layer.expert_slice
        return Kept(torch.arange(first, first + local))
    if name in ("local", "dp"):
        return Kept(torch.arange(E))
    return None


def expert_buffer(shape: tuple[int, ...]) -> torch.Tensor:
    """A zeroed fp32 buffer for kept expert rows or one optimizer moment of them: every expert
    buffer a checkpoint load allocates comes from here (tests and benchmarks count its bytes)."""
    return torch.zeros(shape, dtype=torch.float32)


def _row_runs(src_j: list[int], dst_j: list[int]) -> list[tuple[int, int, int]]:
    """(src start, dst start, length) runs where both positions advance by one: one copy each."""
    runs: list[tuple[int, int, int]] = []
    for s, d in zip(src_j, dst_j):
        if runs and runs[-1][0] + runs[-1][2] == s and runs[-1][1] + runs[-1][2] == d:
            runs[-1] = (runs[-1][0], runs[-1][1], runs[-1][2] + 1)
        else:
            runs.append((s, d, 1))
    return runs


def _fill(dst: torch.Tensor, kept: Kept, kind: str, info: dict, src_ids, src: torch.Tensor, E: int, S: int) -> None:
    """Copy the kept elements one piece holds into dst (kept.shape(S)), in place, converting to
    fp32 on the way: no temporary larger than a row."""
    if kind == "rows" and kept.ids is not None:
        pos_of_E = torch.full((E,), -1, dtype=torch.int64)
        pos_of_E[kept.ids] = torch.arange(kept.ids.numel())
        pos = pos_of_E[src_ids]
        take = (pos >= 0).nonzero().flatten().tolist()
        for s, d, n in _row_runs(take, pos[take].tolist()):
            dst[d:d + n].copy_(src[s:s + n])
    elif kind == "rows":  # whole rows into a flat range
        lo, hi = kept.start, min(kept.start + kept.numel, E * S)
        for j, e in enumerate(src_ids.tolist()):
            a, b = max(lo, e * S), min(hi, (e + 1) * S)
            if a < b:
                dst[a - lo:b - lo].copy_(src[j, a - e * S:b - e * S])
    else:  # a flat range (the zero padding past E*S dropped) into rows or a flat range
        p_lo = int(info["start"])
        p_hi = min(p_lo + int(info["numel"]), E * S)
        if kept.ids is None:
            a, b = max(p_lo, kept.start), min(p_hi, kept.start + kept.numel)
            if a < b:
                dst[a - kept.start:b - kept.start].copy_(src[a - p_lo:b - p_lo])
            return
        for j, e in enumerate(kept.ids.tolist()):
            a, b = max(p_lo, e * S), min(p_hi, (e + 1) * S)
            if a < b:
                dst[j, a - e * S:b - e * S].copy_(src[a - p_lo:b - p_lo])


class KeptAssembly:
    """One layer's kept rows and AdamW moments, in kept.shape, filled piece by piece as verified
    files are read, so a file's tensors can be freed before the next one is read. Nothing of
    size [E, S] is allocated (unless the rank keeps every row).

    add() copies the kept elements out of one piece (nothing of its tensors is kept but copies of
    its ids and step, so the caller can free them right after); finish()
    checks that the pieces added cover every kept element (check_covered names the missing
    experts) and returns (rows, {key: moment}, step): the moments every piece added has (as
    assemble), step the last piece's.
    The buffers are allocated when the first piece holding a kept element arrives (or at
    finish), so a shard's tensors of earlier layers are freed before later layers allocate."""

    def __init__(self, layout: ChunkLayout, layer_index: int, kept: Kept):
        self.layout, self.layer_index, self.kept = layout, layer_index, kept
        self.rows: torch.Tensor | None = None
        self.state: dict[str, torch.Tensor] = {}
        self.step: torch.Tensor | None = None
        self.identities: list = []  # (file, info, {"ids": ...}): what check_covered needs
        self.keys: set[str] | None = None  # the moments every piece so far has

    def _allocate(self) -> None:
        if self.rows is None:  # sorted keys: see assemble
            S = self.layout.chunk_numel
            self.rows = expert_buffer(self.kept.shape(S))
            self.state = {k: expert_buffer(self.kept.shape(S)) for k in sorted(self.keys or ())}

    def add(self, fname: str, info: dict, t: dict[str, torch.Tensor]) -> None:
        E, S = self.layout.num_experts, self.layout.chunk_numel
        kind = info["kind"]
        if kind not in ("rows", "flat"):
            raise CheckpointError(f"{fname}: MoE layer {self.layer_index} has unknown layout {kind!r}")
        if "step" in t:
            self.step = t["step"].detach().clone()
        keys = {k[len("state."):] for k in t if k.startswith("state.")}
        self.keys = keys if self.keys is None else self.keys & keys
        for k in [k for k in self.state if k not in keys]:
            del self.state[k]
        src_ids = t["ids"].to(torch.int64) if kind == "rows" else None
        if src_ids is not None and src_ids.numel() and (int(src_ids.min()) < 0 or int(src_ids.max()) >= E):
            raise CheckpointError(f"{fname}: MoE layer {self.layer_index} lists expert ids outside [0, {E})")
        self.identities.append((fname, info, {"ids": src_ids.clone()} if src_ids is not None else {}))
        held = rows_to_intervals(src_ids, S) if src_ids is not None else \
            [(int(info["start"]), int(info["start"]) + int(info["numel"]))]
        if not any(a < d and c < b for a, b in held for c, d in self.kept.intervals(E, S)):
            return  # nothing kept here (e.g. the dense file's empty piece): its moments and step only
        self._allocate()
        for dst, key in [(self.rows, "rows" if kind == "rows" else "flat")] + \
                [(self.state[k], f"state.{k}") for k in self.state]:
            _fill(dst, self.kept, kind, info, src_ids, t[key], E, S)

    def finish(self):
        """(rows, state, step); CheckpointError naming the experts no added piece held."""
        E, S = self.layout.num_experts, self.layout.chunk_numel
        check_covered(self.identities, self.layout, self.layer_index, self.kept.intervals(E, S))
        self._allocate()  # no piece held a kept element (the rank keeps none of this layer)
        out = self.rows, self.state, self.step
        self.rows, self.state, self.identities = None, {}, []
        return out


@torch.no_grad()
def install_kept(strategy, layer, kept: Kept, rows: torch.Tensor) -> None:
    """Copy the kept rows (KeptAssembly.finish) into the layer's expert parameters, the way the
    strategy's load_experts would keep them out of full rows."""
    for p, t in _kept_views(strategy, layer, rows):
        p.copy_(t)


def kept_params_and_state(strategy, layer, state: dict[str, torch.Tensor]):
    """[(param, {key: tensor shaped like param})] from kept-shaped state (KeptAssembly.finish): what
    local_params_and_state slices out of full [E, S] state."""
    per_key = {k: _kept_views(strategy, layer, v) for k, v in state.items()}
    params = [p for p, _ in _kept_views(strategy, layer, next(iter(state.values())))] if state else []
    return [(p, {k: per_key[k][j][1] for k in sorted(per_key)}) for j, p in enumerate(params)]


def _kept_views(strategy, layer, buf: torch.Tensor):
    """[(param, the view of buf that goes into it)] for a kept-shaped buffer."""
    name, layout = strategy.name, full_layout(layer)
    if name in ("fssdp", "fssdp_hybrid"):
        return [(layer.expert_chunks, buf)]
    if name == "fsdp":
        return [(layer.expert_shard, buf)]
    views = layout.unflatten(buf)
    return [(p, views[n]) for n, p in _named_params(layer, layout).items()]
