"""The selective scan of Mamba (S6) in plain PyTorch, plus mamba-ssm's kernel when present.

    h_t = exp(delta_t * A) * h_{t-1} + delta_t * B_t * u_t        (per channel e, state n)
    y_t = <C_t, h_t> + D * u_t

Layouts: u_BLE, delta_BLE (already positive, i.e. after softplus), A_EN (negative),
B_BLN, C_BLN (input-dependent, shared by all channels), D_E. Returns y_BLE.

"chunked" (default) is exact, not approximate: inside a chunk of L_c steps the state is
  h_t = exp(S_t) h_0 + sum_{s<=t} exp(S_t - S_s) delta_s B_s u_s,  S_t = sum_{r<=t} delta_r A,
computed with one [B, L_c, L_c, E, N] tensor, and chunks run in sequence (memory grows with
L_c^2, time with L / L_c Python steps). "sequential" loops over time steps.
"""
from __future__ import annotations

import torch

IMPLS = ("auto", "chunked", "sequential", "cuda")


def _check(u, delta, A, B, C, D):
    if u.dim() != 3 or delta.shape != u.shape:
        raise ValueError(f"u_BLE and delta_BLE must be equal 3-D shapes, got {tuple(u.shape)}, {tuple(delta.shape)}")
    b, l, e = u.shape
    if A.dim() != 2 or A.shape[0] != e:
        raise ValueError(f"A_EN must be [{e}, N], got {tuple(A.shape)}")
    n = A.shape[1]
    for name, t in (("B_BLN", B), ("C_BLN", C)):
        if tuple(t.shape) != (b, l, n):
            raise ValueError(f"{name} must be [{b}, {l}, {n}], got {tuple(t.shape)}")
    if D is not None and tuple(D.shape) != (e,):
        raise ValueError(f"D_E must be [{e}], got {tuple(D.shape)}")


def _scan_sequential(u, delta, A, B, C):
    b, l, e = u.shape
    h_BEN = u.new_zeros(b, e, A.shape[1])
    ys = []
    for t in range(l):
        dA_BEN = torch.exp(delta[:, t, :, None] * A)
        h_BEN = dA_BEN * h_BEN + (delta[:, t] * u[:, t])[:, :, None] * B[:, t, None, :]
        ys.append((h_BEN * C[:, t, None, :]).sum(-1))
    return torch.stack(ys, dim=1)


def _scan_chunked(u, delta, A, B, C, chunk_size):
    b, l, e = u.shape
    h_BEN = u.new_zeros(b, e, A.shape[1])
    ys = []
    for start in range(0, l, chunk_size):
        sl = slice(start, min(start + chunk_size, l))
        dA_BLEN = delta[:, sl, :, None] * A                      # <= 0
        S_BLEN = torch.cumsum(dA_BLEN, dim=1)
        dBu_BLEN = (delta[:, sl] * u[:, sl])[..., None] * B[:, sl, None, :]
        lc = S_BLEN.shape[1]
        causal = torch.ones(lc, lc, dtype=torch.bool, device=u.device).tril()
        diff_BTSEN = S_BLEN[:, :, None] - S_BLEN[:, None, :]     # S_t - S_s
        decay_BTSEN = torch.exp(diff_BTSEN.masked_fill(~causal[None, :, :, None, None], float("-inf")))
        h_BLEN = (decay_BTSEN * dBu_BLEN[:, None]).sum(2) + torch.exp(S_BLEN) * h_BEN[:, None]
        ys.append((h_BLEN * C[:, sl, None, :]).sum(-1))
        h_BEN = h_BLEN[:, -1]
    return torch.cat(ys, dim=1)


def _cuda_kernel():
    try:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
    except Exception:  # not installed, or built for another torch: fall back to PyTorch
        return None
    return selective_scan_fn


def selective_scan(u_BLE: torch.Tensor, delta_BLE: torch.Tensor, A_EN: torch.Tensor,
                   B_BLN: torch.Tensor, C_BLN: torch.Tensor, D_E: torch.Tensor | None = None,
                   *, impl: str = "auto", chunk_size: int = 16) -> torch.Tensor:
    """y_BLE of the selective scan (see module docstring). impl: "auto" (mamba-ssm's CUDA
    kernel for CUDA tensors when importable, else "chunked" on GPU and "sequential" on CPU,
    where the [B, L_c, L_c, E, N] tensor costs more than the loop), "chunked", "sequential" or
    "cuda" (mamba-ssm, raises when unavailable). Computes in fp32, returns u's dtype."""
    if impl not in IMPLS:
        raise ValueError(f"impl={impl!r} is unknown; choose one of {IMPLS}")
    if not isinstance(chunk_size, int) or chunk_size <= 0:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    _check(u_BLE, delta_BLE, A_EN, B_BLN, C_BLN, D_E)
    kernel = _cuda_kernel() if impl in ("auto", "cuda") and u_BLE.is_cuda else None
    if impl == "cuda" and kernel is None:
        raise ValueError("impl='cuda' needs CUDA tensors and an importable mamba_ssm")
    if kernel is not None:
        y = kernel(u_BLE.transpose(1, 2).contiguous(), delta_BLE.transpose(1, 2).contiguous(),
                   A_EN.float(), B_BLN.transpose(1, 2).contiguous(), C_BLN.transpose(1, 2).contiguous(),
                   None if D_E is None else D_E.float(), delta_softplus=False)
        return y.transpose(1, 2).to(u_BLE.dtype)
    dtype = u_BLE.dtype
    u, delta, A, B, C = (t.float() for t in (u_BLE, delta_BLE, A_EN, B_BLN, C_BLN))
    if impl == "sequential" or (impl == "auto" and not u_BLE.is_cuda):
        y = _scan_sequential(u, delta, A, B, C)
    else:
        y = _scan_chunked(u, delta, A, B, C, chunk_size)
    if D_E is not None:
        y = y + u * D_E.float()
    return y.to(dtype)
