"""Checks `hecate train` runs before any worker starts, so the common mistakes end in one
line and exit code 2 instead of a failure inside every rank.

The config and its layout for the world size are validated by load_config / validate; this
adds what needs the filesystem: out_dir writable and not used by another run (the lock is
held by the launcher for the whole run), the data source present, and with --resume a
checkpoint that verifies (manifest, every shard's size and sha256).
"""
from __future__ import annotations

import tempfile
from pathlib import Path

from hecate.train.faults import RunLock


def check_writable(out_dir: Path) -> None:
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out_dir, prefix=".hecate-probe-"):
            pass
    except OSError as e:
        raise ValueError(f"train.out_dir={out_dir} is not writable ({e.strerror or e}); "
                         "choose a directory you can write to") from None


def check_data(cfg) -> None:
    d = cfg.data
    generated = getattr(cfg, "arch", "transformer") != "transformer"  # hecate.train.tasks: generated data
    if d.source != "embedded" and not generated and not Path(d.source).is_file():
        raise ValueError(f"data.source={d.source!r} is not a file (use 'embedded', a text file or a .bin token file)")
    if d.tokenizer == "bpe":
        try:
            import tokenizers  # noqa: F401
        except ImportError:
            raise ValueError("data.tokenizer='bpe' needs the `tokenizers` package (pip install tokenizers)") from None


def check_resume(out_dir: Path) -> int:
    """The step --resume will load; raises CheckpointError / ValueError naming the bad file."""
    from hecate.train.checkpoint import verify_checkpoint

    ckpt = out_dir / "checkpoints"
    if not ckpt.is_dir():
        raise ValueError(f"--resume: no checkpoints under {ckpt}; train without --resume first "
                         "(with checkpoint.every > 0)")
    return verify_checkpoint(str(ckpt))


def preflight(cfg, world: int, resume: bool, node_rank: int = 0) -> RunLock | None:
    """Run every check; return the held run-directory lock (node 0 only), to release at the end."""
    def checks():
        check_data(cfg)
        if resume:
            check_resume(Path(cfg.train.out_dir))

    return _locked(Path(cfg.train.out_dir), node_rank, checks)


def preflight_stages(cfg, resume: bool, node_rank: int = 0) -> RunLock | None:
    """The same for a staged config (hecate.train.stages.StageConfig, generated data): out_dir
    writable and locked, and with --resume the checkpoint, the finished stages' snapshots and the
    config's agreement with them (hecate.train.stages.resume_point)."""
    from hecate.train.stages import resume_point

    return _locked(Path(cfg.out_dir), node_rank, (lambda: resume_point(cfg)) if resume else (lambda: None))


def _locked(out: Path, node_rank: int, checks) -> RunLock | None:
    check_writable(out)
    lock = RunLock(out).acquire() if node_rank == 0 else None
    try:
        checks()
    except BaseException:
        if lock is not None:
            lock.release()
        raise
    return lock
