"""Worker functions for tests/test_integration_*.py (run on every rank by run_distributed).

DeepSpeed is imported inside the workers only, after DS_ACCELERATOR=cpu is set, so this
module imports without it.
"""
import os

import torch
import torch.distributed as dist
from torch import nn

D, F = 16, 32
# Workers that import DeepSpeed or Megatron keep them loaded (and their process groups): run them
# in pools of their own, which run_distributed keys by collective_timeout, so other tests never
# share a process with them.
ISOLATED = {"collective_timeout": 46.0}


def _deepspeed():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    # deepspeed.initialize reads the launcher's variables; the pool's ranks are one node.
    os.environ.setdefault("LOCAL_RANK", str(dist.get_rank()))
    os.environ.setdefault("RANK", str(dist.get_rank()))
    os.environ.setdefault("WORLD_SIZE", str(dist.get_world_size()))
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")
    return deepspeed


def gelu_expert(d=D, f=F):
    return nn.Sequential(nn.Linear(d, f, bias=False), nn.GELU(), nn.Linear(f, d, bias=False))


def distinct_experts(num_experts, d=D, f=F, seed=7):
    """Different weights per expert (DeepSpeed starts them as copies, which hides mix-ups)."""
    g = torch.Generator().manual_seed(seed)
    return {"w1_EFD": torch.randn(num_experts, f, d, generator=g) / d ** 0.5,
            "w2_EDF": torch.randn(num_experts, d, f, generator=g) / f ** 0.5}


def _ds_expert_grads(ds, full_shape_E, world):
    """DeepSpeed's expert grads placed at global ids, summed over ranks and / world (the
    data-parallel mean the DeepSpeed engine would apply)."""
    from deepspeed.utils import groups

    name = ds.expert_group_name
    ep_rank = groups._get_expert_parallel_rank(name)
    nl = ds.num_local_experts
    g1 = torch.zeros(full_shape_E["w1_EFD"])
    g2 = torch.zeros(full_shape_E["w2_EDF"])
    for i, ex in enumerate(ds.deepspeed_moe.experts.deepspeed_experts):
        g1[ep_rank * nl + i] = ex[0].weight.grad
        g2[ep_rank * nl + i] = ex[2].weight.grad
    for g in (g1, g2):
        dist.all_reduce(g)
        g /= world
    return {"w1_EFD": g1, "w2_EDF": g2}


