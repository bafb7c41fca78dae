"""Bytes each rank reads to load a checkpoint: whole shard files (read and sha256-checked) and
header bytes (what a shard holds), per rank, against the checkpoint's total size.

A checkpoint is saved under fssdp at --save-world ranks (one AdamW step, so expert moments are
in it too), then loaded under each --loads strategy@world on gloo workers, with
hecate.train.checkpoint.read_verified (the whole-file read) and, where present, peek_shard
(the header read) counted. Before hecate read only the shards a rank needs, every rank read the
total; run this file against an older checkout to see that.

    .venv/bin/python benchmarks/checkpoint_reads.py [--save-world 4] [--loads fssdp@4,fssdp@2,ep@2,dp@2]
        [--experts 16] [--layers 4] [--json]
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile

import torch

from hecate.comm.topology import Topology
from hecate.models.transformer import MoETransformer, TransformerConfig
from hecate.moe import MoEConfig
from hecate.parallel import build_strategy, parallelize
from hecate.testing import run_distributed
from hecate.train.engine import Engine


def _model(experts: int, layers: int) -> MoETransformer:
    torch.manual_seed(0)
    return MoETransformer(TransformerConfig(vocab_size=256, d_model=64, n_layers=layers, n_heads=4, max_seq_len=32,
                                            dense_ffn_hidden=128, moe_every=1,
                                            moe=MoEConfig(hidden_size=64, ffn_hidden_size=128,
                                                          num_experts=experts, top_k=2)))


def _build(name: str, experts: int, layers: int):
    topo = Topology()
    strategy = build_strategy(name, topo)
    model = parallelize(_model(experts, layers), strategy)
    return model, strategy, Engine(model, strategy, topo, lr=1e-3), topo


def save(rank, world, out, experts, layers):
    from hecate.train.checkpoint import save_checkpoint

    model, strategy, engine, topo = _build("fssdp", experts, layers)
    tokens = torch.randint(0, 256, (2, 17), generator=torch.Generator().manual_seed(rank))
    model.loss(tokens[:, :-1], tokens[:, 1:])[0].backward()
    engine.step()
    save_checkpoint(out, model, strategy, engine, 1, topology=topo)


def load(rank, world, out, name, experts, layers):
    import hecate.train.checkpoint as ck

    model, strategy, engine, topo = _build(name, experts, layers)
    counts = {"files": 0, "whole": 0, "header": 0}
    real_read, real_peek = ck.read_verified, getattr(ck, "peek_shard", None)

    def read(path, sha256, size):
        data = real_read(path, sha256, size)
        counts["files"] += 1
        counts["whole"] += len(data)
        return data

    def peek(*a):
        h = real_peek(*a)
        counts["header"] += h.peek_bytes
        return h

    ck.read_verified = read
    if real_peek is not None:
        ck.peek_shard = peek
    try:
        ck.load_checkpoint(out, model, strategy, engine, topo)
    finally:
        ck.read_verified = real_read
        if real_peek is not None:
            ck.peek_shard = real_peek
    return counts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--save-world", type=int, default=4)
    ap.add_argument("--loads", default="fssdp@4,fssdp@2,ep@2,dp@2", help="strategy@world, comma-separated")
    ap.add_argument("--experts", type=int, default=16)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        run_distributed(save, args.save_world, tmp, args.experts, args.layers, timeout=600)
        step_dir = os.path.join(tmp, "step_00000001")
        total = sum(os.path.getsize(os.path.join(step_dir, f)) for f in os.listdir(step_dir)
                    if f.endswith(".safetensors"))
        for spec in args.loads.split(","):
            name, world = spec.split("@")
            per_rank = run_distributed(load, int(world), tmp, name, args.experts, args.layers, timeout=600)
            results.append({"load": spec, "per_rank": per_rank})
    if args.json:
        print(json.dumps({"save": f"fssdp@{args.save_world}", "checkpoint_bytes": total, "loads": results}))
        return
    print(f"checkpoint: fssdp@{args.save_world}, {args.experts} experts x {args.layers} MoE layers, "
          f"{total} bytes in {args.save_world} shard files")
    for r in results:
        for rank, c in enumerate(r["per_rank"]):
            print(f"  load {r['load']:>8} rank {rank}: {c['files']} files read whole, {c['whole']:>9} bytes "
                  f"({c['whole'] / total:.2f} of the checkpoint) + {c['header']} header bytes")


if __name__ == "__main__":
    main()
