"""Token routes: which replica serves which source rank's tokens of each expert.

Given the materialization placement P1 (holders_WE) and every rank's token
counts per expert, each (source rank, expert) pair sends its tokens to
  1. the source itself, if it holds the expert (no traffic);
  2. else the holders on the source's node (fast links);
  3. else every holder (cross node).
Tokens are split evenly over the chosen replicas with integer splits that sum
exactly; the remainder tokens go to replicas in an order rotated by
(source + expert), so that many small remainders do not all land on the
lowest rank. The result is a pure function of its inputs (no randomness), so
every rank computes the same routes.
"""
from __future__ import annotations

import numpy as np
import torch

from hecate.parallel.fssdp._checks import check_nonnegative, node_array, to_numpy


def _routes_np(holders_WE: np.ndarray, counts_WE: np.ndarray, node_of_W: np.ndarray) -> np.ndarray:
    W, E = holders_WE.shape
    # Work in [W_dst, W_src, E] layout: reductions over dst then run along the outer axis,
    # which numpy vectorizes far better than along a short inner axis.
    same_node_WW = node_of_W[:, None] == node_of_W[None, :]
    # Does src's node hold e at all: [W_src, E].
    node_holds_WE = (same_node_WW.astype(np.int64) @ holders_WE.astype(np.int64)) > 0
    local_1WE = holders_WE[None, :, :]
    holder_W1E = holders_WE[:, None, :]
    eye_WW1 = np.eye(W, dtype=np.bool_)[:, :, None]
    near_WWE = same_node_WW[:, :, None] | ~node_holds_WE[None, :, :]
    cand_WWE = (local_1WE & eye_WW1) | (~local_1WE & holder_W1E & near_WWE)
    n_WE = cand_WWE.sum(axis=0, dtype=np.int64)
    orphan = (counts_WE > 0) & (n_WE == 0)
    if orphan.any():
        src, e = np.argwhere(orphan)[0]
        raise ValueError(
            f"holders_WE has no holder of expert {e} but rank {src} routes "
            f"{counts_WE[src, e]} tokens to it; every expert needs at least its owner in holders_WE"
        )
    safe_n = np.maximum(n_WE, 1)
    q_WE, r_WE = np.divmod(counts_WE, safe_n)
    # The r remainder tokens go to the candidates at positions offset .. offset + r - 1
    # (mod n), counted in rank order.
    pos_WWE = cand_WWE.astype(np.int32)
    for d in range(1, W):  # a row loop beats np.cumsum over axis 0 by ~5x here
        pos_WWE[d] += pos_WWE[d - 1]
    pos_WWE -= 1
    off_WE = (np.arange(W)[:, None] + np.arange(E)[None, :]) % safe_n
    lo = off_WE.astype(np.int32)[None]
    hi = (off_WE + r_WE).astype(np.int32)[None]
    wrap = hi - safe_n.astype(np.int32)[None]
    extra_WWE = cand_WWE & (((pos_WWE >= lo) & (pos_WWE < hi)) | (pos_WWE < wrap))
    routes_WWE = cand_WWE * q_WE[None] + extra_WWE  # [dst, src, e]
    return np.ascontiguousarray(routes_WWE.transpose(1, 2, 0))

def token_routes(holders_WE: torch.Tensor, counts_WE: torch.Tensor,
                 node_of_W: torch.Tensor) -> torch.Tensor:
    """Tokens each source rank sends to each replica, int64 [W_src, E, W_dst].

    holders_WE: bool [W, E], P1 (every expert with tokens needs >= 1 holder).
    counts_WE: int64 [W_src, E], tokens of each source rank per expert.
    node_of_W: int64 [W], node index of each rank.
    Guarantees: routes.sum(-1) == counts_WE; routes[s, e, d] > 0 only if
    holders_WE[d, e]; a source holding e keeps all of its tokens of e; the
    chosen replicas' shares differ by at most one token.
    """
    holders = to_numpy(holders_WE, "holders_WE", ndim=2, dtype=np.bool_)
    W, E = holders.shape
    counts = to_numpy(counts_WE, "counts_WE", ndim=2, shape=(W, E))
    check_nonnegative(counts, "counts_WE")
    nodes = node_array(node_of_W)
    if nodes.shape[0] != W:
        raise ValueError(f"node_of_W has {nodes.shape[0]} ranks but holders_WE has {W} rows")
    return torch.from_numpy(_routes_np(holders, counts, nodes))


