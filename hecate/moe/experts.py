"""Expert MLPs: stacked expert weights and the functional grouped MLP every strategy runs.

Layouts: w1_EFD (and w3_EFD for swiglu) map D -> F, w2_EDF maps F -> D; x_ND holds
the permuted token rows, sorted by expert, counts_G rows per expert (group).
"""
from __future__ import annotations

import functools
import math
import warnings
from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from hecate import ops

ACTIVATIONS = ("gelu", "swiglu")

# Which implementation grouped_mlp uses per (device type, dtype) when torch._grouped_mm can
# run there; anything not listed uses the loop. Chosen from benchmarks/grouped_gemm.py (see
# docs/moe.md): on CPU (torch 2.13) torch._grouped_mm beats the per-expert loop for fp32 and
# bf16. On CUDA its fast kernel needs sm_90+ and bf16 (MIN_CUDA_CAPABILITY); elsewhere torch
# falls back to a loop of its own with a host read per call, so ours (host-known counts) runs.
PREFERRED_IMPL: Dict[Tuple[str, torch.dtype], str] = {
    ("cpu", torch.float32): "grouped_mm",
    ("cpu", torch.bfloat16): "grouped_mm",
    ("cuda", torch.bfloat16): "grouped_mm",
}
MIN_CUDA_CAPABILITY = (9, 0)


def _capability(device: torch.device) -> Optional[Tuple[int, int]]:
    return tuple(torch.cuda.get_device_capability(device)) if device.type == "cuda" else None


def _probe_grouped_mm(device: torch.device, dtype: torch.dtype) -> None:
    """One tiny forward + backward of torch._grouped_mm (2 groups, one of them empty)."""
    # inference_mode(False): a first call inside torch.inference_mode (generation) must probe
    # autograd too, not fail on it and leave the whole process on the loop.
    with torch.inference_mode(False), torch.enable_grad(), torch.autocast(device.type, enabled=False):
        x = torch.ones(8, 16, device=device, dtype=dtype, requires_grad=True)
        w = torch.ones(2, 16, 16, device=device, dtype=dtype, requires_grad=True)
        offs = torch.tensor([8, 8], device=device, dtype=torch.int32)
        y = torch._grouped_mm(x, w, offs=offs)
        y.backward(torch.ones_like(y))  # a contiguous gradient, as _contiguous_grad gives it


@functools.lru_cache(maxsize=None)
def _auto_impl(device_type: str, capability: Optional[Tuple[int, int]], dtype: torch.dtype) -> str:
    """The implementation "auto" runs on one (device type, capability, dtype): decided once.

    torch._grouped_mm is probed once; if this torch build or device cannot run it, the loop
    is used from then on, with a warning. Errors of a real call (an out-of-memory, a bad
    shape) are never taken for "unsupported": they raise, and the choice stays as it was.
    """
    if PREFERRED_IMPL.get((device_type, dtype)) != "grouped_mm" or not hasattr(torch, "_grouped_mm"):
        return "loop"
    if device_type == "cuda" and (capability is None or capability < MIN_CUDA_CAPABILITY):
        return "loop"
    device = torch.device(device_type, torch.cuda.current_device()) if device_type == "cuda" \
        else torch.device(device_type)
    try:
        _probe_grouped_mm(device, dtype)
    except torch.OutOfMemoryError:
        raise  # transient: not a property of the device; nothing is cached (lru_cache skips raises)
    except (RuntimeError, NotImplementedError) as exc:
        warnings.warn(f"torch._grouped_mm cannot run on {device_type} (capability {capability}) "
                      f"with {dtype}: {type(exc).__name__}: {str(exc)[:200]}; grouped_mlp uses the "
                      "per-expert loop there (slower)", RuntimeWarning, stacklevel=3)
        return "loop"
    return "grouped_mm"


def auto_impl(device: torch.device, dtype: torch.dtype) -> str:
    """"grouped_mm" or "loop": what grouped_mlp(impl="auto") uses for tensors on `device`."""
    return _auto_impl(device.type, _capability(device), dtype)


