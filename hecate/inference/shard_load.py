"""Load a run's checkpoint into a sharded model: each rank reads only its own expert rows.

Like `hecate.train.checkpoint.load_checkpoint`, which allocates and fills only the expert
rows (and moments) the rank keeps, no rank holds a layer's full [E, S] rows; here, for
distributed generation, not even the model's initial experts:

* the model is built with its routed-expert parameters on the meta device (a parameter
  registration hook swaps them as the expert modules create them), so no rank ever allocates
  or initializes all experts; the strategy then attaches to the meta layer and keeps the
  meta shape of its own slice (ep: E/W experts, fssdp: the owned chunk rows);
* what each shard file holds comes from the manifest (or, for an older one, from every
  shard's header and expert-id tensors, unverified; hecate.train.checkpoint_reads);
* only the file holding the dense entries (the checkpoint's dense file; in a format-version-1
  checkpoint, rank 0's shard) and the shards with rows of the experts this rank keeps are
  checked in full (sha256, streamed: constant memory) and opened with safetensors' lazy
  reader (safe_open); only those rows are read out of them: `get_slice(name)[a:b]` of a rows
  layout's [E_held, S] matrix, or of an fsdp flat layout's 1-D range (which may start and
  end mid-row); a rank that needs nothing from a shard never hashes it;
* the dense parameters and buffers come from the file that holds them.

Any strategy and world size may have written the checkpoint (rows or flat layouts, see
hecate.train.checkpoint_layout).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os

import torch
from safetensors import safe_open
from torch import nn
from torch.nn.modules.module import register_module_parameter_registration_hook

from hecate.moe.experts import GroupedExperts
from hecate.moe.module_experts import ModuleExperts
from hecate.parallel import moe_layers
from hecate.parallel.chunks import ChunkLayout, mark_expert
from hecate.train.checkpoint import (
    DENSE_FILE,
    _check_layer,
    _dense_entries,
    _listed_files,
    _load_dense,
    read_manifest,
    resolve_checkpoint,
)
from hecate.train.checkpoint_io import CheckpointError, check_sha256, open_sized
from hecate.train.checkpoint_layout import full_layout
from hecate.train.checkpoint_reads import (
    agree_on_failure,
    files_to_read,
    holds_from_manifest,
    peek_shard,
    rows_to_intervals,
)

# Routed-expert containers of MoELayer (hecate.moe.layer): their stacked [E, ...] parameters.
EXPERT_MODULES = (GroupedExperts, ModuleExperts)
SHARDED = ("ep", "fssdp")
GATHERED = ("dp", "local")


@contextlib.contextmanager
def experts_on_meta():
    """While active, every parameter an expert container registers is replaced by a meta
    tensor of its shape: the container's init then runs on meta (no memory, no random draw)."""
    def to_meta(module, name, param):
        if isinstance(module, EXPERT_MODULES) and param is not None and param.device.type != "meta":
            return nn.Parameter(torch.empty(param.shape, dtype=param.dtype, device="meta"),
                                requires_grad=param.requires_grad)
        return None

    handle = register_module_parameter_registration_hook(to_meta)
    try:
        yield
    finally:
        handle.remove()


