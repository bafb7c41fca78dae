"""`fssdp`: fully sharded sparse data parallelism (the Hecate paper).

Each MoE layer's experts are chunks (one flat row per expert) with exactly one
owner rank (P0), which keeps the fp32 master row, its gradient and its
optimizer state; nobody else keeps any of it. Every iteration:

1. the router's counts are all-gathered (one small message that also carries
   each rank's measured non-MoE time and a digest of its placement state);
2. every rank computes the same plan: P1 from the policy (Algorithm 1 by
   default) on the predicted load, token routes among replicas for this
   batch's counts (local first, then same node, then across nodes);
3. one autograd node (expert_exchange.FssdpExperts) gathers the planned
   chunks (spAG), dispatches, runs the experts, combines, and in backward
   re-materializes, reverses the exchanges and reduces the chunk gradients
   into their owners (spRS);
4. every `reshard_interval` iterations the owners are re-placed from the
   observed load (Algorithm 2), moving parameters and optimizer state together.
"""
from __future__ import annotations

import dataclasses
import hashlib
import math
import struct
import time
from collections import deque
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from hecate import ops
from hecate.comm.agreement import AgreementError
from hecate.comm.all_to_all import all_gather_flat, comm_device, group_ranks
from hecate.comm.sparse import plan_sparse, sparse_all_gather
from hecate.moe.experts import autocast_dtype
from hecate.parallel.chunks import ChunkLayout, mark_expert, take_expert_parameters
from hecate.parallel.fssdp.clock import DeviceTimings, Interval, timed
from hecate.parallel.fssdp.cost import CostModel, overlap_degree
from hecate.parallel.fssdp.expert_exchange import ExchangeSpec, fssdp_experts
from hecate.parallel.fssdp.overlap import PendingGather, ReduceQueue
from hecate.parallel.fssdp.load import LoadPredictor
from hecate.parallel.fssdp.materialize import (
    HecatePolicy,
    NoReplicationPolicy,
    ShadowingPolicy,
    fit_bound,
    fit_holders,
    fit_keeps_none,
)
from hecate.parallel.fssdp.options import FssdpOptions
from hecate.parallel.fssdp.plan import Plan
from hecate.parallel.fssdp.planner import ReplicaFit, history_buffer, plan_layer
from hecate.parallel.fssdp.routes import balance_routes
from hecate.parallel.fssdp.sharding import even_sharding, heterogeneous_sharding
from hecate.parallel.strategy import ExpertStrategy

# Default link speeds (bytes/s) when the user gives none: NVLink / 100 Gbps IB for NCCL,
# loopback TCP for gloo. They only set the overlap degree t of Algorithm 1.
DEFAULT_BANDWIDTH = {"nccl": (150e9, 12.5e9), "gloo": (2e9, 1e9)}
# Default fixed cost of one collective beyond its bytes (seconds): what a layer's replicas must
# repay, per collective they add, before the byte fit keeps them. gloo: a small all-to-all took
# 0.3-0.5 ms between 2 ranks on the shared 2-core CPU box; NCCL: launch + latency.
DEFAULT_COLLECTIVE_LATENCY = {"nccl": 2e-5, "gloo": 2.5e-4}
_DIGEST_WORDS = 4
_CPU = torch.device("cpu")
_AGREE = []  # torch.ops.hecate.agree_counts.default, looked up once


def _agree_op():
    if not _AGREE:
        _AGREE.append(torch.ops.hecate.agree_counts.default)
    return _AGREE[0]


@dataclass
class LayerState:
    owner_E: torch.Tensor
    predictor: LoadPredictor
    non_moe_us: int = 0
    last_plan: object = None
    last_sparse: object = None  # last_plan's SparsePlan on this rank (host tensors), None without replicas
    observed_E: torch.Tensor = field(default=None)
    rank_history: deque = field(default_factory=deque)  # recent counts_WE, for prefetch pruning
    prefetched: object = None  # PendingGather issued for this layer's next forward
    non_moe_agreed_s: float = 0.0  # max over ranks of the measured non-MoE time (agreed)
    # Per rank_history entry (same order, same window): _fit_bound's (largest cell, the bytes a
    # fit to it could save at most, owners, prices), what _prefetch_plan bounds its fit with; and
    # whether the last plan's counts could keep no replica (the early P1 is then skipped).
    history_fit: deque = None
    fit_kept_none: bool = False
    # _owner_cache: (owner_E, its version, sha256 of its bytes, P0 [W, E], not-P0 flat 0/1, the
    # owned ids, slot_of_E without replicas)
    owner_cache: tuple = None
    digest: tuple = None  # (prediction, its version, owner_cache, digest words): _state_digest's cache
    agree_buffers: tuple = None  # (message array, it as a tensor, gathered table): reused each step
    # Measured non-MoE gaps before this layer not yet read (CUDA events complete later).
    gaps: deque = field(default_factory=lambda: deque(maxlen=4))


def _host_bytes(t: torch.Tensor) -> np.ndarray:
    """A tensor's bytes as a host array to hash (a view when it is a contiguous CPU tensor)."""
    t = t.detach()
    return (t if t.device.type == "cpu" and t.is_contiguous() else t.cpu().contiguous()).numpy()


def _window_mean(history) -> torch.Tensor:
    """torch.stack(list(history)).mean(0) of rank_history's float64 [W, E] entries, bit for bit,
    without the [K, W, E] stack (K x W x E copied at every prefetch plan): the entries hold
    integer counts, so their sum is exact in any order, and torch's CPU mean divides that sum
    by K (tests/test_fssdp_fit_shortcut.py checks both)."""
    entries = iter(history)
    total = next(entries).numpy().copy()
    for entry in entries:
        total += entry.numpy()
    total /= len(history)
    return torch.from_numpy(total)


def _digest_words(*tensors: torch.Tensor) -> tuple[int, ...]:
    """The first _DIGEST_WORDS int64 words of the sha256 of the tensors' bytes (host ints: they
    go into the counts message with the non-MoE time as one small tensor, no tensor round trip).
    FullyShardedSparse._state_digest computes the same words with the owners' part cached."""
    h = hashlib.sha256()
    for t in tensors:
        h.update(_host_bytes(t))
    return struct.unpack(f"<{_DIGEST_WORDS}q", h.digest()[:8 * _DIGEST_WORDS])