def ds_equivalence(rank, world, k, ep_size, drop_tokens, use_residual, tokens, strategy,
                   capacity_factor=1.0, min_capacity=0, eval_capacity_factor=None):
    """deepspeed.moe.layer.MoE vs hecate.integrations.deepspeed.MoE on the same weights and tokens:
    returns the max abs differences of output, l_aux, exp_counts and every gradient."""
    _deepspeed()
    from deepspeed.moe.layer import MoE as DSMoE
    from deepspeed.utils import groups

    from hecate.integrations.deepspeed import MoE

    E = 8
    torch.manual_seed(0)
    expert = gelu_expert()
    kw = dict(num_experts=E, ep_size=ep_size, k=k, capacity_factor=capacity_factor,
              eval_capacity_factor=eval_capacity_factor or capacity_factor, min_capacity=min_capacity,
              use_residual=use_residual,
              drop_tokens=drop_tokens, use_rts=False, top2_2nd_expert_sampling=False)
    ds = DSMoE(D, expert, **kw)
    ds.set_deepspeed_parallelism()
    hm = MoE(D, expert, **kw, strategy=strategy)
    full = distinct_experts(E)
    ep_rank = groups._get_expert_parallel_rank(ds.expert_group_name)
    nl = ds.num_local_experts
    with torch.no_grad():
        for i, ex in enumerate(ds.deepspeed_moe.experts.deepspeed_experts):
            ex[0].weight.copy_(full["w1_EFD"][ep_rank * nl + i])
            ex[2].weight.copy_(full["w2_EDF"][ep_rank * nl + i])
        hm.moe.router.weight_ED.copy_(ds.deepspeed_moe.gate.wg.weight)
        if use_residual:
            hm.moe.residual.coefficient.load_state_dict(ds.coefficient.state_dict())
    hm.strategy.load_experts(hm.moe, full)
    if eval_capacity_factor is not None:  # eval mode: DeepSpeed switches to eval_capacity_factor
        ds.eval()
        hm.eval()
    n = tokens[rank]
    g = torch.Generator().manual_seed(100 + rank)
    x = torch.randn(2, n // 2, D, generator=g)
    dy = torch.randn(2, n // 2, D, generator=g)
    res = {}
    outs = []
    for side, layer in (("ds", ds), ("hecate", hm)):
        xi = x.clone().requires_grad_(True)
        y, l_aux, counts = layer(xi)
        ((y * dy).sum() + 0.5 * l_aux).backward()
        outs.append((y.detach(), l_aux.detach(), counts.detach().long(), xi.grad))
        if side == "hecate":  # how many entries the capacity dropped on this rank (tests want > 0)
            with torch.no_grad():
                stats = hm.moe(x.reshape(-1, D)).stats
            res["dropped"] = int(stats.tokens_per_expert_E.sum() - stats.kept_per_expert_E.sum())
    (y0, a0, c0, gx0), (y1, a1, c1, gx1) = outs
    res["y"] = float((y0 - y1).abs().max())
    res["l_aux"] = abs(float(a0) - float(a1))
    res["counts_equal"] = bool(torch.equal(c0, c1))
    res["dx"] = float((gx0 - gx1).abs().max())
    res["dgate"] = float((ds.deepspeed_moe.gate.wg.weight.grad - hm.moe.router.weight_ED.grad).abs().max())
    from hecate.integrations.deepspeed import finish_backward

    finish_backward(hm)
    hg = hm.strategy.gather_experts(hm.moe, grads=True)
    dg = _ds_expert_grads(ds, {n_: v.shape for n_, v in full.items()}, world)
    res["dexperts"] = max(float((hg[n_] - dg[n_]).abs().max()) for n_ in dg)
    if use_residual:
        res["dresidual"] = float((ds.coefficient.weight.grad - hm.moe.residual.coefficient.weight.grad).abs().max())
    res["scale"] = float(y0.abs().max())
    return res


class TinyMoEModel(nn.Module):
    """dense -> two Hecate drop-in MoE layers -> dense head: a model written against DeepSpeed's
    MoE API. `strategy` is a name (each layer builds its own strategy) or one shared instance."""

    def __init__(self, strategy, num_experts=8, k=2):
        super().__init__()
        from hecate.integrations.deepspeed import MoE

        self.inp = nn.Linear(D, D)
        self.moes = nn.ModuleList(
            MoE(D, gelu_expert(), num_experts=num_experts, k=k, capacity_factor=1.25, min_capacity=1,
                use_rts=False, top2_2nd_expert_sampling=False, strategy=strategy) for _ in range(2))
        self.head = nn.Linear(D, D)

    def forward(self, x, y):
        h, aux = torch.tanh(self.inp(x)), 0.0
        for moe in self.moes:
            out, l_aux, _ = moe(h)
            h, aux = h + out, aux + l_aux
        return ((self.head(h) - y) ** 2).mean() + 0.01 * aux


def _train_batch(step, rank):
    g = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randn(2, 6, D, generator=g), torch.randn(2, 6, D, generator=g)


def ds_train_vs_engine(rank, world, stage, strategy, steps=4, accum=1):
    """The same model trained by deepspeed.initialize (ZeRO `stage` on the dense part, Hecate
    experts) and by Hecate's Engine; returns both loss curves and the max weight difference."""
    _deepspeed()
    from hecate.comm.topology import Topology
    from hecate.integrations.deepspeed import hecate_moe_layers, initialize
    from hecate.parallel import build_strategy
    from hecate.train.engine import Engine

    hp = dict(lr=3e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.01)
    torch.manual_seed(0)
    shared = build_strategy(strategy, Topology())  # Hecate's Engine drives one strategy for all layers
    ref = TinyMoEModel(shared)
    engine_ref = Engine(ref, shared, Topology(), max_grad_norm=None, **hp)
    init_w = ref.inp.weight.detach().clone()
    torch.manual_seed(0)
    model = TinyMoEModel(strategy)
    make = lambda params: torch.optim.AdamW(params, foreach=False, **hp)  # noqa: E731
    ds_cfg = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": accum,
              "zero_optimization": {"stage": stage}, "gradient_clipping": 0.0}
    engine, expert_step = initialize(model, ds_cfg, make)
    curves = {"ref": [], "ds": []}
    for step in range(steps):
        for micro in range(accum):
            x, y = _train_batch(step * accum + micro, rank)
            ref_loss = ref(x, y)
            (ref_loss / accum).backward()
            loss = engine(x, y)
            engine.backward(loss)
            expert_step.step(engine)
            engine.step()
            for name, v in (("ref", ref_loss), ("ds", loss)):
                mean = v.detach().clone()
                dist.all_reduce(mean)
                curves[name].append(float(mean) / world)
        engine_ref.step()
    diff = 0.0
    for a, b in zip(hecate_moe_layers(ref), hecate_moe_layers(model)):
        fa, fb = a.strategy.gather_experts(a), b.strategy.gather_experts(b)
        diff = max(diff, max(float((fa[n] - fb[n]).abs().max()) for n in fa))
    for (na, pa), (_, pb) in zip(ref.named_parameters(), model.named_parameters()):
        if pa.shape == pb.shape and "expert" not in na:
            diff = max(diff, float((pa.detach() - pb.detach()).abs().max()))
    return {"diff": diff, "curves": curves, "moved": float((ref.inp.weight.detach() - init_w).abs().max())}


class DSModel(nn.Module):
    """The same user model with DeepSpeed's MoE (moe_cls = deepspeed.moe.layer.MoE) or Hecate's."""

    def __init__(self, moe_cls, world, **extra):
        super().__init__()
        self.inp = nn.Linear(D, D)
        self.moe = moe_cls(D, gelu_expert(), num_experts=4, ep_size=world, k=2, use_residual=True,
                           drop_tokens=False, use_rts=False, top2_2nd_expert_sampling=False, **extra)
        self.head = nn.Linear(D, D)

    def forward(self, x):
        h, _, _ = self.moe(torch.tanh(self.inp(x)))
        return self.head(h)


def _ds_engine(model):
    deepspeed = _deepspeed()
    cfg = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 0},
           "zero_allow_untested_optimizer": True}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=cfg)
    return engine


