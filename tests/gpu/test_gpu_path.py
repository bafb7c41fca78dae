"""The GPU path on CUDA: what the CPU tests check with stand-ins, on a real device.

Collected everywhere, skipped without CUDA (conftest skips every `gpu`-marked test); tests
that need two GPUs skip on one. tools/gpu_check.sh runs them first thing on a GPU machine.
Worker functions run on the pool's NCCL ranks (hecate.testing.run_distributed).
"""
import copy
import os
import shutil
import subprocess
import sys
import warnings

import pytest
import torch

from hecate.testing import run_distributed

pytestmark = pytest.mark.gpu
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _gpus() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


needs_two = pytest.mark.skipif(_gpus() < 2, reason="needs two CUDA devices")


def _tiny_model(device, seed=0):
    from hecate.models.transformer import MoETransformer
    from tests.training_cases import tiny_config

    torch.manual_seed(seed)
    return MoETransformer(tiny_config()).to(device)


def _batch(step, rank, device):
    from tests.training_cases import batch

    x, y = batch(step, rank, True)
    return x.to(device), y.to(device)


def _device(rank):
    return torch.device("cuda", torch.cuda.current_device())


# ---- 1: re-sharding with CUDA rows ------------------------------------------------------------
def test_kept_rows_indexes_a_host_placement_with_cuda_ids():
    from hecate.parallel.fssdp.strategy import kept_rows

    ids = torch.tensor([0, 2, 3], device="cuda")
    mask = kept_rows(torch.tensor([1, 0, 1, 2]), ids, 1)
    assert mask.device.type == "cuda" and mask.tolist() == [True, True, False]


def reshard_case(rank, world):
    from hecate.comm.topology import Topology
    from hecate.parallel import build_strategy, moe_layers, parallelize
    from hecate.train.engine import Engine

    device = _device(rank)
    strat = build_strategy("fssdp", Topology(), reshard_interval=0)
    model = parallelize(_tiny_model(device), strat)
    engine = Engine(model, strat, Topology(), lr=1e-3)  # fused AdamW: its step lives on the GPU
    loss, _ = model.loss(*_batch(0, rank, device))
    loss.backward()
    engine.step()
    layers = moe_layers(model)
    before = [strat.gather_experts(layer) for layer in layers]
    new = torch.stack([torch.roll(layer.fssdp_state.owner_E, 1) for layer in layers])
    assert strat.reshard(layers, engine.optimizer, owner_LE=new)
    after = [strat.gather_experts(layer) for layer in layers]
    loss, _ = model.loss(*_batch(1, rank, device))  # the moved optimizer state still steps
    loss.backward()
    engine.step()
    same = all(torch.equal(a[n], b[n]) for a, b in zip(before, after) for n in a)
    return same, all(layer.expert_chunks.device.type == "cuda" for layer in layers)


@needs_two
def test_reshard_moves_cuda_rows_and_optimizer_state():
    for same, on_cuda in run_distributed(reshard_case, 2, backend="nccl"):
        assert same and on_cuda


# ---- 2: resume with fused AdamW ---------------------------------------------------------------
def resume_case(rank, world, run_dir):
    from hecate.comm.topology import Topology
    from hecate.parallel import build_strategy, parallelize
    from hecate.train.checkpoint import load_checkpoint, save_checkpoint
    from hecate.train.engine import Engine

    device = _device(rank)

    def build(seed):
        topo = Topology()
        strat = build_strategy("fssdp", topo, reshard_interval=0)
        model = parallelize(_tiny_model(device, seed), strat)
        return model, strat, Engine(model, strat, topo, lr=3e-3, optimizer_impl="fused"), topo

    def train(model, engine, first, steps):
        out = []
        for step in range(first, first + steps):
            loss, _ = model.loss(*_batch(step, rank, device))
            loss.backward()
            engine.step()
            out.append(float(loss.detach()))
        return out

    model, strat, engine, _ = build(0)
    straight = train(model, engine, 0, 4)
    model, strat, engine, topo = build(0)
    first = train(model, engine, 0, 2)
    save_checkpoint(run_dir, model, strat, engine, 2, topology=topo)
    model, strat, engine, topo = build(1)
    step = load_checkpoint(run_dir, model, strat, engine, topology=topo)
    steps_on = {str(st["step"].device) for st in engine.optimizer.state.values() if "step" in st}
    return straight, first + train(model, engine, step, 2), steps_on


def test_resume_with_fused_adamw_matches_an_uninterrupted_run(tmp_path):
    straight, resumed, steps_on = run_distributed(resume_case, 1, str(tmp_path), backend="nccl")[0]
    assert all(d.startswith("cuda") for d in steps_on), steps_on
    torch.testing.assert_close(torch.tensor(resumed), torch.tensor(straight), rtol=1e-4, atol=1e-5)


