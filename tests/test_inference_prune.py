"""`hecate profile` (routing statistics of two prompt sets -> a named mask generate/eval apply) and
`hecate prune` (least-used experts dropped, a smaller verified checkpoint that computes what the
full model computes with those experts disabled)."""
import json

import torch

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
    run, out = tmp_path / "run", tmp_path / "pruned"
    run.mkdir()
    _make_run(run)
    a, b = _files(tmp_path)
    calib = tmp_path / "calib.txt"
    calib.write_text(a.read_text() + b.read_text())
    assert main(["prune", str(run), "--keep", "2", "--calib", str(calib), "--out", str(out), "--batches", "1"]) == 0
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
