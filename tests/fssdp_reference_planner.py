"""The dense FSSDP planner as it was before the sparse rewrite (commit 18e5b7d), kept as a test oracle.

Token routes here are a dense [W_src, E, W_dst] array (O(W^2 E) time and memory), Algorithm 1
places each copy with a full lexsort over the ranks, and P1 fitting loops over ranks. The new
planner (hecate/parallel/fssdp) must agree with these on every input: tests/test_fssdp_planner_sparse.py
checks it on random cases, and benchmarks/planner.py --reference times both side by side.
Only numpy in, numpy out; no validation (the tests feed valid inputs).
"""
from __future__ import annotations

import numpy as np


def routes(holders_WE: np.ndarray, counts_WE: np.ndarray, node_of_W: np.ndarray) -> np.ndarray:
    """Dense routes [W_src, E, W_dst]: local first, then the source's node, then every holder."""
    W, E = holders_WE.shape
    same_node_WW = node_of_W[:, None] == node_of_W[None, :]
    node_holds_WE = (same_node_WW.astype(np.int64) @ holders_WE.astype(np.int64)) > 0
    local_1WE = holders_WE[None, :, :]
    holder_W1E = holders_WE[:, None, :]
    eye_WW1 = np.eye(W, dtype=np.bool_)[:, :, None]
    near_WWE = same_node_WW[:, :, None] | ~node_holds_WE[None, :, :]
    cand_WWE = (local_1WE & eye_WW1) | (~local_1WE & holder_W1E & near_WWE)
    n_WE = cand_WWE.sum(axis=0, dtype=np.int64)
    orphan = (counts_WE > 0) & (n_WE == 0)
    if orphan.any():
        raise ValueError("an expert with tokens has no holder")
    safe_n = np.maximum(n_WE, 1)
    q_WE, r_WE = np.divmod(counts_WE, safe_n)
    pos_WWE = cand_WWE.astype(np.int32)
    for d in range(1, W):
        pos_WWE[d] += pos_WWE[d - 1]
    pos_WWE -= 1
    off_WE = (np.arange(W)[:, None] + np.arange(E)[None, :]) % safe_n
    lo = off_WE.astype(np.int32)[None]
    hi = (off_WE + r_WE).astype(np.int32)[None]
    wrap = hi - safe_n.astype(np.int32)[None]
    extra_WWE = cand_WWE & (((pos_WWE >= lo) & (pos_WWE < hi)) | (pos_WWE < wrap))
    routes_WWE = cand_WWE * q_WE[None] + extra_WWE
    return np.ascontiguousarray(routes_WWE.transpose(1, 2, 0))


