"""The trainer in one process (world of one): reproducible step by step, eval, heatmaps, sampling."""
import json

import pytest
import torch.distributed as dist

from hecate.train.config import load_config
from hecate.train.trainer import train


def _cfg(tmp_path, name, *extra):
    return load_config("tiny_dp", ["parallel.strategy=local", "parallel.nproc=1", "train.steps=3",
                                   "train.log_every=1", "train.eval_every=3", "data.embedded_max_bytes=100000",
                                   f"data.cache_dir={tmp_path}/cache", f"train.out_dir={tmp_path}/{name}",
                                   "logging.progress=false", *extra])


@pytest.mark.skipif(dist.is_available() and dist.is_initialized(), reason="needs a fresh process group")
def test_single_process_run_is_reproducible(tmp_path):
    a = train(_cfg(tmp_path, "a"))
    b = train(_cfg(tmp_path, "b"))
    losses = [[json.loads(line)["loss"] for line in (tmp_path / n / "metrics.jsonl").read_text().splitlines()
               if '"loss"' in line] for n in ("a", "b")]
    assert len(losses[0]) == 3 and losses[0] == losses[1]
    assert a["val_loss"] == b["val_loss"] and a["val_ppl"] > 1
    c = train(_cfg(tmp_path, "c", "optim.grad_accum=2", "train.bf16=true", "sample.num_samples=1",
                   "sample.max_new_tokens=3", "train.seed=1"))
    assert c["last_loss"] > 0 and len(c["samples"]) == 1 and c["samples"][0].startswith("def ")
    pytest.importorskip("matplotlib")
    assert (tmp_path / "c" / "expert_load_layer0.png").stat().st_size > 0


def _losses(path):
    return {r["step"]: r["loss"] for r in map(json.loads, path.read_text().splitlines()) if "loss" in r}


@pytest.mark.skipif(dist.is_available() and dist.is_initialized(), reason="needs a fresh process group")
def test_resume_continues_the_loss_curve(tmp_path):
    import shutil

    pytest.importorskip("hecate.train.checkpoint")
    ckpt = ["train.steps=4", "checkpoint.every=2", "logging.heatmap=false"]
    train(_cfg(tmp_path, "full", *ckpt))
    step2 = tmp_path / "full" / "checkpoints" / "step_00000002"
    assert step2.is_dir()
    shutil.copytree(step2, tmp_path / "resumed" / "checkpoints" / step2.name)
    train(_cfg(tmp_path, "resumed", *ckpt), resume=True)
    full, resumed = _losses(tmp_path / "full" / "metrics.jsonl"), _losses(tmp_path / "resumed" / "metrics.jsonl")
    assert sorted(resumed) == [3, 4] and all(resumed[s] == full[s] for s in (3, 4))
    with pytest.raises(ValueError, match="--resume: no checkpoints"):
        train(_cfg(tmp_path, "fresh"), resume=True)
    assert not dist.is_initialized()  # the failed start cleaned up its process group


@pytest.mark.skipif(dist.is_available() and dist.is_initialized(), reason="needs a fresh process group")
def test_pyramid_moe_trains_through_the_trainer(tmp_path):
    """PR-MoE layers have different expert counts: load logging and heatmaps must cope."""
    cfg = load_config("configs/models/tiny-prmoe.yaml",
                      ["parallel.strategy=local", "parallel.nproc=1", "train.steps=2", "train.log_every=1",
                       "train.eval_every=2", "data.embedded_max_bytes=100000", "sample.num_samples=0",
                       f"data.cache_dir={tmp_path}/cache", f"train.out_dir={tmp_path}/prmoe",
                       "logging.progress=false"])
    train(cfg)
    rows = [json.loads(line) for line in (tmp_path / "prmoe" / "metrics.jsonl").read_text().splitlines()]
    loads = [r["expert_load"] for r in rows if r.get("expert_load")]
    assert loads and len({len(layer) for layer in loads[0]}) > 1  # a real pyramid was logged
