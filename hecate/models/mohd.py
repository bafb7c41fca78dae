"""MoHD: Mixture of Hidden Dimensions (Chen et al., ICML 2025, arXiv 2412.05644) as an FFN.

The FFN's hidden width F is cut into N sub-dimensions (contiguous groups of F / N units). The first
`shared` groups are always on (common token features); a router picks, per token, `top_k` of the
other N - shared groups (specialized features). A token's FFN reads only the units of its active
groups and writes through only their rows of the output projection:

    a_TF   = act(x W1) [* x W3 for SwiGLU]                      hidden activation
    m_TN   = 1 on shared groups, k * p_i / sum_sel p on the selected routed groups, 0 elsewhere
    s      = sqrt(N / (shared + top_k))                          activation scaling
    z_TNw  = s * m_TN * a_TNw                                    sparse, rescaled activation
    z_TNw <- z_TNw @ F_Nww                                       group fusion (per group, starts at I)
    y_TD   = z_TF W2

Activation scaling: only (shared + top_k) / N of the units are kept, so the kept activation is
multiplied by sqrt(N / (shared + top_k)); when every group carries the same energy (and the routed
gates are uniform, m = 1) the sparse activation has exactly the dense activation's L2 norm, and
for i.i.d. units it does in expectation — the activation flow of the dense FFN is preserved.

Group fusion: a learned w x w map per sub-dimension group (w = F / N), initialised to the identity,
re-mixes the units of each active group before the output projection. The paper builds its
fusion from a Monarch-structured matrix; ours keeps only the block-diagonal factor, so that a
token's output still depends on exactly its shared + selected sub-dimensions (tested).

The routed gates are renormalised over the selected groups and scaled by top_k, so a uniform
router gives every active group gate 1; a Switch-style balance loss
`balance_coeff * R * sum_i f_i P_i` over the R routed groups is returned as an aux loss.
Units are computed densely and masked (no compute is skipped on CPU); `inactive_parameters()`
counts the skipped groups' W1/W3 columns, W2 rows and fusion blocks for `active_parameters`.

Parallelism: the sub-dimensions are not MoELayer experts — every parameter here is a dense
parameter, replicated on every rank and data parallel (gradients all-reduced by the engine) under
dp, ep, fsdp and fssdp alike.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def check_mohd(d_ffn: int, sub_dims: int, shared: int, top_k: int, balance_coeff: float,
               activation: str) -> None:
    """Raise ValueError naming the model.mohd_* key that is wrong."""
    if sub_dims < 2:
        raise ValueError(f"model.mohd_sub_dims must be >= 2 to split the FFN (0 = MoHD off), got {sub_dims}")
    if d_ffn % sub_dims:
        raise ValueError(f"model.dense_ffn_hidden ({d_ffn}) must be divisible by model.mohd_sub_dims ({sub_dims})")
    if not 0 <= shared < sub_dims:
        raise ValueError(f"model.mohd_shared ({shared}) must be in [0, mohd_sub_dims={sub_dims}) so that "
                         "at least one sub-dimension is routed")
    if not 1 <= top_k <= sub_dims - shared:
        raise ValueError(f"model.mohd_top_k ({top_k}) must be in [1, {sub_dims - shared}] "
                         "(mohd_sub_dims - mohd_shared)")
    if balance_coeff < 0:
        raise ValueError(f"model.mohd_balance_coeff must be >= 0, got {balance_coeff}")
    if activation not in ("gelu", "swiglu"):
        raise ValueError(f"model.dense_activation={activation!r} must be gelu or swiglu for MoHD")


class MoHDFFN(nn.Module):
    def __init__(self, d_model: int, d_ffn: int, sub_dims: int, shared: int, top_k: int,
                 activation: str = "swiglu", balance_coeff: float = 0.01, fusion: bool = True):
        super().__init__()
        check_mohd(d_ffn, sub_dims, shared, top_k, balance_coeff, activation)
        self.N, self.S, self.K = sub_dims, shared, top_k
        self.width = d_ffn // sub_dims
        self.activation = activation
        self.balance_coeff = balance_coeff
        self.scale = math.sqrt(sub_dims / (shared + top_k))
        self.fc1 = nn.Linear(d_model, d_ffn, bias=False)
        self.fc2 = nn.Linear(d_ffn, d_model, bias=False)
        self.fc3 = nn.Linear(d_model, d_ffn, bias=False) if activation == "swiglu" else None
        self.router = nn.Linear(d_model, sub_dims - shared, bias=False)
        nn.init.normal_(self.router.weight, std=d_model ** -0.5)
        self.fusion_NWW = (nn.Parameter(torch.eye(self.width).repeat(sub_dims, 1, 1).contiguous())
                           if fusion else None)

    def gates(self, x_TD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(m_TN: per-group multipliers, 0 on inactive groups; balance loss)."""
        R = self.N - self.S
        probs_TR = torch.softmax(self.router(x_TD).float(), dim=-1)
        top_p, top_i = probs_TR.topk(self.K, dim=-1)
        routed_TR = torch.zeros_like(probs_TR).scatter(-1, top_i, self.K * top_p / top_p.sum(-1, keepdim=True))
        m_TN = torch.cat([probs_TR.new_ones(*probs_TR.shape[:-1], self.S), routed_TR], dim=-1)
        if self.balance_coeff and self.training:
            chosen_R = torch.zeros_like(probs_TR).scatter(-1, top_i, 1.0).flatten(0, -2).mean(0) / self.K
            loss = self.balance_coeff * R * (chosen_R * probs_TR.flatten(0, -2).mean(0)).sum()
        else:
            loss = probs_TR.new_zeros(())
        return m_TN.to(x_TD.dtype), loss

    def hidden(self, x_TD: torch.Tensor) -> torch.Tensor:
        if self.fc3 is not None:
            return F.silu(self.fc1(x_TD)) * self.fc3(x_TD)
        return F.gelu(self.fc1(x_TD))

    def sparse(self, a_TF: torch.Tensor, m_TN: torch.Tensor) -> torch.Tensor:
        """The activation the output projection reads: masked, gated, scaled, fused ([..., F])."""
        z = a_TF.unflatten(-1, (self.N, self.width)) * (self.scale * m_TN).unsqueeze(-1)
        if self.fusion_NWW is not None:
            z = torch.einsum("...nw,nwv->...nv", z, self.fusion_NWW.to(z.dtype))
        return z.flatten(-2)

    def forward(self, x_TD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        m_TN, loss = self.gates(x_TD)
        return self.fc2(self.sparse(self.hidden(x_TD), m_TN)), loss

    def inactive_parameters(self) -> int:
        """Per token: the W1/W3 columns, W2 rows and fusion blocks of the N - shared - top_k
        sub-dimensions a token skips."""
        skipped = self.N - self.S - self.K
        per_group = self.fc1.weight.numel() // self.N + self.fc2.weight.numel() // self.N
        if self.fc3 is not None:
            per_group += self.fc3.weight.numel() // self.N
        if self.fusion_NWW is not None:
            per_group += self.width * self.width
        return skipped * per_group
