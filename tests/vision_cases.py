"""Worker functions for the Switch-DiT and Mixture-of-Mamba strategy tests (run on every rank).

Each rank trains on its own fixed batch (a function of its rank only), so the loss must fall
within a few steps; a single-process reference trains on all ranks' batches (loss / W each)
and the distributed run must match it step by step and in every parameter.
"""
import torch

from hecate.data import interleaved_batch, shapes_batch
from hecate.models.diffusion import sample_t_and_noise
from hecate.models.registry import build_model, get_preset
from tests.training_cases import train_side_by_side

BATCH = 2


def dit_loss(model, rank):
    x0, y = shapes_batch(7, BATCH, start=BATCH * rank)
    t, noise = sample_t_and_noise(x0, model.cfg.num_timesteps, torch.Generator().manual_seed(100 + rank))
    return model.loss(x0, y, t_B=t, noise_BCHW=noise)[0]


def mamba_loss(model, rank):
    tokens, modality = interleaved_batch(7, BATCH, 13, start=BATCH * rank)
    return model.loss(tokens[:, :-1], tokens[:, 1:], modality[:, :-1])[0]


CASES = {"tiny-switch-dit": dit_loss, "tiny-mixture-of-mamba": mamba_loss}


def train_preset_case(rank, world, preset, strategy, options, steps, lr=1e-2, seed=0):
    """Train `preset` under `strategy` and a local reference; return losses and parameters."""
    loss_fn = CASES[preset]
    p = get_preset(preset)
    torch.manual_seed(seed)
    base = build_model(p.arch, dict(p.config))
    # Adam eps 1e-4: with 1e-6 a near-tied Mamba MoE routing decision flips and losses drift.
    _, out = train_side_by_side(rank, world, base, strategy, options, steps,
                                lambda m, step, r: loss_fn(m, r), lr=lr, max_grad_norm=None, eps=1e-4)
    return out
