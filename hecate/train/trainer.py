"""The training loop: distributed init, model + strategy + Engine, LR schedule, eval, logging.

Run on every rank (torchrun, `hecate train`, or `python -m hecate.train`). Everything a rank
does is a function of the config, its rank and the step, so a run is reproducible step by step.
"""
from __future__ import annotations

import contextlib
import datetime
import math
import os
import signal
import time
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from hecate import ops
from hecate.comm.topology import Topology
from hecate.models.transformer import MoETransformer
from hecate.parallel import build_strategy, moe_layers, parallelize
from hecate.parallel.chunks import is_expert_parameter
from hecate.train.config import TrainConfig
from hecate.train.data import build_data, train_bpe
from hecate.train.tokenizer import TOKENIZER_FILE, BPETokenizer, ByteTokenizer
from hecate.train import checkpoint, tasks
from hecate.train.engine import Engine
from hecate.train.faults import (CollectiveTimeoutError, NonFiniteError, PeerFailedError, RunLock, StopRequest,
                                 injected_fault, nccl_watchdog_env, record_nccl_rank)
from hecate.train.run_agreement import check_run_agreement, config_entries, model_entries
from hecate.train.metrics import (MetricsLogger, ProgressDisplay, default_peak_tflops, flops_per_token,
                                  write_heatmaps)
from hecate.train.model_stats import param_counts


def lr_at(step: int, optim, total_steps: int) -> float:
    """Linear warmup from lr/warmup to lr over warmup_steps, then cosine decay to min_lr at total_steps."""
    if optim.warmup_steps and step < optim.warmup_steps:
        return optim.lr * (step + 1) / optim.warmup_steps
    span = max(1, total_steps - optim.warmup_steps)
    progress = min(1.0, (step - optim.warmup_steps) / span)
    return optim.min_lr + 0.5 * (optim.lr - optim.min_lr) * (1 + math.cos(math.pi * progress))


def local_device_index(local_rank: int, device_count: int) -> int:
    """The CUDA device of a local rank: LOCAL_RANK modulo the visible devices (a launcher that gives
    each rank its own CUDA_VISIBLE_DEVICES shows it one device, index 0). NCCL refuses two ranks
    of one group on the same GPU ("Duplicate GPU detected" at init), so more ranks per node than
    GPUs fail there, named by NCCL."""
    if device_count < 1:
        raise ValueError("no CUDA device is visible (check CUDA_VISIBLE_DEVICES)")
    return local_rank % device_count


def _rendezvous_store(world: int, timeout: datetime.timedelta):
    """The store hecate's launcher set up (HECATE_STORE: file://PATH on one node, tcp://HOST:PORT with
    --rdzv-endpoint), namespaced by restart attempt; None under torchrun (env://)."""
    spec = os.environ.get("HECATE_STORE")
    if not spec:
        return None
    if spec.startswith("file://"):
        store = dist.FileStore(spec[len("file://"):], world)
    elif spec.startswith("tcp://"):
        host, port = spec[len("tcp://"):].rsplit(":", 1)
        store = dist.TCPStore(host, int(port), world, False, timeout=timeout)
    else:
        raise ValueError(f"HECATE_STORE={spec!r} must be file://PATH or tcp://HOST:PORT")
    return dist.PrefixStore(f"hecate/attempt{os.environ.get('HECATE_ATTEMPT', '0')}", store)


