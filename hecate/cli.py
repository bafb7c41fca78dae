"""`hecate train | inspect | demo` (console entry point `hecate`, or `python -m hecate.cli`)."""
from __future__ import annotations

import argparse
import json
import os
import sys
import uuid
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="hecate", description="Hecate: FSSDP training for MoE models")
    sub = ap.add_subparsers(dest="command", required=True)
    tr = sub.add_parser("train", help="train a model from a YAML config")
    tr.add_argument("config", help="YAML file or preset name in configs/")
    tr.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="override a config key, e.g. --set optim.lr=1e-3 (repeatable)")
    tr.add_argument("--nproc", type=int, default=None, help="local workers (default: parallel.nproc)")
    tr.add_argument("--resume", action="store_true", help="continue from the newest checkpoint")
    tr.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)  # never launch workers
    ins = sub.add_parser("inspect", help="parameter counts and per-rank memory of a config")
    ins.add_argument("config", help="YAML file or preset name in configs/")
    ins.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ins.add_argument("--nproc", type=int, default=None, help="world size to estimate for")
    ins.add_argument("--json", action="store_true", help="print one JSON object")
    demo = sub.add_parser("demo", help="train the tiny demo MoE LM on local CPU ranks and sample from it")
    demo.add_argument("--nproc", type=int, default=4)
    demo.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    return ap


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_local(nproc: int, worker_args: list[str]) -> None:
    """Start `nproc` workers of `python -m hecate.train WORKER_ARGS` with torch's elastic launcher."""
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    # Workers share the cores; without this every worker starts one thread per core.
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    path = os.environ.get("PYTHONPATH", "")
    os.environ["PYTHONPATH"] = str(REPO_ROOT) + (os.pathsep + path if path else "")
    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=f"hecate-{uuid.uuid4().hex[:8]}",
                          rdzv_backend="c10d", rdzv_endpoint=f"127.0.0.1:{_free_port()}", max_restarts=0,
                          monitor_interval=0.2, start_method="spawn")
    elastic_launch(config, sys.executable)("-m", "hecate.train", *worker_args)


def cmd_train(args) -> int:
    from hecate.train.config import load_config

    under_launcher = "RANK" in os.environ
    if under_launcher or args.worker:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        cfg = load_config(args.config, args.overrides, world_size=world)
        from hecate.train.trainer import train

        summary = train(cfg, resume=args.resume)
        if int(os.environ.get("RANK", "0")) == 0:
            _print_summary(summary)
        return 0
    # Validate the whole layout here, before any worker process starts.
    cfg = load_config(args.config, args.overrides)
    nproc = args.nproc or cfg.parallel.nproc
    cfg.validate(nproc)
    worker_args = [args.config, *sum((["--set", o] for o in args.overrides), [])]
    if args.resume:
        worker_args.append("--resume")
    launch_local(nproc, worker_args)
    return 0


def _print_summary(summary: dict) -> None:
    first, last = summary.get("first_loss"), summary.get("last_loss")
    if first is not None:
        print(f"done in {summary['seconds']:.0f}s: loss {first:.3f} -> {last:.3f}"
              + (f", val_loss {summary['val_loss']:.3f} (ppl {summary['val_ppl']:.2f})"
                 if "val_loss" in summary else ""), flush=True)
    for i, text in enumerate(summary.get("samples") or []):
        print(f"--- sample {i} ---\n{text}\n", flush=True)


def inspect_config(config: str, overrides: list[str] | None = None, nproc: int | None = None) -> dict:
    """Counts and memory estimate for a config or preset (model built on the meta device)."""
    from hecate.train.config import load_config
    from hecate.train.model_stats import build_meta_model, memory_estimate, param_counts

    cfg = load_config(config, overrides)
    world = nproc or cfg.parallel.nproc
    cfg.validate(world)
    counts = param_counts(build_meta_model(cfg.model))
    return {**counts, "moe_layers": sum(cfg.model.is_moe_layer(i) for i in range(cfg.model.n_layers)),
            "memory_per_rank": memory_estimate(cfg, world, counts)}


def cmd_inspect(args) -> int:
    info = inspect_config(args.config, args.overrides, args.nproc)
    if args.json:
        print(json.dumps(info))
        return 0
    mem = info["memory_per_rank"]
    print(f"total params:        {info['total_params']:,}")
    print(f"active params/token: {info['active_params']:,}")
    print(f"routed expert params:{info['routed_expert_params']:>12,} in {info['moe_layers']} MoE layers")
    print(f"memory per rank ({mem['strategy']}, world {mem['world_size']}): "
          f"{mem['total_bytes'] / 2**20:,.1f} MiB (params+grads+AdamW {mem['param_state_bytes'] / 2**20:,.1f}, "
          f"transient experts {mem['transient_expert_bytes'] / 2**20:,.1f}, "
          f"activations ~{mem['activation_bytes'] / 2**20:,.1f})")
    return 0


def cmd_demo(args) -> int:
    demo = REPO_ROOT / "configs" / "demo.yaml"
    ns = argparse.Namespace(config=str(demo), overrides=args.overrides, nproc=args.nproc,
                            resume=False, worker=False)
    print(f"hecate demo: training {demo.name} on {args.nproc} local CPU ranks "
          "(fssdp, fine-grained + shared experts)", flush=True)
    return cmd_train(ns)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return {"train": cmd_train, "inspect": cmd_inspect, "demo": cmd_demo}[args.command](args)
    except (ValueError, TypeError) as e:
        if os.environ.get("HECATE_DEBUG"):
            raise
        print(f"hecate {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
