"""`parallel.strategy: fssdp_hybrid` through the config and `hecate train`'s Trainer: the layout is
checked before launch, a W = 4 run with shard groups of G = 2 trains like fssdp at W = 4, and its
checkpoints resume under fssdp_hybrid and convert to and from fssdp."""
import json
import shutil
from pathlib import Path

import pytest
import safetensors.torch
import torch

from hecate.parallel.chunks import ChunkLayout
from hecate.testing import run_distributed
from hecate.train.checkpoint import read_manifest
from hecate.train.checkpoint_io import safetensors_metadata
from hecate.train.checkpoint_layout import assemble
from hecate.train.config import load_config

W, G = 4, 2


def _overrides(tmp_path, name, strategy, *extra):
    hybrid = [f"parallel.shard_group_size={G}"] if strategy == "fssdp_hybrid" else []
    return [f"parallel.strategy={strategy}", *hybrid, "train.steps=4", "train.log_every=1", "train.eval_every=4",
            "train.eval_batches=1", "data.batch_size=2", "data.embedded_max_bytes=100000",
            f"data.cache_dir={tmp_path}/cache", f"train.out_dir={tmp_path}/{name}", "checkpoint.every=2",
            "logging.progress=false", "logging.heatmap=false", "sample.num_samples=0", *extra]


def train_worker(rank, world, overrides, resume):
    from hecate.train.trainer import train

    summary = train(load_config("tiny_fssdp", overrides, world_size=world), resume=resume)
    summary.pop("seconds", None)
    return summary


