"""Experts built from any nn.Module (DeepSpeed's `expert=` argument): `ModuleExperts`.

Each parameter of the user's expert module becomes one stacked parameter [E, ...] of this
module (name: the module path with "." -> "__"), so the chunk layout (hecate.parallel.chunks)
and every strategy (dp / ep / fsdp / fssdp) shard, gather and reduce them exactly like the
built-in experts' w1_EFD / w2_EDF. Strategies call `grouped_forward(x_ND, counts_G, weights)`
with the stacked weights they materialized.

Two ways to compute, chosen once from the module:

- grouped: the module is traced with torch.fx; when its graph only applies nn.Linear layers
  (with or without bias; the expert itself may be a bare nn.Linear, and F.linear on the module's
  own weight / bias parameters counts as one) and row-wise elementwise operations (GELU exact or tanh, ReLU, SiLU,
  tanh, sigmoid, dropout, +, *, chunk along the last dim: SwiGLU / GeGLU forms), the graph
  runs once over all rows, every Linear as a grouped matmul over the experts' row blocks
  (torch._grouped_mm where it runs, else one matmul per expert).
- generic (anything else: norms, custom parameters, data-dependent control flow): each expert
  runs the module with its own parameters through torch.func.functional_call on its rows.
  Slower (one module call per expert); a one-time warning says so.

Both compute exactly what a loop calling a copy of the module per expert computes. Dropout
inside the expert draws its own random mask (not the same draws as another implementation).
The module must not hold buffers (their per-expert state would have no owner).
"""
from __future__ import annotations

import copy
import operator
import warnings
from typing import Dict, Optional

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from hecate import ops

_WARNED = False

# Modules and functions that act on each row independently and hold no parameters.
ELEMENTWISE_MODULES = (nn.GELU, nn.ReLU, nn.SiLU, nn.Tanh, nn.Sigmoid, nn.Dropout, nn.Identity, nn.LeakyReLU,
                       nn.ELU, nn.Mish, nn.ReLU6, nn.Softplus, nn.Hardswish, nn.GLU)
ELEMENTWISE_FUNCTIONS = {F.gelu, F.relu, F.silu, F.dropout, F.leaky_relu, F.elu, F.mish, F.softplus, F.glu,
                         torch.tanh, torch.sigmoid, torch.relu, torch.mul, torch.add, torch.sub,
                         operator.mul, operator.add, operator.sub, operator.truediv, operator.getitem}
ELEMENTWISE_METHODS = {"mul", "add", "sub", "sigmoid", "tanh", "relu", "contiguous"}


def _stacked_name(name: str) -> str:
    return name.replace(".", "__")


def _check_module(expert: nn.Module) -> None:
    if not isinstance(expert, nn.Module):
        raise TypeError(f"expert must be an nn.Module, got {type(expert).__name__}")
    if not list(expert.parameters()):
        raise ValueError("expert has no parameters: nothing to shard or train")
    buffers = [n for n, _ in expert.named_buffers()]
    if buffers:
        raise ValueError(f"expert holds buffers {buffers[:4]} (e.g. BatchNorm running stats); Hecate's "
                         "experts shard parameters only: use a norm without running statistics")
    names = [_stacked_name(n) for n, _ in expert.named_parameters()]
    if len(set(names)) != len(names):
        raise ValueError(f"expert parameter names collide once '.' becomes '__': {names}")


