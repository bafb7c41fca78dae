"""The GPU checks that need a real device, in one run that writes one JSON file.

Called by tools/gpu_check.sh after it built the extension and ran the `gpu`-marked tests
(their results come in with --prior). Steps:

  collectives  the real spAG / spRS (hecate.comm.sparse, autograd both ways, and the
               replica exchanges FSSDP uses) and all_to_all_v on NCCL at world size 1;
  fssdp_step   three training steps (two in a dry run) of a tiny MoE transformer under fssdp on NCCL (W = 1),
               fp32 and bf16 autocast, against the same model on one process; the host
               syncs of one step counted with torch.cuda.set_sync_debug_mode("warn");
  bench        the kernels against plain torch on the device: permute / unpermute, top-k
               gating, chunk pack / unpack / scatter-add, grouped GEMM TFLOP/s against the
               device's peak, attention against scaled_dot_product_attention.

--dry-run runs the same code on the CPU (gloo, tiny shapes, one repeat): CI runs it, so the
script cannot rot while no GPU is at hand. Every step runs even if an earlier one failed;
the exit status is non-zero if any failed (each failure's traceback is in the JSON). The JSON
is rewritten after every step, so a crash of the process itself (a segfault, a kill at the
time limit) keeps the steps before it; faulthandler prints where such a crash happened.
"""
from __future__ import annotations

import argparse
import faulthandler
import json
import os
import platform
import statistics
import sys
import time
import traceback
import warnings

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout


# ---- helpers --------------------------------------------------------------------------------
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_s(fn, device: torch.device, repeats: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _side_by_side(hecate_fn, torch_fn, device, repeats) -> dict:
    """Median seconds of each, and torch / hecate (> 1: hecate is faster)."""
    h = _median_s(hecate_fn, device, repeats)
    t = _median_s(torch_fn, device, repeats)
    return {"hecate_s": h, "torch_s": t, "speedup_vs_torch": t / h if h > 0 else None}


def _init_group(backend: str, device: torch.device) -> None:
    if dist.is_initialized():
        return
    kwargs = {"device_id": device} if backend == "nccl" else {}
    dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, **kwargs)


# ---- steps -----------------------------------------------------------------------------------
def collectives(device: torch.device, backend: str, quick: bool) -> dict:
    from hecate.comm.all_to_all import all_to_all_v
    from hecate.comm.sparse import (plan_sparse, sparse_all_gather, sparse_reduce_scatter,
                                    start_replica_gather, start_replica_reduce)

    _init_group(backend, device)
    C, S = (8, 64) if quick else (64, 1 << 16)
    g = torch.Generator().manual_seed(0)
    rows = torch.randn(C, S, generator=g).to(device).requires_grad_(True)
    owner = torch.zeros(C, dtype=torch.int64)
    holders = torch.ones(1, C, dtype=torch.bool)
    full, ids = sparse_all_gather(rows, owner, holders, name="check.spAG")
    assert torch.equal(full, rows.detach()) and ids.tolist() == list(range(C)), "spAG lost rows"
    weight = torch.randn(C, S, generator=g).to(device)
    (full * weight).sum().backward()  # spAG's backward is spRS
    assert torch.equal(rows.grad, weight), "spAG backward (spRS) differs"
    reduced = sparse_reduce_scatter(weight, owner, holders, name="check.spRS")
    assert torch.equal(reduced, weight), "spRS differs"
    plan = plan_sparse(owner, holders, 0)
    got, _ = start_replica_gather(rows.detach(), plan, None, async_op=True).wait()
    assert got.shape == (0, S), "a sole owner receives no replica"
    owned_grad = weight.clone()
    summed, _ = start_replica_reduce(got, owned_grad, plan, None, async_op=True).wait()
    assert torch.equal(summed, weight), "replica reduce changed the owner's gradient"
    x = torch.randn(100, S, generator=g).to(device)
    assert torch.equal(all_to_all_v(x, [100], [100]), x), "all_to_all_v differs"
    seconds = _median_s(lambda: sparse_all_gather(rows.detach(), owner, holders, check=False),
                        device, 1 if quick else 10)
    return {"ok": True, "chunks": C, "chunk_numel": S, "spag_s": seconds}


