"""Worker for tests/test_integration_megatron_bias.py: a real Megatron-core MoE layer built on CPU
with add_bias_linear=True (Megatron's default) against Hecate's biased experts."""
import torch

from tests.integration_cases import D, _megatron_config


def megatron_bias_layer(rank, world, gated, gate_shared):
    """Megatron MoELayer weights -> Hecate layer (strict) -> back (same tensors); every expert and the
    whole routed computation (router, top-k weights, biased experts) equal Megatron's math."""
    from megatron.core import parallel_state
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.spec_utils import build_module

    from hecate.integrations.convert_megatron import hecate_to_megatron, megatron_to_hecate
    from hecate.integrations.megatron_spec import hecate_moe_spec

    parallel_state.initialize_model_parallel(1, 1)
    try:
        import torch.nn.functional as Fn

        kw = dict(gated_linear_unit=True, activation_func=Fn.silu) if gated else {}
        if gate_shared:  # shared experts are bias-free in Hecate: the gate is tested without biases
            kw.update(add_bias_linear=False, moe_shared_expert_gate=True)
        else:
            kw.update(add_bias_linear=True, moe_shared_expert_intermediate_size=None)
        cfg = _megatron_config(**kw)
        torch.manual_seed(0)
        meg = build_module(get_gpt_layer_local_spec(num_experts=4), config=cfg, layer_number=1).mlp
        with torch.no_grad():  # Megatron zero-initializes biases: make them count
            for n, p in meg.named_parameters():
                if n.endswith("bias") or "gate_weight" in n:
                    p.copy_(torch.randn_like(p) * 0.3)
        prefix = "decoder.layers.0.mlp."
        state = {prefix + k: v for k, v in meg.state_dict().items() if torch.is_tensor(v)}
        hec_state = megatron_to_hecate(state, gated=gated)
        layer = build_module(hecate_moe_spec(strategy="local"), config=cfg)
        layer.load_state_dict({k[len(prefix):]: v for k, v in hec_state.items()})  # strict
        back = hecate_to_megatron({prefix + k: v for k, v in layer.state_dict().items()})
        same = all(torch.equal(back[k], v) for k, v in state.items() if not k.endswith("_extra_state"))
        x = torch.randn(6, D)
        expert_diff = 0.0
        with torch.no_grad():
            for e in range(4 if not gate_shared else 0):
                ref = meg.experts.local_experts[e](x, torch.ones(6))[0]
                expert_diff = max(expert_diff, float((ref - layer.experts.expert_forward(e, x)).abs().max()))
        # the whole layer, with Megatron's routing math written out (its dispatchers need CUDA here)
        # (Megatron's router moves itself to CUDA in forward, so its default top-k math is written
        # out: logits = x W^T + b, probs = softmax over the top-k logits)
        with torch.no_grad():
            bias = meg.router.bias
            logits = torch.nn.functional.linear(x, meg.router.weight, bias)
            top = torch.topk(logits, 2, dim=-1)
            probs = torch.softmax(top.values, dim=-1)
            want = torch.zeros_like(x)
            for e in range(4):
                rows, slot = (top.indices == e).nonzero(as_tuple=True)
                if rows.numel():
                    want[rows] += meg.experts.local_experts[e](x[rows], probs[rows, slot])[0]
            if meg.shared_experts is not None:
                want += meg.shared_experts(x.unsqueeze(1)).squeeze(1)
            got, _ = layer(x.unsqueeze(1))
        return {"same": same, "keys": sorted(k for k in hec_state if "experts" in k or "shared_gate" in k),
                "expert_diff": expert_diff, "layer_diff": float((want - got.squeeze(1)).abs().max())}
    finally:
        parallel_state.destroy_model_parallel()


def megatron_adapter_ranks(rank, world, strategy, bias):
    """HecateMegatronMoE built by Megatron's build_module at world `world` under `strategy`, vs the
    same layer under 'dp' (every expert replicated: each rank's computation is the single-process
    one, gradients averaged over ranks) on the same tokens: outputs, input and expert grads match."""
    import torch.distributed as dist
    from megatron.core import parallel_state
    from megatron.core.transformer.spec_utils import build_module

    from hecate.integrations.deepspeed import finish_backward
    from hecate.integrations.megatron_spec import hecate_moe_spec

    parallel_state.initialize_model_parallel(1, 1)
    try:
        kw = dict(add_bias_linear=True, moe_shared_expert_intermediate_size=None) if bias else {}
        cfg = _megatron_config(**kw)
        torch.manual_seed(0)
        local = build_module(hecate_moe_spec(strategy="dp"), config=cfg)
        dist_layer = build_module(hecate_moe_spec(strategy=strategy), config=cfg)
        full = {n: p.detach().clone() for n, p in local.experts.named_parameters()}
        dist_layer.load_state_dict({k: v for k, v in local.state_dict().items() if ".experts." not in k
                                    and not k.startswith("experts.")}, strict=False)
        dist_layer.strategy.load_experts(dist_layer, full)
        g = torch.Generator().manual_seed(10 + rank)
        x = torch.randn(3 + 2 * rank, 2, D, generator=g)  # [S, B, D], uneven per rank
        dy = torch.randn(x.shape, generator=g)
        outs = []
        for layer in (local, dist_layer):
            xi = x.clone().requires_grad_(True)
            y, _ = layer(xi)
            (y * dy).sum().backward()
            outs.append((y.detach(), xi.grad))
        finish_backward(local)
        finish_backward(dist_layer)
        got = dist_layer.strategy.gather_experts(dist_layer, grads=True)
        want = local.strategy.gather_experts(local, grads=True)
        worst = max(float((got[n] - want[n]).abs().max()) for n in want)
        assert dist.get_world_size() == world
        return {"y": float((outs[0][0] - outs[1][0]).abs().max()), "dx": float((outs[0][1] - outs[1][1]).abs().max()),
                "dexperts": worst, "names": sorted(full)}
    finally:
        parallel_state.destroy_model_parallel()
