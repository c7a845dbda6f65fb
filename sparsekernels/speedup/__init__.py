"""SpeedUp: turn masks into a faster model, by resizing or by sparse kernels."""

from sparsekernels.speedup.io import load_model, save_model
from sparsekernels.speedup.model_speedup import ModelSpeedup, SpeedupReport

__all__ = ["ModelSpeedup", "SpeedupReport", "load_model", "save_model"]
