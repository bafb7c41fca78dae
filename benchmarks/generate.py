"""Generation speed with and without the KV cache, side by side in one process.

For each model size (tiny, small) the same prompts are decoded greedily for --tokens new tokens
by hecate.inference.sampling.generate with use_cache=True and use_cache=False, alternately,
--repeat times each (the fastest run of each path counts); the script prints tokens/s of each,
their ratio, whether both produced the same tokens, and the cache's bytes.
Models are randomly initialised (speed does not depend on the weights); max_seq_len covers the
whole generation, so the uncached path recomputes the full, growing context every token.

    .venv/bin/python benchmarks/generate.py --tokens 512 [--sizes tiny,small] [--batch 1] [--repeat 3] [--json]
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from hecate.inference.kv_cache import CachedDecoder
from hecate.inference.sampling import generate
from hecate.models.transformer import MoETransformer, TransformerConfig
from hecate.moe import MoEConfig

SIZES = {
    "tiny": dict(d_model=64, n_layers=2, n_heads=4, dense_ffn_hidden=128, experts=4, ffn=64),
    "small": dict(d_model=256, n_layers=4, n_heads=8, dense_ffn_hidden=512, experts=8, ffn=256),
}


def build(size: str, max_len: int) -> MoETransformer:
    s = SIZES[size]
    cfg = TransformerConfig(vocab_size=256, d_model=s["d_model"], n_layers=s["n_layers"], n_heads=s["n_heads"],
                            max_seq_len=max_len, dense_ffn_hidden=s["dense_ffn_hidden"], moe_every=1,
                            rope=True, n_kv_heads=s["n_heads"] // 2,
                            moe=MoEConfig(hidden_size=s["d_model"], ffn_hidden_size=s["ffn"],
                                          num_experts=s["experts"], top_k=2))
    torch.manual_seed(0)
    return MoETransformer(cfg).eval()


def timed(model, prompts, tokens, use_cache):
    start = time.perf_counter()
    out = generate(model, prompts, tokens, use_cache=use_cache)
    return time.perf_counter() - start, out


def cache_bytes(model, prompts, tokens) -> int:
    dec = CachedDecoder(model, prompts)
    dec.logits()
    per_slot = sum(k.numel() * k.element_size() + v.numel() * v.element_size()
                   for st in dec.states for k, v in st.cached()) // max(len(p) for p in prompts)
    return per_slot * (max(len(p) for p in prompts) + tokens)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--sizes", default="tiny,small")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--sharded", default=None, metavar="STRATEGIES",
                    help="instead: sharded vs gathered generation on --nproc ranks, e.g. ep,fssdp,dp (see "
                         "sharded_vs_gathered)")
    ap.add_argument("--nproc", type=int, default=2, help="ranks for --sharded")
    ap.add_argument("--repeat", type=int, default=3, help="time the fastest of this many decodes (each path)")
    args = ap.parse_args(argv)
    if args.sharded:
        return sharded_vs_gathered(args)
    torch.set_grad_enabled(False)
    torch.set_num_threads(args.threads)  # the host is shared: fixed threads keep both paths comparable
    g = torch.Generator().manual_seed(0)
    rows = {}
    for size in args.sizes.split(","):
        if size not in SIZES:
            raise SystemExit(f"--sizes: {size!r} is not one of {sorted(SIZES)}")
        model = build(size, args.prompt_len + args.tokens)
        prompts = [torch.randint(0, 256, (args.prompt_len - (b % 3),), generator=g).tolist()
                   for b in range(args.batch)]
        generate(model, prompts, 4, use_cache=True)  # warm-up (kernels, allocator)
        t_cache = t_full = float("inf")
        for _ in range(args.repeat):  # alternating, the fastest of each: the host's load varies
            t, a = timed(model, prompts, args.tokens, True)
            t_cache = min(t_cache, t)
            t, b = timed(model, prompts, args.tokens, False)
            t_full = min(t_full, t)
        new = args.tokens * len(prompts)
        rows[size] = {"params": sum(p.numel() for p in model.parameters()), "batch": len(prompts),
                      "new_tokens": new, "cached_tok_s": new / t_cache, "uncached_tok_s": new / t_full,
                      "speedup": t_full / t_cache, "same_tokens": a == b,
                      "kv_cache_bytes": cache_bytes(model, prompts, args.tokens)}
        if not args.json:
            r = rows[size]
            print(f"{size:>5} ({r['params']:,} params, batch {r['batch']}, {args.tokens} new tokens): "
                  f"cached {r['cached_tok_s']:.1f} tok/s, uncached {r['uncached_tok_s']:.1f} tok/s, "
                  f"speedup {r['speedup']:.1f}x, same tokens: {r['same_tokens']}, "
                  f"KV cache {r['kv_cache_bytes'] / 2**20:.2f} MiB", flush=True)
    if args.json:
        print(json.dumps({"tokens": args.tokens, "sizes": rows}))
    return 0


def sharded_vs_gathered(args) -> int:
    """Sharded vs gathered generation, same prompts: one process with every expert (the gathered
    model, --threads threads) against `hecate generate --nproc N` under each strategy of --sharded
    (ep / fssdp: experts sharded, tokens move; dp: every rank gathers all experts, no token moves).
    Each size's model is saved as a run (random weights, one local checkpoint) and loaded by every
    path. Decode tokens/s excludes start-up (measured between barriers on the ranks, after a
    4-token warm-up; the fastest of --repeat decodes); wall s includes launching the workers,
    loading and every repeat. Bytes per token: every rank's sent bytes during
    decoding (CommStats), summed, over the generated tokens."""
    import tempfile
    from pathlib import Path

    from hecate.inference.distributed import generate_distributed
    from hecate.parallel import build_strategy, parallelize
    from hecate.train.checkpoint import save_checkpoint
    from hecate.train.config import TrainConfig
    from hecate.train.generate import load_run

    torch.set_grad_enabled(False)
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    out = {}
    for size in args.sizes.split(","):
        if size not in SIZES:
            raise SystemExit(f"--sizes: {size!r} is not one of {sorted(SIZES)}")
        prompts = [torch.randint(0, 256, (args.prompt_len - (b % 3),), generator=g).tolist()
                   for b in range(args.batch)]
        with tempfile.TemporaryDirectory(prefix="hecate-bench-gen-") as run:
            model = build(size, args.prompt_len + args.tokens)
            cfg = TrainConfig(model=model.cfg)
            cfg.data.seq_len = min(cfg.data.seq_len, model.cfg.max_seq_len)
            (Path(run) / "config.yaml").write_text(cfg.to_yaml())
            local = build_strategy("local")
            save_checkpoint(str(Path(run) / "checkpoints"), parallelize(model, local), local, None, 0)
            gathered, _, _ = load_run(run)
            generate(gathered, prompts, 4, use_cache=True)  # warm-up
            t_single = float("inf")
            for _ in range(args.repeat):  # the fastest of --repeat decodes, like the ranks time theirs
                start = time.perf_counter()
                want = generate(gathered, prompts, args.tokens, use_cache=True)
                t_single = min(t_single, time.perf_counter() - start)
            new = args.tokens * len(prompts)
            full_bytes = sum(p.numel() * p.element_size() for layer in gathered.moe_layers()
                             for p in layer.experts.parameters())
            rows = {"gathered, 1 process": {"decode_tok_s": new / t_single, "wall_s": t_single, "same_tokens": True,
                                            "bytes_per_token": 0, "expert_bytes_per_rank": [full_bytes]}}
            for strategy in args.sharded.split(","):
                start = time.perf_counter()
                r = generate_distributed(run, prompts, args.tokens, nproc=args.nproc, strategy=strategy,
                                         warmup_tokens=4, repeats=args.repeat)
                rows[f"{strategy}, {args.nproc} ranks"] = {
                    "decode_tok_s": r["tokens_per_s"], "wall_s": time.perf_counter() - start,
                    "same_tokens": r["ids"] == want, "bytes_per_token": sum(r["sent_bytes_per_rank"]) / new,
                    "expert_bytes_per_rank": r["expert_bytes_per_rank"]}
        out[size] = {"batch": len(prompts), "new_tokens": new, "paths": rows}
        if not args.json:
            base = rows["gathered, 1 process"]["decode_tok_s"]
            print(f"{size} (batch {len(prompts)}, {args.tokens} new tokens each):")
            for name, r in rows.items():
                print(f"  {name:<22} decode {r['decode_tok_s']:8.1f} tok/s ({r['decode_tok_s'] / base:.2f}x), "
                      f"wall {r['wall_s']:6.1f} s, {r['bytes_per_token']:9.0f} B sent/token, expert bytes/rank "
                      f"{[round(b / 2**10) for b in r['expert_bytes_per_rank']]} KiB, same tokens: {r['same_tokens']}",
                      flush=True)
    if args.json:
        print(json.dumps({"tokens": args.tokens, "nproc": args.nproc, "sizes": out}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
