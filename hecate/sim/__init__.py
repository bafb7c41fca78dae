"""Whole-step simulator (docs/simulate.md): `hecate simulate`.

shape: a model's numbers, counted on the meta device. hardware: presets and calibration
files. plans: the runtime's fssdp planner replayed without communication, ep's exchange.
bytes: per-collective byte predictions as CommStats counts them. step: the step-time model
of ep / fsdp / fssdp / fssdp_hybrid. calibrate: measure this machine. report: the CLI.
fssdp: the older MoE-only policy ranking on the planner's cost model.
"""
