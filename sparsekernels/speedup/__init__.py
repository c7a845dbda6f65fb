"""SpeedUp: turn masks into a faster model, by resizing or by sparse kernels."""

from sparsekernels.speedup.io import CheckpointError, load_model, save_model
from sparsekernels.speedup.model_speedup import ModelSpeedup, SpeedupReport

__all__ = ["CheckpointError", "ModelSpeedup", "SpeedupReport", "load_model", "save_model"]
