"""Each rank reads (and sha256-checks) only the checkpoint files holding what it needs: the dense
file (dense entries) and the shards with expert elements it owns under its new layout, to the
element for fsdp ranges that end mid-row; from a format-version-1 checkpoint (dense entries in
rank 0's shard), rank 0's shard instead of the dense file. The loaded state still equals the
saved one, a corrupted shard is caught by the rank that needs it (and its peers stop too), a
corrupted dense file by every rank, and a shard nobody needs by verify_checkpoint. Worker
functions run on every rank."""
import json
import os
import re
import shutil

import pytest
import safetensors
import safetensors.torch
import torch

from hecate.comm.topology import Topology
from hecate.models.transformer import MoETransformer
from hecate.parallel import build_strategy, moe_layers, parallelize
from hecate.testing import run_distributed
from hecate.train.checkpoint import (
    DENSE_FILE,
    CheckpointError,
    _dense_entries,
    load_checkpoint,
    read_manifest,
    save_checkpoint,
    verify_checkpoint,
)
from hecate.train.checkpoint_layout import assemble, check_covered, full_layout
from hecate.train.checkpoint_reads import peek_shard
from hecate.train.engine import Engine
from tests.test_checkpoint import FSSDP, _fixed_loss, _train
from tests.training_cases import tiny_config

STEP = "step_00000001"
E_FLAT = 6  # the fsdp checkpoint: 6 rows over 4 ranks, so every saved range ends mid-row


def _build(strategy, options, seed, num_experts=8, meta=False):
    torch.manual_seed(seed)
    topo = Topology()
    strat = build_strategy(strategy, topo, **options)
    if meta:
        from hecate.inference.shard_load import experts_on_meta

        with experts_on_meta():
            model = MoETransformer(tiny_config(num_experts=num_experts))
        return parallelize(model, strat), strat
    model = parallelize(MoETransformer(tiny_config(num_experts=num_experts)), strat)
    return model, strat, Engine(model, strat, topo, lr=3e-3, weight_decay=0.01, eps=1e-6), topo


def _kept(strat, model, rank):
    """Per MoE layer, the [lo, hi) element ranges of the flat [E*S] buffer this rank keeps,
    read off the strategy's own state (the oracle the loader's choice is checked against)."""
    out = []
    for layer in moe_layers(model):
        layout = full_layout(layer)
        E, S = layout.num_experts, layout.chunk_numel
        if strat.name == "fssdp":
            out.append([(e * S, (e + 1) * S) for e in (layer.fssdp_state.owner_E == rank).nonzero().flatten().tolist()])
        elif strat.name == "ep":
            first, local = layer.expert_slice
            out.append([(first * S, (first + local) * S)])
        elif strat.name == "fsdp":
            n = layer.expert_shard.numel()
            out.append([(rank * n, min((rank + 1) * n, E * S))])
        else:
            out.append([(0, E * S)])
    return out


class _Spy:
    """Records the files a load reads whole (and their bytes) and the header bytes it peeks."""

    def __init__(self):
        import hecate.train.checkpoint as ck

        self.ck, self.real_read, self.real_peek = ck, ck._read_shard, ck.peek_shard
        self.read, self.read_bytes, self.peek_bytes = [], 0, 0

    def __enter__(self):
        def read(path, sha256, size):
            data = self.real_read(path, sha256, size)
            self.read.append(os.path.basename(path))
            self.read_bytes += os.path.getsize(path)
            return data

        def peek(*a):
            h = self.real_peek(*a)
            self.peek_bytes += h.peek_bytes
            return h

        self.ck._read_shard, self.ck.peek_shard = read, peek
        return self

    def __exit__(self, *exc):
        self.ck._read_shard, self.ck.peek_shard = self.real_read, self.real_peek


