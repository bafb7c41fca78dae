"""Mixture-of-Mamba (Liang et al., 2025): Mamba blocks with modality-aware sparsity.

Each modality m has its own input, x, dt and output projections (stacked weights
[M, out, in], selected per token by its modality id: fixed routing, no learned gate);
the depthwise convolution, A (A_log) and D are shared by all modalities. Tokens are
grouped by modality (stable sort), each group is multiplied by its own weights, and the
rows are put back in order, so a token never reads (or sends gradient to) another
modality's projections.

Optional MoE FFN layers (hecate MoELayer, `moe_every`) can follow the Mamba mixers; they
are the only parts the expert strategies (ep, fsdp, fssdp) shard. The modality
projections are dense parameters, replicated and all-reduced like any dense weight.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from hecate.models.selective_scan import selective_scan
from hecate.moe.config import MoEConfig
from hecate.moe.layer import MoELayer


PROJECTIONS = ("in", "x", "dt", "out")


@dataclass
class MambaConfig:
    vocab_size: int = 64
    d_model: int = 32
    n_layers: int = 2
    d_state: int = 8
    d_conv: int = 4
    expand: int = 2
    dt_rank: Optional[int] = None        # None = ceil(d_model / 16)
    num_modalities: int = 2
    modality_specific: bool = True       # False: one shared set of projections (dense Mamba)
    # Which projections are modality-specific (the paper's decoupling ablation); the others are
    # shared by all modalities. Subset of in, x, dt, out; ignored when modality_specific is false.
    decoupled: list = field(default_factory=lambda: ["in", "x", "dt", "out"])
    max_seq_len: int = 2048              # longest sequence `hecate train` / generate feed it
    moe_every: int = 0                   # MoE FFN after every n-th mixer (0 = none, pure Mamba)
    moe: Optional[MoEConfig] = None
    tie_embeddings: bool = True
    # Modality of a token from its id when none is given: modality m owns the ids
    # [modality_vocab_starts[m], modality_vocab_starts[m + 1]) (e.g. [0, 32]: text 0-31, image 32+).
    modality_vocab_starts: Optional[list] = None
    scan_impl: str = "auto"
    scan_chunk_size: int = 16

    def __post_init__(self):
        if isinstance(self.moe, dict):  # from YAML / registry presets
            self.moe = MoEConfig(**self.moe)

    def validate(self) -> "MambaConfig":
        for name in ("vocab_size", "d_model", "n_layers", "d_state", "d_conv", "expand", "num_modalities"):
            v = getattr(self, name)
            if not isinstance(v, int) or v <= 0:
                raise ValueError(f"MambaConfig.{name} must be a positive int, got {v!r}")
        if self.dt_rank is not None and (not isinstance(self.dt_rank, int) or self.dt_rank <= 0):
            raise ValueError(f"MambaConfig.dt_rank must be a positive int or None, got {self.dt_rank!r}")
        starts = self.modality_vocab_starts
        if starts is not None and (len(starts) != self.num_modalities or starts[0] != 0
                                   or any(b <= a for a, b in zip(starts, starts[1:]))
                                   or starts[-1] >= self.vocab_size):
            raise ValueError(f"MambaConfig.modality_vocab_starts={starts} must be {self.num_modalities} "
                             f"increasing ids starting at 0 and below vocab_size={self.vocab_size}")
        bad = [c for c in self.decoupled if c not in PROJECTIONS] if isinstance(self.decoupled, (list, tuple)) else None
        if bad is None or bad or len(set(self.decoupled)) != len(self.decoupled):
            raise ValueError(f"MambaConfig.decoupled={self.decoupled!r} must list distinct projections of "
                             f"{list(PROJECTIONS)}")
        if not isinstance(self.max_seq_len, int) or self.max_seq_len < 1:
            raise ValueError(f"MambaConfig.max_seq_len must be a positive int, got {self.max_seq_len!r}")
        if self.moe_every < 0:
            raise ValueError(f"MambaConfig.moe_every must be >= 0, got {self.moe_every}")
        if self.moe_every and self.moe is None:
            raise ValueError("MambaConfig.moe_every > 0 needs MambaConfig.moe (an MoEConfig)")
        if self.moe is not None and self.moe.hidden_size != self.d_model:
            raise ValueError(f"MambaConfig.moe.hidden_size={self.moe.hidden_size} must equal "
                             f"d_model={self.d_model}")
        return self

    @property
    def d_inner(self) -> int:
        return self.expand * self.d_model

    @property
    def rank(self) -> int:
        return self.dt_rank or math.ceil(self.d_model / 16)

    def copies(self, projection: str) -> int:
        """How many weight sets `projection` has: num_modalities when it is decoupled, else 1."""
        return self.num_modalities if self.modality_specific and projection in self.decoupled else 1


def modality_linear(x_TI: torch.Tensor, modality_T: torch.Tensor, w_MOI: torch.Tensor,
                    b_MO: Optional[torch.Tensor] = None) -> torch.Tensor:
    """y[t] = x[t] @ w[modality[t]]^T (+ b[modality[t]]): each token uses its modality's weights.

    Rows are stably sorted by modality, split into one block per modality and multiplied by
    that modality's matrix, then restored to their order (a modality with no rows still
    joins the graph with an empty block, so its gradient is zero, never None)."""
    m = w_MOI.shape[0]
    if m == 1:
        return F.linear(x_TI, w_MOI[0], None if b_MO is None else b_MO[0])
    order_T = torch.argsort(modality_T, stable=True)
    counts = torch.bincount(modality_T, minlength=m).tolist()
    pieces = torch.split(x_TI[order_T], counts)
    out = [F.linear(p, w_MOI[i], None if b_MO is None else b_MO[i]) for i, p in enumerate(pieces)]
    y_sorted = torch.cat(out)
    return torch.empty_like(y_sorted).index_copy(0, order_T, y_sorted)


def causal_depthwise_conv(x_BLE: torch.Tensor, w_E1K: torch.Tensor, b_E: torch.Tensor) -> torch.Tensor:
    """y[t] = b + sum_j w[:, j] * x[t - K + 1 + j] (zero before the start): nn.Conv1d(groups=E,
    padding=K-1) truncated to L, written as K shifted multiply-adds (mkldnn's depthwise
    backward is far slower on CPU at these sizes)."""
    k = w_E1K.shape[-1]
    l = x_BLE.shape[1]
    xp = F.pad(x_BLE, (0, 0, k - 1, 0))
    y = b_E.expand_as(x_BLE)
    for j in range(k):
        y = y + xp[:, j:j + l] * w_E1K[:, 0, j]
    return y


class ModalityMamba(nn.Module):
    """One Mamba mixer with per-modality in/x/dt/out projections and shared conv, A, D."""

    def __init__(self, cfg: MambaConfig):
        super().__init__()
        self.cfg = cfg
        c = cfg.copies
        d, e, n, r = cfg.d_model, cfg.d_inner, cfg.d_state, cfg.rank
        # Leading dim: one weight set per modality for a decoupled projection, else 1 (shared).
        self.in_proj_MXD = nn.Parameter(torch.empty(c("in"), 2 * e, d))
        self.x_proj_MPE = nn.Parameter(torch.empty(c("x"), r + 2 * n, e))
        self.dt_proj_MER = nn.Parameter(torch.empty(c("dt"), e, r))
        self.dt_bias_ME = nn.Parameter(torch.empty(c("dt"), e))
        self.out_proj_MDE = nn.Parameter(torch.empty(c("out"), d, e))
        # shared across modalities
        self.conv = nn.Conv1d(e, e, cfg.d_conv, groups=e, padding=cfg.d_conv - 1)
        self.A_log_EN = nn.Parameter(torch.empty(e, n))
        self.D_E = nn.Parameter(torch.empty(e))
        self.reset_parameters()

    MODALITY_PARAMS = ("in_proj_MXD", "x_proj_MPE", "dt_proj_MER", "dt_bias_ME", "out_proj_MDE")
    SHARED_PARAMS = ("conv.weight", "conv.bias", "A_log_EN", "D_E")

    @torch.no_grad()
    def reset_parameters(self, dt_min: float = 1e-3, dt_max: float = 0.1) -> None:
        """Mamba's init: A = -(1..N) per channel, D = 1, dt bias = softplus^-1(dt) with dt
        log-uniform in [dt_min, dt_max]; projections like nn.Linear (dt_proj: rank^-0.5)."""
        cfg = self.cfg
        for w in (self.in_proj_MXD, self.x_proj_MPE, self.out_proj_MDE):
            bound = 1.0 / math.sqrt(w.shape[-1])
            nn.init.uniform_(w, -bound, bound)
        nn.init.uniform_(self.dt_proj_MER, -cfg.rank ** -0.5, cfg.rank ** -0.5)
        dt = torch.exp(torch.rand_like(self.dt_bias_ME) * (math.log(dt_max) - math.log(dt_min))
                       + math.log(dt_min)).clamp(min=1e-4)
        self.dt_bias_ME.copy_(dt + torch.log(-torch.expm1(-dt)))
        a = torch.arange(1, cfg.d_state + 1, dtype=torch.float32, device=self.A_log_EN.device)
        self.A_log_EN.copy_(torch.log(a).expand(cfg.d_inner, -1))
        self.D_E.fill_(1.0)

    def forward(self, x_BLD: torch.Tensor, modality_BL: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        b, l, d = x_BLD.shape
        e, n, r = cfg.d_inner, cfg.d_state, cfg.rank
        mod_T = modality_BL.reshape(-1) if cfg.modality_specific else torch.zeros_like(modality_BL).reshape(-1)
        xz = modality_linear(x_BLD.reshape(-1, d), mod_T, self.in_proj_MXD).view(b, l, 2 * e)
        u_BLE, z_BLE = xz.chunk(2, dim=-1)
        # Shared causal depthwise convolution over the sequence (crosses modality boundaries).
        u_BLE = F.silu(causal_depthwise_conv(u_BLE, self.conv.weight, self.conv.bias))
        x_dbl = modality_linear(u_BLE.reshape(-1, e), mod_T, self.x_proj_MPE)
        dt_TR, B_TN, C_TN = x_dbl.split([r, n, n], dim=-1)
        delta_BLE = F.softplus(modality_linear(dt_TR, mod_T, self.dt_proj_MER, self.dt_bias_ME)).view(b, l, e)
        y_BLE = selective_scan(u_BLE, delta_BLE, -torch.exp(self.A_log_EN.float()), B_TN.view(b, l, n),
                               C_TN.view(b, l, n), self.D_E, impl=cfg.scan_impl, chunk_size=cfg.scan_chunk_size)
        y_BLE = y_BLE * F.silu(z_BLE)
        return modality_linear(y_BLE.reshape(-1, e), mod_T, self.out_proj_MDE).view(b, l, d)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return x * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps).to(x.dtype) * self.weight


class MambaBlock(nn.Module):
    def __init__(self, cfg: MambaConfig, moe: bool):
        super().__init__()
        self.norm = RMSNorm(cfg.d_model)
        self.mixer = ModalityMamba(cfg)
        self.ffn_norm = RMSNorm(cfg.d_model) if moe else None
        self.ffn = MoELayer(cfg.moe) if moe else None

    def forward(self, x_BLD, modality_BL, aux: list, stats: list):
        x_BLD = x_BLD + self.mixer(self.norm(x_BLD), modality_BL)
        if self.ffn is not None:
            out = self.ffn(self.ffn_norm(x_BLD))
            aux.append(out.aux_loss)
            stats.append(out.stats)
            x_BLD = x_BLD + out.y
        return x_BLD


@dataclass
class MambaOutput:
    logits: torch.Tensor
    aux_loss: torch.Tensor
    moe_stats: list


class MixtureOfMamba(nn.Module):
    """Mamba LM over interleaved modalities: forward(tokens_BL, modality_BL=None) -> MambaOutput."""

    def __init__(self, cfg: MambaConfig):
        super().__init__()
        self.cfg = cfg.validate()
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(
            MambaBlock(cfg, bool(cfg.moe_every) and (i + 1) % cfg.moe_every == 0) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model)
        self.head = None if cfg.tie_embeddings else nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        nn.init.normal_(self.embed.weight, std=0.02)

    def moe_layers(self) -> list:
        return [b.ffn for b in self.blocks if b.ffn is not None]

    def modality_of(self, tokens_BL: torch.Tensor) -> torch.Tensor:
        """Modality ids from token ids (MambaConfig.modality_vocab_starts)."""
        starts = self.cfg.modality_vocab_starts
        if starts is None:
            raise ValueError("modality_BL is required unless MambaConfig.modality_vocab_starts is set")
        bounds = torch.tensor(starts[1:], device=tokens_BL.device, dtype=tokens_BL.dtype)
        return torch.bucketize(tokens_BL.contiguous(), bounds, right=True)

    def forward(self, tokens_BL: torch.Tensor, modality_BL: Optional[torch.Tensor] = None) -> MambaOutput:
        if modality_BL is None:
            modality_BL = self.modality_of(tokens_BL)
        if tokens_BL.dim() != 2 or modality_BL.shape != tokens_BL.shape:
            raise ValueError(f"tokens_BL and modality_BL must be equal [B, L] shapes, got "
                             f"{tuple(tokens_BL.shape)} and {tuple(modality_BL.shape)}")
        if modality_BL.numel() and (int(modality_BL.min()) < 0 or int(modality_BL.max()) >= self.cfg.num_modalities):
            raise ValueError(f"modality ids must be in [0, num_modalities={self.cfg.num_modalities}), got "
                             f"[{int(modality_BL.min())}, {int(modality_BL.max())}]")
        x = self.embed(tokens_BL)
        aux, stats = [], []
        for block in self.blocks:
            x = block(x, modality_BL, aux, stats)
        x = self.norm(x)
        logits = x @ self.embed.weight.t() if self.head is None else self.head(x)
        aux_loss = torch.stack(aux).sum() if aux else x.new_zeros(())
        return MambaOutput(logits, aux_loss, stats)

    def loss(self, tokens_BL, targets_BL, modality_BL=None) -> tuple[torch.Tensor, MambaOutput]:
        """Next-token cross-entropy (+ MoE aux losses); modality_BL is the inputs' modality
        (default: from the token ids, see MambaConfig.modality_vocab_starts)."""
        out = self(tokens_BL, modality_BL)
        lm = F.cross_entropy(out.logits.flatten(0, 1).float(), targets_BL.flatten())
        return lm + out.aux_loss, out

    def active_parameters(self) -> int:
        """Per token: one modality's projections (of M) and top_k of each MoE layer's experts."""
        total = sum(p.numel() for p in self.parameters())
        inactive = 0
        for block in self.blocks:
            mixer = block.mixer
            for name in ModalityMamba.MODALITY_PARAMS:
                w = getattr(mixer, name)
                inactive += w.numel() - w.numel() // w.shape[0]
            if block.ffn is not None:
                c = block.ffn.config
                k = sum(p.numel() for p in block.ffn.experts.parameters())
                inactive += k - k * c.top_k // c.num_experts
        return total - inactive