# ---- 3: host syncs of one fssdp step ----------------------------------------------------------
def sync_case(rank, world, name="fssdp", **options):
    """The host syncs CUDA reports in one MoE layer's second step under strategy `name` (fssdp
    by default, with overlap degree 3); tests/test_gpu_path_host_reads.py runs the baselines."""
    from hecate.comm.topology import Topology
    from hecate.moe.config import MoEConfig
    from hecate.moe.layer import MoELayer
    from hecate.parallel import build_strategy, parallelize

    device = _device(rank)
    torch.manual_seed(0)
    cfg = MoEConfig(hidden_size=64, ffn_hidden_size=128, num_experts=8, top_k=2, aux_loss_coeff=0.01)
    if name == "fssdp" and not options:
        options = {"overlap_degree": 3}
    layer = parallelize(MoELayer(cfg).to(device), build_strategy(name, Topology(), **options))

    def step():
        x = torch.randn(256, 64, device=device, requires_grad=True)
        out = layer(x)
        ((out.y * out.y).sum() + out.aux_loss).backward()
        layer.strategy.finish_backward([layer])

    step()
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return [str(w.message)[:200] for w in caught if "synchroniz" in str(w.message)]


@pytest.mark.parametrize("world", [1, pytest.param(2, marks=needs_two)])
def test_one_fssdp_layer_step_synchronizes_once(world):
    for syncs in run_distributed(sync_case, world, backend="nccl"):
        assert len(syncs) <= 1, syncs  # the all-gathered counts the plan is made from


# ---- 6: memory ----------------------------------------------------------------------------------
def memory_case(rank, world, rematerialize, grad_accum):
    from hecate.comm.topology import Topology
    from hecate.parallel import build_strategy, moe_layers, parallelize

    device = _device(rank)
    strat = build_strategy("fssdp", Topology(), overlap_degree=2, fit_replicas=False,
                           rematerialize=rematerialize)
    model = parallelize(_tiny_model(device), strat)
    loss, _ = model.loss(*_batch(0, rank, device))  # warm-up: allocator, probes
    loss.backward()
    strat.finish_backward(moe_layers(model))
    model.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    for micro in range(grad_accum):
        loss, _ = model.loss(*_batch(micro, rank, device))
        (loss / grad_accum).backward()
    strat.finish_backward(moe_layers(model))
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


@needs_two
def test_rematerialization_and_grad_accumulation_peak_memory():
    rm_on = max(run_distributed(memory_case, 2, True, 1, backend="nccl"))
    rm_off = max(run_distributed(memory_case, 2, False, 1, backend="nccl"))
    accum4 = max(run_distributed(memory_case, 2, True, 4, backend="nccl"))
    assert rm_on <= rm_off
    # Drained reduces: four micro-batches peak like one, plus the gradients kept between them.
    assert accum4 <= 1.25 * rm_on, (accum4, rm_on)


# ---- 7: bf16 grouped MLP on ragged groups ------------------------------------------------------
@pytest.mark.parametrize("counts", [[0, 5, 13, 0, 1, 29], [7, 0, 0, 9], [3, 3, 3]])
@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
def test_bf16_grouped_mlp_ragged_groups_match_the_loop(counts, activation):
    from hecate.moe.experts import grouped_mlp

    g, d, f = len(counts), 64, 128
    torch.manual_seed(0)
    w1, w2 = torch.randn(g, f, d) * d ** -0.5, torch.randn(g, d, f) * f ** -0.5
    w3 = torch.randn(g, f, d) * d ** -0.5 if activation == "swiglu" else None
    x = torch.randn(sum(counts), d)
    ws = [t.cuda().bfloat16().requires_grad_(True) for t in (x, w1, w2) + ((w3,) if w3 is not None else ())]
    ws_loop = [t.detach().clone().requires_grad_(True) for t in ws]
    counts_G = torch.tensor(counts)
    y = grouped_mlp(ws[0], counts_G, ws[1], ws[2], ws[3] if w3 is not None else None, activation)
    y_loop = grouped_mlp(ws_loop[0], counts_G, ws_loop[1], ws_loop[2],
                         ws_loop[3] if w3 is not None else None, activation, impl="loop")
    torch.testing.assert_close(y.float(), y_loop.float(), rtol=2e-2, atol=2e-2)
    gy = torch.randn_like(y)
    grads = torch.autograd.grad(y, ws, gy)
    grads_loop = torch.autograd.grad(y_loop, ws_loop, gy)
    for a, b in zip(grads, grads_loop):
        torch.testing.assert_close(a.float(), b.float(), rtol=3e-2, atol=3e-2)


