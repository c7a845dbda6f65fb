"""Pure-torch implementations: float64-capable, any device. The test oracle and the last
fallback when no compiled or Triton kernel can run."""
