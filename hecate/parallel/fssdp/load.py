"""Expert load prediction: a sliding-window mean of recent global token counts.

Routing is temporally local (the paper's observation), so the mean of the last
`window` iterations' global tokens per expert predicts the next iteration's
load well enough to decide materialization before routing is known.
"""
from __future__ import annotations

from collections import deque

import numpy as np
import torch

from hecate.parallel.fssdp._checks import check_nonnegative, check_positive_int, to_numpy

_EXACT = 2**53  # integers below it are exact doubles, and so are their sums below it


class LoadPredictor:
    """Predict tokens per expert as the mean over the last `window` observed iterations.

    Feed it the all-gathered global counts (sum over ranks) once per iteration
    with `update`; `predict` returns float64 [E]. Before any history it predicts
    a uniform load (all ones), which makes every planner treat experts alike.
    Identical update sequences give bit-identical predictions on every rank.
    """

    def __init__(self, num_experts: int, window: int = 5):
        self.num_experts = check_positive_int(num_experts, "num_experts")
        self.window = check_positive_int(window, "window")
        self._history: deque[np.ndarray] = deque(maxlen=self.window)
        # Per entry: an int bound on its counts when they are known to be integers below it
        # (update_checked's `most`), else None. While every entry has one and their sum is
        # below 2^53, `_total` is kept: the window's sum, updated by one add and one subtract
        # per step instead of summed again. Integer-valued doubles whose partial sums stay
        # below 2^53 add up exactly in any order, so it equals predict()'s sum bit for bit.
        self._bounds: deque = deque(maxlen=self.window)
        self._total: np.ndarray | None = None
        # predict()'s result until the next update: the runtime asks for it up to three times a
        # step (the state digest, the early P1, the plan), each a sum over the window.
        self._prediction: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self._history)

    def update(self, global_counts_E) -> None:
        """Record one iteration's global tokens per expert (int or float [E], non-negative)."""
        counts = to_numpy(global_counts_E, "global_counts_E", ndim=1, dtype=np.float64,
                          shape=(self.num_experts,))
        check_nonnegative(counts, "global_counts_E")
        self._append(counts, None)

    def update_checked(self, global_counts_E: torch.Tensor, most: int | None = None) -> None:
        """`update` for totals the caller has already checked (the planner's plan_layer sums and
        checks the all-gathered counts in C++): int64 or float64 [E], non-negative, on the CPU.
        `most` (int64 totals only): a bound the caller knows on every count (e.g. W x the
        largest per-rank count), which lets the window's sum be kept rather than redone."""
        counts = global_counts_E.numpy().astype(np.float64)
        self._append(counts, int(most) if most is not None and global_counts_E.dtype == torch.int64 else None)

    def _append(self, counts: np.ndarray, most: int | None) -> None:
        history, bounds, total = self._history, self._bounds, self._total
        full = len(history) == history.maxlen
        # The sum may be kept if every entry of the new window is a bounded integer, and the
        # old window's bounds plus the new one (the total before the eviction) are below 2^53.
        kept = most is not None and None not in bounds and sum(bounds) + most < _EXACT
        if kept and total is not None:
            total += counts
            if full:
                total -= history[0]
        history.append(counts)
        bounds.append(most)
        if not kept:
            self._total = None
        elif total is None:  # (re)start it: the window's sum in predict()'s own order
            self._total = self._window_sum()
        self._prediction = None

    def _window_sum(self) -> np.ndarray:
        # Summed in a fixed order (oldest first) so every rank rounds identically.
        total = np.zeros(self.num_experts, dtype=np.float64)
        for counts in self._history:
            total += counts
        return total

    def update_from_rank_counts(self, counts_WE) -> None:
        """Record one iteration from per-rank counts [W, E] (the all-gathered tensor)."""
        floating = (counts_WE.is_floating_point() if isinstance(counts_WE, torch.Tensor)
                    else np.asarray(counts_WE).dtype.kind == "f")
        # Integer counts are summed as int64 (exact, and a plain copy rather than a float cast
        # of W x E values); the float64 result equals a float64 sum of the same integers.
        counts = to_numpy(counts_WE, "counts_WE", ndim=2, dtype=np.float64 if floating else np.int64,
                          shape=(None, self.num_experts), copy=False)
        check_nonnegative(counts, "counts_WE")
        self._append(counts.sum(axis=0).astype(np.float64), None)

    def predict(self) -> torch.Tensor:
        """Predicted load per expert, float64 [E]; uniform ones before any history. The same
        tensor is returned until the next update: read it, do not modify it in place."""
        if self._prediction is None:
            if not self._history:
                self._prediction = torch.ones(self.num_experts, dtype=torch.float64)
            else:
                total = self._total if self._total is not None else self._window_sum()
                self._prediction = torch.from_numpy(total / len(self._history))
        return self._prediction

    def reset(self) -> None:
        self._history.clear()
        self._bounds.clear()
        self._total = None
        self._prediction = None