def init_distributed(timeout_s: float = 300.0, nccl_trace_dir: str | None = None) -> tuple[torch.device, bool]:
    """Init the default process group (NCCL on CUDA, gloo on CPU) from hecate's launcher or the
    torchrun env, with every collective bounded by `timeout_s`; a lone process without RANK gets
    a world of one. On NCCL a timeout ends the rank with SIGABRT (torch's watchdog): the env for
    that is set first, with the flight-recorder dump in `nccl_trace_dir` (faults.nccl_watchdog_env),
    and the rank is recorded for hecate's launcher, which names the timeout when the rank dies.
    Returns (device, whether we created the group)."""
    use_cuda = torch.cuda.is_available()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = (torch.device("cuda", local_device_index(local_rank, torch.cuda.device_count())) if use_cuda
              else torch.device("cpu"))
    if use_cuda:
        torch.cuda.set_device(device)
    if dist.is_initialized():
        return device, False
    backend = "nccl" if use_cuda else "gloo"
    timeout = datetime.timedelta(seconds=timeout_s)
    if use_cuda:
        trace_prefix = os.path.join(os.path.abspath(nccl_trace_dir), "nccl_trace_rank_") if nccl_trace_dir else None
        for warning in nccl_watchdog_env(os.environ, trace_prefix):
            warnings.warn(warning, RuntimeWarning, stacklevel=2)
    # device_id binds the NCCL communicator to this rank's device at init (eager, no guessing).
    extra = {"device_id": device} if use_cuda else {}
    if "RANK" in os.environ:
        rank, world = int(os.environ["RANK"]), int(os.environ.get("WORLD_SIZE", "1"))
        store = _rendezvous_store(world, timeout)
        if store is not None:
            dist.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=timeout, **extra)
        else:
            dist.init_process_group(backend, timeout=timeout, **extra)
    else:
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout, **extra)
    # Groups made later with dist.new_group (nodes, expert-parallel groups) take torch's default
    # timeout (30 min gloo, 10 min NCCL), not the world's: make this run's timeout that default.
    _set_default_group_timeout(timeout)
    if use_cuda:
        record_nccl_rank(int(os.environ.get("RANK", "0")), timeout_s)
    return device, True


_TORCH_DEFAULT_TIMEOUTS: dict = {}


def _set_default_group_timeout(timeout: datetime.timedelta | None) -> None:
    """Set (or, with None, restore) torch's default timeout for groups made by dist.new_group."""
    from torch.distributed import distributed_c10d as c10d

    names = [n for n in ("default_pg_timeout", "default_pg_nccl_timeout")
             if isinstance(getattr(c10d, n, None), datetime.timedelta)]
    if timeout is None:
        for n, value in _TORCH_DEFAULT_TIMEOUTS.items():
            setattr(c10d, n, value)
        _TORCH_DEFAULT_TIMEOUTS.clear()
        return
    for n in names:
        _TORCH_DEFAULT_TIMEOUTS.setdefault(n, getattr(c10d, n))
        setattr(c10d, n, timeout)


def _default_store():
    """The default group's store (to tell which ranks reached a timed-out collective), or None."""
    try:
        return dist.distributed_c10d._get_default_store()
    except Exception:  # noqa: BLE001 - private API; the timeout message just names fewer ranks
        return None


def is_timeout(e: BaseException) -> bool:
    """A backend's collective timeout (gloo: "Timed out waiting ...ms for recv"), not one of ours."""
    from_backend = type(e) is RuntimeError or type(e).__module__.startswith("torch")
    text = str(e).lower()
    return from_backend and ("timed out" in text or "timeout" in text)


def build_model(cfg: TrainConfig, topology: Topology, device: torch.device):
    """Seeded identically on every rank, then parallelized with the configured strategy."""
    torch.manual_seed(cfg.train.seed)
    model = tasks.build_model(cfg).to(device)  # MoETransformer, or another zoo architecture
    p = cfg.parallel
    if p.strategy == "ep":
        options = {"ep_size": p.ep_size}
    elif p.strategy == "fssdp":
        options = {"options": p.fssdp}  # the FssdpOptions dataclass, as parsed
    elif p.strategy == "fssdp_hybrid":
        options = {"options": p.fssdp, "shard_group_size": p.shard_group_size}
    else:
        options = {}
    strategy = build_strategy(p.strategy, None if p.strategy == "local" else topology, **options)
    return parallelize(model, strategy), strategy


