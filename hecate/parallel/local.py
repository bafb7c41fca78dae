"""`local`: every expert on this process (defined in hecate.moe.strategy, below the MoE layer).

Re-exported here for the code that imports it from hecate.parallel.
"""
from hecate.moe.strategy import LocalStrategy

__all__ = ["LocalStrategy"]
