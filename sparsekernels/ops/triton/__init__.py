"""Triton kernels and their launchers, one module per op (`bsr_linear.py`, ...).

Nothing is imported here: `import sparsekernels` must never import Triton, and the
kernels in a module are decorated at its import, which is when `TRITON_INTERPRET=1`
(the CPU interpreter used by the tests) has to be set already.
"""
