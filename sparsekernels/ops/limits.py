"""What the kernels can run: block sizes and head sizes, checked once, read by the router and
by the layers above (formats, nn, attention) instead of being restated there."""

from __future__ import annotations

# every kernel (CPU C++, Triton, CUDA) is instantiated for these block sides
SUPPORTED_BLOCK_SIZES = (16, 32, 64, 128)
# head dims the CPU attention kernel vectorises
CPU_HEAD_DIMS = (16, 32, 64, 128)
# head dims, dtypes and cases of the CUDA C++ attention forward
CUDA_ATTENTION_HEAD_DIMS = (32, 64, 128)


def check_block_size(block_size) -> tuple[int, int]:
    """(bm, bk) from an int or a pair, each side one of SUPPORTED_BLOCK_SIZES."""
    if isinstance(block_size, (bool, str, bytes)):
        raise ValueError(f"block_size must be an int or a pair (bm, bk), got {block_size!r}")
    if isinstance(block_size, int):
        block_size = (block_size, block_size)
    try:
        if any(isinstance(b, (bool, str, float)) for b in block_size):
            raise TypeError
        bm, bk = (int(b) for b in block_size)
    except (TypeError, ValueError):
        raise ValueError(f"block_size must be an int or a pair (bm, bk), got {block_size!r}") from None
    for b in (bm, bk):
        if b not in SUPPORTED_BLOCK_SIZES:
            raise ValueError(f"unsupported block size {(bm, bk)}: each side must be one of "
                             f"{SUPPORTED_BLOCK_SIZES}")
    return bm, bk
