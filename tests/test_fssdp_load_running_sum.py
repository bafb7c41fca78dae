"""LoadPredictor keeps its window's sum (one add and one subtract per update) while every entry
is a bounded integer total (update_checked's `most`) and the bounds sum below 2^53: predict()
must stay the window's mean summed oldest first, bit for bit, through any mix of updates
(float ones included), evictions and resets."""
import numpy as np
import torch

from hecate.parallel.fssdp.load import LoadPredictor


def _reference(window_entries, E):
    """predict() as it was: a fresh sum, oldest first, divided by the entries."""
    if not window_entries:
        return torch.ones(E, dtype=torch.float64)
    total = np.zeros(E, dtype=np.float64)
    for counts in window_entries:
        total += counts
    return torch.from_numpy(total / len(window_entries))


def _run(rng, E, window, scale, steps=60):
    p = LoadPredictor(E, window)
    entries, kept = [], 0
    for _ in range(steps):
        kind = rng.random()
        if kind < 0.6:  # the runtime's update: int64 totals with an honest bound (sometimes loose)
            counts = rng.integers(0, scale + 1, E)
            most = int(counts.max()) * int(rng.choice([1, 1, 3]))
            p.update_checked(torch.from_numpy(counts), most)
            entries.append(counts.astype(np.float64))
        elif kind < 0.7:
            counts = rng.integers(0, scale + 1, E)
            p.update_checked(torch.from_numpy(counts))  # no bound: not kept
            entries.append(counts.astype(np.float64))
        elif kind < 0.8:  # float loads (a checkpoint's history): not integers
            counts = rng.random(E) * scale
            p.update(torch.from_numpy(counts))
            entries.append(counts)
        elif kind < 0.9:
            counts = rng.integers(0, scale + 1, (3, E))
            p.update_from_rank_counts(torch.from_numpy(counts))
            entries.append(counts.sum(0).astype(np.float64))
        elif kind < 0.93:
            p.reset()
            entries = []
        entries = entries[-window:]
        kept += p._total is not None
        got, want = p.predict(), _reference(entries, E)
        assert got.dtype == torch.float64 and torch.equal(got, want)
        assert p.predict() is got  # cached until the next update
    return kept


def test_the_kept_sum_predicts_the_fresh_mean_bit_for_bit():
    rng = np.random.default_rng(0)
    kept = 0
    for i in range(40):
        E, window = int(rng.integers(1, 40)), int(rng.integers(1, 7))
        # Small counts, and counts whose sums reach 2^53 (the sum must then not be kept)
        scale = [10, 10**6, 2**50, 2**53 // 3][i % 4]
        kept += _run(rng, E, window, scale)
    assert kept > 300  # the kept sum served many predictions


def test_the_sum_is_not_kept_where_it_could_round():
    """Totals near 2^53: kept, (a + b) - a would not give b back; the bounds' sum stops it."""
    p = LoadPredictor(2, window=2)
    big, small = np.array([2**53 - 2, 1]), np.array([3, 5])
    p.update_checked(torch.from_numpy(big), 2**53 - 2)
    p.update_checked(torch.from_numpy(small), 5)
    assert p._total is None
    p.update_checked(torch.from_numpy(small), 5)  # evicts the big entry (its bound still counted)
    assert p._total is None
    p.update_checked(torch.from_numpy(small), 5)  # the bounds fit again: the sum is started anew
    assert p._total is not None
    assert torch.equal(p.predict(), _reference([small.astype(np.float64)] * 2, 2))
