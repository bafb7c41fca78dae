"""`hecate train | inspect | demo` (console entry point `hecate`, or `python -m hecate.cli`)."""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from hecate.train.checkpoint_io import CheckpointError
from hecate.train.faults import RunDirInUseError

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
    tr.add_argument("--init", metavar="RUN_DIR", default=None,
                    help="start from RUN_DIR's weights (`hecate convert --from-hf` output or a run's out_dir)")
    tr.add_argument("--max-restarts", type=int, default=0, metavar="N",
                    help="restart every rank from the newest checkpoint up to N times when a rank dies")
    tr.add_argument("--rdzv-endpoint", default=None, metavar="HOST:PORT",
                    help="several nodes: node 0's address; node 0 serves the rendezvous store on PORT "
                         "on all its interfaces (default: one node, no network listener)")
    tr.add_argument("--nnodes", type=int, default=1, help="nodes of a --rdzv-endpoint run")
    tr.add_argument("--node-rank", type=int, default=0, help="this node's index in [0, --nnodes)")
    tr.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)  # never launch workers
    # the launcher's restarts: resume when a checkpoint exists, else start over (metrics truncated)
    tr.add_argument("--resume-if-any", action="store_true", help=argparse.SUPPRESS)
    ins = sub.add_parser("inspect", help="parameter counts and per-rank memory of a config or model preset")
    ins.add_argument("config", nargs="?", help="YAML file, run directory, config name in configs/, or model-zoo preset name")
    ins.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="override a config key (config files only)")
    ins.add_argument("--nproc", type=int, default=None, help="world size to estimate for")
    ins.add_argument("--strategy", default=None, help="strategy to estimate for (local|dp|ep|fsdp|fssdp)")
    ins.add_argument("--json", action="store_true", help="print one JSON object")
    ins.add_argument("--list", action="store_true", help="list the configs and model-zoo presets")
    demo = sub.add_parser("demo", help="train the tiny demo MoE LM on local CPU ranks and sample from it")
    demo.add_argument("--nproc", type=int, default=4)
    demo.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    gen = sub.add_parser("generate", help="sample text from a training run's newest checkpoint")
    gen.add_argument("run_dir", help="the run's out_dir (holds config.yaml and checkpoints/)")
    gen.add_argument("--prompt", action="append", default=None,
                     help="prompt text (repeatable: prompts are batched together; default 'def ')")
    gen.add_argument("--tokens", type=int, default=200, help="new tokens per sample")
    gen.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    gen.add_argument("--top-k", type=int, default=40, help="0 = no top-k cut")
    gen.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1 = off)")
    gen.add_argument("--samples", type=int, default=1)
    gen.add_argument("--seed", type=int, default=0)
    _add_routing_argument(gen)
    gen.add_argument("--scmoe", default=None, metavar="BETA,ALPHA[,weak=rankK|topK]",
                     help="SCMoE self-contrast decoding (docs/inference.md)")
    gen.add_argument("--no-cache", action="store_true", help="recompute the whole context every token")
    gen.add_argument("--nproc", type=int, default=None,
                     help="decode on N local ranks with the experts kept sharded (docs/inference.md)")
    gen.add_argument("--strategy", default=None, choices=("ep", "fssdp", "dp"),
                     help="with --nproc: how the ranks hold the experts (default: the run's if ep/fssdp, else ep; "
                          "dp = every rank holds all experts)")
    ev = sub.add_parser("eval", help="validation loss of a training run's newest checkpoint")
    ev.add_argument("run_dir", help="the run's out_dir (holds config.yaml and checkpoints/)")
    ev.add_argument("--batches", type=int, default=None, help="validation batches (default train.eval_batches)")
    ev.add_argument("--json", action="store_true", help="print one JSON object")
    _add_routing_argument(ev)
    prof = sub.add_parser("profile", help="rank experts by how much more prompt set A routes to them than "
                                          "set B; save a routing mask (MoTE)")
    prof.add_argument("run_dir")
    prof.add_argument("--prompts", required=True, metavar="A.txt", help="one prompt per line")
    prof.add_argument("--against", required=True, metavar="B.txt", help="one prompt per line")
    prof.add_argument("--name", default="mote", help="mask name: RUN_DIR/masks/NAME.json (--routing mask=NAME)")
    prof.add_argument("--disable", type=int, default=1, help="experts per layer the mask disables")
    _add_routing_argument(prof)
    pr = sub.add_parser("prune", help="drop the least-used experts per layer into a smaller run directory")
    pr.add_argument("run_dir")
    pr.add_argument("--keep", type=int, required=True, help="experts kept per MoE layer")
    pr.add_argument("--calib", required=True, metavar="FILE", help="calibration prompts, one per line")
    pr.add_argument("--out", required=True, metavar="OUT_RUN", help="the pruned run directory to write")
    pr.add_argument("--batches", type=int, default=None, help="validation batches for the before/after loss")
    smp = sub.add_parser("sample", help="draw images from a trained image model's newest checkpoint (Switch-DiT)")
    smp.add_argument("run_dir", help="the run's out_dir (holds config.yaml and checkpoints/)")
    smp.add_argument("--images", type=int, default=8)
    smp.add_argument("--labels", type=int, nargs="*", default=None, help="class id per image")
    smp.add_argument("--out", default=None, help="grid image path (default RUN_DIR/samples.ppm)")
    smp.add_argument("--seed", type=int, default=0)
    conv = sub.add_parser("convert", help="Hugging Face checkpoints in and out (docs/hf.md)")
    way = conv.add_mutually_exclusive_group(required=True)
    way.add_argument("--from-hf", metavar="HF_DIR", help="a transformers model directory to convert")
    way.add_argument("--to-hf", metavar="RUN_DIR", help="a `convert --from-hf` output or a training run's out_dir")
    conv.add_argument("--out", required=True, help="the directory to write")
    conv.add_argument("--model-type", default=None, help="--to-hf: HF architecture (default: inferred)")
    sim = sub.add_parser("simulate", help="rank FSSDP policies at cluster scale with the cost model")
    from hecate.sim.report import add_arguments

    add_arguments(sim)
    return ap