def _grouped_mm_ok(x: torch.Tensor, *weights: torch.Tensor) -> bool:
    """Every weight has x's dtype and every row stride is a multiple of 16 bytes (its rule)."""
    if any(w.dtype != x.dtype for w in weights):
        return False
    size = x.element_size()
    return all((w.shape[-1] * size) % 16 == 0 and (w.shape[-2] * size) % 16 == 0 for w in weights)


def _contiguous_grad(t: torch.Tensor) -> torch.Tensor:
    # _grouped_mm's backward rejects expanded (stride-0) gradients, e.g. from y.sum().
    if t.requires_grad:
        t.register_hook(lambda g: g.contiguous())
    return t


def gelu_rows(n: int) -> int:
    """The row count `_activate` runs GELU on for n rows on the CPU: n rounded up to one of 8
    steps per power of two (at most 1/8 padding), n itself up to 16."""
    if n <= 16:
        return n
    step = 1 << (n.bit_length() - 4)
    return -(-n // step) * step


def _activate(h1: torch.Tensor, h3: Optional[torch.Tensor], activation: str) -> torch.Tensor:
    if activation == "gelu":
        if h1.device.type == "cpu" and h1.dim() == 2 and torch.backends.mkldnn.is_available():
            # On the CPU, GELU (forward and backward) runs a oneDNN kernel that is JIT-compiled
            # and cached per input shape. Under fssdp / ep the experts' row count changes every
            # step, so without this every step added new kernels to that cache (~2 MB per step
            # per rank in benchmarks/soak.py). Zero rows padded to a bucket bound the shapes;
            # GELU is elementwise, so the real rows' values are the same.
            n = h1.shape[0]
            rows = gelu_rows(n)
            if rows != n:
                return F.gelu(F.pad(h1, (0, 0, 0, rows - n)))[:n]
        return F.gelu(h1)
    if activation == "swiglu":
        return F.silu(h1) * h3
    raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")


def _mlp_grouped_mm(x_ND, counts_G, w1_GFD, w2_GDF, w3_GFD, activation):
    # Offsets computed where the counts live (host-known counts: no device read anywhere).
    # Host offsets go up through pinned memory: a non_blocking copy from pageable memory is
    # staged by the driver synchronously, once per expert MLP call.
    offs = ops.to_device(torch.cumsum(counts_G, 0).to(torch.int32), x_ND.device)
    h1 = _contiguous_grad(torch._grouped_mm(x_ND, w1_GFD.transpose(-2, -1), offs=offs))
    h3 = None
    if w3_GFD is not None:
        h3 = _contiguous_grad(torch._grouped_mm(x_ND, w3_GFD.transpose(-2, -1), offs=offs))
    h = _activate(h1, h3, activation)
    return _contiguous_grad(torch._grouped_mm(h, w2_GDF.transpose(-2, -1), offs=offs))


def _mlp_loop(x_ND, counts_G, w1_GFD, w2_GDF, w3_GFD, activation):
    counts = [int(c) for c in counts_G.tolist()]
    if sum(counts) != x_ND.shape[0]:
        raise ValueError(f"counts_G sums to {sum(counts)} but x_ND has {x_ND.shape[0]} rows")
    pieces = torch.split(x_ND, counts)
    groups = [g for g, c in enumerate(counts) if c > 0] or [0]  # keep weights in the graph
    out = []
    for g in groups:
        xg = pieces[g]
        h3 = None if w3_GFD is None else xg @ w3_GFD[g].t()
        out.append(_activate(xg @ w1_GFD[g].t(), h3, activation) @ w2_GDF[g].t())
    return torch.cat(out) if len(out) > 1 else out[0]


def grouped_mlp(x_ND: torch.Tensor, counts_G: torch.Tensor, w1_GFD: torch.Tensor,
                w2_GDF: torch.Tensor, w3_GFD: Optional[torch.Tensor] = None,
                activation: str = "gelu", impl: str = "auto") -> torch.Tensor:
    """y rows = expert_g MLP of x rows, for consecutive row blocks of counts_G[g] rows.

    expert_g(x) = act(x @ w1[g]^T) @ w2[g]^T, act = gelu, or for swiglu
    silu(x @ w1[g]^T) * (x @ w3[g]^T). Groups with zero rows are fine; gradients
    reach x and all weights. impl: "auto" (auto_impl: PREFERRED_IMPL where torch._grouped_mm
    runs, decided once per device capability and dtype; else the loop), "grouped_mm" or "loop".
    counts_G may live on the host (no device read for the loop's split sizes).
    """
    if x_ND.dim() != 2 or w1_GFD.dim() != 3 or w2_GDF.dim() != 3:
        raise ValueError(f"expected x_ND 2-D and w1_GFD, w2_GDF 3-D; got shapes {tuple(x_ND.shape)}, "
                         f"{tuple(w1_GFD.shape)}, {tuple(w2_GDF.shape)}")
    g, f, d = w1_GFD.shape
    if x_ND.shape[1] != d or tuple(w2_GDF.shape) != (g, d, f):
        raise ValueError(f"shape mismatch: x_ND {tuple(x_ND.shape)}, w1_GFD {tuple(w1_GFD.shape)}, "
                         f"w2_GDF {tuple(w2_GDF.shape)} (want w2_GDF = ({g}, {d}, {f}))")
    if counts_G.shape != (g,):
        raise ValueError(f"counts_G must have shape ({g},), got {tuple(counts_G.shape)}")
    if (w3_GFD is None) != (activation != "swiglu"):
        raise ValueError(f"w3_GFD is required for activation='swiglu' and only for it "
                         f"(activation={activation!r}, w3_GFD {'given' if w3_GFD is not None else 'None'})")
    if w3_GFD is not None and w3_GFD.shape != w1_GFD.shape:
        raise ValueError(f"w3_GFD shape {tuple(w3_GFD.shape)} must equal w1_GFD shape {tuple(w1_GFD.shape)}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    if impl not in ("auto", "grouped_mm", "loop"):
        raise ValueError(f"impl must be 'auto', 'grouped_mm' or 'loop', got {impl!r}")
    compute = autocast_dtype(x_ND.device.type)
    if compute is not None:
        # torch._grouped_mm is not on autocast's list everywhere (not on CPU in torch 2.13):
        # cast explicitly, as F.linear would be, compute with autocast off, and return the
        # input's dtype so the weighted combine sums in it. The casts are differentiable:
        # fp32 master weights get fp32 gradients, bf16 ones (FSSDP's replicas) bf16.
        out_dtype = x_ND.dtype
        x_ND, w1_GFD, w2_GDF, w3_GFD = (None if t is None else t.to(compute)
                                         for t in (x_ND, w1_GFD, w2_GDF, w3_GFD))
        with torch.autocast(x_ND.device.type, enabled=False):
            y = grouped_mlp(x_ND, counts_G, w1_GFD, w2_GDF, w3_GFD, activation, impl)
        return y.to(out_dtype)
    weights = [w for w in (w1_GFD, w2_GDF, w3_GFD) if w is not None]
    if impl == "auto":
        use = auto_impl(x_ND.device, x_ND.dtype) == "grouped_mm" and _grouped_mm_ok(x_ND, *weights)
        impl = "grouped_mm" if use else "loop"
    if impl == "grouped_mm" and x_ND.shape[0] > 0:  # (its backward rejects empty stride-0 grads)
        return _mlp_grouped_mm(x_ND, counts_G, w1_GFD, w2_GDF, w3_GFD, activation)
    return _mlp_loop(x_ND, counts_G, w1_GFD, w2_GDF, w3_GFD, activation)


def autocast_dtype(device_type: str) -> Optional[torch.dtype]:
    """The dtype autocast computes matmuls in on this device type, or None when it is off."""
    if device_type not in ("cpu", "cuda", "xpu", "hpu", "mps") or not torch.is_autocast_enabled(device_type):
        return None
    return torch.get_autocast_dtype(device_type)


class GroupedExperts(nn.Module):
    """E expert MLPs stored stacked: w1_EFD, w2_EDF (and w3_EFD for swiglu).

    Init matches nn.Linear per expert: U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
    """

    def __init__(self, num_experts: int, hidden_size: int, ffn_hidden_size: int,
                 activation: str = "gelu"):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
        self.num_experts, self.hidden_size, self.ffn_hidden_size = num_experts, hidden_size, ffn_hidden_size
        self.activation = activation
        e, d, f = num_experts, hidden_size, ffn_hidden_size
        self.w1_EFD = nn.Parameter(torch.empty(e, f, d))
        self.w2_EDF = nn.Parameter(torch.empty(e, d, f))
        self.w3_EFD = nn.Parameter(torch.empty(e, f, d)) if activation == "swiglu" else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        b1 = 1.0 / math.sqrt(self.hidden_size)
        nn.init.uniform_(self.w1_EFD, -b1, b1)
        if self.w3_EFD is not None:
            nn.init.uniform_(self.w3_EFD, -b1, b1)
        b2 = 1.0 / math.sqrt(self.ffn_hidden_size)
        nn.init.uniform_(self.w2_EDF, -b2, b2)

    def forward(self, x_ND: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        return grouped_mlp(x_ND, counts_E, self.w1_EFD, self.w2_EDF, self.w3_EFD, self.activation)

    def expert_forward(self, e: int, x_TD: torch.Tensor) -> torch.Tensor:
        """One expert on plain rows (used by oracles and tests)."""
        w3 = None if self.w3_EFD is None else self.w3_EFD[e]
        return dense_mlp(x_TD, self.w1_EFD[e], self.w2_EDF[e], w3, self.activation)


def dense_mlp(x_TD: torch.Tensor, w1_FD: torch.Tensor, w2_DF: torch.Tensor,
              w3_FD: Optional[torch.Tensor], activation: str) -> torch.Tensor:
    """act(x @ w1^T) @ w2^T (swiglu: silu(x @ w1^T) * (x @ w3^T))."""
    h3 = None if w3_FD is None else F.linear(x_TD, w3_FD)
    return F.linear(_activate(F.linear(x_TD, w1_FD), h3, activation), w2_DF)


class DenseMLP(nn.Module):
    """A bias-free dense MLP with the experts' activation (shared experts, residual MLP)."""

    def __init__(self, hidden_size: int, ffn_hidden_size: int, activation: str = "gelu"):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
        self.activation = activation
        self.w1_FD = nn.Parameter(torch.empty(ffn_hidden_size, hidden_size))
        self.w2_DF = nn.Parameter(torch.empty(hidden_size, ffn_hidden_size))
        self.w3_FD = nn.Parameter(torch.empty(ffn_hidden_size, hidden_size)) if activation == "swiglu" else None
        b1, b2 = 1.0 / math.sqrt(hidden_size), 1.0 / math.sqrt(ffn_hidden_size)
        nn.init.uniform_(self.w1_FD, -b1, b1)
        nn.init.uniform_(self.w2_DF, -b2, b2)
        if self.w3_FD is not None:
            nn.init.uniform_(self.w3_FD, -b1, b1)

    def forward(self, x_TD: torch.Tensor) -> torch.Tensor:
        return dense_mlp(x_TD, self.w1_FD, self.w2_DF, self.w3_FD, self.activation)


class SharedExperts(DenseMLP):
    """num_shared experts that every token uses (DeepSeekMoE), fused into one dense MLP of
    hidden size num_shared * shared_hidden (equal to summing the separate experts)."""

    def __init__(self, hidden_size: int, shared_hidden_size: int, num_shared: int,
                 activation: str = "gelu"):
        if num_shared <= 0:
            raise ValueError(f"num_shared must be positive, got {num_shared}")
        super().__init__(hidden_size, shared_hidden_size * num_shared, activation)
        self.num_shared = num_shared


class ResidualMix(nn.Module):
    """DeepSpeed residual MoE: y = moe * c0 + mlp(x) * c1, (c0, c1) = softmax(Linear(D, 2)(x))."""

    def __init__(self, hidden_size: int, ffn_hidden_size: int, activation: str = "gelu"):
        super().__init__()
        self.mlp = DenseMLP(hidden_size, ffn_hidden_size, activation)
        self.coefficient = nn.Linear(hidden_size, 2)

    def forward(self, x_TD: torch.Tensor, moe_TD: torch.Tensor) -> torch.Tensor:
        coef_T2 = torch.softmax(self.coefficient(x_TD), dim=-1)
        return moe_TD * coef_T2[:, 0:1] + self.mlp(x_TD) * coef_T2[:, 1:2]