def _losses(out_dir):
    rows = [json.loads(line) for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def _experts(step_dir):
    """{layer: (rows [E, S], AdamW state {key: [E, S]})} reassembled from the checkpoint's files,
    and which files hold expert rows."""
    manifest = read_manifest(str(step_dir))
    shards = []
    for fname in sorted(manifest["files"]):
        data = (step_dir / fname).read_bytes()
        shards.append((fname, json.loads(safetensors_metadata(data)["hecate.layers"]), safetensors.torch.load(data)))
    out = {}
    for entry in manifest["layers"]:
        i = entry["index"]
        layout = ChunkLayout(tuple(entry["names"]), tuple(map(tuple, entry["shapes"])), entry["num_experts"])
        parts = [(f, info[str(i)], {k[len(f"experts.{i}."):]: v for k, v in t.items() if k.startswith(f"experts.{i}.")})
                 for f, info, t in shards if str(i) in info]
        out[i] = assemble(parts, layout, i)[:2]
    return out, sorted(f for f, info, _ in shards if info)


def _assert_same_experts(a, b, name):
    for i, (rows, state) in a.items():
        assert set(state) == {"exp_avg", "exp_avg_sq"}, name
        torch.testing.assert_close(b[i][0], rows, rtol=0, atol=1e-5, msg=lambda m: f"{name} layer {i} rows: {m}")
        for k in state:
            torch.testing.assert_close(b[i][1][k], state[k], rtol=1e-4, atol=1e-8,
                                       msg=lambda m: f"{name} layer {i} {k}: {m}")


def _resume_from(tmp_path, src, name, strategy):
    step2 = tmp_path / src / "checkpoints" / "step_00000002"
    shutil.copytree(step2, tmp_path / name / "checkpoints" / step2.name)
    run_distributed(train_worker, W, _overrides(tmp_path, name, strategy), True, timeout=300)
    return _losses(tmp_path / name)


def test_config_accepts_fssdp_hybrid_and_checks_the_layout():
    cfg = load_config("tiny_fssdp", ["parallel.strategy=fssdp_hybrid", "parallel.shard_group_size=2"], world_size=4)
    assert cfg.parallel.shard_group_size == 2
    assert cfg.parallel.fssdp.reshard_interval == 0  # the strategy's default, written out
    assert load_config("tiny_fssdp").parallel.fssdp.reshard_interval == 100  # fssdp keeps its own
    hybrid = ["parallel.strategy=fssdp_hybrid"]
    bad = [
        (hybrid, 4, None, "parallel.shard_group_size is required"),
        (hybrid + ["parallel.shard_group_size=3"], 4, None, "shard_group_size=3 must divide the world size 4"),
        (hybrid + ["parallel.shard_group_size=3"], 12, 4, r"must divide the 4 ranks of a node or be a multiple"),
        (hybrid + ["parallel.shard_group_size=6"], 12, 4, r"must divide the 4 ranks of a node or be a multiple"),
        (hybrid + ["parallel.shard_group_size=2", "parallel.fssdp.reshard_interval=5"], 4, None,
         r"parallel.fssdp.reshard_interval=5 is not supported by fssdp_hybrid"),
        (["parallel.shard_group_size=2"], 4, None, "only used by strategy 'fssdp_hybrid'"),
    ]
    for overrides, world, rpn, message in bad:
        with pytest.raises(ValueError, match=message):
            load_config("tiny_fssdp", overrides).validate(world, rpn)
    for g, world, rpn in ((2, 8, 4), (4, 8, 4), (8, 16, 4), (3, 6, None)):
        load_config("tiny_fssdp", hybrid + [f"parallel.shard_group_size={g}"]).validate(world, rpn)
    # The strategy applies the same node rule (a group of 3 would straddle nodes of 4 ranks).
    from hecate.comm.topology import Topology
    from hecate.parallel.fssdp.hybrid import HybridFullyShardedSparse

    with pytest.raises(ValueError, match="must divide the 4 ranks of a node or be a multiple"):
        HybridFullyShardedSparse(Topology(rank=0, world_size=12, ranks_per_node=4), 3, reshard_interval=0)


def test_hybrid_trains_like_fssdp_and_its_checkpoints_resume_and_convert(tmp_path):
    runs = {}
    for strategy in ("fssdp_hybrid", "fssdp"):
        summaries = run_distributed(train_worker, W, _overrides(tmp_path, strategy, strategy), False, timeout=300)
        assert len({s["val_loss"] for s in summaries}) == 1
        runs[strategy] = _losses(tmp_path / strategy)
    hybrid, fssdp = runs["fssdp_hybrid"], runs["fssdp"]
    assert sorted(hybrid) == [1, 2, 3, 4]
    # The same function: only where tokens are computed and the order of gradient sums differ.
    torch.testing.assert_close(torch.tensor([hybrid[s] for s in range(1, 5)]),
                               torch.tensor([fssdp[s] for s in range(1, 5)]), rtol=0, atol=1e-5)

    manifest = read_manifest(str(tmp_path / "fssdp_hybrid" / "checkpoints" / "step_00000002"))
    assert manifest["strategy"]["name"] == "fssdp_hybrid"
    assert manifest["strategy"]["options"]["shard_group_size"] == G
    assert manifest["strategy"]["options"]["reshard_interval"] == 0
    assert len(manifest["layers"][0]["owner_E"]) == 4 and max(manifest["layers"][0]["owner_E"]) == G - 1
    ckpt = {n: tmp_path / n / "checkpoints" / "step_00000004" for n in runs}
    hybrid_experts, writers = _experts(ckpt["fssdp_hybrid"])
    assert writers == ["rank_00000.safetensors", "rank_00001.safetensors"]  # shard group 0 only, each row once
    fssdp_experts, writers = _experts(ckpt["fssdp"])
    assert len(writers) == W
    _assert_same_experts(fssdp_experts, hybrid_experts, "fssdp_hybrid vs fssdp at step 4")

    for name, src, strategy in (("hybrid_from_hybrid", "fssdp_hybrid", "fssdp_hybrid"),
                                ("fssdp_from_hybrid", "fssdp_hybrid", "fssdp"),
                                ("hybrid_from_fssdp", "fssdp", "fssdp_hybrid")):
        resumed = _resume_from(tmp_path, src, name, strategy)
        assert sorted(resumed) == [3, 4], name
        want = runs[src]
        torch.testing.assert_close(torch.tensor([resumed[3], resumed[4]]), torch.tensor([want[3], want[4]]),
                                   rtol=0, atol=1e-5, msg=lambda m: f"{name}: {m}")
        # Weights and optimizer state after the resumed steps: as in the run that did not stop.
        _assert_same_experts(_experts(ckpt[src])[0], _experts(tmp_path / name / "checkpoints" / "step_00000004")[0],
                             name)
