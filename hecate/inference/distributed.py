"""`hecate generate RUN_DIR --nproc N`: generation with the experts kept sharded over N ranks.

The parent (generate_distributed) checks the request, writes it to a private temp directory and
starts N workers with the training launcher (gloo on CPU, NCCL on GPU). Each worker (run_rank)
builds the model with its routed experts on the meta device, loads the dense parameters and only
the expert rows its strategy keeps (hecate.inference.shard_load), attaches the strategy and
decodes its share of the batch with the KV cache:

* prompts (x samples) are split into N contiguous slices, one per rank, in prompt order;
* every MoE layer's forward is the strategy's training dispatch (ep all-to-alls, fssdp plan +
  sparse gathers + all-to-alls) on decode-sized batches: one token per row per step;
* every rank runs the same number of steps (max_new_tokens; generation has no early stop) and
  the same passes per step (SCMoE: two), each one model forward; a rank without rows calls
  every MoE layer on zero tokens instead, so it still takes part in their collectives;
* the new ids are summed into one [rows, length] tensor on every rank (all-reduce) and rank 0
  writes them, with timings and bytes, to a result file the parent reads.

Greedy decoding gives the single-process tokens (the layers compute the same function; up to
float summation order, and exactly when no token is dropped: eval_capacity_factor unset).
Sampling draws each row from its own generator (seeded by --seed and the row), so the texts do
not depend on N, but differ from single-process sampling, which draws the batch from one.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Optional, Sequence

import torch

STRATEGIES = ("ep", "fssdp", "dp")  # dp: every rank holds every expert (the gathered baseline)
REQUEST, RESULT = "request.json", "result.json"


class WorkersFailed(RuntimeError):
    """The launched ranks failed; the launcher already printed the failing rank's error."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


# ---- the batch split and the per-rank decoding loop --------------------------------------------
def split_rows(num_rows: int, world: int) -> list[tuple[int, int]]:
    """[(first, count)] per rank: contiguous slices in row order, sizes differing by at most 1."""
    base, extra = divmod(num_rows, world)
    out, first = [], 0
    for r in range(world):
        n = base + (r < extra)
        out.append((first, n))
        first += n
    return out


class IdleDecoder:
    """A rank without rows: each logits() call runs every MoE layer, in forward order, on zero
    tokens, so the rank joins the collectives of the model forward its peers run."""

    def __init__(self, model, overrides: Sequence[dict] = ()):
        from hecate.parallel import moe_layers

        self.model, self.overrides = model, list(overrides)
        self.layers = moe_layers(model)
        p = next(model.parameters())
        self.empty = torch.zeros(0, 1, self.layers[0].config.hidden_size if self.layers else 0,
                                 device=p.device, dtype=p.dtype)

    def logits(self):
        from hecate.moe.overrides import stacked_overrides

        with stacked_overrides(self.model, self.overrides):
            for layer in self.layers:
                layer(self.empty)
        return None

    def append(self, ids_B) -> None:
        pass


class _ForwardCounter:
    """Counts the model forwards of a pass (calls of the first MoE layer): the peers' collectives
    only line up if every pass is exactly one forward on every rank."""

    def __init__(self, model):
        from hecate.parallel import moe_layers

        layers = moe_layers(model)
        self.calls = 0
        self.handle = layers[0].register_forward_pre_hook(self._hit) if layers else None

    def _hit(self, module, args):
        self.calls += 1

    def take(self) -> int:
        n, self.calls = self.calls, 0
        return n

    def remove(self):
        if self.handle is not None:
            self.handle.remove()


@torch.no_grad()
def decode_share(model, rows: Sequence[Sequence[int]], max_new_tokens: int, *, temperature: float = 0.0,
                 top_k: int = 0, top_p: float = 1.0, row_seeds: Sequence[int] = (),
                 routing: Optional[dict] = None, scmoe=None) -> list[list[int]]:
    """This rank's rows + max_new_tokens new ids each (rows may be empty: the rank then only
    steps its MoE layers). generate()'s loop (sampling.decode_loop) with the KV cache; what
    differs here: idle decoders for a rank without rows, one generator per row when sampling,
    and a check that every pass is exactly one model forward."""
    from hecate.inference.sampling import decode_loop, make_decoder, pass_overrides, pick_next

    model.eval()
    passes = pass_overrides(model, routing, scmoe)
    if rows:
        decoders = [make_decoder(model, rows, p, use_cache=True, reserve=max_new_tokens) for p in passes]
    else:
        decoders = [IdleDecoder(model, p) for p in passes]
    gens = [torch.Generator().manual_seed(int(s)) for s in row_seeds] if temperature > 0 else []

    def pick(logits_BV):
        if temperature > 0:  # each row from its own generator: independent of the split
            return torch.cat([pick_next(logits_BV[i:i + 1], temperature, top_k, top_p, gens[i])
                              for i in range(len(rows))])
        return pick_next(logits_BV, temperature, top_k, top_p)

    counter = _ForwardCounter(model)

    def one_forward(step):
        n = counter.take()
        if counter.handle is not None and n != 1:
            raise RuntimeError(f"step {step}: the decoder ran {n} model forwards in one pass; "
                               "distributed generation needs exactly one per pass on every rank")

    try:
        return decode_loop(decoders, rows, max_new_tokens, pick, scmoe, one_forward)
    finally:
        counter.remove()


