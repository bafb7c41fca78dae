"""Checkpoints: exact resume, resharding across strategies and world sizes, export/import,
corruption and half-written detection, no pickle. Worker functions run on every rank."""
import json
import os
import shutil

import pytest
import safetensors.torch
import torch
import torch.distributed as dist

from hecate.comm.topology import Topology
from hecate.models.transformer import MoETransformer
from hecate.parallel import build_strategy, moe_layers, parallelize
from hecate.parallel.local import LocalStrategy
from hecate.testing import run_distributed
from hecate.train.checkpoint import (
    CheckpointError,
    export_safetensors,
    import_safetensors,
    load_checkpoint,
    read_manifest,
    save_checkpoint,
)
from hecate.train.checkpoint_layout import assemble, full_layout
from hecate.train.engine import Engine
from tests.training_cases import batch, tiny_config

FSSDP = {"overlap_degree": 2, "reshard_interval": 2}
FIXED = batch(99, 0, False)


def _build(strategy, options, seed):
    torch.manual_seed(seed)
    topo = Topology()
    strat = build_strategy(strategy, topo, **options)
    model = parallelize(MoETransformer(tiny_config()), strat)
    engine = Engine(model, strat, topo, lr=3e-3, weight_decay=0.01, max_grad_norm=0.5, eps=1e-6)
    return model, strat, engine, topo


def _train(model, engine, rank, world, steps, first=0):
    losses = []
    for step in range(first, first + steps):
        x, y = batch(step, rank, True)
        loss, _ = model.loss(x, y)
        loss.backward()
        engine.step()
        mean = loss.detach().clone()
        dist.all_reduce(mean)
        losses.append(float(mean) / world)
    return losses


def _fixed_loss(model):
    with torch.no_grad():
        return float(model.loss(*FIXED)[0])


