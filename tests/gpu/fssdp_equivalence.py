"""FSSDP at W = N on NCCL trains like one process (launched by torchrun, not collected by pytest).

    torchrun --standalone --nproc-per-node=N tests/gpu/fssdp_equivalence.py

Each rank trains the tiny MoE transformer of the CPU equivalence tests under fssdp (replicas,
re-materialization, prefetch, overlapped spRS, re-sharding every 2 steps), fp32, and beside it
a single-process copy on every rank's batch; losses, dense and expert parameters must match
after 4 steps, as tests/test_training_equivalence.py checks on gloo. Then the losses under
bf16 autocast against a single-process bf16 run, within 2e-2. Without CUDA it runs on gloo
(a check of the script itself). Exit status 1 on a
mismatch, naming the rank and what differs.
"""
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from hecate.models.transformer import MoETransformer  # noqa: E402
from tests.training_cases import batch, check_training, tiny_config, train_side_by_side  # noqa: E402


def main() -> int:
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = False  # fp32 must be fp32 to compare at 2e-4
        torch.backends.cudnn.allow_tf32 = False
        dist.init_process_group("nccl", device_id=device)
    else:  # checks the script itself on a CPU machine (gloo)
        device = torch.device("cpu")
        dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    options = {"overlap_degree": 2, "fit_replicas": False, "reshard_interval": 2}
    failures = []
    for name, dtype in (("fp32", None), ("bf16", torch.bfloat16)):
        torch.manual_seed(0)
        base = MoETransformer(tiny_config()).to(device)

        def loss_of(model, step, r):
            x, y = (t.to(device) for t in batch(step, r, True))
            with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
                return model.loss(x, y)[0]

        strat, out = train_side_by_side(rank, world, base, "fssdp", dict(options), 4, loss_of,
                                        lr=3e-3, weight_decay=0.01, max_grad_norm=0.5, eps=1e-6)
        try:
            if dtype is None:
                check_training([out])
            else:  # bf16 rounding: the losses track, within bf16's resolution
                torch.testing.assert_close(torch.tensor(out["losses"][0]), torch.tensor(out["losses"][1]),
                                           rtol=2e-2, atol=2e-2)
        except AssertionError as exc:
            failures.append(f"{name}: {exc}")
        print(f"[rank {rank}/{world}] fssdp {name}: losses {out['losses'][0]} vs one process "
              f"{out['losses'][1]}; reshards {strat.reshards}", flush=True)
    dist.destroy_process_group()
    if failures:
        print(f"[rank {rank}] fssdp equivalence FAILED:\n" + "\n".join(failures), file=sys.stderr, flush=True)
        return 1
    print(f"[rank {rank}] fssdp equivalence at W = {world}: ok", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
