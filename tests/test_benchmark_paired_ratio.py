"""benchmarks/strategies.py's paired ratio: the median of per-step case / baseline ratios and a
95% interval that resamples whole repeats (their steps share one pair of processes)."""
import os
import sys

import numpy as np
import pytest

# benchmarks/ goes on sys.path only for this import: left there, it would shadow real packages
# (benchmarks/grouped_gemm.py hid megatron's grouped_gemm from the test pool's spawned workers,
# which inherit sys.path).
_BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")
sys.path.insert(0, _BENCH)
try:
    from strategies import paired_ratio
finally:
    sys.path.remove(_BENCH)


def test_a_steady_ratio_is_found_and_bracketed():
    rng = np.random.default_rng(1)
    base = [list(0.1 * (1 + 0.2 * rng.random(15))) for _ in range(8)]  # machine speed drifts step to step
    case = [[b * 1.05 * (1 + 0.005 * rng.standard_normal()) for b in run] for run in base]
    m, lo, hi = paired_ratio(case, base)
    assert m == pytest.approx(1.05, abs=0.003)
    assert lo <= m <= hi and 1.03 < lo and hi < 1.07  # decided: above 1.03


def test_the_interval_spans_disagreeing_repeats():
    # Two repeats that disagree (1.00 vs 1.10 in every step): a per-step bootstrap would call
    # the median's interval narrow; resampling repeats shows the 1.0-1.1 spread.
    base = [[0.1] * 10, [0.1] * 10]
    case = [[0.100] * 10, [0.110] * 10]
    m, lo, hi = paired_ratio(case, base)
    assert lo == pytest.approx(1.0) and hi == pytest.approx(1.1)


def test_one_repeat_gives_no_interval():
    assert paired_ratio([[0.1, 0.2]], [[0.1, 0.2]]) is None
