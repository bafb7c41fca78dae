"""A simple analytic cost model for one MoE layer's materialization plan.

It answers two questions for the planners:

* overlap degree t: how many expert chunks one rank can receive while the
  non-MoE part of the layer (attention) runs, i.e. the spAG that is hidden:
  t = floor(T_non_moe * bandwidth / chunk_bytes), with the inter-node
  bandwidth when the world spans nodes (the slow link bounds the gather).
* estimated time of a plan: max over ranks of
      compute_r + all_to_all_r + max(0, gather_r - hidden_s)
  where
      compute_r    = tokens served by rank r * token_compute_s
      all_to_all_r = 2 * max(bytes sent off-rank, bytes received) / bandwidth
                     (dispatch + combine; intra- and inter-node bytes each at
                     their own bandwidth, summed)
      gather_r     = sum over chunks rank r materializes but does not own of
                     chunk_bytes / bandwidth(owner node, r node)
  Only the receiving side of a gather is charged: spAG is built from NCCL
  broadcasts, which pipeline so the owner sends about one chunk's worth per
  broadcast no matter how many ranks receive it. `hidden_s` is the compute a
  gather overlaps with (T_non_moe for a gather issued before routing, 0 for
  one issued after it, as FasterMoE's shadowing or Hecate's calibration).

Backward mirrors forward (spRS mirrors spAG, the all-to-alls mirror each
other), so comparing forward estimates compares whole steps. The model
ignores link contention between ranks of one node and kernel launch
overheads; it is meant to rank plans, not to predict wall time exactly.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from hecate.parallel.fssdp.routes import TokenRoutes


def overlap_degree(t_non_moe: float, bandwidth: float, chunk_bytes: int) -> int:
    """t: chunks one rank can gather at `bandwidth` hidden behind `t_non_moe` seconds
    (CostModel.overlap_degree; the runtime calls this per step without building a model)."""
    return int(np.floor(t_non_moe * bandwidth / chunk_bytes))


@dataclass(frozen=True)
class CostModel:
    """Bandwidths in bytes/s, times in seconds, sizes in bytes."""

    intra_node_bw: float
    inter_node_bw: float
    chunk_bytes: int
    t_non_moe: float
    token_compute_s: float
    token_bytes: int

    def __post_init__(self):
        for name in ("intra_node_bw", "inter_node_bw", "chunk_bytes"):
            value = getattr(self, name)
            if not value > 0:
                raise ValueError(f"CostModel.{name} must be > 0, got {value}")
        for name in ("t_non_moe", "token_compute_s", "token_bytes"):
            value = getattr(self, name)
            if not value >= 0:
                raise ValueError(f"CostModel.{name} must be >= 0, got {value}")

    # ---- overlap degree -------------------------------------------------
    def overlap_degree(self, multi_node: bool) -> int:
        """t: chunks one rank can gather hidden behind T_non_moe."""
        return overlap_degree(self.t_non_moe, self.inter_node_bw if multi_node else self.intra_node_bw,
                              self.chunk_bytes)

    # ---- per-rank components (numpy, W = world size) --------------------
    def _bw_WW(self, node_of_W: np.ndarray) -> np.ndarray:
        same = node_of_W[:, None] == node_of_W[None, :]
        return np.where(same, self.intra_node_bw, self.inter_node_bw)

    def compute_time_W(self, routes) -> np.ndarray:
        """Expert compute per rank: tokens it serves times token_compute_s.

        `routes`: a TokenRoutes (O(W*E + replicas)) or dense routes [W_src, E, W_dst]."""
        if isinstance(routes, TokenRoutes):
            served = routes.rank_loads()["served"]
        else:
            served = np.asarray(routes).sum(axis=(0, 1))
        return served.astype(np.float64) * self.token_compute_s

    def all_to_all_time_W(self, routes, node_of_W: np.ndarray) -> np.ndarray:
        """Dispatch + combine time per rank (tokens that leave or reach it)."""
        if isinstance(routes, TokenRoutes):
            loads = routes.rank_loads()
            intra, inter = self.token_bytes / self.intra_node_bw, self.token_bytes / self.inter_node_bw
            send_W = loads["send_intra"] * intra + loads["send_inter"] * inter
            recv_W = loads["recv_intra"] * intra + loads["recv_inter"] * inter
            return 2.0 * np.maximum(send_W, recv_W)
        tokens_WW = np.asarray(routes).sum(axis=1).astype(np.float64)  # [src, dst]
        np.fill_diagonal(tokens_WW, 0.0)
        seconds_WW = tokens_WW * self.token_bytes / self._bw_WW(node_of_W)
        send_W = seconds_WW.sum(axis=1)
        recv_W = seconds_WW.sum(axis=0)
        return 2.0 * np.maximum(send_W, recv_W)

    def gather_time_W(self, new_WE: np.ndarray, owner_E: np.ndarray,
                      node_of_W: np.ndarray) -> np.ndarray:
        """Receive time per rank of the chunks marked in new_WE (bool [W, E]); O(W*E)."""
        same_WE = node_of_W[:, None] == node_of_W[owner_E][None, :]  # owner's node == rank's node
        per_chunk = np.where(same_WE, self.chunk_bytes / self.intra_node_bw,
                             self.chunk_bytes / self.inter_node_bw)
        return (new_WE * per_chunk).sum(axis=1)

    # ---- whole plan ------------------------------------------------------
    def plan_time(self, holders_WE, owner_E: np.ndarray, routes,
                  node_of_W: np.ndarray, *, hidden_s: float | None = None,
                  gathered_WE=None) -> float:
        """Estimated layer time of a plan (seconds); accepts numpy arrays or CPU tensors.

        `routes` is a TokenRoutes (`Plan.routes`; O(W*E + replicas)) or dense int64 routes
        [W_src, E, W_dst] (O(W^2 E)). `gathered_WE` marks the chunks whose gather is charged
        (default: every held chunk that the rank does not own); `hidden_s` is how much of the
        gather overlaps other compute (default T_non_moe).
        """
        holders_WE = np.asarray(holders_WE, dtype=np.bool_)
        owner_E = np.asarray(owner_E, dtype=np.int64)
        if not isinstance(routes, TokenRoutes):
            routes = np.asarray(routes, dtype=np.int64)
        node_of_W = np.asarray(node_of_W, dtype=np.int64)
        if hidden_s is None:
            hidden_s = self.t_non_moe
        if gathered_WE is None:
            gathered_WE = holders_WE.copy()
            gathered_WE[owner_E, np.arange(len(owner_E))] = False
        gathered_WE = np.asarray(gathered_WE, dtype=np.bool_)
        exposed = np.maximum(self.gather_time_W(gathered_WE, owner_E, node_of_W) - hidden_s, 0.0)
        total = (self.compute_time_W(routes)
                 + self.all_to_all_time_W(routes, node_of_W) + exposed)
        return float(total.max())