def fssdp_step(device: torch.device, backend: str, quick: bool) -> dict:
    import copy

    from hecate.comm.topology import Topology
    from hecate.models.transformer import MoETransformer, TransformerConfig
    from hecate.moe.config import MoEConfig
    from hecate.parallel import build_strategy, parallelize
    from hecate.parallel.local import LocalStrategy
    from hecate.train.engine import Engine

    _init_group(backend, device)
    moe = MoEConfig(hidden_size=64, ffn_hidden_size=128, num_experts=8, top_k=2, aux_loss_coeff=0.01)
    cfg = TransformerConfig(vocab_size=97, d_model=64, n_layers=2, n_heads=4, max_seq_len=32,
                            dense_ffn_hidden=128, moe_every=1, moe=moe)
    out = {}
    for name, dtype in (("fp32", None), ("bf16_autocast", torch.bfloat16)):
        torch.manual_seed(0)
        base = MoETransformer(cfg).to(device)
        ref = copy.deepcopy(base)
        strat = build_strategy("fssdp", Topology())
        model = parallelize(copy.deepcopy(base), strat)
        engines = (Engine(model, strat, Topology(), lr=1e-3), Engine(ref, LocalStrategy(), lr=1e-3))
        g = torch.Generator().manual_seed(1)
        losses, ref_losses, syncs = [], [], None
        steps = 2 if quick else 3
        for step in range(steps):
            tokens = torch.randint(0, 97, (4, 33), generator=g).to(device)
            x, y = tokens[:, :-1], tokens[:, 1:]
            for m, engine, sink in ((model, engines[0], losses), (ref, engines[1], ref_losses)):
                counting = m is model and step == steps - 1 and device.type == "cuda"
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    if counting:
                        torch.cuda.set_sync_debug_mode("warn")
                    try:
                        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
                            loss, _ = m.loss(x, y)
                        loss.backward()
                    finally:
                        if counting:
                            torch.cuda.set_sync_debug_mode("default")
                if counting:
                    syncs = sum("synchroniz" in str(w.message) for w in caught)
                engine.step()
                sink.append(float(loss.detach()))
        diff = max(abs(a - b) for a, b in zip(losses, ref_losses))
        tol = 2e-2 if dtype is not None else 1e-4
        assert diff <= tol, f"{name}: fssdp losses {losses} vs one process {ref_losses}"
        out[name] = {"losses": losses, "reference_losses": ref_losses, "max_abs_diff": diff,
                     "syncs_in_forward_backward": syncs}
    return {"ok": True, **out}


