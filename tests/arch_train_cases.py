"""Worker for tests/test_models_arch_train.py: `hecate train`'s Trainer on every rank of the pool."""


def train_config(rank, world, path, overrides):
    from hecate.train.config import load_config
    from hecate.train.trainer import train

    cfg = load_config(path, overrides, world_size=world)
    summary = train(cfg)
    summary.pop("seconds", None)
    return summary
