"""Hardware presets of the step simulator: compute rates and alpha-beta links per link class.

A collective phase costs `alpha + bytes / beta` on the slowest rank, with the bytes
split into intra-node (alpha_intra, bw_intra) and inter-node (alpha_inter, bw_inter)
parts. `bw_inter` is what one rank gets across nodes while every rank of its node
sends across at once (the node's NIC bandwidth divided by the ranks sharing it).

Figures marked "(ours)" are assumptions, not numbers from the Hecate paper: the paper
gives its clusters as 8 x V100 nodes with 100 Gbps and 8 x A100 nodes with 400 Gbps
between nodes (/work/shared/PAPERS.md); the NVLink generations and the sustained rates
are datasheet-level guesses.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path


FRAMEWORK_KEYS = ("ep", "fsdp", "fssdp", "fssdp.replicated")


@dataclass(frozen=True)
class Hardware:
    name: str
    ranks_per_node: int
    gemm_flops: float          # sustained dense GEMM FLOP/s per rank (expert and attention matmuls)
    adam_params_per_s: float   # fused AdamW: fp32 parameters stepped per second per rank
    alpha_intra: float         # seconds of latency per collective within a node
    bw_intra: float            # bytes/s per rank within a node
    alpha_inter: float         # seconds of latency per collective across nodes
    bw_inter: float            # bytes/s per rank across nodes (NIC shared by the node's ranks)
    wire_bytes: int = 2        # bytes per element of tokens / replicas on the wire (bf16 on GPUs)
    memory_bytes: float = 0.0  # device memory per rank (0: unknown)
    note: str = ""
    # Host seconds per MoE layer per step (forward + backward) that a strategy's runtime spends
    # beyond its modelled FLOPs, collectives (alpha + bytes / beta each) and planning: Python,
    # setup of its exchanges, memory-bound ops. {key: [fixed seconds, seconds per token per
    # rank]} for the keys FRAMEWORK_KEYS; "fssdp.replicated" is the extra of an fssdp layer whose
    # plan has replicas. Calibrated (hecate.sim.calibrate.framework_costs); {} on the GPU
    # presets (not measured there).
    framework_s: dict = field(default_factory=dict)

    def __post_init__(self):
        for key in ("ranks_per_node", "gemm_flops", "adam_params_per_s", "bw_intra", "bw_inter", "wire_bytes"):
            if not getattr(self, key) > 0:
                raise ValueError(f"Hardware.{key} must be > 0, got {getattr(self, key)}")
        for key in ("alpha_intra", "alpha_inter"):
            if getattr(self, key) < 0:
                raise ValueError(f"Hardware.{key} must be >= 0, got {getattr(self, key)}")
        unknown = set(self.framework_s) - set(FRAMEWORK_KEYS)
        if unknown:
            raise ValueError(f"Hardware.framework_s has unknown keys {sorted(unknown)}; use {FRAMEWORK_KEYS}")
        bad = {k: v for k, v in self.framework_s.items()
               if not (isinstance(v, (list, tuple)) and len(v) == 2 and all(x >= 0 for x in v))}
        if bad:
            raise ValueError(f"Hardware.framework_s values must be [fixed seconds, seconds per token] >= 0, got {bad}")

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)


GBPS = 1e9 / 8  # bytes/s of one Gb/s

PRESETS: dict[str, Hardware] = {
    # Hecate paper cluster 1: 8 x V100 per node, 100 Gbps between nodes (one NIC per node, ours).
    "v100-100g": Hardware("v100-100g", 8, gemm_flops=80e12, adam_params_per_s=25e9,
                          alpha_intra=10e-6, bw_intra=130e9, alpha_inter=20e-6, bw_inter=100 * GBPS / 8,
                          memory_bytes=32e9,
                          note="paper: 8 x V100 nodes, 100 Gbps; ours: NVLink2 hybrid cube 130 GB/s per GPU, "
                               "fp16 tensor cores at 80 TFLOP/s sustained, one 100 Gbps NIC per node"),
    # Hecate paper cluster 2: 8 x A100 per node, 400 Gbps between nodes (per node, ours).
    "a100-400g": Hardware("a100-400g", 8, gemm_flops=230e12, adam_params_per_s=60e9,
                          alpha_intra=8e-6, bw_intra=240e9, alpha_inter=15e-6, bw_inter=400 * GBPS / 8,
                          memory_bytes=80e9,
                          note="paper: 8 x A100 nodes, 400 Gbps; ours: NVSwitch 240 GB/s per GPU achieved, "
                               "bf16 230 TFLOP/s sustained, 400 Gbps per node"),
    # Current clusters: 8 GPUs per node on NVLink 4 / NVSwitch, one 400 Gb/s InfiniBand NIC per GPU.
    "h100-ib400": Hardware("h100-ib400", 8, gemm_flops=600e12, adam_params_per_s=150e9,
                           alpha_intra=6e-6, bw_intra=360e9, alpha_inter=12e-6, bw_inter=400 * GBPS,
                           memory_bytes=80e9,
                           note="8 x H100 SXM, NVLink 4 (~360 GB/s achieved all-to-all per GPU, ours), "
                                "8 x 400 Gb/s IB per node, bf16 600 TFLOP/s sustained (ours)"),
    "h200-ib400": Hardware("h200-ib400", 8, gemm_flops=650e12, adam_params_per_s=200e9,
                           alpha_intra=6e-6, bw_intra=360e9, alpha_inter=12e-6, bw_inter=400 * GBPS,
                           memory_bytes=141e9,
                           note="8 x H200 SXM (H100 compute, 141 GB HBM3e, 4.8 TB/s), NVLink 4, "
                                "8 x 400 Gb/s IB per node (ours: sustained rates)"),
}

CALIBRATION_FILE = Path.home() / ".cache" / "hecate" / "calibration.json"


def get_hardware(name: str, calibration: str | Path | None = None) -> Hardware:
    """A preset by name, or "calibrated" (the file `hecate simulate --calibrate` wrote)."""
    if name == "calibrated":
        path = Path(calibration) if calibration else CALIBRATION_FILE
        if not path.is_file():
            raise ValueError(f"--hardware calibrated: no calibration at {path}; run "
                             "`hecate simulate --calibrate` first (or pass --calibration FILE)")
        data = json.loads(path.read_text())
        try:
            return Hardware(**data)
        except TypeError as e:
            raise ValueError(f"calibration file {path} does not hold Hardware fields ({e}); "
                             "run `hecate simulate --calibrate` again") from None
    if name not in PRESETS:
        raise ValueError(f"--hardware {name!r} is not a preset; use one of {sorted(PRESETS)} or 'calibrated'")
    return PRESETS[name]


def with_ranks_per_node(hw: Hardware, ranks_per_node: int | None) -> Hardware:
    return hw if ranks_per_node is None else replace(hw, ranks_per_node=ranks_per_node)
