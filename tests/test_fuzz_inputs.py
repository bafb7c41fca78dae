"""Fuzzing what users and disks hand to Hecate: config documents and checkpoint bytes.
Every case loads, or ends in one of the project's named errors (ValueError/TypeError for
configs, CheckpointError/ValueError for checkpoints) — never another exception, never code run."""
import json
import os
import shutil
import warnings

import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hecate.train.checkpoint_io import CheckpointError
from hecate.train.config import TrainConfig, load_config

SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
KEYS = {section: list(vars(getattr(TrainConfig(), section)).keys()) for section in
        ("model", "parallel", "optim", "data", "train", "checkpoint", "logging", "sample")}
KEYS["model"] += ["moe", "preset", "arch"]

scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6), st.floats(allow_nan=True),
                    st.text(max_size=12), st.sampled_from(["fssdp", "ep", "local", "bpe", "embedded", ".inf"]))
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                       st.dictionaries(st.text(max_size=6), inner, max_size=3)),
                      max_leaves=6)
sections = st.fixed_dictionaries({}, optional={
    s: st.one_of(st.dictionaries(st.sampled_from(keys + ["bogus"]), values, max_size=4), values)
    for s, keys in KEYS.items()})


def _load(path):
    try:
        load_config(str(path))
    except (ValueError, TypeError):
        pass


@SETTINGS
@given(doc=sections)
def test_fuzzed_config_documents_end_in_named_errors(tmp_path, doc):
    path = tmp_path / "fuzz.yaml"
    path.write_text(yaml.safe_dump(doc))
    _load(path)


@SETTINGS
@given(text=st.one_of(st.text(max_size=200), st.binary(max_size=200).map(lambda b: b.decode("latin-1"))),
       tag=st.sampled_from(["", "!!python/object/apply:os.system ['touch {m}']",
                            "!!python/name:os.system", "!!binary aGk=", "&a [*a]", "{{{", "- : -"]))
def test_fuzzed_yaml_text_never_runs_code(tmp_path, text, tag):
    marker = tmp_path / "pwned"
    path = tmp_path / "fuzz.yaml"
    head = "train:\n  steps: " + tag.replace("{m}", str(marker)) + "\n"
    path.write_bytes((head + text).encode("utf-8", "surrogatepass"))
    _load(path)
    assert not marker.exists()


# ---- checkpoint bytes --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    from hecate.models.transformer import MoETransformer
    from hecate.parallel import parallelize
    from hecate.parallel.local import LocalStrategy
    from hecate.train.checkpoint import save_checkpoint
    from hecate.train.engine import Engine
    from tests.training_cases import tiny_config

    run = tmp_path_factory.mktemp("ckpt") / "checkpoints"
    torch.manual_seed(0)
    strat = LocalStrategy()
    model = parallelize(MoETransformer(tiny_config()), strat)
    engine = Engine(model, strat, None, lr=1e-3)
    from tests.training_cases import batch

    model.loss(*batch(0, 0, False))[0].backward()
    engine.step()
    save_checkpoint(str(run), model, strat, engine, 1)
    save_checkpoint(str(run), model, strat, engine, 2)
    return run


def _load_ckpt(run):
    from hecate.models.transformer import MoETransformer
    from hecate.parallel import parallelize
    from hecate.parallel.local import LocalStrategy
    from hecate.train.checkpoint import load_checkpoint
    from hecate.train.engine import Engine
    from tests.training_cases import tiny_config

    strat = LocalStrategy()
    model = parallelize(MoETransformer(tiny_config()), strat)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            load_checkpoint(str(run), model, strat, Engine(model, strat, None, lr=1e-3))
    except (CheckpointError, ValueError):
        pass


FILES = ["latest", "step_00000002/manifest.json", "step_00000002/rank_00000.safetensors",
         "step_00000001/manifest.json"]


@SETTINGS
@given(which=st.sampled_from(FILES), data=st.data())
def test_fuzzed_checkpoint_bytes_end_in_named_errors(saved, tmp_path, which, data):
    run = tmp_path / "run"
    if run.exists():
        shutil.rmtree(run)
    shutil.copytree(saved, run)
    path = run / which
    raw = bytearray(path.read_bytes())
    how = data.draw(st.sampled_from(["flip", "truncate", "replace"]))
    if how == "flip" and raw:
        for i in data.draw(st.lists(st.integers(0, len(raw) - 1), min_size=1, max_size=4)):
            raw[i] ^= data.draw(st.integers(1, 255))
    elif how == "truncate":
        raw = raw[:data.draw(st.integers(0, len(raw)))]
    else:
        raw = bytearray(data.draw(st.binary(max_size=64)))
    path.write_bytes(bytes(raw))
    _load_ckpt(run)


def _paths(obj, prefix=()):
    yield prefix
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _paths(v, prefix + (i,))


@SETTINGS
@given(data=st.data())
def test_fuzzed_manifest_values_end_in_named_errors(saved, tmp_path, data):
    run = tmp_path / "run"
    if run.exists():
        shutil.rmtree(run)
    shutil.copytree(saved, run)
    path = run / "step_00000002" / "manifest.json"
    manifest = json.loads(path.read_text())
    where = data.draw(st.sampled_from([p for p in _paths(manifest) if p]))
    node = manifest
    for k in where[:-1]:
        node = node[k]
    if data.draw(st.booleans()) and isinstance(node, dict):
        del node[where[-1]]
    else:
        node[where[-1]] = data.draw(values)
    path.write_text(json.dumps(manifest))
    _load_ckpt(run)
