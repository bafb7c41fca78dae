"""The real wandb logger in offline mode: the metrics a run logs are in the run directory's
wandb transaction log (out_dir/wandb/offline-run-*/run-*.wandb), read back record by record."""
import json
import struct

import pytest

wandb = pytest.importorskip("wandb")
from wandb.proto import wandb_internal_pb2  # noqa: E402

from hecate.train.config import LoggingConfig  # noqa: E402
from hecate.train.metrics import MetricsLogger  # noqa: E402

BLOCK = 32768  # the log's block size (LevelDB log format: records never straddle a block header)


def read_wandb_records(path):
    """Every protobuf Record of a .wandb file: a 7-byte header (':W&B', magic, version), then
    LevelDB-style chunks [crc32c u32][length u16][type u8][data] (full=1, first=2, middle=3, last=4)."""
    data = path.read_bytes()
    assert data[:4] == b":W&B", data[:8]
    records, pos, pending = [], 7, b""
    while pos + 7 <= len(data):
        left = BLOCK - pos % BLOCK
        if left < 7:  # block trailer padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0 and length == 0:  # zero fill at the end of a block or file
            pos += left
            continue
        chunk = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            rec = wandb_internal_pb2.Record()
            rec.ParseFromString(pending)
            records.append(rec)
            pending = b""
    return records


def test_offline_run_directory_holds_the_logged_metrics(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_MODE", raising=False)  # logging.wandb_mode (offline by default) decides
    logger = MetricsLogger(tmp_path, LoggingConfig(wandb=True, wandb_project="hecate-test"),
                           {"model": {"d_model": 32}, "optim": {"lr": 0.003}})
    assert logger.wandb is not None
    logged = [{"step": 1, "loss": 5.5, "lr": 0.001}, {"step": 2, "loss": 4.25, "lr": 0.002},
              {"step": 3, "loss": 3.125, "grad_norm": 0.75}]
    for rec in logged:
        logger.log(rec)
    logger.close()
    runs = list((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1, list((tmp_path / "wandb").rglob("*"))
    records = read_wandb_records(runs[0])
    kinds = ([r.WhichOneof("record_type") for r in records], runs[0].stat().st_size, runs[0].read_bytes()[:20])
    history = []
    config = {}
    for r in records:
        kind = r.WhichOneof("record_type")
        if kind == "history":
            row = {(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in r.history.item}
            history.append(row)
        elif kind in ("config", "run"):  # the run record carries the config given to wandb.init
            items = r.config.update if kind == "config" else r.run.config.update
            config.update({i.key: json.loads(i.value_json) for i in items})
    got = [{k: v for k, v in row.items() if not k.startswith("_")} for row in history]
    assert got == [{k: v for k, v in rec.items() if k != "step"} for rec in logged], kinds
    assert [row["_step"] for row in history] == [1, 2, 3]
    assert config["model"] == {"d_model": 32} and config["optim"] == {"lr": 0.003}
    assert (tmp_path / "metrics.jsonl").read_text().count("\n") == 3  # JSONL alongside, as always