class ShardFile:
    """One verified safetensors shard, read lazily with safetensors' own reader (safe_open): the
    header is parsed by the library, `slice(name)[a:b]` copies out elements / rows a..b only
    (`get_slice` reads the file's mapping, nothing else), `tensor(name)` a whole tensor."""

    def __init__(self, path: str, sha256: str, size: int):
        self.path = path
        self._stack = contextlib.ExitStack()
        with open_sized(path, size) as f:
            h = hashlib.sha256()
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
            check_sha256(path, h.hexdigest(), sha256)
            try:
                self._file = self._stack.enter_context(safe_open(path, framework="pt"))
            except Exception as e:  # noqa: BLE001 - safetensors' own parse errors: a bad file
                raise CheckpointError(f"{path} is not a valid safetensors file: {e}") from e
            # safe_open reopened the path: it must still be the file that was hashed (checkpoints
            # are replaced by rename, which gives the path a new inode).
            hashed, opened = os.fstat(f.fileno()), os.stat(path)
            if (hashed.st_dev, hashed.st_ino) != (opened.st_dev, opened.st_ino):
                self.close()
                raise CheckpointError(f"checkpoint file {path} was replaced while it was being loaded; "
                                      "load again once the writer is done")
        self.metadata = self._file.metadata() or {}

    def close(self) -> None:
        self._stack.close()

    def layers(self) -> dict:
        return json.loads(self.metadata.get("hecate.layers", "{}"))

    def names(self):
        return self._file.keys()

    def slice(self, name: str):
        """Tensor `name`, unread: index it with [a:b] (along its first dim) to read those rows."""
        return self._file.get_slice(name)

    def tensor(self, name: str) -> torch.Tensor:
        """Tensor `name`, read whole (a copy)."""
        return self._file.get_tensor(name)


def _runs(positions: list[int]) -> list[tuple[int, int]]:
    """Sorted positions as [start, stop) runs of consecutive ones (one read per run)."""
    runs: list[tuple[int, int]] = []
    for p in positions:
        if runs and runs[-1][1] == p:
            runs[-1] = (runs[-1][0], p + 1)
        else:
            runs.append((p, p + 1))
    return runs


def _open(step_dir: str, manifest: dict, names: list[str]) -> list[ShardFile]:
    files: list[ShardFile] = []
    listed = _listed_files(manifest)
    try:
        for fname in names:
            meta = listed[fname]
            files.append(ShardFile(os.path.join(step_dir, fname), meta["sha256"], meta["bytes"]))
    except BaseException:  # a bad file: close the ones already open, then report it
        for f in files:
            f.close()
        raise
    return files


def expert_rows(files: list[ShardFile], layer_index: int, layout: ChunkLayout, ids: torch.Tensor) -> torch.Tensor:
    """[len(ids), S] fp32 rows of experts `ids` of MoE layer `layer_index`, read from the shards
    that hold them (whole rows with ids, or flat [E*S] ranges)."""
    E, S = layout.num_experts, layout.chunk_numel
    ids = ids.to(torch.int64)
    out = torch.zeros(ids.numel(), S, dtype=torch.float32)
    seen = torch.zeros(ids.numel(), dtype=torch.bool)
    pos_of_E = torch.full((E,), -1, dtype=torch.int64)
    pos_of_E[ids] = torch.arange(ids.numel())
    key = str(layer_index)
    for f in files:
        info = f.layers().get(key)
        if info is None:
            continue
        prefix = f"experts.{layer_index}."
        if info["kind"] == "rows":
            held = f.tensor(prefix + "ids").to(torch.int64)
            if held.numel() and (int(held.min()) < 0 or int(held.max()) >= E):
                raise CheckpointError(f"{f.path}: MoE layer {layer_index} lists expert ids outside [0, {E})")
            pos = pos_of_E[held]
            take = (pos >= 0).nonzero().flatten()
            if take.numel():
                rows = f.slice(prefix + "rows")
                for a, b in _runs(take.tolist()):  # reads only these rows of the file
                    out[pos[a:b]] = rows[a:b].float()
                seen[pos[take]] = True
        elif info["kind"] == "flat":
            flat = f.slice(prefix + "flat")
            start, numel = int(info["start"]), int(info["numel"])
            for j, e in enumerate(ids.tolist()):
                lo, hi = max(e * S, start), min((e + 1) * S, start + numel, E * S)
                if lo < hi:
                    out[j, lo - e * S:hi - e * S] = flat[lo - start:hi - start].float()
            # a flat layout covers a row only when the pieces cover all of it: checked below
        else:
            raise CheckpointError(f"{f.path}: MoE layer {layer_index} has unknown layout {info['kind']!r}")
    kinds = {f.layers()[key]["kind"] for f in files if key in f.layers()}
    if len(kinds) > 1:
        raise CheckpointError(f"MoE layer {layer_index}: shards mix layouts {sorted(kinds)}")
    if kinds == {"flat"}:  # a kept row is there when the ranges cover all of it (no [E*S] mask)
        ranges = sorted((int(f.layers()[key]["start"]), int(f.layers()[key]["numel"])) for f in files
                        if key in f.layers())
        seen = torch.tensor([_covers(ranges, e * S, (e + 1) * S) for e in ids.tolist()], dtype=torch.bool)
    if not bool(seen.all()):
        missing = ids[~seen].tolist()
        raise CheckpointError(f"MoE layer {layer_index}: experts {missing} are in no shard file")
    return out


