"""Bytes each rank reads to load a checkpoint, and the expert memory it allocates doing so:
whole shard files (read and sha256-checked) and header bytes (what a shard holds), per rank,
against the checkpoint's total size; the bytes of the expert rows and AdamW moments the load
assembles, and the rise of the rank's peak resident memory over the load.

A checkpoint is saved under fssdp at --save-world ranks (one AdamW step, so expert moments are
in it too), then loaded under each --loads strategy@world on gloo workers, with
hecate.train.checkpoint._read_shard (the whole-file read: which files, their bytes, the largest)
and, where present, peek_shard (the header read) counted. Expert buffers are counted where a
load creates them: checkpoint_layout.expert_buffer (kept rows and moments) and, where an older
tree's load calls it, the full-size checkpoint.assemble (rows [E, S] and each moment [E, S]);
"largest layer" is the most one layer's buffers took, "total" the sum over the load. Peak RSS:
/proc/self/status VmHWM after the load minus VmRSS before it (the high-water mark reset through
/proc/self/clear_refs after malloc_trim; Linux only, noisy by a few MB); what it holds beyond the
expert buffers (file bytes read, dense state, temporaries) is also printed as a multiple of the
largest file read, the figure reading a file once instead of twice lowers.
Before hecate read only the shards a rank needs, every rank read the total; before it
assembled only the rows a rank keeps, every rank allocated every layer's full rows and
moments; run this file against an older checkout (PYTHONPATH) to see that.

    .venv/bin/python benchmarks/checkpoint_reads.py [--save-world 4] [--loads fssdp@4,fssdp@2,ep@2,fsdp@2,dp@2]
        [--experts 16] [--layers 4] [--d-model 64] [--ffn 128] [--json]
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import tempfile
from unittest import mock

import torch

from hecate.comm.topology import Topology
from hecate.models.transformer import MoETransformer, TransformerConfig
from hecate.moe import MoEConfig
from hecate.parallel import build_strategy, parallelize
from hecate.testing import run_distributed
from hecate.train.engine import Engine


def _model(experts: int, layers: int, d_model: int, ffn: int) -> MoETransformer:
    torch.manual_seed(0)
    return MoETransformer(TransformerConfig(vocab_size=256, d_model=d_model, n_layers=layers, n_heads=4,
                                            max_seq_len=32, dense_ffn_hidden=128, moe_every=1,
                                            moe=MoEConfig(hidden_size=d_model, ffn_hidden_size=ffn,
                                                          num_experts=experts, top_k=2)))


def _build(name: str, experts: int, layers: int, d_model: int, ffn: int):
    topo = Topology()
    strategy = build_strategy(name, topo)
    model = parallelize(_model(experts, layers, d_model, ffn), strategy)
    return model, strategy, Engine(model, strategy, topo, lr=1e-3), topo


def save(rank, world, out, experts, layers, d_model, ffn):
    from hecate.train.checkpoint import save_checkpoint

    model, strategy, engine, topo = _build("fssdp", experts, layers, d_model, ffn)
    tokens = torch.randint(0, 256, (2, 17), generator=torch.Generator().manual_seed(rank))
    model.loss(tokens[:, :-1], tokens[:, 1:])[0].backward()
    engine.step()
    save_checkpoint(out, model, strategy, engine, 1, topology=topo)


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def _reset_peak() -> int:
    """Return freed heap to the OS, reset VmHWM to the current RSS; the RSS in KiB."""
    import ctypes

    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _rss_kib("VmRSS")


def load(rank, world, out, name, experts, layers, d_model, ffn):
    import hecate.train.checkpoint as ck
    import hecate.train.checkpoint_layout as layout_mod

    model, strategy, engine, topo = _build(name, experts, layers, d_model, ffn)
    counts = {"files": 0, "whole": 0, "largest": 0, "header": 0, "expert_total": 0, "expert_layer_max": 0,
              "read": []}
    real_read, real_peek = ck._read_shard, getattr(ck, "peek_shard", None)
    real_buffer = getattr(layout_mod, "expert_buffer", None)
    real_assemble, real_kept = getattr(ck, "assemble", None), getattr(ck, "assemble_kept", None)
    assembly = getattr(layout_mod, "KeptAssembly", None)
    real_allocate = assembly._allocate if assembly is not None else None

    def read(path, sha256, size):
        data = real_read(path, sha256, size)
        counts["files"] += 1
        counts["whole"] += os.path.getsize(path)
        counts["largest"] = max(counts["largest"], os.path.getsize(path))
        counts["read"].append(os.path.basename(path))
        return data

    def peek(*a):
        h = real_peek(*a)
        counts["header"] += h.peek_bytes
        return h

    layer_bytes = [0]

    def buffer(shape):
        t = real_buffer(shape)
        layer_bytes[0] += t.numel() * t.element_size()
        counts["expert_total"] += t.numel() * t.element_size()
        return t

    def layer_done():
        counts["expert_layer_max"] = max(counts["expert_layer_max"], layer_bytes[0])
        layer_bytes[0] = 0

    def assembled(real):  # an older tree: one layer's buffers per call (full-size: its result)
        def run(*a, **k):
            layer_bytes[0] = 0
            rows, state, step = real(*a, **k)
            if real is real_assemble:
                full = sum(t.numel() * t.element_size() for t in [rows, *state.values()])
                layer_bytes[0], counts["expert_total"] = full, counts["expert_total"] + full
            layer_done()
            return rows, state, step
        return run

    def allocate(self):  # this tree: one layer's buffers per allocation
        layer_bytes[0] = 0
        real_allocate(self)
        layer_done()

    # Each spy replaces its function for this load only; a tree without the function skips it.
    spies = [(ck, "_read_shard", read), (ck, "peek_shard", peek if real_peek else None),
             (layout_mod, "expert_buffer", buffer if real_buffer else None),
             (ck, "assemble", assembled(real_assemble) if real_assemble else None),
             (ck, "assemble_kept", assembled(real_kept) if real_kept else None),
             (assembly, "_allocate", allocate if assembly is not None else None)]
    with contextlib.ExitStack() as stack:
        for owner, attr, spy in spies:
            if spy is not None:
                stack.enter_context(mock.patch.object(owner, attr, spy))
        before = _reset_peak()
        ck.load_checkpoint(out, model, strategy, engine, topo)
        counts["rss_peak_rise"] = (_rss_kib("VmHWM") - before) * 1024
    return counts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--save-world", type=int, default=4)
    ap.add_argument("--loads", default="fssdp@4,fssdp@2,ep@2,fsdp@2,dp@2", help="strategy@world, comma-separated")
    ap.add_argument("--experts", type=int, default=16)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--d-model", type=int, default=64)
    ap.add_argument("--ffn", type=int, default=128, help="expert hidden size")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        shape = (args.experts, args.layers, args.d_model, args.ffn)
        run_distributed(save, args.save_world, tmp, *shape, timeout=600)
        step_dir = os.path.join(tmp, "step_00000001")
        sizes = {f: os.path.getsize(os.path.join(step_dir, f)) for f in sorted(os.listdir(step_dir))
                 if f.endswith(".safetensors")}
        total = sum(sizes.values())
        for spec in args.loads.split(","):
            name, world = spec.split("@")
            per_rank = run_distributed(load, int(world), tmp, name, *shape, timeout=600)
            results.append({"load": spec, "per_rank": per_rank})
    # fp32 rows and AdamW's two moments of every expert of every layer (what full-size assembly allocates)
    model = _model(args.experts, args.layers, args.d_model, args.ffn)
    expert_state = 3 * 4 * sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    if args.json:
        print(json.dumps({"save": f"fssdp@{args.save_world}", "checkpoint_bytes": total, "files": sizes,
                          "expert_state_bytes": expert_state, "loads": results}))
        return
    print(f"checkpoint: fssdp@{args.save_world}, {args.experts} experts x {args.layers} MoE layers, "
          f"{total} bytes in {len(sizes)} files ({', '.join(f'{f} {n}' for f, n in sizes.items())}); "
          f"expert rows + AdamW moments (fp32): {expert_state} bytes")
    for r in results:
        for rank, c in enumerate(r["per_rank"]):
            beyond = c["rss_peak_rise"] - c["expert_total"]
            print(f"  load {r['load']:>8} rank {rank}: {c['files']} files read whole ({' '.join(c['read'])}), "
                  f"{c['whole']:>9} bytes ({c['whole'] / total:.2f} of the checkpoint) + {c['header']} header bytes; "
                  f"expert buffers {c['expert_total']:>9} bytes ({c['expert_total'] / expert_state:.2f} of the expert "
                  f"state), largest layer {c['expert_layer_max']}; peak RSS rise {c['rss_peak_rise'] / 2**20:.1f} MiB, "
                  f"beyond the expert buffers {beyond / 2**20:.1f} MiB = {beyond / max(1, c['largest']):.2f} x the "
                  f"largest file read ({c['largest']})")


if __name__ == "__main__":
    main()