def _grouped_graph(expert: nn.Module) -> Optional[torch.fx.GraphModule]:
    """The fx graph of `expert` when every step is a Linear or row-wise elementwise; else None."""
    try:
        gm = torch.fx.symbolic_trace(expert)
    except Exception:  # noqa: BLE001 - untraceable modules take the generic path
        return None
    modules = dict(gm.named_modules())
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != 1:
        return None
    linear_params = set()
    params = dict(expert.named_parameters())
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target is F.linear:
            # A bare nn.Linear traces to F.linear(x, get_attr weight, get_attr bias), as does a
            # module that calls F.linear on its own parameters: a grouped Linear too.
            weight, bias = _functional_linear_params(node)
            if weight is None or weight not in params or (bias is not None and bias not in params):
                return None
            linear_params |= {weight} | ({bias} if bias is not None else set())
        elif node.op == "call_module":
            m = modules[node.target]
            if isinstance(m, nn.Linear):
                linear_params |= {f"{node.target}.{p}" for p, _ in m.named_parameters()}
            elif not isinstance(m, ELEMENTWISE_MODULES):
                return None
            elif isinstance(m, nn.GLU) and m.dim not in (-1,):
                return None
        elif node.op == "call_function":
            if node.target not in ELEMENTWISE_FUNCTIONS:
                return None
            if node.target is F.glu and node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else -1) != -1:
                return None
            if node.target is operator.getitem and not isinstance(node.args[1], int):
                return None  # indexing a chunk tuple only, never slicing rows
        elif node.op == "call_method":
            if node.target == "chunk":
                dim = node.kwargs.get("dim", node.args[2] if len(node.args) > 2 else 0)
                if dim != -1:
                    return None
            elif node.target not in ELEMENTWISE_METHODS:
                return None
        elif node.op == "get_attr":
            # A parameter may only feed F.linear as its weight or bias (checked there).
            if any(u.op != "call_function" or u.target is not F.linear or node not in _linear_weight_nodes(u)
                   for u in node.users):
                return None
    if linear_params != {n for n, _ in expert.named_parameters()}:
        return None
    return gm


def _linear_args(node: torch.fx.Node):
    """(input, weight, bias) of an fx F.linear call, from positional or keyword arguments."""
    args = list(node.args) + [None] * (3 - len(node.args))
    return (node.kwargs.get("input", args[0]), node.kwargs.get("weight", args[1]), node.kwargs.get("bias", args[2]))


def _linear_weight_nodes(node: torch.fx.Node) -> list:
    _, weight, bias = _linear_args(node)
    return [a for a in (weight, bias) if isinstance(a, torch.fx.Node)]


def _functional_linear_params(node: torch.fx.Node):
    """Parameter names of an F.linear's weight and bias when both are get_attr nodes (bias may be
    None); (None, None) when the weight or bias is computed, or the input is a parameter."""
    x, weight, bias = _linear_args(node)
    if not isinstance(weight, torch.fx.Node) or weight.op != "get_attr":
        return None, None
    if isinstance(x, torch.fx.Node) and x.op == "get_attr":
        return None, None
    if bias is not None and (not isinstance(bias, torch.fx.Node) or bias.op != "get_attr"):
        return None, None
    return weight.target, (bias.target if bias is not None else None)


def _grouped_mm_ok(x: torch.Tensor, w: torch.Tensor) -> bool:
    if not hasattr(torch, "_grouped_mm") or x.dtype != w.dtype or x.shape[0] == 0:
        return False
    if torch.is_autocast_enabled(x.device.type):
        return False
    size = x.element_size()
    return (w.shape[-1] * size) % 16 == 0 and (w.shape[-2] * size) % 16 == 0