def _add_routing_argument(parser) -> None:
    parser.add_argument("--routing", default=None, metavar="SPEC",
                        help="routing overrides, e.g. top_k=1,disable=3,disable=0:2,force=5,temperature=2,"
                             "rank=2,mask=NAME (docs/inference.md)")


def cmd_generate(args) -> int:
    from hecate.inference.distributed import WorkersFailed
    from hecate.inference.generate import generate_text

    try:
        texts = generate_text(args.run_dir, args.prompt or ["def "], args.tokens, temperature=args.temperature,
                              top_k=args.top_k, top_p=args.top_p, num_samples=args.samples, seed=args.seed,
                              routing=args.routing, scmoe=args.scmoe, use_cache=not args.no_cache,
                              nproc=args.nproc, strategy=args.strategy)
    except WorkersFailed as e:  # the launcher printed the failing rank's error
        return e.exit_code
    for i, text in enumerate(texts):
        print(f"--- sample {i} ---\n{text}")
    return 0


def cmd_profile(args) -> int:
    from hecate.inference.profile import profile_run

    info = profile_run(args.run_dir, args.prompts, args.against, args.name, args.disable, args.routing)
    for layer in info["layers"]:
        top = ", ".join(f"{e} ({layer['difference'][e]:+.3f})" for e in layer["ranking"][:4])
        print(f"MoE layer {layer['layer']}: experts by freq(A) - freq(B): {top}; "
              f"disabled {info['disabled'][str(layer['layer'])]}")
    print(f"wrote {info['path']}; apply with --routing mask={info['name']}")
    return 0


