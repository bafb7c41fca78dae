"""Batched sampling from a language model: greedy, temperature, top-k, top-p; with or without a KV
cache (hecate.inference.kv_cache); optional routing overrides and SCMoE contrast per pass.

A *decoder* holds the state of one forward pass over a batch of prompts of different lengths:
logits() gives each sequence's next-token logits [B, V], append(ids_B) extends every sequence.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch

from hecate.moe.overrides import stacked_overrides


def check_sampling(temperature: float, top_k: int, top_p: float, prefix: str = "") -> None:
    """Raise a ValueError naming the bad option (prefix "--" names them as CLI flags)."""
    k = "top-k" if prefix else "top_k"
    p = "top-p" if prefix else "top_p"
    if temperature < 0:
        raise ValueError(f"{prefix}temperature must be >= 0 (0 = greedy), got {temperature}")
    if top_k < 0:
        raise ValueError(f"{prefix}{k} must be >= 0 (0 = no top-k cut), got {top_k}")
    if not 0 < top_p <= 1:
        raise ValueError(f"{prefix}{p} must be in (0, 1], got {top_p}")


def pick_next(logits_BV: torch.Tensor, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
              generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Next ids [B]: argmax when temperature == 0, else a sample of softmax(logits / temperature)
    restricted to the top_k best (0 = all) and to the smallest set whose probability >= top_p."""
    check_sampling(temperature, top_k, top_p)
    logits_BV = logits_BV.float()
    if temperature == 0:
        return logits_BV.argmax(-1)
    logits_BV = logits_BV / temperature
    if top_k and top_k < logits_BV.shape[-1]:
        kth = torch.topk(logits_BV, top_k, -1).values[:, -1:]
        logits_BV = logits_BV.masked_fill(logits_BV < kth, float("-inf"))
    if top_p < 1:
        sorted_BV, order_BV = torch.sort(logits_BV, -1, descending=True)
        probs = torch.softmax(sorted_BV, -1)
        # drop a token when the tokens before it already hold top_p (the best one always stays)
        drop = probs.cumsum(-1) - probs >= top_p
        logits_BV = logits_BV.scatter(-1, order_BV, sorted_BV.masked_fill(drop, float("-inf")))
    probs = torch.softmax(logits_BV, -1).cpu()
    return torch.multinomial(probs, 1, generator=generator)[:, 0].to(logits_BV.device)


class FullDecoder:
    """No cache: every step re-runs the model over each sequence's context (cropped to max_seq_len)."""

    def __init__(self, model, prompts: Sequence[Sequence[int]], overrides: Sequence[dict] = ()):
        self.model, self.overrides = model, list(overrides)
        self.seqs = [list(p) for p in prompts]
        self.device = next(model.parameters()).device

    def context(self):
        return stacked_overrides(self.model, self.overrides)

    def logits(self) -> torch.Tensor:
        window = self.model.cfg.max_seq_len
        with self.context():
            return torch.stack([self.model(torch.tensor([s[-window:]], device=self.device)).logits[0, -1]
                                for s in self.seqs])

    def append(self, ids_B: torch.Tensor) -> None:
        for s, i in zip(self.seqs, ids_B.tolist()):
            s.append(int(i))


def make_decoder(model, prompts, overrides=(), use_cache: bool = True, reserve: int = 0):
    """A CachedDecoder (reserve: new tokens per row its K/V buffers are sized for), or a FullDecoder."""
    if use_cache:
        from hecate.inference.kv_cache import CachedDecoder

        return CachedDecoder(model, prompts, overrides, reserve=reserve)
    return FullDecoder(model, prompts, overrides)


def pass_overrides(model, routing: Optional[dict] = None, scmoe=None) -> list[list[dict]]:
    """The routing overrides of each pass of a decode step: the strong pass under `routing`, and
    with SCMoE a weak pass under routing + its weak overrides."""
    base = [routing] if routing else []
    return [base] + ([base + [scmoe.weak_overrides(model)]] if scmoe is not None else [])


def decode_loop(decoders: Sequence, rows: Sequence[Sequence[int]], max_new_tokens: int,
                pick: Callable[[torch.Tensor], torch.Tensor], scmoe=None,
                after_pass: Optional[Callable[[int], None]] = None) -> list[list[int]]:
    """The decode loop of every generation path: each step, every decoder's logits() (one pass
    each, in pass_overrides order), SCMoE's contrast of the two, `pick(logits_BV)` -> ids [B],
    appended to the rows and to every decoder; returns rows + max_new_tokens ids each.
    rows empty (an idle rank of distributed generation): the passes still run every step and
    nothing is picked. after_pass(step) runs after each pass (distributed generation counts its
    forwards there)."""
    out = [list(r) for r in rows]
    for step in range(max_new_tokens):
        logits = []
        for d in decoders:
            logits.append(d.logits())
            if after_pass is not None:
                after_pass(step)
        if not out:
            continue
        logits_BV = logits[0]
        if scmoe is not None:
            from hecate.inference.scmoe import contrast

            logits_BV = contrast(logits_BV, logits[1], scmoe.beta, scmoe.alpha)
        ids_B = pick(logits_BV)
        for s, i in zip(out, ids_B.tolist()):
            s.append(int(i))
        for d in decoders:
            d.append(ids_B)
    return out


@torch.inference_mode()  # no autograd bookkeeping per op (both paths; nothing here is trained)
def generate(model, prompts: Sequence[Sequence[int]], max_new_tokens: int, *, temperature: float = 0.0,
             top_k: int = 0, top_p: float = 1.0, generator: Optional[torch.Generator] = None,
             use_cache: bool = True, routing: Optional[dict] = None, scmoe=None) -> list[list[int]]:
    """prompt + max_new_tokens new ids for every prompt (prompts may differ in length).

    routing: routing_overrides keywords for every pass; scmoe: a hecate.inference.scmoe.SCMoE,
    whose weak pass runs under routing + its weak overrides.
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt must hold at least one token")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    model.eval()
    decoders = [make_decoder(model, prompts, o, use_cache, max_new_tokens)
                for o in pass_overrides(model, routing, scmoe)]
    return decode_loop(decoders, prompts, max_new_tokens,
                       lambda logits_BV: pick_next(logits_BV, temperature, top_k, top_p, generator), scmoe)
