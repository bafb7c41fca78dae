"""Observability on rank 0: JSONL always, TensorBoard / wandb when enabled, progress, heatmaps."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path


def flops_per_token(model_cfg, seq_len: int, active_params: int) -> float:
    """Training FLOPs per token: 6 * active params + attention scores (12 * layers * d * seq)."""
    return 6.0 * active_params + 12.0 * model_cfg.n_layers * model_cfg.d_model * seq_len


def default_peak_tflops(device) -> float:
    """A rough per-rank peak for the MFU estimate when train.peak_tflops is not set."""
    import torch

    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        return 989.0 if ("H100" in name or "H200" in name) else 312.0
    return 0.05  # one CPU core, fp32, about 50 GFLOP/s


class MetricsLogger:
    """Writes one JSON object per record to out_dir/metrics.jsonl; mirrors to TB / wandb if asked."""

    def __init__(self, out_dir: Path, logging_cfg, config_dict: dict | None = None, enabled: bool = True,
                 resume_step: int | None = None):
        self.enabled = enabled
        self.tb = self.wandb = None
        self.path = Path(out_dir) / "metrics.jsonl"
        if not enabled:
            return
        if resume_step is not None and logging_cfg.jsonl:
            truncate_metrics(self.path, resume_step)  # the steps after it are about to be run again
        self.file = open(self.path, "a") if logging_cfg.jsonl else None
        if logging_cfg.tensorboard:
            self.tb = _open_tensorboard(Path(out_dir) / "tensorboard")
        if logging_cfg.wandb:
            self.wandb = _open_wandb(logging_cfg, Path(out_dir), config_dict)

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        if self.file is not None:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()
        step = record.get("step", 0)
        nums = {k: v for k, v in record.items() if isinstance(v, (int, float)) and k != "step"}
        if self.tb is not None:
            for k, v in nums.items():
                self.tb.add_scalar(k, v, step)
        if self.wandb is not None:
            self.wandb.log(nums, step=step)

    def close(self) -> None:
        if not self.enabled:
            return
        if self.file is not None:
            self.file.close()
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()
            import wandb

            # finish() can return before wandb's service has written the run's log; teardown waits
            # for it, so a process that exits right after close() keeps every metric.
            wandb.teardown()


def truncate_metrics(path: Path, step: int) -> int:
    """Keep only the records of steps <= `step` (and drop a torn last line) in metrics.jsonl, atomically,
    so a resumed run logs every step once. Returns how many records were dropped."""
    path = Path(path)
    if not path.is_file():
        return 0
    kept, dropped = [], 0
    for line in path.read_bytes().decode("utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            dropped += 1
            continue
        s = record.get("step") if isinstance(record, dict) else None
        if isinstance(s, (int, float)) and s <= step and "summary" not in record:
            kept.append(line)
        else:
            dropped += 1
    if dropped:
        tmp = path.with_name(f".tmp.{path.name}")
        tmp.write_text("".join(line + "\n" for line in kept))
        tmp.replace(path)
    return dropped


def _warn(text: str) -> None:
    print(f"[hecate] {text}; continuing without it", file=sys.stderr, flush=True)


def _open_tensorboard(log_dir: Path):
    """A SummaryWriter under out_dir/tensorboard, or None (with a message) when tensorboard is missing."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        _warn("logging.tensorboard is on but the `tensorboard` package is not installed "
              "(pip install tensorboard)")
        return None
    return SummaryWriter(str(log_dir))


def _open_wandb(logging_cfg, out_dir: Path, config_dict: dict | None):
    """A wandb run (offline unless logging.wandb_mode says otherwise; files under out_dir/wandb), or
    None with a message when wandb is missing or cannot start: logging must never stop training."""
    try:
        import wandb
    except ImportError:
        _warn("logging.wandb is on but the `wandb` package is not installed (pip install 'hecate[wandb]')")
        return None
    try:
        return wandb.init(project=logging_cfg.wandb_project, mode=logging_cfg.wandb_mode,
                          dir=str(out_dir), config=config_dict)
    except Exception as e:  # wandb raises its own error types (login, network, service start)
        _warn(f"logging.wandb is on but wandb.init failed ({type(e).__name__}: {e})")
        return None


class ProgressDisplay:
    """A rich progress bar on a terminal; plain lines every log_every steps otherwise."""

    def __init__(self, total: int, enabled: bool, start: int = 0):
        self.enabled = enabled
        self.bar = None
        self.t0 = time.time()
        if enabled and sys.stdout.isatty():
            from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

            self.bar = Progress(TextColumn("step {task.completed}/{task.total}"), BarColumn(bar_width=20),
                                TimeElapsedColumn(), TextColumn("{task.fields[info]}"))
            self.task = self.bar.add_task("train", total=total, completed=start, info="")
            self.bar.start()

    def update(self, step: int, rec: dict) -> None:
        if not self.enabled:
            return
        info = (f"loss {rec['loss']:.3f} | {rec['tokens_per_s']:.0f} tok/s | MFU {100 * rec['mfu']:.1f}% | "
                f"imb {rec.get('expert_imbalance', 1.0):.2f} | drop {rec.get('dropped_fraction', 0.0):.3f} | "
                f"{rec['comm_mb_per_step']:.2f} MB/step")
        if self.bar is not None:
            self.bar.update(self.task, completed=step, info=info)
        else:
            print(f"step {step:5d} | {info} | {time.time() - self.t0:.0f}s", flush=True)

    def message(self, text: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.console.print(text)
        else:
            print(text, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


def write_heatmaps(loads: list[list[list[float]]], out_dir: Path) -> list[Path]:
    """One PNG per MoE layer: expert load (fraction of routed tokens) over steps.

    `loads[step][layer]` is the per-expert token count. Returns the written paths ([] without
    matplotlib, after saying so).
    """
    if not loads:
        return []
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import numpy as np
    except ImportError:
        print("[hecate] matplotlib is not installed; skipping the expert-load heatmaps "
              "(pip install matplotlib)", file=sys.stderr)
        return []
    paths = []
    for layer in range(len(loads[0])):
        m = np.asarray([step[layer] for step in loads], dtype=float)  # [steps, E of this layer]
        m = m / np.maximum(m.sum(1, keepdims=True), 1)
        fig, ax = plt.subplots(figsize=(8, 3))
        im = ax.imshow(m.T, aspect="auto", interpolation="nearest", cmap="viridis")
        ax.set_xlabel("step")
        ax.set_ylabel("expert")
        ax.set_title(f"MoE layer {layer}: share of routed tokens")
        fig.colorbar(im, ax=ax)
        path = Path(out_dir) / f"expert_load_layer{layer}.png"
        fig.savefig(path, dpi=100, bbox_inches="tight")
        plt.close(fig)
        paths.append(path)
    return paths