# ---- workers --------------------------------------------------------------------------------------
def save_both(rank, world, fssdp_dir, fsdp_dir, dp_dir):
    """One trained step each: fssdp (8 experts), fsdp (6 experts: ranges end mid-row), dp."""
    model, strat, engine, _ = _build("fssdp", FSSDP, seed=0)
    _train(model, engine, rank, world, 1)
    save_checkpoint(fssdp_dir, model, strat, engine, 1)
    losses = [_fixed_loss(model)]
    for name, d, n in (("fsdp", fsdp_dir, E_FLAT), ("dp", dp_dir, 8)):
        model, strat, engine, _ = _build(name, {}, seed=1, num_experts=n)
        _train(model, engine, rank, world, 1)
        save_checkpoint(d, model, strat, engine, 1)
        losses.append(_fixed_loss(model))
    return losses


def load_record(rank, world, loads):
    """loads: [(src, dst, strategy, options, num_experts)]: load each (with the optimizer),
    record the files read, and save again to dst (to compare every row and moment)."""
    out = []
    for src, dst, name, options, n in loads:
        model, strat, engine, _ = _build(name, options, seed=7, num_experts=n)
        with _Spy() as spy:
            load_checkpoint(src, model, strat, engine)
        save_checkpoint(dst, model, strat, engine, 1)
        out.append({"read": spy.read, "kept": _kept(strat, model, rank), "loss": _fixed_loss(model),
                    "read_bytes": spy.read_bytes, "peek_bytes": spy.peek_bytes})
    return out


def load_failure(rank, world, src, name, options):
    """A load that must fail on every rank: each rank's error message and the files it read."""
    model, strat, engine, _ = _build(name, options, seed=7)
    with _Spy() as spy:
        try:
            load_checkpoint(src, model, strat, engine)
        except CheckpointError as e:
            return {"error": str(e), "read": spy.read}
    return {"error": None, "read": spy.read}


def sharded_generation_record(rank, world, src, name, options):
    """The inference loader (experts built on meta): the shard files it opens, and its rows."""
    from hecate.inference import shard_load

    opened, real = [], shard_load.ShardFile

    class Recording(real):
        def __init__(self, path, *a):
            opened.append(os.path.basename(path))
            super().__init__(path, *a)

    model, strat = _build(name, options, seed=7, meta=True)
    shard_load.ShardFile = Recording
    try:
        shard_load.load_sharded(src, model, strat, torch.device("cpu"))
    finally:
        shard_load.ShardFile = real
    ids = [shard_load.kept_expert_ids(strat, layer) for layer in moe_layers(model)]
    rows = [layer.expert_chunks.detach() if name == "fssdp" else
            full_layout(layer).flatten({n: getattr(layer.experts, n) for n in full_layout(layer).names}).detach()
            for layer in moe_layers(model)]
    S = [full_layout(layer).chunk_numel for layer in moe_layers(model)]
    return {"read": opened, "ids": [i.tolist() for i in ids], "rows": rows,
            "kept": [[(e * s, (e + 1) * s) for e in i.tolist()] for i, s in zip(ids, S)],
            "dense": {k: v.detach() for k, v in _dense_entries(model, moe_layers(model)).items()}}


# ---- the oracle -----------------------------------------------------------------------------------
def _holdings(step_dir):
    """{file: (has dense entries, {layer: [element ranges]})} from the files' verified contents."""
    out = {}
    model = MoETransformer(tiny_config(num_experts=read_manifest(step_dir)["layers"][0]["num_experts"]))
    S = [full_layout(layer).chunk_numel for layer in moe_layers(model)]
    for fname in read_manifest(step_dir)["files"]:
        path = os.path.join(step_dir, fname)
        t = safetensors.torch.load_file(path)
        with safetensors.safe_open(path, "pt") as f:
            layers = json.loads(f.metadata()["hecate.layers"])
        ranges = {}
        for key, info in layers.items():
            i = int(key)
            if info["kind"] == "flat":
                ranges[i] = [(info["start"], info["start"] + info["numel"])]
            else:
                ranges[i] = [(e * S[i], (e + 1) * S[i]) for e in t[f"experts.{i}.ids"].tolist()]
        out[fname] = (any(k.startswith("dense.") for k in t), ranges)
    return out