def _covers(ranges: list[tuple[int, int]], lo: int, hi: int) -> bool:
    """Whether (start, numel) ranges, sorted by start, cover every element of [lo, hi)."""
    at = lo
    for start, numel in ranges:
        if start <= at < start + numel:
            at = start + numel
    return at >= hi


def kept_expert_ids(strategy, layer) -> torch.Tensor:
    """The experts whose rows this rank keeps under `strategy` (after attach)."""
    E = layer.config.num_experts
    if strategy.name == "ep":
        first, local = layer.expert_slice
        return torch.arange(first, first + local)
    if strategy.name == "fssdp":
        return (layer.fssdp_state.owner_E == strategy.topology.rank).nonzero().flatten()
    if strategy.name in GATHERED:
        return torch.arange(E)
    raise ValueError(f"loading a sharded model under strategy {strategy.name!r} is not supported; "
                     f"use one of {SHARDED + GATHERED}")


def install_expert_rows(strategy, layer, rows_MS: torch.Tensor, device) -> None:
    """Give the layer's meta expert parameters these rows (the ones kept_expert_ids names), in
    the form the strategy keeps them: ep / dp / local stacked per name, fssdp one chunk matrix."""
    if strategy.name == "fssdp":
        layer.expert_chunks = mark_expert(nn.Parameter(rows_MS.to(device)))
        return
    layout = full_layout(layer)
    for n, t in layout.unflatten(rows_MS).items():
        p = mark_expert(nn.Parameter(t.contiguous().to(device)))
        setattr(layer.experts, n, p)


def _restore_fssdp_placement(strategy, layers, manifest, world: int) -> None:
    """Saved under fssdp at this world size: keep its owners (each rank then reads exactly the
    rows its own shard file holds) and the load predictor's history (it picks replicas)."""
    saved = manifest["layers"]
    same = manifest["strategy"]["name"] == "fssdp" and manifest["world_size"] == world
    for layer, entry in zip(layers, saved):
        st = layer.fssdp_state
        if same and "owner_E" in entry:
            owner_E = torch.tensor(entry["owner_E"], dtype=torch.int64)
            if owner_E.shape != st.owner_E.shape or int(owner_E.min()) < 0 or int(owner_E.max()) >= world:
                raise CheckpointError(f"MoE layer {entry.get('index')}: saved fssdp owners {entry['owner_E']} "
                                      f"do not fit {st.owner_E.numel()} experts on {world} ranks")
            st.owner_E = owner_E
        if manifest["strategy"]["name"] in ("fssdp", "fssdp_hybrid"):
            st.predictor.reset()
            if entry["num_experts"] == st.predictor.num_experts:
                for counts in entry.get("load_history", [])[-st.predictor.window:]:
                    st.predictor.update(torch.tensor(counts, dtype=torch.float64))


