"""DeepSpeed MoE checkpoints <-> Hecate's consolidated safetensors (a `local`-named model).

DeepSpeed (engine.save_checkpoint) writes, under CKPT/TAG/:
  mp_rank_00_model_states.pt                       {'module': non-expert state dict, ...}
  layer_{L}_expert_{E}_mp_rank_00_model_states.pt  one expert's weights, keys
      P.deepspeed_moe.experts.deepspeed_experts.{E}.<expert module keys>  (E global)
  expp_rank_{R}_mp_rank_00_optim_states.pt         per-rank optimizer state (not imported)
and CKPT/latest holding TAG. The .pt files are torch pickles: they are read ONLY with
torch.load(weights_only=True), which refuses arbitrary objects; a file it refuses raises
CheckpointFormatError instead of being unpickled.

Names: a DeepSpeed MoE module at path P becomes hecate.integrations.deepspeed.MoE at P:
  P.deepspeed_moe.gate.wg.weight                 -> P.moe.router.weight_ED
  P.deepspeed_moe.experts.deepspeed_experts.E.<fc1>.weight -> P.moe.experts.w1_EFD[E]
  P.deepspeed_moe.experts.deepspeed_experts.E.<fc2>.weight -> P.moe.experts.w2_EDF[E]
  P.mlp.<fc1|fc2>.weight (use_residual)          -> P.moe.residual.mlp.w1_FD / w2_DF
  P.coefficient.{weight,bias}                    -> P.moe.residual.coefficient.{weight,bias}
  (new) P.moe.router.expert_bias_E               <- zeros (DeepSpeed has no selection bias)
Every other key is copied unchanged. <fc1>/<fc2> are the expert module's two weight keys in
state-dict order. That is the "grouped" layout (the drop-in's built-in experts, for a bias-free
two-Linear GELU expert). Any other expert module (biases, gated, custom: the drop-in's
ModuleExperts) uses the "module" layout, every parameter stacked under its own name:
  P.deepspeed_moe.experts.deepspeed_experts.E.<key>  -> P.moe.experts.<key with . -> __>[E]
  P.mlp.<key> (use_residual)                         -> P.moe.residual.mlp.<key>
layout="auto" picks "grouped" when every expert holds exactly two weight matrices and nothing
else, "module" otherwise (pass layout="module" for a bias-free two-Linear expert whose
activation is not the exact GELU, e.g. ReLU: the drop-in runs it as ModuleExperts).
"""
from __future__ import annotations

import glob
import os
import re
from collections import OrderedDict
from typing import Dict, Tuple

import torch

EXPERTS = ".deepspeed_moe.experts.deepspeed_experts."
GATE = ".deepspeed_moe.gate.wg.weight"
_EXPERT_FILE = re.compile(r"layer_(\d+)_expert_(\d+)_mp_rank_(\d+)_model_states\.pt$")


class CheckpointFormatError(ValueError):
    """A DeepSpeed/Megatron checkpoint file that cannot be read safely or has unexpected contents."""