def balance(routes_WEW: np.ndarray, holders_WE: np.ndarray, node_of_W: np.ndarray,
            tolerance: float = 0.02, min_rows: int = 16) -> np.ndarray:
    routes_WEW = routes_WEW.copy()
    W, E = holders_WE.shape
    load = routes_WEW.sum(axis=(0, 1))
    slack = max(min_rows, int(tolerance * load.sum() / max(W, 1)))
    for _ in range(W * E):
        h = int(np.argmax(load))
        moved = 0
        for lo in np.argsort(load, kind="stable"):
            lo = int(lo)
            if lo == h or node_of_W[lo] != node_of_W[h] or load[h] - load[lo] <= slack:
                continue
            moved = _shift(routes_WEW, holders_WE, h, lo, int(load[h] - load[lo]) // 2)
            if moved:
                load[h] -= moved
                load[lo] += moved
                break
        if not moved:
            break
    return routes_WEW


def _shift(routes, holders, h, lo, want):
    W = routes.shape[0]
    moved = 0
    for e in np.nonzero(holders[h] & holders[lo])[0]:
        for s in [s for s in range(W) if s != h] + [h]:
            take = min(int(routes[s, e, h]), want - moved)
            routes[s, e, h] -= take
            routes[s, e, lo] += take
            moved += take
            if moved == want:
                return moved
    return moved


def owner_holders(owner_E, W):
    holders = np.zeros((W, len(owner_E)), dtype=np.bool_)
    holders[owner_E, np.arange(len(owner_E))] = True
    return holders


def hottest(load_E, k):
    order = np.lexsort((np.arange(len(load_E)), -load_E))
    order = order[load_E[order] > 0]
    return order[:k]


def place(load_E, owner_E, node_of_W, m, t, quota_E) -> np.ndarray:
    """Algorithm 1 (quota_E: the proportional quota, computed by the caller)."""
    W, E = len(node_of_W), len(load_E)
    holders = owner_holders(owner_E, W)
    if t <= m:
        holders[:, hottest(load_E, t)] = True
        return holders
    share_E = load_E / (quota_E + 1)
    dev_load_W = np.zeros(W)
    np.add.at(dev_load_W, owner_E, share_E)
    used_W = np.zeros(W, dtype=np.int64)
    num_nodes = int(node_of_W.max()) + 1
    node_has_NE = np.zeros((num_nodes, E), dtype=np.bool_)
    node_has_NE[node_of_W[owner_E], np.arange(E)] = True
    ranks = np.arange(W)
    for e in np.lexsort((np.arange(E), -load_E, -quota_E)):
        for _ in range(int(quota_E[e])):
            free = ~holders[:, e] & (used_W < m)
            if not free.any():
                break
            node_lacks = ~node_has_NE[node_of_W, e]
            order = np.lexsort((ranks, used_W, dev_load_W, ~node_lacks, ~free))
            d = order[0]
            holders[d, e] = True
            used_W[d] += 1
            dev_load_W[d] += share_E[e]
            node_has_NE[node_of_W[d], e] = True
    return holders


def fit_holders(holders_WE, owner_E, counts_WE, chunk_bytes, token_bytes, chunk_passes, m):
    """P1 fitted to bytes, as FullyShardedSparse._fit_holders did (numpy port of the torch loop)."""
    saving_WE = 4 * counts_WE.astype(np.float64) * token_bytes - chunk_passes * chunk_bytes
    E = len(owner_E)
    owned = np.zeros_like(holders_WE)
    owned[owner_E, np.arange(E)] = True
    holders = (holders_WE & (saving_WE > 0)) | owned
    free_W = m - (holders & ~owned).sum(1)
    for d in range(holders.shape[0]):
        if free_W[d] <= 0:
            continue
        gain = np.where(holders[d], -1.0, saving_WE[d])
        order = np.argsort(-gain, kind="stable")[:int(free_W[d])]
        holders[d, order[gain[order] > 0]] = True
    return holders


def plan_time(cm, holders_WE, owner_E, routes_WEW, node_of_W, hidden_s=None, gathered_WE=None):
    """CostModel.plan_time on dense routes."""
    if hidden_s is None:
        hidden_s = cm.t_non_moe
    if gathered_WE is None:
        gathered_WE = holders_WE.copy()
        gathered_WE[owner_E, np.arange(len(owner_E))] = False
    bw_WW = np.where(node_of_W[:, None] == node_of_W[None, :], cm.intra_node_bw, cm.inter_node_bw)
    gather = (gathered_WE * (cm.chunk_bytes / bw_WW[:, owner_E])).sum(axis=1)
    compute = routes_WEW.sum(axis=(0, 1)).astype(np.float64) * cm.token_compute_s
    tokens_WW = routes_WEW.sum(axis=1).astype(np.float64)
    np.fill_diagonal(tokens_WW, 0.0)
    seconds_WW = tokens_WW * cm.token_bytes / bw_WW
    a2a = 2.0 * np.maximum(seconds_WW.sum(axis=1), seconds_WW.sum(axis=0))
    return float((compute + a2a + np.maximum(gather - hidden_s, 0.0)).max())


def destination_bins(indices_TK, counts_E, send_WE):
    """The old destination bins: a [T*K, W] comparison per entry (torch)."""
    import torch

    E = counts_E.numel()
    flat = indices_TK.reshape(-1)
    valid = flat >= 0
    key = torch.where(valid, flat, torch.full_like(flat, E))
    order = torch.sort(key, stable=True).indices
    sorted_e = key[order]
    starts = torch.cumsum(counts_E, 0) - counts_E
    starts = torch.cat([starts, starts.new_zeros(1)])
    pos = torch.arange(flat.numel()) - starts[sorted_e]
    ends_EW = torch.cat([send_WE.T.cumsum(1), send_WE.new_zeros(1, send_WE.shape[0])])
    dst_sorted = (pos.unsqueeze(1) >= ends_EW[sorted_e]).sum(1)
    dst = torch.empty_like(flat)
    dst[order] = dst_sorted
    bins = torch.where(valid, dst * E + flat, torch.full_like(flat, -1))
    return bins.view(indices_TK.shape)
