"""CUDA attention kernels (csrc/cuda/attention.cu) against the reference and the CPU kernels.

Marked `gpu`: skipped without a CUDA device; `make cuda-check` compiles the sources without one.
"""
import os
import re

import pytest
import torch

from hecate.ops import _backend
from hecate.ops import attention as attn
from hecate.ops import reference as ref

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

CUDA = torch.device("cuda")
TOL = {torch.float32: dict(rtol=2e-4, atol=2e-5), torch.float64: dict(rtol=1e-10, atol=1e-10),
       torch.bfloat16: dict(rtol=3e-2, atol=3e-2), torch.float16: dict(rtol=5e-3, atol=5e-3)}


@pytest.fixture(scope="module", autouse=True)
def cuda_kernels():
    if os.environ.get("HECATE_NO_CUDA") == "1":
        pytest.skip("HECATE_NO_CUDA=1: hecate._C was built without its CUDA kernels")
    for name in ("flash_attention_fwd", "flash_attention_bwd", "moh_attention_fwd", "moh_attention_bwd"):
        assert _backend.use_extension(name, CUDA), f"hecate._C has no CUDA kernel for {name}"


def _grads(fn, inputs, grad):
    leaves = [t.detach().clone().requires_grad_(t.is_floating_point()) for t in inputs]
    out = fn(*leaves)
    out.backward(grad)
    return out.detach(), [t.grad for t in leaves if t.is_floating_point()]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("S,d,H,G,causal,window,sinks,block", [
    (1, 8, 2, 1, True, 0, 0, 0), (37, 64, 4, 1, True, 0, 0, 0), (130, 128, 8, 2, True, 40, 3, 0),
    (70, 256, 2, 2, False, 0, 0, 0), (90, 32, 4, 2, False, 30, 2, 16), (64, 16, 2, 1, True, 0, 1, 8),
])
def test_flash_attention_cuda(dtype, S, d, H, G, causal, window, sinks, block):
    g = torch.Generator().manual_seed(S + d)
    q, k, v = (torch.randn(2, n, S, d, generator=g).to(dtype) for n in (H, G, G))
    bs = None
    if block:
        nb = -(-S // block)
        bs = attn.BlockSparse.from_mask(torch.rand(H, nb, nb, generator=g) < 0.6, block)
    grad = torch.randn(2, H, S, d, generator=g).to(dtype)
    kw = dict(causal=causal, window=window, sinks=sinks)
    try:
        out_c, grads_c = _grads(lambda q, k, v: attn.flash_attention(q, k, v, block_sparse=bs, **kw),
                                [t.to(CUDA) for t in (q, k, v)], grad.to(CUDA))
    except ValueError as exc:
        # fp64 tiles can outgrow the GPU's shared memory (d > 211 on sm_80; d > 125 on the
        # 99 KiB sm_86 / sm_89 parts that run the sm_80 code): the refusal must name the bytes
        # needed and this device's opt-in limit. fp32 math fits every d <= 256 on all of them.
        found = re.search(r"needs (\d+) bytes of shared memory per block, more than this GPU's (\d+)", str(exc))
        limit = torch.cuda.get_device_properties(CUDA).shared_memory_per_block_optin
        assert dtype == torch.float64 and found and int(found[2]) == limit < int(found[1]), exc
        pytest.skip(f"this GPU cannot hold the fp64 tiles: {exc}")
    extra = {} if bs is None else dict(block_offsets=bs.offsets_HQ, block_cols=bs.cols, block_size=block)
    out_r, grads_r = _grads(lambda q, k, v: ref.flash_attention(q, k, v, **kw, **extra), [q, k, v], grad)
    torch.testing.assert_close(out_c.cpu(), out_r, **TOL[dtype])
    for a, b in zip(grads_c, grads_r):
        torch.testing.assert_close(a.cpu(), b, **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_moh_attention_cuda_matches_cpu_kernel(dtype):
    g = torch.Generator().manual_seed(5)
    B, H, G, S, d, K = 2, 8, 2, 75, 64, 5
    q, k, v = (torch.randn(B, n, S, d, generator=g).to(dtype) for n in (H, G, G))
    idx = torch.rand(B, S, H, generator=g).argsort(-1)[..., :K]
    idx[:, ::7, -1] = -1
    w = torch.rand(B, S, K, generator=g)
    grad = torch.randn(B, H, S, d, generator=g).to(dtype)
    fn = lambda q, k, v, w: attn.moh_attention(q, k, v, idx.to(w.device), w)  # noqa: E731
    out_c, grads_c = _grads(fn, [t.to(CUDA) for t in (q, k, v, w)], grad.to(CUDA))
    out_r, grads_r = _grads(fn, [q, k, v, w], grad)
    torch.testing.assert_close(out_c.cpu(), out_r, **TOL[dtype])
    for a, b in zip(grads_c, grads_r):
        torch.testing.assert_close(a.cpu(), b.to(a.dtype), **TOL[dtype])


def test_attention_ops_refuse_bad_saved_tensors():
    # Through torch.ops directly (the autograd Functions always pass the forward's own tensors):
    # the CUDA backward read a short lse, or a host tensor, out of bounds on the device; it now
    # refuses them as the CPU op does. Unchecked before: block_cols without block_offsets (the
    # list was silently ignored) and integer MoH weights.
    g = torch.Generator().manual_seed(7)
    B, H, G, S, d = 1, 2, 1, 20, 16
    q, k, v = (torch.randn(B, n, S, d, generator=g).to(CUDA) for n in (H, G, G))
    ops = torch.ops.hecate
    out, lse = ops.flash_attention_fwd(q, k, v, 0.0, True, 0, 0, None, None, 0)
    grad = torch.randn_like(out)

    def bwd(grad_out=grad, out=out, lse=lse):
        return ops.flash_attention_bwd(grad_out, q, k, v, out, lse, 0.0, True, 0, 0, None, None, 0)

    dq, _, _ = bwd()
    assert dq.shape == q.shape
    with pytest.raises(ValueError, match=r"lse must have shape \[B, H, Sq\]"):
        bwd(lse=lse[..., :-1])
    with pytest.raises(ValueError, match="lse is on cpu"):
        bwd(lse=lse.cpu())
    with pytest.raises(ValueError, match="grad_out is on cpu"):
        bwd(grad_out=grad.cpu())
    with pytest.raises(ValueError, match="(?<!grad_)out is on cpu"):
        bwd(out=out.cpu())
    with pytest.raises(ValueError, match="block_offsets and block_cols go together"):
        ops.flash_attention_fwd(q, k, v, 0.0, True, 0, 0, None,
                                torch.zeros(0, dtype=torch.int64, device=CUDA), 4)

    idx = torch.tensor([[0, 1]] * S, device=CUDA).unsqueeze(0)  # [B, S, 2]: both heads
    w = torch.rand(B, S, 2, generator=g).to(CUDA)
    _, out_raw, lse = ops.moh_attention_fwd(q, k, v, idx, w, 0.0, True, 0, 0)
    with pytest.raises(ValueError, match=r"lse must have shape \[B, H, Sq\]"):
        ops.moh_attention_bwd(grad, q, k, v, idx, w, out_raw, lse[:, :1], 0.0, True, 0, 0)
    with pytest.raises(ValueError, match="out_raw is on cpu"):
        ops.moh_attention_bwd(grad, q, k, v, idx, w, out_raw.cpu(), lse, 0.0, True, 0, 0)
    with pytest.raises(ValueError, match="head_weight must be floating point"):
        ops.moh_attention_fwd(q, k, v, idx, idx, 0.0, True, 0, 0)
