"""Hecate's MoE layer inside Megatron-core: spec construction on CPU, a real forward/backward on GPU."""
import pytest
import torch

pytest.importorskip("megatron.core", reason="megatron-core is optional (pip install -e .[megatron])")

from megatron.core.transformer.spec_utils import build_module  # noqa: E402
from megatron.core.transformer.transformer_config import TransformerConfig  # noqa: E402

from hecate.integrations.megatron_spec import (HecateMegatronMoE, gpt_layer_spec_with_hecate_moe,  # noqa: E402
                                               hecate_moe_spec)


def _config(**kw):
    base = dict(num_layers=2, hidden_size=16, num_attention_heads=4, ffn_hidden_size=32, num_moe_experts=4,
                moe_router_topk=2, add_bias_linear=False, moe_aux_loss_coeff=0.01, moe_z_loss_coeff=1e-3,
                moe_shared_expert_intermediate_size=8)
    base.update(kw)
    return TransformerConfig(**base)


def test_spec_replaces_megatron_moe_layer():
    spec = gpt_layer_spec_with_hecate_moe(num_experts=4, strategy="fssdp")
    assert spec.submodules.mlp.module is HecateMegatronMoE
    assert spec.submodules.mlp.params["strategy"] == "fssdp"
    with pytest.raises(ValueError, match="submodules.mlp"):
        gpt_layer_spec_with_hecate_moe(layer_spec=hecate_moe_spec())


def test_build_from_megatron_config_and_run_on_cpu():
    torch.manual_seed(0)
    layer = build_module(hecate_moe_spec(), config=_config())
    c = layer.config
    assert (c.num_experts, c.top_k, c.num_shared_experts, c.aux_loss_coeff) == (4, 2, 1, 0.01)
    x = torch.randn(5, 3, 16, requires_grad=True)  # Megatron is [S, B, D]
    y, bias = layer(x)
    assert bias is None and y.shape == x.shape
    # the output equals the plain Hecate layer on [B, S, D]
    ref = layer.__class__.__mro__[1].forward(layer, x.detach().transpose(0, 1)).y.transpose(0, 1)
    assert torch.allclose(y.detach(), ref, atol=1e-6)
    y.sum().backward()
    assert layer.router.weight_ED.grad is not None and x.grad is not None


def test_aux_loss_reaches_the_router():
    """The aux loss rides on the output (MoEAuxLossAutoScaler): the router gradient changes with it."""
    torch.manual_seed(0)
    grads = []
    for coeff in (0.0, 1.0):
        torch.manual_seed(0)
        layer = build_module(hecate_moe_spec(), config=_config(moe_aux_loss_coeff=coeff, moe_z_loss_coeff=None))
        x = torch.randn(5, 3, 16, generator=torch.Generator().manual_seed(1))
        y, _ = layer(x)
        (y * 0).sum().backward()  # only the aux path carries gradient
        grads.append(layer.router.weight_ED.grad.abs().sum())
    assert grads[0] == 0 and grads[1] > 0


def test_unsupported_megatron_settings_raise():
    with pytest.raises(ValueError, match="add_bias_linear"):
        build_module(hecate_moe_spec(), config=_config(add_bias_linear=True))


@pytest.fixture
def megatron_nccl():
    """One-process NCCL group + Megatron's model-parallel state (1 x 1), torn down after the test.

    The group rendezvous through an in-memory HashStore (no TCP port to collide with
    another run) and binds the device eagerly; a group this fixture created is destroyed
    again, one that already existed (e.g. under torchrun) is left alone.
    """
    import torch.distributed as dist
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    created = not dist.is_initialized()
    if created:
        dist.init_process_group("nccl", store=dist.HashStore(), rank=0, world_size=1,
                                device_id=torch.device("cuda", torch.cuda.current_device()))
    try:
        parallel_state.initialize_model_parallel(1, 1)
        model_parallel_cuda_manual_seed(0)
        yield
    finally:
        parallel_state.destroy_model_parallel()
        if created:
            dist.destroy_process_group()


@pytest.mark.gpu
def test_transformer_layer_forward_backward_on_gpu(megatron_nccl):
    """A real Megatron TransformerLayer whose mlp is Hecate's MoE (needs CUDA, like Megatron's MoE)."""
    cfg = _config()
    spec = gpt_layer_spec_with_hecate_moe(num_experts=4, strategy="local")
    layer = build_module(spec, config=cfg, layer_number=1).cuda()
    assert isinstance(layer.mlp, HecateMegatronMoE)
    x = torch.randn(6, 2, 16, device="cuda", requires_grad=True)
    out = layer(x, attention_mask=None)
    y = out[0] if isinstance(out, tuple) else out
    y.float().sum().backward()
    assert x.grad is not None and layer.mlp.router.weight_ED.grad is not None


@pytest.mark.parametrize("gated", [False, True])
def test_real_megatron_weights_round_trip(gated):
    from hecate.testing import run_distributed
    from tests import integration_cases as cases

    (res,) = run_distributed(cases.megatron_weights_round_trip, 1, gated, timeout=300, **cases.ISOLATED)
    assert res["missing"] == [] and res["unexpected"] == [] and res["same"], res
    assert res["expert_diff"] < 1e-5, res


@pytest.mark.gpu
def test_matches_megatron_moe_layer_on_gpu(megatron_nccl):
    """Megatron's own MoELayer vs Hecate's layer on converted weights: same output (dropless top-2)."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    from hecate.integrations.convert_megatron import megatron_to_hecate

    cfg = _config(moe_token_dispatcher_type="alltoall")
    meg = build_module(get_gpt_layer_local_spec(num_experts=4), config=cfg, layer_number=1).mlp.cuda()
    hec = build_module(hecate_moe_spec(strategy="local"), config=cfg).cuda()
    state = megatron_to_hecate({"decoder.layers.0.mlp." + k: v for k, v in meg.state_dict().items()
                                if torch.is_tensor(v)})
    hec.load_state_dict({k[len("decoder.layers.0.mlp."):]: v for k, v in state.items()})
    x = torch.randn(8, 2, 16, device="cuda")
    ref, _ = meg(x)
    got, _ = hec(x)
    assert torch.allclose(ref.float(), got.float(), atol=1e-4), float((ref - got).abs().max())
