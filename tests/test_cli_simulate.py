"""`hecate simulate`: whole-step predictions of ep / fsdp / fssdp at cluster scale."""
import json

import pytest

from hecate.cli import main


def _json(capsys):
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_simulate_json(capsys, tmp_path):
    png = tmp_path / "scale.png"
    rc = main(["simulate", "--model", "gpt-moe-s", "--ranks", "8", "16", "--steps", "1", "--warmup", "2",
               "--sample-layers", "1", "--json", "--plot", str(png)])
    assert rc == 0
    out = _json(capsys)
    assert [r["num_ranks"] for r in out["results"]] == [8, 16]
    for r in out["results"]:
        assert set(r["seconds_per_step"]) == {"ep", "fsdp", "fssdp"}
        assert all(s > 0 for s in r["seconds_per_step"].values())
        assert set(r["fssdp_speedup"]) == {"ep", "fsdp"}
        mem = r["memory_per_rank_bytes"]
        assert mem["fssdp"] < mem["ep"]  # fssdp shards the dense AdamW state too
    # more ranks, smaller shards
    assert out["results"][1]["memory_per_rank_bytes"]["fssdp"] < out["results"][0]["memory_per_rank_bytes"]["fssdp"]
    assert png.stat().st_size > 1000


def test_simulate_rejects_bad_input(capsys):
    assert main(["simulate", "--tokens-per-rank", "0"]) == 2
    assert "--tokens-per-rank must be >= 1" in capsys.readouterr().err
    assert main(["simulate", "--ranks", "12"]) == 2
    assert "multiple of the 8 ranks per node" in capsys.readouterr().err
    assert main(["simulate", "--hardware", "tpu"]) == 2
    assert "is not a preset" in capsys.readouterr().err
    assert main(["simulate", "--trace", "/nonexistent.jsonl"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_simulate_calibrated_hardware_charges_its_framework_terms(capsys, tmp_path):
    """A calibration file's framework terms (hecate simulate --calibrate writes them) reach the
    step breakdown: `framework` = MoE layers x (fixed + per token x tokens per rank)."""
    import dataclasses

    from hecate.sim.hardware import PRESETS

    hw = dataclasses.replace(PRESETS["a100-400g"], name="calibrated", ranks_per_node=2,
                             framework_s={"ep": [2e-3, 1e-7], "fssdp": [3e-3, 0.0]})
    path = tmp_path / "calibration.json"
    path.write_text(hw.to_json())
    args = ["simulate", "--hardware", "calibrated", "--calibration", str(path), "--model", "tiny-gpt-moe",
            "--ranks", "2", "--tokens-per-rank", "512", "--steps", "1", "--warmup", "1", "--json"]
    assert main(args) == 0
    out = _json(capsys)
    assert out["hardware"]["framework_s"]["ep"] == [2e-3, 1e-7]
    parts = out["results"][0]["parts"]
    n_moe = out["moe_layers"]
    assert parts["ep"]["framework"] == pytest.approx(n_moe * (2e-3 + 1e-7 * 512))
    assert parts["fssdp"]["framework"] == pytest.approx(n_moe * 3e-3)  # no "fssdp.replicated" term given
    assert parts["fsdp"]["framework"] == 0.0  # not calibrated: no term