def ds_checkpoint_roundtrip(rank, world, tmpdir):
    """Real DeepSpeed checkpoint -> Hecate safetensors -> a Hecate model (same outputs) ->
    back to a DeepSpeed checkpoint that DeepSpeed loads (same weights)."""
    _deepspeed()
    from deepspeed.moe.layer import MoE as DSMoE
    from deepspeed.utils import groups

    from hecate.integrations.convert_deepspeed import export_deepspeed_checkpoint, import_deepspeed_checkpoint
    from hecate.integrations.deepspeed import MoE
    from hecate.train.checkpoint import export_safetensors, import_safetensors

    torch.manual_seed(0)
    model = DSModel(DSMoE, world)
    engine = _ds_engine(model)  # creates DeepSpeed's expert groups
    full = distinct_experts(4)
    ep_rank = groups._get_expert_parallel_rank(model.moe.expert_group_name)
    with torch.no_grad():
        for i, ex in enumerate(model.moe.deepspeed_moe.experts.deepspeed_experts):
            ex[0].weight.copy_(full["w1_EFD"][ep_rank * model.moe.num_local_experts + i])
            ex[2].weight.copy_(full["w2_EDF"][ep_rank * model.moe.num_local_experts + i])
    engine.save_checkpoint(os.path.join(tmpdir, "ds"), tag="step1")
    x = torch.randn(2, 6, D, generator=torch.Generator().manual_seed(rank))
    with torch.no_grad():
        want = model(x)
    hecate_file = os.path.join(tmpdir, "hecate.safetensors")
    info = None
    if rank == 0:
        info = import_deepspeed_checkpoint(os.path.join(tmpdir, "ds"), hecate_file)
    dist.barrier()
    torch.manual_seed(1)  # different init: everything must come from the file
    hmodel = DSModel(MoE, world, strategy="fssdp")
    import_safetensors(hecate_file, hmodel, hmodel.moe.strategy)
    with torch.no_grad():
        got = hmodel(x)
    out_file = os.path.join(tmpdir, "hecate_out.safetensors")
    export_safetensors(out_file, hmodel, hmodel.moe.strategy)
    if rank == 0:
        export_deepspeed_checkpoint(out_file, os.path.join(tmpdir, "ds_back"))
    dist.barrier()
    torch.manual_seed(2)
    model2 = DSModel(DSMoE, world)
    engine2 = _ds_engine(model2)
    engine2.load_checkpoint(os.path.join(tmpdir, "ds_back"), load_optimizer_states=False,
                            load_lr_scheduler_states=False)
    diff_back = max(float((a - b).abs().max()) for a, b in zip(model.state_dict().values(),
                                                                  model2.state_dict().values()))
    return {"out_diff": float((want - got).abs().max()), "back_diff": diff_back, "info": info}


