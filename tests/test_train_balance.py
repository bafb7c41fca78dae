"""Aux-loss-free balancing in the trainer: after each optimizer step every rank sums the expert load
over the data-parallel world and moves its router bias toward the underloaded experts, identically."""
import torch

from hecate.testing import run_distributed

RATE = 0.05


def balance_case(rank, world, tmp_dir, strategy):
    from hecate.parallel import moe_layers
    from hecate.train.config import load_config
    from hecate.train.trainer import Trainer

    cfg = load_config("tiny_dp", [f"parallel.strategy={strategy}", f"parallel.nproc={world}",
                                  "train.steps=3", "data.embedded_max_bytes=100000", "logging.progress=false",
                                  f"data.cache_dir={tmp_dir}/cache", f"train.out_dir={tmp_dir}/run",
                                  "model.moe.aux_free_bias=true", f"model.moe.bias_update_rate={RATE}",
                                  "model.moe.aux_loss_coeff=0.0"])
    trainer = Trainer(cfg)
    layers = [layer for layer in moe_layers(trainer.model)]
    out = {"bias": [], "load": [], "local_load": []}
    for step in range(2):
        before = [layer.router.expert_bias_E.clone() for layer in layers]
        rec = trainer.train_step(step)
        out["load"].append(rec["load"])  # this step's load summed over ranks (per layer)
        out["bias"].append([(layer.router.expert_bias_E - b).tolist() for layer, b in zip(layers, before)])
        out["pending"] = [int(layer.load_since_update_E.sum()) for layer in layers]
    out["final_bias"] = [layer.router.expert_bias_E.tolist() for layer in layers]
    trainer.close()
    return out


def _check(results):
    first = results[0]
    for r in results[1:]:
        assert r["final_bias"] == first["final_bias"], "ranks must keep identical router biases"
    moved = 0
    steps = [(load, delta) for r in results for load, delta in zip(r["load"], r["bias"])]
    for load_LE, delta_LE in steps:
        for load_E, delta_E in zip(load_LE, delta_LE):
            load_E, delta_E = torch.tensor(load_E), torch.tensor(delta_E)
            expected = RATE * torch.sign(load_E.mean() - load_E)  # global load, not this rank's
            assert torch.allclose(delta_E, expected, atol=1e-6), (load_E, delta_E)
            assert (delta_E[load_E < load_E.mean()] > 0).all() and (delta_E[load_E > load_E.mean()] < 0).all()
            moved += int((delta_E != 0).sum())
    assert moved > 0
    assert first["pending"] == [0] * len(first["pending"])  # the accumulated load was consumed


def test_aux_free_bias_moves_identically_on_two_ranks(tmp_path):
    _check(run_distributed(balance_case, 2, str(tmp_path), "dp", timeout=180))


def test_aux_free_bias_under_fssdp(tmp_path):
    _check(run_distributed(balance_case, 2, str(tmp_path), "fssdp", timeout=180))


def bpe_case(rank, world, tmp_dir):
    import hashlib

    from hecate.train.config import load_config
    from hecate.train.trainer import Trainer

    cfg = load_config("tiny_dp", [f"parallel.nproc={world}", "data.embedded_max_bytes=100000",
                                  f"data.cache_dir={tmp_dir}/cache", f"train.out_dir={tmp_dir}/run",
                                  "logging.progress=false", "data.tokenizer=bpe", "model.vocab_size=320"])
    trainer = Trainer(cfg)
    try:
        tok = trainer.tokenizer
        x, _ = trainer.data.train_batch(0, rank=rank, world=world)
        return {"tokenizer": hashlib.sha256(tok.tok.to_str().encode()).hexdigest(), "vocab": tok.vocab_size,
                "split": trainer.data.split, "n": len(trainer.data.tokens), "max_id": int(x.max())}
    finally:
        trainer.close()


def test_bpe_tokenizer_is_shared_by_all_ranks(tmp_path):
    import pytest

    pytest.importorskip("tokenizers")
    a, b = run_distributed(bpe_case, 2, str(tmp_path), timeout=180)
    assert a == {**b, "max_id": a["max_id"]} and a["vocab"] == 320 and max(a["max_id"], b["max_id"]) > 255
    assert (tmp_path / "run" / "tokenizer.json").is_file()
