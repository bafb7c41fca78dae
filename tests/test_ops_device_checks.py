"""The checks the Python face queues for an accelerator, exercised on the CPU.

The CUDA attention kernel trusts two things the CPU kernel checks itself: a block list's
structure (offsets within [0, nnz], each segment strictly ascending; the kernel binary-
searches it, so a bad offset reads past `cols`) and MoH routing indices (>= -1, no head twice
per token). hecate.ops checks both before any kernel runs: on the host at once, on an
accelerator with torch._assert_async (no host read). Here the device branch is taken by
declaring host reads not free (as on a GPU), and the kernel that runs is the reference (a
device without the check), so a missing check shows as a silent result instead of an error.
Also: zero query heads are refused before a kernel divides by them, and the reference fallback
a GPU runs without the compiled kernels reads ids back once.
"""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hecate.ops import _validate, reference
from hecate.ops import attention as attn
from tests.host_reads import HostReadCounter


@pytest.fixture
def unchecked_kernel(monkeypatch):
    """The reference runs instead of the CPU kernel, which would check the input itself."""
    monkeypatch.setattr(attn, "use_extension", lambda name, device: False)


@pytest.fixture
def device_branch(monkeypatch):
    monkeypatch.setattr(_validate, "host_reads_free", lambda device: False)


def qkv(H=2, S=8, d=4):
    g = torch.Generator().manual_seed(0)
    return tuple(torch.randn(1, H, S, d, generator=g) for _ in range(3))


def block_list(offsets, cols, block_size=4):
    return attn.BlockSparse(torch.tensor(offsets), torch.tensor(cols, dtype=torch.int64), block_size)


# S = 8, block 4: two query blocks, two key blocks, H = 2 -> offsets [2, 3].
BAD_LISTS = [
    ([[0, 1, 5], [1, 2, 3]], [0, 0, 1], "offsets 1..5"),      # past nnz: a read past cols on CUDA
    ([[0, 2, 1], [1, 2, 3]], [0, 1, 1], "offsets 2..1"),      # decreasing
    ([[-1, 0, 1], [1, 1, 1]], [0], "offsets -1..0"),          # negative
    ([[0, 2, 3], [3, 3, 3]], [1, 0, 1], "cols\\[0\\] = 1 and cols\\[1\\] = 0"),  # unsorted segment
    ([[0, 2, 2], [2, 2, 4]], [0, 1, 1, 1], "cols\\[2\\] = 1 and cols\\[3\\] = 1"),  # repeated block
]


@pytest.mark.parametrize("offsets,cols,where", BAD_LISTS)
def test_a_bad_block_list_is_named_on_the_host(unchecked_kernel, offsets, cols, where):
    with pytest.raises(ValueError, match=f"non-decreasing within .*{where}"):
        attn.flash_attention(*qkv(), block_sparse=block_list(offsets, cols))


@pytest.mark.parametrize("offsets,cols,where", BAD_LISTS)
def test_a_bad_block_list_stops_the_device_path(unchecked_kernel, device_branch, offsets, cols, where):
    with pytest.raises(RuntimeError, match="non-decreasing within"):
        attn.flash_attention(*qkv(), block_sparse=block_list(offsets, cols))


@settings(max_examples=40, deadline=None)
@given(H=st.integers(1, 3), S=st.integers(1, 20), block=st.integers(1, 6), density=st.floats(0, 1),
       seed=st.integers(0, 2**16), shared=st.booleans())
