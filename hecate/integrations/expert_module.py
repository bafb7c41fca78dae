"""Read a user's expert nn.Module (DeepSpeed passes one and deep-copies it) as Hecate experts.

Two routes, tried in order by the drop-in `MoE`:

- `expert_mlp_weights`: a module holding exactly two bias-free nn.Linear layers D -> F -> D
  that computes act(x @ w1^T) @ w2^T with the exact GELU (checked numerically on random
  rows) becomes Hecate's built-in GroupedExperts (w1_EFD / w2_EDF), the fastest path.
  Anything else raises ValueError saying why.
- `module_experts_for`: every other module becomes `hecate.moe.module_experts.ModuleExperts`
  (its parameters stacked per expert; a grouped path for Linear/elementwise graphs such as
  biased MLPs, ReLU / SiLU / tanh-GELU, SwiGLU / GeGLU and dropout, and a generic per-expert
  functional_call path for the rest). It must map [T, D] rows to [T, D] rows.
"""
from __future__ import annotations

from typing import Tuple

import torch
from torch import nn

from hecate.moe.experts import dense_mlp
from hecate.moe.module_experts import ModuleExperts

# Activation modules Hecate can run, by what they compute.
_SUPPORTED = "nn.GELU() (exact, approximate='none')"
_UNSUPPORTED_ACTIVATIONS = (nn.ReLU, nn.SiLU, nn.Tanh, nn.Sigmoid, nn.LeakyReLU, nn.ELU, nn.Mish,
                            nn.GLU, nn.ReLU6, nn.Softplus)


def expert_mlp_weights(expert: nn.Module, hidden_size: int) -> Tuple[torch.Tensor, torch.Tensor, str]:
    """(w1_FD, w2_DF, activation) of a GELU MLP expert module; ValueError naming `expert` if
    the module is not a form Hecate's grouped experts can represent."""
    if not isinstance(expert, nn.Module):
        raise TypeError(f"expert must be an nn.Module (e.g. nn.Sequential(nn.Linear(D, F, bias=False), "
                        f"nn.GELU(), nn.Linear(F, D, bias=False))), got {type(expert).__name__}")
    for m in expert.modules():
        if isinstance(m, _UNSUPPORTED_ACTIVATIONS):
            raise ValueError(f"expert uses activation {type(m).__name__}; Hecate's experts support "
                             f"{_SUPPORTED} only (swiglu needs a gated 3-matrix expert: configure "
                             "MoEConfig(activation='swiglu') directly)")
        if isinstance(m, nn.GELU) and m.approximate != "none":
            raise ValueError(f"expert uses nn.GELU(approximate={m.approximate!r}); Hecate's experts "
                             "compute the exact GELU: use nn.GELU()")
        if isinstance(m, nn.Dropout) and m.p > 0:
            raise ValueError(f"expert contains nn.Dropout(p={m.p}); Hecate's experts have no dropout: "
                             "remove it or set p=0")
    linears = [m for m in expert.modules() if isinstance(m, nn.Linear)]
    if len(linears) != 2:
        raise ValueError(f"expert must contain exactly two nn.Linear layers (D -> F -> D), found "
                         f"{len(linears)}; Hecate's experts are two-layer MLPs")
    fc1, fc2 = linears
    if fc1.bias is not None or fc2.bias is not None:
        raise ValueError("expert's nn.Linear layers must be bias-free (nn.Linear(..., bias=False)): "
                         "Hecate's grouped experts have no biases")
    f, d = fc1.weight.shape
    if d != hidden_size or tuple(fc2.weight.shape) != (hidden_size, f):
        raise ValueError(f"expert's Linear layers have shapes {tuple(fc1.weight.shape)} and "
                         f"{tuple(fc2.weight.shape)}; expected ({f}, hidden_size={hidden_size}) and "
                         f"({hidden_size}, {f})")
    w1_FD = fc1.weight.detach().float().clone()
    w2_DF = fc2.weight.detach().float().clone()
    _check_numerically(expert, w1_FD, w2_DF, hidden_size)
    return w1_FD, w2_DF, "gelu"


@torch.no_grad()
def _check_numerically(expert: nn.Module, w1_FD, w2_DF, hidden_size: int) -> None:
    """The module must compute gelu(x @ w1^T) @ w2^T: catches F.relu in a custom forward,
    extra scaling, a residual inside the expert, and similar forms we cannot represent."""
    was_training = expert.training
    expert.eval()
    try:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(8, hidden_size, generator=g)
        ref = expert(x.to(next(expert.parameters()).dtype))
        if isinstance(ref, tuple):  # DeepSpeed also takes (output, bias) experts; bias must be None
            if len(ref) > 1 and ref[1] is not None:
                raise ValueError("expert returns (output, bias) with a bias; Hecate's experts have no biases")
            ref = ref[0]
    finally:
        expert.train(was_training)
    want = dense_mlp(x, w1_FD, w2_DF, None, "gelu")
    if ref.shape != want.shape or not torch.allclose(ref.float(), want, rtol=1e-3, atol=1e-4):
        raise ValueError("expert does not compute gelu(x @ fc1.weight^T) @ fc2.weight^T "
                         f"(max difference {float((ref.float() - want).abs().max()):.3g}); Hecate's "
                         f"experts support only that form with {_SUPPORTED}")


def module_experts_for(expert: nn.Module, hidden_size: int, num_experts: int) -> ModuleExperts:
    """ModuleExperts of `num_experts` copies of `expert`; ValueError unless it maps [T, D] to [T, D]."""
    if not isinstance(expert, nn.Module):
        raise TypeError(f"expert must be an nn.Module, got {type(expert).__name__}")
    experts = ModuleExperts(expert, num_experts)
    dtype = next(expert.parameters()).dtype
    with torch.no_grad():
        was = experts.training
        experts.eval()
        try:
            y = experts.expert_forward(0, torch.randn(3, hidden_size, dtype=dtype))
        except Exception as e:  # noqa: BLE001 - reported with the shapes the expert must accept
            raise ValueError(f"expert cannot run on [tokens, hidden_size={hidden_size}] rows: "
                             f"{type(e).__name__}: {e}") from e
        finally:
            experts.train(was)
    if isinstance(y, (tuple, list)):
        y = y[0]
    if tuple(y.shape) != (3, hidden_size):
        raise ValueError(f"expert maps [3, {hidden_size}] rows to shape {tuple(y.shape)}; an MoE expert must "
                         f"return [tokens, hidden_size={hidden_size}]")
    return experts