# ---- workers --------------------------------------------------------------------------------------
def resume_case(rank, world, run_dir, steps):
    model, strat, engine, topo = _build("fssdp", FSSDP, seed=0)
    straight = _train(model, engine, rank, world, steps)

    model, strat, engine, topo = _build("fssdp", FSSDP, seed=0)
    first = _train(model, engine, rank, world, steps // 2)
    save_checkpoint(run_dir, model, strat, engine, steps // 2, config_dict={"seed": 0}, topology=topo)
    saved_owner = [layer.fssdp_state.owner_E.clone() for layer in moe_layers(model)]
    reshards = strat.reshards

    model, strat, engine, topo = _build("fssdp", FSSDP, seed=1)  # different init: the load must overwrite it
    step = load_checkpoint(run_dir, model, strat, engine, topology=topo)
    owner_ok = all(torch.equal(a, layer.fssdp_state.owner_E) for a, layer in zip(saved_owner, moe_layers(model)))
    second = _train(model, engine, rank, world, steps - step, first=step)
    return {"straight": straight, "resumed": first + second, "step": step, "owner_ok": owner_ok,
            "reshards": reshards}


def save_case(rank, world, run_dir, strategy, options, train_steps):
    model, strat, engine, topo = _build(strategy, options, seed=0)
    _train(model, engine, rank, world, train_steps)
    save_checkpoint(run_dir, model, strat, engine, train_steps, config_dict={"strategy": strategy})
    return _fixed_loss(model)


def reload_case(rank, world, src_dir, dst_dir, strategy, options):
    """Load under another layout, report the fixed-batch loss, and save again (to compare state)."""
    model, strat, engine, topo = _build(strategy, options, seed=7)
    step = load_checkpoint(src_dir, model, strat, engine)
    loss = _fixed_loss(model)
    save_checkpoint(dst_dir, model, strat, engine, step)
    return loss


def export_case(rank, world, out_file, strategy, options, train_steps):
    model, strat, engine, topo = _build(strategy, options, seed=0)
    if train_steps:
        _train(model, engine, rank, world, train_steps)
    export_safetensors(out_file, model, strat)
    return _fixed_loss(model)


def import_case(rank, world, in_file, strategy, options):
    model, strat, engine, topo = _build(strategy, options, seed=5)
    import_safetensors(in_file, model, strat)
    return _fixed_loss(model)


# ---- helpers in the test process ------------------------------------------------------------------
def _full_state(step_dir):
    """{layer: (rows, state)} reassembled from a checkpoint's files, for comparing checkpoints."""
    manifest = read_manifest(step_dir)
    shards = []
    for fname in manifest["files"]:
        with open(os.path.join(step_dir, fname), "rb") as f:
            data = f.read()
        from hecate.train.checkpoint_io import safetensors_metadata
        shards.append((fname, json.loads(safetensors_metadata(data)["hecate.layers"]),
                       safetensors.torch.load(data)))
    model = MoETransformer(tiny_config())
    out = {}
    for i, layer in enumerate(moe_layers(model)):
        parts = [(f, info[str(i)], {k[len(f"experts.{i}."):]: v for k, v in t.items()
                                    if k.startswith(f"experts.{i}.")}) for f, info, t in shards if str(i) in info]
        out[i] = assemble(parts, full_layout(layer), i)
    return out


def _local_model(seed=3):
    torch.manual_seed(seed)
    model = MoETransformer(tiny_config())
    return model, LocalStrategy(), Engine(model, LocalStrategy(), lr=3e-3, eps=1e-6)


def _local_train_and_save(run_dir, steps, keep=None):
    model, strat, engine = _local_model()
    for step in range(steps):
        x, y = batch(step, 0, False)
        model.loss(x, y)[0].backward()
        engine.step()
        save_checkpoint(run_dir, model, strat, engine, step + 1, keep=keep)
    return model


@pytest.fixture(scope="module")
def fssdp_run(tmp_path_factory):
    """A 2-rank fssdp run with checkpoints at steps 1 and 2."""
    run_dir = str(tmp_path_factory.mktemp("fssdp_run"))
    run_distributed(save_case, 2, run_dir, "fssdp", FSSDP, 1)
    losses = run_distributed(save_case, 2, run_dir, "fssdp", FSSDP, 2)
    return run_dir, losses[0]


# ---- tests ----------------------------------------------------------------------------------------
def test_exact_resume_fssdp_two_ranks(tmp_path):
    r = run_distributed(resume_case, 2, str(tmp_path), 6)[0]
    assert r["step"] == 3
    assert r["reshards"] >= 1, "a re-placement before the save makes placement restore matter"
    assert r["owner_ok"], "the saved fssdp placement (owner_E) was not restored"
    assert r["resumed"] == r["straight"], (r["resumed"], r["straight"])


def test_reshard_on_load_fssdp4_ep2_dp1_same_function_and_optimizer_state(tmp_path):
    a, b, c = (str(tmp_path / n) for n in ("fssdp4", "ep2", "dp1"))
    want = run_distributed(save_case, 4, a, "fssdp", FSSDP, 2)[0]
    got_ep = run_distributed(reload_case, 2, a, b, "ep", {})
    got_dp = run_distributed(reload_case, 1, b, c, "dp", {})
    assert got_ep[0] == pytest.approx(want, abs=1e-5) and got_ep[1] == got_ep[0]
    assert got_dp[0] == pytest.approx(want, abs=1e-5)
    # Optimizer state survived both re-layouts: the re-saved full state equals the original.
    states = [_full_state(os.path.join(d, "step_00000002")) for d in (a, b, c)]
    for i, (rows, state, step) in states[0].items():
        assert set(state) == {"exp_avg", "exp_avg_sq"} and float(step) == 2.0
        for other in states[1:]:
            rows2, state2, step2 = other[i]
            torch.testing.assert_close(rows2, rows, rtol=0, atol=0)
            for k in state:
                torch.testing.assert_close(state2[k], state[k], rtol=0, atol=0)
            assert float(step2) == 2.0
    manifest = read_manifest(os.path.join(a, "step_00000002"))
    assert manifest["world_size"] == 4 and manifest["strategy"]["name"] == "fssdp"
    assert len(manifest["layers"][0]["owner_E"]) == 8 and len(manifest["files"]) == 4
    assert manifest["config"] == {"strategy": "fssdp"} and manifest["step"] == 2
    assert open(os.path.join(a, "latest")).read().strip() == "step_00000002"
    for meta in manifest["files"].values():
        assert len(meta["sha256"]) == 64 and meta["bytes"] > 0


def test_fsdp_checkpoint_loads_under_fssdp_with_other_world(tmp_path):
    a, b = str(tmp_path / "fsdp2"), str(tmp_path / "fssdp3")
    want = run_distributed(save_case, 2, a, "fsdp", {}, 1)[0]
    got = run_distributed(reload_case, 3, a, b, "fssdp", FSSDP)
    assert got[0] == pytest.approx(want, abs=1e-5)
    s0, s1 = _full_state(os.path.join(a, "step_00000001")), _full_state(os.path.join(b, "step_00000001"))
    for i in s0:
        for k in s0[i][1]:
            torch.testing.assert_close(s1[i][1][k], s0[i][1][k], rtol=0, atol=0)


def test_ep_with_replicated_groups_saves_once_and_loads_under_fssdp(tmp_path):
    a, b = str(tmp_path / "ep4"), str(tmp_path / "fssdp2")
    want = run_distributed(save_case, 4, a, "ep", {"ep_size": 2}, 1)[0]
    manifest = read_manifest(os.path.join(a, "step_00000001"))
    assert manifest["strategy"] == {"name": "ep", "options": {"ep_size": 2}}
    for r, has_experts in ((0, True), (1, True), (2, False), (3, False)):  # EDP replicas skip
        keys = safetensors.torch.load_file(os.path.join(a, "step_00000001", f"rank_{r:05d}.safetensors"))
        assert any(k.startswith("experts.") for k in keys) == has_experts
    got = run_distributed(reload_case, 2, a, b, "fssdp", FSSDP)
    assert got[0] == pytest.approx(want, abs=1e-5)


def test_export_import_round_trip(tmp_path):
    out = str(tmp_path / "model.safetensors")
    want = run_distributed(export_case, 2, out, "fssdp", FSSDP, 1)[0]
    names = set(safetensors.torch.load_file(out))
    plain = MoETransformer(tiny_config())
    assert names == set(plain.state_dict()), "export must use the plain single-process names"
    assert "blocks.1.ffn.experts.w1_EFD" in names
    import_safetensors(out, plain, LocalStrategy())
    assert _fixed_loss(plain) == pytest.approx(want, abs=1e-5)
    got = run_distributed(import_case, 2, out, "ep", {})
    assert got[0] == pytest.approx(want, abs=1e-5)


def test_import_rejects_a_file_from_another_model(tmp_path):
    out = str(tmp_path / "model.safetensors")
    model = MoETransformer(tiny_config())
    sd = {k: v.contiguous() for k, v in model.state_dict().items() if "experts.w2_EDF" not in k}
    safetensors.torch.save_file(sd, out)
    with pytest.raises(ValueError, match="w2_EDF"):
        import_safetensors(out, MoETransformer(tiny_config()), LocalStrategy())


def _copy(run_dir, tmp_path):
    dst = str(tmp_path / "copy")
    shutil.copytree(run_dir, dst)
    return dst


def test_flipped_byte_is_detected_naming_the_file(fssdp_run, tmp_path):
    run = _copy(fssdp_run[0], tmp_path)
    victim = os.path.join(run, "step_00000002", "rank_00001.safetensors")
    with open(victim, "r+b") as f:
        f.seek(os.path.getsize(victim) - 5)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 0x01]))
    model, strat, _ = _local_model()
    with pytest.raises(CheckpointError, match="rank_00001.safetensors.*checksum"):
        load_checkpoint(run, model, strat)