def test_valid_block_lists_pass_both_paths(H, S, block, density, seed, shared):
    """No false alarm: from_mask lists (empty segments included) and lists whose heads share
    one segment pass the host and the device check."""
    g = torch.Generator().manual_seed(seed)
    nb = -(-S // block)
    bs = attn.BlockSparse.from_mask(torch.rand(H, nb, nb, generator=g) < density, block)
    if shared:  # every head reads head 0's segments (offsets need not partition cols)
        bs = attn.BlockSparse(bs.offsets_HQ[:1].expand(H, -1).contiguous(), bs.cols, block)
    for host in (True, False):
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(_validate, "host_reads_free", lambda device, host=host: host)
            attn._check_block_list(bs.offsets_HQ, bs.cols)


def moh_args(head_idx):
    q, k, v = qkv(H=4)
    idx = torch.tensor(head_idx).view(1, 1, -1).expand(1, 8, -1).contiguous()
    return q, k, v, idx, torch.ones(idx.shape)


@pytest.mark.parametrize("head_idx,match", [([1, 1], "twice"), ([-2, 0], ">= -1")])
def test_bad_moh_routing_is_named_on_the_host(unchecked_kernel, head_idx, match):
    with pytest.raises(ValueError, match=match):
        attn.moh_attention(*moh_args(head_idx))


@pytest.mark.parametrize("head_idx", [[1, 1], [-2, 0], [3, -1, 3]])
def test_bad_moh_routing_stops_the_device_path(unchecked_kernel, device_branch, head_idx):
    # Before: no check off the CPU; the reference summed a repeated head's weights and the
    # CUDA kernel kept one of them, silently.
    with pytest.raises(RuntimeError, match="at most once per token"):
        attn.moh_attention(*moh_args(head_idx))


def test_device_checks_read_nothing_back(device_branch):
    """The queued checks cost no host read (tests/host_reads.py counts them)."""
    q, k, v, idx, w = moh_args([2, -1, 0])
    bs = attn.BlockSparse.from_mask(torch.rand(2, 2, 2, generator=torch.Generator().manual_seed(1)) < 0.7, 4)
    with HostReadCounter() as counter:
        attn._check_head_idx(idx)
        attn._check_block_list(bs.offsets_HQ, bs.cols)
    assert counter.count == 0, counter.where


def test_reference_scatter_add_reads_the_ids_once():
    """The fallback a GPU runs when hecate._C has no CUDA kernel (the spRS's last step): one
    read of the ids, not one host sync per received row."""
    recv, ids, out = torch.randn(6, 3), torch.tensor([4, 0, 4, 2, 4, 1]), torch.zeros(5, 3)
    want = out.clone()
    for i, c in enumerate([4, 0, 4, 2, 4, 1]):
        want[c] += recv[i]
    with HostReadCounter() as counter:
        reference.scatter_add_chunks(recv, ids, out)
    assert counter.count == 1, counter.where
    assert torch.equal(out, want)  # repeated ids in order of i


def test_zero_query_heads_are_refused_before_any_kernel():
    # H = 0 passed the GQA check (0 % G == 0) and the CPU kernel died of a SIGFPE (H // G = 0).
    q, k = torch.randn(1, 0, 5, 8), torch.randn(1, 1, 5, 8)
    with pytest.raises(ValueError, match="no query heads"):
        attn.flash_attention(q, k, k)
    with pytest.raises(ValueError, match="no query heads"):
        attn.moh_attention(q, k, k, torch.zeros(1, 5, 1, dtype=torch.long), torch.ones(1, 5, 1))


@pytest.mark.skipif(not hasattr(torch.ops.hecate, "flash_attention_fwd"), reason="needs hecate._C")
def test_zero_query_heads_are_refused_by_the_ops_themselves():
    # Callers of torch.ops.hecate skip the Python face's check; the CPU kernel checks H >= 1 itself.
    q, k = torch.randn(1, 0, 5, 8), torch.randn(1, 1, 5, 8)
    with pytest.raises(ValueError, match="no query heads"):
        torch.ops.hecate.flash_attention_fwd(q, k, k, 1.0, True, 0, 0, None, None, 1)
    with pytest.raises(ValueError, match="no query heads"):
        torch.ops.hecate.moh_attention_fwd(q, k, k, torch.zeros(1, 5, 1, dtype=torch.long),
                                           torch.ones(1, 5, 1), 1.0, True, 0, 0)
