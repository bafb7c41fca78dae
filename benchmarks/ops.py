"""hecate._C CPU kernels against the plain-PyTorch reference, side by side in one run.

Default problem: 16384 tokens x 1024 hidden, 64 experts, top-2, fp32 and bf16.
Prints a table of median times and speed-ups (reference time / extension time);
`--json` prints one JSON object with the ratios on the last line.
Both sides run with the same torch.set_num_threads value.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

import hecate.ops as ops
from hecate.ops import reference as ref


def _median_seconds(fn, repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _cases(T: int, D: int, E: int, K: int, dtype: torch.dtype):
    """(name, extension fn, reference fn) triples for one dtype."""
    gen = torch.Generator().manual_seed(0)
    logits_TE = torch.randn(T, E, generator=gen).to(dtype)
    x_TD = torch.randn(T, D, generator=gen).to(dtype)
    weights_TK, indices_TK, _ = ref.topk_gating(logits_TE, K)
    grad_TD = torch.randn(T, D, generator=gen).to(dtype)
    C, S = 64, 1 << 18  # 64 chunks of 256 Ki elements: one MoE layer's experts
    buffer_CS = torch.randn(C, S, generator=gen).to(dtype)
    chunk_ids_n = torch.randperm(C, generator=gen)[: C // 2]

    def gating(impl):
        return lambda: impl.topk_gating(logits_TE, K, "softmax", True, None)

    def histogram(impl):
        return lambda: impl.expert_histogram(indices_TK, E)

    def permute_roundtrip(impl):
        def run():
            x = x_TD.detach().requires_grad_()
            w = weights_TK.detach().requires_grad_()
            x_ND, row_map_TK, _ = impl.permute(x, indices_TK, E, -1, None)
            out_TD = impl.unpermute(x_ND, row_map_TK, w)  # experts = identity here
            out_TD.backward(grad_TD)
        return run

    def pack_unpack(impl):
        out_CS = torch.empty_like(buffer_CS)

        def run():
            packed_nS = impl.pack_chunks(buffer_CS, chunk_ids_n)
            impl.unpack_chunks(packed_nS, chunk_ids_n, out_CS)
        return run

    return [
        ("gating", gating(ops), gating(ref)),
        ("histogram", histogram(ops), histogram(ref)),
        ("permute+unpermute fwd+bwd", permute_roundtrip(ops), permute_roundtrip(ref)),
        ("pack+unpack", pack_unpack(ops), pack_unpack(ref)),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--experts", type=int, default=64)
    parser.add_argument("--topk", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch.set_num_threads for both sides (default: keep torch's value)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", action="store_true", help="print the ratios as JSON on the last line")
    args = parser.parse_args()

    if not ops.extension_available():
        raise SystemExit("hecate._C is not built: run `make build` first")
    threads = args.threads or torch.get_num_threads()
    torch.set_num_threads(threads)

    rows, ratios = [], {}
    for dtype in (torch.float32, torch.bfloat16):
        dtype_name = str(dtype).removeprefix("torch.")
        for name, ext_fn, ref_fn in _cases(args.tokens, args.hidden, args.experts, args.topk, dtype):
            t_ext = _median_seconds(ext_fn, args.repeats)
            t_ref = _median_seconds(ref_fn, args.repeats)
            ratio = t_ref / t_ext
            rows.append((name, dtype_name, t_ref * 1e3, t_ext * 1e3, ratio))
            ratios[f"{name} {dtype_name}"] = round(ratio, 3)

    try:
        from rich.console import Console
        from rich.table import Table

        table = Table(title=f"hecate ops: T={args.tokens} D={args.hidden} E={args.experts} "
                            f"k={args.topk}, {threads} thread(s)")
        for column in ("op", "dtype", "reference ms", "hecate._C ms", "speed-up"):
            table.add_column(column, justify="left" if column in ("op", "dtype") else "right")
        for name, dtype_name, ms_ref, ms_ext, ratio in rows:
            table.add_row(name, dtype_name, f"{ms_ref:.2f}", f"{ms_ext:.2f}", f"{ratio:.2f}x")
        Console().print(table)
    except ImportError:  # rich is a dependency, but a plain table still beats a crash
        for row in rows:
            print("{:28s} {:9s} ref {:9.2f} ms  ext {:9.2f} ms  {:6.2f}x".format(*row))
    if args.json:
        print(json.dumps({"threads": threads, "tokens": args.tokens, "hidden": args.hidden,
                          "experts": args.experts, "topk": args.topk, "speedup": ratios}))


if __name__ == "__main__":
    main()