def test_missing_and_truncated_shards_are_detected(fssdp_run, tmp_path):
    run = _copy(fssdp_run[0], tmp_path)
    victim = os.path.join(run, "step_00000002", "rank_00000.safetensors")
    with open(victim, "r+b") as f:
        f.truncate(100)
    model, strat, _ = _local_model()
    with pytest.raises(CheckpointError, match="rank_00000.safetensors.*bytes"):
        load_checkpoint(run, model, strat)
    os.remove(victim)
    with pytest.raises(CheckpointError, match="rank_00000.safetensors.*missing"):
        load_checkpoint(run, model, strat)


def test_cross_layout_load_in_the_test_process_matches(fssdp_run):
    run, want = fssdp_run
    model, strat, engine = _local_model()
    assert load_checkpoint(run, model, strat, engine) == 2
    assert _fixed_loss(model) == pytest.approx(want, abs=1e-5)
    assert len(engine.optimizer.state) == len(list(model.parameters()))


def test_half_written_checkpoint_falls_back_to_previous(fssdp_run, tmp_path):
    run = _copy(fssdp_run[0], tmp_path)
    # A job killed while writing step 3: shard files (one still temporary), no manifest.
    half = os.path.join(run, "step_00000003")
    os.makedirs(half)
    shutil.copy(os.path.join(run, "step_00000002", "rank_00000.safetensors"), half)
    with open(os.path.join(half, ".tmp.rank_00001.safetensors.123"), "wb") as f:
        f.write(b"partial")
    model, strat, _ = _local_model()
    assert load_checkpoint(run, model, strat) == 2  # latest still names step 2
    with open(os.path.join(run, "latest"), "w") as f:  # even a latest that points at it is survived
        f.write("step_00000003\n")
    with pytest.warns(UserWarning, match="half-written"):
        assert load_checkpoint(run, model, strat) == 2
    with pytest.raises(CheckpointError, match="manifest.json"):
        load_checkpoint(half, model, strat)