def safe_torch_load(path: str):
    """torch.load(weights_only=True): tensors and plain containers only, never arbitrary pickles."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # UnpicklingError, RuntimeError from a corrupt zip, ...
        raise CheckpointFormatError(
            f"{path}: cannot be read with torch.load(weights_only=True) ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}). Hecate never unpickles arbitrary "
            "objects; re-save the checkpoint with plain tensors (e.g. DeepSpeed's "
            "zero_to_fp32 or torch.save(model.state_dict()))") from None


def _tag_dir(ckpt_dir: str, tag=None) -> str:
    ckpt_dir = os.fspath(ckpt_dir)
    if tag is None:
        latest = os.path.join(ckpt_dir, "latest")
        if os.path.isfile(latest):
            with open(latest) as f:
                tag = f.read().strip()
        elif glob.glob(os.path.join(ckpt_dir, "*_model_states.pt")):
            return ckpt_dir  # already a tag directory
        else:
            raise FileNotFoundError(f"ckpt_dir={ckpt_dir} has no 'latest' file; pass tag=")
    path = os.path.join(ckpt_dir, str(tag))
    if not os.path.isdir(path):
        raise FileNotFoundError(f"checkpoint tag directory {path} does not exist")
    return path


def load_deepspeed_checkpoint(ckpt_dir, tag=None) -> Tuple[Dict[str, torch.Tensor], dict]:
    """Merge DeepSpeed's model-states file and every expert file into one DeepSpeed-named
    state dict; returns (state, info) with info['optimizer_files'] (found, not imported)."""
    path = _tag_dir(ckpt_dir, tag)
    main = os.path.join(path, "mp_rank_00_model_states.pt")
    if not os.path.isfile(main):
        raise FileNotFoundError(f"{main} not found (tensor-parallel DeepSpeed checkpoints are not supported)")
    blob = safe_torch_load(main)
    if not isinstance(blob, dict) or not isinstance(blob.get("module"), dict):
        raise CheckpointFormatError(f"{main}: expected a dict with a 'module' state dict")
    state = OrderedDict((k, v) for k, v in blob["module"].items() if EXPERTS not in k)
    expert_files = sorted(f for f in os.listdir(path) if _EXPERT_FILE.match(f))
    for name in expert_files:
        if _EXPERT_FILE.match(name).group(3) != "00":
            raise CheckpointFormatError(f"{name}: tensor-parallel experts (mp_rank != 00) are not supported")
        part = safe_torch_load(os.path.join(path, name))
        if not isinstance(part, dict):
            raise CheckpointFormatError(f"{name}: expected an expert state dict")
        for k, v in part.items():
            if not torch.is_tensor(v):
                raise CheckpointFormatError(f"{name}: entry {k} is not a tensor")
            state[k] = v
    optim = sorted(f for f in os.listdir(path) if f.endswith("_optim_states.pt"))
    return state, {"tag_dir": path, "expert_files": expert_files, "optimizer_files": optim}


def _expert_weight_keys(keys, where: str) -> Tuple[str, str]:
    """(fc1 suffix, fc2 suffix) from one expert's keys (module order); refuses biases."""
    weights = [k for k in keys if k.endswith("weight")]
    others = [k for k in keys if not k.endswith("weight")]
    if others:
        raise CheckpointFormatError(f"{where}: expert entries {others} are not supported (Hecate's experts "
                                    "are two bias-free Linear layers)")
    if len(weights) != 2:
        raise CheckpointFormatError(f"{where}: an expert must have exactly two weight matrices, got {weights}")
    return weights[0], weights[1]


LAYOUTS = ("auto", "grouped", "module")


def _is_grouped(keys) -> bool:
    return len(keys) == 2 and all(k.endswith("weight") for k in keys)


