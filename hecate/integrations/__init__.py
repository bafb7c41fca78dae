"""Bridges from DeepSpeed and Megatron-core to Hecate (docs/deepspeed.md, docs/megatron.md).

Submodules are imported explicitly; only `megatron_spec` (and `deepspeed.initialize`) need
the optional libraries, everything else runs with Hecate's own dependencies.
"""
