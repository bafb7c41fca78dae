"""Hecate: fully sharded sparse data parallelism for Mixture-of-Experts training."""

__version__ = "0.1.0"
