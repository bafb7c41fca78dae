"""The trainer's aux-free bias update (Trainer.update_expert_bias) on the device: no host read
per layer (each stalls the host on a GPU), and layers with different expert counts (PR-MoE
pyramids) in one flat all-reduce. Checked on CPU with tests/host_reads.py."""
from types import SimpleNamespace

import pytest
import torch

from hecate.models.transformer import MoETransformer
from hecate.parallel import moe_layers
from hecate.train.trainer import Trainer
from tests.host_reads import HostReadCounter
from tests.training_cases import tiny_config


def _model(experts_per_layer):
    cfg = tiny_config()
    cfg.moe = cfg.moe.replace(aux_free_bias=True)
    cfg.moe_experts_per_layer = experts_per_layer
    torch.manual_seed(0)
    return MoETransformer(cfg)


@pytest.mark.parametrize("experts_per_layer", [None, [4, 8]])
def test_bias_update_reads_nothing_and_takes_pyramids(experts_per_layer):
    model = _model(experts_per_layer)
    layers = moe_layers(model)
    for i, layer in enumerate(layers):
        layer.load_since_update_E.copy_(torch.arange(layer.config.num_experts) * (i + 1))
    want = []
    for layer in layers:  # what each layer's own update does with its load
        router = SimpleNamespace(expert_bias_E=layer.router.expert_bias_E.clone(), config=layer.router.config)
        type(layer.router).update_bias(router, layer.load_since_update_E.clone())
        want.append(router.expert_bias_E)
    trainer = SimpleNamespace(model=model, world=1)
    with HostReadCounter() as counter:
        Trainer.update_expert_bias(trainer)
    assert counter.count == 0, counter.where
    for layer, bias in zip(layers, want):
        assert torch.equal(layer.router.expert_bias_E, bias) and not layer.load_since_update_E.any()