def device_plan(owner_E: torch.Tensor, holders_WE: torch.Tensor, rank: int, device: torch.device,
                planned=None):
    """plan_sparse with its row maps moved to the chunks' device once (pinned, non-blocking),
    instead of by every gather, re-gather and reduce that uses them. The chunk ids stay on
    the host (the expert slots are laid out there). `planned`: plan_sparse's result for these
    owners and holders when the caller has it already (plan_layer(sparse=True) makes it)."""
    sparse = planned if planned is not None else plan_sparse(owner_E, holders_WE, rank)
    return dataclasses.replace(sparse, **{k: ops.to_device(getattr(sparse, k), device)
                                          for k in ("send_rows", "recv_rows", "owned_rows_M")})


def kept_rows(new_owner_E: torch.Tensor, held_ids: torch.Tensor, rank: int) -> torch.Tensor:
    """Mask over the held rows: which of them `rank` owns under the new placement.

    The placement lives on the host, the held ids where the rows are (a GPU): index on
    the ids' device, as indexing a CPU tensor with CUDA indices raises.
    """
    return new_owner_E.to(held_ids.device)[held_ids] == rank


def _host_bins(indices_TK: torch.Tensor, E: int, layout, cell_bin: np.ndarray) -> np.ndarray:
    """FullyShardedSparse._destination_bins on the host (numpy): int64 bins shaped like indices_TK.

    Most experts send all of this rank's entries to one destination (kept, or sent to
    their owner): their bin is a lookup. The entries of the few experts split over several
    destinations are sorted by a compact key (stable: token order within an expert) and
    fill the shares one after another, which is exactly what a stable sort of every entry
    would give. Invalid entries (index < 0, dropped) get -1.
    """
    flat = indices_TK.detach().reshape(-1).cpu().numpy()
    tokens = layout.send_tokens
    routed = int(tokens.sum())
    lowest = int(flat.min()) if flat.size else 0
    if lowest < -1:  # -1 (dropped) indexes the lookup's last cell, -1; anything lower is remapped
        flat = np.where(flat < 0, -1, flat)
    n_valid = flat.size - int(np.count_nonzero(flat < 0)) if lowest < 0 else flat.size
    if routed != n_valid:
        raise RuntimeError(f"fssdp destination bins: the plan routes {routed} entries of "
                           f"rank {layout.rank} but it has {n_valid}; the all-gathered "
                           "counts disagree with the local routing")
    cells = np.bincount(layout.send_e, minlength=E)  # destinations per expert
    single = cells[layout.send_e] == 1
    split_e = np.flatnonzero(cells > 1)
    # One lookup per entry: its bin if its expert has one destination, -2 - s for the s-th
    # split expert, -1 (lookup[-1] = lookup[E]) for dropped entries.
    lookup = np.full(E + 1, -1, dtype=np.int64)
    lookup[layout.send_e[single]] = cell_bin[single]
    lookup[split_e] = -2 - np.arange(split_e.size)
    bins = lookup[flat]
    if split_e.size:
        where = np.flatnonzero(bins < -1)
        key = (-2 - bins[where]).astype(np.uint8 if split_e.size <= 256 else np.int32)
        where = where[np.argsort(key, kind="stable")]
        shares = ~single
        if where.size != int(tokens[shares].sum()):
            raise RuntimeError(f"fssdp destination bins: rank {layout.rank} has {where.size} entries "
                               f"of the experts its plan splits over several ranks, but the plan "
                               f"routes {int(tokens[shares].sum())}; the all-gathered counts "
                               "disagree with the local routing")
        bins[where] = np.repeat(cell_bin[shares], tokens[shares])
    return bins.reshape(indices_TK.shape)