def _expected(holdings, kept, step_dir):
    """The files a rank keeping `kept` (per layer, element ranges) must read: the dense file (or,
    in a version-1 checkpoint, the shard with the dense entries), and the shards holding an
    element of what it keeps."""
    def hit(a, b):
        return any(lo < hi2 and lo2 < hi for lo, hi in a for lo2, hi2 in b)

    dense_file = [DENSE_FILE] if os.path.isfile(os.path.join(step_dir, DENSE_FILE)) else []
    return sorted(dense_file + [f for f, (dense, ranges) in holdings.items()
                                if dense or any(hit(r, kept[i]) for i, r in ranges.items())])


def _full_state(step_dir):
    """{layer: (rows, state, step)} assembled from every file of a checkpoint (the model's
    expert count taken from its manifest)."""
    manifest = read_manifest(step_dir)
    model = MoETransformer(tiny_config(num_experts=manifest["layers"][0]["num_experts"]))
    files = {}
    for fname in manifest["files"]:
        with safetensors.safe_open(os.path.join(step_dir, fname), "pt") as f:
            files[fname] = json.loads(f.metadata()["hecate.layers"])
        files[fname] = (files[fname], safetensors.torch.load_file(os.path.join(step_dir, fname)))
    out = {}
    for i, layer in enumerate(moe_layers(model)):
        parts = [(f, info[str(i)], {k[len(f"experts.{i}."):]: v for k, v in t.items() if k.startswith(f"experts.{i}.")})
                 for f, (info, t) in files.items() if str(i) in info]
        out[i] = assemble(parts, full_layout(layer), i)
    return out


def _same_state(src, dst):
    """Every expert row and AdamW moment, and every dense entry, equal across two checkpoints."""
    a, b = _full_state(os.path.join(src, STEP)), _full_state(os.path.join(dst, STEP))
    for i in a:
        torch.testing.assert_close(b[i][0], a[i][0], rtol=0, atol=0)
        assert set(a[i][1]) == set(b[i][1]) == {"exp_avg", "exp_avg_sq"}
        for k in a[i][1]:
            torch.testing.assert_close(b[i][1][k], a[i][1][k], rtol=0, atol=0)
    da, db = _dense_tensors(os.path.join(src, STEP)), _dense_tensors(os.path.join(dst, STEP))
    dense = [k for k in da if k.startswith(("dense.", "optim."))]
    assert dense and all(torch.equal(da[k], db[k]) for k in dense)


def _dense_tensors(step_dir):
    """The dense file's tensors, or (format version 1) rank 0's shard's."""
    dense = os.path.join(step_dir, DENSE_FILE)
    return safetensors.torch.load_file(dense if os.path.isfile(dense) else
                                       os.path.join(step_dir, "rank_00000.safetensors"))


def _as_version_1(src, dst, holds=True):
    """Copy checkpoint run `src` to `dst` rewritten as format version 1 wrote it (the layout before
    the dense file): the dense file's dense.* / optim.* entries inside rank 0's shard (its own
    pieces and metadata kept), no dense file, the manifest at version 1 without its `dense` key,
    rank 0's size, sha256 and holds.dense updated; holds=False also drops every `holds` (older)."""
    import hashlib

    shutil.copytree(src, dst)
    step_dir = os.path.join(dst, STEP)
    shard = os.path.join(step_dir, "rank_00000.safetensors")
    tensors = safetensors.torch.load_file(shard)
    with safetensors.safe_open(shard, "pt") as f:
        metadata = dict(f.metadata())
    tensors.update({k: v for k, v in safetensors.torch.load_file(os.path.join(step_dir, DENSE_FILE)).items()
                    if k.startswith(("dense.", "optim."))})
    metadata.pop("hecate.content", None)
    data = safetensors.torch.save(tensors, metadata={**metadata, "hecate.version": "1"})
    with open(shard, "wb") as f:
        f.write(data)
    os.remove(os.path.join(step_dir, DENSE_FILE))
    manifest = read_manifest(step_dir)
    manifest["version"] = 1
    del manifest["dense"]
    manifest["files"]["rank_00000.safetensors"].update(sha256=hashlib.sha256(data).hexdigest(), bytes=len(data))
    manifest["files"]["rank_00000.safetensors"]["holds"]["dense"] = True
    for meta in manifest["files"].values():
        if not holds:
            del meta["holds"]
    with open(os.path.join(step_dir, "manifest.json"), "w") as f:
        json.dump(manifest, f)
    return dst


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("read_set")
    dirs = {k: str(root / k) for k in ("fssdp4", "fsdp4", "dp4")}
    losses = run_distributed(save_both, 4, dirs["fssdp4"], dirs["fsdp4"], dirs["dp4"])[0]
    return root, dirs, dict(zip(("fssdp4", "fsdp4", "dp4"), losses))


