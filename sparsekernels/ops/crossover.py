"""The density above which plain dense F.linear beats the block-sparse kernel, and the key
length from which dense SDPA beats the attention kernel on an all-true layout.

Values come from bench/bench_bsr_linear.py and bench/bench_attention_full.py
(`--write-crossover`), measured per device type, dtype and block size (attention: per
device type and dtype, under "attention_full_layout"), and live in crossover.json beside
this file. Shapes without a
measurement use the defaults below. SPARSEKERNELS_DENSE_CROSSOVER overrides everything
(1.0 = never dense; 0.0 = always dense).
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path

ENV_CROSSOVER = "SPARSEKERNELS_DENSE_CROSSOVER"
_TABLE_PATH = Path(__file__).with_name("crossover.json")
# conservative defaults until measured: a sparse kernel must be clearly ahead to be chosen
_DEFAULTS = {"cpu": 0.8, "cuda": 0.5}


@functools.lru_cache(maxsize=1)
def _table() -> dict:
    try:
        return json.loads(_TABLE_PATH.read_text())
    except (OSError, ValueError):
        return {}


def dense_crossover(device_type: str, dtype, block_size) -> float:
    env = os.environ.get(ENV_CROSSOVER)
    if env:
        return float(env)
    dtype_name = str(dtype).replace("torch.", "")
    key = f"{block_size[0]}x{block_size[1]}"
    by_dtype = _table().get(device_type, {}).get(dtype_name, {})
    if key in by_dtype:
        return float(by_dtype[key])
    return _DEFAULTS.get(device_type, 0.5)


def sdpa_from_keys(device_type: str, dtype) -> int:
    """The key length from which auto runs an all-true attention layout as dense SDPA
    (0, also where unmeasured: always)."""
    dtype_name = str(dtype).replace("torch.", "")
    value = _table().get("attention_full_layout", {}).get(device_type, {}).get(dtype_name, 0)
    return int(value)