def cmd_prune(args) -> int:
    from hecate.inference.profile import prune_run

    r = prune_run(args.run_dir, args.keep, args.calib, args.out, args.batches)
    print(f"kept {r['keep']} experts per layer {r['kept_experts']}: params {r['params_before']:,} -> "
          f"{r['params_after']:,} ({r['params_removed']:,} removed); val_loss {r['val_loss_before']:.4f} -> "
          f"{r['val_loss_after']:.4f}; wrote {r['out']}")
    return 0


def cmd_eval(args) -> int:
    from hecate.inference.run import evaluate_run

    info = evaluate_run(args.run_dir, args.routing, args.batches)
    if args.json:
        print(json.dumps(info))
    else:
        print(f"step {info['step']}: val_loss {info['val_loss']:.4f} (ppl {info['val_ppl']:.2f})"
              + (f" with --routing {info['routing']}" if info["routing"] else ""))
    return 0


def cmd_sample(args) -> int:
    from hecate.train.sample_images import sample_images

    info = sample_images(args.run_dir, args.images, args.out, args.seed, args.labels)
    print(f"{info['num_images']} images from step {info['step']}: {info['image']} ({info['tensors']})")
    return 0


def cmd_convert(args) -> int:
    from hecate.integrations.hf_run import convert_from_hf, convert_to_hf

    if args.from_hf:
        out = convert_from_hf(args.from_hf, args.out)
        print(f"wrote {out}; train with: hecate train {out}/config.yaml --init {out}")
    else:
        print(f"wrote {convert_to_hf(args.to_hf, args.out, args.model_type)}")
    return 0


def cmd_simulate(args) -> int:
    from hecate.sim.report import main as simulate_main

    return simulate_main(args)


def cmd_train(args) -> int:
    from hecate.train.config import load_config

    under_launcher = "RANK" in os.environ
    if under_launcher or args.worker:
        return _run_worker(args)
    from hecate.train.launch import LaunchSpec, launch
    from hecate.train.preflight import preflight
    from hecate.train.stages import is_stage_config

    if is_stage_config(args.config):  # progressive training (Uni-MoE): hecate.train.stages
        return _launch_stages(args, LaunchSpec, launch)
    # Check everything that can be checked here, before any worker process starts.
    cfg = load_config(args.config, args.overrides)
    nproc = cfg.parallel.nproc if args.nproc is None else args.nproc
    if nproc < 1:
        raise ValueError(f"--nproc={nproc} must be >= 1")
    spec = LaunchSpec(nproc=nproc, worker_args=[], max_restarts=args.max_restarts,
                      rdzv_endpoint=args.rdzv_endpoint, nnodes=args.nnodes, node_rank=args.node_rank).validate()
    cfg.validate(nproc * args.nnodes, ranks_per_node=nproc)
    worker_args = [args.config, *sum((["--set", o] for o in args.overrides), [])]
    if args.resume:
        worker_args.append("--resume")
    spec.worker_args = worker_args
    lock = preflight(cfg, nproc * args.nnodes, resume=args.resume, node_rank=args.node_rank)
    try:
        return launch(spec)
    finally:
        if lock is not None:
            lock.release()


def _launch_stages(args, LaunchSpec, launch) -> int:
    """`hecate train STAGED_CONFIG`: check the config here, lock out_dir, then launch workers like any run."""
    from hecate.train.preflight import preflight_stages
    from hecate.train.stages import check_world, load_stage_config, stage_nproc

    cfg = load_stage_config(args.config, args.overrides)
    nproc = stage_nproc(args.config, args.overrides) if args.nproc is None else args.nproc
    if nproc < 1:
        raise ValueError(f"--nproc={nproc} must be >= 1")
    check_world(cfg, nproc * args.nnodes)
    worker_args = [args.config, *sum((["--set", o] for o in args.overrides), [])] + (["--resume"] if args.resume else [])
    spec = LaunchSpec(nproc=nproc, worker_args=worker_args, max_restarts=args.max_restarts,
                      rdzv_endpoint=args.rdzv_endpoint, nnodes=args.nnodes, node_rank=args.node_rank).validate()
    lock = preflight_stages(cfg, resume=args.resume, node_rank=args.node_rank)
    try:
        return launch(spec)
    finally:
        if lock is not None:
            lock.release()


