"""QuantizedSparseLinear: a block-sparse Linear with int8 weights, for inference.

    y = x @ (scale[:, None] * W_q).T + bias

W_q: the stored (bm, bk) blocks in int8, one float32 scale per output channel (symmetric:
scale = max|w| / 127 over the channel's stored weights). Inputs and outputs stay float32
or bfloat16 (`out_dtype` sets the output's: the attention projections of the int8 mode write
bf16 for attention's bf16 products). The kernel is chosen per call
(sparsekernels.ops.precision.int8_scheme): weight-only int8 for a few tokens (decode),
int8 x int8 with per-token activation scales for more (prefill, encoders). The state_dict
holds the int8 `values`, the `scale`s, the float32 `bias` and the block index; `.to(dtype)`
moves the module but keeps its scales and bias in float32 (the int8 values carry no float
dtype to change).

apply_dtype_ is how sparsify_ and ModelSpeedup reach it (dtype="int8"); fuse_ffn_ runs two
of these as one fused int8 FFN (sparsekernels.ops.bsr_ffn_int8), and three of a gated MLP as
one fused gated int8 FFN (sparsekernels.ops.bsr_gated_ffn_int8).
"""

from __future__ import annotations

import torch
from torch import nn

from sparsekernels.formats.block_sparse import (
    BlockSparseTensor,
    block_density,
    INDEX_NAMES,
    InvalidIndexError,
    build_index,
    check_block_size,
    check_divisible,
    validate_index,
)
from sparsekernels.nn.fused_input import FusedInputForward
from sparsekernels.ops import _ext
from sparsekernels.ops.backend import Backend
from sparsekernels.ops.bsr_ffn import activate
from sparsekernels.ops.bsr_ffn_int8 import ffn_int8_eager
from sparsekernels.ops.bsr_gated_ffn_int8 import gated_ffn_int8_eager
from sparsekernels.ops.bsr_linear_int8 import (check_int8_inputs, choose_backend,
                                               direct_int8_linear,
                                               direct_int8_linear_quantized, pack,
                                               shared_quantized_rows)
from sparsekernels.ops.eager import plain_inference
from sparsekernels.ops.precision import INT8, W8_MAX_ROWS, int8_scheme, parse_dtype
from sparsekernels.ops.reference.bsr_linear_int8 import dequantize_blocks, quantize_blocks
from sparsekernels.ops.reference.bsr_linear import bsr_to_dense

OUTPUT_DTYPES = (None, torch.float32, torch.bfloat16)


