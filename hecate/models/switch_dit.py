"""Switch-DiT (Park et al., 2024): a DiT whose blocks hold a sparse MoE gated by the timestep.

As in the authors' code (models/MoE.py, models/DiT/models.py), each block computes the switch
m = 1 + sum_j g_j(t) E_j(x), runs the usual adaLN-Zero DiT block (attention + MLP modulated by t
and the class) on the switched input x * m, and skip-connects the rest of its input to the end:
    r = x * m;  r = r + attn(r);  r = r + mlp(r);  out = r + (1 - m) * x
(= x + attn(x m) + mlp(...): the residual stream keeps x, the branches read the switched input).
The gate g(t) = TopK(softmax(W silu(e_t) + b)) reads only the timestep embedding e_t, broadcast
to every token (MoELayer's `router_input`), so all tokens of one sample share their top-k
experts: per-sample routing. Experts start at zero output (weight and bias zero), so the switch is
the identity at init. The diffusion prior loss pulls each sample's gate distribution toward a
prior that gives neighbouring timesteps the same experts (Jensen-Shannon divergence, weight 1).

Experts are single linear maps D -> D with a bias (`expert_bias`, the authors' ParallelExperts
w [E, D, D] and b [E, D]), stored stacked through hecate.moe.module_experts.ModuleExperts so
that every strategy (dp, ep, fsdp, fssdp) shards them; `expert_type: mlp` keeps the older
D -> expert_hidden_size -> D MLP experts. A shared linear expert (`shared_expert`,
zero-initialized, dense; our reading of the paper's "shared expert across all tasks", which the
authors' code does not hold as a module) joins the switch for every timestep:
m = 1 + shared(x) + sum_j g_j(t) E_j(x).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from hecate.models.diffusion import SCHEDULES, alphas_cumprod, q_sample
from hecate.moe.config import MoEConfig
from hecate.moe.layer import MoELayer
from hecate.moe.module_experts import ModuleExperts


@dataclass
class SwitchDiTConfig:
    image_size: int = 8
    in_channels: int = 3
    patch_size: int = 2
    d_model: int = 32
    n_layers: int = 2
    n_heads: int = 4
    mlp_ratio: float = 4.0
    num_classes: int = 0            # 0 = unconditional; else class-conditional (label embedding)
    num_experts: int = 3
    top_k: int = 2
    expert_hidden_size: Optional[int] = None   # None = d_model
    num_timesteps: int = 1000
    noise_schedule: str = "linear"
    prior_loss_weight: float = 1.0
    expert_type: str = "linear"     # linear: E_j(x) = W_j x + b_j as the paper; mlp: D -> expert_hidden_size -> D
    expert_bias: bool = True        # linear experts carry a bias (the authors' ParallelExperts b [E, D])
    shared_expert: bool = True      # an always-on linear expert every timestep uses (in the switch)
    moe: dict = field(default_factory=dict)    # extra MoEConfig fields (e.g. capacity_factor)

    def validate(self) -> "SwitchDiTConfig":
        for name in ("image_size", "in_channels", "patch_size", "d_model", "n_layers", "n_heads",
                     "num_experts", "top_k", "num_timesteps"):
            v = getattr(self, name)
            if not isinstance(v, int) or v <= 0:
                raise ValueError(f"SwitchDiTConfig.{name} must be a positive int, got {v!r}")
        if self.image_size % self.patch_size:
            raise ValueError(f"SwitchDiTConfig.patch_size={self.patch_size} must divide "
                             f"image_size={self.image_size}")
        if self.d_model % self.n_heads:
            raise ValueError(f"SwitchDiTConfig.n_heads={self.n_heads} must divide d_model={self.d_model}")
        if self.top_k > self.num_experts:
            raise ValueError(f"SwitchDiTConfig.top_k={self.top_k} exceeds num_experts={self.num_experts}")
        if self.noise_schedule not in SCHEDULES:
            raise ValueError(f"SwitchDiTConfig.noise_schedule={self.noise_schedule!r}; choose one of {SCHEDULES}")
        if self.expert_type not in ("linear", "mlp"):
            raise ValueError(f"SwitchDiTConfig.expert_type={self.expert_type!r}; choose linear or mlp")
        if self.expert_type == "mlp" and not self.expert_bias:
            raise ValueError("SwitchDiTConfig.expert_bias applies to expert_type='linear' only (MLP experts "
                             "have no bias); remove it")
        if self.expert_type == "linear" and self.expert_hidden_size is not None:
            raise ValueError("SwitchDiTConfig.expert_hidden_size applies to expert_type='mlp' only; remove it")
        if self.num_classes < 0 or self.prior_loss_weight < 0:
            raise ValueError("SwitchDiTConfig.num_classes and prior_loss_weight must be >= 0")
        return self

    def moe_config(self) -> MoEConfig:
        # router_bias: the authors' gate is Linear(D, E, bias=True) over silu(e_t)
        base = dict(hidden_size=self.d_model, ffn_hidden_size=self.expert_hidden_size or self.d_model,
                    num_experts=self.num_experts, top_k=self.top_k, router="topk", min_capacity=1,
                    router_bias=True)
        bad = {"hidden_size", "ffn_hidden_size", "num_experts", "top_k"} & set(self.moe)
        if bad:
            raise ValueError(f"SwitchDiTConfig.moe must not set {sorted(bad)}; use the top-level keys")
        return MoEConfig(**{**base, **self.moe})


# ---- prior and loss ------------------------------------------------------------------------
def timestep_prior(t_B: torch.Tensor, num_timesteps: int, num_experts: int, top_k: int) -> torch.Tensor:
    """Prior gate distribution [B, E] that groups neighbouring timesteps.

    The T timesteps form G = E - k + 1 contiguous groups; group g's prior is uniform over the
    sliding window of experts g .. g+k-1. Neighbouring timesteps share a prior; distant ones
    share only the overlap of their windows (for top-2 of 3: expert 1 is common to all
    timesteps, expert 0 is for low noise, expert 2 for high noise).
    """
    if top_k > num_experts:
        raise ValueError(f"top_k={top_k} exceeds num_experts={num_experts}")
    groups = num_experts - top_k + 1
    g_B = (t_B.long() * groups) // num_timesteps
    e_E = torch.arange(num_experts, device=t_B.device)
    inside_BE = (e_E[None] >= g_B[:, None]) & (e_E[None] < g_B[:, None] + top_k)
    return inside_BE.float() / top_k


def js_divergence(p_BE: torch.Tensor, q_BE: torch.Tensor) -> torch.Tensor:
    """Mean over rows of JS(p || q) = (KL(p||m) + KL(q||m)) / 2, m = (p + q) / 2 (natural log)."""
    if p_BE.shape != q_BE.shape:
        raise ValueError(f"p_BE {tuple(p_BE.shape)} and q_BE {tuple(q_BE.shape)} must have one shape")
    m = 0.5 * (p_BE + q_BE)
    kl_pm = (torch.xlogy(p_BE, p_BE) - torch.xlogy(p_BE, m)).sum(-1)
    kl_qm = (torch.xlogy(q_BE, q_BE) - torch.xlogy(q_BE, m)).sum(-1)
    return (0.5 * (kl_pm + kl_qm)).mean()


# ---- embeddings ----------------------------------------------------------------------------
def timestep_frequencies(t_B: torch.Tensor, dim: int = 256, max_period: float = 10000.0) -> torch.Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t_B.device) / half)
    args = t_B.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class TimestepEmbedder(nn.Module):
    def __init__(self, d_model: int, freq_dim: int = 256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, d_model), nn.SiLU(), nn.Linear(d_model, d_model))

    def forward(self, t_B: torch.Tensor) -> torch.Tensor:
        return self.mlp(timestep_frequencies(t_B, self.freq_dim))


def sincos_pos_embed_2d(d_model: int, grid: int) -> torch.Tensor:
    """Fixed 2-D sin-cos position embedding [grid*grid, D] (half the channels per axis)."""
    quarter = d_model // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float32) / max(quarter, 1))
    pos = torch.arange(grid, dtype=torch.float32)
    yy, xx = torch.meshgrid(pos, pos, indexing="ij")
    parts = []
    for coord in (yy.reshape(-1), xx.reshape(-1)):
        out = coord[:, None] * omega[None]
        parts += [torch.sin(out), torch.cos(out)]
    emb = torch.cat(parts, dim=1)
    return F.pad(emb, (0, d_model - emb.shape[1]))


def modulate(x_BND, shift_BD, scale_BD):
    return x_BND * (1 + scale_BD[:, None]) + shift_BD[:, None]


# ---- blocks --------------------------------------------------------------------------------
class SwitchDiTBlock(nn.Module):
    def __init__(self, cfg: SwitchDiTConfig):
        super().__init__()
        d = cfg.d_model
        self.n_heads = cfg.n_heads
        self.moe = MoELayer(cfg.moe_config())
        if cfg.expert_type == "linear":
            # The paper's experts are single linear maps D -> D with a bias: ModuleExperts stacks them
            # ([E, D, D] weight, [E, D] bias) so every strategy shards them like the built-in experts.
            self.moe.experts = ModuleExperts(nn.Linear(d, d, bias=cfg.expert_bias), cfg.num_experts, warn=False)
        self.shared = nn.Linear(d, d, bias=False) if cfg.shared_expert else None
        self.norm1 = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.norm2 = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        hidden = int(d * cfg.mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(d, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, d))
        self.ada_ln = nn.Sequential(nn.SiLU(), nn.Linear(d, 6 * d))

    def attention(self, x_BND):
        b, n, d = x_BND.shape
        q, k, v = self.qkv(x_BND).view(b, n, 3, self.n_heads, d // self.n_heads).permute(2, 0, 3, 1, 4)
        o = F.scaled_dot_product_attention(q, k, v)
        return self.proj(o.transpose(1, 2).reshape(b, n, d))

    def forward(self, x_BND, c_BD, temb_BD):
        # Sparse switch: routing from the timestep embedding only -> per-sample experts.
        gate_in_BD = F.silu(temb_BD)
        out = self.moe(x_BND, router_input=gate_in_BD[:, None].expand_as(x_BND))
        switch = out.y if self.shared is None else out.y + self.shared(x_BND)  # shared: every timestep
        m_BND = 1 + switch
        # Per-sample gate distribution (softmax over all experts) for the diffusion prior loss.
        gate_BE = torch.softmax(self.moe.router.logits(gate_in_BD), dim=-1)
        s1, c1, g1, s2, c2, g2 = self.ada_ln(c_BD).chunk(6, dim=-1)
        r_BND = x_BND * m_BND
        r_BND = r_BND + g1[:, None] * self.attention(modulate(self.norm1(r_BND), s1, c1))
        r_BND = r_BND + g2[:, None] * self.mlp(modulate(self.norm2(r_BND), s2, c2))
        return r_BND + (1 - m_BND) * x_BND, out, gate_BE


@dataclass
class DiTOutput:
    eps: torch.Tensor          # predicted noise, [B, C, H, W]
    aux_loss: torch.Tensor     # MoE balancing terms (0 unless configured)
    prior_loss: torch.Tensor   # JS(gate || timestep prior), averaged over layers (unweighted)
    gates: list                # per layer: [B, E] gate distributions
    moe_stats: list


class SwitchDiT(nn.Module):
    """Switch-DiT epsilon predictor. forward(x_t, t, y) -> DiTOutput; loss(x0, y, t, noise)."""

    def __init__(self, cfg: SwitchDiTConfig):
        super().__init__()
        self.cfg = cfg.validate()
        d, p, c = cfg.d_model, cfg.patch_size, cfg.in_channels
        self.grid = cfg.image_size // p
        self.patch_embed = nn.Linear(c * p * p, d)
        self.register_buffer("pos_ND", sincos_pos_embed_2d(d, self.grid), persistent=False)
        self.t_embed = TimestepEmbedder(d)
        self.y_embed = nn.Embedding(cfg.num_classes, d) if cfg.num_classes else None
        self.blocks = nn.ModuleList(SwitchDiTBlock(cfg) for _ in range(cfg.n_layers))
        self.final_norm = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.final_ada = nn.Sequential(nn.SiLU(), nn.Linear(d, 2 * d))
        self.final = nn.Linear(d, p * p * c)
        self.register_buffer("alphas_cumprod_T", alphas_cumprod(cfg.num_timesteps, cfg.noise_schedule).float(),
                             persistent=False)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """DiT init (adaLN-Zero: modulations and the output layer start at zero) plus
        zero-output experts so each block's switch branch starts as the identity."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        for lin in self.t_embed.mlp:
            if isinstance(lin, nn.Linear):
                nn.init.normal_(lin.weight, std=0.02)
        if self.y_embed is not None:
            nn.init.normal_(self.y_embed.weight, std=0.02)
        for block in self.blocks:
            nn.init.zeros_(block.ada_ln[-1].weight)
            nn.init.zeros_(block.ada_ln[-1].bias)
            nn.init.zeros_(self.expert_output_weight(block))
            if self.cfg.expert_type == "linear" and self.cfg.expert_bias:
                nn.init.zeros_(block.moe.experts.bias)
            if block.shared is not None:
                nn.init.zeros_(block.shared.weight)
        for lin in (self.final_ada[-1], self.final):
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)

    def expert_output_weight(self, block) -> nn.Parameter:
        """The routed experts' last weight (zero at init): [E, D, D] linear or w2_EDF of the MLPs."""
        return block.moe.experts.weight if self.cfg.expert_type == "linear" else block.moe.experts.w2_EDF

    def patchify(self, x_BCHW):
        b, c, h, w = x_BCHW.shape
        p, g = self.cfg.patch_size, self.grid
        return x_BCHW.reshape(b, c, g, p, g, p).permute(0, 2, 4, 1, 3, 5).reshape(b, g * g, c * p * p)

    def unpatchify(self, x_BNP):
        b = x_BNP.shape[0]
        p, g, c = self.cfg.patch_size, self.grid, self.cfg.in_channels
        return x_BNP.reshape(b, g, g, c, p, p).permute(0, 3, 1, 4, 2, 5).reshape(b, c, g * p, g * p)

    def _check(self, x_BCHW, t_B, y_B):
        cfg = self.cfg
        want = (cfg.in_channels, cfg.image_size, cfg.image_size)
        if x_BCHW.dim() != 4 or tuple(x_BCHW.shape[1:]) != want:
            raise ValueError(f"images must be [B, {want[0]}, {want[1]}, {want[2]}] "
                             f"(in_channels, image_size), got {tuple(x_BCHW.shape)}")
        if t_B.shape != (x_BCHW.shape[0],):
            raise ValueError(f"t_B must have shape ({x_BCHW.shape[0]},), got {tuple(t_B.shape)}")
        if (y_B is None) != (self.y_embed is None):
            raise ValueError("labels y_B are required when num_classes > 0 and must be None otherwise "
                             f"(num_classes={cfg.num_classes})")

    def forward(self, x_BCHW: torch.Tensor, t_B: torch.Tensor, y_B: Optional[torch.Tensor] = None) -> DiTOutput:
        self._check(x_BCHW, t_B, y_B)
        h = self.patch_embed(self.patchify(x_BCHW)) + self.pos_ND
        temb_BD = self.t_embed(t_B)
        c_BD = temb_BD if self.y_embed is None else temb_BD + self.y_embed(y_B)
        aux, stats, gates = [], [], []
        for block in self.blocks:
            h, out, gate_BE = block(h, c_BD, temb_BD)
            aux.append(out.aux_loss)
            stats.append(out.stats)
            gates.append(gate_BE)
        shift, scale = self.final_ada(c_BD).chunk(2, dim=-1)
        eps = self.unpatchify(self.final(modulate(self.final_norm(h), shift, scale)))
        prior_BE = timestep_prior(t_B, self.cfg.num_timesteps, self.cfg.num_experts, self.cfg.top_k)
        prior_loss = torch.stack([js_divergence(g, prior_BE) for g in gates]).mean()
        return DiTOutput(eps, torch.stack(aux).sum(), prior_loss, gates, stats)

    def loss(self, x0_BCHW: torch.Tensor, y_B: Optional[torch.Tensor] = None,
             t_B: Optional[torch.Tensor] = None, noise_BCHW: Optional[torch.Tensor] = None
             ) -> tuple[torch.Tensor, DiTOutput]:
        """Epsilon-prediction MSE + prior_loss_weight * prior loss + MoE aux losses.

        t_B / noise_BCHW default to uniform timesteps and N(0, 1) noise from torch's global RNG
        (so `loss(images, labels)` fits the generic trainer); pass them for reproducible steps."""
        if t_B is None:
            t_B = torch.randint(0, self.cfg.num_timesteps, (x0_BCHW.shape[0],), device=x0_BCHW.device)
        if noise_BCHW is None:
            noise_BCHW = torch.randn_like(x0_BCHW)
        if noise_BCHW.shape != x0_BCHW.shape:
            raise ValueError(f"noise {tuple(noise_BCHW.shape)} must have the images' shape {tuple(x0_BCHW.shape)}")
        x_t = q_sample(x0_BCHW, t_B, noise_BCHW, self.alphas_cumprod_T)
        out = self(x_t, t_B, y_B)
        mse = F.mse_loss(out.eps.float(), noise_BCHW.float())
        return mse + self.cfg.prior_loss_weight * out.prior_loss + out.aux_loss, out

    @torch.no_grad()
    def sample(self, num_images: int, y_B: Optional[torch.Tensor] = None,
               generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """DDPM ancestral sampling over all T steps (posterior variance beta-tilde); images [B, C, H, W]."""
        if not isinstance(num_images, int) or num_images <= 0:
            raise ValueError(f"num_images must be a positive int, got {num_images!r}")
        cfg, dev = self.cfg, self.alphas_cumprod_T.device
        abar = self.alphas_cumprod_T.double()
        abar_prev = torch.cat([abar.new_ones(1), abar[:-1]])
        alpha = abar / abar_prev
        shape = (num_images, cfg.in_channels, cfg.image_size, cfg.image_size)
        x = torch.randn(shape, generator=generator).to(dev)
        for t in reversed(range(cfg.num_timesteps)):
            t_B = torch.full((num_images,), t, dtype=torch.long, device=dev)
            eps = self(x, t_B, y_B).eps.double()
            mean = (x.double() - (1 - alpha[t]) / (1 - abar[t]).sqrt() * eps) / alpha[t].sqrt()
            if t > 0:
                var = (1 - abar_prev[t]) / (1 - abar[t]) * (1 - alpha[t])
                mean = mean + var.sqrt() * torch.randn(shape, generator=generator).to(dev, torch.float64)
            x = mean.to(x.dtype)
        return x

    def moe_layers(self) -> list:
        return [b.moe for b in self.blocks]
