"""A model using Hecate's drop-in MoE trains inside deepspeed.initialize (ZeRO 1/2 on the dense
parameters, experts stepped by Hecate) exactly like under Hecate's own Engine (CPU, gloo)."""
import os

import pytest

from hecate.testing import run_distributed
from tests import integration_cases as cases

pytest.importorskip("deepspeed", reason="DeepSpeed is optional (pip install -e .[deepspeed])")
os.environ.setdefault("DS_ACCELERATOR", "cpu")


@pytest.mark.parametrize("stage,strategy,accum", [(1, "fssdp", 1), (2, "fssdp", 2), (2, "ep", 1)])
def test_deepspeed_training_matches_engine(stage, strategy, accum):
    res = run_distributed(cases.ds_train_vs_engine, 2, stage, strategy, 4, accum, timeout=300, **cases.ISOLATED)
    for r in res:
        assert r["moved"] > 1e-4  # training happened
        assert r["diff"] < 1e-5, r
        assert r["curves"]["ds"] == pytest.approx(r["curves"]["ref"], rel=1e-5, abs=1e-6)