def rank_splits(routes_WEW: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One rank's all-to-all layout from the global routes.

    Returns (send_WE, recv_WE), both int64 [W, E]: send_WE[d, e] tokens of
    expert e this rank sends to rank d (the send buffer is ordered by
    destination, then expert); recv_WE[s, e] tokens of expert e it receives
    from rank s. Per-peer split sizes are send_WE.sum(1) and recv_WE.sum(1).
    """
    if not isinstance(routes_WEW, torch.Tensor) or routes_WEW.dim() != 3:
        raise ValueError("routes_WEW must be an int64 tensor [W_src, E, W_dst]")
    W = routes_WEW.shape[0]
    if routes_WEW.shape[2] != W:
        raise ValueError(f"routes_WEW must be [W_src, E, W_dst] with W_src == W_dst, got "
                         f"{tuple(routes_WEW.shape)}")
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < W:
        raise ValueError(f"rank must be an int in [0, {W}), got {rank!r}")
    return routes_WEW[rank].T.contiguous(), routes_WEW[:, :, rank].contiguous()


def balance_routes(routes_WEW: torch.Tensor, holders_WE: torch.Tensor, node_of_W: torch.Tensor,
                   tolerance: float = 0.02, min_rows: int = 16) -> torch.Tensor:
    """Shift tokens among replicas on one node so that no rank computes far more rows than another.

    Local-first routes keep every source's tokens of a replicated expert at home, and send
    the tokens of experts that are not replicated to their owners, so the ranks' expert
    rows can differ even with hot experts replicated; the rank with the most rows then
    sets the pace of every token exchange. Repeatedly, the rank h with the most rows hands
    half the gap to the least loaded rank l on its node that holds an expert h serves
    (ascending expert id; first tokens from third ranks, which costs no extra traffic,
    then h's own, which then cross to l). It stops when the gap is within
    max(min_rows, tolerance x mean rows) or no such pair exists. Never across nodes.

    Keeps routes.sum(-1) (every token routed once) and routes only to holders. A pure
    function of its inputs, so every rank computes the same result.
    """
    routes = to_numpy(routes_WEW, "routes_WEW", ndim=3).copy()
    holders = to_numpy(holders_WE, "holders_WE", ndim=2, dtype=np.bool_)
    nodes = node_array(node_of_W)
    W, E = holders.shape
    if routes.shape != (W, E, W):
        raise ValueError(f"routes_WEW must be [W, E, W] = {(W, E, W)}, got {routes.shape}")
    load = routes.sum(axis=(0, 1))  # rows each rank computes
    slack = max(min_rows, int(tolerance * load.sum() / max(W, 1)))
    for _ in range(W * E):
        h = int(np.argmax(load))  # ties: the lowest rank
        moved = 0
        for lo in np.argsort(load, kind="stable"):
            lo = int(lo)
            if lo == h or nodes[lo] != nodes[h] or load[h] - load[lo] <= slack:
                continue
            moved = _shift(routes, holders, h, lo, int(load[h] - load[lo]) // 2)
            if moved:
                load[h] -= moved
                load[lo] += moved
                break
        if not moved:
            break
    return torch.from_numpy(routes)


def _shift(routes: np.ndarray, holders: np.ndarray, h: int, lo: int, want: int) -> int:
    """Move up to `want` of the rows rank h serves to rank lo (experts both hold); return how many."""
    W = routes.shape[0]
    moved = 0
    for e in np.nonzero(holders[h] & holders[lo])[0]:
        for s in [s for s in range(W) if s != h] + [h]:  # third ranks' tokens first: no new traffic
            take = min(int(routes[s, e, h]), want - moved)
            routes[s, e, h] -= take
            routes[s, e, lo] += take
            moved += take
            if moved == want:
                return moved
    return moved