class QuantizedSparseLinear(nn.Module):
    """An int8 block-sparse Linear [out_features, in_features] in (bm, bk) blocks.

    scheme: "auto" (weight-only up to precision.W8_MAX_ROWS tokens, int8 activations above),
    "w8" or "w8a8". backend: "auto", "cpu" or "reference" (any device, pure torch).
    out_dtype: None (the input's dtype), torch.float32 or torch.bfloat16 (set_output_dtype;
    a cast of the module to another float dtype resets it to None).
    Build one with from_sparse_linear / from_linear; to_linear gives the dequantized Linear.
    """

    values: torch.Tensor
    scale: torch.Tensor
    out_dtype: torch.dtype | None = None

    def __init__(self, in_features: int, out_features: int, block_size=(32, 32), bias: bool = True,
                 block_mask: torch.Tensor | None = None, scheme: str = "auto",
                 backend: "Backend | str" = "auto", device=None):
        super().__init__()
        bm, bk = check_block_size(block_size)
        check_divisible((out_features, in_features), (bm, bk), "QuantizedSparseLinear weight")
        int8_scheme(1, scheme)  # validate
        grid = (out_features // bm, in_features // bk)
        if block_mask is None:
            block_mask = torch.ones(grid, dtype=torch.bool, device=device)
        if tuple(block_mask.shape) != grid:
            raise ValueError(f"block_mask must have shape {list(grid)} (the block grid), got "
                             f"{list(block_mask.shape)}")
        self.in_features, self.out_features = in_features, out_features
        self.block_size = (bm, bk)
        self.scheme = scheme
        self.backend = Backend.parse(backend)
        index = build_index(block_mask.to(device=device, dtype=torch.bool))
        for name in INDEX_NAMES:
            self.register_buffer(name, index[name])
        nnz = int(index["col_indices"].numel())
        self.register_buffer("values", torch.zeros(nnz, bm, bk, dtype=torch.int8, device=device))
        self.register_buffer("scale", torch.zeros(out_features, dtype=torch.float32, device=device))
        self.register_buffer("bias", torch.zeros(out_features, dtype=torch.float32, device=device)
                             if bias else None)
        self._packed_cache: tuple | None = None
        self.out_dtype = None

    def set_output_dtype(self, dtype: torch.dtype | None) -> "QuantizedSparseLinear":
        """The dtype of the outputs: None (the input's), torch.float32 or torch.bfloat16,
        whatever the input's (the kernels accumulate in fp32 and round once)."""
        if dtype not in OUTPUT_DTYPES:
            raise ValueError(f"out_dtype must be one of {OUTPUT_DTYPES}, got {dtype!r}")
        self.out_dtype = dtype
        return self

    # -- conversion -----------------------------------------------------------------------
    @classmethod
    def from_sparse_linear(cls, sparse, scheme: str = "auto",
                           backend: "Backend | str | None" = None) -> "QuantizedSparseLinear":
        """Quantize a SparseLinear's stored blocks (per output channel, symmetric int8)."""
        bm, bk = sparse.block_size
        module = cls(sparse.in_features, sparse.out_features, (bm, bk),
                     bias=sparse.bias is not None, block_mask=None, scheme=scheme,
                     backend=sparse.backend if backend is None else backend,
                     device=sparse.values.device)
        q, scale = quantize_blocks(sparse.values, sparse.row_indices, sparse.out_features // bm)
        module._adopt_layout(q.shape[0])
        with torch.no_grad():
            for name in INDEX_NAMES:
                getattr(module, name).copy_(getattr(sparse, name))
            module.values.copy_(q)
            module.scale.copy_(scale)
            if sparse.bias is not None:
                module.bias.copy_(sparse.bias.detach().float())
        return module

    @classmethod
    def from_linear(cls, linear: nn.Linear, block_size=(32, 32), sparsity: float | None = None,
                    mask: torch.Tensor | None = None, scheme: str = "auto",
                    backend: "Backend | str" = "auto") -> "QuantizedSparseLinear":
        """Prune like SparseLinear.from_linear (sparsity, or an element / block mask, or the
        blocks holding any non-zero), then quantize."""
        from sparsekernels.nn.sparse_linear import SparseLinear

        sparse = SparseLinear.from_linear(linear, block_size, sparsity=sparsity, mask=mask,
                                          backend=backend)
        return cls.from_sparse_linear(sparse, scheme=scheme)

    def dequantized_values(self, dtype=torch.float32) -> torch.Tensor:
        """The stored blocks the int8 values stand for: scale * q, [nnz, bm, bk]."""
        return dequantize_blocks(self.values, self.scale, self.row_indices, dtype)

    def to_sparse_linear(self, dtype=torch.float32):
        """The SparseLinear with the dequantized blocks (same layout)."""
        from sparsekernels.nn.sparse_linear import SparseLinear

        bm, _ = self.block_size
        grid_mask = torch.zeros(self.out_features // bm, self.in_features // self.block_size[1],
                                dtype=torch.bool, device=self.values.device)
        grid_mask[self.row_indices.long(), self.col_indices.long()] = True
        sparse = SparseLinear(self.in_features, self.out_features, self.block_size,
                              bias=self.bias is not None, block_mask=grid_mask,
                              backend=self.backend, device=self.values.device, dtype=dtype)
        with torch.no_grad():
            sparse.values.copy_(self.dequantized_values(dtype))
            if self.bias is not None:
                sparse.bias.copy_(self.bias)
        return sparse

    def to_linear(self, dtype=torch.float32) -> nn.Linear:
        """The equivalent dense nn.Linear (dequantized weights, pruned blocks as zeros)."""
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                           device=self.values.device, dtype=dtype)
        with torch.no_grad():
            linear.weight.copy_(bsr_to_dense(self.dequantized_values(torch.float64),
                                             self.row_indices, self.col_indices,
                                             (self.out_features, self.in_features)))
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        return linear

    # -- views ----------------------------------------------------------------------------
    @property
    def weight(self) -> BlockSparseTensor:
        """The int8 blocks as a [out, in] block-sparse int8 tensor, without their per-channel
        scales (`scale`), as bitsandbytes' int8 layers keep theirs: model code that reads a
        Linear's weight dtype (T5 casts its FFN input to it unless it is int8) sees int8.
        The weight's values are `to_linear().weight` (dequantized)."""
        return BlockSparseTensor(self.values, *(getattr(self, n) for n in INDEX_NAMES),
                                 shape=(self.out_features, self.in_features), check_index=False)

    @property
    def density(self) -> float:
        return block_density(self.values.shape[0], (self.out_features, self.in_features),
                             self.block_size)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"block_size={self.block_size}, density={self.density:.3f}, int8, "
                f"scheme={self.scheme}, bias={self.bias is not None}, backend={self.backend.value}"
                + (f", out_dtype={self.out_dtype}" if self.out_dtype is not None else ""))

    # -- compute --------------------------------------------------------------------------
    def packed(self, x: torch.Tensor) -> tuple:
        """(packed blocks, compensation) for the CPU kernels, cached until `values` changes
        (in place, by a load or a move; a write through `values.data` bumps no version
        counter: call clear_cache() after one); (None, None) where the kernels pack per call
        or do not run."""
        if torch.compiler.is_compiling() or x.device.type != "cpu":
            return None, None
        v, crow = self._buffers["values"], self._buffers["crow_indices"]
        if v.is_inference() or crow.is_inference():
            # inference tensors keep no version counter, so no key could see an in-place
            # edit: pack per call rather than risk stale blocks
            if choose_backend(self.backend.value, x.device) is not Backend.CPU:
                return None, None
            return pack(v, crow)
        # the backend is in the key: the router is asked again only when the cache misses
        key = (v.data_ptr(), v._version, v.device, crow._version, self.backend)
        cache = self._packed_cache
        if cache is None or cache[0] != key:
            if choose_backend(self.backend.value, x.device) is not Backend.CPU:
                return None, None
            self._packed_cache = cache = (key, *pack(v, crow))
        return cache[1:]

    def clear_cache(self) -> None:
        """Drop the packed blocks (after writing the values through `.data`)."""
        self._packed_cache = None

    def op_args(self, x: torch.Tensor) -> tuple:
        """(values, scale, crow, col, row, bias, packed, comp): what the int8 ops take."""
        b = self._buffers  # (module attribute lookups cost microseconds each at decode)
        return (b["values"], b["scale"], b["crow_indices"], b["col_indices"], b["row_indices"],
                b["bias"], *self.packed(x))

    def check_input(self, x: torch.Tensor) -> None:
        if (x.shape[-1] != self.in_features or x.dtype not in (torch.float32, torch.bfloat16)
                or x.device != self.values.device):
            check_int8_inputs(x, self.in_features, self.values, self.values.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = self._buffers  # (module attribute lookups cost as much as the kernel here)
        if (type(x) is torch.Tensor and x.device.type == "cpu"
                and b["values"].device.type == "cpu" and plain_inference(x, b["bias"])):
            # eager inference: the kernel on the cached packed blocks, without the op's
            # dispatch, which at decode costs as much as the kernel (ops/eager.py)
            direct = direct_int8_linear()
            packed, comp = self.packed(x) if direct is not None else (None, None)
            if packed is not None:
                if int8_scheme(x.numel() // max(self.in_features, 1), self.scheme) == "w8a8":
                    # int8 activations: quantized once for the layers that read this x
                    rows = shared_quantized_rows(x, self.in_features)
                    on_rows = direct_int8_linear_quantized() if rows is not None else None
                    if on_rows is not None:
                        y = on_rows(x, *rows, packed, comp, b["scale"], b["crow_indices"],
                                    b["col_indices"], b["bias"], self.in_features,
                                    self.out_dtype)
                        if y is not None:
                            return y
                y = direct(x, packed, comp, b["scale"], b["crow_indices"], b["col_indices"],
                           b["bias"], self.scheme, self.in_features, W8_MAX_ROWS,
                           self.out_dtype)
                if y is not None:
                    return y
        self.check_input(x)
        y = torch.ops.sparsekernels.bsr_linear_int8(x, *self.op_args(x), self.scheme,
                                                    self.backend.value)
        out = self.out_dtype
        return y if out is None or y.dtype == out else y.to(out)

    def add_norm_forward(self, x: torch.Tensor, residual: torch.Tensor,
                         norm: nn.LayerNorm) -> torch.Tensor | None:
        """norm(self(x) + residual) in one kernel call, the norm the kernel's epilogue on rows
        still in cache (eager CPU inference); None where that call does not run (a residual
        not in the output's dtype among them: the caller runs the layer, then the norm). The
        result is the unfused one's, bit for bit."""
        b = self._buffers
        if not (type(x) is torch.Tensor and x.device.type == "cpu"
                and b["values"].device.type == "cpu"
                and plain_inference(x, b["bias"], residual, norm.weight, norm.bias)):
            return None
        entry = _ext.direct("int8_linear_add_norm_inference")
        packed, comp = self.packed(x) if entry is not None else (None, None)
        if packed is None:
            return None
        return entry(x, packed, comp, b["scale"], b["crow_indices"], b["col_indices"], b["bias"],
                     self.scheme, self.in_features, W8_MAX_ROWS, residual, norm.weight,
                     norm.bias, float(norm.eps), self.out_dtype)

    def _adopt_layout(self, nnz: int) -> None:
        # a different number of stored blocks (another pruning run): new empty storage
        if nnz != self.values.shape[0]:
            bm, bk = self.block_size
            self.values = self.values.new_zeros(nnz, bm, bk)
            for name in ("col_indices", "row_indices", "row_indices_t", "transpose_perm"):
                setattr(self, name, getattr(self, name).new_zeros(nnz))
        self._packed_cache = None

    def _apply(self, fn, recurse=True):
        self._packed_cache = None
        kept = {n: getattr(self, n) for n in ("scale", "bias") if getattr(self, n) is not None}
        super()._apply(fn, recurse)
        for name, before in kept.items():
            after = getattr(self, name)
            if after.dtype != torch.float32:  # a dtype cast: only the device follows
                self._buffers[name] = before.to(after.device)
                self.out_dtype = None  # the activations follow the cast
        return self

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        values_key = prefix + "values"
        if values_key in state_dict:
            incoming = state_dict[values_key]
            if incoming.dtype != torch.int8:
                error_msgs.append(f"{values_key} is {incoming.dtype}; a QuantizedSparseLinear "
                                  "stores int8 values (load a SparseLinear checkpoint into a "
                                  "SparseLinear, then QuantizedSparseLinear.from_sparse_linear)")
                return
            if tuple(incoming.shape[1:]) != self.block_size:
                error_msgs.append(f"{values_key} has block size {tuple(incoming.shape[1:])}, "
                                  f"the module has {self.block_size}")
                return
            # the kernels trust the index: check it once, as SparseLinear does
            parts = {n: state_dict.get(prefix + n, getattr(self, n)) for n in INDEX_NAMES}
            parts = {n: t.to(incoming.device) if isinstance(t, torch.Tensor) else t
                     for n, t in parts.items()}
            name = prefix[:-1] if prefix.endswith(".") else (prefix or "QuantizedSparseLinear")
            try:
                validate_index(incoming.to(torch.float32), parts,
                               (self.out_features, self.in_features), name)
            except InvalidIndexError as e:
                error_msgs.append(str(e))
                return
            self._adopt_layout(incoming.shape[0])
        self._packed_cache = None
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)


# --- the fused int8 FFN inside transformers models (see sparse_ffn.fuse_ffn_) ------------
def quantized_ffn_forward(fc1: QuantizedSparseLinear, fc2: QuantizedSparseLinear,
                          activation: str, x: torch.Tensor) -> torch.Tensor:
    """fc2(act(fc1(x))) as one fused int8 op (see _fused_int8)."""
    return _fused_int8(ffn_int8_eager, (fc1, fc2), activation, x)


def quantized_gated_ffn_forward(gate: QuantizedSparseLinear, up: QuantizedSparseLinear,
                                down: QuantizedSparseLinear, activation: str,
                                x: torch.Tensor) -> torch.Tensor:
    """down(act(gate(x)) * up(x)) as one fused int8 op (see _fused_int8)."""
    return _fused_int8(gated_ffn_int8_eager, (gate, up, down), activation, x)


def _fused_int8(op, layers, activation: str, x: torch.Tensor) -> torch.Tensor:
    """One fused int8 FFN call when the layers share a scheme and a backend and the call's
    rows run w8a8 (the fused kernel); else the layers one by one, each on its own direct
    entry (few rows run weight-only layers, which the op would also run one by one, behind
    its dispatcher)."""
    first = layers[0]
    first.check_input(x)
    rows = x.numel() // x.shape[-1]
    if (any(layer.scheme != first.scheme or layer.backend != first.backend for layer in layers)
            or int8_scheme(rows, first.scheme) != "w8a8"):
        run = QuantizedSparseLinear.forward  # the layer itself, not a fused class's forward
        h = activate(run(first, x), activation)
        if len(layers) == 3:
            h = h * run(layers[1], x)
        return run(layers[-1], h)
    args = [t for layer in layers for t in layer.op_args(x)]
    return op(x, *args, activation, first.scheme, first.backend.value)


class FusedQuantizedFFNInput(FusedInputForward, QuantizedSparseLinear):
    """First layer of a fused int8 FFN (as sparse_ffn.FusedFFNInput for SparseLinear)."""

    layer_forward = QuantizedSparseLinear.forward  # the layer alone

    def ffn_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The FFN's output, without a norm."""
        state = self.__dict__["_ffn"]
        return quantized_ffn_forward(self, state.fc2, state.activation, x)

    def add_norm_forward(self, x: torch.Tensor, residual: torch.Tensor,
                         norm: nn.LayerNorm) -> torch.Tensor | None:
        """norm(FFN(x) + residual) in one fused int8 call (the norm on each chunk of rows the
        kernel finishes), where the FFN runs fused (w8a8 rows, eager CPU inference); else None."""
        state = self.__dict__["_ffn"]
        fc2 = state.fc2
        rows = x.numel() // max(1, x.shape[-1])
        if not (type(x) is torch.Tensor and x.device.type == "cpu"
                and self.values.device.type == "cpu" and fc2.scheme == self.scheme
                and fc2.backend == self.backend and int8_scheme(rows, self.scheme) == "w8a8"
                and plain_inference(x, self.bias, fc2.bias, residual, norm.weight, norm.bias)):
            return None
        entry = _ext.direct("int8_ffn_add_norm_inference")
        if entry is None:
            return None
        p1, c1 = self.packed(x)
        p2, c2 = fc2.packed(x)
        if p1 is None or p2 is None:
            return None
        b1, b2 = self._buffers, fc2._buffers
        return entry(x, p1, c1, b1["scale"], b1["crow_indices"], b1["col_indices"], b1["bias"],
                     p2, c2, b2["scale"], b2["crow_indices"], b2["col_indices"], b2["bias"],
                     state.activation, self.in_features, residual, norm.weight, norm.bias,
                     float(norm.eps))


class FusedQuantizedFFNOutput(QuantizedSparseLinear):
    """Second layer of a fused int8 FFN: passes the FFN's output through (its width is the
    output width), or applies itself to an intermediate (training with dropout)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] == self.out_features:
            return x
        return QuantizedSparseLinear.forward(self, x)


# --- how sparsify_ and ModelSpeedup reach a dtype -----------------------------------------
def apply_dtype_(model: nn.Module, dtype, names=None, scheme: str = "auto") -> list[str]:
    """Run the SparseLinear layers of `model` (those named in `names`, default all) in
    `dtype`, in place; returns the names of the layers converted to int8.

    torch.float32: nothing to do. torch.bfloat16: the whole model is cast (its sparse layers
    need bf16 inputs); the bf16 kernels run where the CPU has AVX-512 BF16. "int8" /
    torch.int8: each SparseLinear becomes a QuantizedSparseLinear (activations keep the
    model's dtype).
    """
    from sparsekernels.nn.sparse_linear import SparseLinear

    target = parse_dtype(dtype)
    int8_scheme(1, scheme)
    if target is torch.float32:
        return []
    if target is torch.bfloat16:
        model.to(torch.bfloat16)
        return []
    assert target == INT8
    chosen = [(fqn, m) for fqn, m in model.named_modules()
              if type(m) is SparseLinear and (names is None or fqn in names)]
    for fqn, module in chosen:
        parent_name, _, child = fqn.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        quantized = QuantizedSparseLinear.from_sparse_linear(module, scheme=scheme)
        quantized.train(module.training)
        setattr(parent, child, quantized)
    return [fqn for fqn, _ in chosen]
