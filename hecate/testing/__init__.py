"""Helpers for testing distributed code (usable by users too)."""
from hecate.testing.pool import (
    DistributedTaskError,
    RemoteTraceback,
    run_distributed,
    shutdown_pools,
)

__all__ = ["run_distributed", "shutdown_pools", "DistributedTaskError", "RemoteTraceback"]
