"""The per-layer, per-iteration plan: P0, P1, token routes and split sizes.

A plan is a pure function of all-gathered inputs, so every rank computes the
same one; `digest()` hashes its placement tensors so the runtime can
all-gather the digests and fail loudly (naming the ranks) on a disagreement
instead of hanging in a collective with mismatched splits.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import torch

from hecate.parallel.fssdp.materialize import MaterializationPolicy
from hecate.parallel.fssdp.routes import HoldersShape, RankLayout, TokenRoutes, rank_splits, route_tokens

_DIGEST_TAG = b"hecate-fssdp-plan-v2"


@dataclass(frozen=True)
class Plan(HoldersShape):
    """owner_E int64 [E] (P0), holders_WE bool [W, E] (P1), routes (TokenRoutes, sparse).

    Every method costs O(W*E + replicas) except the dense views `routes_WEW` (O(W^2 E))
    and `tokens_WW` (O(W^2)), which are meant for tests and small worlds.
    """

    owner_E: torch.Tensor
    holders_WE: torch.Tensor
    routes: TokenRoutes

    def __post_init__(self):
        if not isinstance(self.routes, TokenRoutes):
            raise TypeError(f"Plan.routes must be a TokenRoutes (routes.route_tokens), got "
                            f"{type(self.routes).__name__}")

    @property
    def num_replicas(self) -> int:
        """Holders beyond the owners (0: P1 = P0, no spAG), from the routes' holder index
        rather than a pass over [W, E]."""
        return self.routes.num_holders - self.num_experts

    @property
    def gather_WE(self) -> torch.Tensor:
        """bool [W, E]: chunks each rank must receive by spAG (held, not owned)."""
        gather = self.holders_WE.clone()
        gather[self.owner_E, torch.arange(self.num_experts)] = False
        return gather

    @property
    def routes_WEW(self) -> torch.Tensor:
        """Dense int64 [W_src, E, W_dst] routes; O(W^2 E), for tests and small worlds."""
        return torch.from_numpy(self.routes.dense())

    @property
    def tokens_WW(self) -> torch.Tensor:
        """int64 [W_src, W_dst]: all-to-all split sizes of every rank (row = its send splits); O(W^2)."""
        return torch.from_numpy(self.routes.tokens_WW())

    def send_splits(self, rank: int) -> list[int]:
        """Tokens `rank` sends to each rank in the dispatch all-to-all."""
        return self.rank_splits(rank)[0].sum(dim=1).tolist()

    def recv_splits(self, rank: int) -> list[int]:
        """Tokens `rank` receives from each rank in the dispatch all-to-all."""
        return self.rank_splits(rank)[1].sum(dim=1).tolist()

    def rank_splits(self, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(send_WE, recv_WE) of `rank`, per peer and expert; see routes.rank_splits."""
        return rank_splits(self.routes, rank)

    def rank_layout(self, rank: int) -> RankLayout:
        """`rank`'s sends (sparse, by expert then destination), receives [W, E] and per-peer
        splits; O(E + replicas + W * experts it holds). What the runtime uses each step."""
        if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)) \
                or not 0 <= rank < self.world_size:
            raise ValueError(f"rank must be an int in [0, {self.world_size}), got {rank!r}")
        return self.routes.layout(int(rank))

    def rank_loads(self) -> dict[str, np.ndarray]:
        """Per-rank served rows and off-rank tokens (TokenRoutes.rank_loads)."""
        return self.routes.rank_loads()

    def digest(self) -> str:
        """Stable sha256 hex of (owner, holders, the routes' inputs and moves): equal plans give
        equal digests anywhere. Routes are a pure function of holders, counts, nodes and moves."""
        h = hashlib.sha256(_DIGEST_TAG)
        arrays = (self.owner_E.detach().cpu().numpy(), self.holders_WE.detach().cpu().numpy(),
                  *self.routes.digest_arrays()[1:])
        for arr in arrays:
            arr = np.ascontiguousarray(arr, dtype="<i8")
            h.update(np.asarray(arr.shape, dtype="<i8").tobytes())
            h.update(arr.tobytes())
        return h.hexdigest()

    def digest_words(self) -> torch.Tensor:
        """The digest as int64 [4], ready for an all_gather to compare plans across ranks."""
        raw = bytes.fromhex(self.digest())
        return torch.from_numpy(np.frombuffer(raw, dtype="<i8").astype(np.int64))


def build_plan(policy: MaterializationPolicy, predicted_load_E, owner_E, counts_WE, node_of_W,
               capacity_m: int) -> Plan:
    """Plan one layer's iteration: P1 from `policy`, then routes for the batch's counts_WE."""
    if not isinstance(policy, MaterializationPolicy):
        raise TypeError(f"policy must be a MaterializationPolicy, got {type(policy).__name__}")
    holders = policy.plan(predicted_load_E, owner_E, node_of_W, capacity_m, counts_WE=counts_WE)
    routes = route_tokens(holders, counts_WE, node_of_W)
    owner = torch.as_tensor(owner_E, dtype=torch.int64).clone()
    return Plan(owner_E=owner, holders_WE=holders, routes=routes)
