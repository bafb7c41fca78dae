"""Staged training (hecate.train.stages) on the rank's device: train_stages hands run_stages the
device init_distributed chose (a GPU under NCCL, whose collectives take CUDA tensors only), the
model moves there and every batch follows it. Checked on CPU: a stand-in device where nothing
has to run, a spy on hecate.ops.to_device where batches do."""
import pytest
import torch
import torch.distributed as dist

from hecate import ops
from hecate.models.registry import build_model, get_preset
from hecate.train import stages
from hecate.train.stages import load_stage_config, run_stages


def _tiny():
    torch.manual_seed(0)
    p = get_preset("tiny-uni-moe")
    return build_model(p.arch, p.config)


def test_run_stages_moves_the_model_to_the_device():
    cfg = load_stage_config("configs/models/tiny-uni-moe.yaml")
    cfg.stages = []  # nothing to run on the stand-in device: only the move
    model = _tiny()
    run_stages(cfg, model=model, device=torch.device("meta"))
    assert {p.device.type for p in model.parameters()} == {"meta"}


def test_batches_follow_the_model(monkeypatch):
    calls = []
    original = ops.to_device

    def to_device(t, device):
        calls.append((t.dtype, torch.device(device).type))
        return original(t, device)

    monkeypatch.setattr(ops, "to_device", to_device)
    cfg = load_stage_config("configs/models/tiny-uni-moe.yaml")
    cfg.stages = [{"name": "align", "steps": 1}]
    run_stages(cfg, model=_tiny())
    # First the step's tokens, image and audio features and targets, each to the model's device
    # (then the grouped MLP's int32 offsets).
    assert calls[:4] == [(torch.int64, "cpu"), (torch.float32, "cpu"), (torch.float32, "cpu"),
                         (torch.int64, "cpu")], calls


@pytest.mark.skipif(dist.is_available() and dist.is_initialized(), reason="needs a fresh process group")
def test_train_stages_trains_on_init_distributeds_device(tmp_path, monkeypatch):
    from hecate.train import trainer

    seen = {}
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        monkeypatch.setattr(trainer, "init_distributed", lambda *a, **k: (torch.device("meta"), False))
        monkeypatch.setattr(stages, "run_stages", lambda *a, **k: seen.update(k) or [])
        cfg = load_stage_config("configs/models/tiny-uni-moe.yaml")
        cfg.out_dir = str(tmp_path / "run")
        stages.train_stages(cfg)
    finally:
        dist.destroy_process_group()
    assert seen["device"] == torch.device("meta")
