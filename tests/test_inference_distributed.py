"""`hecate generate RUN_DIR --nproc N`: experts stay sharded (each rank loads only its rows), tokens
move through the strategy's dispatch, and greedy texts equal single-process generation."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hecate.comm.topology import Topology
from hecate.inference.distributed import decode_share, generate_distributed, run_rank, split_rows
from hecate.inference.generate import generate_text
from hecate.inference.shard_load import build_sharded_model, experts_on_meta, kept_expert_ids
from hecate.parallel import build_strategy, moe_layers, parallelize
from hecate.testing import run_distributed
from hecate.train.checkpoint import save_checkpoint
from hecate.train.checkpoint_layout import full_layout
from hecate.train.config import load_config
from hecate.train.engine import Engine
from hecate.train.generate import load_run
from tests.test_cli_generate import _make_run

REPO = Path(__file__).resolve().parents[1]
PROMPTS = ["def f", "import os\n", "x", "class Point:"]


# ---- workers (every rank) -------------------------------------------------------------------
def _train_and_save(rank, world, out_dir):
    """A few fssdp steps on skewed batches, re-sharding every 2 (owners move off the even
    placement), then a checkpoint: a trained run whose placement generation must honour."""
    from hecate.train import tasks

    cfg = load_config("configs/tiny_fssdp.yaml", ["parallel.fssdp.reshard_interval=2"])
    torch.manual_seed(0)
    topo = Topology()
    strategy = build_strategy("fssdp", topo, options=cfg.parallel.fssdp)
    model = parallelize(tasks.build_model(cfg), strategy)
    engine = Engine(model, strategy, topo, lr=1e-2)
    for step in range(6):
        g = torch.Generator().manual_seed(100 * step + rank)
        tokens = torch.randint(97, 110, (4, 17), generator=g)
        loss, _ = model.loss(tokens[:, :-1], tokens[:, 1:])
        loss.backward()
        engine.step()
    if rank == 0:
        (Path(out_dir) / "config.yaml").write_text(cfg.to_yaml())
    save_checkpoint(str(Path(out_dir) / "checkpoints"), model, strategy, engine, 6, cfg.to_dict(), topo)
    return [layer.fssdp_state.owner_E.tolist() for layer in moe_layers(model)]


def _generate(rank, world, request):
    return run_rank(request)


def _shard_contents(rank, world, run_dir, strategy_name):
    """What this rank holds: expert ids and rows per layer, expert bytes, and whether anything
    was left on the meta device."""
    cfg = load_config(str(Path(run_dir) / "config.yaml"))
    model, strategy, step = build_sharded_model(cfg, run_dir, strategy_name, Topology(), torch.device("cpu"))
    layers = moe_layers(model)
    out = {"step": step, "meta": [n for n, p in model.named_parameters() if p.device.type == "meta"],
           "expert_bytes": sum(p.numel() * p.element_size() for layer in layers
                               for p in strategy.expert_parameters(layer)),
           "ids": [kept_expert_ids(strategy, layer).tolist() for layer in layers],
           "rows": [full_layout(layer).flatten(
               {n: getattr(layer.experts, n) for n in full_layout(layer).names}).detach()
               if strategy_name == "ep" else layer.expert_chunks.detach() for layer in layers],
           "dense": {n: p.detach() for n, p in model.named_parameters() if not getattr(p, "hecate_expert", False)}}
    return out


def _save_fsdp(rank, world, out_dir):
    """An untrained checkpoint written by fsdp: flat [E*S] ranges per rank, not whole rows."""
    from hecate.train import tasks

    cfg = load_config("configs/tiny_ep.yaml")
    torch.manual_seed(3)
    topo = Topology()
    strategy = build_strategy("fsdp", topo)
    model = parallelize(tasks.build_model(cfg), strategy)
    if rank == 0:
        (Path(out_dir) / "config.yaml").write_text(cfg.to_yaml())
    save_checkpoint(str(Path(out_dir) / "checkpoints"), model, strategy, None, 2, cfg.to_dict(), topo)


def _idle_rank_steps(rank, world, run_dir, strategy_name):
    """Rank 1 has no rows: it must still join every MoE collective of rank 0's decode steps."""
    cfg = load_config(str(Path(run_dir) / "config.yaml"))
    model, _, _ = build_sharded_model(cfg, run_dir, strategy_name, Topology(), torch.device("cpu"))
    rows = [[100, 101, 102]] if rank == 0 else []
    return decode_share(model, rows, 5)


# ---- fixtures --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("dist_gen_run")
    owners = run_distributed(_train_and_save, 2, str(run))[0]
    return run, owners


def _request(run, rows, strategy, tokens=10, **kw):
    return {"run_dir": str(run), "strategy": strategy, "rows": rows, "max_new_tokens": tokens,
            "temperature": 0.0, "top_k": 0, "top_p": 1.0, "seed": 0, "routing": kw.get("routing"),
            "scmoe": kw.get("scmoe"), "result": ""}


