"""`hecate generate RUN_DIR`: text from a run's newest checkpoint with the options of docs/inference.md."""
from __future__ import annotations

import warnings
from typing import Optional

import torch

from hecate.inference.run import load_config_of, routing_kwargs
from hecate.inference.sampling import generate
from hecate.inference.scmoe import parse_scmoe
from hecate.train.generate import load_run


def generate_text(run_dir, prompts: list[str], max_new_tokens: int = 200, *, temperature: float = 0.8,
                  top_k: int = 40, top_p: float = 1.0, num_samples: int = 1, seed: int = 0,
                  routing: Optional[str] = None, scmoe: Optional[str] = None, use_cache: bool = True,
                  nproc: Optional[int] = None, strategy: Optional[str] = None) -> list[str]:
    """num_samples texts per prompt (prompt order, then sample order), all prompts batched together.

    nproc: decode on that many launched ranks with the experts sharded under `strategy` (default:
    the run's when ep / fssdp, else ep); see hecate.inference.distributed."""
    from hecate.train import tasks

    cfg = load_config_of(run_dir)
    if nproc is not None:
        return generate_text_distributed(run_dir, prompts, max_new_tokens, nproc=nproc, strategy=strategy,
                                         temperature=temperature, top_k=top_k, top_p=top_p,
                                         num_samples=num_samples, seed=seed, routing=routing, scmoe=scmoe,
                                         use_cache=use_cache)["texts"]
    if strategy is not None:
        raise ValueError("--strategy chooses how --nproc ranks shard the experts; pass --nproc N with it")
    if tasks.arch_of(cfg) == "mixture_of_mamba":  # a text LM without KV cache / routing options
        if routing or scmoe or top_p != 1.0:
            raise ValueError("--routing / --scmoe / --top-p apply to transformer runs; a mixture_of_mamba run "
                             "samples with temperature and top-k only")
        from hecate.train.generate import generate_text as sample_plain

        return [t for p in prompts for t in sample_plain(run_dir, p, max_new_tokens, temperature, top_k,
                                                         num_samples, seed)]
    arch = tasks.arch_of(cfg)
    if arch == "switch_dit":
        raise ValueError(f"{run_dir} trained an image model (switch_dit); sample it with `hecate sample {run_dir}`")
    if arch != tasks.TRANSFORMER and use_cache:
        # the KV cache covers the transformer's attention types; other language models recompute
        warnings.warn(f"{arch} has no KV cache in hecate.inference: generating without one "
                      "(pass --no-cache to silence this)", RuntimeWarning, stacklevel=2)
        use_cache = False
    model, tokenizer, _ = load_run(run_dir)
    ids = [tokenizer.encode(p) for p in prompts]
    if not ids or any(not i for i in ids):
        raise ValueError("every --prompt must encode to at least one token")
    batch = [i for i in ids for _ in range(num_samples)]
    g = torch.Generator().manual_seed(seed)
    out = generate(model, batch, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                   generator=g, use_cache=use_cache, routing=routing_kwargs(run_dir, routing),
                   scmoe=parse_scmoe(scmoe) if scmoe else None)
    return [tasks.decode(cfg, tokenizer, o) for o in out]


def generate_text_distributed(run_dir, prompts: list[str], max_new_tokens: int = 200, *, nproc: int,
                              strategy: Optional[str] = None, temperature: float = 0.8, top_k: int = 40,
                              top_p: float = 1.0, num_samples: int = 1, seed: int = 0,
                              routing: Optional[str] = None, scmoe: Optional[str] = None,
                              use_cache: bool = True) -> dict:
    """generate_text on `nproc` ranks: the workers' result (hecate.inference.distributed) plus
    "texts" in prompt order, then sample order."""
    from hecate.inference.distributed import generate_distributed
    from hecate.train import tasks

    cfg = load_config_of(run_dir)
    tokenizer = load_tokenizer(run_dir, cfg)
    ids = [tokenizer.encode(p) for p in prompts]
    if not ids or any(not i for i in ids):
        raise ValueError("every --prompt must encode to at least one token")
    if num_samples < 1:
        raise ValueError(f"--samples must be >= 1, got {num_samples}")
    rows = [i for i in ids for _ in range(num_samples)]
    result = generate_distributed(run_dir, rows, max_new_tokens, nproc=nproc, strategy=strategy,
                                  temperature=temperature, top_k=top_k, top_p=top_p, seed=seed, routing=routing,
                                  scmoe=scmoe, use_cache=use_cache)
    result["texts"] = [tasks.decode(cfg, tokenizer, o) for o in result["ids"]]
    return result


def load_tokenizer(run_dir, cfg):
    """The run's tokenizer (what load_run returns), without building the model."""
    from pathlib import Path

    from hecate.train.tokenizer import TOKENIZER_FILE, BPETokenizer, ByteTokenizer

    return BPETokenizer.load(Path(run_dir) / TOKENIZER_FILE) if cfg.data.tokenizer == "bpe" else ByteTokenizer()
