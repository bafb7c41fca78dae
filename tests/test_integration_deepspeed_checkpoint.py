"""DeepSpeed MoE checkpoints written by the real library <-> Hecate's format (CPU, gloo)."""
import os

import pytest

from hecate.testing import run_distributed
from tests import integration_cases as cases

pytest.importorskip("deepspeed", reason="DeepSpeed is optional (pip install -e .[deepspeed])")
os.environ.setdefault("DS_ACCELERATOR", "cpu")


def test_real_deepspeed_checkpoint_round_trip(tmp_path):
    res = run_distributed(cases.ds_checkpoint_roundtrip, 2, str(tmp_path), timeout=300, **cases.ISOLATED)
    info = res[0]["info"]
    assert len(info["expert_files"]) == 4 and info["optimizer_files"]  # one file per expert, per-rank optim
    for r in res:
        assert r["out_diff"] < 1e-5, r
        assert r["back_diff"] == 0.0, r
