"""The strategy interface (defined in hecate.moe.strategy, below the MoE layer that calls it).

Re-exported here for the code that imports it from hecate.parallel.
"""
from hecate.moe.strategy import ExpertStrategy

__all__ = ["ExpertStrategy"]
