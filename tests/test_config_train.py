"""TrainConfig: YAML -> dataclasses, error messages naming the key, overrides, layout checks."""
import pytest
import yaml

from hecate.train.config import TrainConfig, apply_overrides, from_dict, load_config


def _write(tmp_path, data):
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(data))
    return str(p)


def test_presets_load_and_validate():
    for name in ("demo", "tiny_dp", "tiny_ep", "tiny_fsdp", "tiny_fssdp"):
        cfg = load_config(name)
        cfg.validate(cfg.parallel.nproc)
    demo = load_config("demo")
    assert demo.parallel.strategy == "fssdp" and demo.model.moe.num_shared_experts >= 1
    assert demo.model.moe.hidden_size == demo.model.d_model  # filled from model.d_model


def test_unknown_key_gets_suggestion():
    with pytest.raises(ValueError, match=r"optim\.lrr.*did you mean optim\.lr\?"):
        from_dict({"optim": {"lrr": 1.0}})
    with pytest.raises(ValueError, match=r"model\.moe\.num_expert.*did you mean model\.moe\.num_experts"):
        from_dict({"model": {"moe": {"num_expert": 4, "ffn_hidden_size": 8}}})
    with pytest.raises(ValueError, match=r"unknown config key trian.*did you mean train"):
        from_dict({"trian": {}})


def test_bad_types_name_the_key():
    with pytest.raises(TypeError, match=r"train\.steps must be an integer"):
        from_dict({"train": {"steps": "ten"}})
    with pytest.raises(TypeError, match=r"train\.bf16 must be true or false"):
        from_dict({"train": {"bf16": 1}})
    with pytest.raises(TypeError, match=r"optim\.betas must be a list"):
        from_dict({"optim": {"betas": "x"}})
    with pytest.raises(TypeError, match=r"^optim must be a mapping"):
        from_dict({"optim": 3})
    assert from_dict({"optim": {"lr": 1}}).optim.lr == 1.0  # ints are fine where floats are expected


def test_missing_required_moe_key():
    with pytest.raises(ValueError, match=r"model\.moe\.num_experts is required"):
        from_dict({"model": {"moe": {"ffn_hidden_size": 8}}})


@pytest.mark.parametrize("section,key,value,match", [
    ("optim", "lr", 0.0, r"optim\.lr must be > 0"),
    ("optim", "grad_accum", 0, r"optim\.grad_accum must be >= 1"),
    ("optim", "min_lr", 1.0, r"optim\.min_lr must be in"),
    ("optim", "betas", [0.9, 1.5], r"optim\.betas"),
    ("optim", "impl", "adam8bit", r"optim\.impl='adam8bit' must be fused, foreach or single"),
    ("data", "val_fraction", 1.5, r"data\.val_fraction must be in \(0, 1\)"),
    ("data", "seq_len", 4096, r"data\.seq_len=4096 exceeds model\.max_seq_len"),
    ("data", "token_dtype", "int8", r"data\.token_dtype"),
    ("train", "steps", 0, r"train\.steps must be >= 1"),
    ("parallel", "strategy", "fsdpp", r"parallel\.strategy.*did you mean 'fsdp'"),
    ("checkpoint", "keep", 0, r"checkpoint\.keep must be >= 1"),
])
def test_ranges(section, key, value, match):
    with pytest.raises(ValueError, match=match):
        from_dict({section: {key: value}}).validate()


def test_moe_errors_use_config_keys():
    with pytest.raises(ValueError, match=r"model\.moe\.top_k=5 exceeds num_experts=4"):
        from_dict({"model": {"moe": {"num_experts": 4, "top_k": 5, "ffn_hidden_size": 8}}}).validate()


def test_layout_rejected_for_world_size():
    ep = {"parallel": {"strategy": "ep", "ep_size": 3}}
    with pytest.raises(ValueError, match=r"parallel\.ep_size=3 must divide the world size 4"):
        from_dict(ep).validate(4)
    with pytest.raises(ValueError, match=r"parallel\.ep_size=3 must divide model\.moe\.num_experts=4"):
        from_dict(ep).validate(3)
    from_dict({"parallel": {"strategy": "ep", "ep_size": 2}}).validate(4)
    with pytest.raises(ValueError, match=r"parallel\.strategy='local'.*world size 1"):
        from_dict({"parallel": {"strategy": "local"}}).validate(2)
    with pytest.raises(ValueError, match=r"parallel\.ep_size is only used by strategy 'ep'"):
        from_dict({"parallel": {"strategy": "dp", "ep_size": 2}}).validate(2)


def test_overrides_parse_yaml_values():
    data = {"optim": {"lr": 1.0}}
    apply_overrides(data, ["optim.lr=2e-3", "train.bf16=true", "optim.betas=[0.8, 0.9]",
                           "parallel.fssdp.policy=none", "train.out_dir=/tmp/x=y"])
    cfg = from_dict(data)
    assert cfg.optim.lr == 2e-3 and cfg.train.bf16 is True and cfg.optim.betas == (0.8, 0.9)
    assert cfg.parallel.fssdp.policy == "none" and cfg.train.out_dir == "/tmp/x=y"
    with pytest.raises(ValueError, match="must look like key.sub=value"):
        apply_overrides({}, ["optim.lr"])
    with pytest.raises(ValueError, match="empty key part"):
        apply_overrides({}, ["optim..lr=1"])
    with pytest.raises(ValueError, match=r"unknown config key optim\.lrx"):
        load_config("tiny_dp", ["optim.lrx=1"])


def test_yaml_roundtrip(tmp_path):
    cfg = load_config("demo", ["train.steps=7"])
    again = load_config(_write(tmp_path, yaml.safe_load(cfg.to_yaml())))
    assert again == cfg and again.train.steps == 7
    assert isinstance(TrainConfig().to_yaml(), str)


def test_unknown_preset_suggests():
    with pytest.raises(ValueError, match=r"did you mean 'tiny_dp'"):
        load_config("tiny_dpp")
