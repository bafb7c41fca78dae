"""CommStats: bytes each rank sent and received, per collective name and link class.

Only bytes that cross between ranks count (a rank's split to itself is a local
copy). Summed over all ranks, sent == received; per rank they differ.

Link classes: once a `Topology` has told the counters where every rank lives
(`set_layout`), each byte is also classed as intra-node (both ends on one node)
or inter-node. The class is that of the logical source and destination of the
bytes, not of the hops an implementation takes (a ring all-reduce's bytes are
counted as the reduce-scatter + all-gather exchange between every pair of peers).

* `record_peers(name, sent_P, received_P, group_rank, ranks)` takes bytes per peer of
  the group (the exact split, used by all-to-alls and the sparse collectives);
* `record(name, sent, received, ranks=None)` takes totals of a collective whose bytes
  are spread evenly over the peers in `ranks` (default the whole world): all-reduce,
  all-gather, reduce-scatter of equal shards. The inter-node share is the total times
  the fraction of those peers on other nodes, rounded down.

Without a layout, or with one node, every byte is intra-node.
"""
from __future__ import annotations

from collections import defaultdict
from itertools import compress
from typing import Sequence

_KEYS = ("sent", "received", "calls")
_LINK_KEYS = ("sent_intra", "sent_inter", "received_intra", "received_inter")