def _single(run, rows, tokens=10, **kw):
    """The single-process reference: every expert local, the whole batch in one decoder."""
    from hecate.inference.run import routing_kwargs
    from hecate.inference.sampling import generate
    from hecate.inference.scmoe import parse_scmoe

    model, _, _ = load_run(run)
    return generate(model, rows, tokens, temperature=0.0, routing=routing_kwargs(run, kw.get("routing")),
                    scmoe=parse_scmoe(kw["scmoe"]) if kw.get("scmoe") else None)


# ---- tests -----------------------------------------------------------------------------------
def test_split_rows_covers_every_row_in_order():
    assert split_rows(5, 2) == [(0, 3), (3, 2)]
    assert split_rows(1, 3) == [(0, 1), (1, 0), (1, 0)]
    assert split_rows(0, 2) == [(0, 0), (0, 0)]


@pytest.mark.parametrize("strategy", ["ep", "fssdp"])
def test_sharded_greedy_equals_single_process(trained_run, strategy):
    run, _ = trained_run
    rows = [list(p.encode()) for p in PROMPTS[:3]]  # 3 rows over 2 ranks: 2 + 1, lengths 5, 10, 1
    want = _single(run, rows)
    got = run_distributed(_generate, 2, _request(run, rows, strategy))[0]
    assert got["ids"] == want
    assert got["new_tokens"] == 30 and got["world_size"] == 2 and got["strategy"] == strategy
    assert sum(got["sent_bytes_per_rank"]) > 0  # tokens crossed ranks
    assert len({tuple(r[len(p):]) for r, p in zip(want, rows)}) > 1  # not one degenerate continuation


def test_fssdp_on_three_ranks_from_a_two_rank_checkpoint(trained_run):
    """W = 3 (saved at W = 2: even placement, 4 experts over 3 ranks), 2 rows: rank 2 is idle."""
    run, _ = trained_run
    rows = [list(b"import os\n"), list(b"x")]
    got = run_distributed(_generate, 3, _request(run, rows, "fssdp", 8))[0]
    assert got["ids"] == _single(run, rows, 8)
    chunk = 2 * 32 * 32 * 4  # one expert's w1 + w2, fp32
    # 2 layers x 4 experts over 3 ranks, each layer's even placement rotated: 3, 3 and 2 chunks
    assert sorted(got["expert_bytes_per_rank"]) == [2 * chunk, 3 * chunk, 3 * chunk]


def test_sharded_scmoe_with_an_idle_rank(trained_run):
    """One prompt on two ranks (rank 1 steps on zero tokens) with SCMoE's two passes per step
    and a routing override."""
    run, _ = trained_run
    rows = [list(b"def f")]
    kw = {"scmoe": "0.5,0.1", "routing": "temperature=2"}
    want = _single(run, rows, 8, **kw)
    got = run_distributed(_generate, 2, _request(run, rows, "fssdp", 8, **kw))[0]
    assert got["ids"] == want


@pytest.mark.parametrize("strategy", ["ep", "fssdp"])
def test_idle_rank_joins_every_collective(trained_run, strategy):
    run, _ = trained_run
    out = run_distributed(_idle_rank_steps, 2, str(run), strategy)
    assert out[1] == [] and len(out[0][0]) == 3 + 5
    assert out[0] == _single(run, [[100, 101, 102]], 5)


@pytest.mark.parametrize("strategy", ["ep", "fssdp"])
def test_each_rank_holds_only_its_expert_rows(trained_run, strategy):
    run, owners = trained_run
    full, _, _ = load_run(run)
    per_rank = run_distributed(_shard_contents, 2, str(run), strategy)
    for layer_index, layer in enumerate(moe_layers(full)):
        layout = full_layout(layer)
        rows_ES = layout.flatten({n: getattr(layer.experts, n) for n in layout.names}).detach()
        ids = [r["ids"][layer_index] for r in per_rank]
        assert sorted(ids[0] + ids[1]) == list(range(layout.num_experts))  # disjoint, complete
        if strategy == "fssdp":  # the trained run's placement is kept, not the even one
            assert [[e for e, o in enumerate(owners[layer_index]) if o == r] for r in range(2)] == ids
        for r in per_rank:
            assert torch.equal(r["rows"][layer_index], rows_ES[r["ids"][layer_index]])
    full_bytes = sum(p.numel() * p.element_size() for layer in moe_layers(full) for p in layer.experts.parameters())
    assert [r["expert_bytes"] for r in per_rank] and all(r["expert_bytes"] < full_bytes for r in per_rank)
    assert sum(r["expert_bytes"] for r in per_rank) == full_bytes
    dense = dict((n, p) for n, p in full.named_parameters() if "experts" not in n)
    for r in per_rank:
        assert r["meta"] == [] and r["step"] == 6
        for n, p in r["dense"].items():
            assert torch.equal(p, dense[n]), n