def _run_worker(args) -> int:
    """One rank: train, and turn any error into one line (or a record for the launcher), exit 2."""
    from hecate.train.faults import EXIT_STOPPED, die_with_parent, report_worker_error

    if os.environ.get("HECATE_LAUNCHER_PID"):
        die_with_parent(int(os.environ["HECATE_LAUNCHER_PID"]))
    elif os.environ.get("TORCHELASTIC_RUN_ID"):  # under torchrun: die with its agent too
        die_with_parent(os.getppid())
    try:
        from hecate.train.config import load_config
        from hecate.train.trainer import train

        from hecate.train.stages import is_stage_config, load_stage_config, train_stages

        world = int(os.environ.get("WORLD_SIZE", "1"))
        resume = "if_any" if args.resume_if_any else args.resume
        if is_stage_config(args.config):
            summary = train_stages(load_stage_config(args.config, args.overrides), resume=resume)
        else:
            cfg = load_config(args.config, args.overrides, world_size=world)
            summary = train(cfg, resume=resume)
    except KeyboardInterrupt:  # Ctrl-C before training started: nothing to save
        return 130
    except Exception as e:  # noqa: BLE001 - every error becomes one line naming the rank
        if os.environ.get("HECATE_DEBUG"):
            raise
        return report_worker_error(e)
    if int(os.environ.get("RANK", "0")) == 0:
        _print_summary(summary)
    return EXIT_STOPPED if summary.get("stopped") else 0


def _print_summary(summary: dict) -> None:
    if summary.get("stopped"):
        print(f"stopped after step {summary['stopped_at']}"
              + (f"; checkpoint {summary['checkpoint']}" if summary.get("checkpoint") else ""), flush=True)
        return
    first, last = summary.get("first_loss"), summary.get("last_loss")
    if "stages" in summary:  # a staged run (hecate.train.stages)
        print(f"stages {' -> '.join(summary['stages'])}: {summary['steps']} steps"
              + (f" (resumed after step {summary['resumed_from']})" if summary.get("resumed_from") is not None
                 else "") + f"; checkpoint {summary['checkpoint']}", flush=True)
    if first is not None:
        print(f"done in {summary['seconds']:.0f}s: loss {first:.3f} -> {last:.3f}"
              + (f", val_loss {summary['val_loss']:.3f} (ppl {summary['val_ppl']:.2f})"
                 if "val_loss" in summary else ""), flush=True)
    for i, text in enumerate(summary.get("samples") or []):
        print(f"--- sample {i} ---\n{text}\n", flush=True)


def _is_config(name: str) -> bool:
    from hecate.train.config import configs_dir

    return Path(name).is_file() or (configs_dir() / f"{name}.yaml").is_file() or name.endswith((".yaml", ".yml"))


