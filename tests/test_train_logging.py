"""TensorBoard and wandb (offline) logging: files are written when enabled; a missing package is
reported once and the run goes on with JSONL only."""
import builtins
import json

import pytest
import torch.distributed as dist

from hecate.train.config import LoggingConfig, load_config
from hecate.train.metrics import MetricsLogger

FRESH_GROUP = pytest.mark.skipif(dist.is_available() and dist.is_initialized(), reason="needs a fresh process group")


def _cfg(tmp_path, *extra):
    return load_config("tiny_dp", ["parallel.strategy=local", "parallel.nproc=1", "train.steps=2",
                                   "train.log_every=1", "train.eval_every=2", "data.embedded_max_bytes=100000",
                                   f"data.cache_dir={tmp_path}/cache", f"train.out_dir={tmp_path}/run",
                                   "logging.progress=false", "logging.heatmap=false", *extra])


def _tb_scalars(log_dir, tag):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir))
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)]


@FRESH_GROUP
def test_tensorboard_and_wandb_offline_write_files(tmp_path, monkeypatch):
    pytest.importorskip("torch.utils.tensorboard")
    pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    pytest.importorskip("wandb")
    from hecate.train.trainer import train

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb_dir"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    train(_cfg(tmp_path, "logging.tensorboard=true", "logging.wandb=true"))
    run = tmp_path / "run"
    jsonl = {r["step"]: r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
             if "loss" in r}
    tb = dict(_tb_scalars(run / "tensorboard", "loss"))
    assert sorted(tb) == [1, 2] and all(abs(tb[s] - jsonl[s]) < 1e-5 for s in tb)
    assert [s for s, _ in _tb_scalars(run / "tensorboard", "val_loss")] == [2]
    runs = list((run / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and any(p.suffix == ".wandb" and p.stat().st_size > 0 for p in runs[0].iterdir())


def _hide(monkeypatch, *names):
    """Make `import NAME` (and its submodules) fail as if the package were not installed."""
    real_import = builtins.__import__

    def fake(name, *args, **kwargs):
        if any(name == n or name.startswith(n + ".") for n in names):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake)


def test_missing_tensorboard_and_wandb_are_reported_and_skipped(tmp_path, monkeypatch, capsys):
    _hide(monkeypatch, "torch.utils.tensorboard", "wandb")
    logger = MetricsLogger(tmp_path, LoggingConfig(tensorboard=True, wandb=True))
    logger.log({"step": 1, "loss": 2.5})
    logger.close()
    err = capsys.readouterr().err
    assert "logging.tensorboard is on but the `tensorboard` package is not installed" in err
    assert "logging.wandb is on but the `wandb` package is not installed" in err
    assert "continuing without it" in err
    assert logger.tb is None and logger.wandb is None
    assert json.loads((tmp_path / "metrics.jsonl").read_text()) == {"step": 1, "loss": 2.5}


def test_wandb_init_failure_does_not_stop_logging(tmp_path, monkeypatch, capsys):
    wandb = pytest.importorskip("wandb")

    def broken_init(**kwargs):
        raise RuntimeError("no network")

    monkeypatch.setattr(wandb, "init", broken_init)
    logger = MetricsLogger(tmp_path, LoggingConfig(wandb=True))
    logger.log({"step": 1, "loss": 1.0})
    logger.close()
    assert "wandb.init failed (RuntimeError: no network)" in capsys.readouterr().err
    assert (tmp_path / "metrics.jsonl").read_text().strip()


@FRESH_GROUP
def test_run_continues_without_tensorboard(tmp_path, monkeypatch, capsys):
    from hecate.train.trainer import train

    _hide(monkeypatch, "torch.utils.tensorboard")
    summary = train(_cfg(tmp_path, "logging.tensorboard=true"))
    assert summary["last_loss"] > 0 and not (tmp_path / "run" / "tensorboard").exists()
    assert "(pip install tensorboard); continuing without it" in capsys.readouterr().err
