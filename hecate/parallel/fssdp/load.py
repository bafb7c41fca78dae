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
        self._history.append(counts)
        self._prediction = None

    def update_checked(self, global_counts_E: torch.Tensor) -> None:
        """`update` for totals the caller has already checked (the planner's plan_layer sums and
        checks the all-gathered counts in C++): int64 or float64 [E], non-negative, on the CPU."""
        self._history.append(global_counts_E.numpy().astype(np.float64))
        self._prediction = None

    def update_from_rank_counts(self, counts_WE) -> None:
        """Record one iteration from per-rank counts [W, E] (the all-gathered tensor)."""
        floating = (counts_WE.is_floating_point() if isinstance(counts_WE, torch.Tensor)
                    else np.asarray(counts_WE).dtype.kind == "f")
        # Integer counts are summed as int64 (exact, and a plain copy rather than a float cast
        # of W x E values); the float64 result equals a float64 sum of the same integers.
        counts = to_numpy(counts_WE, "counts_WE", ndim=2, dtype=np.float64 if floating else np.int64,
                          shape=(None, self.num_experts), copy=False)
        check_nonnegative(counts, "counts_WE")
        self._history.append(counts.sum(axis=0).astype(np.float64))
        self._prediction = None

    def predict(self) -> torch.Tensor:
        """Predicted load per expert, float64 [E]; uniform ones before any history. The same
        tensor is returned until the next update: read it, do not modify it in place."""
        if self._prediction is None:
            if not self._history:
                self._prediction = torch.ones(self.num_experts, dtype=torch.float64)
            else:
                # Sum in a fixed order (oldest first) so every rank rounds identically.
                total = np.zeros(self.num_experts, dtype=np.float64)
                for counts in self._history:
                    total += counts
                self._prediction = torch.from_numpy(total / len(self._history))
        return self._prediction

    def reset(self) -> None:
        self._history.clear()
        self._prediction = None