def _corrupt_tensor_bytes(path):
    data = bytearray(open(path, "rb").read())
    data[-5] ^= 0xFF  # the last tensor's data
    open(path, "wb").write(bytes(data))


# ---- tests ----------------------------------------------------------------------------------------
def test_four_ranks_read_only_what_they_own(saved):
    """fssdp W=4 -> fssdp W=4 (placement restored): rank r reads rank 0's shard and its own.
    fsdp W=4 -> fsdp W=4, ranges ending mid-row: likewise, to the element. A corrupted shard
    stops the rank that needs it with the file named, and every other rank with it."""
    root, dirs, losses = saved
    for d in dirs.values():  # the manifest records what each shard holds, exactly
        step_dir = os.path.join(d, STEP)
        E = read_manifest(step_dir)["layers"][0]["num_experts"]
        S = [full_layout(layer).chunk_numel for layer in moe_layers(MoETransformer(tiny_config(num_experts=E)))]
        for fname, (dense, ranges) in _holdings(step_dir).items():
            rec = read_manifest(step_dir)["files"][fname]["holds"]
            said = {int(i): [(p["start"], p["start"] + p["numel"])] if p["kind"] == "flat" else
                    [(e * S[int(i)], (e + 1) * S[int(i)]) for e in p["ids"]] for i, p in rec["experts"].items()}
            assert rec["dense"] == dense and said == {i: sorted(r) for i, r in ranges.items()}, (d, fname)
    bad = str(root / "fssdp4_bad")
    shutil.copytree(dirs["fssdp4"], bad)
    _corrupt_tensor_bytes(os.path.join(bad, STEP, "rank_00002.safetensors"))
    older = str(root / "fssdp4_older")  # as written before manifests recorded `holds`: headers say
    shutil.copytree(dirs["fssdp4"], older)
    manifest = read_manifest(os.path.join(older, STEP))
    for meta in manifest["files"].values():
        del meta["holds"]
    with open(os.path.join(older, STEP, "manifest.json"), "w") as f:
        json.dump(manifest, f)
    v1 = _as_version_1(dirs["fssdp4"], str(root / "fssdp4_v1"))  # dense entries in rank 0's shard
    v1_older = _as_version_1(dirs["fssdp4"], str(root / "fssdp4_v1_older"), holds=False)
    loads = [(dirs["fssdp4"], str(root / "re_fssdp4"), "fssdp", FSSDP, 8),
             (dirs["fsdp4"], str(root / "re_fsdp4"), "fsdp", {}, E_FLAT),
             (older, str(root / "re_older"), "fssdp", FSSDP, 8),
             (v1, str(root / "re_v1"), "fssdp", FSSDP, 8),
             (v1_older, str(root / "re_v1_older"), "fssdp", FSSDP, 8)]
    got = run_distributed(load_record, 4, loads)
    for rank, per in enumerate(got):
        own = f"rank_{rank:05d}.safetensors"
        for (src, dst, *_), r in zip(loads, per):
            # the dense file and the rank's own shard; rank 0's shard only where it holds the dense entries
            mine = sorted({"rank_00000.safetensors" if src in (v1, v1_older) else DENSE_FILE, own})
            assert sorted(r["read"]) == mine, (rank, src, r["read"])
            assert sorted(r["read"]) == _expected(_holdings(os.path.join(src, STEP)), r["kept"], os.path.join(src, STEP))
        assert per[0]["peek_bytes"] == per[1]["peek_bytes"] == per[3]["peek_bytes"] == 0  # the manifest said
        assert 0 < per[2]["peek_bytes"] < per[2]["read_bytes"] and 0 < per[4]["peek_bytes"] < per[4]["read_bytes"]
        for j in (0, 2, 3, 4):
            assert per[j]["loss"] == pytest.approx(losses["fssdp4"], abs=1e-5)
        assert per[1]["loss"] == pytest.approx(losses["fsdp4"], abs=1e-5)
    for src, dst, *_ in loads:
        _same_state(src, dst)  # every row, AdamW moment and dense entry: v1 and v2 alike
        assert os.path.isfile(os.path.join(dst, STEP, DENSE_FILE))  # a re-save writes the current format

    failed = run_distributed(load_failure, 4, bad, "fssdp", FSSDP)
    assert "rank_00002.safetensors fails its sha256" in failed[2]["error"]
    for rank in (0, 1, 3):
        assert "rank_00002.safetensors" not in failed[rank]["read"]  # it never read the bad shard ...
        assert "rank 2 could not load" in failed[rank]["error"]      # ... and still stops, naming it
        assert "rank_00002.safetensors" in failed[rank]["error"]