def _megatron_config(**kw):
    from megatron.core.transformer.transformer_config import TransformerConfig

    base = dict(num_layers=2, hidden_size=D, num_attention_heads=4, ffn_hidden_size=F, num_moe_experts=4,
                moe_router_topk=2, add_bias_linear=False, moe_aux_loss_coeff=0.01, use_cpu_initialization=True,
                moe_shared_expert_intermediate_size=8)
    base.update(kw)
    return TransformerConfig(**base)


def megatron_weights_round_trip(rank, world, gated):
    """A real Megatron-core MoELayer's state dict (built on CPU) -> Hecate layer (strict load) ->
    back into a fresh Megatron MoELayer: same tensors. Also builds a full TransformerLayer with the
    Hecate spec (its forward needs CUDA for Megatron's attention)."""
    from megatron.core import parallel_state
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.spec_utils import build_module

    from hecate.integrations.convert_megatron import hecate_to_megatron, megatron_to_hecate
    from hecate.integrations.megatron_spec import HecateMegatronMoE, gpt_layer_spec_with_hecate_moe

    parallel_state.initialize_model_parallel(1, 1)
    try:
        import torch.nn.functional as Fn

        kw = dict(gated_linear_unit=True, activation_func=Fn.silu) if gated else {}
        cfg = _megatron_config(**kw)
        torch.manual_seed(0)
        meg = build_module(get_gpt_layer_local_spec(num_experts=4), config=cfg, layer_number=1)
        prefix = "decoder.layers.0."
        state = {prefix + k: v for k, v in meg.state_dict().items() if torch.is_tensor(v) or v is None}
        hec = megatron_to_hecate({k: v for k, v in state.items() if ".mlp." in k}, gated=gated)
        layer = build_module(gpt_layer_spec_with_hecate_moe(num_experts=4, strategy="local"), config=cfg,
                             layer_number=1)
        assert isinstance(layer.mlp, HecateMegatronMoE)
        own = {k[len(prefix + "mlp."):]: v for k, v in hec.items()}
        layer.mlp.load_state_dict(own)  # strict
        back = hecate_to_megatron({prefix + "mlp." + k: v for k, v in layer.mlp.state_dict().items()})
        torch.manual_seed(1)
        meg2 = build_module(get_gpt_layer_local_spec(num_experts=4), config=cfg, layer_number=1)
        missing, unexpected = meg2.mlp.load_state_dict({k[len(prefix + "mlp."):]: v for k, v in back.items()},
                                                       strict=False)
        bad_missing = [k for k in missing if not k.endswith("_extra_state")]
        same = all(torch.equal(meg.mlp.state_dict()[k], v) for k, v in meg2.mlp.state_dict().items()
                   if torch.is_tensor(v) and not k.endswith("_extra_state"))
        # expert 1 computes what Megatron's expert 1 computes
        x = torch.randn(5, D)
        ref = meg.mlp.experts.local_experts[1](x)[0]
        got = layer.mlp.experts.expert_forward(1, x)
        return {"missing": bad_missing, "unexpected": list(unexpected), "same": same,
                "expert_diff": float((ref - got).abs().max()), "num_keys": len(hec)}
    finally:
        parallel_state.destroy_model_parallel()