def row_seed(seed: int, row: int) -> int:
    return (int(seed) << 20) + int(row)


# ---- one rank (a worker started by the launcher) -----------------------------------------------
def expert_bytes(model, strategy) -> int:
    from hecate.parallel import moe_layers

    return sum(p.numel() * p.element_size() for layer in moe_layers(model)
               for p in strategy.expert_parameters(layer))


def run_rank(request: dict) -> Optional[dict]:
    """The worker's body: load this rank's shard, decode its rows, gather; rank 0 returns the result."""
    import torch.distributed as dist

    from hecate.comm.all_to_all import comm_device
    from hecate.comm.topology import Topology
    from hecate.inference.run import load_config_of, routing_kwargs
    from hecate.inference.scmoe import parse_scmoe
    from hecate.inference.shard_load import build_sharded_model
    from hecate.train.run_agreement import check_run_agreement
    from hecate.train.trainer import init_distributed

    run_dir = request["run_dir"]
    cfg = load_config_of(run_dir)
    device, owns = init_distributed(cfg.train.collective_timeout_s)
    try:
        topology = Topology()
        rank, world = topology.rank, topology.world_size
        if os.environ.get("OMP_NUM_THREADS", "").isdigit():  # the launcher's share of the cores
            torch.set_num_threads(max(1, int(os.environ["OMP_NUM_THREADS"])))
        check_run_agreement("generation request", {k: json.dumps(v) for k, v in request.items()}, rank, world)
        model, strategy, step = build_sharded_model(cfg, run_dir, request["strategy"], topology, device)
        rows_all = request["rows"]
        first, count = split_rows(len(rows_all), world)[rank]
        mine = rows_all[first:first + count]
        routing = routing_kwargs(run_dir, request.get("routing"))
        scmoe = parse_scmoe(request["scmoe"]) if request.get("scmoe") else None
        stats = topology.stats
        if request.get("warmup_tokens"):  # first-call costs (kernel selection, allocator) off the clock
            decode_share(model, mine, request["warmup_tokens"], routing=routing, scmoe=scmoe)
        seconds = float("inf")
        for _ in range(max(1, int(request.get("repeats", 1)))):  # the same decode; the fastest is timed
            stats.reset()
            dist.barrier()
            start = time.perf_counter()
            out = decode_share(model, mine, request["max_new_tokens"], temperature=request["temperature"],
                               top_k=request["top_k"], top_p=request["top_p"],
                               row_seeds=[row_seed(request["seed"], first + i) for i in range(count)],
                               routing=routing, scmoe=scmoe)
            dist.barrier()
            seconds = min(seconds, time.perf_counter() - start)
        # Every row's final length is known everywhere: sum the rows into one table.
        length = max(len(r) for r in rows_all) + request["max_new_tokens"]
        dev = comm_device(None)
        table = torch.zeros(len(rows_all), length, dtype=torch.int64)
        for i, ids in enumerate(out):
            table[first + i, :len(ids)] = torch.tensor(ids, dtype=torch.int64)
        per_rank = torch.zeros(world, 3, dtype=torch.int64)
        per_rank[rank] = torch.tensor([stats.sent(), stats.received(), expert_bytes(model, strategy)])
        table, per_rank = table.to(dev), per_rank.to(dev)
        dist.all_reduce(table)
        dist.all_reduce(per_rank)
        table, per_rank = table.cpu(), per_rank.cpu()
        if rank != 0:
            return None
        new = request["max_new_tokens"] * len(rows_all)
        return {"ids": [table[i, :len(r) + request["max_new_tokens"]].tolist() for i, r in enumerate(rows_all)],
                "step": step, "strategy": strategy.name, "world_size": world, "decode_seconds": seconds,
                "new_tokens": new, "tokens_per_s": new / seconds if seconds > 0 else float("inf"),
                "sent_bytes_per_rank": per_rank[:, 0].tolist(), "received_bytes_per_rank": per_rank[:, 1].tolist(),
                "expert_bytes_per_rank": per_rank[:, 2].tolist(), "comm_rank0": stats.snapshot()}
    finally:
        if owns and dist.is_initialized():
            dist.destroy_process_group()


# ---- the parent: check, launch, read back ------------------------------------------------------
def default_strategy(cfg) -> str:
    """The run's strategy when it shards experts (ep / fssdp), else ep."""
    return cfg.parallel.strategy if cfg.parallel.strategy in ("ep", "fssdp") else "ep"


