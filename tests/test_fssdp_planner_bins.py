"""The destination bins' C++ op (csrc/cpu/routes.cpp: its first pass runs 8 entries at a time
with AVX-512 where the CPU has it, else one at a time) against the numpy bins
(strategy._host_bins) on random layouts: many entries (whole 8-entry blocks and a tail),
experts split over several destinations, dropped entries (any index < 0), and indices that
disagree with the plan's counts (both must refuse them)."""
import numpy as np
import pytest
import torch

from hecate.ops._backend import use_extension
from hecate.parallel.fssdp import node_of_ranks, route_tokens
from hecate.parallel.fssdp.strategy import _host_bins

pytestmark = pytest.mark.skipif(not use_extension("destination_bins", torch.device("cpu")),
                                reason="hecate._C is not built (make build)")


def _case(rng):
    W, E = int(rng.choice([1, 2, 4, 8])), int(rng.choice([1, 3, 8, 17, 64]))
    T, k = int(rng.integers(0, 400)), int(rng.integers(1, 4))
    k = min(k, E)
    # Skewed picks, so that a hot expert (often split: several holders on rank 0's node) has
    # many entries; any negative index is a dropped entry.
    p = 1.0 / np.arange(1, E + 1) ** 1.5
    p = rng.permutation(p / p.sum())
    idx = np.stack([rng.choice(E, size=k, replace=False, p=p) for _ in range(T)]) if T else np.zeros((0, k))
    idx = np.where(rng.random(idx.shape) < 0.1, -rng.integers(1, 4, idx.shape), idx).astype(np.int64)
    counts = rng.integers(0, 30, (W, E)).astype(np.int64)
    counts[0] = np.bincount(idx[idx >= 0], minlength=E)
    holders = rng.random((W, E)) < 0.5
    holders[rng.integers(0, W, E), np.arange(E)] = True
    nodes = node_of_ranks(W, int(rng.choice([d for d in range(1, W + 1) if W % d == 0])))
    return idx, counts, holders, nodes, E


def _bins(fn):
    try:
        return fn(), None
    except RuntimeError as exc:
        return None, exc


@pytest.mark.parametrize("seed", range(3))
def test_bins_op_equals_the_numpy_bins(seed):
    rng = np.random.default_rng(seed)
    split = refused = 0
    for i in range(150):
        idx, counts, holders, nodes, E = _case(rng)
        if i % 10 == 9 and counts[0].any():  # rank 0 has one entry more than its plan routes
            counts[0, int(rng.choice(np.flatnonzero(counts[0])))] -= 1
        layout = route_tokens(torch.from_numpy(holders), torch.from_numpy(counts), nodes, rank=0).layout(0)
        indices = torch.from_numpy(idx)
        got, got_err = _bins(lambda: layout.destination_bins(indices, E).numpy())
        want, want_err = _bins(lambda: _host_bins(indices, E, layout, layout.send_dst * E + layout.send_e))
        assert (got_err is None) == (want_err is None), (got_err, want_err)
        if got_err is None:
            assert np.array_equal(got, want)
        else:
            refused += 1
            assert "disagree" in str(got_err)
        split += bool((np.bincount(layout.send_e, minlength=E) > 1).any())
    assert split > 10 and refused > 3  # both kinds of layouts and the refusals were compared


def test_scalar_pass_equals_the_numpy_bins_too():
    # A CPU without AVX-512 runs the scalar first pass over every entry; HECATE_DISABLE_AVX512
    # (read once per process) makes this one do so: the comparison above in a fresh process.
    import os
    import subprocess
    import sys

    code = ("import tests.test_fssdp_planner_bins as t\n"
            "for seed in range(2):\n    t.test_bins_op_equals_the_numpy_bins(seed)\nprint('ok')\n")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, HECATE_DISABLE_AVX512="1")
    done = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-2000:]
