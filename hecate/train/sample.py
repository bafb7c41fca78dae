"""Text generation from a single-process model (all experts local)."""
from __future__ import annotations

import torch


@torch.no_grad()
def generate(model, prompt_ids: list[int], max_new_tokens: int, temperature: float = 0.8,
             top_k: int = 40, generator: torch.Generator | None = None) -> list[int]:
    """Sample `max_new_tokens` ids after `prompt_ids` with temperature and top-k; returns prompt + new.

    The context is cropped to the model's max_seq_len (no KV cache: the tiny demo does not need one).
    `generator` is a CPU generator (None: torch's default one); it draws exactly what
    `torch.multinomial(top_k_probs, 1, generator=generator)` per token would, so a seed gives
    the same tokens as sampling on the host did. The tokens stay on the model's device until the
    end: one host read per call (on a GPU, one synchronization), not one or two per token.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    if not prompt_ids:
        raise ValueError("prompt_ids must hold at least one token")
    if generator is not None and generator.device.type != "cpu":
        raise ValueError(f"generator must be a CPU torch.Generator, got one on {generator.device}")
    model.eval()
    device = next(model.parameters()).device
    window = model.cfg.max_seq_len
    P = len(prompt_ids)
    if max_new_tokens <= 0:
        return list(prompt_ids)
    tokens = _upload(torch.tensor(list(prompt_ids) + [0] * max_new_tokens), device)
    finite_T = torch.empty(max_new_tokens, dtype=torch.bool, device=device)
    race_TK = None
    for t in range(max_new_tokens):
        n = P + t
        x_1S = tokens[max(0, n - window):n].unsqueeze(0)
        logits_V = model(x_1S).logits[0, -1].float() / temperature
        if race_TK is None:
            # torch.multinomial(p, 1) samples argmax(p / q), q ~ Exp(1) from one exponential_ of
            # len(p) floats of its generator. The same draws, in the same order (the model in eval
            # mode draws nothing), keep the host-side sampler's tokens; the argmax runs here, on
            # the device. One upload for the whole call.
            k = min(top_k, logits_V.numel())
            probs_dtype = logits_V.dtype  # float32 (as multinomial's draws), whatever the default dtype
            race_TK = _upload(torch.stack([torch.empty(k, dtype=probs_dtype).exponential_(1, generator=generator)
                                           for _ in range(max_new_tokens)]), device)
        vals, idx = torch.topk(logits_V, k)
        probs = torch.softmax(vals, -1)
        # torch.multinomial rejected non-finite probabilities at once; here they are flagged on the
        # device and raised after the loop.
        finite_T[t] = probs.isfinite().all()
        pick_1 = (probs / race_TK[t]).argmax(-1, keepdim=True)
        tokens[n:n + 1] = idx.gather(0, pick_1)
    # The one host read: the new tokens and their flags, in one download.
    out = torch.cat([tokens[P:], finite_T.long()]).tolist()
    new, finite = out[:max_new_tokens], out[max_new_tokens:]
    if not all(finite):
        step = finite.index(0)
        raise ValueError(f"generate: the next-token probabilities of new token {step} are not finite "
                         f"(NaN or inf logits / temperature, temperature={temperature}): check the "
                         "model's weights (checkpoint) or raise the temperature")
    return list(prompt_ids) + new


def _upload(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`host` on `device`; to a GPU from pinned memory, so the copy does not stall the host."""
    if device.type == "cuda":
        return host.pin_memory().to(device, non_blocking=True)
    return host.to(device)
