"""The options of the fssdp strategy: the one list of them.

The config (`parallel.fssdp` in hecate/train/config.py) parses YAML into this
dataclass, `FullyShardedSparse` takes it, and checkpoint manifests record it
(`dataclasses.asdict`). docs/fssdp.md documents exactly these fields; a test
checks that every documented key parses and reaches the strategy.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

POLICIES = ("hecate", "shadowing", "none")


@dataclass
class FssdpOptions:
    """Options of the fssdp strategy (config keys under `parallel.fssdp`).

    policy: "hecate" (Algorithm 1), "shadowing" (FasterMoE-style, current batch) or "none".
    window: iterations in the load predictor's sliding window (paper: 5).
    memory_slots: m, chunks a rank may materialize beyond those it owns (None: 2 * ceil(E / W)).
    overlap_degree: t; None derives it from the measured non-MoE time and the bandwidth.
    bandwidth: (intra_node, inter_node) bytes/s for the cost model; None picks a default
        for the backend (FullyShardedSparse.DEFAULT_BANDWIDTH).
    token_compute_s: the cost model's seconds of expert compute per routed token.
    collective_latency_s: fixed seconds one collective costs beyond its bytes (latency, launch);
        the byte fit keeps a layer's replicas only if they save more than the collectives they
        add (spAG, spRS, the re-gather) cost this way: a replica is made only when it pays for
        itself. None (default): the backend's default
        (FullyShardedSparse.DEFAULT_COLLECTIVE_LATENCY), which trades bytes for fewer
        collectives where links are latency-bound; 0: any byte saving pays, so traffic tracks
        the byte lower bound (what the byte-plan tests and benchmarks' fssdp_bytes row pin).
    rematerialize: free materialized chunks after forward and gather them again in backward.
    reshard_interval: iterations between heterogeneous re-shardings (0 = never; paper: 100).
    calibrate: Algorithm 1's optional calibration on the current batch's routing.
    fit_replicas: keep a replica only where it moves fewer bytes than the tokens it saves.
    prefetch: issue layer l+1's spAG at the end of layer l's forward (policy hecate only,
        without calibration).
    overlap_reduce: issue each layer's spRS asynchronously (completed by the end of backward).
    overlap_counts: all-gather each layer's counts asynchronously and plan what does not need
        them (the next layer's prefetch and state digest, the early P1) while they travel.
        None (default): when they travel on a device (NCCL), not on the host (gloo), where
        gloo's threads that move them compete with the rank's own thread for the cores.
    overlap_dense_gather: the Engine's ZeRO-1 step (parallel.dense_optimizer sharded) steps the
        dense shard first, issues the all-gather of the dense shards asynchronously, steps the
        expert rows while it travels and waits for it before Engine.step returns. None
        (default): on a device backend (NCCL) yes, on the host (gloo) no, as overlap_counts.
    balance_compute: even out the expert rows ranks compute within a node (routes.balance_routes).
    """

    policy: str = "hecate"
    window: int = 5
    memory_slots: Optional[int] = None
    overlap_degree: Optional[int] = None
    bandwidth: Optional[tuple] = None
    token_compute_s: float = 1e-7
    collective_latency_s: Optional[float] = None
    rematerialize: bool = True
    reshard_interval: int = 100
    calibrate: bool = False
    fit_replicas: bool = True
    prefetch: bool = True
    overlap_reduce: bool = True
    overlap_counts: Optional[bool] = None
    overlap_dense_gather: Optional[bool] = None
    balance_compute: bool = False

    def __post_init__(self) -> None:
        if self.bandwidth is not None:
            self.bandwidth = tuple(float(b) for b in self.bandwidth)
        self.validate()

    def validate(self) -> "FssdpOptions":
        """Raise ValueError naming the config key of the first bad option."""
        key = "parallel.fssdp."
        if self.policy not in POLICIES:
            raise ValueError(f"{key}policy={self.policy!r} must be one of {POLICIES}")
        if self.window < 1:
            raise ValueError(f"{key}window must be >= 1, got {self.window}")
        if self.memory_slots is not None and self.memory_slots < 1:
            raise ValueError(f"{key}memory_slots must be >= 1 or null, got {self.memory_slots}")
        if self.overlap_degree is not None and self.overlap_degree < 0:
            raise ValueError(f"{key}overlap_degree must be >= 0 or null, got {self.overlap_degree}")
        if self.reshard_interval < 0:
            raise ValueError(f"{key}reshard_interval must be >= 0, got {self.reshard_interval}")
        if self.bandwidth is not None and (len(self.bandwidth) != 2 or min(self.bandwidth) <= 0):
            raise ValueError(f"{key}bandwidth must be [intra_node, inter_node] bytes/s, both > 0, "
                             f"or null for the backend's default; got {list(self.bandwidth)}")
        if self.collective_latency_s is not None and not self.collective_latency_s >= 0:
            raise ValueError(f"{key}collective_latency_s must be >= 0 seconds or null for the backend's "
                             f"default, got {self.collective_latency_s}")
        if not self.token_compute_s > 0:
            raise ValueError(f"{key}token_compute_s must be > 0 seconds per token, got {self.token_compute_s}")
        return self

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    def replace(self, **changes) -> "FssdpOptions":
        """A copy with `changes`; an unknown name is a ValueError listing the valid ones."""
        unknown = sorted(set(changes) - set(self.names()))
        if unknown:
            raise ValueError(f"unknown fssdp option(s) {unknown}; valid: {list(self.names())}")
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        """JSON-ready (the checkpoint manifest's record of the run's options)."""
        d = dataclasses.asdict(self)
        if d["bandwidth"] is not None:
            d["bandwidth"] = list(d["bandwidth"])
        return d
