"""Host -> device uploads on the GPU path, checked on CPU: the 'meta' device stands in for
CUDA and hecate.ops.to_device (pinned memory, non_blocking) is spied on. A non_blocking copy
from pageable host memory is staged by the CUDA driver synchronously, so every host tensor
the hot path sends up must go through to_device."""
import pytest
import torch
import torch.distributed as dist

from hecate import ops
from hecate.moe import experts


def _spy(monkeypatch):
    calls = []
    original = ops.to_device

    def to_device(t, device):
        calls.append((t.device.type, t.dtype, torch.device(device).type))
        return original(t, device)

    monkeypatch.setattr(ops, "to_device", to_device)
    return calls


def test_grouped_mm_offsets_go_up_through_to_device(monkeypatch):
    calls = _spy(monkeypatch)
    x = torch.empty(8, 16, device="meta", dtype=torch.bfloat16)
    w1 = torch.empty(2, 32, 16, device="meta", dtype=torch.bfloat16)
    w2 = torch.empty(2, 16, 32, device="meta", dtype=torch.bfloat16)
    y = experts.grouped_mlp(x, torch.tensor([3, 5]), w1, w2, impl="grouped_mm")  # host counts
    assert y.shape == (8, 16) and y.device.type == "meta"
    assert calls == [("cpu", torch.int32, "meta")]


def test_grouped_mm_on_the_host_is_unchanged():
    torch.manual_seed(0)
    x, w1, w2 = torch.randn(7, 16), torch.randn(3, 32, 16), torch.randn(3, 16, 32)
    counts = torch.tensor([2, 0, 5])
    got = experts.grouped_mlp(x, counts, w1, w2, impl="grouped_mm")
    want = experts.grouped_mlp(x, counts, w1, w2, impl="loop")
    torch.testing.assert_close(got, want)


@pytest.mark.skipif(dist.is_available() and dist.is_initialized(), reason="needs a fresh process group")
def test_trainer_batches_go_up_through_to_device(tmp_path, monkeypatch):
    from hecate.train.config import load_config
    from hecate.train.trainer import train

    calls = _spy(monkeypatch)
    cfg = load_config("tiny_dp", ["parallel.strategy=local", "parallel.nproc=1", "train.steps=1",
                                  "optim.grad_accum=2", "train.eval_every=1", "train.eval_batches=1",
                                  "data.embedded_max_bytes=100000", f"data.cache_dir={tmp_path}/cache",
                                  f"train.out_dir={tmp_path}/run", "logging.progress=false"])
    train(cfg)
    batches = [c for c in calls if c[1] == torch.int64]
    # x and y of each of the 2 micro-batches and of the one validation batch
    assert len(batches) == 6 and {c[2] for c in batches} == {"cpu"}, calls


def test_module_experts_grouped_linear_counts_go_up_through_to_device(monkeypatch):
    # Bring-your-own experts (ModuleExperts) run grouped_linear: its offsets and the bias rows'
    # counts are host ints and must not be copied up from pageable memory.
    from hecate.moe import module_experts
    calls = _spy(monkeypatch)
    # Its eligibility check asks autocast about the device, which knows no 'meta'.
    monkeypatch.setattr(module_experts, "_grouped_mm_ok", lambda x, w: True)
    x = torch.empty(8, 16, device="meta", dtype=torch.bfloat16)
    w = torch.empty(2, 32, 16, device="meta", dtype=torch.bfloat16)
    b = torch.empty(2, 32, device="meta", dtype=torch.bfloat16)
    y = module_experts.grouped_linear(x, [3, 5], w, b)
    assert y.shape == (8, 32) and y.device.type == "meta"
    assert calls == [("cpu", torch.int32, "meta"), ("cpu", torch.int64, "meta")]


def test_module_experts_grouped_linear_on_the_host_is_unchanged():
    from hecate.moe import module_experts
    torch.manual_seed(0)
    x, w, b = torch.randn(7, 16), torch.randn(3, 32, 16), torch.randn(3, 32)
    counts = [2, 0, 5]
    got = module_experts.grouped_linear(x, counts, w, b)
    rows = torch.repeat_interleave(torch.arange(3), torch.tensor(counts))
    want = torch.einsum("nd,nod->no", x, w[rows]) + b[rows]
    torch.testing.assert_close(got, want)
