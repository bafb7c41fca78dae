"""Sharded, atomic, reshardable checkpoints (safetensors only, never pickle).

Layout of a run directory (format version 2):
    RUN/step_00000100/dense.safetensors        the dense parameters, buffers and their AdamW state (rank 0)
    RUN/step_00000100/rank_00000.safetensors   one shard file per rank: its expert pieces
    RUN/step_00000100/manifest.json            written LAST by rank 0: the checkpoint exists iff it does
    RUN/latest                                 "step_00000100", replaced atomically after the manifest

Each shard holds that rank's expert piece of every MoE layer with its identity (expert ids,
or a flat range for fsdp) and the AdamW state of those rows. Version 1 (still loaded) had no
dense file: rank 0's shard held the dense entries. Loading reads only the files holding what
the rank needs (the dense file, and the shards with expert rows it will own), each once with
its tensors read straight into their own allocations (checksum verified before any is used),
and copies out of them, file by file, only what the current strategy keeps on this rank (its
rows or flat range, and their AdamW moments; never full [E, S] rows), so any strategy and
world size can load any checkpoint with memory per rank that shrinks with the number of
ranks. See docs/checkpoints.md.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import warnings
from collections import defaultdict

import safetensors.torch
import torch
import torch.distributed as dist
from torch import nn

from hecate.parallel import moe_layers
from hecate.parallel.chunks import is_expert_parameter
from hecate.train.checkpoint_io import (
    CheckpointError,
    atomic_write_bytes,
    atomic_write_json,
    digest_to_tensor,
    fsync_dir,
    read_verified_tensors,
    safetensors_metadata,
    sha256_hex,
    tensor_to_digest,
)
from hecate.train.checkpoint_layout import (
    Kept,
    KeptAssembly,
    full_layout,
    install_kept,
    kept_elements,
    kept_params_and_state,
    local_params_and_state,
    save_part,
)
from hecate.train.checkpoint_reads import (
    agree_on_failure,
    decode_holdings,
    encode_holdings,
    files_to_read,
    holds_from_manifest,
    peek_shard,
)

__all__ = ["save_checkpoint", "load_checkpoint", "export_safetensors", "import_safetensors",
           "resolve_checkpoint", "read_manifest", "verify_checkpoint", "CheckpointError", "FORMAT_VERSION"]

FORMAT = "hecate-checkpoint"
EXPORT_FORMAT = "hecate-export"
EXPORT_VERSION = 1
FORMAT_VERSION = 2  # 2: the dense entries in their own file (DENSE_FILE); 1: in rank 0's shard (still read)
READABLE_VERSIONS = (1, 2)
DENSE_FILE = "dense.safetensors"
MANIFEST = "manifest.json"
LATEST = "latest"
_STEP_RE = re.compile(r"^step_(\d{8})$")
_GROUP_SCALARS = ("lr", "initial_lr", "weight_decay", "betas", "eps")


# ---- small helpers ------------------------------------------------------------------------------
def _rank_world(strategy, topology) -> tuple[int, int]:
    topo = topology if topology is not None else getattr(strategy, "topology", None)
    if topo is not None:
        return topo.rank, topo.world_size
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _barrier(world: int) -> None:
    if world > 1:
        dist.barrier()


def _strategy_options(strategy) -> dict:
    if strategy.name == "ep":
        return {"ep_size": strategy.ep_size}
    if strategy.name == "fssdp":
        return strategy.options.to_dict()  # every FssdpOptions field, as the run was given them
    if strategy.name == "fssdp_hybrid":
        return {"shard_group_size": strategy.shard_group_size, **strategy.inner.options.to_dict()}
    return {}


def _layer_prefixes(model: nn.Module, layers) -> list[str]:
    names = {id(m): n for n, m in model.named_modules()}
    return [names[id(layer)] for layer in layers]


def _dense_entries(model: nn.Module, layers) -> dict[str, torch.Tensor]:
    """Every state_dict entry that is not an expert weight (dense params and persistent buffers)."""
    expert_keys = set()
    for prefix, layer in zip(_layer_prefixes(model, layers), layers):
        expert_keys |= {f"{prefix}.experts.{n}" for n in full_layout(layer).names}
        expert_keys |= {f"{prefix}.expert_chunks", f"{prefix}.expert_shard"}
    return {k: v for k, v in model.state_dict(keep_vars=True).items()
            if k not in expert_keys and not is_expert_parameter(v)}


def _json_ready(value, name: str):
    try:
        json.dumps(value)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{name} must be JSON-serializable (plain dicts, lists, numbers, strings): {e}") from e
    return value


def _step_dirs(path: str) -> list[tuple[int, str]]:
    if not os.path.isdir(path):
        return []
    out = [(int(m.group(1)), os.path.join(path, d)) for d in os.listdir(path) if (m := _STEP_RE.match(d))]
    return sorted(out)


def _complete(step_dir: str) -> bool:
    return os.path.isfile(os.path.join(step_dir, MANIFEST))


# ---- save -----------------------------------------------------------------------------------------
def save_checkpoint(path, model, strategy, engine, step: int, config_dict=None, topology=None, extra=None,
                    keep: int | None = None) -> str:
    """Write checkpoint `path/step_{step:08d}/` (collective: call on every rank) and return its directory.

    Rank 0 writes the dense file and every rank its shard, atomically; once the shards' digests
    are all-gathered rank 0 writes manifest.json (config, step, world size, strategy and
    options, fssdp placement, sha256 and size of the dense file and of every shard, what each
    shard holds), then replaces `path/latest`, then deletes all but the newest `keep` complete checkpoints
    (keep=None keeps all). `engine` may be None (weights only). A crash at any point leaves the
    previous checkpoint loadable.
    """
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise ValueError(f"step must be a non-negative int, got {step!r}")
    if keep is not None and (not isinstance(keep, int) or keep < 1):
        raise ValueError(f"keep must be None or an int >= 1 (checkpoints to keep), got {keep!r}")
    _json_ready(config_dict, "config_dict")
    _json_ready(extra, "extra")
    rank, world = _rank_world(strategy, topology)
    optimizer = engine.optimizer if engine is not None else None
    path = os.fspath(path)
    step_name = f"step_{step:08d}"
    step_dir = os.path.join(path, step_name)
    manifest_path = os.path.join(step_dir, MANIFEST)
    if rank == 0:
        os.makedirs(step_dir, exist_ok=True)
        fsync_dir(path)
        if os.path.exists(manifest_path):  # re-saving a step: the old manifest must not vouch for new shards
            os.remove(manifest_path)
            fsync_dir(step_dir)
    _barrier(world)

    layers = moe_layers(model)
    tensors, layer_infos = {}, {}
    for i, layer in enumerate(layers):
        part = save_part(strategy, layer, optimizer, rank)
        if part is not None:
            info, t = part
            layer_infos[str(i)] = info
            tensors.update({f"experts.{i}.{k}": v for k, v in t.items()})
    # Collective when the dense optimizer is sharded: every rank gathers, rank 0 writes.
    dense_state = engine.dense_optimizer_state() if engine is not None else {}
    dense_meta = None
    if rank == 0:  # the dense file first: a rank that needs no expert row of rank 0 never reads its shard
        dense, dense_infos = _dense_file_tensors(model, layers, dense_state, layer_infos, tensors)
        data = _serialize(dense, rank, dense_infos, content="dense")
        del dense
        atomic_write_bytes(os.path.join(step_dir, DENSE_FILE), data)
        dense_meta = {"file": DENSE_FILE, "sha256": sha256_hex(data), "bytes": len(data)}
        del data
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}  # NCCL runs keep them on GPU
    data = _serialize(tensors, rank, layer_infos, content="experts")
    fname = f"rank_{rank:05d}.safetensors"
    atomic_write_bytes(os.path.join(step_dir, fname), data)
    num_experts = [full_layout(layer).num_experts for layer in layers]
    holds = encode_holdings(layer_infos, tensors, num_experts, False)
    digests = _gather_digests(torch.cat([digest_to_tensor(sha256_hex(data), len(data)), holds]), world)

    if rank == 0:
        manifest = _manifest(model, strategy, optimizer, layers, step, world, config_dict, extra, topology)
        manifest["dense"] = dense_meta
        manifest["files"] = {}
        for r in range(world):
            sha, size = tensor_to_digest(digests[r][:5])
            manifest["files"][f"rank_{r:05d}.safetensors"] = {"rank": r, "sha256": sha, "bytes": size,
                                                               "holds": decode_holdings(digests[r][5:], num_experts)}
        atomic_write_json(manifest_path, manifest)
        atomic_write_bytes(os.path.join(path, LATEST), (step_name + "\n").encode())
        if keep is not None:
            _prune(path, keep, step_dir)
    _barrier(world)
    return step_dir


def _serialize(tensors: dict, rank: int, layer_infos: dict, content: str) -> bytes:
    return safetensors.torch.save(tensors, metadata={
        "hecate.format": FORMAT, "hecate.version": str(FORMAT_VERSION), "hecate.rank": str(rank),
        "hecate.content": content, "hecate.layers": json.dumps(layer_infos)})


def _dense_file_tensors(model, layers, dense_state, layer_infos: dict, expert_tensors: dict):
    """(tensors, layer infos) of the dense file: every non-expert state_dict entry (`dense.*`),
    the AdamW state of the dense parameters (`optim.*`), and per MoE layer rank 0's piece with no
    rows (ids / rows / moments of length 0, its `step`), so that a rank reading no expert shard
    of a layer still learns which moments it has and their step (as a piece of rank 0's shard
    told it when the dense entries were in that shard)."""
    tensors = {}
    for name, v in _dense_entries(model, layers).items():
        tensors[f"dense.{name}"] = v.detach().cpu().clone().contiguous()
        if isinstance(v, nn.Parameter) and v in dense_state:
            for k, st in dense_state[v].items():
                if torch.is_tensor(st):
                    tensors[f"optim.{name}.{k}"] = st.detach().cpu().clone().contiguous()
    infos = {}
    for key, info in layer_infos.items():
        infos[key] = {"kind": "flat", "start": 0, "numel": 0} if info["kind"] == "flat" else {"kind": "rows"}
        prefix = f"experts.{key}."
        for k, v in expert_tensors.items():
            if k.startswith(prefix):
                v = v.detach().cpu()
                tensors[k] = v.clone() if k == prefix + "step" else v.new_empty((0, *v.shape[1:]))
    return tensors, infos


def _gather_digests(mine: torch.Tensor, world: int) -> torch.Tensor:
    if world == 1:
        return mine.view(1, -1)
    from hecate.comm.all_to_all import comm_device

    dev = comm_device(None)
    out = torch.empty(world * mine.numel(), dtype=torch.int64, device=dev)
    dist.all_gather_into_tensor(out, mine.to(dev))
    return out.cpu().view(world, -1)


def _manifest(model, strategy, optimizer, layers, step, world, config_dict, extra, topology) -> dict:
    layer_entries = []
    for i, (prefix, layer) in enumerate(zip(_layer_prefixes(model, layers), layers)):
        layout = full_layout(layer)
        entry = {"index": i, "module": prefix, "num_experts": layout.num_experts,
                 "names": list(layout.names), "shapes": [list(s) for s in layout.shapes]}
        if strategy.name in ("fssdp", "fssdp_hybrid"):  # hybrid: shard group 0's (shard indices)
            st = layer.fssdp_state
            entry["owner_E"] = st.owner_E.tolist()
            entry["load_history"] = [h.tolist() for h in st.predictor._history]
        layer_entries.append(entry)
    topo = topology if topology is not None else getattr(strategy, "topology", None)
    manifest = {
        "format": FORMAT, "version": FORMAT_VERSION, "step": step, "world_size": world,
        "strategy": {"name": strategy.name, "options": _strategy_options(strategy)},
        "ranks_per_node": getattr(topo, "ranks_per_node", None),
        "config": config_dict, "extra": extra, "layers": layer_entries,
        "optimizer": None,
    }
    if strategy.name in ("fssdp", "fssdp_hybrid"):
        inner = strategy.inner if strategy.name == "fssdp_hybrid" else strategy
        manifest["fssdp"] = {"iteration": inner.iteration, "reshards": inner.reshards}
    if optimizer is not None:
        groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items() if k in _GROUP_SCALARS}
                  for g in optimizer.param_groups]
        manifest["optimizer"] = {"type": type(optimizer).__name__, "param_groups": groups,
                                 "has_state": len(optimizer.state) > 0}
    return manifest


def _prune(path: str, keep: int, current: str) -> None:
    """Delete all but the newest `keep` complete checkpoints, and incomplete ones older than them."""
    dirs = _step_dirs(path)
    complete = [d for _, d in dirs if _complete(d)]
    kept = set(complete[-keep:]) | {current}
    newest = dirs and max(s for s, d in dirs if d in kept)
    for s, d in dirs:
        if d not in kept and (d in complete or s < newest):
            shutil.rmtree(d, ignore_errors=True)
    fsync_dir(path)


# ---- load -----------------------------------------------------------------------------------------
def _read_latest(latest: str, run_dir: str) -> str | None:
    """The step directory `latest` names, or None (with a warning) when it is not a step name.
    A name that resolves outside the run's checkpoint directory is refused: a planted
    `../../other/checkpoints/step_N` must not be loaded without a word."""
    with open(latest, "rb") as f:
        raw = f.read(4096)
    try:
        name = raw.decode("utf-8").strip()
    except UnicodeDecodeError:
        warnings.warn(f"{latest} is not text (a step directory name is expected); falling back to the "
                      "newest complete checkpoint", stacklevel=3)
        return None
    root = os.path.realpath(run_dir)
    target = os.path.realpath(os.path.join(root, name))
    if os.path.dirname(target) != root or not _STEP_RE.match(os.path.basename(target)):
        raise CheckpointError(f"{latest} names {name[:200]!r}, which resolves to {target}: not a step_NNNNNNNN "
                              f"directory inside the run's checkpoint directory {root}; refusing to load it "
                              f"(write the name of a step directory of {root} into {latest}, or delete it)")
    return target


def _step_candidates(path: str) -> list[str]:
    """Step directories to try, best first: the one `latest` names, then the complete ones, newest first."""
    out = []
    latest = os.path.join(path, LATEST)
    if os.path.isfile(latest):
        target = _read_latest(latest, path)
        if target is not None:
            if _complete(target):
                out.append(target)
            else:
                warnings.warn(f"{latest} points at {target}, which has no {MANIFEST} (half-written); "
                              "falling back to the newest complete checkpoint", stacklevel=3)
    root = os.path.realpath(path)
    for _, d in reversed(_step_dirs(path)):
        if _complete(d) and os.path.dirname(os.path.realpath(d)) == root and os.path.realpath(d) not in out:
            out.append(os.path.realpath(d))
    return out


def resolve_checkpoint(path) -> str:
    """The step directory to load: `path` itself if it holds a manifest, else the run's `latest`,
    else (latest missing, not text, or pointing at an incomplete step) the newest complete step
    whose manifest reads. `latest` naming a directory outside `path` is an error."""
    path = os.fspath(path)
    if _complete(path):
        return path
    if not os.path.isdir(path):
        raise FileNotFoundError(f"checkpoint path {path} does not exist")
    problems = []
    for step_dir in _step_candidates(path):
        try:
            read_manifest(step_dir)
        except CheckpointError as e:
            problems.append(str(e))
            warnings.warn(f"{e}; trying an older checkpoint", stacklevel=2)
            continue
        return step_dir
    if problems:
        raise CheckpointError(f"no checkpoint under {path} has a readable manifest: {'; '.join(problems)}")
    if _STEP_RE.match(os.path.basename(os.path.normpath(path))):
        raise CheckpointError(f"{os.path.join(path, MANIFEST)} is missing: the checkpoint {path} "
                              "was never completed (the job stopped while writing it)")
    raise CheckpointError(f"no complete checkpoint (step_*/{MANIFEST}) under {path}")


def read_manifest(step_dir: str) -> dict:
    """Parse and check a checkpoint manifest; every problem is a CheckpointError naming the file."""
    mpath = os.path.join(step_dir, MANIFEST)
    try:
        with open(mpath, "rb") as f:
            manifest = json.loads(f.read().decode("utf-8"))
    except FileNotFoundError as e:
        raise CheckpointError(f"{mpath} is missing: the checkpoint was never completed") from e
    except UnicodeDecodeError as e:
        raise CheckpointError(f"{mpath} is not UTF-8 text (byte {e.start}): the manifest is corrupted") from None
    except (json.JSONDecodeError, RecursionError) as e:
        raise CheckpointError(f"{mpath} is not valid JSON: {e}") from None
    except OSError as e:
        raise CheckpointError(f"{mpath} cannot be read: {e}") from None
    if not isinstance(manifest, dict):
        raise CheckpointError(f"{mpath} is not a hecate checkpoint manifest (a JSON object is expected)")
    if manifest.get("format") != FORMAT:
        raise CheckpointError(f"{mpath} is not a hecate checkpoint manifest (format={manifest.get('format')!r})")
    if manifest.get("version") not in READABLE_VERSIONS:
        raise CheckpointError(f"{mpath} has format version {manifest.get('version')}, this hecate reads "
                              f"versions {', '.join(map(str, READABLE_VERSIONS))}")
    _check_manifest_fields(manifest, mpath)
    return manifest


def _check_manifest_fields(manifest: dict, mpath: str) -> None:
    """The keys load_checkpoint relies on, with their types: a damaged manifest is named, not a KeyError."""
    def bad(key: str, want: str):
        raise CheckpointError(f"{mpath}: key {key!r} is missing or not {want}; the manifest is damaged "
                              "(load an earlier step)")

    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        bad("files", "a non-empty mapping of shard file names")
    for fname, meta in files.items():
        if not re.fullmatch(r"rank_\d{5}\.safetensors", fname):
            bad(f"files.{fname[:80]}", "a rank_NNNNN.safetensors name")
        if not isinstance(meta, dict) or not isinstance(meta.get("sha256"), str) \
                or not isinstance(meta.get("bytes"), int) or isinstance(meta.get("bytes"), bool):
            bad(f"files.{fname}", "a mapping with sha256 (string) and bytes (int)")
    dense = manifest.get("dense")
    if manifest["version"] >= 2 and (not isinstance(dense, dict) or dense.get("file") != DENSE_FILE
                                     or not isinstance(dense.get("sha256"), str)
                                     or not isinstance(dense.get("bytes"), int) or isinstance(dense.get("bytes"), bool)):
        bad("dense", f"a mapping with file ({DENSE_FILE!r}), sha256 (string) and bytes (int)")
    step = manifest.get("step")
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        bad("step", "a non-negative int")
    if not isinstance(manifest.get("world_size"), int) or manifest["world_size"] < 1:
        bad("world_size", "a positive int")
    strategy = manifest.get("strategy")
    if not isinstance(strategy, dict) or not isinstance(strategy.get("name"), str):
        bad("strategy", "a mapping with a name")
    layers = manifest.get("layers")
    if not isinstance(layers, list):
        bad("layers", "a list")
    for i, entry in enumerate(layers):
        if not isinstance(entry, dict) or not isinstance(entry.get("names"), list) \
                or not isinstance(entry.get("shapes"), list) or not isinstance(entry.get("num_experts"), int):
            bad(f"layers[{i}]", "a mapping with names, shapes and num_experts")
    if manifest.get("optimizer") is not None and not isinstance(manifest["optimizer"], dict):
        bad("optimizer", "a mapping or null")


def _listed_files(manifest: dict) -> dict[str, dict]:
    """Every file the manifest lists with its sha256 and bytes: the dense file (version 2) first,
    then the rank shards."""
    out = {DENSE_FILE: manifest["dense"]} if manifest.get("version", 1) >= 2 else {}
    out.update(sorted(manifest["files"].items()))
    return out


def verify_checkpoint(path) -> int:
    """Resolve the checkpoint `path` would load, read every file it lists (the dense file and
    every shard) and check size, sha256 and safetensors header (no tensors are built). Returns its
    step; raises CheckpointError naming the file."""
    step_dir = resolve_checkpoint(path)
    manifest = read_manifest(step_dir)
    for fname, meta in _listed_files(manifest).items():
        fpath = os.path.join(step_dir, fname)
        read_verified_tensors(fpath, meta["sha256"], meta["bytes"], materialize=False)
    return int(manifest["step"])


def load_checkpoint(path, model, strategy, engine=None, topology=None) -> int:
    """Load a checkpoint into `model` under `strategy` (collective) and return its step.

    `path` is a run directory (its `latest`, or the newest complete step) or a step directory.
    Each rank reads whole, and checks against the manifest's size and sha256, only the files
    holding what it needs (as the manifest records it, or older checkpoints' headers): the
    dense file (version 1: rank 0's shard) and the shards with the expert elements it owns
    under `strategy` (see checkpoint_reads).
    A missing, truncated or corrupted file that a rank needs raises CheckpointError naming the
    file on every rank (verify_checkpoint checks every file in full). Works across
    strategies and world sizes; with `engine`, the AdamW state is restored too (resliced for
    the new layout). Under fssdp with the saved world size, the saved placement is restored.
    """
    step_dir = resolve_checkpoint(path)
    try:
        return _load(step_dir, model, strategy, engine, topology)
    except (KeyError, IndexError, AttributeError, TypeError) as e:
        # read_manifest checked the keys every load needs; a strategy-specific key that is missing
        # or malformed still ends here, named, rather than as a bare KeyError.
        raise CheckpointError(f"{os.path.join(step_dir, MANIFEST)} does not fit its shards or this model "
                              f"({type(e).__name__}: {e}); load an earlier step") from e


def _load(step_dir, model, strategy, engine, topology) -> int:
    manifest = read_manifest(step_dir)
    rank, world = _rank_world(strategy, topology)
    optimizer = engine.optimizer if engine is not None else None
    layers = moe_layers(model)
    saved_layers = manifest["layers"]
    if len(saved_layers) != len(layers):
        raise ValueError(f"checkpoint {step_dir} has {len(saved_layers)} MoE layers, the model has "
                         f"{len(layers)}; build the model from the checkpoint's config")
    layouts = [full_layout(layer) for layer in layers]
    for i, (layout, entry) in enumerate(zip(layouts, saved_layers)):
        _check_layer(i, entry, layout)

    # What each shard holds: from the manifest, or (older checkpoints) every shard's header. A rank
    # reads whole, and verifies, only the files it needs (hecate.train.checkpoint_reads).
    mpath = os.path.join(step_dir, MANIFEST)
    listed = _listed_files(manifest)  # the dense file (version 2) and every shard
    holds = holds_from_manifest(manifest, mpath, separate_dense=DENSE_FILE in listed) or \
        [peek_shard(os.path.join(step_dir, f), f, manifest["files"][f]["bytes"]) for f in sorted(manifest["files"])]
    # A strategy without a topology (local) may be loaded on one rank of a larger job: no collective.
    distributed = topology is not None or getattr(strategy, "topology", None) is not None
    agree_world = world if distributed else 1

    def read(fname: str) -> tuple[dict, dict]:
        """(layer infos, {name: tensor}) of one verified file, read once: each tensor's bytes go
        straight into its own allocation (checkpoint_io.read_verified_tensors)."""
        fpath = os.path.join(step_dir, fname)
        meta = listed[fname]
        metadata, tensors = _read_shard(fpath, meta["sha256"], meta["bytes"])
        try:
            infos = json.loads(metadata.get("hecate.layers", "{}"))
            if not isinstance(infos, dict) or not all(isinstance(v, dict) for v in infos.values()):
                raise ValueError("not a mapping of layer index to piece")
        except ValueError as e:
            raise CheckpointError(f"{fpath}: its hecate.layers metadata is malformed ({e}); load an earlier step") from e
        return infos, tensors

    # Every rank reads the dense entries: the dense file (version 2; older checkpoints: rank 0's
    # shard), and, from an older manifest, any shard whose header did not parse. They agree on
    # failure before the collectives below (a rank whose read failed joins none of them).
    dense_tensors: dict[str, torch.Tensor] = {}
    pending: dict[str, tuple[dict, dict]] = {}  # verified files read here whose expert pieces are not used yet
    first = ([DENSE_FILE] if DENSE_FILE in listed else []) + [h.fname for h in holds if h.dense or not h.known]
    error, current = None, None
    try:
        for fname in first:
            current = fname
            infos, t = read(fname)
            for k in [k for k in t if k.startswith(("dense.", "optim."))]:
                dense_tensors[k] = t.pop(k)
            pending[fname] = (infos, t)
            del t
        current = None
    except Exception as e:  # noqa: BLE001 - re-raised by agree_on_failure, after the other ranks hear of it
        error = e
    agree_on_failure(error, current, list(listed), agree_world, step_dir)
    _load_dense(model, layers, dense_tensors, step_dir)

    saved = manifest["strategy"]["name"]
    if strategy.name == "fssdp" and saved == "fssdp":
        _restore_fssdp(strategy, layers, saved_layers, manifest, world, optimizer)
    if strategy.name == "fssdp_hybrid" and saved == "fssdp_hybrid":
        _restore_hybrid(strategy, layers, saved_layers, manifest, world)

    # The owners are final now: what this rank keeps of each layer (a strategy this module does
    # not know: every row, which its load_experts slices). One shard at a time is read, its kept
    # elements copied into the rank's buffers and its bytes freed before the next is read.
    sizes = {i: (layout.num_experts, layout.chunk_numel) for i, layout in enumerate(layouts)}
    kept = [kept_elements(strategy, layer, rank) for layer in layers]
    targets = [k if k is not None else Kept(torch.arange(layout.num_experts)) for k, layout in zip(kept, layouts)]
    need = {i: target.intervals(*sizes[i]) for i, target in enumerate(targets)}
    assemblies = [KeptAssembly(layout, i, target) for i, (layout, target) in enumerate(zip(layouts, targets))]
    results: list = []
    error, current = None, None

    def add_pieces(fname: str, infos: dict, t: dict) -> None:
        # Every verified piece a rank read, needed or not: the dense file (or rank 0's shard) has a
        # piece of every layer, which gives a rank that keeps none of its rows the moments and step.
        for key, piece in infos.items():
            if key.isdigit() and int(key) < len(assemblies):
                prefix = f"experts.{key}."
                # popped: each tensor is freed as soon as its kept elements are copied out
                assemblies[int(key)].add(fname, piece, {k[len(prefix):]: t.pop(k) for k in list(t)
                                                        if k.startswith(prefix)})

    try:
        for fname in list(pending):
            current = fname
            infos, t = pending.pop(fname)
            add_pieces(fname, infos, t)
            del t
        for fname in files_to_read(holds, need, sizes, dense=False):
            if fname not in first:
                current = fname
                infos, t = read(fname)
                add_pieces(fname, infos, t)
                del t
        current = None
        results = [assembly.finish() for assembly in assemblies]
    except Exception as e:  # noqa: BLE001 - re-raised by agree_on_failure, after the other ranks hear of it
        error = e
    pending.clear()
    agree_on_failure(error, current, list(listed), agree_world, step_dir)

    if optimizer is not None:
        optimizer.state = defaultdict(dict)  # stale state from before the load must not survive
    restore_optim = optimizer is not None and bool((manifest.get("optimizer") or {}).get("has_state"))
    if optimizer is not None and manifest.get("optimizer") is None:  # saved with engine=None
        warnings.warn(f"{step_dir} holds weights only (no optimizer state, e.g. written by `hecate prune`): "
                      f"training continues from step {manifest['step']} with a fresh optimizer", RuntimeWarning,
                      stacklevel=3)
    for i, (layer, layout) in enumerate(zip(layers, layouts)):
        rows, state, step_t = results[i]
        results[i] = None
        if kept[i] is not None:
            # Only the rows / range this rank keeps, and their moments: memory per rank shrinks
            # with the number of ranks (the buffers are this load's own: no copy into the optimizer).
            install_kept(strategy, layer, kept[i], rows)
            pairs = kept_params_and_state(strategy, layer, state) if restore_optim and state else []
        else:
            strategy.load_experts(layer, layout.unflatten(rows))
            pairs = local_params_and_state(strategy, layer, state, rank, world) if restore_optim and state else []
        del rows
        if restore_optim and state and step_t is not None:
            for p, st in pairs:
                optimizer.state[p] = {"step": optimizer_step_tensor(step_t, p, optimizer),
                                      **{k: _owned(v.to(device=p.device, dtype=p.dtype), v) for k, v in st.items()}}
        del state, pairs
    if restore_optim:
        _restore_dense_optimizer(model, layers, engine, dense_tensors, manifest)
    return int(manifest["step"])


def _owned(t: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    """`t` (src moved with .to) as a tensor of its own: copied only when .to returned src itself
    and src is a view (of full state, or a name's columns of a kept buffer)."""
    return t.clone(memory_format=torch.contiguous_format) if t is src and t._base is not None else t


def _read_shard(path: str, sha256: str, size: int) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """(metadata, tensors) of one whole checkpoint file (a shard or the dense file), size and
    sha256 checked (the one place a load reads a file; tests and benchmarks count its calls to
    see which files each rank reads)."""
    return read_verified_tensors(path, sha256, size)


def _check_layer(i: int, entry: dict, layout) -> None:
    if entry["names"] != list(layout.names) or [tuple(s) for s in entry["shapes"]] != list(layout.shapes) \
            or entry["num_experts"] != layout.num_experts:
        raise ValueError(f"MoE layer {i} ({entry.get('module')}): checkpoint experts {entry['num_experts']} x "
                         f"{dict(zip(entry['names'], entry['shapes']))} do not match the model's "
                         f"{layout.num_experts} x {dict(zip(layout.names, layout.shapes))}; build the "
                         "model from the checkpoint's config")


def _load_dense(model, layers, tensors: dict, step_dir: str) -> None:
    entries = _dense_entries(model, layers)
    saved = {k[len("dense."):]: v for k, v in tensors.items() if k.startswith("dense.")}
    missing = sorted(set(entries) - set(saved))
    unexpected = sorted(set(saved) - set(entries))
    if missing or unexpected:
        raise ValueError(f"checkpoint {step_dir} does not fit the model: missing {missing[:8]}, "
                         f"unexpected {unexpected[:8]}; build the model from the checkpoint's config")
    with torch.no_grad():
        for k, v in entries.items():
            if tuple(saved[k].shape) != tuple(v.shape):
                raise ValueError(f"checkpoint {step_dir}: {k} has shape {tuple(saved[k].shape)}, "
                                 f"the model has {tuple(v.shape)}")
            v.copy_(saved[k])


def _restore_fssdp(strategy, layers, saved_layers, manifest, world, optimizer) -> None:
    """Same world size: restore the saved owners (re-placed with the optimizer); any size:
    restore the load predictor's history (global counts do not depend on W) and the iteration."""
    if manifest["world_size"] == world:
        owner_LE = torch.tensor([e["owner_E"] for e in saved_layers], dtype=torch.int64)
        strategy.reshard(layers, optimizer, owner_LE=owner_LE)
    for layer, entry in zip(layers, saved_layers):
        predictor = layer.fssdp_state.predictor
        predictor.reset()
        if entry["num_experts"] == predictor.num_experts:
            for counts in entry.get("load_history", [])[-predictor.window:]:
                predictor.update(torch.tensor(counts, dtype=torch.float64))
    info = manifest.get("fssdp", {})
    strategy.iteration = int(info.get("iteration", 0))
    strategy.reshards = int(info.get("reshards", 0))


def _restore_hybrid(strategy, layers, saved_layers, manifest, world) -> None:
    """fssdp_hybrid never re-places owners (the same fixed placement at the same G), so only the
    load predictor and the iteration come back. The manifest holds shard group 0's load history;
    every group restarts from it (a group's history only chooses its replicas, never the math)."""
    saved_G = manifest["strategy"].get("options", {}).get("shard_group_size")
    inner = strategy.inner
    if manifest["world_size"] == world and saved_G == strategy.shard_group_size:
        for layer, entry in zip(layers, saved_layers):
            if entry.get("owner_E") != layer.fssdp_state.owner_E.tolist():
                raise CheckpointError(f"fssdp_hybrid: the checkpoint's owners of MoE layer {entry['index']} "
                                      f"{entry.get('owner_E')} differ from this run's fixed placement "
                                      f"{layer.fssdp_state.owner_E.tolist()}")
            predictor = layer.fssdp_state.predictor
            predictor.reset()
            for counts in entry.get("load_history", [])[-predictor.window:]:
                predictor.update(torch.tensor(counts, dtype=torch.float64))
    info = manifest.get("fssdp", {})
    inner.iteration = int(info.get("iteration", 0))


def optimizer_step_tensor(step_t: torch.Tensor, p: torch.Tensor, optimizer) -> torch.Tensor:
    """AdamW's `step` as torch keeps it for `p`: fp32 on the parameter's device for fused and
    capturable AdamW (their kernels read it there; fused is the default), fp32 on the host
    otherwise (as torch.optim.Optimizer.load_state_dict places it)."""
    groups = [g for g in optimizer.param_groups if any(q is p for q in g["params"])]
    group = groups[0] if groups else optimizer.param_groups[0]  # a sharded dense parameter
    on_device = bool(group.get("fused")) or bool(group.get("capturable"))
    return step_t.detach().to(device=p.device if on_device else "cpu", dtype=torch.float32).clone()


def _restore_dense_optimizer(model, layers, engine, tensors, manifest) -> None:
    optimizer, states = engine.optimizer, {}
    for name, v in _dense_entries(model, layers).items():
        if not isinstance(v, nn.Parameter):
            continue
        prefix = f"optim.{name}."
        st = {k[len(prefix):]: t for k, t in tensors.items() if k.startswith(prefix)}
        if st:  # "step" first, then sorted: the same key order on every rank and as AdamW's own
            keys = sorted(st, key=lambda k: (k != "step", k))
            states[v] = {k: (optimizer_step_tensor(st[k], v, optimizer) if k == "step"
                             else st[k].to(device=v.device, dtype=v.dtype).clone())
                         for k in keys}
    engine.load_dense_optimizer_state(states)  # into the rank's shard when sharded
    groups = manifest["optimizer"].get("param_groups", [])
    if len(groups) == len(optimizer.param_groups):
        for g, saved in zip(optimizer.param_groups, groups):
            for k, val in saved.items():
                g[k] = tuple(val) if k == "betas" else val


# ---- consolidated export / import -------------------------------------------------------------
def export_safetensors(path_out, model, strategy, topology=None) -> None:
    """Write the full model, in plain single-process names (`blocks.1.ffn.experts.w1_EFD`), to one
    safetensors file (collective: every rank gathers the experts, rank 0 writes atomically)."""
    rank, world = _rank_world(strategy, topology)
    layers = moe_layers(model)
    fulls = [strategy.gather_experts(layer) for layer in layers]
    if rank == 0:
        tensors = {k: v.detach().cpu().clone().contiguous() for k, v in _dense_entries(model, layers).items()}
        for prefix, layer, full in zip(_layer_prefixes(model, layers), layers, fulls):
            for n in full_layout(layer).names:
                tensors[f"{prefix}.experts.{n}"] = full[n].detach().cpu().contiguous()
        data = safetensors.torch.save(tensors, metadata={"hecate.format": EXPORT_FORMAT,
                                                         "hecate.version": str(EXPORT_VERSION)})
        parent = os.path.dirname(os.path.abspath(os.fspath(path_out)))
        os.makedirs(parent, exist_ok=True)
        atomic_write_bytes(os.fspath(path_out), data)
    _barrier(world)


def import_safetensors(path_in, model, strategy) -> None:
    """Load a consolidated file (from export_safetensors, or a `local` model's state_dict saved
    with safetensors) into `model` under any strategy (collective for sharded strategies only
    in that every rank must call it)."""
    path_in = os.fspath(path_in)
    if not os.path.isfile(path_in):
        raise FileNotFoundError(f"path_in={path_in} does not exist")
    with open(path_in, "rb") as f:
        data = f.read()
    safetensors_metadata(data, path_in)  # a readable error for files that are not safetensors
    tensors = safetensors.torch.load(data)
    layers = moe_layers(model)
    expert_keys = {}
    for prefix, layer in zip(_layer_prefixes(model, layers), layers):
        for n in full_layout(layer).names:
            expert_keys[f"{prefix}.experts.{n}"] = (layer, n)
    dense = {f"dense.{k}": v for k, v in tensors.items() if k not in expert_keys}
    missing = sorted(k for k in expert_keys if k not in tensors)
    if missing:
        raise ValueError(f"{path_in} lacks expert weights {missing[:8]}; it was exported from a different model")
    _load_dense(model, layers, dense, path_in)
    for i, layer in enumerate(layers):
        layout = full_layout(layer)
        prefix = _layer_prefixes(model, [layer])[0]
        full = {n: tensors[f"{prefix}.experts.{n}"] for n in layout.names}
        for n, shape in zip(layout.names, layout.shapes):
            want = (layout.num_experts, *shape)
            if tuple(full[n].shape) != want:
                raise ValueError(f"{path_in}: {prefix}.experts.{n} has shape {tuple(full[n].shape)}, "
                                 f"the model expects {want}")
        strategy.load_experts(layer, full)