def inspect_config(config: str, overrides: list[str] | None = None, nproc: int | None = None,
                   strategy: str | None = None) -> dict:
    """Counts and memory estimate for a config file, a configs/ name, or a model-zoo preset
    (models are built on the meta device, so paper-size presets take seconds). A run directory
    (e.g. one `hecate prune` wrote) means its config.yaml."""
    if Path(config).is_dir():
        if not (Path(config) / "config.yaml").is_file():
            raise ValueError(f"{config} is a directory without a config.yaml: pass a training run "
                             "directory, a config file, a config name or a model-zoo preset")
        config = str(Path(config) / "config.yaml")
    if not _is_config(config):
        from hecate.models.registry import PRESETS, get_preset

        try:
            get_preset(config)
        except ValueError:
            raise ValueError(_unknown_name(config, sorted(PRESETS))) from None
        if overrides:
            raise ValueError(f"--set applies to config files, not to the model preset {config!r}")
        return inspect_preset(config, nproc, strategy)
    from hecate.train.config import load_config
    from hecate.train.model_stats import build_meta_model, memory_estimate, param_counts
    from hecate.train.stages import inspect_stages, is_stage_config, load_stage_config, stage_nproc

    if is_stage_config(config):  # a staged run (Uni-MoE): per-stage trainable parameters too
        overrides = [*(overrides or []), *([f"parallel.strategy={strategy}"] if strategy is not None else [])]
        return inspect_stages(load_stage_config(config, overrides),
                              stage_nproc(config, overrides) if nproc is None else nproc)
    if strategy is not None:
        overrides = [*(overrides or []), f"parallel.strategy={strategy}"]
    cfg = load_config(config, overrides)
    world = cfg.parallel.nproc if nproc is None else nproc
    if world < 1:
        raise ValueError(f"--nproc={world} must be >= 1")
    cfg.validate(world)
    from hecate.train import tasks

    if tasks.arch_of(cfg) != tasks.TRANSFORMER:  # other model-zoo architectures
        return tasks.inspect(cfg, world)
    counts = param_counts(build_meta_model(cfg.model))
    return {**counts, "moe_layers": sum(cfg.model.is_moe_layer(i) for i in range(cfg.model.n_layers)),
            "memory_per_rank": memory_estimate(cfg, world, counts)}


def _unknown_name(name: str, presets: list[str]) -> str:
    import difflib

    from hecate.train.config import configs_dir

    configs = sorted(q.stem for q in configs_dir().glob("*.yaml"))
    hint = difflib.get_close_matches(name, configs + presets, n=1)
    return (f"{name!r} is neither a config file, a config in {configs_dir()}, nor a model-zoo preset"
            + (f"; did you mean {hint[0]!r}?" if hint else "") + " (see `hecate inspect --list`)")


def inspect_preset(name: str, nproc: int | None = None, strategy: str | None = None) -> dict:
    """total/active params of a model-zoo preset built on the meta device, and a per-rank estimate:
    the full TrainConfig memory estimate for arch `transformer`, parameters + optimizer state for
    other archs, under `strategy` (default fssdp) on `nproc` ranks (default parallel.nproc)."""
    from hecate.models.registry import build_model, count_parameters, get_preset, make_config
    from hecate.moe.layer import MoELayer
    from hecate.train.config import STRATEGIES, ParallelConfig, TrainConfig
    from hecate.train.model_stats import expert_state_estimate, memory_estimate

    preset = get_preset(name)
    world = ParallelConfig().nproc if nproc is None else nproc
    strategy = strategy or ParallelConfig().strategy
    if strategy not in STRATEGIES:
        raise ValueError(f"--strategy={strategy!r} must be one of {STRATEGIES}")
    if world < 1:
        raise ValueError(f"--nproc={world} must be >= 1")
    model = build_model(preset.arch, preset.config, device="meta")
    layers = [m for m in model.modules() if isinstance(m, MoELayer)]
    info = {"preset": name, "arch": preset.arch, **count_parameters(model), "moe_layers": len(layers),
            "routed_expert_params": sum(p.numel() for m in layers for p in m.experts.parameters())}
    if preset.arch == "transformer":
        cfg = TrainConfig(model=make_config(preset.arch, preset.config))
        cfg.parallel.strategy, cfg.parallel.nproc = strategy, world
        cfg.data.seq_len, cfg.data.batch_size = cfg.model.max_seq_len, 1  # one full-length sequence
        cfg.validate(world)
        info["memory_per_rank"] = memory_estimate(cfg, world)
        return info
    if strategy == "local" and world != 1:
        raise ValueError(f"--strategy=local needs --nproc 1, got {world}")
    for m in layers:
        E = m.config.num_experts
        if strategy == "ep" and E % world:
            raise ValueError(f"--nproc={world} must divide num_experts={E} of every MoE layer for --strategy=ep")
    info["memory_per_rank"] = expert_state_estimate(model, strategy, world)
    return info


