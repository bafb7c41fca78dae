"""A staged (Uni-MoE) run never saves a stage snapshot or checkpoint of non-finite parameters: a
diverged stage stops the run with an error naming the stage, step, parameter and rank, and the
newest checkpoint on disk stays the last good one (the one --resume would continue from)."""
import json

import pytest
import torch
from torch import nn

from hecate.testing import run_distributed
from hecate.train.faults import NonFiniteError
from hecate.train.stages import load_stage_config, refuse_nonfinite, train_stages

CONFIG = "configs/models/tiny-uni-moe.yaml"
STEPS = ["stages.steps=1", "stages.experts.steps=3", "data.batch_size=4"]  # align 1, experts 3, lora 1


def _poison_after_step(monkeypatch, at_step: int):
    """Engine.step as usual, then NaN in the model's first parameter after global step `at_step`;
    returns that parameter's name as the run will see it (filled in when it happens)."""
    from hecate.train import engine as engine_mod

    real_step, calls, seen = engine_mod.Engine.step, [0], {}

    def step(self, *args, **kwargs):
        norm = real_step(self, *args, **kwargs)
        calls[0] += 1
        if calls[0] == at_step:
            name, p = next(iter(self.model.named_parameters()))
            with torch.no_grad():
                p.view(-1)[0] = float("nan")
            seen["name"] = name
        return norm

    monkeypatch.setattr(engine_mod.Engine, "step", step)
    return seen


@pytest.mark.parametrize("every,at_step,where,newest", [
    (0, 4, r"stages\[1\] 'experts', step 4 \(stage step 3\)", 1),  # at the stage's end: no snapshot either
    (1, 3, r"stages\[1\] 'experts', step 3 \(stage step 2\)", 2),  # a mid-stage checkpoint (checkpoint.every)
])
def test_a_nan_stage_is_neither_saved_nor_snapshotted(tmp_path, monkeypatch, every, at_step, where, newest):
    monkeypatch.delenv("HECATE_RUN_LOCK_HELD", raising=False)
    seen = _poison_after_step(monkeypatch, at_step)
    cfg = load_stage_config(CONFIG, [*STEPS, f"train.out_dir={tmp_path}", f"checkpoint.every={every}"])
    with pytest.raises(NonFiniteError, match=where) as err:
        train_stages(cfg)
    assert f"parameter {seen['name']} is not finite (NaN/inf) on rank 0" in str(err.value)
    assert "no stage snapshot or checkpoint written" in str(err.value)
    steps = sorted(int(d.name.split("_")[1]) for d in (tmp_path / "checkpoints").glob("step_*"))
    assert steps[-1] == newest
    assert [s["name"] for s in json.loads((tmp_path / "stages.json").read_text())] == ["align"]
    assert not list((tmp_path / "stages").glob("1-*"))


def _refuse_on(rank, world, bad_rank):
    """refuse_nonfinite on `world` ranks where only `bad_rank` holds an inf: every rank raises,
    naming that rank's parameter (the returned messages), or all pass (bad_rank None)."""
    model = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 2))
    if rank == bad_rank:
        with torch.no_grad():
            model[1].bias[1] = float("inf")
    try:
        refuse_nonfinite(model, world, "stages[0] 'align', step 5 (stage step 5)", "out/checkpoints")
    except NonFiniteError as e:
        return str(e)
    return None


def test_every_rank_refuses_when_one_rank_diverged():
    msgs = run_distributed(_refuse_on, 2, 1)
    assert msgs[0] == msgs[1]
    assert msgs[0].startswith("stages[0] 'align', step 5 (stage step 5): parameter 1.bias is not finite "
                              "(NaN/inf) on rank 1")
    assert run_distributed(_refuse_on, 2, None) == [None, None]
