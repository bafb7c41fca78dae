"""Uni-MoE (Li et al., 2024, arXiv 2405.11273): modality encoders -> connectors -> a unified MoE LM.

- Encoders: one per modality (here small MLPs over generated per-frame / per-patch features;
  the paper uses CLIP / Whisper / BEATs), mapping [B, N_m, feature_dim_m] to [B, N_m, enc_dim].
- Connectors: one per modality, a Linear enc_dim -> d_model, so the encoded frames become the
  LM's input embeddings, placed before the text tokens.
- Unified MoE LM: a MoETransformer (hecate.models.transformer) whose MoE layers are MoELayers,
  so dp / ep / fsdp / fssdp shard the routed experts like any other.
- Modality-aware expert groups (`expert_groups`: modality -> expert ids): in the expert stage a
  token may only pick experts of its modality's group (router logits of the other experts are
  masked); text tokens follow the `text` group. Outside that stage routing is unrestricted.
- LoRA experts: every routed expert e of every MoE layer gets a low-rank pair (A_e [r, D],
  B_e [D, r], B = 0 at init); a token routed to experts {e_k} with weights {g_k} adds
  sum_k g_k B_{e_k} A_{e_k} x (alpha / r scaled) to the MoE output. It is a parallel low-rank
  adapter per expert (on the expert's input -> output map), our reading of the paper's LoRA on
  the experts; the LoRA factors are dense parameters (replicated, all-reduced).
- Progressive training (`STAGES`, `set_stage`): 1 `align` trains the connectors only (cross-modal
  alignment); 2 `experts` trains the routed experts and routers with modality-aware groups
  (modality-specific expert training on cross-modal data); 3 `lora` trains the LoRA experts only
  (the unified model frozen). Everything else is frozen in each stage (requires_grad=False), so an
  optimizer built for the stage holds state for exactly that stage's parameters.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from hecate.models.transformer import MoETransformer, TransformerConfig

STAGES = ("align", "experts", "lora", "full")


@dataclass
class UniMoEConfig:
    lm: TransformerConfig = field(default_factory=TransformerConfig)
    modalities: dict = field(default_factory=lambda: {"image": 48, "audio": 16})  # name -> feature dim
    enc_dim: int = 32
    expert_groups: dict = field(default_factory=dict)   # modality (or "text") -> expert ids
    lora_rank: int = 4
    lora_alpha: float = 8.0

    def __post_init__(self):
        if isinstance(self.lm, dict):
            from hecate.models.registry import make_config

            self.lm = make_config("transformer", self.lm)

    def validate(self) -> "UniMoEConfig":
        self.lm.validate()
        if not self.modalities or any(not isinstance(v, int) or v < 1 for v in self.modalities.values()):
            raise ValueError(f"UniMoEConfig.modalities={self.modalities!r} must map names to feature dims >= 1")
        if self.enc_dim < 1 or self.lora_rank < 1:
            raise ValueError("UniMoEConfig.enc_dim and lora_rank must be >= 1")
        E = self.lm.moe.num_experts
        for name, ids in self.expert_groups.items():
            if name != "text" and name not in self.modalities:
                raise ValueError(f"UniMoEConfig.expert_groups[{name!r}]: not a modality of {sorted(self.modalities)} "
                                 "nor 'text'")
            if not ids or any(not isinstance(i, int) or not 0 <= i < E for i in ids):
                raise ValueError(f"UniMoEConfig.expert_groups[{name!r}]={ids!r} must list expert ids in [0, {E})")
            if len(ids) < self.lm.moe.top_k:
                raise ValueError(f"UniMoEConfig.expert_groups[{name!r}] has {len(ids)} experts, fewer than "
                                 f"top_k={self.lm.moe.top_k}")
        if self.lm.moe_experts_per_layer is not None:
            raise ValueError("UniMoEConfig: lm.moe_experts_per_layer is not supported (one expert count)")
        return self


class LoRAExperts(nn.Module):
    """Per-expert low-rank factors A [E, r, D], B [E, D, r] (B = 0: no change at init)."""

    def __init__(self, num_experts: int, d_model: int, rank: int, alpha: float):
        super().__init__()
        self.scale = alpha / rank
        self.A_ERD = nn.Parameter(torch.randn(num_experts, rank, d_model) / math.sqrt(d_model))
        self.B_EDR = nn.Parameter(torch.zeros(num_experts, d_model, rank))

    def forward(self, x_TD: torch.Tensor, indices_TK: torch.Tensor, weights_TK: torch.Tensor) -> torch.Tensor:
        a = torch.einsum("td,tkrd->tkr", x_TD, self.A_ERD[indices_TK])
        y = torch.einsum("tkr,tkdr->tkd", a, self.B_EDR[indices_TK])
        return self.scale * (weights_TK.unsqueeze(-1).to(y.dtype) * y).sum(1)


@dataclass
class UniMoEOutput:
    logits: torch.Tensor
    aux_loss: torch.Tensor
    moe_stats: list


class UniMoE(nn.Module):
    """forward(tokens_BS, features: {modality: [B, N_m, feature_dim]}) -> logits over the text part."""

    def __init__(self, cfg: UniMoEConfig):
        super().__init__()
        self.cfg = cfg.validate()
        lm = cfg.lm
        self.encoders = nn.ModuleDict({m: nn.Sequential(nn.Linear(dim, cfg.enc_dim), nn.GELU(),
                                                        nn.Linear(cfg.enc_dim, cfg.enc_dim))
                                       for m, dim in cfg.modalities.items()})
        self.connectors = nn.ModuleDict({m: nn.Linear(cfg.enc_dim, lm.d_model) for m in cfg.modalities})
        self.lm = MoETransformer(lm)
        self.lora = nn.ModuleList(LoRAExperts(layer.config.num_experts, lm.d_model, cfg.lora_rank, cfg.lora_alpha)
                                  for layer in self.lm.moe_layers())
        self.stage = "full"
        self._hooks_installed = False

    # ---- routing hooks: modality groups and LoRA experts ---------------------------------------
    def moe_layers(self) -> list:
        return self.lm.moe_layers()

    def _group_mask(self, modality_T: torch.Tensor, E: int, device) -> Optional[torch.Tensor]:
        """[T, E] additive logit mask: 0 on each token's group, -1e9 elsewhere (None: no groups)."""
        if self.stage != "experts" or not self.cfg.expert_groups:
            return None
        names = ["text", *self.cfg.modalities]
        allowed_ME = torch.ones(len(names), E, dtype=torch.bool, device=device)
        for i, name in enumerate(names):
            if name in self.cfg.expert_groups:
                allowed_ME[i] = False
                allowed_ME[i, self.cfg.expert_groups[name]] = True
        return torch.where(allowed_ME[modality_T], 0.0, -1e9)

    @contextlib.contextmanager
    def _routing_hooks(self, modality_T: torch.Tensor, lora_out: list):
        """Mask each MoE layer's router logits by modality group; capture its routing so the LoRA
        experts reuse it. Instance attributes shadow the methods for this forward only."""
        layers = self.moe_layers()
        try:
            for i, layer in enumerate(layers):
                mask = self._group_mask(modality_T, layer.config.num_experts, modality_T.device)
                if mask is not None:
                    base_logits = type(layer.router).logits.__get__(layer.router)
                    layer.router.logits = (lambda x, f=base_logits, m=mask: f(x) + m)
                base_route = type(layer).route.__get__(layer)

                def route(x_TD, *a, f=base_route, i=i, **kw):
                    r = f(x_TD, *a, **kw)
                    lora_out[i] = self.lora[i](x_TD, r.indices_TK, r.weights_TK)
                    return r
                layer.route = route
            yield
        finally:
            for layer in layers:
                layer.__dict__.pop("route", None)
                layer.router.__dict__.pop("logits", None)

    # ---- forward -------------------------------------------------------------------------------
    def embed_inputs(self, tokens_BS, features: dict):
        """[B, N + S, D] input embeddings (connector outputs of every modality, then the text)
        and [B, N + S] modality ids (0 = text, 1.. = the modalities in config order)."""
        B = tokens_BS.shape[0]
        parts, ids = [], []
        for i, m in enumerate(self.cfg.modalities, start=1):
            if m not in features:
                continue
            f = features[m]
            if f.dim() != 3 or f.shape[0] != B or f.shape[-1] != self.cfg.modalities[m]:
                raise ValueError(f"features[{m!r}] must be [B={B}, N, {self.cfg.modalities[m]}], got {tuple(f.shape)}")
            parts.append(self.connectors[m](self.encoders[m](f)))
            ids.append(torch.full(f.shape[:2], i, dtype=torch.long, device=f.device))
        unknown = set(features) - set(self.cfg.modalities)
        if unknown:
            raise ValueError(f"features has unknown modalities {sorted(unknown)}; known {sorted(self.cfg.modalities)}")
        parts.append(self.lm.embed(tokens_BS))
        ids.append(torch.zeros_like(tokens_BS))
        return torch.cat(parts, 1), torch.cat(ids, 1)

    def forward(self, tokens_BS: torch.Tensor, features: Optional[dict] = None) -> UniMoEOutput:
        from hecate.models.attention import rope_tables

        x, modality = self.embed_inputs(tokens_BS, features or {})
        L = x.shape[1]
        if L > self.cfg.lm.max_seq_len:
            raise ValueError(f"{L} input positions (modality frames + text) exceed lm.max_seq_len={self.cfg.lm.max_seq_len}")
        lm = self.lm
        rope = None
        if lm.pos is not None:
            x = x + lm.pos(torch.arange(L, device=x.device))
        else:
            rope = rope_tables(L, lm.blocks[0].attn.head_dim, lm.cfg.rope_theta, device=x.device)
        aux, stats = [], []
        lora_out = [None] * len(self.lora)
        moe_i = 0
        with self._routing_hooks(modality.reshape(-1), lora_out):
            for block in lm.blocks:
                if block.ffn in self.moe_layers():
                    x = self._moe_block(block, x, aux, stats, rope, lora_out, moe_i)
                    moe_i += 1
                else:
                    x = block(x, aux, stats, rope)
        x = lm.norm(x)[:, -tokens_BS.shape[1]:]  # the text positions
        logits = x @ lm.embed.weight.t() if lm.head is None else lm.head(x)
        aux_loss = torch.stack([a.float() for a in aux]).sum() if aux else x.new_zeros(())
        return UniMoEOutput(logits, aux_loss, stats)

    def _moe_block(self, block, x, aux, stats, rope, lora_out, i):
        """Block.forward with the LoRA experts' delta added to the MoE output."""
        def ffn(h):
            out = block.ffn(h)
            aux.append(out.aux_loss)
            stats.append(out.stats)
            return out.y + lora_out[i].view_as(out.y).to(out.y.dtype)

        if block.parallel:
            h = block.norm1(x)
            return x + block._attend(h, rope, aux) + ffn(h)
        x = x + block._attend(block.norm1(x), rope, aux)
        return x + ffn(block.norm2(x))

    def loss(self, batch: tuple, targets_BS: torch.Tensor):
        """batch = (tokens_BS, features); next-token cross-entropy on the text + MoE aux losses."""
        tokens, features = batch
        out = self(tokens, features)
        lm = F.cross_entropy(out.logits.flatten(0, 1).float(), targets_BS.flatten())
        return lm + out.aux_loss, out

    # ---- stages --------------------------------------------------------------------------------
    def stage_parameters(self, stage: str) -> list[str]:
        """Names of the parameters stage `stage` trains."""
        if stage not in STAGES:
            raise ValueError(f"stage={stage!r} must be one of {STAGES}")
        names = [n for n, _ in self.named_parameters()]
        if stage == "align":
            return [n for n in names if n.startswith("connectors.")]
        if stage == "experts":  # the routed experts as the strategy holds them (fssdp: expert_chunks) + routers
            experts = {id(p) for layer in self.moe_layers() for p in layer.strategy.expert_parameters(layer)}
            return [n for n, p in self.named_parameters() if id(p) in experts or ".ffn.router." in n]
        if stage == "lora":
            return [n for n in names if n.startswith("lora.")]
        return names

    def set_stage(self, stage: str) -> list[str]:
        """Freeze everything but the stage's parameters; routing uses modality groups in 'experts'."""
        train = set(self.stage_parameters(stage))
        for n, p in self.named_parameters():
            p.requires_grad_(n in train)
        self.stage = stage
        return sorted(train)