def check_request(cfg, run_dir, nproc: int, strategy: str, max_new_tokens: int, temperature: float,
                  top_k: int, top_p: float, routing: Optional[str], scmoe: Optional[str], use_cache: bool) -> None:
    """Everything the workers would trip on, raised here as one ValueError before any starts."""
    from hecate.inference.run import routing_kwargs
    from hecate.inference.sampling import check_sampling
    from hecate.inference.scmoe import parse_scmoe
    from hecate.train import tasks

    if nproc < 1:
        raise ValueError(f"--nproc={nproc} must be >= 1")
    if strategy not in STRATEGIES:
        raise ValueError(f"--strategy={strategy!r} must be one of {STRATEGIES} for distributed generation "
                         "(ep / fssdp keep the experts sharded; dp gives every rank all of them)")
    if tasks.arch_of(cfg) != tasks.TRANSFORMER:
        raise ValueError(f"{run_dir} trained a {tasks.arch_of(cfg)} model; --nproc generates transformer runs "
                         "only (it decodes with the KV cache); drop --nproc to generate in one process")
    if not use_cache:
        raise ValueError("--nproc needs the KV cache (every rank runs one forward per step); drop --no-cache")
    if max_new_tokens < 0:
        raise ValueError(f"--tokens must be >= 0, got {max_new_tokens}")
    check_sampling(temperature, top_k, top_p, prefix="--")
    routing_kwargs(run_dir, routing)  # a bad spec or a missing mask fails here, named
    if scmoe:
        parse_scmoe(scmoe)
    layers = [cfg.model.moe_config(i) for i in range(cfg.model.n_layers) if cfg.model.is_moe_layer(i)]
    if not layers:
        raise ValueError(f"{run_dir} has no MoE layer: there are no experts to shard; drop --nproc")
    if strategy == "ep":
        for i, c in enumerate(layers):
            if c.num_experts % nproc:
                raise ValueError(f"--strategy ep needs --nproc to divide every MoE layer's experts: MoE layer "
                                 f"{i} has {c.num_experts}, --nproc={nproc}; pick a divisor or --strategy fssdp")
    for i, c in enumerate(layers):
        if c.eval_capacity_factor is not None:
            import warnings

            warnings.warn(f"MoE layer {i} has eval_capacity_factor={c.eval_capacity_factor}: tokens over "
                          "capacity are dropped per rank, so --nproc output can differ from one process",
                          RuntimeWarning, stacklevel=3)
            break


def generate_distributed(run_dir, rows: list[list[int]], max_new_tokens: int, *, nproc: int,
                         strategy: Optional[str] = None, temperature: float = 0.0, top_k: int = 0,
                         top_p: float = 1.0, seed: int = 0, routing: Optional[str] = None,
                         scmoe: Optional[str] = None, use_cache: bool = True, warmup_tokens: int = 0,
                         repeats: int = 1) -> dict:
    """Decode token rows on `nproc` launched ranks; returns run_rank's result (ids in row order,
    decode seconds, tokens/s, bytes sent / received and expert bytes per rank). warmup_tokens:
    decode that many tokens first, off the clock; repeats: decode that many times and time the
    fastest (benchmarks on a shared host)."""
    from hecate.inference.run import load_config_of
    from hecate.train.launch import LaunchSpec, launch

    cfg = load_config_of(run_dir)
    strategy = strategy or default_strategy(cfg)
    check_request(cfg, run_dir, nproc, strategy, max_new_tokens, temperature, top_k, top_p, routing, scmoe,
                  use_cache)
    if not rows or any(not r for r in rows):
        raise ValueError("every prompt must encode to at least one token")
    if not (Path(run_dir) / "checkpoints").is_dir():
        raise ValueError(f"{run_dir} has no checkpoints/; train with checkpoint.every > 0 to sample later")
    workdir = tempfile.mkdtemp(prefix="hecate-generate-")  # 0700: request and result stay private
    try:
        request = {"run_dir": os.path.abspath(run_dir), "strategy": strategy, "rows": [list(map(int, r)) for r in rows],
                   "max_new_tokens": int(max_new_tokens), "temperature": float(temperature), "top_k": int(top_k),
                   "top_p": float(top_p), "seed": int(seed), "routing": routing, "scmoe": scmoe,
                   "warmup_tokens": int(warmup_tokens), "repeats": int(repeats),
                   "result": os.path.join(workdir, RESULT)}
        path = os.path.join(workdir, REQUEST)
        with open(path, "w") as f:
            json.dump(request, f)
        code = launch(LaunchSpec(nproc=nproc, worker_args=[path], module="hecate.inference.worker",
                                 command="generate"))
        if code != 0:
            raise WorkersFailed(f"hecate generate --nproc {nproc}: the workers failed (exit {code}; "
                                "the failing rank's error is printed above)", code)
        with open(request["result"]) as f:
            return json.load(f)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