def test_a_corrupted_dense_file_stops_every_rank_naming_it(saved):
    """Every rank reads the dense file: a flipped byte in it stops each rank with its own error
    naming the file, before any collective (so no rank hangs); verify_checkpoint names it too,
    and a manifest whose `dense` entry is damaged is refused, naming the key."""
    root, dirs, _ = saved
    bad = str(root / "fssdp4_bad_dense")
    shutil.copytree(dirs["fssdp4"], bad)
    _corrupt_tensor_bytes(os.path.join(bad, STEP, DENSE_FILE))
    failed = run_distributed(load_failure, 4, bad, "fssdp", FSSDP)
    for rank, r in enumerate(failed):
        assert r["error"] and f"{DENSE_FILE} fails its sha256" in r["error"], (rank, r)
        assert r["read"] == [], (rank, r)  # the dense file failed its check, and no shard was read after it
    with pytest.raises(CheckpointError, match=f"{DENSE_FILE} fails its sha256"):
        verify_checkpoint(bad)
    os.remove(os.path.join(bad, STEP, DENSE_FILE))
    with pytest.raises(CheckpointError, match=f"{DENSE_FILE} is missing"):
        verify_checkpoint(bad)
    manifest = read_manifest(os.path.join(dirs["fssdp4"], STEP))
    manifest["dense"]["file"] = "../elsewhere.safetensors"
    shutil.copytree(dirs["fssdp4"], str(root / "bad_manifest"))
    with open(os.path.join(root, "bad_manifest", STEP, "manifest.json"), "w") as f:
        json.dump(manifest, f)
    with pytest.raises(CheckpointError, match="key 'dense' is missing or not a mapping with file"):
        read_manifest(os.path.join(root, "bad_manifest", STEP))