def load_sharded(ckpt_path, model: nn.Module, strategy, device) -> int:
    """Fill a model built under experts_on_meta() and parallelized with `strategy`: dense entries
    from the checkpoint, and this rank's expert rows only. Returns the checkpoint's step."""
    step_dir = resolve_checkpoint(ckpt_path)
    manifest = read_manifest(step_dir)
    layers = moe_layers(model)
    if len(manifest["layers"]) != len(layers):
        raise ValueError(f"checkpoint {step_dir} has {len(manifest['layers'])} MoE layers, the model has "
                         f"{len(layers)}; build the model from the checkpoint's config")
    for i, (layer, entry) in enumerate(zip(layers, manifest["layers"])):
        _check_layer(i, entry, full_layout(layer))
    world = getattr(getattr(strategy, "topology", None), "world_size", 1)
    if strategy.name == "fssdp":
        _restore_fssdp_placement(strategy, layers, manifest, world)
    # What each shard holds: from the manifest, or (older checkpoints) every shard's header; a
    # rank opens (hashing it whole) only the dense file (version 1: the shard with the dense
    # entries, rank 0's) and the shards with rows it keeps.
    names = list(_listed_files(manifest))  # the dense file (version 2) first, then the shards
    separate = DENSE_FILE in names
    holds = holds_from_manifest(manifest, os.path.join(step_dir, "manifest.json"), separate_dense=separate) or \
        [peek_shard(os.path.join(step_dir, f), f, manifest["files"][f]["bytes"]) for f in sorted(manifest["files"])]
    layouts = [full_layout(layer) for layer in layers]
    sizes = {i: (layout.num_experts, layout.chunk_numel) for i, layout in enumerate(layouts)}
    kept = [kept_expert_ids(strategy, layer) for layer in layers]
    need = {i: rows_to_intervals(ids, sizes[i][1]) for i, ids in enumerate(kept)}
    files: list[ShardFile] = []
    error, current, rows = None, None, []
    try:  # ranks open different files: they agree on a failure before anyone goes on
        for fname in ([DENSE_FILE] if separate else []) + files_to_read(holds, need, sizes):
            current = fname
            files += _open(step_dir, manifest, [fname])
        current = None
        shards = [f for f in files if os.path.basename(f.path) != DENSE_FILE]  # its pieces hold no rows
        rows = [expert_rows(shards, i, layouts[i], kept[i]) for i in range(len(layers))]
    except Exception as e:  # noqa: BLE001 - re-raised by agree_on_failure, after the other ranks hear of it
        error = e
        for f in files:
            f.close()
    try:
        agree_on_failure(error, current, names, world, step_dir)
        for layer, rows_MS in zip(layers, rows):
            install_expert_rows(strategy, layer, rows_MS, device)
        left = [n for n, p in model.named_parameters() if p.device.type == "meta"]
        if left:
            raise RuntimeError(f"parameters {left[:4]} are still on the meta device after loading; "
                               "they belong to an expert container this loader does not know")
        model.to(device)
        dense = {}
        for f in files:
            for name in f.names():
                if name.startswith("dense."):
                    dense[name] = f.tensor(name)
        _load_dense(model, layers, dense, step_dir)
    finally:
        for f in files:
            f.close()
    return int(manifest["step"])


def build_sharded_model(cfg, run_dir, strategy_name: str, topology, device):
    """(model, strategy, step): the run's model under `strategy_name` on this rank, holding the
    dense parameters and only the expert rows the strategy keeps here (collective: every rank)."""
    from pathlib import Path

    from hecate.parallel import build_strategy, parallelize
    from hecate.train import tasks

    with experts_on_meta():
        model = tasks.build_model(cfg)
    if strategy_name == "ep":
        strategy = build_strategy("ep", topology, ep_size=topology.world_size)
    elif strategy_name == "fssdp":
        strategy = build_strategy("fssdp", topology, options=cfg.parallel.fssdp)
    elif strategy_name == "dp":
        strategy = build_strategy("dp", topology)
    elif strategy_name == "local":
        strategy = build_strategy("local")
    else:
        raise ValueError(f"strategy {strategy_name!r} must be one of {SHARDED + GATHERED}")
    parallelize(model, strategy)
    step = load_sharded(Path(run_dir) / "checkpoints", model, strategy, device)
    return model.eval(), strategy, step