def test_rows_come_out_of_an_fsdp_flat_checkpoint(tmp_path):
    run_distributed(_save_fsdp, 2, str(tmp_path))
    full, _, _ = load_run(tmp_path)
    per_rank = run_distributed(_shard_contents, 2, str(tmp_path), "ep")
    for layer_index, layer in enumerate(moe_layers(full)):
        layout = full_layout(layer)
        rows_ES = layout.flatten({n: getattr(layer.experts, n) for n in layout.names}).detach()
        for r in per_rank:
            assert torch.equal(r["rows"][layer_index], rows_ES[r["ids"][layer_index]])
    assert [r["ids"][0] for r in per_rank] == [[0, 1], [2, 3]]


def _shard(path, tensors, layers):
    """A safetensors shard file with hecate's layer metadata, opened as the loader opens it."""
    import hashlib

    import safetensors.torch

    from hecate.inference.shard_load import ShardFile

    safetensors.torch.save_file(tensors, str(path), metadata={"hecate.layers": json.dumps(layers)})
    data = path.read_bytes()
    return ShardFile(str(path), hashlib.sha256(data).hexdigest(), len(data))


@pytest.mark.parametrize("world", [2, 3, 5])
def test_flat_pieces_split_mid_row(tmp_path, world):
    """fsdp shard files of layer 0, each elements [start, start + numel) of the zero-padded flat
    buffer: pieces end mid-row, and the rows come out whole from the files' 1-D slices."""
    from hecate.inference.shard_load import expert_rows
    from hecate.parallel.chunks import ChunkLayout
    from hecate.train.checkpoint_io import CheckpointError

    layout = ChunkLayout(("w",), ((7,),), 4)  # E = 4 rows of S = 7: pieces end mid-row
    rows_ES = torch.arange(28, dtype=torch.float32).view(4, 7)
    per = -(-28 // world)
    flat = torch.cat([rows_ES.flatten(), torch.zeros(per * world - 28)])
    pieces = [_shard(tmp_path / f"rank_{r}.safetensors", {"experts.0.flat": flat[r * per:(r + 1) * per].clone()},
                     {"0": {"kind": "flat", "start": r * per, "numel": per}}) for r in range(world)]
    try:
        for ids in ([0], [1, 3], [3, 2, 1, 0]):
            assert torch.equal(expert_rows(pieces, 0, layout, torch.tensor(ids)), rows_ES[ids])
        without = [f for r, f in enumerate(pieces) if not r * per <= 10 < (r + 1) * per]
        with pytest.raises(CheckpointError, match=r"experts \[1\] are in no shard file"):
            expert_rows(without, 0, layout, torch.tensor([1]))
    finally:
        for f in pieces:
            f.close()


def test_rows_layout_reads_the_kept_rows_in_runs(tmp_path):
    """A rows layout holding experts in any order: the kept ones come out at their places, read
    as runs of consecutive rows of the file; bf16 rows are widened to fp32."""
    from hecate.inference.shard_load import _runs, expert_rows
    from hecate.parallel.chunks import ChunkLayout

    assert _runs([0, 1, 2, 5, 7, 8]) == [(0, 3), (5, 6), (7, 9)] and _runs([]) == []
    layout = ChunkLayout(("w",), ((3,),), 6)
    rows_ES = torch.randn(6, 3).bfloat16()
    held = [4, 0, 5, 2]
    f = _shard(tmp_path / "rows.safetensors", {"experts.0.ids": torch.tensor(held), "experts.0.rows": rows_ES[held]},
               {"0": {"kind": "rows"}})
    try:
        for ids in ([0, 5], [2, 4, 0], [4]):
            assert torch.equal(expert_rows([f], 0, layout, torch.tensor(ids)), rows_ES[ids].float())
    finally:
        f.close()


def test_shard_file_errors_name_the_file(tmp_path, monkeypatch):
    """Size, checksum and format are checked before a byte is used, and the file read is the one
    that was hashed (a shard replaced in between is refused)."""
    import hashlib

    from hecate.inference import shard_load
    from hecate.inference.shard_load import ShardFile
    from hecate.train.checkpoint_io import CheckpointError

    good = tmp_path / "good.safetensors"
    _shard(good, {"a": torch.arange(4.0)}, {}).close()
    data = good.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    with pytest.raises(CheckpointError, match=f"good.safetensors has {len(data)} bytes, the manifest says 3"):
        ShardFile(str(good), digest, 3)
    with pytest.raises(CheckpointError, match="good.safetensors fails its sha256"):
        ShardFile(str(good), "0" * 64, len(data))
    with pytest.raises(CheckpointError, match="missing.safetensors is missing"):
        ShardFile(str(tmp_path / "missing.safetensors"), digest, len(data))
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x05" + bytes(7) + b"{abc}")
    with pytest.raises(CheckpointError, match="junk.safetensors is not a valid safetensors file"):
        ShardFile(str(junk), hashlib.sha256(junk.read_bytes()).hexdigest(), 13)

    other = tmp_path / "other.safetensors"
    _shard(other, {"a": torch.zeros(4)}, {}).close()
    real_open = shard_load.safe_open

    def replaced_first(path, **kw):  # another writer renames a new file over the path in between
        os.replace(other, path)
        return real_open(path, **kw)

    monkeypatch.setattr(shard_load, "safe_open", replaced_first)
    with pytest.raises(CheckpointError, match="good.safetensors was replaced while it was being loaded"):
        ShardFile(str(good), digest, len(data))


def test_a_corrupted_shard_is_named(tmp_path):
    from hecate.train.checkpoint_io import CheckpointError

    _make_run(tmp_path)
    shard = next((tmp_path / "checkpoints").glob("step_*/rank_00000.safetensors"))
    data = bytearray(shard.read_bytes())
    data[-5] ^= 0xFF
    shard.write_bytes(bytes(data))
    cfg = load_config(str(tmp_path / "config.yaml"))
    with pytest.raises(CheckpointError, match="rank_00000.safetensors fails its sha256"):
        build_sharded_model(cfg, tmp_path, "local", None, torch.device("cpu"))


@pytest.mark.parametrize("overrides", [["model.moe.expert_bias=true"], ["model.moe.num_shared_experts=1"]])
def test_sharded_loader_equals_load_run_for_other_expert_forms(tmp_path, overrides):
    """Biased experts (ModuleExperts) and shared experts: every parameter and the logits match."""
    from hecate.train import tasks

    cfg = load_config("configs/tiny_ep.yaml", overrides)
    (tmp_path / "config.yaml").write_text(cfg.to_yaml())
    local = build_strategy("local")
    model = parallelize(tasks.build_model(cfg), local)
    save_checkpoint(str(tmp_path / "checkpoints"), model, local, None, 1)
    want, _, _ = load_run(tmp_path)
    got, _, _ = build_sharded_model(cfg, tmp_path, "local", None, torch.device("cpu"))
    a, b = want.state_dict(), got.state_dict()
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    x = torch.randint(0, 256, (2, 8))
    with torch.no_grad():
        assert torch.equal(want(x).logits, got(x).logits)


def test_experts_are_built_on_meta():
    from hecate.train import tasks

    cfg = load_config("configs/tiny_ep.yaml")
    with experts_on_meta():
        model = tasks.build_model(cfg)
    kinds = {n: p.device.type for n, p in model.named_parameters()}
    assert {k for n, k in kinds.items() if ".experts." in n} == {"meta"}
    assert {k for n, k in kinds.items() if ".experts." not in n} == {"cpu"}
    assert all(p.device.type == "cpu" for p in tasks.build_model(cfg).parameters())  # the hook is gone


def test_bad_requests_fail_before_any_worker_starts(tmp_path):
    cfg = load_config("configs/tiny_fssdp.yaml")
    (tmp_path / "config.yaml").write_text(cfg.to_yaml())
    rows = [[1, 2]]
    with pytest.raises(ValueError, match="divide every MoE layer's experts"):
        generate_distributed(tmp_path, rows, 4, nproc=3, strategy="ep")
    with pytest.raises(ValueError, match="drop --no-cache"):
        generate_distributed(tmp_path, rows, 4, nproc=2, use_cache=False)
    with pytest.raises(ValueError, match="must be one of"):
        generate_distributed(tmp_path, rows, 4, nproc=2, strategy="fsdp")
    with pytest.raises(ValueError, match="no checkpoints/"):
        generate_distributed(tmp_path, rows, 4, nproc=2)
    with pytest.raises(ValueError, match="pass --nproc"):
        generate_text(tmp_path, ["a"], 4, strategy="ep")


def test_cli_nproc_2_prints_the_single_process_texts(tmp_path, capsys):
    """The whole command: launcher, 2 worker processes (ep), texts printed in prompt order."""
    from hecate.cli import main

    _make_run(tmp_path)
    args = [str(tmp_path), "--prompt", "def f", "--prompt", "x = ", "--tokens", "8", "--temperature", "0"]
    assert main(["generate", *args]) == 0
    single = capsys.readouterr().out
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "hecate.cli", "generate", *args, "--nproc", "2", "--strategy", "ep"]
    sharded = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, cwd=REPO)
    assert sharded.returncode == 0, sharded.stderr
    assert sharded.stdout == single and single.count("--- sample") == 2
    assert "[hecate generate] 2 ranks (ep)" in sharded.stderr
