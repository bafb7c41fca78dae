"""The training loop: distributed init, model + strategy + Engine, LR schedule, eval, logging.

Run on every rank (torchrun, `hecate train`, or `python -m hecate.train`). Everything a rank
does is a function of the config, its rank and the step, so a run is reproducible step by step.
"""
from __future__ import annotations

import contextlib
import math
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from hecate.comm.topology import Topology
from hecate.models.transformer import MoETransformer
from hecate.parallel import build_strategy, moe_layers, parallelize
from hecate.parallel.chunks import is_expert_parameter
from hecate.train.config import TrainConfig
from hecate.train.data import build_data, train_bpe
from hecate.train.tokenizer import TOKENIZER_FILE, BPETokenizer, ByteTokenizer
from hecate.train.engine import Engine
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


def init_distributed() -> tuple[torch.device, bool]:
    """Init the default process group from the torchrun env (NCCL on CUDA, gloo on CPU); a lone
    process without RANK gets a world of one. Returns (device, whether we created the group)."""
    use_cuda = torch.cuda.is_available()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    if dist.is_initialized():
        return device, False
    backend = "nccl" if use_cuda else "gloo"
    if "RANK" in os.environ:
        dist.init_process_group(backend)
    else:
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    return device, True


def build_model(cfg: TrainConfig, topology: Topology, device: torch.device):
    """Seeded identically on every rank, then parallelized with the configured strategy."""
    torch.manual_seed(cfg.train.seed)
    model = MoETransformer(cfg.model).to(device)
    p = cfg.parallel
    if p.strategy == "ep":
        options = {"ep_size": p.ep_size}
    elif p.strategy == "fssdp":
        options = {"options": p.fssdp}  # the FssdpOptions dataclass, as parsed
    else:
        options = {}
    strategy = build_strategy(p.strategy, None if p.strategy == "local" else topology, **options)
    return parallelize(model, strategy), strategy


def _checkpoint_module():
    """hecate.train.checkpoint when it exists (written separately); None otherwise."""
    try:
        from hecate.train import checkpoint
    except ImportError:
        return None
    return checkpoint