def test_grouped_mm_chosen_only_where_it_is_fast():
    from hecate.moe.experts import auto_impl

    cap = torch.cuda.get_device_capability()
    want = "grouped_mm" if cap >= (9, 0) and hasattr(torch, "_grouped_mm") else "loop"
    assert auto_impl(torch.device("cuda"), torch.bfloat16) == want
    assert auto_impl(torch.device("cuda"), torch.float32) == "loop"


# ---- 8: architectures in the binary -------------------------------------------------------------
def test_extension_holds_this_gpus_code_and_ptx():
    import hecate._C as _C

    tool = shutil.which("cuobjdump") or os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"),
                                                     "bin", "cuobjdump")
    if not os.path.exists(tool):
        pytest.skip("cuobjdump not found")
    major, minor = torch.cuda.get_device_capability()
    elf = subprocess.run([tool, "--list-elf", _C.__file__], capture_output=True, text=True).stdout
    ptx = subprocess.run([tool, "--list-ptx", _C.__file__], capture_output=True, text=True).stdout
    assert f"sm_{major}{minor}" in elf or ".ptx" in ptx, elf + ptx
    assert "compute_" in ptx or ".ptx" in ptx, f"no PTX in {_C.__file__}: newer GPUs would find no kernel"


# ---- fssdp against one process, caching allocator off, forward on a side stream ----------------
SIDE_STREAM_SCRIPT = r"""
import copy, sys, torch, torch.distributed as dist
sys.path.insert(0, sys.argv[1])
from hecate.comm.topology import Topology
from hecate.parallel import build_strategy, parallelize
from hecate.parallel.local import LocalStrategy
from hecate.train.engine import Engine
from tests.gpu.test_gpu_path import _batch, _tiny_model
device = torch.device("cuda", 0)
torch.cuda.set_device(device)
dist.init_process_group("nccl", store=dist.HashStore(), rank=0, world_size=1, device_id=device)
base = _tiny_model(device)
ref = copy.deepcopy(base)
strat = build_strategy("fssdp", Topology())
model = parallelize(copy.deepcopy(base), strat)
engine, ref_engine = Engine(model, strat, Topology(), lr=1e-3), Engine(ref, LocalStrategy(), lr=1e-3)
side = torch.cuda.Stream()
for step in range(3):
    x, y = _batch(step, 0, device)
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        loss, _ = model.loss(x, y)
    torch.cuda.current_stream().wait_stream(side)
    loss.backward()
    engine.step()
    ref_loss, _ = ref.loss(x, y)
    ref_loss.backward()
    ref_engine.step()
    assert abs(float(loss) - float(ref_loss)) < 1e-4, (step, float(loss), float(ref_loss))
dist.destroy_process_group()
print("side-stream ok")
"""


def test_fssdp_matches_one_process_without_caching_allocator_on_a_side_stream():
    # Without the caching allocator a buffer freed while another stream still uses it is
    # really freed: use-after-free bugs between streams show up as wrong numbers or faults.
    env = dict(os.environ, PYTORCH_NO_CUDA_MEMORY_CACHING="1", CUDA_LAUNCH_BLOCKING="0")
    proc = subprocess.run([sys.executable, "-c", SIDE_STREAM_SCRIPT, ROOT], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "side-stream ok" in proc.stdout, proc.stdout + proc.stderr


# ---- the pieces on CUDA --------------------------------------------------------------------------
def test_permute_known_rows_on_cuda_matches_the_kernel():
    from hecate import ops

    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 40, generator=g).cuda()
    bins = torch.randint(-1, 9, (300, 2), generator=g).cuda()
    n = int((bins >= 0).sum())
    want = ops.permute(x, bins, 9)
    got = ops.permute(x, bins, 9, num_rows=n)
    for a, b in zip(got, want):
        assert torch.equal(a, b)


def test_to_device_pins_and_does_not_block():
    from hecate import ops

    t = ops.to_device(torch.arange(10), torch.device("cuda"))
    torch.cuda.synchronize()
    assert t.device.type == "cuda" and t.tolist() == list(range(10))


def test_interval_reads_cuda_events():
    from hecate.parallel.fssdp.clock import DeviceTimings, timed

    t = DeviceTimings()
    a = torch.randn(2048, 2048, device="cuda")
    with timed(t, "matmul", torch.device("cuda")):
        for _ in range(10):
            a = a @ a.T / 2048
    t.collect(wait=True)
    assert t.pending == 0 and t["matmul"] > 0


def _fail(rank, world):
    raise ValueError("boom")


def _pid(rank, world):
    return os.getpid()


def test_nccl_pool_survives_a_failed_task():
    pids = run_distributed(_pid, 1, backend="nccl")
    with pytest.raises(ValueError, match="boom"):
        run_distributed(_fail, 1, backend="nccl")
    assert run_distributed(_pid, 1, backend="nccl") == pids  # health check passed on CUDA
