"""hecate.integrations.deepspeed.MoE against the real deepspeed.moe.layer.MoE (CPU, gloo)."""
import os

import pytest

from hecate.testing import run_distributed
from tests import integration_cases as cases

pytest.importorskip("deepspeed", reason="DeepSpeed is optional (pip install -e .[deepspeed])")
os.environ.setdefault("DS_ACCELERATOR", "cpu")

TOL = 2e-5


def _check(res, residual=False):
    for r in res:
        assert r["counts_equal"], r
        for key in ("y", "l_aux", "dx", "dgate", "dexperts") + (("dresidual",) if residual else ()):
            assert r[key] <= TOL * max(1.0, r["scale"]), (key, r)


# (k, ep_size, drop_tokens, use_residual, tokens per rank, strategy, world)
SCENARIOS = [
    (1, 2, False, False, [8, 14], "fssdp", 2),    # ranks with different token counts
    (2, 2, True, False, [16, 16], "fssdp", 2),    # top-2, dropping (1st choices first)
    (2, 2, False, True, [8, 12], "ep", 2),        # residual MoE, dropless, different counts
    (3, 2, True, False, [16, 16], "ep", 2),       # top-3, dropping by gate value ('probs')
    (3, 2, False, False, [6, 10], "fssdp", 2),
    (2, 4, True, True, [12, 12, 12, 12], "fssdp", 4),  # ep_size 4
    (1, 4, False, False, [4, 6, 8, 10], "ep", 4),
    (2, 2, False, False, [8, 8, 10, 6], "ep", 4),      # ep_size 2 inside a world of 4
    (2, 2, True, False, [16, 16], "fsdp", 2),     # every Hecate strategy behind the same API
    (3, 2, False, True, [8, 12], "dp", 2),
]


@pytest.mark.parametrize("k,ep_size,drop,residual,tokens,strategy,world", SCENARIOS)
def test_matches_deepspeed(k, ep_size, drop, residual, tokens, strategy, world):
    res = run_distributed(cases.ds_equivalence, world, k, ep_size, drop, residual, tokens, strategy,
                          timeout=300, **cases.ISOLATED)
    _check(res, residual)
    if drop:
        assert sum(r["dropped"] for r in res) > 0, "the scenario should exercise token dropping"
    else:
        assert all(r["dropped"] == 0 for r in res)


def test_eval_capacity_factor_matches_deepspeed():
    # train capacity 2.0 would keep everything; eval capacity 0.5 drops
    res = run_distributed(cases.ds_equivalence, 2, 2, 2, True, False, [16, 16], "fssdp", 2.0, 0, 0.5,
                          timeout=300, **cases.ISOLATED)
    _check(res)
    assert sum(r["dropped"] for r in res) > 0
