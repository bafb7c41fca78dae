"""model.activation_checkpointing: every strategy still trains like one process without it,
and the recompute adds no collective (no second plan, no second exchange)."""
import copy

import pytest
import torch

from hecate.comm.topology import Topology
from hecate.models.transformer import MoETransformer, TransformerConfig
from hecate.moe.config import MoEConfig
from hecate.parallel import build_strategy, moe_layers, parallelize
from hecate.parallel.local import LocalStrategy
from hecate.testing import run_distributed
from hecate.train.engine import Engine
from tests.collective_spy import spy_collectives
from tests.training_cases import batch, check_training, tiny_config, train_side_by_side

FSSDP_REPLICAS = {"overlap_degree": 2, "fit_replicas": False, "rematerialize": True}


def _checkpointed_only_when_distributed(model, step, r, skew):
    # The reference (LocalStrategy) trains without checkpointing, the strategy's copy with it.
    model.cfg.activation_checkpointing = not isinstance(moe_layers(model)[0].strategy, LocalStrategy)
    return model.loss(*batch(step, r, skew))[0]


def checkpointed_train_case(rank, world, strategy, options, steps, skew=False, shared=0):
    torch.manual_seed(0)
    cfg = tiny_config()
    if shared:  # shared experts: combine_dense is a recomputed region too
        cfg.moe = cfg.moe.replace(num_shared_experts=shared)
    base = MoETransformer(cfg)
    _, out = train_side_by_side(rank, world, base, strategy, options, steps,
                                lambda m, step, r: _checkpointed_only_when_distributed(m, step, r, skew),
                                lr=3e-3, weight_decay=0.01, max_grad_norm=0.5, eps=1e-6)
    return out


@pytest.mark.parametrize("strategy,world,options", [
    ("dp", 2, {}), ("ep", 2, {}), ("fsdp", 2, {}),
    ("fssdp", 2, FSSDP_REPLICAS), ("fssdp", 3, FSSDP_REPLICAS)])
def test_checkpointed_strategies_train_like_single_process(strategy, world, options):
    results = run_distributed(checkpointed_train_case, world, strategy, options, 4, skew=strategy == "fssdp")
    check_training(results)


def test_checkpointed_fssdp_with_shared_experts_and_prefetch():
    results = run_distributed(checkpointed_train_case, 2, "fssdp", {**FSSDP_REPLICAS, "prefetch": True}, 3,
                              skew=True, shared=1)
    check_training(results)


_COLLECTIVES = ("all_gather", "all_reduce", "all_to_all_single", "broadcast", "all_gather_into_tensor",
                "reduce_scatter_tensor", "all_gather_single", "reduce_scatter_single")


def collectives_with_and_without(rank, world, steps, bf16=False):
    """Train the same model twice (checkpointing off, then on) under fssdp with replicas and
    re-materialization; log every torch.distributed collective in call order (with the
    tensor sizes), the router calls and the expert computations (a recompute repeats both),
    and return the trained parameters."""
    import contextlib

    from hecate.parallel.fssdp import expert_exchange

    experts_fn = expert_exchange.experts_on_received
    expert_calls = [0]

    def counted_experts(*args, **kwargs):
        expert_calls[0] += 1
        return experts_fn(*args, **kwargs)

    out = {}
    with spy_collectives(_COLLECTIVES, sizes=True) as log:
        try:
            expert_exchange.experts_on_received = counted_experts
            for on in (False, True):
                torch.manual_seed(0)
                cfg = tiny_config()
                cfg.activation_checkpointing = on
                topo = Topology()
                strat = build_strategy("fssdp", topo, **FSSDP_REPLICAS)
                model = parallelize(MoETransformer(cfg), strat)
                engine = Engine(model, strat, topo, lr=3e-3)
                router_calls = [0]
                hooks = [layer.router.register_forward_hook(
                    lambda *a: router_calls.__setitem__(0, router_calls[0] + 1)) for layer in moe_layers(model)]
                log.clear()
                expert_calls[0] = 0
                for step in range(steps):
                    with torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext():
                        loss = model.loss(*batch(step, rank, True))[0]
                    loss.backward()
                    engine.step()
                for h in hooks:
                    h.remove()
                out[on] = {"log": list(log), "stats": topo.stats.snapshot(), "router_calls": router_calls[0],
                           "expert_calls": expert_calls[0],
                           "params": {n: p.detach().clone() for n, p in model.named_parameters()}}
        finally:
            expert_exchange.experts_on_received = experts_fn
    return out


@pytest.mark.parametrize("bf16", [False, True])
def test_recompute_adds_no_collective(bf16):
    """Checkpointing recomputes the blocks and fssdp's expert MLP (from the received tokens and
    the re-gathered replicas) with exactly the collectives of a step without it, and the
    trained parameters are bit-identical (under bf16 autocast too: the recompute uses the
    forward's autocast dtype)."""
    steps = 2
    for res in run_distributed(collectives_with_and_without, 2, steps, bf16):
        off, on = res[False], res[True]
        layers = 2  # tiny_config: every layer is MoE
        assert off["router_calls"] == steps * layers
        assert on["router_calls"] == 2 * steps * layers, "the checkpointed blocks were not recomputed"
        assert off["expert_calls"] == steps * layers
        assert on["expert_calls"] == 2 * steps * layers, "fssdp did not recompute its expert MLP"
        for n, p in off["params"].items():
            assert torch.equal(p, on["params"][n]), n
        assert any(n == "all_to_all_single" for n, _ in off["log"]), "the test saw no token exchange"
        # Replicas were gathered, and re-gathered in backward (re-materialization): one spAG in
        # the forward and one in the backward per spRS.
        assert off["stats"]["fssdp.spRS"]["calls"] > 0, f"no replica was gathered: {sorted(off['stats'])}"
        assert off["stats"]["fssdp.spAG"]["calls"] == 2 * off["stats"]["fssdp.spRS"]["calls"]
        assert on["log"] == off["log"], "checkpointing changed the collectives (order, kind or size)"
        assert on["stats"] == off["stats"]