def test_two_ranks_read_the_shards_their_new_layout_needs(saved):
    """W=4 checkpoints loaded at W=2 under other strategies: each rank reads the files its new
    rows or range overlap (not all four), and the loaded rows and moments equal the saved ones.
    A dp checkpoint's rows are all in rank 0's shard, so nobody reads the other three: a damaged
    one passes the load unseen and verify_checkpoint (the --resume pre-flight) names it.
    The generation loader (experts on meta) opens only the shards with rows it keeps."""
    root, dirs, losses = saved
    quiet = str(root / "dp4_bad")
    shutil.copytree(dirs["dp4"], quiet)
    victim = os.path.join(quiet, STEP, "rank_00003.safetensors")
    data = open(victim, "rb").read()
    assert b'"hecate.rank":"3"' in data
    open(victim, "wb").write(data.replace(b'"hecate.rank":"3"', b'"hecate.rank":"7"'))
    loads = [(dirs["fssdp4"], str(root / "fssdp4_fssdp2"), "fssdp", FSSDP, 8),
             (dirs["fssdp4"], str(root / "fssdp4_ep2"), "ep", {}, 8),
             (dirs["fsdp4"], str(root / "fsdp4_fsdp2"), "fsdp", {}, E_FLAT),
             (dirs["fsdp4"], str(root / "fsdp4_fssdp2"), "fssdp", FSSDP, E_FLAT),
             (quiet, str(root / "dp4_dp2"), "dp", {}, 8)]
    got = run_distributed(load_record, 2, loads)
    all_four = [DENSE_FILE] + [f"rank_{r:05d}.safetensors" for r in range(4)]
    for per in got:
        for (src, dst, name, _, _), r in zip(loads, per):
            assert sorted(r["read"]) == _expected(_holdings(os.path.join(src, STEP)), r["kept"],
                                                  os.path.join(src, STEP)), (name, r)
            assert len(set(r["read"])) == len(r["read"]) < 5, (name, r["read"])
        assert per[-1]["read"] == [DENSE_FILE, "rank_00000.safetensors"]
    for (src, dst, *_), key, r in zip(loads, ("fssdp4", "fssdp4", "fsdp4", "fsdp4", "dp4"), got[0]):
        assert r["loss"] == pytest.approx(losses[key], abs=1e-5)
        _same_state(src, dst)
    assert sorted(set(got[0][0]["read"]) | set(got[1][0]["read"])) == all_four  # between them, everything
    with pytest.raises(CheckpointError, match="rank_00003.safetensors fails its sha256"):
        verify_checkpoint(quiet)

    full = _full_state(os.path.join(dirs["fssdp4"], STEP))
    want_dense = _dense_tensors(os.path.join(dirs["fssdp4"], STEP))
    for name, options in (("ep", {}), ("fssdp", FSSDP)):
        gen = run_distributed(sharded_generation_record, 2, dirs["fssdp4"], name, options)
        for r in gen:
            step_dir = os.path.join(dirs["fssdp4"], STEP)
            assert sorted(r["read"]) == _expected(_holdings(step_dir), r["kept"], step_dir)
            assert len(r["read"]) < 5, (name, r["read"])
            for i, (ids, rows) in enumerate(zip(r["ids"], r["rows"])):
                assert torch.equal(rows, full[i][0][ids])
            assert r["dense"] and all(torch.equal(v, want_dense[f"dense.{k}"]) for k, v in r["dense"].items())


def test_peek_reads_headers_only_and_unreadable_headers_mean_read_it(tmp_path):
    """A file's header (a few hundred bytes here) says what it holds; a header that does not
    parse makes the file one to read in full (whose checksum then names it); a missing or
    resized file fails at once."""
    path = tmp_path / "rank_00000.safetensors"
    ids = torch.tensor([5, 1, 2])
    safetensors.torch.save_file({"experts.0.ids": ids, "experts.0.rows": torch.zeros(3, 1000),
                                 "dense.w": torch.zeros(4)}, str(path),
                                metadata={"hecate.layers": '{"0": {"kind": "rows"}, "1": {"kind": "flat", '
                                                           '"start": 7, "numel": 9}}'})
    size = path.stat().st_size
    h = peek_shard(str(path), path.name, size)
    assert h.known and h.dense and torch.equal(h.pieces[0][1], ids) and h.pieces[1] == ("flat", 7, 9)
    assert h.peek_bytes < 1000 < size
    data = bytearray(path.read_bytes())
    data[9] = ord("#")  # inside the JSON header
    path.write_bytes(bytes(data))
    assert not peek_shard(str(path), path.name, size).known
    with pytest.raises(CheckpointError, match="has .* bytes, the manifest says 3"):
        peek_shard(str(path), path.name, 3)
    with pytest.raises(CheckpointError, match="missing"):
        peek_shard(str(tmp_path / "gone.safetensors"), "gone", size)


