"""Generated data sets for the model zoo (no downloads): procedural images for diffusion
(Switch-DiT) and interleaved two-modality token streams (Mixture-of-Mamba)."""
from hecate.data.images import NUM_SHAPE_CLASSES, shapes_batch
from hecate.data.modalities import interleaved_batch
from hecate.data.sources import InterleavedTokenData, ShapeImageData

__all__ = ["NUM_SHAPE_CLASSES", "shapes_batch", "interleaved_batch", "ShapeImageData", "InterleavedTokenData"]