class CommStats:
    """Per-rank byte counters keyed by collective name (e.g. "spAG", "all_to_all_v")."""

    def __init__(self) -> None:
        self._sent: dict[str, int] = defaultdict(int)
        self._received: dict[str, int] = defaultdict(int)
        self._calls: dict[str, int] = defaultdict(int)
        self._sent_inter: dict[str, int] = defaultdict(int)
        self._received_inter: dict[str, int] = defaultdict(int)
        self.rank: int | None = None
        self.node_of: tuple[int, ...] | None = None
        self._inter_cache: dict = {}  # record's group -> _inter_peers, for this layout

    # ---- layout -----------------------------------------------------------------------------
    def set_layout(self, rank: int, node_of: Sequence[int]) -> None:
        """Where this rank and every rank of the world live (node index per global rank)."""
        node_of = tuple(int(n) for n in node_of)
        if not 0 <= rank < len(node_of):
            raise ValueError(f"rank={rank} must be in [0, {len(node_of)}) (one node entry per rank)")
        self.rank, self.node_of = int(rank), node_of
        self._inter_cache = {}

    def _is_inter(self, peer: int) -> bool:
        if self.node_of is None:
            return False
        if not 0 <= peer < len(self.node_of):
            raise ValueError(f"peer rank {peer} is outside the world of {len(self.node_of)} ranks "
                             "this CommStats was given by set_layout")
        return self.node_of[peer] != self.node_of[self.rank]

    # ---- recording --------------------------------------------------------------------------
    def _add(self, name: str, sent: int, received: int, sent_inter: int, received_inter: int) -> None:
        if sent < 0 or received < 0:
            raise ValueError(f"byte counts must be >= 0, got sent={sent}, received={received}")
        self._sent[name] += int(sent)
        self._received[name] += int(received)
        self._sent_inter[name] += int(sent_inter)
        self._received_inter[name] += int(received_inter)
        self._calls[name] += 1

    def record(self, name: str, sent_bytes: int, received_bytes: int,
               ranks: Sequence[int] | None = None) -> None:
        """Count one call of collective `name` that sent / received these bytes on this rank,
        spread evenly over the peers in `ranks` (global ranks of the group; None: the world)."""
        if sent_bytes < 0 or received_bytes < 0:
            raise ValueError(f"byte counts must be >= 0, got sent={sent_bytes}, received={received_bytes}")
        sent_inter = received_inter = 0
        if self.node_of is not None:
            inter, peers = self._inter_peers(ranks)
            if peers:
                sent_inter = int(sent_bytes) * inter // peers
                received_inter = int(received_bytes) * inter // peers
        self._add(name, sent_bytes, received_bytes, sent_inter, received_inter)

    def _inter_peers(self, ranks: Sequence[int] | None) -> tuple[int, int]:
        """(peers in `ranks` on another node, peers in `ranks`), this rank left out; kept per
        group until the layout changes: a collective's group is the same every step, and the
        walk over its members is O(W) Python per call at a thousand ranks."""
        key = None if ranks is None else tuple(map(int, ranks))
        hit = self._inter_cache.get(key)
        if hit is None:
            members = range(len(self.node_of)) if key is None else key
            peers = [r for r in members if r != self.rank]
            hit = self._inter_cache[key] = (sum(self._is_inter(p) for p in peers), len(peers))
        return hit

    def record_peers(self, name: str, sent_P: Sequence[int], received_P: Sequence[int],
                     group_rank: int, ranks: Sequence[int] | None = None) -> None:
        """Count one call of `name` from the bytes sent to / received from each member of the
        group (`group_rank` is this rank's index there, its own entry is not counted;
        `ranks[i]` the global rank of member i, None: the group is the world)."""
        if len(sent_P) != len(received_P):
            raise ValueError(f"sent_P has {len(sent_P)} entries but received_P {len(received_P)}; "
                             "give one per member of the group")
        if ranks is not None and len(ranks) != len(sent_P):
            raise ValueError(f"ranks has {len(ranks)} entries but the group has {len(sent_P)} members")
        # Whole-sequence builtins (sum, min, compress) instead of a Python loop per member: an
        # all-to-all records W entries per call, a thousand at a thousand ranks.
        sent_P, received_P = list(map(int, sent_P)), list(map(int, received_P))
        if sent_P and min(min(sent_P), min(received_P)) < 0:
            i = next(i for i, (s, r) in enumerate(zip(sent_P, received_P)) if s < 0 or r < 0)
            raise ValueError(f"byte counts must be >= 0, got {sent_P[i]} sent / {received_P[i]} received "
                             f"for member {i}")
        own = 0 <= group_rank < len(sent_P)
        sent = sum(sent_P) - (sent_P[group_rank] if own else 0)
        received = sum(received_P) - (received_P[group_rank] if own else 0)
        inter = self._inter_members(ranks, len(sent_P), group_rank)
        sent_inter, received_inter = sum(compress(sent_P, inter)), sum(compress(received_P, inter))
        self._add(name, sent, received, sent_inter, received_inter)

    def _inter_members(self, ranks: Sequence[int] | None, members: int, group_rank: int) -> tuple[bool, ...]:
        """Whether each member of a group (global ranks `ranks`, None: the world's first
        `members`) other than this rank's own index lives on another node than this rank;
        kept per group until the layout changes."""
        key = ("members", group_rank, members if ranks is None else tuple(map(int, ranks)))
        hit = self._inter_cache.get(key)
        if hit is None:
            hit = self._inter_cache[key] = tuple(
                i != group_rank and self._is_inter(i if ranks is None else int(ranks[i])) for i in range(members))
        return hit

    # ---- queries ----------------------------------------------------------------------------
    @staticmethod
    def _total(counter: dict[str, int], name: str | None) -> int:
        return sum(counter.values()) if name is None else counter.get(name, 0)

    def sent(self, name: str | None = None) -> int:
        """Bytes sent by this rank for `name` (all collectives when None)."""
        return self._total(self._sent, name)

    def received(self, name: str | None = None) -> int:
        """Bytes received by this rank for `name` (all collectives when None)."""
        return self._total(self._received, name)

    def sent_inter(self, name: str | None = None) -> int:
        """Bytes this rank sent to ranks on other nodes."""
        return self._total(self._sent_inter, name)

    def received_inter(self, name: str | None = None) -> int:
        """Bytes this rank received from ranks on other nodes."""
        return self._total(self._received_inter, name)

    def sent_intra(self, name: str | None = None) -> int:
        return self.sent(name) - self.sent_inter(name)

    def received_intra(self, name: str | None = None) -> int:
        return self.received(name) - self.received_inter(name)

    def calls(self, name: str) -> int:
        return self._calls.get(name, 0)

    def total_bytes(self) -> int:
        """Bytes this rank put on the wire plus bytes it took off it, over every collective."""
        return self.sent() + self.received()

    def inter_node_bytes(self) -> int:
        """Sent + received bytes that crossed between nodes, over every collective."""
        return self.sent_inter() + self.received_inter()

    def snapshot(self, links: bool = False) -> dict[str, dict[str, int]]:
        """A plain copy: {name: {"sent": ..., "received": ..., "calls": ...}} (picklable); with
        `links`, also "sent_intra", "sent_inter", "received_intra", "received_inter"."""
        out = {}
        for name in sorted(self._calls):
            entry = {"sent": self._sent[name], "received": self._received[name], "calls": self._calls[name]}
            if links:
                entry.update(sent_intra=self.sent_intra(name), sent_inter=self.sent_inter(name),
                             received_intra=self.received_intra(name),
                             received_inter=self.received_inter(name))
            out[name] = entry
        return out

    def reset(self) -> dict[str, dict[str, int]]:
        """Zero every counter; return the snapshot taken just before."""
        snap = self.snapshot()
        for counter in (self._sent, self._received, self._calls, self._sent_inter, self._received_inter):
            counter.clear()
        return snap

    @staticmethod
    def combine(snapshots: list[dict[str, dict[str, int]]]) -> dict[str, dict[str, int]]:
        """Sum snapshots of several ranks (e.g. the results of run_distributed) name by name."""
        out: dict[str, dict[str, int]] = {}
        for snap in snapshots:
            for name, counts in snap.items():
                acc = out.setdefault(name, {"sent": 0, "received": 0, "calls": 0})
                for key, value in counts.items():
                    acc[key] = acc.get(key, 0) + value
        return out

    def __repr__(self) -> str:
        return f"CommStats({self.snapshot()})"