def test_coverage_of_needed_elements_only():
    """Flat pieces [0, 10) and [20, 30) of a 4 x 10 layer: a need inside them is covered, one
    reaching into the gap names the experts it lacks; all of it still requires the full tiling."""
    from hecate.parallel.chunks import ChunkLayout

    layout = ChunkLayout(("w",), ((10,),), 4)
    parts = [("a", {"kind": "flat", "start": 0, "numel": 10}, {}), ("c", {"kind": "flat", "start": 20, "numel": 10}, {})]
    check_covered(parts, layout, 0, [(3, 10), (20, 25)])
    with pytest.raises(CheckpointError, match=r"experts \[1\] are in no shard file"):
        check_covered(parts, layout, 0, [(5, 15)])
    with pytest.raises(CheckpointError, match="starts at 20, expected 10"):
        check_covered(parts, layout, 0, None)
    rows = [("r", {"kind": "rows"}, {"ids": torch.tensor([0, 2])})]
    check_covered(rows, layout, 0, [(20, 30)])
    with pytest.raises(CheckpointError, match=r"experts \[1, 3\] are in no shard file"):
        check_covered(rows, layout, 0, [(15, 40)])


def test_manifest_holds_are_checked(saved, tmp_path):
    """A damaged `holds` record is a CheckpointError naming the manifest key; one that
    understates what a shard holds makes the rank skip that shard, and the coverage check on
    the files it did verify stops the load, naming the experts it lacks."""
    from hecate.parallel.local import LocalStrategy

    run = str(tmp_path / "run")
    shutil.copytree(saved[1]["fssdp4"], run)
    path = os.path.join(run, STEP, "manifest.json")
    good = read_manifest(os.path.join(run, STEP))
    held = good["files"]["rank_00002.safetensors"]["holds"]["experts"]["0"]["ids"]
    assert held

    def load_with(fname, edit):
        manifest = json.loads(json.dumps(good))
        edit(manifest["files"][fname]["holds"])
        with open(path, "w") as f:
            json.dump(manifest, f)
        return load_checkpoint(run, MoETransformer(tiny_config()), LocalStrategy())

    for edit, what in ((lambda h: h["experts"]["0"].update(ids=[8]), "ids that are not a list of expert ids"),
                       (lambda h: h["experts"]["1"].update(kind="cols"), "kind 'cols'"),
                       (lambda h: h["experts"].update({"9": {}}), "names MoE layer '9'"),
                       (lambda h: h.update(dense="yes"), "is not a mapping with dense")):
        with pytest.raises(CheckpointError, match=what):
            load_with("rank_00000.safetensors", edit)
    v1 = _as_version_1(run, str(tmp_path / "v1"))  # version 1: rank 0's shard must hold the dense entries
    v1_manifest = os.path.join(v1, STEP, "manifest.json")
    manifest = read_manifest(os.path.join(v1, STEP))
    manifest["files"]["rank_00000.safetensors"]["holds"]["dense"] = False
    with open(v1_manifest, "w") as f:
        json.dump(manifest, f)
    with pytest.raises(CheckpointError, match="no shard's 'holds' has the dense entries"):
        load_checkpoint(v1, MoETransformer(tiny_config()), LocalStrategy())

    def hide(h):
        for piece in h["experts"].values():
            piece["ids"] = []

    with pytest.raises(CheckpointError, match=re.escape(f"MoE layer 0: experts {held} are in no shard file")):
        load_with("rank_00002.safetensors", hide)
    assert load_with("rank_00002.safetensors", lambda h: None) == 1
