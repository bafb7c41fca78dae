"""RoPE frequency scaling of long-context checkpoints (model.rope_scaling): linear, llama3
(Llama 3.1+) and yarn (DeepSeek-V3, Qwen long-context). Each gives the inverse frequencies
and a factor applied to cos/sin; yarn with `mscale_all_dim` also scales the attention
softmax (DeepSeek's MLA). The formulas are those of the papers / reference implementations
(and of transformers' rope utilities, the test oracle).

rope_scaling is a dict: {"type": "linear", "factor"} | {"type": "llama3", "factor",
"low_freq_factor", "high_freq_factor", "original_max_position_embeddings"} | {"type": "yarn",
"factor", "original_max_position_embeddings", optional "beta_fast" (32), "beta_slow" (1),
"mscale", "mscale_all_dim", "attention_factor", "truncate" (true)}.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch

from hecate.models.attention import Rope

TYPES = ("linear", "llama3", "yarn")
REQUIRED = {"linear": ("factor",),
            "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
            "yarn": ("factor", "original_max_position_embeddings")}
OPTIONAL = {"linear": (), "llama3": (),
            "yarn": ("beta_fast", "beta_slow", "mscale", "mscale_all_dim", "attention_factor", "truncate")}


def check_rope_scaling(scaling: Optional[dict]) -> None:
    """ValueError naming the key when model.rope_scaling is malformed."""
    if scaling is None:
        return
    if not isinstance(scaling, dict) or scaling.get("type") not in TYPES:
        raise ValueError(f"model.rope_scaling must be a dict with type in {TYPES}, got {scaling!r}")
    kind = scaling["type"]
    missing = [k for k in REQUIRED[kind] if scaling.get(k) is None]
    unknown = sorted(set(scaling) - {"type", *REQUIRED[kind], *OPTIONAL[kind]})
    if missing or unknown:
        raise ValueError(f"model.rope_scaling ({kind}): missing {missing}, unknown {unknown}")
    if not scaling["factor"] > 0:
        raise ValueError(f"model.rope_scaling.factor must be > 0, got {scaling['factor']}")


def _mscale(scale: float, m: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0


def inv_freq_and_factor(head_dim: int, theta: float, scaling: dict, device=None) -> Tuple[torch.Tensor, float]:
    """(inverse frequencies [head_dim // 2] fp32, factor on cos/sin)."""
    dims = torch.arange(0, head_dim, 2, dtype=torch.int64).to(device=device, dtype=torch.float) / head_dim
    inv_freq = 1.0 / (theta ** dims)
    kind, factor = scaling["type"], float(scaling["factor"])
    if kind == "linear":
        return inv_freq / factor, 1.0
    if kind == "llama3":
        old = scaling["original_max_position_embeddings"]
        low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old / low, inv_freq / factor, inv_freq)
        smooth = (old / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < old / high) * ~(wavelen > old / low)
        return torch.where(medium, smoothed, scaled), 1.0
    # yarn: interpolate the low frequencies, keep the high ones, ramp between
    old = scaling["original_max_position_embeddings"]
    attention = scaling.get("attention_factor")
    if attention is None:
        m, m_all = scaling.get("mscale"), scaling.get("mscale_all_dim")
        attention = _mscale(factor, m) / _mscale(factor, m_all) if (m and m_all) else _mscale(factor)
    beta_fast, beta_slow = scaling.get("beta_fast") or 32, scaling.get("beta_slow") or 1

    def correction_dim(rotations):
        return head_dim * math.log(old / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    lo, hi = correction_dim(beta_fast), correction_dim(beta_slow)
    if scaling.get("truncate", True):
        lo, hi = math.floor(lo), math.ceil(hi)
    lo, hi = max(lo, 0), min(hi, head_dim - 1)
    if lo == hi:
        hi += 0.001
    ramp = torch.clamp((torch.arange(head_dim // 2, dtype=torch.float32) - lo) / (hi - lo), 0, 1).to(inv_freq)
    keep = 1 - ramp  # 1: extrapolate (original frequency), 0: interpolate (divided by factor)
    pos_freqs = theta ** dims
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - keep) + (1.0 / pos_freqs) * keep
    return inv_freq, float(attention)


def scaled_rope_tables(seq_len: int, head_dim: int, theta: float, scaling: dict, device=None) -> Rope:
    """cos/sin tables like hecate.models.attention.rope_tables, with the scaled frequencies and
    the cos/sin factor applied."""
    inv_freq_R, factor = inv_freq_and_factor(head_dim, theta, scaling, device)
    angles_SR = torch.arange(seq_len, device=device, dtype=torch.float32)[:, None] * inv_freq_R
    return angles_SR.cos() * factor, angles_SR.sin() * factor


def softmax_scale_multiplier(scaling: Optional[dict]) -> float:
    """DeepSeek yarn: attention logits times mscale(factor, mscale_all_dim)^2 (1 otherwise)."""
    if not scaling or scaling.get("type") != "yarn" or not scaling.get("mscale_all_dim"):
        return 1.0
    return _mscale(float(scaling["factor"]), scaling["mscale_all_dim"]) ** 2