def test_crash_before_manifest_keeps_previous_loadable(tmp_path, monkeypatch):
    import hecate.train.checkpoint as ck

    run = str(tmp_path)
    _local_train_and_save(run, 1)

    def killed(*a, **k):
        raise KeyboardInterrupt("killed while writing the manifest")

    monkeypatch.setattr(ck, "atomic_write_json", killed)
    model, strat, engine = _local_model(seed=9)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(run, model, strat, engine, 2)
    assert os.path.isfile(os.path.join(run, "step_00000002", "rank_00000.safetensors"))
    monkeypatch.undo()
    fresh, strat, engine = _local_model(seed=11)
    assert load_checkpoint(run, fresh, strat, engine) == 1


def test_keep_prunes_old_checkpoints(tmp_path):
    _local_train_and_save(str(tmp_path), 4, keep=2)
    assert sorted(d for d in os.listdir(tmp_path) if d.startswith("step_")) == ["step_00000003", "step_00000004"]
    assert open(tmp_path / "latest").read().strip() == "step_00000004"
    assert not [f for f in os.listdir(tmp_path / "step_00000004") if f.startswith(".tmp")]


def test_no_pickle_is_used(tmp_path, monkeypatch):
    import pickle

    def forbidden(*a, **k):
        raise AssertionError("pickle/torch.load must not be used by checkpoints")

    for mod, name in ((torch, "load"), (torch, "save"), (pickle, "load"), (pickle, "loads"),
                      (pickle, "dump"), (pickle, "dumps")):
        monkeypatch.setattr(mod, name, forbidden)
    model = _local_train_and_save(str(tmp_path), 1)
    fresh, strat, engine = _local_model(seed=4)
    load_checkpoint(str(tmp_path), fresh, strat, engine)
    monkeypatch.undo()
    assert _fixed_loss(fresh) == _fixed_loss(model)
    for f in os.listdir(tmp_path / "step_00000001"):  # every shard is plain safetensors
        if f.endswith(".safetensors"):
            safetensors.torch.load_file(str(tmp_path / "step_00000001" / f))


def test_bad_arguments_raise_value_errors(tmp_path):
    model, strat, engine = _local_model()
    with pytest.raises(ValueError, match="step"):
        save_checkpoint(str(tmp_path), model, strat, engine, -1)
    with pytest.raises(ValueError, match="keep"):
        save_checkpoint(str(tmp_path), model, strat, engine, 1, keep=0)
    with pytest.raises(ValueError, match="config_dict"):
        save_checkpoint(str(tmp_path), model, strat, engine, 1, config_dict={"x": object()})
    save_checkpoint(str(tmp_path), model, strat, engine, 1)
    torch.manual_seed(0)
    other = MoETransformer(tiny_config(num_experts=4))
    with pytest.raises(ValueError, match="MoE layer 0"):
        load_checkpoint(str(tmp_path), other, LocalStrategy())
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_checkpoint(str(tmp_path / "nope"), model, strat)


def test_mismatched_models_are_named(tmp_path):
    model, strat, engine = _local_model()
    with pytest.raises(ValueError, match="extra"):
        save_checkpoint(str(tmp_path), model, strat, engine, 1, extra={"x": object()})
    save_checkpoint(str(tmp_path), model, strat, engine, 1)
    cfg = tiny_config()
    cfg.vocab_size = cfg.vocab_size + 1
    with pytest.raises(ValueError, match="embed.weight"):
        load_checkpoint(str(tmp_path), MoETransformer(cfg), LocalStrategy())
    out = str(tmp_path / "bad.safetensors")
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    sd["blocks.0.ffn.experts.w1_EFD"] = sd["blocks.0.ffn.experts.w1_EFD"][:4].contiguous()
    safetensors.torch.save_file(sd, out)
    with pytest.raises(ValueError, match=r"blocks.0.ffn.experts.w1_EFD has shape \(4, 48, 32\)"):
        import_safetensors(out, MoETransformer(tiny_config()), LocalStrategy())