class FullyShardedSparse(ExpertStrategy):
    """The fssdp strategy. Its options are one `FssdpOptions` (hecate/parallel/fssdp/options.py,
    config keys under `parallel.fssdp`); keyword overrides of its fields are accepted too.

    fit_replicas: fit P1 to bytes. The plan is made after this batch's counts are
        all-gathered, so a replica the policy proposes on rank d for expert e is kept only
        when moving d's tokens of e would cost more bytes than moving the chunk (tokens
        cross 4 times: dispatch, combine and their backward; the chunk 2 times, 3 with
        re-materialization), and the slots left free (m per rank) go to the replicas that
        save the most bytes. m is a limit, not a quota.
    prefetch: at the end of MoE layer l's forward, issue layer l+1's spAG asynchronously
        so it overlaps the attention of block l+1. Its P1 must be fixed before layer l+1's
        routing is known, so it is planned on predicted load (and fitted with each rank's
        predicted tokens); the routes still use the real counts. Not used with the
        current-batch policies (shadowing, calibration), which need the real counts.
    balance_compute: after the local-first routes, shift tokens of replicated experts from
        the rank with the most expert rows to less loaded replicas on its node, until the
        ranks' rows differ by at most 2% (routes.balance_routes). The slowest rank sets the
        pace of every token exchange; the price is the token bytes of the rows that move
        (off by default: in benchmarks/strategies.py it bought ~5% step time for 8% more
        expert bytes, see docs/results.md; worth it where links are fast against compute).

    Process groups come from the topology: token all-to-alls and the counts all-gather on
    `topology.world_group`, weight gathers (spAG, prefetch, re-gather, re-shard) and
    gradient reduces (spRS) on `topology.weight_group`, a second communicator over the
    same ranks so that weight traffic does not queue behind (or in front of) tokens.
    """

    name = "fssdp"
    DEFAULT_BANDWIDTH = DEFAULT_BANDWIDTH
    DEFAULT_COLLECTIVE_LATENCY = DEFAULT_COLLECTIVE_LATENCY

    def __init__(self, topology, options: FssdpOptions | None = None, **overrides):
        if options is not None and not isinstance(options, FssdpOptions):
            raise TypeError(f"options must be a FssdpOptions (hecate.parallel.fssdp.options), "
                            f"got {type(options).__name__}")
        base = options if options is not None else FssdpOptions()
        self.options = (base.replace(**overrides) if overrides else base).validate()
        o = self.options
        self.topology = topology
        # The planner reads these attributes; they are the options, not a second list of them.
        self.policy_name, self.window, self.memory_slots = o.policy, o.window, o.memory_slots
        self.overlap_degree, self.rematerialize = o.overlap_degree, o.rematerialize
        self.reshard_interval, self.calibrate = o.reshard_interval, o.calibrate
        self.token_compute_s = o.token_compute_s
        backend = str(dist.get_backend(topology.world_group)) if dist.is_initialized() else "gloo"
        self.bandwidth = o.bandwidth if o.bandwidth is not None else DEFAULT_BANDWIDTH.get(
            backend, DEFAULT_BANDWIDTH["gloo"])
        self.collective_latency_s = o.collective_latency_s if o.collective_latency_s is not None else \
            DEFAULT_COLLECTIVE_LATENCY.get(backend, DEFAULT_COLLECTIVE_LATENCY["gloo"])
        self.node_of_W = torch.tensor([topology.node_of(r) for r in range(topology.world_size)])
        # What HecatePolicy.overlap_degree reads off the node map (fixed): whether it spans nodes.
        self._spans_nodes = bool((self.node_of_W != self.node_of_W[0]).any())
        # Tokens (all-to-alls, counts) on the topology's group; weights (spAG, prefetch,
        # re-gather, re-shard) and gradient reduces (spRS) on a second group over the same
        # ranks, created here, at the same point on every rank (a collective).
        self.token_group = topology.world_group
        self.weight_group = topology.weight_group()
        self.iteration = 0
        self.reshards = 0
        self._last_exit = None
        self._chunks_attached = 0
        self.overlap_reduce, self.fit_replicas = o.overlap_reduce, o.fit_replicas
        self.overlap_counts = o.overlap_counts
        self.overlap_dense_gather = o.overlap_dense_gather  # read by the Engine (its ZeRO-1 gather)
        self.balance_compute = o.balance_compute
        self.prefetch = o.prefetch and o.policy == "hecate" and not o.calibrate
        self._layers: list = []
        self._last_spec = None
        self._pending = ReduceQueue(self._complete_reduce)
        self._staged_prefetch = None  # (next layer, its prefetch plan) made during plan()
        self._wire = None  # replicas' dtype on the wire in the current forward (None: fp32 rows)
        self._token_bytes = None  # bytes of one token row on the wire in the current forward
        # Seconds spent blocked in spRS: exposed_reduce_s with overlap (waits in
        # finish_backward), blocking_reduce_s without it. benchmarks/overlap.py compares them.
        # On a GPU these are CUDA-event intervals added once complete (clock.DeviceTimings).
        self.timings = DeviceTimings({"blocking_reduce_s": 0.0, "exposed_reduce_s": 0.0,
                                      "exposed_gather_s": 0.0})
        self._gap = None  # Interval from the previous MoE layer's exit (the non-MoE compute)
        self._token_comm = None  # (comm_device, group_ranks) of token_group, on first use
        self._fits = {}  # (ChunkLayout, token bytes, wire itemsize, ...) -> ReplicaFit (_replica_fit)

    # ---- sharding -----------------------------------------------------------------------------
    def attach(self, layer) -> None:
        W, rank = self.topology.world_size, self.topology.rank
        layout = ChunkLayout.of(layer.experts)
        chunks_ES = layout.flatten(take_expert_parameters(layer)).float()
        # Rotate each layer's even sharding by the chunks placed so far, so the remainders
        # of all layers spread round-robin: every rank owns the world's mean within one chunk.
        owner_E = (even_sharding(layout.num_experts, W) + self._chunks_attached) % W
        self._chunks_attached += layout.num_experts
        layer.expert_layout = layout
        layer.expert_chunks = mark_expert(nn.Parameter(chunks_ES[owner_E == rank].clone()))
        layer.fssdp_state = LayerState(owner_E, LoadPredictor(layout.num_experts, self.window),
                                       rank_history=deque(maxlen=self.window))

    def after_attach(self, layers) -> None:
        self._layers = list(layers)  # module order = forward order, the prefetch chain

    def expert_parameters(self, layer):
        return [layer.expert_chunks]

    def capacity_m(self, num_experts: int) -> int:
        if self.memory_slots is not None:
            return self.memory_slots
        # Twice the owned share: with byte-aware pruning unused slots cost nothing, and with
        # re-materialization only one layer's replicas are alive at a time.
        return 2 * math.ceil(num_experts / self.topology.world_size)

    # ---- planning ---------------------------------------------------------------------------
    def _policy(self, layout: ChunkLayout, non_moe_s: float, multi_node: bool):
        if self.policy_name == "none":
            return NoReplicationPolicy()
        intra, inter = self.bandwidth
        cost = CostModel(intra_node_bw=intra, inter_node_bw=inter,
                         chunk_bytes=layout.chunk_numel * self._wire_itemsize(), t_non_moe=non_moe_s,
                         token_compute_s=self.token_compute_s, token_bytes=self._token_bytes)
        if self.policy_name == "shadowing":
            return ShadowingPolicy(cost)
        if self.overlap_degree is not None:
            return HecatePolicy(cost if self.calibrate else None, overlap_degree=self.overlap_degree,
                                calibrate=self.calibrate)
        return HecatePolicy(cost, calibrate=self.calibrate)

    def _lean_p1(self) -> bool:
        """Whether P1 is Algorithm 1 on the predicted load alone (the default policy): then it
        is placed from t without building a CostModel and a HecatePolicy per call (three per
        layer and step: the early P1, the plan, the next layer's prefetch)."""
        return self.policy_name == "hecate" and not self.calibrate

    def _p1_degree(self, layout: ChunkLayout, non_moe_s: float) -> int:
        """t of Algorithm 1: what `_policy(layout, non_moe_s, ...).overlap_degree(node_of_W)`
        returns, without the objects (the same formula, cost.overlap_degree)."""
        if self.overlap_degree is not None:
            return self.overlap_degree
        bw = self.bandwidth[1] if self._spans_nodes else self.bandwidth[0]
        return overlap_degree(non_moe_s, bw, layout.chunk_numel * self._wire_itemsize())

    def _place_p1(self, layer, t: int) -> torch.Tensor:
        """Algorithm 1 on the layer's predicted load with overlap degree t: the holders
        HecatePolicy.plan returns (it calls HecatePolicy.place on the same arrays; the load
        is the predictor's, checked as it was recorded, the owners checked at attach and
        re-shard)."""
        state = layer.fssdp_state
        m = self.capacity_m(layer.expert_layout.num_experts)
        # place() runs the place_experts op when hecate._C is built (no copies: the dtypes match).
        return torch.from_numpy(HecatePolicy.place(
            state.predictor.predict().numpy(), state.owner_E.numpy(), self.node_of_W.numpy(), m, t))

    def _owner_cache(self, state):
        """(sha256 of owner_E's bytes, P0 as holders bool [W, E], the cells P0 lacks as a flat
        float64 0/1 array: a replica's possible places, the expert ids this rank owns ascending,
        slot_of_E without replicas: owned expert -> its slot, 0 elsewhere), kept until the owners
        change (re-shard replaces owner_E; an in-place write bumps its version). Read-only: the
        hash is copied before use, P0 only goes into plan_layer with a fit, which returns a new
        tensor, and ExchangeSpec only reads the slots."""
        owner_E = state.owner_E
        cached = state.owner_cache
        if cached is None or cached[0] is not owner_E or cached[1] != owner_E._version:
            h = hashlib.sha256()
            h.update(_host_bytes(owner_E))
            E = owner_E.numel()
            p0 = torch.zeros(self.topology.world_size, E, dtype=torch.bool)
            p0[owner_E.cpu(), torch.arange(E)] = True
            owned = (owner_E == self.topology.rank).nonzero().flatten()
            slot_of_E = torch.zeros(E, dtype=torch.int64)
            slot_of_E[owned] = torch.arange(owned.numel())
            cached = state.owner_cache = (owner_E, owner_E._version, h, p0,
                                          (~p0).to(torch.float64).reshape(-1).numpy(), owned, slot_of_E)
        return cached[2:]

    def _state_digest(self, state) -> np.ndarray:
        """_digest_words(owner_E, predicted load) as int64 [_DIGEST_WORDS] (the same words): the
        owners' part of the hash is kept until they change, and the words until the prediction
        changes (the predictor makes a new tensor at each update; an in-place write bumps its
        version), so the plan before can compute them while its counts travel (plan)."""
        prediction = state.predictor.predict()
        self._owner_cache(state)
        owners, cached = state.owner_cache, state.digest
        if cached is not None and cached[0] is prediction and cached[1] == prediction._version \
                and cached[2] is owners:
            return cached[3]
        h = owners[2].copy()
        h.update(prediction.numpy())  # the predictor's own CPU float64 tensor: its bytes as they are
        words = np.frombuffer(h.digest(), dtype="<i8", count=_DIGEST_WORDS)
        state.digest = (prediction, prediction._version, owners, words)
        return words

    def _following(self, layer):
        """The MoE layer whose plan comes after this one's: the next in forward order, or the
        first (next step's) after the last; None when the layers carry no ids."""
        i = getattr(layer, "layer_id", None)
        if i is None or not self._layers or i >= len(self._layers) or self._layers[i] is not layer:
            return None
        return self._layers[(i + 1) % len(self._layers)]

    def _agree_on_counts(self, layer, counts_E: torch.Tensor, meanwhile=None, fit: ReplicaFit | None = None):
        """All-gather [counts | non-MoE time | state digest]; fail loudly if the state digests differ.

        With `overlap_counts` (by default on a device backend) the all-gather is issued
        asynchronously and `meanwhile()` (if given) runs while it is in flight, off the critical
        path; otherwise `meanwhile()` runs first and the all-gather after it.
        Returns (counts_WE, agreed non-MoE us, what meanwhile returned, `_fit_bound(fit, counts)`
        when `fit` is given, else None)."""
        state = layer.fssdp_state
        words = self._state_digest(state)
        if self._token_comm is None:  # the group's fixed facts, looked up once (not per layer and step)
            self._token_comm = (comm_device(self.token_group), group_ranks(self.token_group))
        dev, peers = self._token_comm
        E, W = counts_E.numel(), self.topology.world_size
        M = E + 1 + _DIGEST_WORDS
        if dev.type == "cpu" and not ops._device_path(counts_E.device):
            # Counts on the host: one host array, no small tensor ops (cast, cat):
            # [counts | non-MoE us | digest], in buffers kept from the last step (the table is
            # read and its counts copied out before this returns).
            buffers = state.agree_buffers
            if buffers is None or buffers[2].numel() != W * M:
                message = np.empty(M, dtype=np.int64)
                buffers = state.agree_buffers = (message, torch.from_numpy(message),
                                                 torch.empty(W * M, dtype=torch.int64))
            message, mine, gathered = buffers
            message[:E] = counts_E.numpy()
            message[E] = state.non_moe_us
            message[E + 1:] = words
        else:
            # Assembled where the counts are (the host parts go up): the only read back from
            # the device in this layer's step is the gathered result below.
            host = torch.tensor([state.non_moe_us, *words.tolist()], dtype=torch.int64)
            mine = torch.cat([counts_E.to(device=dev, dtype=torch.int64), ops.to_device(host, dev)])
            gathered = torch.empty(W * M, dtype=torch.int64, device=dev)
        if self.overlap_counts if self.overlap_counts is not None else dev.type != "cpu":
            work = all_gather_flat(gathered, mine, group=self.token_group, async_op=True)
            try:
                early = meanwhile() if meanwhile is not None else None
            finally:  # never leave the collective in flight, even if meanwhile raised
                work.wait()
        else:
            # On the host gloo's own threads move the message: overlapped, they and meanwhile
            # compete for the rank's cores, so meanwhile runs first (docs/fssdp.md, Overlap).
            early = meanwhile() if meanwhile is not None else None
            all_gather_flat(gathered, mine, group=self.token_group)
        if self.topology.stats is not None:
            crossing = (W - 1) * M * 8  # `mine`: M int64 words
            self.topology.stats.record("fssdp.counts", crossing, crossing, ranks=peers)
        host = gathered.cpu()  # the layer's one read back from a device (on the CPU: the same tensor)
        if ops._backend.use_extension("agree_counts", _CPU):
            # One C++ pass over the table (csrc/cpu/agree_counts.cpp): the same results as the
            # numpy below, the fit's bound and its decision included (fit_rule.h).
            counts, non_moe_us, bad, top, saving, none = _agree_op()(
                host, W, E, state.owner_E if fit is not None else None,
                fit.token_bytes if fit is not None else 0,
                fit.chunk_passes * fit.chunk_bytes if fit is not None else 0,
                fit.fixed_bytes if fit is not None else 0.0)
            if bad >= 0:
                self._disagree(layer, host.numpy().reshape(W, M)[:, E + 1:])
            # _fit_bound's tuple (owner_cache is current: _state_digest refreshed it above).
            bound = (top, saving, state.owner_cache, fit, none) if fit is not None else None
            return counts, non_moe_us, early, bound
        # The checks below on the host array: no small tensor ops.
        table = host.numpy().reshape(W, M)
        digests = table[:, E + 1:]
        if not (digests == digests[0]).all():  # one vector op, not a loop over W ranks
            self._disagree(layer, digests)
        # One contiguous copy (always a copy: the table is reused) that every planning stage
        # reads (and the routes keep) as is.
        counts = torch.from_numpy(table[:, :E].copy())
        bound = self._fit_bound(fit, counts.numpy(), state) if fit is not None else None
        return counts, int(table[:, E].max()), early, bound

    @staticmethod
    def _disagree(layer, digests: np.ndarray):
        """Raise the AgreementError naming the ranks whose state digest (rows of `digests`
        [W, words]) differs from rank 0's, and the ranks that agree with it."""
        differs = (digests != digests[0]).any(1)
        bad = np.flatnonzero(differs).tolist()
        good = np.flatnonzero(~differs).tolist()
        raise AgreementError(
            f"fssdp MoE layer {getattr(layer, 'layer_id', '?')}: ranks {bad} hold a different "
            f"placement/load state than ranks {good}; every rank must load the same checkpoint "
            "and run the same iterations", f"fssdp.layer{getattr(layer, 'layer_id', '?')}", bad, good)

    def _early_p1(self, layer):
        """A function that plans P1 from the predicted load while the counts travel, or None.

        Algorithm 1's P1 depends on the predicted load, the owners, the nodes, m and the
        overlap degree t; only t depends on the gathered message (the agreed non-MoE time).
        The early plan guesses t from the previous step's agreed time and returns (t, P1); the
        plan keeps it only if the agreed t is the same, so P1 is exactly what it would be.
        Not for policies that read the batch's counts (shadowing, calibration)."""
        state = layer.fssdp_state
        if state.prefetched is not None or self.policy_name != "hecate" or self.calibrate:
            return None
        guess_s = state.non_moe_agreed_s

        def plan_p1():
            t = self._p1_degree(layer.expert_layout, guess_s)
            return t, self._place_p1(layer, t)

        return plan_p1

    def plan(self, layer, counts_E: torch.Tensor, token_bytes: int, ahead=None):
        """This layer's Plan. `ahead`: the next MoE layer, whose prefetch (P1 from predicted
        load, fitted, and its spAG plan) is planned too while the counts travel; nothing it
        reads changes before `_issue_prefetch` issues it at the end of this forward."""
        state = layer.fssdp_state
        fit = self._replica_fit(layer.expert_layout, token_bytes) if self.fit_replicas else None
        # Skip the early P1 when the last step's counts could keep no replica (ep's path under
        # balanced routing): P1 is then likely not needed (below), and if it is, plan_layer
        # places the same one from the agreed t.
        early_p1 = None if fit is not None and state.fit_kept_none else self._early_p1(layer)
        following = self._following(layer)

        def meanwhile():
            if following is not None:  # its digest, cached until its prediction or owners change
                self._state_digest(following.fssdp_state)
            return (early_p1() if early_p1 is not None else None,
                    self._prefetch_plan(ahead, token_bytes) if ahead is not None else None)
        counts_WE, non_moe_us, both, bound = self._agree_on_counts(layer, counts_E, meanwhile, fit)
        early, staged = both if both is not None else (None, None)
        self._staged_prefetch = (ahead, staged) if ahead is not None else None
        state.non_moe_agreed_s = non_moe_us * 1e-6
        m = self.capacity_m(layer.expert_layout.num_experts)
        state.fit_kept_none = bound is not None and bound[4]
        holders = load = t = None
        if state.prefetched is not None:
            # P1 was fixed when the gather was issued; only the routes follow the real counts.
            holders = state.prefetched.holders_WE
            fit = None
        elif state.fit_kept_none:
            # The fit keeps no replica of any P1 for these counts (_fit_keeps_none): P1 need not
            # be placed; the fit of P0 gives the same P0.
            holders = state.owner_cache[3]
        elif self._lean_p1():
            t = self._p1_degree(layer.expert_layout, non_moe_us * 1e-6)
            if early is not None and early[0] == t:
                holders = early[1]  # planned while the counts travelled, with the same t
                self.timings["early_p1"] = self.timings.get("early_p1", 0) + 1
            else:
                load = state.predictor.predict()  # Algorithm 1 runs inside plan_layer
        else:
            policy = self._policy(layer.expert_layout, non_moe_us * 1e-6, self.topology.num_nodes > 1)
            holders = policy.plan(state.predictor.predict(), state.owner_E, self.node_of_W, m,
                                  counts_WE=counts_WE)
        # P1 (unless given), its byte fit, the sparse routes with this rank's layout (O(W*E +
        # replicas), never a [W, E, W] array) and the counts' totals: one call (planner.py).
        history = history_buffer(state.rank_history, counts_WE)
        # This rank's spAG / spRS plan comes out of the same call when P1 has replicas (forward
        # uses it; a prefetched layer already has the one its gather was issued with).
        laid = plan_layer(counts_WE, state.owner_E, self.node_of_W, self.topology.rank, capacity_m=m,
                          load_E=load, overlap_degree=t, holders_WE=holders, fit=fit, history_out=history,
                          sparse=state.prefetched is None)
        state.last_sparse = laid.sparse
        plan = laid.plan
        if self.balance_compute and plan.num_replicas:
            routes = balance_routes(plan.routes)
            self.timings["balanced_rows"] = self.timings.get("balanced_rows", 0) + routes.moved_tokens()
            plan = Plan(plan.owner_E, plan.holders_WE, routes)
        state.rank_history.append(history)
        if state.history_fit is None or state.history_fit.maxlen != state.rank_history.maxlen:
            state.history_fit = deque(maxlen=state.rank_history.maxlen)
        state.history_fit.append(bound)  # None without a fit: the prefetch then fits as it did
        # Every total is at most W x the largest per-rank count: the predictor can keep its sum.
        state.predictor.update_checked(laid.counts_E, None if bound is None else counts_WE.shape[0] * int(bound[0]))
        state.observed_E = laid.counts_E
        state.last_plan = plan
        return plan

    def _issue_prefetch(self, layer, token_bytes: int) -> None:
        """Start layer's spAG without waiting (collective), on the P1 that `_prefetch_plan`
        made (while the previous layer's counts travelled, when it could)."""
        staged, self._staged_prefetch = self._staged_prefetch, None
        planned = staged[1] if staged is not None and staged[0] is layer else \
            self._prefetch_plan(layer, token_bytes)
        if planned is None:
            return
        holders, sparse = planned
        layer.fssdp_state.prefetched = PendingGather(layer.expert_chunks, sparse, holders, self.weight_group,
                                                     self.topology.stats, wire_dtype=self._wire)

    def _prefetch_plan(self, layer, token_bytes: int):
        """(P1, spAG plan) of layer's prefetch: P1 from predicted load, fitted with each rank's
        predicted tokens; None when there is nothing to prefetch.

        Without history there is nothing to predict from: that layer plans on its real
        counts instead (the same decision on every rank, since histories are agreed)."""
        state = layer.fssdp_state
        if not state.rank_history:
            return None
        fits = state.history_fit
        fit = self._replica_fit(layer.expert_layout, token_bytes) if self.fit_replicas else None
        if fit is not None and fits is not None and len(fits) == len(state.rank_history) and None not in fits:
            self._owner_cache(state)  # current for the owners now
            same = all(b[2] is state.owner_cache and (b[3] is fit or b[3] == fit) for b in fits)
        else:
            same = False
        if same:
            # The predicted counts are the window's mean: each cell is at most the window's
            # largest, and (the saving being convex in the count) the bytes a fit to them saves
            # at most the mean of the entries' bounds (all under today's owners and prices).
            # When the fit keeps nothing at those bounds, the result below is None.
            most = max(b[0] for b in fits)
            if self._fit_keeps_none(fit, most, sum(b[1] for b in fits) / len(fits), state.rank_history[-1].numel()):
                return None
        E = layer.expert_layout.num_experts
        if self._lean_p1():  # always, as prefetch is on only for the hecate policy without calibration
            holders = self._place_p1(layer, self._p1_degree(layer.expert_layout, state.non_moe_agreed_s))
        else:
            policy = self._policy(layer.expert_layout, state.non_moe_agreed_s, self.topology.num_nodes > 1)
            holders = policy.plan(state.predictor.predict(), state.owner_E, self.node_of_W, self.capacity_m(E))
        if self.fit_replicas:
            predicted_WE = _window_mean(state.rank_history)
            holders = self._fit_holders(holders, state.owner_E, predicted_WE, layer.expert_layout,
                                          token_bytes)
        if int(holders.count_nonzero()) == E:
            return None  # no replica predicted: nothing to move early; plan on the real counts
        return holders, device_plan(state.owner_E, holders, self.topology.rank, layer.expert_chunks.device)

    def _fit_holders(self, holders_WE, owner_E, counts_WE, layout: ChunkLayout, token_bytes: int):
        """Fit P1 to bytes (materialize.fit_holders): drop replicas whose chunk traffic exceeds
        the token traffic they save, then spend each rank's free slots (m) on the replicas that
        save the most; keep none unless together they also repay the collectives they add."""
        f = self._replica_fit(layout, token_bytes)
        return fit_holders(holders_WE, owner_E, counts_WE, chunk_bytes=f.chunk_bytes, token_bytes=f.token_bytes,
                           chunk_passes=f.chunk_passes, capacity_m=self.capacity_m(owner_E.numel()),
                           fixed_bytes=f.fixed_bytes)

    def _replica_fit(self, layout: ChunkLayout, token_bytes: int) -> ReplicaFit:
        """The byte prices of the fit: chunks in the wire dtype (fp32, or bf16), one collective
        per pass: spAG, spRS (+ the re-gather). One object per set of prices, made once (the
        prefetch's bound compares them by identity first)."""
        key = (layout, token_bytes, self._wire_itemsize(), self.rematerialize, self.collective_latency_s,
               self.bandwidth)
        fit = self._fits.get(key)
        if fit is None:
            passes = 3 if self.rematerialize else 2
            fit = self._fits[key] = ReplicaFit(
                chunk_bytes=layout.chunk_numel * key[2], token_bytes=token_bytes, chunk_passes=passes,
                fixed_bytes=self._replica_fixed_bytes(passes))
        return fit

    def _fit_bound(self, fit: ReplicaFit, counts: np.ndarray, state) -> tuple:
        """(the largest cell of counts [W, E], the most bytes any fit of any P1 to them can save
        (materialize.fit_bound), the owner cache entry of the placement and the prices this holds
        for, whether the fit keeps no replica (_fit_keeps_none)). agree_counts returns the same
        tuple's values from the gathered table in its one pass."""
        self._owner_cache(state)
        owners = state.owner_cache  # the placement the bound holds for (the prefetch checks it)
        top, saved = fit_bound(counts, state.owner_E, token_bytes=fit.token_bytes,
                               cost=fit.chunk_passes * fit.chunk_bytes, not_owned=owners[4])
        return top, saved, owners, fit, self._fit_keeps_none(fit, top, saved, counts.size)

    @staticmethod
    def _fit_keeps_none(fit: ReplicaFit, max_count, most_saved: float, cells: int) -> bool:
        """Whether fitting any P1 (materialize.fit_holders, csrc/cpu/fit.cpp) to counts of `cells`
        cells whose largest is `max_count` and whose replicas could save `most_saved` bytes at
        most (_fit_bound) returns P0: materialize.fit_keeps_none (the rule is fit_rule.h's)."""
        return fit_keeps_none(max_count, most_saved, cells, token_bytes=fit.token_bytes,
                              cost=fit.chunk_passes * fit.chunk_bytes, fixed_bytes=fit.fixed_bytes)

    def _replica_fixed_bytes(self, collectives: int) -> float:
        """What a layer's replica collectives cost beyond their bytes, in bytes summed over the
        ranks (every rank waits out each collective's latency): W x collectives x latency x the
        bandwidth of the link that bounds the exchange (inter-node when the world spans nodes)."""
        bw = self.bandwidth[1] if self.topology.num_nodes > 1 else self.bandwidth[0]
        return self.topology.world_size * collectives * self.collective_latency_s * bw

    # ---- forward ------------------------------------------------------------------------------
    def forward(self, layer, x_TD: torch.Tensor, routing) -> torch.Tensor:
        start = time.perf_counter()
        gap, self._gap = self._gap, None
        if gap is not None and self.training_step_time_known(start):
            layer.fssdp_state.gaps.append(gap.stop())
        self._read_non_moe_time(layer.fssdp_state)
        E, W, rank = layer.expert_layout.num_experts, self.topology.world_size, self.topology.rank
        self._wire = self._wire_dtype(x_TD)
        self._token_bytes = self._token_wire_bytes(x_TD)
        if self._pending and (not self._layers or layer is self._layers[0]):
            self.drain_reduces()  # what a backward that raised left queued (its end drains the rest)
        if self._layers and layer is self._layers[0]:
            self._drop_stale_prefetches()
            self._last_spec = None
        indices_TK = routing.indices_TK
        counts_E = ops.expert_histogram(indices_TK, E)
        nxt = self._next_layer(layer)
        plan = self.plan(layer, counts_E, self._token_bytes, ahead=nxt)
        layout = plan.rank_layout(rank)  # this rank's sends (sparse) and receives: no [W, E, W]
        bins_TK = self._destination_bins(indices_TK, E, layout)
        # The plan knows on the host how many rows this rank sends: permute reads nothing back.
        x_ND, row_map_TK, _ = ops.permute(x_TD, bins_TK, W * E, -1, num_rows=int(layout.send_tokens.sum()))
        # Under autocast the experts only use a bf16 (fp16) cast of the tokens: cast them before
        # they travel (half the dispatch and combine bytes, the same numbers). Cast after the
        # permute, so its backward still sums each token's rows in x's dtype.
        x_ND = x_ND.to(self._token_wire_dtype(x_TD))
        prefetched, layer.fssdp_state.prefetched = layer.fssdp_state.prefetched, None
        sparse = None
        if plan.num_replicas:
            sparse = prefetched.plan if prefetched is not None else device_plan(
                plan.owner_E, plan.holders_WE, rank, layer.expert_chunks.device,
                planned=layer.fssdp_state.last_sparse)
        # Expert slots: the owned chunks (ascending) computed in place, then the received
        # replicas in arrival order (hecate.comm.sparse.start_replica_gather).
        owned, slot_of_E = self._owner_cache(layer.fssdp_state)[3:]  # plan.owner_E is state.owner_E's copy
        if sparse is not None:
            slot_ids = torch.cat([owned, sparse.recv_ids.cpu()])
            slot_of_E = torch.zeros(E, dtype=torch.int64)
            slot_of_E[slot_ids] = torch.arange(slot_ids.numel())
        spec = ExchangeSpec(layer=layer, owner_E=plan.owner_E, holders_WE=plan.holders_WE,
                            send_splits=layout.send_splits, recv_splits=layout.recv_splits,
                            recv_WE=torch.from_numpy(layout.recv_WE), slot_of_E=slot_of_E, rank=rank,
                            rematerialize=self.rematerialize, num_replicas=plan.num_replicas,
                            token_group=self.token_group,
                            weight_group=self.weight_group, stats=self.topology.stats,
                            pending=self._pending if self.overlap_reduce else None,
                            timings=self.timings, sparse_plan=sparse, wire_dtype=self._wire,
                            recompute_experts=getattr(layer, "recompute_experts", False))
        if prefetched is not None and prefetched.wire_dtype != self._wire:
            raise RuntimeError(f"fssdp MoE layer {getattr(layer, 'layer_id', '?')}: its prefetched replicas "
                               f"travelled as {prefetched.wire_dtype} but this forward computes with "
                               f"{self._wire}; enter or leave autocast outside the model's forward")
        spec.prefetched = prefetched
        if torch.is_grad_enabled():
            # Backward runs the layers in reverse: this layer's backward will start the
            # re-gather of the MoE layer before it (prefetch), behind its own compute.
            spec.previous = self._last_spec if self.prefetch else None
            self._last_spec = spec
        y_ND = fssdp_experts(x_ND, layer.expert_chunks, spec)
        out = ops.unpermute(y_ND.to(x_TD.dtype), row_map_TK, routing.weights_TK)
        if nxt is not None:
            self._issue_prefetch(nxt, self._token_bytes)
        self._last_exit = time.perf_counter()
        self._gap = Interval(x_TD.device).start()  # on the device's clock: events on a GPU
        return out

    @staticmethod
    def _read_non_moe_time(state) -> None:
        """non_moe_us = the newest gap that can be read without waiting: this forward's on
        the CPU, the previous step's on a GPU (its events have completed by now)."""
        while state.gaps and state.gaps[0].done():
            state.non_moe_us = int(state.gaps.popleft().seconds() * 1e6)

    @staticmethod
    def _token_wire_bytes(x_TD: torch.Tensor) -> int:
        """Bytes of one token row in the dispatch / combine all-to-alls (the cost model and
        the replica fitting price tokens with this): the wire dtype's."""
        return x_TD.shape[1] * FullyShardedSparse._token_wire_dtype(x_TD).itemsize

    @staticmethod
    def _token_wire_dtype(x_TD: torch.Tensor) -> torch.dtype:
        """The dtype tokens travel in: autocast's when it is on and narrower, else x_TD's."""
        dtype = autocast_dtype(x_TD.device.type)
        return dtype if dtype is not None and dtype.itemsize < x_TD.element_size() else x_TD.dtype

    def _wire_itemsize(self) -> int:
        return 4 if self._wire is None else self._wire.itemsize

    @staticmethod
    def _wire_dtype(x_TD: torch.Tensor):
        """The dtype replicas travel in: autocast's (bf16/fp16) when it is on, else the fp32 rows."""
        dtype = autocast_dtype(x_TD.device.type)
        return dtype if dtype is not None and dtype.itemsize < 4 else None

    def _next_layer(self, layer):
        if not self.prefetch or getattr(layer, "layer_id", None) is None:
            return None
        i = layer.layer_id + 1
        return self._layers[i] if i < len(self._layers) else None

    def _drop_stale_prefetches(self) -> None:
        """A forward that stopped early leaves gathers in flight; complete and discard them
        (every rank runs the same forward, so every rank drops the same ones)."""
        for layer in self._layers:
            if layer.fssdp_state.prefetched is not None:
                layer.fssdp_state.prefetched.wait()
                layer.fssdp_state.prefetched = None

    def training_step_time_known(self, now: float) -> bool:
        # A gap longer than a second spans an optimizer step or data loading, not attention.
        return now - self._last_exit < 1.0

    @staticmethod
    def _destination_bins(indices_TK, num_experts: int, layout, compact: bool | None = None) -> torch.Tensor:
        """bin = dst * E + e for each routed entry: entries of expert e, in token order, fill
        the destinations' shares in rank order.

        `layout` (routes.RankLayout) lists this rank's sends sorted by (expert, destination).
        Sorted by expert (a stable sort), the routed entries line up with those shares one
        after another: O(T*K + E + replicas), no [T*K, W] comparison and no [W, E] table.
        `compact` (default on CPU) works on the host: one C++ pass (RankLayout.destination_bins)
        when hecate._C is built, else numpy (`_host_bins`: an expert
        whose entries all go to one destination is a table lookup, only the entries of
        experts split over several destinations are sorted); otherwise (GPU) a binary search
        over the shares' running ends finds each entry's share with torch ops, without a
        host sync. Both give the same bins.
        """
        E = num_experts
        device = indices_TK.device
        if compact if compact is not None else device.type == "cpu":
            if ops._backend.use_extension("destination_bins", torch.device("cpu")):  # one C++ pass, same bins
                return layout.destination_bins(indices_TK, E).to(device)
            cell_bin = layout.send_dst * E + layout.send_e
            return torch.from_numpy(_host_bins(indices_TK, E, layout, cell_bin)).to(device)
        cell_bin = layout.send_dst * E + layout.send_e
        # Computed where the indices live (no round trip of T x K ids through the host on a
        # GPU); only the rank's few share entries move there.
        flat = indices_TK.reshape(-1)
        valid = flat >= 0
        if cell_bin.size == 0:
            return torch.full_like(flat, -1).view(indices_TK.shape)
        key = torch.where(valid, flat, E).to(torch.int16 if E < 2**15 else torch.int32)
        order = torch.sort(key, stable=True).indices
        ends = ops.to_device(torch.from_numpy(layout.send_tokens), device).cumsum(0)  # pinned, non-blocking
        cell = torch.searchsorted(ends, torch.arange(flat.numel(), device=device), right=True)
        cell = cell.clamp(max=cell_bin.size - 1)  # positions past the routed ones are invalid
        bins = torch.empty_like(flat)
        bins[order] = ops.to_device(torch.from_numpy(cell_bin), device)[cell]
        return torch.where(valid, bins, torch.full_like(flat, -1)).view(indices_TK.shape)

    # ---- backward / optimizer ---------------------------------------------------------------
    def drain_reduces(self) -> None:
        """Complete the pending spRS of earlier backwards, in issue order (the same on every
        rank), and add them into the owners' gradients. Each backward pass does that already
        when it ends (ReduceQueue); finish_backward calls it, and so does the first MoE layer's
        forward, for what a backward that raised left behind."""
        self._pending.drain()

    def _complete_reduce(self, reduce) -> None:
        with timed(self.timings, "exposed_reduce_s", reduce.layer.expert_chunks.device) as interval:
            rows, interval.host_seconds = reduce.wait()
        p = reduce.layer.expert_chunks
        p.grad = rows if p.grad is None else p.grad + rows

    def finish_backward(self, layers) -> None:
        """spRS summed every rank's contribution into the owners; average like dense DP grads."""
        self.drain_reduces()
        for layer in layers:
            p = layer.expert_chunks
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            p.grad /= self.topology.world_size

    def gather_experts(self, layer, grads: bool = False) -> dict[str, torch.Tensor]:
        src = layer.expert_chunks.grad if grads else layer.expert_chunks.detach()
        owner = layer.fssdp_state.owner_E
        everyone = torch.ones(self.topology.world_size, owner.numel(), dtype=torch.bool)
        full, _ = sparse_all_gather(src, owner, everyone, group=self.weight_group, check=False,
                                    name="fssdp.gather_experts")
        return {n: t.clone() for n, t in layer.expert_layout.unflatten(full).items()}

    @torch.no_grad()
    def load_experts(self, layer, full: dict[str, torch.Tensor]) -> None:
        rows = layer.expert_layout.flatten(full)
        layer.expert_chunks.copy_(rows[layer.fssdp_state.owner_E == self.topology.rank])

    # ---- heterogeneous sharding (Algorithm 2) ------------------------------------------------
    def step_end(self, layers, optimizer=None) -> bool:
        """Call after each optimizer step; re-shards every `reshard_interval` iterations."""
        self.iteration += 1
        if self.reshard_interval and self.iteration % self.reshard_interval == 0:
            return self.reshard(layers, optimizer)
        return False

    def reshard(self, layers, optimizer=None, owner_LE: torch.Tensor | None = None) -> bool:
        """Re-place the owners of every layer's chunks (collective). Returns whether anything moved.

        owner_LE None: Algorithm 2 on the predicted loads; the result is identical on every
        rank because the loads come from all-gathered counts.
        """
        layers = list(layers)
        old = torch.stack([layer.fssdp_state.owner_E for layer in layers])
        if owner_LE is None:
            loads = torch.stack([layer.fssdp_state.predictor.predict() for layer in layers])
            t = [self._overlap_t(layer) for layer in layers]
            owner_LE = heterogeneous_sharding(loads, self.topology.world_size,
                                              self.topology.ranks_per_node, t)
        if torch.equal(owner_LE, old):
            return False
        for layer, new_owner in zip(layers, owner_LE):
            self._move_layer(layer, new_owner.clone(), optimizer)
        self.reshards += 1
        return True

    def _overlap_t(self, layer) -> int:
        plan = layer.fssdp_state.last_plan
        if plan is None or self.policy_name != "hecate":
            return 0
        # Only experts replicated everywhere are "set aside" by Algorithm 2.
        everywhere = plan.holders_WE.all(0).sum().item()
        return int(everywhere)

    def _move_rows(self, rows_OS: torch.Tensor, old_owner, new_owner) -> torch.Tensor:
        W, rank = self.topology.world_size, self.topology.rank
        E = old_owner.numel()
        holders = torch.zeros(W, E, dtype=torch.bool)
        holders[old_owner, torch.arange(E)] = True
        holders[new_owner, torch.arange(E)] = True
        with torch.no_grad():
            held, ids = sparse_all_gather(rows_OS.detach(), old_owner, holders, group=self.weight_group,
                                          check=False, stats=self.topology.stats, name="fssdp.reshard")
        return held[kept_rows(new_owner, ids, rank)].clone()

    def _move_layer(self, layer, new_owner: torch.Tensor, optimizer) -> None:
        """Move one layer's rows and their optimizer state to the new owners.

        The parameter is replaced by a new object rather than resized in place: autograd
        caches a leaf's gradient accumulator together with its shape.
        """
        state, p = layer.fssdp_state, layer.expert_chunks
        old_owner = state.owner_E
        new_p = mark_expert(nn.Parameter(self._move_rows(p.detach(), old_owner, new_owner)))
        if optimizer is not None:
            for group in optimizer.param_groups:
                group["params"] = [new_p if q is p else q for q in group["params"]]
            if p in optimizer.state:
                old_state = optimizer.state.pop(p)
                # Sorted keys: each move is a collective, so every rank must move them in one order.
                moved = {k: (self._move_rows(old_state[k], old_owner, new_owner)
                             if torch.is_tensor(old_state[k]) and old_state[k].shape == p.shape
                             else old_state[k])
                         for k in sorted(old_state)}
                optimizer.state[new_p] = moved
        layer.expert_chunks = new_p
        layer.fssdp_owned_leaves = None  # views of the old rows (expert_exchange.owned_leaves)
        state.owner_E = new_owner

    def persistent_bytes(self, layer, optimizer=None) -> int:
        """Bytes this rank keeps for the layer's experts: rows + grads + optimizer state."""
        p = layer.expert_chunks
        total = p.numel() * p.element_size()
        if p.grad is not None:
            total += p.grad.numel() * p.grad.element_size()
        if optimizer is not None:
            for v in optimizer.state.get(p, {}).values():
                if torch.is_tensor(v) and v.dim() > 0:
                    total += v.numel() * v.element_size()
        return total
