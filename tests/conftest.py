"""Session-wide test setup: worker pools for multi-process tests, `gpu` marker skipping."""
import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def pytest_sessionfinish(session, exitstatus):
    # Stop the spawned worker pools of hecate.testing.run_distributed before pytest exits.
    from hecate.testing import shutdown_pools

    shutdown_pools()
