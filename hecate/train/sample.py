"""Text generation from a single-process model (all experts local)."""
from __future__ import annotations

import torch


@torch.no_grad()
def generate(model, prompt_ids: list[int], max_new_tokens: int, temperature: float = 0.8,
             top_k: int = 40, generator: torch.Generator | None = None) -> list[int]:
    """Sample `max_new_tokens` ids after `prompt_ids` with temperature and top-k; returns prompt + new.

    The context is cropped to the model's max_seq_len (no KV cache: the tiny demo does not need one).
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    if not prompt_ids:
        raise ValueError("prompt_ids must hold at least one token")
    model.eval()
    device = next(model.parameters()).device
    ids = list(prompt_ids)
    window = model.cfg.max_seq_len
    for _ in range(max_new_tokens):
        x_1S = torch.tensor([ids[-window:]], device=device)
        logits_V = model(x_1S).logits[0, -1].float() / temperature
        k = min(top_k, logits_V.numel())
        vals, idx = torch.topk(logits_V, k)
        probs = torch.softmax(vals, -1).cpu()
        ids.append(int(idx[int(torch.multinomial(probs, 1, generator=generator))]))
    return ids
