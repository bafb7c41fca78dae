"""Inference on trained runs: KV-cached sampling, routing control from the CLI, SCMoE
self-contrast decoding, expert profiles (MoTE masks) and expert pruning. See docs/inference.md.

Sits below hecate.train on the layer map: it loads runs with train's checkpoint code."""
