"""Multi-GPU smoke test: hecate's CUDA kernels around NCCL collectives.

Run on one node with every GPU (the Docker image's default command does this):

    torchrun --nproc-per-node=$(nvidia-smi -L | wc -l) tests/gpu/nccl_smoke.py

It checks, on real GPUs and NCCL, the two data paths of an FSSDP iteration in their simplest
form:
  1. dispatch / combine: topk_gating -> permute by destination rank -> all_to_all -> (identity
     expert) -> all_to_all back -> unpermute must give x * sum_k(weights);
  2. spAG / spRS: pack_chunks of owned chunks -> all_gather -> unpack_chunks rebuilds the full
     buffer; scatter_add_chunks of every rank's gradients gives their sum.
It is not collected by pytest (it needs torchrun); it exits non-zero on a mismatch.
"""
import os
import sys
from datetime import timedelta

import torch
import torch.distributed as dist

from hecate import ops


def fail(rank: int, what: str) -> None:
    print(f"[rank {rank}] nccl smoke FAILED: {what}", file=sys.stderr, flush=True)
    sys.exit(1)


def dispatch_combine(rank: int, world: int, device: torch.device) -> None:
    experts_per_rank, T, K, D = 2, 64, 2, 32
    g = torch.Generator().manual_seed(rank)
    x_TD = torch.randn(T, D, generator=g).to(device)
    logits_TE = torch.randn(T, world * experts_per_rank, generator=g).to(device)
    weights_TK, experts_TK, _ = ops.topk_gating(logits_TE, K, "softmax", True)
    dest_TK = experts_TK // experts_per_rank  # bin = destination rank
    x_ND, row_map_TK, send_counts = ops.permute(x_TD, dest_TK, world)
    recv_counts = torch.empty_like(send_counts)
    dist.all_to_all_single(recv_counts, send_counts)
    send, recv = send_counts.tolist(), recv_counts.tolist()
    y_MD = x_ND.new_empty(sum(recv), D)
    dist.all_to_all_single(y_MD, x_ND, recv, send)
    back_ND = torch.empty_like(x_ND)
    dist.all_to_all_single(back_ND, y_MD, send, recv)  # identity expert: send the rows back
    out_TD = ops.unpermute(back_ND, row_map_TK, weights_TK)
    if not torch.allclose(out_TD, x_TD * weights_TK.sum(1, keepdim=True), atol=1e-5):
        fail(rank, "dispatch / combine round trip differs from x * sum(weights)")


def sparse_chunks(rank: int, world: int, device: torch.device) -> None:
    C, S = 3 * world, 1000
    full_CS = torch.arange(C * S, dtype=torch.float32, device=device).reshape(C, S)
    owned = torch.arange(rank, C, world, device=device)  # chunk c is owned by rank c % world
    sent_nS = ops.pack_chunks(full_CS, owned)
    gathered = sent_nS.new_empty(world * sent_nS.shape[0], S)
    dist.all_gather_into_tensor(gathered, sent_nS)
    ids = torch.cat([torch.arange(r, C, world, device=device) for r in range(world)])
    rebuilt_CS = torch.zeros_like(full_CS)
    ops.unpack_chunks(gathered, ids, rebuilt_CS)
    if not torch.equal(rebuilt_CS, full_CS):
        fail(rank, "pack / all_gather / unpack did not rebuild the chunk buffer")

    grads_CS = torch.full((C, S), float(rank + 1), device=device)
    every = grads_CS.new_empty(world * C, S)
    dist.all_gather_into_tensor(every, grads_CS)
    summed_CS = torch.zeros_like(grads_CS)
    ops.scatter_add_chunks(every, torch.arange(C, device=device).repeat(world), summed_CS)
    if not torch.equal(summed_CS, torch.full_like(summed_CS, world * (world + 1) / 2)):
        fail(rank, "scatter_add_chunks of all ranks' gradients is not their sum")


def main() -> None:
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    torch.cuda.set_device(local_rank)
    device = torch.device("cuda", local_rank)
    dist.init_process_group("nccl", timeout=timedelta(minutes=2), device_id=device)
    rank, world = dist.get_rank(), dist.get_world_size()
    try:
        dispatch_combine(rank, world, device)
        sparse_chunks(rank, world, device)
        torch.cuda.synchronize()
        dist.barrier()
        if rank == 0:
            print(f"nccl smoke passed on {world} rank(s)", flush=True)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