class Trainer:
    """Owns one rank's model, strategy, engine, data and loggers for one run."""

    def __init__(self, cfg: TrainConfig, resume: bool = False):
        self.device, self._owns_group = init_distributed()
        try:
            self._setup(cfg, resume)
        except BaseException:
            self.close()  # a bad config or checkpoint must not leave a process group behind
            raise

    def _setup(self, cfg: TrainConfig, resume: bool) -> None:
        self.cfg = cfg
        self.topology = Topology()
        self.rank, self.world = self.topology.rank, self.topology.world_size
        cfg.validate(self.world)
        if os.environ.get("OMP_NUM_THREADS", "").isdigit():  # launchers set 1 thread per worker
            torch.set_num_threads(max(1, int(os.environ["OMP_NUM_THREADS"])))
        self.out_dir = Path(cfg.train.out_dir)
        if self.rank == 0:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            (self.out_dir / "config.yaml").write_text(cfg.to_yaml())
        self.model, self.strategy = build_model(cfg, self.topology, self.device)
        if cfg.train.init:  # converted / earlier weights; a resumed run's own checkpoint overrides them below
            from hecate.train.init_weights import load_initial_weights

            load_initial_weights(cfg.train.init, self.model, self.strategy, cfg.model, self.topology)
        o = cfg.optim
        self.engine = Engine(self.model, self.strategy, self.topology, lr=o.lr, weight_decay=o.weight_decay,
                             betas=tuple(o.betas), eps=o.eps, max_grad_norm=o.max_grad_norm,
                             optimizer_impl=o.impl, dense_optimizer=cfg.parallel.dense_optimizer)
        self.tokenizer = self._build_tokenizer(resume)
        self.data = build_data(cfg, self.tokenizer)
        self.val = self.data.val_batches(cfg.train.eval_batches, self.rank, self.world)
        self.start_step = 0
        self.ckpt = _checkpoint_module()
        if resume:
            self._resume()
        is0 = self.rank == 0
        self.logger = MetricsLogger(self.out_dir, cfg.logging, cfg.to_dict(), enabled=is0)
        self.progress = ProgressDisplay(cfg.train.steps, enabled=is0 and cfg.logging.progress,
                                        start=self.start_step)

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
        if self.ckpt is None:
            raise ValueError("--resume needs hecate.train.checkpoint, which this build lacks")
        if not self.ckpt_dir.is_dir():
            raise ValueError(f"--resume: no checkpoints under {self.ckpt_dir}; train without --resume "
                             "first (with checkpoint.every > 0)")
        self.start_step = int(self.ckpt.load_checkpoint(str(self.ckpt_dir), self.model, self.strategy,
                                                        self.engine, self.topology))

    def _maybe_save(self, step: int) -> None:
        every = self.cfg.checkpoint.every
        if not every or (step % every and step != self.cfg.train.steps):
            return
        if self.ckpt is None:
            if not getattr(self, "_warned_ckpt", False):
                self.progress.message("[hecate] checkpoint.every is set but hecate.train.checkpoint "
                                      "is not available; not saving")
                self._warned_ckpt = True
            return
        self.ckpt.save_checkpoint(str(self.ckpt_dir), self.model, self.strategy, self.engine, step,
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

    def train_step(self, step: int) -> dict:
        cfg = self.cfg
        lr = lr_at(step, cfg.optim, cfg.train.steps)
        for group in self.engine.optimizer.param_groups:
            group["lr"] = lr
        self.model.train()
        A = cfg.optim.grad_accum
        loss_sum, aux_sum, imb, drop = 0.0, 0.0, [], []
        load = None
        for micro in range(A):
            x, y = self.data.train_batch(step, micro, A, self.rank, self.world)
            x, y = x.to(self.device), y.to(self.device)
            with self._autocast():
                loss, out = self.model.loss(x, y)
            (loss / A).backward()
            loss_sum += float(loss.detach()) / A
            aux_sum += float(out.aux_loss.detach()) / A
            imb += [s.imbalance for s in out.moe_stats]
            drop += [s.dropped_fraction for s in out.moe_stats]
            counts = [s.tokens_per_expert_E.float().cpu() for s in out.moe_stats]
            if counts:
                # One flat vector: layers may have different expert counts (PR-MoE pyramids).
                sizes = [c.numel() for c in counts]
                flat = torch.cat(counts)
                load = flat if load is None else load + flat
        grad_norm = self.engine.step()
        self.update_expert_bias()
        loss, aux = self._mean([loss_sum, aux_sum])
        if load is not None and self.world > 1:
            load = load.to(self._comm_device())
            dist.all_reduce(load)
            load = load.cpu()
        return {"loss": loss, "aux_loss": aux, "lr": lr, "grad_norm": grad_norm,
                "expert_imbalance": sum(imb) / len(imb) if imb else 1.0,
                "dropped_fraction": sum(drop) / len(drop) if drop else 0.0,
                "load": [part.tolist() for part in load.split(sizes)] if load is not None else None}

    @torch.no_grad()
    def update_expert_bias(self) -> None:
        """Aux-free balancing (DeepSeek-V3): after each optimizer step, sum every aux_free_bias layer's
        load_since_update_E over the data-parallel world (one all-reduce for all layers) and move its
        bias with it, so every rank applies the same update and the replicated routers stay equal."""
        layers = [layer for layer in moe_layers(self.model) if layer.config.aux_free_bias]
        if not layers:
            return
        load_LE = torch.stack([layer.load_since_update_E.to(torch.float64).cpu() for layer in layers])
        if self.world > 1:
            load_LE = load_LE.to(self._comm_device())
            dist.all_reduce(load_LE)
            load_LE = load_LE.cpu()
        for layer, load_E in zip(layers, load_LE):
            layer.update_bias(load_E)

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Mean LM loss (no aux) and perplexity on every rank's fixed validation batches."""
        self.model.eval()
        total = 0.0
        for x, y in self.val:
            x, y = x.to(self.device), y.to(self.device)
            with self._autocast():
                logits = self.model(x).logits
            total += float(F.cross_entropy(logits.flatten(0, 1).float(), y.flatten())) / len(self.val)
        self.model.train()
        (val,) = self._mean([total])
        return {"val_loss": val, "val_ppl": math.exp(min(val, 50.0))}

    def run(self) -> dict:
        """Train to cfg.train.steps; return a summary (first/last loss, eval, seconds)."""
        cfg, t = self.cfg, self.cfg.train
        counts = param_counts(self.model_meta())
        fpt = flops_per_token(cfg.model, cfg.data.seq_len, counts["active_params"])
        peak = (t.peak_tflops or default_peak_tflops(self.device)) * 1e12
        tokens_per_step = self.world * cfg.data.batch_size * cfg.data.seq_len * cfg.optim.grad_accum
        losses, loads, last_eval = [], [], {}
        stats = self.topology.stats
        window_t0, window_bytes, window_steps = time.time(), stats.total_bytes(), 0
        start = time.time()
        for step in range(self.start_step, t.steps):
            rec = self.train_step(step)
            losses.append(rec["loss"])
            if rec["load"] is not None:
                loads.append(rec["load"])
            window_steps += 1
            done = step + 1
            if done % t.log_every == 0 or done == t.steps or step == self.start_step:
                dt = max(time.time() - window_t0, 1e-9)
                comm = stats.total_bytes()
                tps = tokens_per_step * window_steps / dt
                rec.update(step=done, tokens_per_s=tps, mfu=tps * fpt / (peak * self.world),
                           comm_mb_per_step=(comm - window_bytes) / window_steps / 1e6,
                           elapsed_s=time.time() - start)
                load = rec.pop("load")
                if load is not None:
                    rec["expert_load"] = load
                self.logger.log(rec)
                self.progress.update(done, rec)
                window_t0, window_bytes, window_steps = time.time(), stats.total_bytes(), 0
            if done % t.eval_every == 0 or done == t.steps:
                last_eval = self.evaluate()
                self.logger.log({"step": done, **last_eval})
                self.progress.message(f"eval @ step {done}: val_loss {last_eval['val_loss']:.4f} "
                                      f"ppl {last_eval['val_ppl']:.2f}")
            self._maybe_save(done)
        self.progress.close()
        summary = {"first_loss": losses[0] if losses else None, "last_loss": losses[-1] if losses else None,
                   "seconds": time.time() - start, **last_eval}
        if self.rank == 0 and cfg.logging.heatmap:
            paths = write_heatmaps(loads, self.out_dir)
            if paths:
                self.progress.message(f"expert-load heatmaps: {', '.join(str(p) for p in paths)}")
        if cfg.sample.num_samples:
            summary["samples"] = self.sample()
        self.logger.log({"step": t.steps, "summary": {k: v for k, v in summary.items() if k != "samples"}})
        self.logger.close()
        return summary

    def model_meta(self):
        from hecate.train.model_stats import build_meta_model

        return build_meta_model(self.cfg.model)

    # ---- sampling -------------------------------------------------------------------------------
    def gather_local_model(self) -> MoETransformer | None:
        """Collective: a single-process copy of the trained model with all experts, on rank 0."""
        full = [self.strategy.gather_experts(layer) for layer in moe_layers(self.model)]
        if self.rank != 0:
            return None
        dense = {n: p.detach().cpu() for n, p in self.model.named_parameters() if not is_expert_parameter(p)}
        local = MoETransformer(self.cfg.model)
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
            texts.append(tok.decode(ids))
        (self.out_dir / "samples.txt").write_text("\n\n---\n\n".join(texts))
        return texts

    def close(self) -> None:
        if self._owns_group and dist.is_initialized():
            dist.destroy_process_group()


def train(cfg: TrainConfig, resume: bool = False) -> dict:
    """Train on this rank (call on every rank); return the summary."""
    trainer = Trainer(cfg, resume=resume)
    try:
        return trainer.run()
    finally:
        trainer.close()
