"""Worker functions for the model-zoo tests: a tiny preset trained under a strategy on every
rank, next to the same model trained in one process on all ranks' batches."""
import torch

from hecate.models.registry import build_model, get_preset
from tests.training_cases import train_side_by_side

SEQ, BATCH = 12, 2
OPTIONS = {"dp": {}, "ep": {}, "fsdp": {}, "fssdp": {"overlap_degree": 2, "fit_replicas": False}}


def batch(step, rank, vocab):
    """Two fixed batches per rank, alternating, so a few steps visibly lower the loss."""
    g = torch.Generator().manual_seed(100 * (step % 2) + rank)
    tokens = torch.randint(0, vocab, (BATCH, SEQ + 1), generator=g)
    return tokens[:, :-1], tokens[:, 1:]


def train_case(rank, world, preset, strategy, steps, seed=0):
    p = get_preset(preset)
    torch.manual_seed(seed)
    base = build_model(p.arch, p.config)
    vocab = base.cfg.vocab_size
    _, out = train_side_by_side(rank, world, base, strategy, OPTIONS[strategy], steps,
                                lambda m, step, r: m.loss(*batch(step, r, vocab))[0],
                                lr=3e-3, weight_decay=0.01, max_grad_norm=0.5, eps=1e-6)
    losses, ref_losses = out.pop("losses")
    return {"losses": losses, "ref_losses": ref_losses, **out}