class Trainer:
    """Owns one rank's model, strategy, engine, data and loggers for one run."""

    def __init__(self, cfg: TrainConfig, resume: bool | str = False):
        """resume: False, True (--resume: a checkpoint must exist) or "if_any" (a launcher's restart:
        the newest checkpoint if there is one, else step 0)."""
        self.lock = None
        self.where = "start-up"
        self.device, self._owns_group = init_distributed(cfg.train.collective_timeout_s, cfg.train.out_dir)
        try:
            self._setup(cfg, resume)
        except BaseException:
            self.close()  # a bad config or checkpoint must not leave a process group behind
            raise

    def _setup(self, cfg: TrainConfig, resume: bool | str) -> None:
        self.cfg = cfg
        self.topology = Topology()
        self.rank, self.world = self.topology.rank, self.topology.world_size
        cfg.validate(self.world, self.topology.ranks_per_node)
        if os.environ.get("OMP_NUM_THREADS", "").isdigit():  # launchers set 1 thread per worker
            torch.set_num_threads(max(1, int(os.environ["OMP_NUM_THREADS"])))
        self.out_dir = Path(cfg.train.out_dir)
        # Before anything that depends on it: every rank must run the same config on the same layout.
        self.where = "start-up agreement"
        check_run_agreement("config", config_entries(cfg, self.world, self.topology.ranks_per_node),
                            self.rank, self.world)
        self._agree_on_startup_error(self._take_lock_and_write_config)
        self.model, self.strategy = build_model(cfg, self.topology, self.device)
        if cfg.train.init:  # converted / earlier weights; a resumed run's own checkpoint overrides them below
            from hecate.train.init_weights import load_initial_weights

            load_initial_weights(cfg.train.init, self.model, self.strategy, cfg.model, self.topology)
        check_run_agreement("model", model_entries(self.model, self.strategy), self.rank, self.world)
        o = cfg.optim
        self.engine = Engine(self.model, self.strategy, self.topology, lr=o.lr, weight_decay=o.weight_decay,
                             betas=tuple(o.betas), eps=o.eps, max_grad_norm=o.max_grad_norm,
                             optimizer_impl=o.impl, dense_optimizer=cfg.parallel.dense_optimizer,
                             skip_nonfinite=True)
        self.tokenizer = self._build_tokenizer(bool(resume) and self._has_checkpoint())
        self.data = tasks.build_data(cfg, self.tokenizer)
        self.val = self.data.val_batches(cfg.train.eval_batches, self.rank, self.world)
        self.start_step = 0
        self.ckpt = checkpoint  # imported at the top: a broken checkpoint module fails the run, loudly
        if resume == "if_any":
            if self._has_checkpoint():
                self._resume()
        elif resume:
            self._resume()
        is0 = self.rank == 0
        self.logger = MetricsLogger(self.out_dir, cfg.logging, cfg.to_dict(), enabled=is0,
                                    resume_step=self.start_step if resume else None)
        self.progress = ProgressDisplay(cfg.train.steps, enabled=is0 and cfg.logging.progress,
                                        start=self.start_step)
        self.routing_trace = None  # logging.trace: every rank's expert counts per step (hecate simulate --trace)
        if cfg.logging.trace and moe_layers(self.model):
            from hecate.train.routing_trace import RoutingTraceWriter

            layers = moe_layers(self.model)
            self.routing_trace = RoutingTraceWriter(cfg.logging.trace, self.topology,
                                                    [layer.config.num_experts for layer in layers],
                                                    d_model=cfg.model.d_model, top_k=layers[0].config.top_k)
        self._install_where_hooks()

    def _take_lock_and_write_config(self) -> None:
        """Rank 0: lock out_dir for this run (unless hecate's launcher holds the lock), write config.yaml."""
        if self.rank != 0:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        if not os.environ.get("HECATE_RUN_LOCK_HELD"):
            self.lock = RunLock(self.out_dir).acquire()
        (self.out_dir / "config.yaml").write_text(self.cfg.to_yaml())

    def _agree_on_startup_error(self, fn) -> None:
        """Run `fn` on every rank; if it raised anywhere, raise on every rank (the failing rank its own
        error), instead of leaving the others waiting in the next collective."""
        error = None
        try:
            fn()
        except Exception as e:  # noqa: BLE001 - re-raised below
            error = e
        if self.world > 1:
            flag = torch.tensor([self.rank + 1.0 if error else 0.0], device=self._comm_device())
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            if float(flag) and error is None:
                raise PeerFailedError(f"rank {int(float(flag)) - 1} failed at start-up (see its error)")
        if error is not None:
            raise error

    def _has_checkpoint(self) -> bool:
        ckpt = self.ckpt_dir
        return ckpt.is_dir() and any((d / "manifest.json").is_file() for d in ckpt.glob("step_*"))

    def _build_tokenizer(self, resume: bool):
        """Bytes, or the run's BPE: rank 0 trains it (train split only) and saves out_dir/tokenizer.json;
        every rank then loads that file, so all ranks hold the same one. --resume reuses the file."""
        if self.cfg.data.tokenizer == "byte":
            return ByteTokenizer()
        path = self.out_dir / TOKENIZER_FILE
        error = None
        if self.rank == 0 and not resume:
            try:
                train_bpe(self.cfg).save(path)
            except Exception as e:  # tell every rank (below) instead of leaving them waiting
                error = e
        if self.world > 1:
            flag = torch.tensor([1.0 if error else 0.0], device=self._comm_device())
            dist.all_reduce(flag)
            if float(flag) and error is None:
                raise ValueError("data.tokenizer='bpe': rank 0 could not train the tokenizer (see its error)")
        if error is not None:
            raise error
        return BPETokenizer.load(path)

    # ---- checkpoints (hecate.train.checkpoint: sharded, atomic, reshardable) ------------------------
    @property
    def ckpt_dir(self) -> Path:
        return self.out_dir / "checkpoints"

    def _resume(self) -> None:
        if not self.ckpt_dir.is_dir():
            raise ValueError(f"--resume: no checkpoints under {self.ckpt_dir}; train without --resume "
                             "first (with checkpoint.every > 0)")
        self.start_step = int(self.ckpt.load_checkpoint(str(self.ckpt_dir), self.model, self.strategy,
                                                        self.engine, self.topology))

    def _maybe_save(self, step: int, force: bool = False) -> str | None:
        """Save at checkpoint.every (and the last step), or now with `force` (a stop request).
        Never after a skipped non-finite step, and never parameters that are not finite."""
        every = self.cfg.checkpoint.every
        if not force and (not every or (step % every and step != self.cfg.train.steps)):
            return None
        if self.engine.last_step_skipped:
            self.progress.message(f"[hecate] step {step} was skipped (non-finite); not writing a checkpoint")
            return None
        self.where = f"step {step}: parameter check before saving"
        bad = torch.tensor([0.0 if all(bool(torch.isfinite(p).all()) for p in self.model.parameters()) else 1.0],
                           device=self._comm_device())
        if self.world > 1:
            dist.all_reduce(bad)
        if float(bad):
            raise NonFiniteError(f"step {step}: parameters are not finite on some rank; no checkpoint written "
                                 f"(the newest good one stays under {self.ckpt_dir})")
        self.where = f"step {step}: saving the checkpoint"
        return self.ckpt.save_checkpoint(str(self.ckpt_dir), self.model, self.strategy, self.engine, step,
                                         self.cfg.to_dict(), self.topology, keep=self.cfg.checkpoint.keep)

    # ---- steps --------------------------------------------------------------------------------
    def _autocast(self):
        if not self.cfg.train.bf16:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)

    def _mean(self, values: list[float]) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64, device=self._comm_device())
        if self.world > 1:
            dist.all_reduce(t)
        return (t / self.world).tolist()

    def _comm_device(self):
        return self.device if dist.get_backend() == "nccl" else torch.device("cpu")

    def train_step(self, step: int, stop_requested: bool = False) -> dict:
        """One optimizer step. The loss, aux loss and "some rank was asked to stop" are all-reduced
        before the optimizer step, so every rank takes the same decision on a non-finite step."""
        cfg = self.cfg
        lr = lr_at(step, cfg.optim, cfg.train.steps)
        for group in self.engine.optimizer.param_groups:
            group["lr"] = lr
        self.model.train()
        A = cfg.optim.grad_accum
        loss_sum, aux_sum, imb, drop = 0.0, 0.0, [], []
        load = None
        for micro in range(A):
            self.where = f"step {step + 1}: forward"
            x, y = self.data.train_batch(step, micro, A, self.rank, self.world)
            # Up through pinned memory without blocking: a pageable copy would first wait for the
            # GPU to finish the previous micro-batch's backward.
            x, y = ops.to_device(x, self.device), ops.to_device(y, self.device)
            with self._autocast():
                loss, out = tasks.train_loss(cfg, self.model, x, y)
            self.where = f"step {step + 1}: backward"
            (loss / A).backward()
            # Statistics stay on the device through the micro-batches: one read per step below.
            loss_sum = loss_sum + loss.detach().float() / A
            aux_sum = aux_sum + out.aux_loss.detach().float().to(loss.device) / A
            imb += [s.imbalance_tensor() for s in out.moe_stats]
            drop += [s.dropped_fraction_tensor() for s in out.moe_stats]
            counts = [s.tokens_per_expert_E.float() for s in out.moe_stats]
            if counts:
                # One flat vector: layers may have different expert counts (PR-MoE pyramids).
                sizes = [c.numel() for c in counts]
                flat = torch.cat(counts)
                load = flat if load is None else load + flat
        scalars = [loss_sum, aux_sum, torch.stack(imb).mean() if imb else loss_sum.new_ones(()),
                   torch.stack(drop).mean() if drop else loss_sum.new_zeros(())]
        packed = torch.cat([torch.stack([t.to(loss_sum.device) for t in scalars])]
                           + ([load.to(loss_sum.device)] if load is not None else [])).cpu()
        loss_sum, aux_sum, imb_mean, drop_mean = packed[:4].tolist()
        load = packed[4:] if load is not None else None
        self.where = f"step {step + 1}: loss all-reduce"
        loss, aux, stops = self._mean([loss_sum, aux_sum, 1.0 if stop_requested else 0.0])
        self.where = f"step {step + 1}: gradient sync and optimizer step"
        grad_norm = self.engine.step(loss_finite=math.isfinite(loss) and math.isfinite(aux))
        skipped = self.engine.last_step_skipped
        self.where = f"step {step + 1}: expert load all-reduce"
        if skipped:
            for layer in moe_layers(self.model):  # the skipped step's routing must not move the bias
                if layer.config.aux_free_bias:
                    layer.load_since_update_E.zero_()
        else:
            self.update_expert_bias()
        if self.routing_trace is not None and load is not None:  # this rank's counts (collective)
            self.routing_trace.record(step, load)
        if load is not None and self.world > 1:
            load = load.to(self._comm_device())
            dist.all_reduce(load)
            load = load.cpu()
        return {"loss": loss, "aux_loss": aux, "lr": lr, "grad_norm": grad_norm, "skipped": skipped,
                "stop": stops > 0,
                "expert_imbalance": imb_mean, "dropped_fraction": drop_mean,
                "load": [part.tolist() for part in load.split(sizes)] if load is not None else None}

    @torch.no_grad()
    def update_expert_bias(self) -> None:
        """Aux-free balancing (DeepSeek-V3): after each optimizer step, sum every aux_free_bias layer's
        load_since_update_E over the data-parallel world (one all-reduce for all layers) and move its
        bias with it, so every rank applies the same update and the replicated routers stay equal."""
        layers = [layer for layer in moe_layers(self.model) if layer.config.aux_free_bias]
        if not layers:
            return
        # One flat vector where the loads are (layers may count different experts: PR-MoE pyramids),
        # never read back: the biases move on the device.
        loads = [layer.load_since_update_E.to(torch.float64) for layer in layers]
        flat = torch.cat(loads)
        if self.world > 1:
            flat = flat.to(self._comm_device())
            dist.all_reduce(flat)
        for layer, load_E in zip(layers, flat.split([load.numel() for load in loads])):
            layer.update_bias(load_E)

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Mean LM loss (no aux) and perplexity on every rank's fixed validation batches."""
        self.model.eval()
        total = 0.0
        for i, (x, y) in enumerate(self.val):
            x, y = ops.to_device(x, self.device), ops.to_device(y, self.device)
            with self._autocast():
                total += float(tasks.eval_loss(self.cfg, self.model, x, y, i)) / len(self.val)
        self.model.train()
        (val,) = self._mean([total])
        return {"val_loss": val, "val_ppl": math.exp(min(val, 50.0))}

    def run(self) -> dict:
        """Train to cfg.train.steps; return a summary (first/last loss, eval, seconds, and `stopped`
        when a SIGTERM/SIGINT ended the run early after saving a checkpoint)."""
        stop = StopRequest().install()
        try:
            return self._run(stop)
        except Exception as e:
            if is_timeout(e):
                raise self._timeout_error(e) from e
            raise
        finally:
            stop.uninstall()

    def _run(self, stop: StopRequest) -> dict:
        cfg, t = self.cfg, self.cfg.train
        counts = param_counts(self.model_meta())
        fpt = flops_per_token(cfg.model, cfg.data.seq_len, counts["active_params"])
        peak = (t.peak_tflops or default_peak_tflops(self.device)) * 1e12
        tokens_per_step = self.world * cfg.data.batch_size * cfg.data.seq_len * cfg.optim.grad_accum
        losses, loads, last_eval = [], [], {}
        stats = self.topology.stats
        window_t0, window_bytes, window_steps = time.time(), stats.total_bytes(), 0
        start = time.time()
        skips, stopped_at = 0, None
        for step in range(self.start_step, t.steps):
            injected_fault(self.rank, step + 1)
            rec = self.train_step(step, stop_requested=stop.requested)
            stop_agreed = rec.pop("stop")
            done = step + 1
            if rec["skipped"]:
                skips += 1
                self._on_nonfinite(done, rec, skips)
            else:
                skips = 0
                losses.append(rec["loss"])
            if rec["load"] is not None:
                loads.append(rec["load"])
            window_steps += 1
            if done % t.log_every == 0 or done == t.steps or step == self.start_step or rec["skipped"]:
                dt = max(time.time() - window_t0, 1e-9)
                comm = stats.total_bytes()
                tps = tokens_per_step * window_steps / dt
                rec.update(step=done, tokens_per_s=tps, mfu=tps * fpt / (peak * self.world),
                           comm_mb_per_step=(comm - window_bytes) / window_steps / 1e6,
                           elapsed_s=time.time() - start)
                load = rec.pop("load")
                if load is not None:
                    rec["expert_load"] = load
                if not rec["skipped"]:
                    rec.pop("skipped")
                self.logger.log(rec)
                self.progress.update(done, rec)
                window_t0, window_bytes, window_steps = time.time(), stats.total_bytes(), 0
            if stop_agreed:  # some rank got SIGTERM/SIGINT: all save this step and leave together
                stopped_at = done
                break
            if done % t.eval_every == 0 or done == t.steps:
                self.where = f"step {done}: eval"
                last_eval = self.evaluate()
                self.logger.log({"step": done, **last_eval})
                self.progress.message(f"eval @ step {done}: val_loss {last_eval['val_loss']:.4f} "
                                      f"ppl {last_eval['val_ppl']:.2f}")
            self._maybe_save(done)
        self.progress.close()
        summary = {"first_loss": losses[0] if losses else None, "last_loss": losses[-1] if losses else None,
                   "seconds": time.time() - start, **last_eval}
        if stopped_at is not None:
            path = self._maybe_save(stopped_at, force=True)
            name = signal.Signals(stop.signum).name if stop.signum else "another rank's signal"
            self.progress.message(f"[hecate] stopped by {name} after step {stopped_at}"
                                  + (f"; checkpoint {path}" if path else "; no checkpoint (non-finite step)"))
            self.logger.close()
            return {**summary, "stopped": True, "stopped_at": stopped_at, "checkpoint": path}
        if self.rank == 0 and cfg.logging.heatmap:
            paths = write_heatmaps(loads, self.out_dir)
            if paths:
                self.progress.message(f"expert-load heatmaps: {', '.join(str(p) for p in paths)}")
        if cfg.sample.num_samples:
            self.where = "sampling"
            summary["samples"] = self.sample()
        self.logger.log({"step": t.steps, "summary": {k: v for k, v in summary.items() if k != "samples"}})
        self.logger.close()
        return summary

    def _on_nonfinite(self, step: int, rec: dict, skips: int) -> None:
        """train.on_nonfinite: skip (up to max_nonfinite_skips in a row) or stop. Every rank gets the
        same all-reduced loss and norm, so every rank takes the same branch."""
        t = self.cfg.train
        what = f"loss {rec['loss']}, aux_loss {rec['aux_loss']}, grad_norm {rec['grad_norm']}"
        if t.on_nonfinite == "stop" or skips >= t.max_nonfinite_skips:
            why = ("train.on_nonfinite=stop" if t.on_nonfinite == "stop" else
                   f"{skips} non-finite steps in a row (train.max_nonfinite_skips={t.max_nonfinite_skips})")
            self.logger.log({"step": step, "nonfinite": what, "stopped": True})
            raise NonFiniteError(f"step {step}: non-finite {what}; stopping ({why}). The step was not applied "
                                 f"and no checkpoint was written after it; the newest good checkpoint is under "
                                 f"{self.ckpt_dir}. Lower optim.lr (now {self.cfg.optim.lr})"
                                 + (" or set optim.max_grad_norm" if self.cfg.optim.max_grad_norm is None else ""))
        self.progress.message(f"[hecate] step {step}: non-finite {what}; step skipped "
                              f"({skips} of train.max_nonfinite_skips={t.max_nonfinite_skips} in a row)")

    # ---- where a rank is (named in collective-timeout errors) --------------------------------------
    def _install_where_hooks(self) -> None:
        """Forward hooks on every MoE layer name the layer (and, through a hook on its output, its
        backward) in self.where, so a timed-out collective is reported with its layer."""
        names = {id(m): n for n, m in self.model.named_modules()}
        for i, layer in enumerate(moe_layers(self.model)):
            label = f"MoE layer {i} ({names.get(id(layer), '?')})"

            def pre(module, args, label=label):
                self.where = f"{self.where.split(':')[0]}: {label} forward"

            def post(module, args, output, label=label):
                out = output[0] if isinstance(output, (tuple, list)) else output
                if torch.is_tensor(out) and out.requires_grad:
                    step = self.where.split(":")[0]

                    def back(grad, step=step):
                        self.where = f"{step}: {label} backward"

                    out.register_hook(back)

            layer.register_forward_pre_hook(pre)
            layer.register_forward_hook(post)

    def _timeout_error(self, e: BaseException) -> CollectiveTimeoutError:
        """Name the ranks that did not reach the collective: every rank that times out writes a key to the
        rendezvous store, waits a little for the others', and reports the ranks whose key never came."""
        where, timeout = self.where, self.cfg.train.collective_timeout_s
        store = _default_store()
        missing = None
        if store is not None and self.world > 1:
            try:
                store.set(f"hecate/timeout/{self.rank}", where)
                deadline = time.time() + min(10.0, timeout)
                others = [r for r in range(self.world) if r != self.rank]
                while True:
                    missing = [r for r in others if not store.check([f"hecate/timeout/{r}"])]
                    if not missing or time.time() > deadline:
                        break
                    time.sleep(0.2)
            except Exception:  # noqa: BLE001 - the store itself may be gone; report what we know
                missing = None
        who = (f"; ranks {missing} did not reach it (stopped, hung or dead), the others were waiting"
               if missing else "; every rank was waiting (a collective mismatch?)" if missing == [] else "")
        return CollectiveTimeoutError(
            f"a collective did not complete within train.collective_timeout_s={timeout:g}s at {where}{who} "
            f"(backend: {' '.join(str(e).split())[:200]})")

    def model_meta(self):
        from hecate.train.model_stats import build_meta_model

        return tasks.build_meta_model(self.cfg)

    # ---- sampling -------------------------------------------------------------------------------
    def gather_local_model(self) -> MoETransformer | None:
        """Collective: a single-process copy of the trained model with all experts, on rank 0."""
        full = [self.strategy.gather_experts(layer) for layer in moe_layers(self.model)]
        if self.rank != 0:
            return None
        dense = {n: p.detach().cpu() for n, p in self.model.named_parameters() if not is_expert_parameter(p)}
        local = tasks.build_model(self.cfg)
        # buffers too: the routers' aux-free expert_bias_E changes routing
        want = {n: b.shape for n, b in local.named_buffers()}
        dense.update({n: b.detach().cpu() for n, b in self.model.named_buffers() if want.get(n) == b.shape})
        missing = set(dict(local.named_parameters())) - set(dense)
        local.load_state_dict(dense, strict=False)
        with torch.no_grad():
            for layer, weights in zip(local.moe_layers(), full):
                for n, p in layer.experts.named_parameters():
                    p.copy_(weights[n].cpu())
        unknown = {n for n in missing if ".experts." not in n}
        if unknown:
            raise RuntimeError(f"gather_local_model: parameters {sorted(unknown)} were not found")
        return local.eval()

    def sample(self) -> list[str]:
        from hecate.train.sample import generate

        local = self.gather_local_model()
        if local is None:
            return []
        s = self.cfg.sample
        tok = self.tokenizer
        g = torch.Generator().manual_seed(self.cfg.train.seed)
        texts = []
        for _ in range(s.num_samples):
            ids = generate(local, tok.encode(s.prompt), s.max_new_tokens, s.temperature, s.top_k, g)
            texts.append(tasks.decode(self.cfg, tok, ids))
        (self.out_dir / "samples.txt").write_text("\n\n---\n\n".join(texts))
        return texts

    def close(self) -> None:
        if getattr(self, "routing_trace", None) is not None:
            self.routing_trace.close()
        if self.lock is not None:
            self.lock.release()
            self.lock = None
        if self._owns_group and dist.is_initialized():
            dist.destroy_process_group()
            _set_default_group_timeout(None)


def train(cfg: TrainConfig, resume: bool | str = False) -> dict:
    """Train on this rank (call on every rank); return the summary."""
    trainer = Trainer(cfg, resume=resume)
    try:
        return trainer.run()
    finally:
        trainer.close()
