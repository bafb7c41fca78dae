"""Materialization policies: decide P1 (which ranks hold a usable copy of each expert).

Every policy has one interface:

    policy.plan(predicted_load_E, owner_E, node_of_W, capacity_m, counts_WE=None)
        -> holders_WE (bool [W, E]), always a superset of the owner placement P0

`capacity_m` is the memory budget: how many chunks of this layer each rank may
materialize beyond the ones it owns. `counts_WE` is the current batch's
per-rank token counts, used by policies that look at the real routing.

* HecatePolicy: the paper's Algorithm 1 on the predicted load, with an
  optional calibration on the current batch.
* ShadowingPolicy: FasterMoE-style shadowing from the current batch only.
* NoReplicationPolicy: P1 = P0 (pure expert parallelism over the shards).
All are deterministic: ties are broken by expert index, then rank.
"""
from __future__ import annotations

from bisect import bisect_left, insort
from itertools import islice

import numpy as np
import torch

from hecate.parallel.fssdp._checks import (
    CheckedCache,
    check_nonnegative,
    check_owner,
    check_positive_int,
    node_array,
    sparse_nonzero,
    to_numpy,
)
from hecate.ops._backend import use_extension
from hecate.parallel.fssdp.cost import CostModel
from hecate.parallel.fssdp.routes import TokenRoutes


# Predicted loads and owners a policy's plan() has checked: the runtime plans with the same
# tensors more than once a step (the early P1, the plan, the next layer's prefetch).
_CHECKED = CheckedCache()


def owner_holders(owner_E: np.ndarray, world_size: int) -> np.ndarray:
    """P0 as a bool [W, E] mask."""
    holders = np.zeros((world_size, len(owner_E)), dtype=np.bool_)
    holders[owner_E, np.arange(len(owner_E))] = True
    return holders