def bench(device: torch.device, quick: bool) -> dict:
    from hecate import ops
    from hecate.moe.experts import auto_impl, grouped_mlp
    from hecate.ops import reference as ref
    from hecate.train.metrics import default_peak_tflops

    repeats = 1 if quick else 20
    g = torch.Generator().manual_seed(0)
    T, D, E, K = (256, 64, 8, 2) if quick else (16384, 2048, 64, 2)
    out = {"shapes": {"tokens": T, "hidden": D, "experts": E, "top_k": K}}
    for dtype in (torch.float32, torch.bfloat16):
        tag = str(dtype).replace("torch.", "")
        x = torch.randn(T, D, generator=g).to(device, dtype)
        logits = torch.randn(T, E, generator=g).to(device)
        w, idx, _ = ops.topk_gating(logits, K)
        x_ND, row_map, counts = ops.permute(x, idx, E)
        n = int(counts.sum())
        out[f"permute_{tag}"] = _side_by_side(lambda: ops.permute(x, idx, E, num_rows=n),
                                              lambda: ref.permute(x, idx, E), device, repeats)
        out[f"permute_kernel_{tag}"] = _side_by_side(lambda: ops.permute(x, idx, E),
                                                     lambda: ref.permute(x, idx, E), device, repeats)
        out[f"unpermute_{tag}"] = _side_by_side(lambda: ops.unpermute(x_ND, row_map, w),
                                                lambda: ref.unpermute(x_ND, row_map, w), device, repeats)
    out["gating"] = _side_by_side(lambda: ops.topk_gating(logits, K),
                                  lambda: ref.topk_gating(logits, K, "softmax", True, None), device, repeats)
    C, S = (16, 256) if quick else (64, 1 << 20)
    buf = torch.randn(C, S, generator=g).to(device)
    ids = torch.randperm(C, generator=g)[: C // 2].to(device)
    recv = torch.randn(C // 2, S, generator=g).to(device)
    dst = torch.zeros_like(buf)
    out["pack_chunks"] = _side_by_side(lambda: ops.pack_chunks(buf, ids),
                                       lambda: buf.index_select(0, ids), device, repeats)
    out["unpack_chunks"] = _side_by_side(lambda: ops.unpack_chunks(recv, ids, dst),
                                         lambda: dst.index_copy_(0, ids, recv), device, repeats)
    out["scatter_add_chunks"] = _side_by_side(lambda: ops.scatter_add_chunks(recv, ids, dst),
                                              lambda: dst.index_add_(0, ids, recv), device, repeats)
    # Grouped GEMM (forward, swiglu): 2 * rows * D * F * 3 flops.
    G, Dg, Fg = (4, 64, 128) if quick else (8, 4096, 8192)
    rows_per = 64 if quick else 4096
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    xg = torch.randn(G * rows_per, Dg, generator=g).to(device, dtype)
    w1, w3 = (torch.randn(G, Fg, Dg, generator=g).to(device, dtype) * Dg ** -0.5 for _ in range(2))
    w2 = torch.randn(G, Dg, Fg, generator=g).to(device, dtype) * Fg ** -0.5
    counts_G = torch.full((G,), rows_per, dtype=torch.int64)  # host counts, as FSSDP passes them
    flops = 2 * G * rows_per * Dg * Fg * 3
    peak = default_peak_tflops(device)
    gemm = {"impl_auto": auto_impl(xg.device, dtype), "dtype": str(dtype), "flops": flops, "peak_tflops": peak}
    with torch.no_grad():
        for impl in ("auto", "loop"):
            s = _median_s(lambda: grouped_mlp(xg, counts_G, w1, w2, w3, "swiglu", impl=impl), device, repeats)
            gemm[f"{impl}_tflops"] = flops / s / 1e12
            gemm[f"{impl}_fraction_of_peak"] = flops / s / 1e12 / peak
    out["grouped_gemm"] = gemm
    try:
        from hecate.ops.attention import flash_attention
    except ImportError as exc:
        out["attention"] = {"skipped": f"hecate.ops.attention not importable: {exc}"}
    else:
        B, H, Sq, d = (1, 2, 64, 32) if quick else (4, 16, 2048, 128)
        q, k, v = (torch.randn(B, H, Sq, d, generator=g).to(device, dtype) for _ in range(3))
        sdpa = torch.nn.functional.scaled_dot_product_attention
        with torch.no_grad():
            out["attention"] = _side_by_side(lambda: flash_attention(q, k, v, causal=True),
                                             lambda: sdpa(q, k, v, is_causal=True), device, repeats)
    return out


# ---- driver ----------------------------------------------------------------------------------
def _run(results: dict, name: str, fn) -> None:
    start = time.perf_counter()
    try:
        value = fn()
        results["steps"][name] = {"ok": True, "seconds": time.perf_counter() - start}
        if name == "bench":
            results["bench"] = value
        else:
            results["steps"][name].update(value)
    except Exception as exc:  # noqa: BLE001 - recorded in the JSON, and the exit status says it
        results["steps"][name] = {"ok": False, "seconds": time.perf_counter() - start,
                                  "error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
        print(f"gpu_check: step {name} FAILED: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="CPU, gloo, tiny shapes (what CI runs)")
    parser.add_argument("--out", default="runs/gpu_check.json", help="the JSON file to write")
    parser.add_argument("--prior", default=None, help="JSON of the steps tools/gpu_check.sh ran before")
    parser.add_argument("--steps", default="collectives,fssdp_step,bench")
    args = parser.parse_args(argv)
    faulthandler.enable()  # a segfault (a kernel, NCCL) prints the Python stack into the step's log
    if args.dry_run:
        device, backend = torch.device("cpu"), "gloo"
    else:
        if not torch.cuda.is_available():
            print("gpu_check: no CUDA device (torch.cuda.is_available() is False); use --dry-run on a CPU",
                  file=sys.stderr)
            return 2
        device, backend = torch.device("cuda", 0), "nccl"
        torch.cuda.set_device(device)
    from hecate import ops

    results = {
        "dry_run": args.dry_run, "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "host": platform.node(), "torch": torch.__version__, "cuda": torch.version.cuda,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "capability": list(torch.cuda.get_device_capability(device)) if device.type == "cuda" else None,
        "extension_kernels": {op: ops._backend.use_extension(op, device)
                              for op in ("permute", "unpermute", "topk_gating", "pack_chunks")},
        "steps": {}, "bench": {},
    }
    if args.prior and os.path.exists(args.prior):
        with open(args.prior) as f:
            results["steps"].update(json.load(f))
    steps = {"collectives": lambda: collectives(device, backend, args.dry_run),
             "fssdp_step": lambda: fssdp_step(device, backend, args.dry_run),
             "bench": lambda: bench(device, args.dry_run)}
    names = args.steps.split(",")
    for name in names:
        if name not in steps:
            parser.error(f"--steps: unknown step {name!r}; choose from {sorted(steps)}")
    for name in names:
        # Marked unfinished first: if the process dies inside the step, the JSON names it.
        results["steps"][name] = {"ok": False, "error": "did not finish: the process died or was stopped "
                                  "at its time limit (see the step's log for faulthandler's stack)"}
        _write(results, args.out)
        _run(results, name, steps[name])
        _write(results, args.out)  # what ran so far survives a crash of a later step
    if dist.is_initialized():
        dist.destroy_process_group()
    print(f"gpu_check: {'ok' if results['ok'] else 'FAILED'}; results in {args.out}")
    return 0 if results["ok"] else 1


def _write(results: dict, out: str) -> None:
    """Write the results so far (atomically: a crash leaves the previous file whole)."""
    results["ok"] = all(step.get("ok") for step in results["steps"].values())
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    tmp = out + ".tmp"
    with open(tmp, "w") as f:
        json.dump(results, f, indent=1, default=str)
    os.replace(tmp, out)


if __name__ == "__main__":
    sys.exit(main())