def deepspeed_to_hecate(state: Dict[str, torch.Tensor], layout: str = "auto") -> Dict[str, torch.Tensor]:
    """DeepSpeed-named state dict -> Hecate local names (see the module doc for `layout`)."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout={layout!r} must be one of {LAYOUTS}")
    out = OrderedDict()
    prefixes = [k[: -len(GATE)] for k in state if k.endswith(GATE)]
    if not prefixes:
        raise CheckpointFormatError("no DeepSpeed MoE layer found (no key ends in "
                                    f"'{GATE}'); is this a DeepSpeed MoE checkpoint?")
    used = set()
    for p in prefixes:
        gate = state[p + GATE]
        e, d = gate.shape
        per_expert: Dict[int, Dict[str, torch.Tensor]] = {}
        for k, v in state.items():
            if k.startswith(p + EXPERTS):
                rest = k[len(p + EXPERTS):]
                idx, _, sub = rest.partition(".")
                per_expert.setdefault(int(idx), OrderedDict())[sub] = v
                used.add(k)
        if sorted(per_expert) != list(range(e)):
            raise CheckpointFormatError(f"{p}: the gate has {e} experts but the checkpoint holds experts "
                                        f"{sorted(per_expert)}; are expert files missing?")
        h = p + ".moe"
        keys0 = list(per_expert[0])
        if layout == "module" or (layout == "auto" and not _is_grouped(keys0)):
            out[h + ".router.weight_ED"] = gate.float()
            out[h + ".router.expert_bias_E"] = torch.zeros(e)
            for key in keys0:
                if any(key not in per_expert[i] for i in range(e)):
                    raise CheckpointFormatError(f"{p}: expert parameter {key} is missing from some experts")
                out[f"{h}.experts.{key.replace('.', '__')}"] = torch.stack(
                    [per_expert[i][key] for i in range(e)]).float().contiguous()
            used.add(p + GATE)
            for k, v in state.items():
                if k.startswith(p + ".mlp."):
                    out[f"{h}.residual.mlp.{k[len(p + '.mlp.'):]}"] = v.float()
                    used.add(k)
            if any(k.startswith(p + ".mlp.") for k in state):
                for n in ("weight", "bias"):
                    out[f"{h}.residual.coefficient.{n}"] = state[f"{p}.coefficient.{n}"].float()
                    used.add(f"{p}.coefficient.{n}")
            continue
        fc1, fc2 = _expert_weight_keys(keys0, f"{p} expert 0")
        w1 = torch.stack([per_expert[i][fc1] for i in range(e)]).float()
        w2 = torch.stack([per_expert[i][fc2] for i in range(e)]).float()
        if w1.shape[2] != d or w2.shape[1] != d or w2.shape[2] != w1.shape[1]:
            raise CheckpointFormatError(f"{p}: expert shapes {tuple(w1.shape[1:])}, {tuple(w2.shape[1:])} do not "
                                        f"form a D={d} -> F -> D MLP")
        out[h + ".router.weight_ED"] = gate.float()
        out[h + ".router.expert_bias_E"] = torch.zeros(e)
        out[h + ".experts.w1_EFD"], out[h + ".experts.w2_EDF"] = w1.contiguous(), w2.contiguous()
        used.add(p + GATE)
        mlp = OrderedDict((k[len(p + ".mlp."):], v) for k, v in state.items() if k.startswith(p + ".mlp."))
        if mlp:
            r1, r2 = _expert_weight_keys(list(mlp), f"{p}.mlp (residual)")
            out[h + ".residual.mlp.w1_FD"], out[h + ".residual.mlp.w2_DF"] = mlp[r1].float(), mlp[r2].float()
            used.update(p + ".mlp." + k for k in mlp)
            for n in ("weight", "bias"):
                out[f"{h}.residual.coefficient.{n}"] = state[f"{p}.coefficient.{n}"].float()
                used.add(f"{p}.coefficient.{n}")
    for k, v in state.items():
        if k not in used:
            out[k] = v
    return out


def hecate_to_deepspeed(state: Dict[str, torch.Tensor], expert_keys=("0.weight", "2.weight"),
                        residual_keys=None) -> Dict[str, torch.Tensor]:
    """Hecate local names -> DeepSpeed names. expert_keys are the expert module's two weight
    keys (default nn.Sequential(Linear, GELU, Linear)); residual_keys those of P.mlp
    (default: the same)."""
    residual_keys = residual_keys or expert_keys
    out = OrderedDict()
    suffix = ".moe.router.weight_ED"
    prefixes = [k[: -len(suffix)] for k in state if k.endswith(suffix)]
    if not prefixes:
        raise CheckpointFormatError("no Hecate drop-in MoE layer found (no key ends in '.moe.router.weight_ED')")
    used = set()
    for p in prefixes:
        h = p + ".moe"
        out[p + GATE] = state[h + ".router.weight_ED"]
        if h + ".experts.w1_EFD" in state:
            w1, w2 = state[h + ".experts.w1_EFD"], state[h + ".experts.w2_EDF"]
            for e in range(w1.shape[0]):
                out[f"{p}{EXPERTS}{e}.{expert_keys[0]}"] = w1[e].clone()
                out[f"{p}{EXPERTS}{e}.{expert_keys[1]}"] = w2[e].clone()
        else:  # ModuleExperts: every stacked parameter back under the module's own key
            stacked = [k for k in state if k.startswith(h + ".experts.")]
            if not stacked:
                raise CheckpointFormatError(f"{h}: no expert weights")
            for k in stacked:
                key = k[len(h + ".experts."):].replace("__", ".")
                for e in range(state[k].shape[0]):
                    out[f"{p}{EXPERTS}{e}.{key}"] = state[k][e].clone()
            used.update(stacked)
            residual = [k for k in state if k.startswith(h + ".residual.mlp.")]
            for k in residual:
                out[f"{p}.mlp.{k[len(h + '.residual.mlp.'):]}"] = state[k]
            used.update(residual)
            if residual:
                for n in ("weight", "bias"):
                    out[f"{p}.coefficient.{n}"] = state[f"{h}.residual.coefficient.{n}"]
                    used.add(f"{h}.residual.coefficient.{n}")
        bias = state.get(h + ".router.expert_bias_E")
        if bias is not None and bool(bias.any()):
            raise CheckpointFormatError(f"{h}.router.expert_bias_E is non-zero: DeepSpeed's gate has no "
                                        "selection bias to carry it")
        used.update({h + ".router.weight_ED", h + ".router.expert_bias_E", h + ".experts.w1_EFD",
                     h + ".experts.w2_EDF"})
        if h + ".residual.mlp.w1_FD" in state:
            out[f"{p}.mlp.{residual_keys[0]}"] = state[h + ".residual.mlp.w1_FD"]
            out[f"{p}.mlp.{residual_keys[1]}"] = state[h + ".residual.mlp.w2_DF"]
            for n in ("weight", "bias"):
                out[f"{p}.coefficient.{n}"] = state[f"{h}.residual.coefficient.{n}"]
            used.update({h + ".residual.mlp.w1_FD", h + ".residual.mlp.w2_DF",
                         h + ".residual.coefficient.weight", h + ".residual.coefficient.bias"})
        extra = [k for k in state if k.startswith(h + ".") and k not in used]
        if extra:
            raise CheckpointFormatError(f"{extra}: no DeepSpeed MoE counterpart (shared experts, w3 for swiglu)")
    for k, v in state.items():
        if k not in used:
            out[k] = v
    return out


def import_deepspeed_checkpoint(ckpt_dir, out_path, tag=None, layout: str = "auto") -> dict:
    """Convert a DeepSpeed MoE checkpoint to Hecate's consolidated safetensors file (load it with
    hecate.train.checkpoint.import_safetensors into a model built with the drop-in MoE).
    Returns info (files read; optimizer files found, whose state is not converted)."""
    import safetensors.torch

    from hecate.train.checkpoint_io import atomic_write_bytes

    state, info = load_deepspeed_checkpoint(ckpt_dir, tag)
    tensors = {k: v.detach().cpu().contiguous() for k, v in deepspeed_to_hecate(state, layout).items()}
    atomic_write_bytes(os.fspath(out_path), safetensors.torch.save(
        tensors, metadata={"hecate.format": "export", "hecate.source": "deepspeed"}))
    return info


def export_deepspeed_checkpoint(hecate_path, ckpt_dir, tag="hecate", expert_keys=("0.weight", "2.weight"),
                                residual_keys=None) -> None:
    """Write a Hecate consolidated safetensors file as a DeepSpeed checkpoint (model states +
    one file per expert + `latest`), loadable by engine.load_checkpoint(...,
    load_optimizer_states=False). No optimizer files are written."""
    import safetensors.torch

    with open(os.fspath(hecate_path), "rb") as f:
        state = safetensors.torch.load(f.read())
    ds = hecate_to_deepspeed(state, expert_keys, residual_keys)
    path = os.path.join(os.fspath(ckpt_dir), str(tag))
    os.makedirs(path, exist_ok=True)
    prefixes = [k[: -len(GATE)] for k in ds if k.endswith(GATE)]
    dense = OrderedDict((k, v) for k, v in ds.items() if EXPERTS not in k)
    for layer, p in enumerate(prefixes):
        experts: Dict[int, dict] = {}
        for k, v in ds.items():
            if k.startswith(p + EXPERTS):
                e = int(k[len(p + EXPERTS):].split(".", 1)[0])
                experts.setdefault(e, OrderedDict())[k] = v
        for e, sd in experts.items():
            torch.save(sd, os.path.join(path, f"layer_{layer}_expert_{e}_mp_rank_00_model_states.pt"))
    # num_experts as a per-layer list tells DeepSpeed's loader the layer_{L}_expert_{E} naming.
    num_experts = [int(ds[p + GATE].shape[0]) for p in prefixes]
    torch.save({"module": dense, "buffer_names": [], "dp_world_size": 1, "mp_world_size": 1,
                "num_experts": num_experts, "global_steps": 0, "global_samples": 0, "skipped_steps": 0},
               os.path.join(path, "mp_rank_00_model_states.pt"))
    with open(os.path.join(os.fspath(ckpt_dir), "latest"), "w") as f:
        f.write(str(tag))