def grouped_linear(x_ND: torch.Tensor, counts: list, w_GOI: torch.Tensor,
                   b_GO: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Rows of block g times w_GOI[g]^T (+ b_GO[g]); blocks of counts[g] consecutive rows."""
    y = None
    # The counts are host ints: built on the host and sent up through pinned memory, since
    # torch.tensor(..., device=cuda) copies from pageable memory and stalls the host on a GPU.
    counts_G = torch.tensor(counts, dtype=torch.int64)
    if _grouped_mm_ok(x_ND, w_GOI):
        try:
            offs = ops.to_device(counts_G.cumsum(0).to(torch.int32), x_ND.device)
            y = torch._grouped_mm(x_ND, w_GOI.transpose(-2, -1), offs=offs)
            if y.requires_grad:  # its backward rejects expanded (stride-0) gradients
                y.register_hook(lambda g: g.contiguous())
        except RuntimeError:
            y = None
    if y is None:
        pieces = torch.split(x_ND, counts)
        used = [g for g, c in enumerate(counts) if c > 0]
        if not used:  # no rows: an empty result still connected to the weights (zero grads)
            y = F.linear(x_ND, w_GOI[0]) + 0.0 * w_GOI.sum()  # keeps x_ND's graph too
        else:
            y = torch.cat([F.linear(pieces[g], w_GOI[g]) for g in used])
    if b_GO is not None:
        rows = torch.repeat_interleave(torch.arange(len(counts), device=x_ND.device),
                                       ops.to_device(counts_G, x_ND.device), output_size=x_ND.shape[0])
        y = y + b_GO.to(y.dtype)[rows]
    return y


class ModuleExperts(nn.Module):
    """E experts, each a copy of `expert` (DeepSpeed starts every expert as a copy), stored as
    stacked parameters; forward(x_ND, counts_E) like GroupedExperts."""

    def __init__(self, expert: nn.Module, num_experts: int, *, warn: bool = True):
        super().__init__()
        _check_module(expert)
        if num_experts < 1:
            raise ValueError(f"num_experts must be >= 1, got {num_experts}")
        template = copy.deepcopy(expert)
        self.num_experts = num_experts
        self.param_names = {_stacked_name(n): n for n, _ in template.named_parameters()}
        for stacked, name in self.param_names.items():
            p = template.get_parameter(name).detach()
            self.register_parameter(stacked, nn.Parameter(p.unsqueeze(0).repeat(num_experts, *[1] * p.dim())))
        graph = _grouped_graph(template)
        self.mode = "grouped" if graph is not None else "generic"
        # Both kept out of the module tree: their own parameters are never used (each call passes
        # the expert's), so they must not appear as (dense) model parameters.
        self.__dict__["template"] = template
        self.__dict__["graph"] = graph
        if self.mode == "generic" and warn:
            _warn_generic(type(expert).__name__)

    def train(self, mode: bool = True):
        super().train(mode)
        self.template.train(mode)  # dropout inside the expert follows the model
        if self.graph is not None:
            self.graph.train(mode)
        return self

    def weights(self) -> Dict[str, torch.Tensor]:
        return {n: getattr(self, n) for n in self.param_names}

    def forward(self, x_ND: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        return self.grouped_forward(x_ND, counts_E, self.weights())

    def expert_forward(self, e: int, x_TD: torch.Tensor) -> torch.Tensor:
        """Expert e on plain rows (oracles and tests)."""
        params = {name: getattr(self, stacked)[e] for stacked, name in self.param_names.items()}
        return torch.func.functional_call(self.template, params, (x_TD,))

    def grouped_forward(self, x_ND: torch.Tensor, counts_G: torch.Tensor,
                        weights: Dict[str, torch.Tensor]) -> torch.Tensor:
        """Expert g on the g-th block of counts_G[g] rows, with stacked `weights` [G, ...]."""
        counts = [int(c) for c in (counts_G.tolist() if torch.is_tensor(counts_G) else counts_G)]
        if sum(counts) != x_ND.shape[0]:
            raise ValueError(f"counts_G sums to {sum(counts)} but x_ND has {x_ND.shape[0]} rows")
        missing = set(self.param_names) - set(weights)
        if missing:
            raise ValueError(f"weights lack the expert parameters {sorted(missing)}")
        if self.graph is not None:
            return self._run_graph(x_ND, counts, weights)
        return self._run_generic(x_ND, counts, weights)

    def _run_graph(self, x_ND, counts, weights):
        gm = self.graph
        modules = dict(gm.named_modules())
        env = {}

        def load(a):
            return torch.fx.node.map_arg(a, lambda n: env[n])

        for node in gm.graph.nodes:
            if node.op == "placeholder":
                env[node] = x_ND
            elif node.op == "call_module":
                m = modules[node.target]
                (arg,) = load(node.args)
                if isinstance(m, nn.Linear):
                    w = weights[_stacked_name(f"{node.target}.weight")]
                    b = weights.get(_stacked_name(f"{node.target}.bias")) if m.bias is not None else None
                    env[node] = grouped_linear(arg, counts, w, b)
                else:
                    env[node] = m(arg)
            elif node.op == "get_attr":
                env[node] = None  # an expert's weight / bias: read per expert by the F.linear below
            elif node.op == "call_function" and node.target is F.linear:
                x, weight, bias = _linear_args(node)
                b = weights[_stacked_name(bias.target)] if bias is not None else None
                env[node] = grouped_linear(load(x), counts, weights[_stacked_name(weight.target)], b)
            elif node.op == "call_function":
                env[node] = node.target(*load(node.args), **load(node.kwargs))
            elif node.op == "call_method":
                args = load(node.args)
                env[node] = getattr(args[0], node.target)(*args[1:], **load(node.kwargs))
            elif node.op == "output":
                out = _first(load(node.args[0]))
                if not torch.is_tensor(out) or out.shape[0] != x_ND.shape[0]:
                    raise ValueError("expert must return one tensor with a row per input row")
                return out
        raise AssertionError("fx graph without output")

    def _run_generic(self, x_ND, counts, weights):
        pieces = torch.split(x_ND, counts)
        outs = []
        for g, c in enumerate(counts):
            if c == 0:
                continue
            params = {name: weights[stacked][g] for stacked, name in self.param_names.items()}
            y = _first(torch.func.functional_call(self.template, params, (pieces[g],)))
            if not torch.is_tensor(y) or y.shape[0] != c:
                raise ValueError(f"expert must return one tensor with a row per input row, got "
                                 f"{type(y).__name__} {tuple(getattr(y, 'shape', ()))}")
            outs.append(y)
        if not outs:  # no rows anywhere: empty, but connected to the weights (zero grads) and to
            # x_ND: under ep a rank that received no rows must still run the dispatch's backward
            # all-to-all like its peers, and autograd only runs it when x_ND is in the graph.
            zero = sum(0.0 * w.sum() for w in weights.values())
            return x_ND * 0.0 + zero
        return torch.cat(outs) if len(outs) > 1 else outs[0]


def _first(out):
    """DeepSpeed's rule for experts that return a tuple (e.g. Megatron's (output, bias)): use out[0]."""
    return out[0] if isinstance(out, (tuple, list)) else out


def _warn_generic(kind: str) -> None:
    global _WARNED
    if not _WARNED:
        _WARNED = True
        warnings.warn(f"expert module {kind} is not a Linear/elementwise graph: Hecate runs it once per expert "
                      "with torch.func.functional_call (correct, shards like built-in experts, but slower "
                      "than the grouped path)", stacklevel=3)


class BiasedMLP(nn.Module):
    """One expert with biases (Megatron add_bias_linear): fc2(act(fc1 x + b1)) + b2. Gated
    (swiglu): fc1 maps D -> 2F, rows [gate; up] as Megatron lays them out, silu(gate) * up."""

    def __init__(self, hidden_size: int, ffn_hidden_size: int, activation: str = "gelu"):
        super().__init__()
        if activation not in ("gelu", "swiglu"):
            raise ValueError(f"activation must be 'gelu' or 'swiglu', got {activation!r}")
        self.gated = activation == "swiglu"
        self.fc1 = nn.Linear(hidden_size, (2 if self.gated else 1) * ffn_hidden_size)
        self.fc2 = nn.Linear(ffn_hidden_size, hidden_size)

    def forward(self, x):
        h = self.fc1(x)
        if self.gated:
            gate, up = h.chunk(2, dim=-1)
            return self.fc2(F.silu(gate) * up)
        return self.fc2(F.gelu(h))


def biased_mlp_experts(num_experts: int, hidden_size: int, ffn_hidden_size: int,
                       activation: str = "gelu") -> ModuleExperts:
    """MoEConfig.expert_bias: E BiasedMLP experts (grouped path), each initialized on its own
    like nn.Linear (not E copies of one draw)."""
    experts = ModuleExperts(BiasedMLP(hidden_size, ffn_hidden_size, activation), num_experts, warn=False)
    with torch.no_grad():
        for e in range(num_experts):
            fresh = BiasedMLP(hidden_size, ffn_hidden_size, activation)
            for name, p in fresh.named_parameters():
                getattr(experts, _stacked_name(name))[e].copy_(p)
    return experts
