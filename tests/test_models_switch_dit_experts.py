"""Switch-DiT's paper experts: linear D -> D maps (stacked [E, D, D] ModuleExperts) and the shared
expert every timestep uses; both start at zero so the switch is the identity at init."""
import torch

from hecate.data import shapes_batch
from hecate.models.diffusion import sample_t_and_noise
from hecate.models.registry import build_model, get_preset


def test_linear_and_shared_experts():
    torch.manual_seed(0)
    p = get_preset("tiny-switch-dit")
    model = build_model(p.arch, dict(p.config, expert_type="linear", shared_expert=True))
    block = model.blocks[0]
    w = model.expert_output_weight(block)
    assert tuple(w.shape) == (3, 32, 32) and w.abs().sum() == 0 and block.shared.weight.abs().sum() == 0
    x, y = shapes_batch(0, 4)
    t, noise = sample_t_and_noise(x, 1000, torch.Generator().manual_seed(0))
    with torch.no_grad():
        model.final.weight.normal_(std=0.1)
    h = torch.randn(2, 16, 32)
    temb = model.t_embed(torch.tensor([5, 700]))
    out, _, _ = block(h, temb, temb)
    with torch.no_grad():  # a non-zero expert changes the block's output only through the switch
        w.normal_(std=0.3)
        block.shared.weight.normal_(std=0.3)
    out2, _, _ = block(h, temb, temb)
    assert not torch.allclose(out, out2)
    with torch.no_grad():
        w.zero_()
        block.shared.weight.zero_()
    model.loss(x, y, t, noise)[0].backward()
    assert w.grad.abs().sum() > 0 and block.shared.weight.grad.abs().sum() > 0
    # Paper presets use linear experts with the shared expert.
    big = get_preset("switch-dit-s2").config
    assert big.get("expert_type", "linear") == "linear" and big.get("shared_expert", True)
