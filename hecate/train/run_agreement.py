"""Start-up check that every rank runs the same thing.

Ranks with different configs (top_k 2 here, 1 there) train silently divergent models or
die inside gloo with its own message. Each rank describes its run as flat `key -> value`
entries (resolved config, world layout, software versions; after the model is built, the
dense parameter shapes and every MoE layer's expert layout), all-gathers one 63-bit digest
of them, and only when the digests differ all-gathers the entries to name the keys and ranks.
"""
from __future__ import annotations

import json

import torch
import torch.distributed as dist

from hecate.comm.agreement import AgreementError, digest

# Keys that may differ between ranks without changing what is computed.
RANK_LOCAL_KEYS = ("config.data.cache_dir",)


def _flatten(value, prefix: str, out: dict) -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            _flatten(v, f"{prefix}.{k}" if prefix else str(k), out)
    else:
        out[prefix] = json.dumps(value, sort_keys=True, default=str)


def config_entries(cfg, world: int, ranks_per_node: int | None = None) -> dict[str, str]:
    """The resolved config (every key), world size, node layout and software versions."""
    out: dict[str, str] = {}
    _flatten(cfg.to_dict(), "config", out)
    for key in RANK_LOCAL_KEYS:
        out.pop(key, None)
    out["layout.world_size"] = str(world)
    out["layout.ranks_per_node"] = str(ranks_per_node)
    out["software.torch"] = torch.__version__
    try:
        from importlib.metadata import version

        out["software.hecate"] = version("hecate")
    except Exception:  # noqa: BLE001 - not installed as a distribution (source checkout)
        pass
    return out


def model_entries(model, strategy) -> dict[str, str]:
    """Dense parameter shapes, every MoE layer's full expert layout, and the strategy."""
    from hecate.parallel import moe_layers
    from hecate.parallel.chunks import is_expert_parameter
    from hecate.train.checkpoint_layout import full_layout

    out = {"strategy.name": str(getattr(strategy, "name", type(strategy).__name__))}
    for name, p in model.named_parameters():
        if not is_expert_parameter(p):
            out[f"param.{name}"] = str(list(p.shape))
    for i, layer in enumerate(moe_layers(model)):
        layout = full_layout(layer)
        out[f"moe_layer.{i}"] = json.dumps({"experts": layout.num_experts, "names": list(layout.names),
                                            "shapes": [list(s) for s in layout.shapes],
                                            "top_k": layer.config.top_k})
    return out


def _gather_bytes(data: bytes, world: int) -> list[bytes]:
    """All-gather a byte string of any length from every rank (tensors only, nothing pickled)."""
    from hecate.comm.all_to_all import comm_device

    dev = comm_device(None)
    size = torch.tensor([len(data)], dtype=torch.int64, device=dev)
    sizes = [torch.zeros_like(size) for _ in range(world)]
    dist.all_gather(sizes, size)
    n = max(int(s) for s in sizes)
    mine = torch.zeros(n, dtype=torch.uint8)
    mine[:len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else mine[:0]
    outs = [torch.zeros(n, dtype=torch.uint8, device=dev) for _ in range(world)]
    dist.all_gather(outs, mine.to(dev))
    return [bytes(o[:int(s)].cpu().numpy().tobytes()) for o, s in zip(outs, sizes)]


def differences(per_rank: list[dict[str, str]]) -> dict[str, dict[int, str | None]]:
    """{key: {rank: value}} for every key whose value is not the same on all ranks."""
    keys = sorted(set().union(*per_rank))
    out = {}
    for k in keys:
        values = [entries.get(k) for entries in per_rank]
        if len(set(values)) > 1:
            out[k] = dict(enumerate(values))
    return out


def check_run_agreement(what: str, entries: dict[str, str], rank: int, world: int) -> None:
    """Collective: raise AgreementError on every rank unless all ranks pass equal `entries`."""
    if world == 1:
        return
    from hecate.comm.all_to_all import comm_device

    mine = torch.tensor([digest(json.dumps(entries, sort_keys=True))], dtype=torch.int64,
                        device=comm_device(None))
    hashes = [torch.zeros_like(mine) for _ in range(world)]
    dist.all_gather(hashes, mine)
    if len({int(h) for h in hashes}) == 1:
        return
    per_rank = [json.loads(b.decode()) for b in _gather_bytes(json.dumps(entries).encode(), world)]
    diff = differences(per_rank)
    groups: dict[str, list[int]] = {}
    for r, entries_r in enumerate(per_rank):
        groups.setdefault(json.dumps(entries_r, sort_keys=True), []).append(r)
    ordered = sorted(groups.values(), key=lambda rs: (-len(rs), rs[0]))
    majority, minority = ordered[0], sorted(r for rs in ordered[1:] for r in rs)
    shown = []
    for k, vals in list(diff.items())[:6]:
        per = ", ".join(f"rank {r}: {'absent' if v is None else v}" for r, v in vals.items())
        shown.append(f"{k} ({per})")
    more = f" and {len(diff) - 6} more keys" if len(diff) > 6 else ""
    raise AgreementError(f"ranks do not run the same {what}: ranks {minority} differ from ranks {majority} in "
                         f"{'; '.join(shown)}{more}; start every rank with the same config and code",
                         f"start-up {what}", minority, majority)
