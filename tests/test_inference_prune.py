"""`hecate profile` (routing statistics of two prompt sets -> a named mask generate/eval apply) and
`hecate prune` (least-used experts dropped, a smaller verified checkpoint that computes what the
full model computes with those experts disabled)."""
import json
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from hecate.cli import main
from hecate.inference.profile import routing_frequency
from hecate.moe.overrides import routing_overrides
from hecate.train.generate import load_run
from tests.test_cli_generate import _make_run


def _files(tmp_path):
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("def f(x):\n    return x * 2\n\nimport os\n")
    b.write_text("The cat sat on the mat.\nA quiet evening by the river.\n")
    return a, b


def test_profile_saves_a_mask_that_eval_applies(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    _make_run(run)
    a, b = _files(tmp_path)
    assert main(["profile", str(run), "--prompts", str(a), "--against", str(b), "--name", "code",
                 "--disable", "2"]) == 0
    mask = json.loads((run / "masks" / "code.json").read_text())
    model, tok, _ = load_run(run)
    fa = routing_frequency(model, tok, a.read_text().splitlines())
    fb = routing_frequency(model, tok, b.read_text().splitlines())
    for layer in mask["layers"]:
        i = layer["layer"]
        diff = (fa - fb)[i]
        assert layer["ranking"] == sorted(range(len(layer["difference"])), key=lambda e: (-float(diff[e]), e))
        want = [e for e in layer["ranking"][:2] if diff[e] > 0]
        assert mask["disabled"][str(i)] == sorted(want)
        assert abs(sum(layer["freq_prompts"]) - model.moe_layers()[i].config.top_k) < 1e-9
    assert any(mask["disabled"].values())
    spec = ",".join(f"disable={i}:{e}" for i, es in mask["disabled"].items() for e in es)
    capsys.readouterr()
    assert main(["eval", str(run), "--batches", "1", "--json", "--routing", "mask=code"]) == 0
    by_mask = json.loads(capsys.readouterr().out)
    assert main(["eval", str(run), "--batches", "1", "--json", "--routing", spec]) == 0
    by_hand = json.loads(capsys.readouterr().out)
    assert main(["eval", str(run), "--batches", "1", "--json"]) == 0
    plain = json.loads(capsys.readouterr().out)
    assert by_mask["val_loss"] == by_hand["val_loss"] != plain["val_loss"]


def test_prune_writes_a_smaller_run_equal_to_the_masked_model(tmp_path, capsys):
    run, out, calib = _pruned(tmp_path)
    report = json.loads((out / "prune.json").read_text())
    full, tok, step = load_run(run)
    pruned, _, pstep = load_run(out)
    assert pstep == step and [m.config.num_experts for m in pruned.moe_layers()] == [2] * len(full.moe_layers())
    freq = routing_frequency(full, tok, calib.read_text().splitlines())
    disabled = {}
    for i, (layer, keep) in enumerate(zip(full.moe_layers(), report["kept_experts"])):
        E = layer.config.num_experts
        assert keep == sorted(sorted(range(E), key=lambda e: (-float(freq[i, e]), e))[:2])
        disabled[i] = [e for e in range(E) if e not in keep]
    per_expert = sum(p.numel() for p in full.moe_layers()[0].experts.parameters()) // full.moe_layers()[0].config.num_experts
    router_row = full.moe_layers()[0].router.weight_ED.shape[1]
    removed = sum(len(d) for d in disabled.values()) * (per_expert + router_row)
    assert report["params_removed"] == removed == (sum(p.numel() for p in full.parameters())
                                                   - sum(p.numel() for p in pruned.parameters()))
    x = torch.randint(0, 256, (2, 12))
    with routing_overrides(full, disabled=disabled):
        torch.testing.assert_close(pruned(x).logits, full(x).logits, rtol=1e-5, atol=1e-5)
    assert "val_loss" in capsys.readouterr().out and report["val_loss_before"] != report["val_loss_after"]
    assert main(["prune", str(run), "--keep", "2", "--calib", str(calib), "--out", str(out)]) == 2
    assert "already holds checkpoints" in capsys.readouterr().err
    assert main(["prune", str(run), "--keep", "1", "--calib", str(calib), "--out", str(tmp_path / "x")]) == 2
    assert "top_k=2" in capsys.readouterr().err


def _pruned(tmp_path):
    run, out = tmp_path / "run", tmp_path / "pruned"
    run.mkdir()
    _make_run(run)
    a, b = _files(tmp_path)
    calib = tmp_path / "calib.txt"
    calib.write_text(a.read_text() + b.read_text())
    assert main(["prune", str(run), "--keep", "2", "--calib", str(calib), "--out", str(out), "--batches", "1"]) == 0
    return run, out, calib


def test_pruned_run_records_the_pruning_and_serves_generate_eval_inspect(tmp_path, capsys):
    import hashlib

    import yaml

    from hecate.train.checkpoint import resolve_checkpoint

    run, out, calib = _pruned(tmp_path)
    report = json.loads((out / "prune.json").read_text())
    assert report["calib_sha256"] == hashlib.sha256(calib.read_bytes()).hexdigest()
    assert report["calib_prompts"] == len([t for t in calib.read_text().splitlines() if t.strip()])
    assert report["experts_before"] == [4, 4] and report["val_batches"] == 1
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert cfg["train"]["out_dir"] == str(out)  # training the pruned config never writes into RUN_DIR
    assert cfg["model"]["moe_experts_per_layer"] == [2, 2]
    manifest = json.loads((Path(resolve_checkpoint(str(out / "checkpoints"))) / "manifest.json").read_text())
    pruned = manifest["extra"]["pruned"]
    assert pruned["kept_experts"] == report["kept_experts"] and pruned["calib_sha256"] == report["calib_sha256"]
    assert pruned["val_loss_after"] == report["val_loss_after"] and manifest["config"]["train"]["out_dir"] == str(out)
    assert not [p.name for p in tmp_path.iterdir() if ".prune-" in p.name]  # no temporary directory left
    capsys.readouterr()
    assert main(["generate", str(out), "--prompt", "def f", "--tokens", "6", "--temperature", "0"]) == 0
    assert "def f" in capsys.readouterr().out
    assert main(["eval", str(out), "--batches", "1", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["val_loss"] == report["val_loss_after"]
    assert main(["inspect", str(out / "config.yaml"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["total_params"] == report["params_after"]


def test_pruned_checkpoint_is_verified_on_load(tmp_path, capsys):
    from hecate.train.checkpoint import resolve_checkpoint

    _, out, _ = _pruned(tmp_path)
    shard = Path(resolve_checkpoint(str(out / "checkpoints"))) / "rank_00000.safetensors"
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))
    capsys.readouterr()
    assert main(["eval", str(out), "--batches", "1"]) == 2
    assert "rank_00000.safetensors" in capsys.readouterr().err


@pytest.mark.skipif(dist.is_available() and dist.is_initialized(), reason="needs a fresh process group")
def test_pruned_run_fine_tunes_with_train_resume(tmp_path):
    """`hecate train OUT/config.yaml --resume` continues the pruned model from its step in OUT_RUN
    (a fresh optimizer: the pruned checkpoint holds weights only)."""
    from hecate.train.config import load_config
    from hecate.train.trainer import train

    run, out, _ = _pruned(tmp_path)
    before = sorted(p.name for p in (run / "checkpoints").iterdir())
    cfg = load_config(str(out / "config.yaml"),
                      ["parallel.strategy=local", "parallel.nproc=1", "train.steps=9", "train.log_every=1",
                       "train.eval_every=9", "checkpoint.every=9", "sample.num_samples=0", "logging.heatmap=false",
                       "logging.progress=false", "data.embedded_max_bytes=100000", f"data.cache_dir={tmp_path}/cache"])
    with pytest.warns(RuntimeWarning, match="weights only .* fresh optimizer"):
        train(cfg, resume=True)
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    assert steps == [8, 9]
    model, _, step = load_run(out)
    assert step == 9 and [m.config.num_experts for m in model.moe_layers()] == [2, 2]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == before  # RUN_DIR untouched
    # --init OUT_RUN: a new run at step 0 from the pruned weights
    fresh = tmp_path / "fresh"
    cfg = load_config(str(out / "config.yaml"),
                      ["parallel.strategy=local", "parallel.nproc=1", "train.steps=2", "train.log_every=1",
                       "train.eval_every=2", "checkpoint.every=2", "sample.num_samples=0", "logging.heatmap=false",
                       "logging.progress=false", "data.embedded_max_bytes=100000", f"data.cache_dir={tmp_path}/cache",
                       f"train.init={out}", f"train.out_dir={fresh}"])
    train(cfg)
    lines = (fresh / "metrics.jsonl").read_text().splitlines()
    steps = [json.loads(line)["step"] for line in lines if '"loss"' in line]
    assert steps == [1, 2] and [m.config.num_experts for m in load_run(fresh)[0].moe_layers()] == [2, 2]
