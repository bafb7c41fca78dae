"""The byte fit's rule has one C++ source (csrc/cpu/fit_rule.h: a replica's saving, the
break-even count, the no-replica bound and decision), used by fit_replicas, agree_counts and the
ops fit_bound / fit_keeps_none, and one Python twin for builds without hecate._C
(materialize.replica_savings, break_even_count, fit_bound, fit_keeps_none; fit_holders' numpy
path uses the first two). The two must give the same doubles and decisions everywhere, rounding
included: sums of millions of cells, counts beyond 2^53, zero prices, the break-even itself."""
import numpy as np
import pytest
import torch

from hecate.ops._backend import use_extension
from hecate.parallel.fssdp.materialize import break_even_count, fit_bound, fit_holders, fit_keeps_none

pytestmark = pytest.mark.skipif(not use_extension("fit_bound", torch.device("cpu")),
                                reason="hecate._C is not built")


def _bits(x: float) -> bytes:
    return np.float64(x).tobytes()


def _prices(rng):
    token_bytes = int(rng.choice([0, 1, 2, 16, 4096, 3 * 2**40]))
    cost = int(rng.choice([0, 1, 256, 3 * 2**21, 10**15 + 7, 2**62]))
    return token_bytes, cost


def test_the_bound_is_the_twins_bit_for_bit():
    rng = np.random.default_rng(5)
    saved_any = 0
    for i in range(300):
        W = int(rng.choice([1, 2, 3, 7, 64, 1024 if i % 50 == 0 else 9]))
        E = int(rng.choice([1, 5, 16, 129, 256]))
        top = int(rng.choice([3, 1000, 10**9, 2**55, 2**61]))
        counts = rng.integers(0, top, (W, E), dtype=np.int64)
        owner = torch.from_numpy(rng.integers(0, W, E))
        tb, cost = _prices(rng)
        got = fit_bound(counts, owner, token_bytes=tb, cost=cost, use_kernel=True)
        want = fit_bound(counts, owner, token_bytes=tb, cost=cost, use_kernel=False)
        assert got[0] == want[0] == counts.max() and _bits(got[1]) == _bits(want[1])
        saved_any += want[1] > 0
    assert saved_any > 150


def test_the_decision_is_the_twins_at_and_around_the_break_even():
    rng = np.random.default_rng(6)
    fired = 0
    for _ in range(3000):
        tb, cost = _prices(rng)
        even = break_even_count(cost, tb)
        if even is not None and rng.random() < 0.6:
            # at, just below and just above the break-even count
            max_count = max(0, int(even) + int(rng.integers(-2, 3)))
        else:
            max_count = int(rng.choice([0, 1, 17, 2**53 + 1, 2**62]))
        cells = int(rng.integers(1, 10**6))
        saved = float(rng.choice([0.0, 1.0, 1e6, 1e12, 2.0**60])) * float(rng.random())
        fixed = float(rng.choice([0.0, saved, saved * (1 - 1e-12), saved * 1.5, 1e9]))
        kwargs = dict(token_bytes=tb, cost=cost, fixed_bytes=fixed)
        got = fit_keeps_none(max_count, saved, cells, use_kernel=True, **kwargs)
        assert got == fit_keeps_none(max_count, saved, cells, use_kernel=False, **kwargs)
        fired += got
    assert 300 < fired < 2700


def test_the_fits_prefilter_is_the_break_even():
    """fit_holders (op and numpy) keeps a replica of a cell just above the break-even count
    (when it pays) and never one at it: the prefilter is the same count in both."""
    for chunk_bytes, token_bytes, passes in [(256, 16, 3), (4096, 2, 2), (3 * 2**20, 4096, 3), (100, 3, 2)]:
        cost = chunk_bytes * passes
        even = break_even_count(cost, token_bytes)
        at = int(np.floor(even))
        for count in range(max(0, at - 1), at + 3):
            counts = torch.zeros(2, 2, dtype=torch.int64)
            counts[1, 0] = count
            owner = torch.tensor([0, 1])
            pays = 4 * count * token_bytes > cost
            for kernel in (True, False):
                held = fit_holders(torch.ones(2, 2, dtype=torch.bool), owner, counts, chunk_bytes=chunk_bytes,
                                   token_bytes=token_bytes, chunk_passes=passes, capacity_m=1, use_kernel=kernel)
                assert bool(held[1, 0]) == pays, (chunk_bytes, token_bytes, passes, count, kernel)
                top, saved = fit_bound(counts.numpy(), owner, token_bytes=token_bytes, cost=cost, use_kernel=kernel)
                none = fit_keeps_none(top, saved, 4, token_bytes=token_bytes, cost=cost, fixed_bytes=0.0,
                                      use_kernel=kernel)
                assert saved == max(0, 4 * count * token_bytes - cost) and (not pays or not none)


def test_bad_owners_are_named():
    with pytest.raises(ValueError, match=r"fit_bound: owner_E entries must be ranks in \[0, 2\), found -1"):
        torch.ops.hecate.fit_bound(torch.zeros(2, 2, dtype=torch.int64), torch.tensor([0, -1]), 1, 1)
    with pytest.raises(ValueError, match="fit_bound: counts_WE must be a non-empty 2-D CPU int64 tensor"):
        torch.ops.hecate.fit_bound(torch.zeros(2, 2), torch.tensor([0, 1]), 1, 1)