def test_key_is_off_by_default_and_checked():
    from hecate.train.config import from_dict

    assert TransformerConfig().activation_checkpointing is False
    assert from_dict({}).model.activation_checkpointing is False
    assert from_dict({"model": {"activation_checkpointing": True}}).model.activation_checkpointing is True
    cfg = TransformerConfig(activation_checkpointing="yes")
    with pytest.raises(ValueError, match="model.activation_checkpointing"):
        cfg.validate()


@pytest.mark.parametrize("parallel_block,shared", [(False, 0), (False, 1), (True, 1)])
def test_single_process_gradients_are_bitwise_equal(parallel_block, shared):
    torch.manual_seed(0)
    moe = MoEConfig(hidden_size=32, ffn_hidden_size=48, num_experts=4, top_k=2, num_shared_experts=shared,
                    aux_loss_coeff=0.01)
    cfg = TransformerConfig(vocab_size=61, d_model=32, n_layers=3, n_heads=4, max_seq_len=12,
                            dense_ffn_hidden=48, moe_every=2, moe=moe, parallel_block=parallel_block)
    plain = MoETransformer(cfg)
    ckpt = copy.deepcopy(plain)
    ckpt.cfg.activation_checkpointing = True
    tokens = torch.randint(0, 61, (2, 12))
    loss_a, out_a = plain.loss(tokens, tokens)
    loss_b, out_b = ckpt.loss(tokens, tokens)
    loss_a.backward()
    loss_b.backward()
    assert torch.equal(loss_a, loss_b) and len(out_a.moe_stats) == len(out_b.moe_stats) == 1
    for (n, p), (_, q) in zip(plain.named_parameters(), ckpt.named_parameters()):
        assert torch.equal(p.grad, q.grad), n


def test_eval_and_no_grad_forwards_do_not_checkpoint(monkeypatch):
    import hecate.models.transformer as transformer

    calls = []
    monkeypatch.setattr(transformer, "checkpointed_block", lambda *a: calls.append(1) or a[0](*a[1:]))
    model = MoETransformer(TransformerConfig(activation_checkpointing=True))
    tokens = torch.randint(0, 256, (1, 8))
    with torch.no_grad():
        model(tokens)
    model.eval()
    model(tokens)
    assert calls == []
    model.train()
    model(tokens)
    assert len(calls) == model.cfg.n_layers


def test_a_layer_that_overrides_forward_is_refused():
    from hecate.moe.layer import MoELayer

    class Custom(MoELayer):
        def forward(self, x, **kwargs):
            return super().forward(x, **kwargs)

    model = MoETransformer(TransformerConfig(activation_checkpointing=True))
    block = next(b for b in model.blocks if isinstance(b.ffn, MoELayer))
    block.ffn.__class__ = Custom
    with pytest.raises(TypeError, match="overrides MoELayer.forward"):
        model(torch.randint(0, 256, (1, 8)))


def baseline_recompute_case(rank, world, strategy, steps):
    """dp / ep / fsdp trained twice (checkpointing off, then on): the collectives in call order
    (with sizes), the grouped expert MLP calls, and the trained parameters."""
    import hecate.moe.experts as experts_mod
    import hecate.parallel.expert_compute as compute_mod

    mlp = experts_mod.grouped_mlp
    mlp_calls = [0]

    def counted_mlp(*args, **kwargs):
        mlp_calls[0] += 1
        return mlp(*args, **kwargs)

    out = {}
    with spy_collectives(_COLLECTIVES, sizes=True) as log:
        try:
            experts_mod.grouped_mlp = compute_mod.grouped_mlp = counted_mlp
            for on in (False, True):
                torch.manual_seed(0)
                cfg = tiny_config()
                cfg.activation_checkpointing = on
                topo = Topology()
                strat = build_strategy(strategy, topo)
                model = parallelize(MoETransformer(cfg), strat)
                engine = Engine(model, strat, topo, lr=3e-3)
                log.clear()
                mlp_calls[0] = 0
                for step in range(steps):
                    model.loss(*batch(step, rank, False))[0].backward()
                    engine.step()
                out[on] = {"log": list(log), "mlp_calls": mlp_calls[0],
                           "params": {n: p.detach().clone() for n, p in model.named_parameters()}}
        finally:
            experts_mod.grouped_mlp = compute_mod.grouped_mlp = mlp
    return out


@pytest.mark.parametrize("strategy", ["dp", "ep", "fsdp"])
def test_baselines_recompute_their_expert_mlp_without_extra_collectives(strategy):
    """Under checkpointing dp, ep and fsdp also recompute the expert MLP (its hidden layer is not
    kept), around their local compute only: the same collectives in the same order, and
    bit-identical parameters."""
    steps, layers = 2, 2  # tiny_config: every layer is MoE
    for res in run_distributed(baseline_recompute_case, 2, strategy, steps):
        off, on = res[False], res[True]
        assert off["mlp_calls"] == steps * layers
        assert on["mlp_calls"] == 2 * steps * layers, f"{strategy} did not recompute its expert MLP"
        assert on["log"] == off["log"], "checkpointing changed the collectives (order, kind or size)"
        for n, p in off["params"].items():
            assert torch.equal(p, on["params"][n]), n
