"""CommStats: bytes each rank sent and received, per collective name.

Only bytes that cross between ranks count (a rank's split to itself is a local
copy). Summed over all ranks, sent == received; per rank they differ.
"""
from __future__ import annotations

from collections import defaultdict


class CommStats:
    """Per-rank byte counters keyed by collective name (e.g. "spAG", "all_to_all_v")."""

    def __init__(self) -> None:
        self._sent: dict[str, int] = defaultdict(int)
        self._received: dict[str, int] = defaultdict(int)
        self._calls: dict[str, int] = defaultdict(int)

    def record(self, name: str, sent_bytes: int, received_bytes: int) -> None:
        """Count one call of collective `name` that sent / received these bytes on this rank."""
        if sent_bytes < 0 or received_bytes < 0:
            raise ValueError(f"byte counts must be >= 0, got sent={sent_bytes}, received={received_bytes}")
        self._sent[name] += int(sent_bytes)
        self._received[name] += int(received_bytes)
        self._calls[name] += 1

    def sent(self, name: str | None = None) -> int:
        """Bytes sent by this rank for `name` (all collectives when None)."""
        return sum(self._sent.values()) if name is None else self._sent.get(name, 0)

    def received(self, name: str | None = None) -> int:
        """Bytes received by this rank for `name` (all collectives when None)."""
        return sum(self._received.values()) if name is None else self._received.get(name, 0)

    def calls(self, name: str) -> int:
        return self._calls.get(name, 0)

    def total_bytes(self) -> int:
        """Bytes this rank put on the wire plus bytes it took off it, over every collective."""
        return self.sent() + self.received()

    def snapshot(self) -> dict[str, dict[str, int]]:
        """A plain copy: {name: {"sent": ..., "received": ..., "calls": ...}} (picklable)."""
        return {
            name: {"sent": self._sent[name], "received": self._received[name], "calls": self._calls[name]}
            for name in sorted(self._calls)
        }

    def reset(self) -> dict[str, dict[str, int]]:
        """Zero every counter; return the snapshot taken just before."""
        snap = self.snapshot()
        self._sent.clear()
        self._received.clear()
        self._calls.clear()
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
