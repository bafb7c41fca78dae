"""Predicted bytes of every collective of a training run, per rank, as CommStats would count them.

The plans come from the runtime's planner (hecate.sim.plans); the accounting goes through
CommStats itself (`record` / `record_peers` with each rank's layout), so a prediction and a
measurement are comparable name by name and link class by link class, exactly.

Covered: fssdp (counts all-gather, spAG incl. the re-materialization gather, spRS, the four
token all-to-alls, the sharded dense optimizer's reduce-scatter + all-gather) and ep with
ep_size = W (split-size exchange, the four token all-to-alls, the dense all-reduce).
Not covered: re-sharding moves (`fssdp.reshard`) and fsdp; runs compared against this
must keep `reshard_interval` beyond their steps.
"""
from __future__ import annotations

import math

import numpy as np

from hecate.comm.stats import CommStats
from hecate.sim.plans import FssdpReplay, ep_owner_E, fssdp_tokens_WW

_DIGEST_WORDS = 4  # FullyShardedSparse._agree_on_counts sends [counts | non-MoE time | 4 digest words]


def _stats(W: int, rpn: int) -> list[CommStats]:
    out = []
    for r in range(W):
        s = CommStats()
        s.set_layout(r, [q // rpn for q in range(W)])
        out.append(s)
    return out


def _exchange(stats, name: str, tokens_WW: np.ndarray, row_bytes: int) -> None:
    """An all_to_all_v whose rank r sends tokens_WW[r, p] rows to rank p."""
    for r, s in enumerate(stats):
        s.record_peers(name, (tokens_WW[r] * row_bytes).tolist(), (tokens_WW[:, r] * row_bytes).tolist(), r)


def _token_exchanges(stats, prefix: str, tokens_WW: np.ndarray, row_bytes: int) -> None:
    """One MoE layer's four token all-to-alls: dispatch, combine and their mirrored backwards."""
    _exchange(stats, f"{prefix}.dispatch", tokens_WW, row_bytes)
    _exchange(stats, f"{prefix}.combine", tokens_WW.T, row_bytes)
    _exchange(stats, f"{prefix}.combine.backward", tokens_WW, row_bytes)
    _exchange(stats, f"{prefix}.dispatch.backward", tokens_WW.T, row_bytes)


def _chunk_exchange(stats, name: str, owner_E, holders_WE, row_bytes: int, reduce: bool) -> None:
    """spAG (owners send each replica to its holder) or its mirror spRS."""
    holders = np.asarray(holders_WE, dtype=bool)
    owner = np.asarray(owner_E, dtype=np.int64)
    W, E = holders.shape
    gather = holders.copy()
    gather[owner, np.arange(E)] = False
    # chunks_WW[src, dst]: replicas owned by src that dst receives
    chunks_WW = np.zeros((W, W), dtype=np.int64)
    np.add.at(chunks_WW, (owner[None, :].repeat(W, 0)[gather], np.nonzero(gather)[0]), 1)
    if reduce:
        chunks_WW = chunks_WW.T
    _exchange(stats, name, chunks_WW, row_bytes)


def predict_fssdp(trace_steps, ranks_per_node: int, *, d_model: int, chunk_numel: int, dense_numel: int,
                  token_bytes_per_elem: int = 4, wire_bytes: int = 4, options=None, **overrides) -> list[dict]:
    """Per-rank CommStats snapshots (links=True) of a fssdp run over `trace_steps` (per step, the
    [W, E] counts of every MoE layer), with the strategy's `options` / keyword overrides."""
    W, E = np.asarray(trace_steps[0][0]).shape
    replay = FssdpReplay(W, ranks_per_node, E, chunk_numel, len(trace_steps[0]), wire_bytes=wire_bytes,
                         options=options, **overrides)
    stats = _stats(W, ranks_per_node)
    row = d_model * token_bytes_per_elem
    counts_bytes = (W - 1) * (E + 1 + _DIGEST_WORDS) * 8
    shard = math.ceil(dense_numel / W) * 4
    remat = replay.strategy.rematerialize
    for step in trace_steps:
        for lp in replay.step(step, row):
            plan = lp.plan
            for s in stats:
                s.record("fssdp.counts", counts_bytes, counts_bytes)
            if lp.replicated:
                chunk_row = chunk_numel * wire_bytes
                for _ in range(2 if remat else 1):
                    _chunk_exchange(stats, "fssdp.spAG", plan.owner_E, plan.holders_WE, chunk_row, reduce=False)
                _chunk_exchange(stats, "fssdp.spRS", plan.owner_E, plan.holders_WE, chunk_row, reduce=True)
            tokens = fssdp_tokens_WW(plan)
            _token_exchanges(stats, "fssdp", tokens, row)
        if W > 1:
            for s in stats:
                s.record("dense.reduce_scatter", (W - 1) * shard, (W - 1) * shard)
                s.record("dense.all_gather", (W - 1) * shard, (W - 1) * shard)
    return [s.snapshot(links=True) for s in stats]


def predict_ep(trace_steps, ranks_per_node: int, *, d_model: int, dense_numel: int,
               token_bytes_per_elem: int = 4) -> list[dict]:
    """Per-rank CommStats snapshots (links=True) of an ep run (ep_size = W) over `trace_steps`."""
    W, E = np.asarray(trace_steps[0][0]).shape
    stats = _stats(W, ranks_per_node)
    row = d_model * token_bytes_per_elem
    owner = ep_owner_E(E, W)
    local = E // W
    counts_bytes = (W - 1) * local * 8
    n = dense_numel * 4
    for step in trace_steps:
        for counts_WE in step:
            counts_WE = np.asarray(counts_WE, dtype=np.int64)
            tokens = np.zeros((W, W), dtype=np.int64)
            np.add.at(tokens.T, owner, counts_WE.T)
            for s in stats:
                s.record("ep.counts", counts_bytes, counts_bytes, ranks=range(W))
            _token_exchanges(stats, "ep", tokens, row)
        if W > 1:
            for s in stats:
                s.record("dense.all_reduce", 2 * (W - 1) * n // W, 2 * (W - 1) * n // W)
    return [s.snapshot(links=True) for s in stats]