def hottest(load_E: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k most loaded experts with load > 0 (ties: lower index first)."""
    order = np.lexsort((np.arange(len(load_E)), -load_E))
    order = order[load_E[order] > 0]
    return order[:k]


def proportional_quota(load_E: np.ndarray, total: int, cap: int) -> np.ndarray:
    """Split `total` integer slots among experts in proportion to load, at most `cap` each.

    Water-filling: experts whose share would exceed the cap get the cap and the
    rest is re-shared among the others; the final shares are rounded by the
    largest-remainder method (ties: lower expert index). Zero-load experts get 0.
    """
    E = len(load_E)
    quota = np.zeros(E, dtype=np.int64)
    active = load_E > 0
    remaining = min(int(total), cap * int(active.sum()))
    while remaining > 0 and active.any():
        share = np.zeros(E)
        share[active] = remaining * load_E[active] / load_E[active].sum()
        over = active & (share >= cap)
        if over.any():
            quota[over] = cap
            remaining -= cap * int(over.sum())
            active &= ~over
            continue
        base = np.floor(share).astype(np.int64)
        leftover = remaining - int(base[active].sum())
        frac = np.where(active, share - base, -1.0)
        order = np.lexsort((np.arange(E), -frac))
        base[order[:leftover]] += 1
        quota[active] = base[active]
        break
    return quota


_REINSERT = 64  # chosen ranks re-inserted one by one; more are merged back in one sort


def _pick_few(ready: list, node: list, o: int, q: int) -> list:
    """The q free ranks Algorithm 1 picks for one expert (owner o), scanning keys in order:
    first the best rank of each node lacking the expert, then the best remaining ranks."""
    has, picked = {node[o]}, []
    for key in ready:
        if len(picked) == q:
            return picked
        d = key[2]
        if d != o and node[d] not in has:
            picked.append(key)
            has.add(node[d])
    if len(picked) < q:
        chosen = {key[2] for key in picked}
        for key in ready:
            if len(picked) == q:
                break
            if key[2] != o and key[2] not in chosen:
                picked.append(key)
    return picked


def _pick_many(ready: list, node: list, o: int, q: int) -> list:
    """Same picks as _pick_few, for large q: the per-node bests come from one dict pass
    (reversed, so each node keeps its first key in order) instead of a Python loop."""
    ranks = [key[2] for key in ready]
    best = dict(zip(map(node.__getitem__, reversed(ranks)), reversed(ready)))
    best.pop(node[o], None)
    picked = sorted(best.values())[:q]
    if len(picked) < q:
        chosen = {key[2] for key in picked}
        chosen.add(o)
        picked += list(islice((key for key in ready if key[2] not in chosen), q - len(picked)))
    return picked


def place_copies(dev_load_W, node_of_W, owner_E, order, quota_E, share_E, m: int,
                 use_kernel: bool | None = None):
    """Algorithm 1's copy-by-copy loop: (ranks, experts) of the copies, in placement order.

    Experts in `order` each take quota_E[e] copies on the free rank first by (its node lacks
    e, expected tokens, used slots, rank); see HecatePolicy.place. Runs the C++ kernel
    (csrc/cpu/placement.cpp) when hecate._C is built, else the same loop in Python; both
    give bit-identical picks (tests/test_fssdp_planner_sparse.py runs both). ~1.5 us per
    copy in Python, a 1024-rank world places 2048 copies per layer.
    """
    if use_kernel is None:
        use_kernel = use_extension("place_copies", torch.device("cpu"))
    if use_kernel:
        as_t = torch.from_numpy
        d, e = torch.ops.hecate.place_copies(
            as_t(np.ascontiguousarray(dev_load_W, dtype=np.float64)),
            as_t(np.ascontiguousarray(node_of_W, dtype=np.int64)),
            as_t(np.ascontiguousarray(owner_E, dtype=np.int64)),
            as_t(np.ascontiguousarray(order, dtype=np.int64)),
            as_t(np.ascontiguousarray(quota_E, dtype=np.int64)),
            as_t(np.ascontiguousarray(share_E, dtype=np.float64)), int(m))
        return d.numpy(), e.numpy()
    W = len(node_of_W)
    # Python floats are the same IEEE doubles: sums happen in the same order as a
    # per-copy numpy update would do them, so the keys (and ties) are exact.
    dev, used = dev_load_W.tolist(), [0] * W
    node, owner, share = node_of_W.tolist(), owner_E.tolist(), share_E.tolist()
    ready = sorted((dev[d], 0, d) for d in range(W))  # free ranks by key (m >= 1)
    num_nodes = len(set(node))
    picks_d, picks_e = [], []
    quota = quota_E.tolist()
    for e in order.tolist():
        q = quota[e]
        if q == 0 or not ready:
            break  # sorted by quota first: the rest have none; or no slot is left anywhere
        o, se = owner[e], share[e]
        # A scan stops once q nodes are found; when q reaches the node count it walks every
        # free rank in Python, and on long lists the C-level passes of _pick_many are faster.
        if q >= num_nodes and len(ready) > 256:
            picked = _pick_many(ready, node, o, q)
        else:
            picked = _pick_few(ready, node, o, q)
        picks_d.extend([key[2] for key in picked])
        picks_e.extend([e] * len(picked))
        if len(picked) <= _REINSERT:  # re-insert the chosen ranks with their new keys
            for key in picked:
                del ready[bisect_left(ready, key)]
                d = key[2]
                dev[d] += se
                used[d] += 1
                if used[d] < m:
                    insort(ready, (dev[d], used[d], d))
        else:  # many: one merge (timsort of two sorted runs) beats many insertions
            gone = {key[2] for key in picked}
            for d in gone:
                dev[d] += se
                used[d] += 1
            ready = sorted([key for key in ready if key[2] not in gone]
                           + [(dev[d], used[d], d) for d in gone if used[d] < m])
    return np.asarray(picks_d, dtype=np.int64), np.asarray(picks_e, dtype=np.int64)


class MaterializationPolicy:
    """Base class: validates inputs, then calls `_plan(...)` on numpy arrays."""

    name = "abstract"
    uses_counts = False  # whether _plan reads the batch's counts_WE

    def plan(self, predicted_load_E, owner_E, node_of_W, capacity_m: int,
             counts_WE=None) -> torch.Tensor:
        """Return holders_WE (bool [W, E]) with holders_WE[owner_E[e], e] True for every e."""
        load = _CHECKED.get(predicted_load_E, "load")
        if load is None:
            load = to_numpy(predicted_load_E, "predicted_load_E", ndim=1, dtype=np.float64)
            check_nonnegative(load, "predicted_load_E")
            _CHECKED.put(predicted_load_E, "load", load)
        E = load.shape[0]
        nodes = node_array(node_of_W)
        W = nodes.shape[0]
        owner = _CHECKED.get(owner_E, ("owner", E, W))
        if owner is None:
            owner = to_numpy(owner_E, "owner_E", ndim=1, shape=(E,))
            check_owner(owner, W)
            _CHECKED.put(owner_E, ("owner", E, W), owner)
        m = check_positive_int(capacity_m, "capacity_m")
        counts = None
        if counts_WE is not None:
            shape = tuple(getattr(counts_WE, "shape", np.shape(counts_WE)))
            if shape != (W, E):
                raise ValueError(f"counts_WE has shape {shape} but must be [W, E] = {(W, E)}")
            if self.uses_counts:  # converted and checked (O(W*E)) only where it is read
                counts = to_numpy(counts_WE, "counts_WE", ndim=2, shape=(W, E), copy=False)
                check_nonnegative(counts, "counts_WE")
        holders = self._plan(load, owner, nodes, m, counts)
        return torch.from_numpy(holders)

    def _plan(self, load_E, owner_E, node_of_W, m, counts_WE) -> np.ndarray:
        raise NotImplementedError


class NoReplicationPolicy(MaterializationPolicy):
    """P1 = P0: every expert lives only at its owner (expert parallelism over the shards)."""

    name = "none"

    def _plan(self, load_E, owner_E, node_of_W, m, counts_WE):
        return owner_holders(owner_E, len(node_of_W))


class HecatePolicy(MaterializationPolicy):
    """Algorithm 1 of the paper: replicate by predicted load within the overlap and memory budgets.

    t = overlap degree from the cost model (or `overlap_degree` if given).
    If t <= m, the top-t experts are replicated on every rank. Otherwise the
    W * m slots are shared among experts in proportion to load (at most W - 1
    extra copies each); each extra copy goes to a rank with a free slot,
    preferring nodes that lack the expert, then the rank with the least
    expected token load, then fewer used slots, then the lower rank.

    With `calibrate=True` and the current batch's counts, the plan is rerun on
    the real load; the result is kept only if the cost model says it is faster
    even with its extra gather fully exposed. `last_calibrated` records whether
    the last call switched.
    """

    name = "hecate"

    def __init__(self, cost_model: CostModel | None = None, *, overlap_degree: int | None = None,
                 calibrate: bool = False):
        if cost_model is None and overlap_degree is None:
            raise ValueError("HecatePolicy needs cost_model or overlap_degree to know t")
        if overlap_degree is not None:
            if isinstance(overlap_degree, bool) or not isinstance(overlap_degree, int) \
                    or overlap_degree < 0:
                raise ValueError(f"overlap_degree must be an int >= 0, got {overlap_degree!r}")
        if calibrate and cost_model is None:
            raise ValueError("HecatePolicy(calibrate=True) needs a cost_model to compare plans")
        self.cost_model = cost_model
        self.fixed_t = overlap_degree
        self.calibrate = calibrate
        self.last_calibrated = False

    @property
    def uses_counts(self) -> bool:
        return self.calibrate

    def overlap_degree(self, node_of_W: np.ndarray) -> int:
        if self.fixed_t is not None:
            return self.fixed_t
        multi_node = bool(np.any(node_of_W != node_of_W[0]))
        return self.cost_model.overlap_degree(multi_node)

    def _plan(self, load_E, owner_E, node_of_W, m, counts_WE):
        t = self.overlap_degree(node_of_W)
        holders = self.place(load_E, owner_E, node_of_W, m, t)
        self.last_calibrated = False
        if self.calibrate and counts_WE is not None:
            real = self.place(counts_WE.sum(axis=0).astype(np.float64), owner_E, node_of_W, m, t)
            if not np.array_equal(real, holders) and self._faster(holders, real, owner_E,
                                                                  node_of_W, counts_WE):
                self.last_calibrated = True
                return real
        return holders

    @staticmethod
    def place(load_E, owner_E, node_of_W, m, t, use_kernel: bool | None = None) -> np.ndarray:
        """Algorithm 1 proper on numpy inputs (public for the simulator and tests).

        Each copy of expert e goes to the free rank (a slot left, not holding e) that is
        first by (its node lacks e, expected tokens, used slots, rank). Within one expert
        only the chosen ranks' keys change, and a chosen rank cannot take e again, so the
        copies of e are: the best free rank of each node that lacks e, in key order, then
        the best remaining free ranks. Free ranks are kept sorted by key and re-inserted
        when chosen, so placing all W * m copies costs O(W * m * (log W + ranks per node))
        rather than a sort of all ranks per copy. With hecate._C built, all of it runs as one
        C++ op (csrc/cpu/placement.cpp, place_experts) with bit-identical picks
        (`use_kernel=False` runs the numpy and pure-Python path).
        """
        W, E = len(node_of_W), len(load_E)
        if use_kernel is None:
            use_kernel = use_extension("place_experts", torch.device("cpu"))
        if use_kernel:  # the whole of it in one C++ call
            return torch.ops.hecate.place_experts(
                torch.from_numpy(np.ascontiguousarray(load_E, dtype=np.float64)),
                torch.from_numpy(np.ascontiguousarray(owner_E, dtype=np.int64)),
                torch.from_numpy(np.ascontiguousarray(node_of_W, dtype=np.int64)), int(m), int(t)).numpy()
        holders = owner_holders(owner_E, W)
        if t <= m:
            holders[:, hottest(load_E, t)] = True
            return holders
        quota_E = proportional_quota(load_E, W * m, cap=W - 1)
        share_E = load_E / (quota_E + 1)  # expected tokens per copy
        dev_load_W = np.zeros(W)
        np.add.at(dev_load_W, owner_E, share_E)
        order = np.lexsort((np.arange(E), -load_E, -quota_E))
        order = order[quota_E[order] > 0]  # sorted by quota first: the rest place nothing
        picks_d, picks_e = place_copies(dev_load_W, node_of_W, owner_E, order, quota_E, share_E, m,
                                        use_kernel=use_kernel)
        holders[picks_d, picks_e] = True
        return holders

    def _faster(self, predicted, real, owner_E, node_of_W, counts_WE) -> bool:
        cm = self.cost_model
        own = owner_holders(owner_E, len(node_of_W))
        # The predicted plan's gather already ran (overlapped); the switch adds an exposed gather.
        base_W = np.maximum(cm.gather_time_W(predicted & ~own, owner_E, node_of_W) - cm.t_non_moe, 0)
        r_pred = TokenRoutes(predicted, counts_WE, node_of_W)
        r_real = TokenRoutes(real, counts_WE, node_of_W)
        t_pred = (cm.compute_time_W(r_pred) + cm.all_to_all_time_W(r_pred, node_of_W)
                  + base_W).max()
        extra_W = cm.gather_time_W(real & ~predicted, owner_E, node_of_W)
        t_real = (cm.compute_time_W(r_real) + cm.all_to_all_time_W(r_real, node_of_W)
                  + base_W + extra_W).max()
        return bool(t_real < t_pred)


class ShadowingPolicy(MaterializationPolicy):
    """FasterMoE-style shadowing decided from the current batch (counts_WE is required).

    Experts are considered hottest first; an expert is shadowed (copied to
    every rank) while doing so lowers the cost model's estimate, i.e. while
    the saved all-to-all and compute imbalance outweigh its broadcast, which
    is exposed (hidden_s = 0) because it can only start after routing. At most
    `capacity_m` experts are shadowed. `predicted_load_E` is ignored.
    """

    name = "shadowing"
    uses_counts = True

    def __init__(self, cost_model: CostModel):
        if not isinstance(cost_model, CostModel):
            raise TypeError(f"ShadowingPolicy needs a CostModel, got {type(cost_model).__name__}")
        self.cost_model = cost_model

    def _plan(self, load_E, owner_E, node_of_W, m, counts_WE):
        if counts_WE is None:
            raise ValueError("ShadowingPolicy.plan needs counts_WE (the current batch's counts)")
        cm = self.cost_model
        W = len(node_of_W)
        own = owner_holders(owner_E, W)
        holders = own.copy()

        def estimate(h):
            return cm.plan_time(h, owner_E, TokenRoutes(h, counts_WE, node_of_W), node_of_W,
                                hidden_s=0.0, gathered_WE=h & ~own)

        best = estimate(holders)
        for e in hottest(counts_WE.sum(axis=0).astype(np.float64), m):
            trial = holders.copy()
            trial[:, e] = True
            cost = estimate(trial)
            if not cost < best:
                break
            holders, best = trial, cost
        return holders


def fit_holders(holders_WE, owner_E, counts_WE, *, chunk_bytes: int, token_bytes: int,
                chunk_passes: int, capacity_m: int, fixed_bytes: float = 0.0,
                use_kernel: bool | None = None) -> torch.Tensor:
    """Fit P1 to bytes: keep a replica of e on rank d only when d's tokens of e cost more bytes
    to move than the chunk, then spend each rank's free slots (capacity_m) on the replicas
    that save the most (ties: the lower expert).

    A token crosses 4 times (dispatch, combine and their backward), a chunk `chunk_passes`
    times (spAG, spRS, and the re-gather with re-materialization). counts_WE may be real
    counts (int) or predicted ones (float). Returns bool [W, E] with P0 always included.
    O(W*E) plus a sort of the candidates; no loop over ranks.

    fixed_bytes: what the replicas' own collectives cost beyond their bytes (their latency,
    priced in bytes; summed over the ranks). Replicas add collectives (spAG, spRS, the
    re-gather) that a layer without them does not issue at all, so the layer keeps its
    replicas only if their summed net saving exceeds fixed_bytes; else P1 = P0 (no replica
    pays for itself, and the layer moves exactly what ep would). 0: any saving pays.

    With hecate._C built and tensor inputs, one C++ op does it all (csrc/cpu/fit.cpp,
    fit_replicas; bit-identical, `use_kernel=False` runs the numpy path below).
    """
    if use_kernel is None:
        use_kernel = use_extension("fit_replicas", torch.device("cpu"))
    if use_kernel and _kernel_fit_inputs(holders_WE, owner_E, counts_WE, chunk_bytes, token_bytes,
                                         chunk_passes):
        if counts_WE.dtype not in (torch.int64, torch.float64):
            counts_WE = counts_WE.double()  # predicted (float) counts: as the numpy path's float64
        return torch.ops.hecate.fit_replicas(holders_WE, owner_E, counts_WE, chunk_passes * chunk_bytes,
                                             token_bytes, check_positive_int(capacity_m, "capacity_m"),
                                             float(fixed_bytes))
    holders = to_numpy(holders_WE, "holders_WE", ndim=2, dtype=np.bool_, copy=False)
    W, E = holders.shape
    owner = to_numpy(owner_E, "owner_E", ndim=1, shape=(E,))
    check_owner(owner, W)
    counts = _counts_array(counts_WE, W, E)
    m = check_positive_int(capacity_m, "capacity_m")
    cost = chunk_passes * chunk_bytes
    # Only entries above the break-even count can pay; a scalar comparison finds them, and the
    # exact saving is computed for those alone (break_even_count, replica_savings).
    even = break_even_count(cost, token_bytes)
    if even is not None:
        maybe = counts > even
    else:
        maybe = counts >= 0 if token_bytes > 0 else np.full(counts.shape, cost < 0)
    d, e = sparse_nonzero(maybe)  # row-major: rank, then expert
    saving = replica_savings(counts[d, e], token_bytes, cost)
    pays = saving > 0
    d, e, saving = d[pays], e[pays], saving[pays]
    owned = owner_holders(owner, W)
    out = owned.copy()
    # Replicas the policy proposed are kept where they pay (P0 is always part of P1).
    held = holders[d, e] & ~owned[d, e]
    out[d[held], e[held]] = True
    free_W = m - np.bincount(d[held], minlength=W)
    saved = float(saving[held].sum())
    add = ~holders[d, e] & ~owned[d, e] & (free_W[d] > 0)
    d, e, saving = d[add], e[add], saving[add]
    if d.size:
        order = np.lexsort((e, -saving, d))  # per rank: most saved first, then lower expert
        d, e, saving = d[order], e[order], saving[order]
        rank_in_row = np.arange(d.size) - np.searchsorted(d, d)
        keep = rank_in_row < free_W[d]
        out[d[keep], e[keep]] = True
        saved += float(saving[keep].sum())
    if fixed_bytes > 0 and not saved > fixed_bytes:
        return torch.from_numpy(owned)  # the replicas would not repay their collectives: P1 = P0
    return torch.from_numpy(out)


# The fit's rule, which the no-replica shortcut bounds (FullyShardedSparse._fit_keeps_none). The
# C++ ops apply csrc/cpu/fit_rule.h; these are its twin for builds without hecate._C, the same
# double operations (tests/test_fssdp_fit_rule.py compares them).

def replica_savings(counts, token_bytes: int, cost: int) -> np.ndarray:
    """The bytes a replica saves per cell of counts: 4 x count x token_bytes - cost, float64
    (the tokens no longer cross 4 times; the chunk crosses `cost` = chunk bytes x passes).
    4 x count is exact, so the result is the same double as (4 x count) x token_bytes - cost."""
    saving = np.multiply(counts, 4.0, dtype=np.float64)
    saving *= float(token_bytes)
    saving -= float(cost)
    return saving


def break_even_count(cost: int, token_bytes: int) -> float | None:
    """The count at or below which a replica saves nothing, lowered by 1e-9 relative (far beyond
    the savings' rounding, so no cell it rules out could save); None when token_bytes or cost is
    not positive (no such count: the fit then computes every saving)."""
    if token_bytes > 0 and cost > 0:
        return float(cost) / (4.0 * float(token_bytes)) * (1 - 1e-9)
    return None


def fit_bound(counts_WE, owner_E, *, token_bytes: int, cost: int, not_owned: np.ndarray | None = None,
              use_kernel: bool | None = None) -> tuple[int, float]:
    """(largest cell, most saved) of int64 counts [W, E]: the sum of every positive saving over the
    cells a replica could take (not the owner's), the most bytes any fit of any P1 to these
    counts can save (it keeps a subset of them). Summed as np.add.reduce sums the [W * E] savings
    with 0.0 at the owners' and at non-saving cells (pairwise), the C++ op fit_bound too.
    `not_owned`: that 0/1 float64 mask, flat, when the caller keeps one."""
    if use_kernel is None:
        use_kernel = use_extension("fit_bound", torch.device("cpu"))
    counts_t = counts_WE if isinstance(counts_WE, torch.Tensor) else torch.from_numpy(np.asarray(counts_WE))
    if use_kernel and counts_t.dtype == torch.int64 and counts_t.device.type == "cpu":
        return torch.ops.hecate.fit_bound(counts_t, owner_E, int(token_bytes), int(cost))
    counts = counts_t.cpu().numpy()
    top = int(counts.max())
    if not replica_savings(np.int64(top), token_bytes, cost) > 0:
        return top, 0.0  # no cell saves anything
    if not_owned is None:
        owner = owner_E.numpy() if isinstance(owner_E, torch.Tensor) else np.asarray(owner_E)
        not_owned = (~owner_holders(owner, counts.shape[0])).astype(np.float64).reshape(-1)
    saving = replica_savings(counts, token_bytes, cost)
    np.maximum(saving, 0.0, out=saving)
    saving = saving.reshape(-1)
    saving *= not_owned
    return top, float(np.add.reduce(saving))


def fit_keeps_none(max_count: int, most_saved: float, cells: int, *, token_bytes: int, cost: int,
                   fixed_bytes: float, use_kernel: bool | None = None) -> bool:
    """Whether fit_holders returns P0 for any P1 and any counts of `cells` cells whose largest is
    max_count and whose replicas could save most_saved bytes at most (fit_bound; or a mean of such
    bounds, which bounds the fit to the mean counts, the saving being convex in the count): every
    cell is at or below the break-even count, or the most the replicas could save does not repay
    the collectives they add (fixed_bytes), with margins far above the rounding of the fit's sums
    (relative) and savings (absolute, per cell). The C++ op fit_keeps_none where hecate._C is built."""
    if use_kernel is None:
        use_kernel = use_extension("fit_bound", torch.device("cpu"))
    if use_kernel:
        return torch.ops.hecate.fit_keeps_none(int(max_count), float(most_saved), int(cells), int(token_bytes),
                                               int(cost), float(fixed_bytes))
    even = break_even_count(cost, token_bytes)
    if even is not None and int(max_count) <= even:  # an exact int-float comparison
        return True
    slack = 1e-15 * cells * (4.0 * float(max_count) * float(token_bytes) + float(cost))
    return fixed_bytes > 0 and most_saved + slack <= fixed_bytes * (1 - 1e-9)


def _kernel_fit_inputs(holders_WE, owner_E, counts_WE, *ints) -> bool:
    """Whether fit_replicas takes these as they are: CPU tensors (bool holders, int64 owners,
    int64 or floating counts) and int sizes; anything else takes the numpy path and its checks."""
    tensors = (holders_WE, owner_E, counts_WE)
    return (all(isinstance(t, torch.Tensor) and t.device.type == "cpu" and not t.requires_grad for t in tensors)
            and holders_WE.dtype == torch.bool and owner_E.dtype == torch.int64
            and (counts_WE.dtype == torch.int64 or counts_WE.is_floating_point())
            and all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in ints))


def _counts_array(counts_WE, W: int, E: int) -> np.ndarray:
    """counts_WE as int64 when integer (a plain copy), float64 when not (predicted counts)."""
    floating = (counts_WE.is_floating_point() if isinstance(counts_WE, torch.Tensor)
                else np.asarray(counts_WE).dtype.kind == "f")
    counts = to_numpy(counts_WE, "counts_WE", ndim=2, dtype=np.float64 if floating else np.int64,
                      shape=(W, E), copy=False)
    check_nonnegative(counts, "counts_WE")
    return counts
