"""`hecate convert`: Hugging Face directories <-> Hecate run directories (docs/hf.md).

    hecate convert --from-hf HF_DIR --out RUN_DIR    # RUN_DIR/config.yaml, model.safetensors, hf.json
    hecate train RUN_DIR/config.yaml --init RUN_DIR   # continue training under any strategy
    hecate convert --to-hf RUN_DIR --out HF_DIR      # from a converted dir or a training run's out_dir

RUN_DIR/config.yaml is a complete training config (defaults for everything but the model;
train.out_dir = RUN_DIR/train): edit its data and parallel sections before training.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

import torch

from hecate.integrations.hf import from_hf, to_hf
from hecate.models.transformer import MoETransformer
from hecate.parallel import build_strategy
from hecate.train import checkpoint
from hecate.train.checkpoint_io import atomic_write_bytes
from hecate.train.config import TrainConfig, load_config
from hecate.train.init_weights import CONFIG, INIT_WEIGHTS

HF_INFO = "hf.json"


def _local_strategy(model: MoETransformer):
    layers = model.moe_layers()
    return layers[0].strategy if layers else build_strategy("local", None)


def convert_from_hf(src, run_dir, dtype: torch.dtype = torch.float32) -> Path:
    """Convert a transformers model (object or directory) into RUN_DIR; returns RUN_DIR."""
    model = from_hf(src, dtype=dtype)
    run_dir = Path(run_dir)
    if (run_dir / INIT_WEIGHTS).exists():
        raise ValueError(f"--out {run_dir} already holds {INIT_WEIGHTS}; choose an empty directory")
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg = TrainConfig(model=model.cfg)
    cfg.train.out_dir = str(run_dir / "train")
    checkpoint.export_safetensors(run_dir / INIT_WEIGHTS, model, _local_strategy(model))
    info = {"model_type": model.hf_model_type, "source": os.fspath(src) if isinstance(src, (str, os.PathLike))
            else type(src).__name__, "dtype": str(dtype).replace("torch.", "")}
    atomic_write_bytes(str(run_dir / HF_INFO), json.dumps(info, indent=1).encode())
    atomic_write_bytes(str(run_dir / CONFIG), cfg.to_yaml().encode())
    return run_dir


def load_run_model(run_dir) -> MoETransformer:
    """The model of RUN_DIR (a `convert --from-hf` output or a training run's out_dir), in one process."""
    run_dir = Path(run_dir)
    if not (run_dir / CONFIG).is_file():
        raise ValueError(f"{run_dir} has no {CONFIG}: give a `hecate convert --from-hf` output or a run's out_dir")
    cfg = load_config(str(run_dir / CONFIG))
    model = MoETransformer(cfg.model)
    strategy = _local_strategy(model)
    if (run_dir / INIT_WEIGHTS).is_file():
        checkpoint.import_safetensors(run_dir / INIT_WEIGHTS, model, strategy)
    elif (run_dir / "checkpoints").is_dir():
        checkpoint.load_checkpoint(str(run_dir / "checkpoints"), model, strategy)
    else:
        raise ValueError(f"{run_dir} holds neither {INIT_WEIGHTS} nor checkpoints/")
    info = run_dir / HF_INFO
    if info.is_file():
        model.hf_model_type = json.loads(info.read_text()).get("model_type")
    return model.eval()


def convert_to_hf(run_dir, out_dir, model_type: Optional[str] = None) -> str:
    """Write RUN_DIR's model as a transformers directory; returns out_dir."""
    return to_hf(load_run_model(run_dir), out_dir, model_type)