def list_presets() -> dict:
    """Config files in configs/ and model-zoo presets (name -> arch, description)."""
    from hecate.models.registry import PRESETS, _load_zoo
    from hecate.train.config import configs_dir

    _load_zoo()
    return {"configs": sorted(q.stem for q in configs_dir().glob("*.yaml")),
            "presets": {n: {"arch": p.arch, "description": p.description} for n, p in sorted(PRESETS.items())}}


def cmd_inspect(args) -> int:
    if args.list:
        listing = list_presets()
        if args.json:
            print(json.dumps(listing))
            return 0
        print("configs (configs/*.yaml):")
        for name in listing["configs"]:
            print(f"  {name}")
        print("model-zoo presets:")
        for name, p in listing["presets"].items():
            print(f"  {name:<28} {p['arch']:<16} {p['description']}")
        return 0
    if not args.config:
        raise ValueError("inspect needs a CONFIG_OR_PRESET argument (or --list)")
    info = inspect_config(args.config, args.overrides, args.nproc, args.strategy)
    if args.json:
        print(json.dumps(info))
        return 0
    mem = info["memory_per_rank"]
    if "preset" in info:
        print(f"preset {info['preset']} (arch {info['arch']})")
    print(f"total params:        {info['total_params']:,}")
    print(f"active params/token: {info['active_params']:,}")
    print(f"routed expert params:{info['routed_expert_params']:>12,} in {info['moe_layers']} MoE layers")
    if "attention_flops_per_seq" in info:  # forward attention cores, one max_seq_len sequence
        print(f"attention FLOPs/seq: {info['active_attention_flops_per_seq']:,} active of "
              f"{info['attention_flops_per_seq']:,}")
    for st in info.get("stages", []):  # a staged config
        print(f"stage {st['name']:<8} {st['steps']:>6} steps, lr {st['lr']:g}: trains "
              f"{st['trainable_params']:,} params (the rest frozen)")
    line = (f"memory per rank ({mem['strategy']}, world {mem['world_size']}): "
            f"{mem['total_bytes'] / 2**20:,.1f} MiB (params+grads+AdamW {mem['param_state_bytes'] / 2**20:,.1f}, "
            f"transient experts {mem['transient_expert_bytes'] / 2**20:,.1f}")
    if "activation_bytes" in mem:
        line += f", activations ~{mem['activation_bytes'] / 2**20:,.1f}"
    print(line + ")")
    return 0


def cmd_demo(args) -> int:
    demo = REPO_ROOT / "configs" / "demo.yaml"
    ns = argparse.Namespace(config=str(demo), overrides=args.overrides, nproc=args.nproc,
                            resume=False, worker=False, max_restarts=0, rdzv_endpoint=None, nnodes=1,
                            node_rank=0, resume_if_any=False)
    print(f"hecate demo: training {demo.name} on {args.nproc} local CPU ranks "
          "(fssdp, fine-grained + shared experts)", flush=True)
    return cmd_train(ns)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "train" and args.init:  # a config key, so launched workers receive it too
        args.overrides.append(f"train.init={os.path.abspath(args.init)}")
    try:
        commands = {"train": cmd_train, "inspect": cmd_inspect, "demo": cmd_demo, "simulate": cmd_simulate, "convert": cmd_convert,
                    "generate": cmd_generate, "sample": cmd_sample, "eval": cmd_eval,
                    "profile": cmd_profile, "prune": cmd_prune}
        return commands[args.command](args)
    except (ValueError, TypeError, CheckpointError, RunDirInUseError) as e:
        if os.environ.get("HECATE_DEBUG"):
            raise
        print(f"hecate {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
