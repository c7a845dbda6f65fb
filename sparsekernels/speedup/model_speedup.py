"""ModelSpeedup: masks -> a faster model, by resizing, by sparse kernels, or both.

    ModelSpeedup(model, dummy_input, masks, mode="resize").speedup_model()

resize: remove what is whole (heads, FFN units, hidden channels), exactly (analysis.py).
kernel: keep shapes; masked Linear / Conv1D layers become SparseLinear.
auto:   resize, then SparseLinear for layers still block-sparse below the dense crossover.
The model is changed in place and returned; `self.report` says what changed.
"""

from __future__ import annotations

import warnings
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch
from torch import nn

from sparsekernels.formats.block_sparse import block_mask_from_mask
from sparsekernels.ops.backend import Backend
from sparsekernels.ops.limits import SUPPORTED_BLOCK_SIZES, check_block_size
from sparsekernels.nn.sparse_linear import SparseLinear
from sparsekernels.ops.block_sparse_attention import FP32_PRECISIONS
from sparsekernels.ops.precision import INT8
from sparsekernels.ops.router import route
from sparsekernels.arch import find_attention, layers, names
from sparsekernels.arch.inputs import run_model
from sparsekernels.formats.masks import MaskError, validate_masks
from sparsekernels.speedup import surgery
from sparsekernels.speedup.analysis import Plan, analyze

MODES = ("resize", "kernel", "auto")
ATTENTION_BLOCK = (64, 64)
STRUCTURE_ATTR = "sparsekernels_structure"
_SPARSE_TYPES = ("Linear", "Conv1D")


def _max_sequence_length(model: nn.Module, dummy_input: Any) -> int:
    """The longest sequence an attention layout must cover (layouts crop to shorter ones)."""
    config = getattr(model, "config", None)
    for attr in ("max_position_embeddings", "n_positions", "max_length"):
        value = getattr(config, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    tensors = dummy_input.values() if isinstance(dummy_input, dict) else (
        dummy_input if isinstance(dummy_input, (tuple, list)) else [dummy_input])
    lengths = [t.shape[1] for t in tensors if isinstance(t, torch.Tensor) and t.dim() >= 2]
    return max(lengths + [512])


def count_params(model: nn.Module) -> int:
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total


def count_flops(model: nn.Module, dummy_input: Any) -> int:
    """Multiply-add FLOPs (x2) of the weight layers and attention products on one forward."""
    total = [0]
    handles = []

    def weight_hook(module, args, out):
        if not isinstance(out, torch.Tensor):
            return
        name = layers.type_name(module)
        if isinstance(module, SparseLinear):
            tokens = out.numel() // module.out_features
            total[0] += 2 * tokens * module.values.numel()
        elif name in ("Linear", "Conv1D"):
            out_f, in_f = layers.canonical_shape(module)
            total[0] += 2 * (out.numel() // max(out_f, 1)) * out_f * in_f
        elif name in ("Conv2d", "Conv1d"):
            w = module.weight
            total[0] += 2 * out.numel() * w[0].numel() // max(module.groups, 1)

    def attention_hook(block):
        def hook(module, args, kwargs, out):
            x = args[0] if args else next(iter(kwargs.values()))
            if isinstance(x, torch.Tensor) and x.dim() >= 3:
                b, length = x.shape[0], x.shape[1]
                flops = 4 * b * length * length * block.num_heads * block.head_dim
                sparse = getattr(module, "_sparsekernels_attention", None)
                if sparse is not None and sparse.layout is not None:
                    flops *= float(sparse.layout.float().mean())  # skipped blocks cost nothing
                total[0] += int(flops)
        return hook

    for module in model.modules():
        if isinstance(module, SparseLinear) or layers.type_name(module) in (
                "Linear", "Conv1D", "Conv2d", "Conv1d"):
            handles.append(module.register_forward_hook(weight_hook))
    for block in find_attention(model):
        handles.append(model.get_submodule(block.name).register_forward_hook(
            attention_hook(block), with_kwargs=True))
    try:
        with torch.no_grad():
            run_model(model, dummy_input)
    finally:
        for h in handles:
            h.remove()
    return total[0]


def _check_whole_rotary_heads(model: nn.Module, masks: dict) -> None:
    """Refuse masks that zero part of a head's query or key dimensions under rotary position
    embeddings (they rotate dimensions in pairs: only whole heads can go)."""
    for site in find_attention(model):
        if not site.rotary_dims:
            continue
        for part, name in (("q", site.q), ("k", site.k)):
            mask = masks.get(name, {}).get("weight")
            if mask is None:
                continue
            module = model.get_submodule(name)
            rows_zero = (layers.to_canonical(module, mask) == 0).all(dim=1).cpu()
            per_head = rows_zero[site.rows(part)].sum(dim=1)
            partial = [i for i, n in enumerate(per_head.tolist()) if 0 < n < site.head_dim]
            if partial:
                raise ValueError(
                    f"ModelSpeedup: the mask of {name!r} zeroes some but not all dimensions of "
                    f"{part} heads {partial}; rotary position embeddings rotate a head's "
                    "dimensions in pairs, so a head goes whole or stays: mask whole heads "
                    "(granularity 'head') or use mode='kernel' or 'auto' (which run what stays "
                    "as block-sparse weights)")


def _check_backend_runs(model: nn.Module, backend: str) -> None:
    """Refuse, before anything changes, a backend that cannot run this model's layers."""
    weights = [p for p in model.parameters() if p.is_floating_point()]
    if not weights:
        return
    try:
        route("bsr_linear", weights[0].device, weights[0].dtype, backend)
    except RuntimeError as exc:
        raise ValueError(f"ModelSpeedup: backend={backend!r} cannot run this model "
                         f"({weights[0].dtype} on {weights[0].device}): {exc}") from None


# int8 output error on the dummy input (max |dy| / max |y|) above which ModelSpeedup warns
INT8_WARN_ERROR = 0.1


@dataclass
class SpeedupReport:
    mode: str
    params_before: int = 0
    params_after: int = 0
    flops_before: int = 0
    flops_after: int = 0
    heads_removed: dict[str, list[int]] = field(default_factory=dict)
    resized: dict[str, str] = field(default_factory=dict)  # module -> "old -> new" shape
    sparse: dict[str, float] = field(default_factory=dict)  # module -> block density
    dense: dict[str, str] = field(default_factory=dict)  # masked module kept dense -> why
    fused_ffn: dict[str, str] = field(default_factory=dict)  # FFN -> "fused (act)" or why not
    decode_linears: list[str] = field(default_factory=list)  # dense Linears on the decode GEMV
    fused_add_norm: dict[str, str] = field(default_factory=dict)  # block -> "fused" or why not
    rms_norms: dict[str, str] = field(default_factory=dict)  # RMS norm -> "kernel" or why not
    # int8: max |y_int8 - y_float| / max |y_float| on the dummy input, with activations
    # quantized (w8a8) wherever the scheme may quantize them; None when not int8
    int8_output_error: float | None = None
    notes: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        def ratio(a, b):
            return f"{b / a:.3f}" if a else "n/a"

        lines = [f"ModelSpeedup ({self.mode})",
                 f"  parameters: {self.params_before:,} -> {self.params_after:,} "
                 f"(x{ratio(self.params_before, self.params_after)})",
                 f"  FLOPs:      {self.flops_before:,} -> {self.flops_after:,} "
                 f"(x{ratio(self.flops_before, self.flops_after)})"]
        if self.heads_removed:
            n = sum(len(v) for v in self.heads_removed.values())
            lines.append(f"  heads removed: {n} in {len(self.heads_removed)} attention blocks")
            lines += [f"    {k}: {v}" for k, v in self.heads_removed.items()]
        if self.resized:
            lines.append(f"  resized modules: {len(self.resized)}")
            lines += [f"    {k}: {v}" for k, v in self.resized.items()]
        if self.sparse:
            lines.append(f"  block-sparse modules (SparseLinear): {len(self.sparse)}")
            lines += [f"    {k}: density {v:.3f}" for k, v in self.sparse.items()]
        fused = [k for k, v in self.fused_ffn.items() if v.startswith("fused")]
        if self.fused_ffn:
            lines.append(f"  fused block-sparse FFNs (bsr_ffn): {len(fused)} of "
                         f"{len(self.fused_ffn)}")
            lines += [f"    {k}: {v}" for k, v in self.fused_ffn.items() if k not in fused]
        if self.fused_add_norm:
            done = [k for k, v in self.fused_add_norm.items() if v == "fused"]
            lines.append(f"  fused residual add + LayerNorm (add_layer_norm): {len(done)} of "
                         f"{len(self.fused_add_norm)}")
            lines += [f"    {k}: {v}" for k, v in self.fused_add_norm.items() if k not in done]
        if self.rms_norms:
            done = [k for k, v in self.rms_norms.items() if v == "kernel"]
            lines.append(f"  RMS norms on one op (rms_norm): {len(done)} of {len(self.rms_norms)}")
            lines += [f"    {k}: {v}" for k, v in self.rms_norms.items() if k not in done]
        if self.int8_output_error is not None:
            lines.append(f"  int8 output error on the dummy input: {self.int8_output_error:.3g}")
        if self.decode_linears:
            lines.append(f"  dense Linears on the decode GEMV (DecodeLinear): "
                         f"{len(self.decode_linears)}")
        if self.dense:
            lines.append("  masked modules left dense:")
            lines += [f"    {k}: {v}" for k, v in self.dense.items()]
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


class ModelSpeedup:
    """NNI's ModelSpeedup, for torch 2.x and transformers 4.x / 5.x.

    model: the model the masks were computed for (changed in place).
    dummy_input: a tensor, tuple or dict of model inputs (one forward is traced).
    masks: NNI masks {module_name: {"weight": 0/1, "bias": 0/1}}, e.g. a pruner's.
    mode: "resize", "kernel" or "auto". block_size: SparseLinear blocks (kernel and auto), an
    int or a pair of 16, 32, 64 or 128. backend: as SparseLinear's. Every argument is checked
    before the model changes.
    fuse_ffn: in kernel and auto modes, run each FFN whose two layers became SparseLinear as
    one fused op (sparsekernels.nn.fuse_ffn_; names and state_dict unchanged).
    dense_decode: in kernel and auto modes, the Linears left dense (an LM head, unpruned
    layers) become DecodeLinear: calls of a few rows run sparsekernels' decode GEMV on the
    CPU (sparsekernels.nn.decode_linear; parameters, tying and state_dict unchanged).
    fuse_norms: in kernel and auto modes, each post-norm block's residual add and LayerNorm
    (BERT's attention and FFN outputs) and each RMS norm (the decoder LLMs') run as one op in
    inference (sparsekernels.nn.add_norm, sparsekernels.nn.rms_norm; names and state_dict
    unchanged).
    dtype: what the sparse layers run in (kernel and auto modes): torch.float32 (default),
    torch.bfloat16 (the model is cast to bf16) or "int8" / torch.int8 (each SparseLinear
    becomes a QuantizedSparseLinear; see nn.quantized_sparse_linear.apply_dtype_). In int8
    the encoder / decoder layers' unpruned Linears are quantized too, every block kept, so a
    resized model (nothing left masked) runs int8 as well; heads and tied layers stay float.
    int8_scheme: "auto" (weight-only up to ops.precision.W8_MAX_ROWS tokens a call, int8
    activations with per-token scales above), "w8" (always weight-only: float activations) or
    "w8a8". In int8 the output on the dummy input is compared with the float model's, with
    activations quantized wherever the scheme may (report.int8_output_error). Above
    INT8_WARN_ERROR (decoder LLMs' activation outliers defeat per-token int8 activations),
    "auto" moves every layer to "w8" (report.notes says so; the record keeps it for load),
    and an error that remains, or one under an explicit scheme, warns.
    attention_fp32_precision: "ieee" (default), "bf16" or "int8": attention that runs
    sparsekernels' op on fp32 inputs (float32 and int8 modes) computes its two products in
    bf16 (fp32 softmax and accumulation, attention.set_fp32_precision_; recorded for load)
    where the CPU has AVX512-BF16; "int8" runs q k^T in int8 (per-row dynamic scales, VNNI)
    and P V in bf16 (block_sparse_attention's fp32_precision). Faster, but in int8 it adds
    their rounding to the activations' quantization error (bf16 alone was enough to cost the
    quick recipe's int8 model its accuracy bound), so it is asked for, not implied.
    """

    def __init__(self, model: nn.Module, dummy_input: Any, masks: dict, mode: str = "resize",
                 block_size=(32, 32), backend: str = "auto", fuse_ffn: bool = True,
                 dtype=None, dense_decode: bool = True, fuse_norms: bool = True,
                 int8_scheme: str = "auto", attention_fp32_precision: str = "ieee"):
        from sparsekernels.ops.precision import int8_scheme as check_scheme
        from sparsekernels.ops.precision import parse_dtype

        self.dtype = parse_dtype(dtype)
        check_scheme(1, int8_scheme)  # ValueError naming the schemes
        self.int8_scheme = int8_scheme
        if attention_fp32_precision not in FP32_PRECISIONS:
            raise ValueError(f"attention_fp32_precision must be one of {FP32_PRECISIONS}, got "
                             f"{attention_fp32_precision!r}")
        self.attention_fp32_precision = attention_fp32_precision
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if not isinstance(dummy_input, (torch.Tensor, tuple, list, Mapping)):
            raise TypeError("dummy_input must be a tensor, a tuple of tensors or a dict of model "
                            f"inputs, got {type(dummy_input).__name__}")
        if not isinstance(masks, dict):
            raise TypeError(f"masks must be a dict {{module: {{'weight': mask}}}}, got {type(masks).__name__}")
        validate_masks(model, masks)
        self.block_size = check_block_size(block_size)
        self.backend = Backend.parse(backend).value
        for flag, value in (("fuse_ffn", fuse_ffn), ("dense_decode", dense_decode),
                            ("fuse_norms", fuse_norms)):
            if not isinstance(value, bool):
                raise TypeError(f"{flag} must be True or False, got {value!r}")
        if mode in ("kernel", "auto"):
            _check_backend_runs(model, self.backend)
        if mode == "resize":
            _check_whole_rotary_heads(model, masks)
        self.model, self.dummy_input, self.masks, self.mode = model, dummy_input, masks, mode
        self.fuse_ffn, self.dense_decode = fuse_ffn, dense_decode
        self.fuse_norms = fuse_norms
        self.report = SpeedupReport(mode)
        self.structure: dict[str, list[dict]] = defaultdict(list)

    # -- steps -----------------------------------------------------------------------------
    def _fuse_ffn(self) -> None:
        from sparsekernels.nn.sparse_ffn import fuse_ffn_

        self.report.fused_ffn = fuse_ffn_(self.model)
        for name, status in self.report.fused_ffn.items():
            if status.startswith("fused"):
                self.structure[name].append({"op": "fuse_ffn"})

    def _fuse_norms(self) -> None:
        from sparsekernels.nn.add_norm import fuse_add_norm_
        from sparsekernels.nn.rms_norm import rms_norms_

        self.report.fused_add_norm = fuse_add_norm_(self.model)
        for name, status in self.report.fused_add_norm.items():
            if status == "fused":
                self.structure[name].append({"op": "fuse_add_norm"})
        self.report.rms_norms = rms_norms_(self.model)
        for name, status in self.report.rms_norms.items():
            if status == "kernel":
                self.structure[name].append({"op": "rms_norm"})

    def _dense_decode(self) -> None:
        from sparsekernels.nn.decode_linear import decode_linears_

        self.report.decode_linears = decode_linears_(self.model)
        for name in self.report.decode_linears:
            self.structure[name].append({"op": "decode_linear"})

    def _apply_dtype(self) -> None:
        from sparsekernels.nn.quantized_sparse_linear import apply_dtype_

        for name in apply_dtype_(self.model, self.dtype, names=set(self.report.sparse),
                                 scheme=self.int8_scheme):
            self.structure[name].append({"op": "quantize_int8", "scheme": self.int8_scheme})
        if self.dtype is not torch.float32:
            self.report.notes.append(f"sparse layers run in {str(self.dtype).replace('torch.', '')}")

    def _attention_products(self, precision: str) -> None:
        """attention_fp32_precision "bf16" / "int8": attention that runs sparsekernels' op
        computes its products of fp32 inputs in that precision (fp32 softmax and
        accumulation) on CPUs with AVX512-BF16 (and VNNI for int8); in int8 measured in the
        int8 output error like every int8 change."""
        try:
            from sparsekernels.attention import bf16_projections_, set_fp32_precision_
        except ImportError:  # the attention package is optional at this layer
            return
        names = set_fp32_precision_(self.model, precision)
        for name in names:
            self.structure[name].append({"op": "attention_precision",
                                         "fp32_precision": precision})
        if names:
            self.report.notes.append(
                "attention products of fp32 inputs in bf16 (fp32 softmax and accumulation) "
                "where the CPU has AVX512-BF16" if precision == "bf16" else
                "attention q k^T of fp32 inputs in int8 (per-row scales), P V in bf16, where "
                "the CPU has AVX512-VNNI and -BF16")
        # in int8, the projections around such an attention carry its rounding
        outputs = bf16_projections_(self.model)
        for name, dtype in outputs.items():
            self.structure[name].append({"op": "output_dtype",
                                         "dtype": str(dtype).replace("torch.", "")})
        if outputs:
            self.report.notes.append("int8 q / k / v projections write bf16 for attention's bf16 "
                                     "products (the output projection writes float32)")

    def _output(self) -> torch.Tensor | None:
        """The first floating tensor of the model's output on the dummy input (logits, a
        last hidden state), or None."""
        out = run_model(self.model, self.dummy_input)
        for value in (out.values() if isinstance(out, Mapping) else
                      out if isinstance(out, (tuple, list)) else (out,)):
            if isinstance(value, torch.Tensor) and value.is_floating_point():
                return value.float()
        return None

    def _check_int8(self, reference: torch.Tensor) -> None:
        """Measure the int8 model against the float one on the dummy input, with activations
        quantized wherever the scheme may (a short dummy input would take the weight-only
        path only). Under "auto", an error above INT8_WARN_ERROR with int8 activations moves
        every layer to weight-only int8 ("w8", recorded for load) and measures again; a large
        error that remains, or one under an explicit scheme, warns."""
        from sparsekernels.nn.quantized_sparse_linear import QuantizedSparseLinear

        layers_ = [m for m in self.model.modules() if isinstance(m, QuantizedSparseLinear)]
        if not layers_:
            return
        worst = "w8" if self.int8_scheme == "w8" else "w8a8"
        err = self._int8_error(layers_, worst, reference)
        if err is None:
            return
        if err > INT8_WARN_ERROR and self.int8_scheme == "auto":
            self._use_scheme(layers_, "w8")
            err_w8 = self._int8_error(layers_, "w8", reference)
            self.report.notes.append(
                f"int8_scheme='auto': int8 activations (w8a8) changed the output on the dummy "
                f"input by {err:.0%} of its largest value (activation outliers), so every layer "
                f"runs weight-only int8 (w8, float activations): {err_w8:.1%}")
            err, worst = err_w8, "w8"
        self.report.int8_output_error = err
        if err > INT8_WARN_ERROR:
            message = (f"int8 ({worst}) changes the output on the dummy input by {err:.0%} of its "
                       "largest value")
            if worst == "w8a8":
                message += ("; per-token int8 activations lose precision where a few channels "
                            "are far larger than the rest (the outlier channels of decoder "
                            "LLMs): ModelSpeedup(..., int8_scheme='w8') keeps activations in "
                            "float (weight-only int8)")
            self.report.notes.append(message)
            warnings.warn(message, stacklevel=3)

    def _int8_error(self, layers_, scheme: str, reference: torch.Tensor) -> float | None:
        """max |y - reference| / max |reference| with every int8 layer on `scheme` (the layers
        keep their own scheme after), or None when the output cannot be compared."""
        saved = [m.scheme for m in layers_]
        try:
            for m in layers_:
                m.scheme = scheme
            out = self._output()
        finally:
            for m, before in zip(layers_, saved):
                m.scheme = before
        if out is None or out.shape != reference.shape:
            return None
        return ((out - reference).abs().max() / reference.abs().max().clamp_min(1e-12)).item()

    def _use_scheme(self, layers_, scheme: str) -> None:
        """Every int8 layer and its structure record on `scheme`."""
        for m in layers_:
            m.scheme = scheme
        for ops in self.structure.values():
            for entry in ops:
                if entry.get("op") == "quantize_int8":
                    entry["scheme"] = scheme

    def _check_supported(self) -> None:
        modules = dict(self.model.named_modules())
        for name, entry in self.masks.items():
            module = modules[name]
            if layers.type_name(module) not in layers.WEIGHT_TYPES + layers.NORM_TYPES:
                raise MaskError(f"cannot speed up {name!r} ({type(module).__name__}): masks are "
                                "supported on Linear, Conv1D, Conv1d/2d, Embedding and norm layers")

    def _apply_masks(self) -> None:
        modules = dict(self.model.named_modules())
        for name, entry in self.masks.items():
            for pname, mask in entry.items():
                p = getattr(modules[name], pname)
                p.mul_(mask.to(device=p.device, dtype=p.dtype))

    def _resize(self) -> Plan:
        plan = analyze(self.model, self.dummy_input)
        cache = surgery.ParamCache()
        modules = dict(self.model.named_modules())
        self._fold_biases(plan, cache)
        for block_name, head in plan.zero_heads.items():
            block = plan.blocks[block_name]
            v = modules[block.v]
            rows = block.rows("v")[head // block.group_size]
            layers.to_canonical(v, v.weight.data)[rows] = 0
            if layers.has_bias(v):
                v.bias.data[rows] = 0
        for block_name, kept in plan.heads.items():
            block = plan.blocks[block_name]
            if len(kept) == block.num_heads:
                continue
            h, d, r = block.num_heads, block.head_dim, block.group_size
            dropped = [i for i in range(h) if i not in kept]
            gone = [g for g in range(block.num_kv_heads)
                    if not any(i // r == g for i in kept)]  # kv heads with no query head left
            for part, proj, units in (("q", block.q, dropped), ("k", block.k, gone),
                                      ("v", block.v, gone)):
                keep = plan.keep_rows(proj, layers.out_features(modules[proj]), "cpu")
                keep[block.rows(part)[units].reshape(-1)] = False
            o_keep = torch.zeros(h, d, dtype=torch.bool)
            o_keep[kept] = True
            plan.cols[block.o] = plan.keep_cols(block.o, h * d, "cpu") & o_keep.flatten()
            self.report.heads_removed[block_name] = [i for i in range(h) if i not in kept]
            self.structure[block_name].append(surgery.set_head_count(
                modules[block_name], block, len(kept), block.num_kv_heads - len(gone)))
            if hasattr(modules[block_name], names.RELATIVE_BIAS_ATTR):  # T5's shared bias
                self.structure[block_name].append(
                    surgery.install_head_subset(modules[block_name], kept, h))
        for name in sorted(set(plan.rows) | set(plan.cols)):
            module = modules[name]
            rows, cols = plan.rows.get(name), plan.cols.get(name)
            if (rows is None or rows.all()) and (cols is None or cols.all()):
                continue
            before = tuple(module.weight.shape)
            self.structure[name].append(surgery.shrink_weight_layer(
                module, None if rows is None else rows.nonzero().view(-1),
                None if cols is None else cols.nonzero().view(-1), cache))
            self.report.resized[name] = f"{list(before)} -> {list(module.weight.shape)}"
        for name, keep in plan.norms.items():
            if keep.all():
                continue
            before = modules[name].weight.shape[0]
            self.structure[name].append(surgery.shrink_norm(modules[name], keep.nonzero().view(-1), cache))
            self.report.resized[name] = f"[{before}] -> [{int(keep.sum())}] (normalised over {before})"
        for (owner, attr), keep in plan.params.items():
            if keep.all():
                continue
            self.structure[owner].append(surgery.shrink_param(modules[owner], attr,
                                                              keep.nonzero().view(-1), cache))
            self.report.resized[f"{owner}.{attr}"] = f"last dim -> {int(keep.sum())}"
        self._retie_weights()
        self.report.notes += plan.notes
        return plan

    def _fold_biases(self, plan: Plan, cache: "surgery.ParamCache") -> None:
        modules = dict(self.model.named_modules())
        for name, delta in plan.bias_folds.items():
            module = modules[name]
            if not layers.has_bias(module):
                self.structure[name].append(surgery.add_bias(module, cache))
            module.bias.data += torch.as_tensor(delta).to(module.bias)

    def _heads_to_layouts(self) -> None:
        """Kernel mode: removable heads become all-false rows of the block-sparse attention
        layout (no FLOPs, no loads); their constant contribution is folded as in resize."""
        from sparsekernels.speedup.analysis import plan_heads

        plan = Plan()
        plan_heads(self.model, find_attention(self.model), plan, uniform_groups=False)
        removed = {}
        for name, kept in plan.heads.items():
            heads = plan.blocks[name].num_heads
            drop = [h for h in range(heads) if h not in kept or plan.zero_heads.get(name) == h]
            if drop:
                removed[name] = (heads, drop)
        if not removed:
            return
        try:
            from sparsekernels.attention import attention_modules
            from sparsekernels.attention.integration import unsupported
        except ImportError as exc:  # the attention package is optional at this layer
            self.report.notes.append(f"heads stay dense: block-sparse attention unavailable ({exc})")
            return
        runnable = {n for n, m in attention_modules(self.model) if unsupported(m) is None}
        layouts = {}
        for name, (heads, drop) in removed.items():
            if name not in runnable:
                self.report.notes.append(f"{name}: heads {drop} stay dense (this attention "
                                         "module cannot run the block-sparse op)")
                continue
            keep = [h not in drop for h in range(heads)]
            layouts[name] = keep
            self.report.heads_removed[name] = drop
        if not layouts:
            return
        # fold the value biases of the heads that now run empty, and only theirs
        outputs = {plan.blocks[name].o for name in layouts}
        plan.bias_folds = {o: d for o, d in plan.bias_folds.items() if o in outputs}
        self._fold_biases(plan, surgery.ParamCache())
        seq = _max_sequence_length(self.model, self.dummy_input)
        for name, keep in layouts.items():
            self.structure[name].append({"op": "attention_layout", "keep": keep, "seq_len": seq,
                                         "block_size": list(ATTENTION_BLOCK)})
        surgery.enable_head_layouts(self.model, {n: c[-1] for n, c in self.structure.items()
                                                 if c and c[-1]["op"] == "attention_layout"})

    def _attention_to_kernel(self) -> None:
        """Kernel and auto modes: attention without pruned heads also runs the block-sparse
        op (no layout: every block) where the router runs a kernel that beats SDPA on short
        keys (Route.dense_full_from; per call the op still takes SDPA from there on).
        Nothing changes where head layouts are installed already or a module cannot run
        the op."""
        param = next(self.model.parameters(), None)
        try:
            from sparsekernels.attention import attention_modules
            from sparsekernels.attention.integration import unsupported
        except ImportError:
            return
        mods = attention_modules(self.model)
        if (param is None or not mods
                or any(getattr(m, "_sparsekernels_attention", None) is not None for _, m in mods)
                or any(unsupported(m) is not None for _, m in mods)):
            return
        dtype = torch.bfloat16 if self.dtype is torch.bfloat16 else param.dtype
        for site in find_attention(self.model):
            r = route("block_sparse_attention", param.device, dtype, "auto",
                      head_dim=site.head_dim)
            if not (r.dense_full_layout and r.dense_full_from > 0):
                return
        for name, _ in mods:
            self.structure[name].append({"op": "attention_kernel",
                                         "block_size": list(ATTENTION_BLOCK)})
        surgery.enable_attention_kernel(self.model, [n for n, _ in mods], ATTENTION_BLOCK)
        self.report.notes.append("attention runs the block-sparse op (every block): its kernel "
                                 "below the key length measured for SDPA, SDPA from there on")

    def _retie_weights(self) -> None:
        # transformers re-ties input and output embeddings on demand; keep that working
        tie = getattr(self.model, "tie_weights", None)
        if callable(tie) and getattr(getattr(self.model, "config", None), "tie_word_embeddings", False):
            try:
                tie()
            except Exception:  # tying is a convenience here; shapes were already made equal
                pass

    def _to_kernels(self, only_below_crossover: bool) -> None:
        modules = dict(self.model.named_modules())
        shared = self._shared_weights(modules)
        for name in self.masks:
            module = modules.get(name)
            if module is None or layers.type_name(module) not in _SPARSE_TYPES:
                continue
            if id(module.weight) in shared:
                self.report.dense[name] = ("its weight is tied to another module (e.g. an LM "
                                           "head tied to the embeddings): kept dense and tied")
                continue
            weight = layers.to_canonical(module, module.weight.detach())
            if bool((weight != 0).all()):
                continue  # nothing left masked (e.g. removed by the resize)
            block = self._block_for(weight.shape)
            if block is None:
                self.report.dense[name] = (f"shape {list(weight.shape)} is not divisible by any "
                                           f"block size <= {self.block_size}")
                continue
            density = float(block_mask_from_mask(weight, block).float().mean())
            # auto mode keeps dense what auto's route would run dense anyway
            r = route("bsr_linear", weight.device, weight.dtype, "auto",
                      block_size=block, density=density)
            if only_below_crossover and r.dense:
                self.report.dense[name] = f"block density {density:.2f} is above the dense crossover"
                continue
            self._to_sparse_linear(name, module, weight, block, modules)

    def _dense_to_int8(self) -> None:
        """In int8, the layers' Linears still dense are stored whole (every block) and
        quantized with the sparse ones: int8 products beat float32 ones at any density, so
        auto's float32 crossover does not apply. Heads, poolers and tied layers stay float."""
        from sparsekernels.arch import layer_linears

        modules = dict(self.model.named_modules())
        shared = self._shared_weights(modules)
        whole = []
        for name in layer_linears(self.model):
            module = modules[name]
            if id(module.weight) in shared:
                continue
            weight = layers.to_canonical(module, module.weight.detach())
            block = self._block_for(weight.shape)
            if block is None:
                self.report.dense.setdefault(name, f"int8: shape {list(weight.shape)} is not "
                                             f"divisible by any block size <= {self.block_size}")
                continue
            self.report.dense.pop(name, None)  # e.g. above auto's float32 crossover
            self._to_sparse_linear(name, module, weight, block, modules, mask=torch.ones_like(weight))
            whole.append(name)
        if whole:
            self.report.notes.append(f"int8: {len(whole)} unpruned Linear layers of the encoder / "
                                     "decoder layers stored whole (every block) to run int8")

    @staticmethod
    def _shared_weights(modules: dict) -> set[int]:
        owners: dict[int, int] = {}
        for module in modules.values():
            for p in module.parameters(recurse=False):
                owners[id(p)] = owners.get(id(p), 0) + 1
        return {k for k, n in owners.items() if n > 1}

    def _to_sparse_linear(self, name: str, module: nn.Module, weight: torch.Tensor, block,
                          modules: dict, mask: torch.Tensor | None = None) -> None:
        linear = nn.Linear(weight.shape[1], weight.shape[0], bias=layers.has_bias(module),
                           device=weight.device, dtype=weight.dtype)
        linear.weight.data.copy_(weight)
        if layers.has_bias(module):
            linear.bias.data.copy_(module.bias.detach())
        sparse = SparseLinear.from_linear(linear, block, mask=(weight != 0) if mask is None else mask,
                                          backend=self.backend)
        sparse.train(module.training)
        parent_name, _, child = name.rpartition(".")
        setattr(modules[parent_name] if parent_name else self.model, child, sparse)
        self.report.sparse[name] = sparse.density
        self.structure[name].append({"op": "sparse_linear", "in_features": sparse.in_features,
                                     "out_features": sparse.out_features,
                                     "block_size": list(block), "bias": sparse.bias is not None,
                                     "backend": self.backend})

    def _block_for(self, shape) -> tuple[int, int] | None:
        bm, bk = self.block_size
        for cand in ((bm, bk),) + tuple((b, b) for b in sorted(SUPPORTED_BLOCK_SIZES, reverse=True)
                                       if b <= max(bm, bk)):
            if shape[0] % cand[0] == 0 and shape[1] % cand[1] == 0:
                return cand
        return None

    # -- entry point -----------------------------------------------------------------------
    def speedup_model(self) -> nn.Module:
        self._check_supported()
        was_training = self.model.training
        self.model.eval()  # dropout off: the analysis reads constants from one forward
        try:
            with torch.no_grad():
                self.report.params_before = count_params(self.model)
                self.report.flops_before = count_flops(self.model, self.dummy_input)
                self._apply_masks()
                if self.mode in ("resize", "auto"):
                    self._resize()
                if self.mode == "kernel":
                    self._heads_to_layouts()
                if self.mode in ("kernel", "auto"):
                    self._attention_to_kernel()
                if self.mode in ("kernel", "auto"):
                    self._to_kernels(only_below_crossover=self.mode == "auto")
                    if self.dtype == INT8:
                        self._dense_to_int8()
                self.report.params_after = count_params(self.model)
                self.report.flops_after = count_flops(self.model, self.dummy_input)
                if self.mode in ("kernel", "auto"):
                    reference = self._output() if self.dtype == INT8 else None
                    self._apply_dtype()
                    if self.attention_fp32_precision != "ieee":
                        self._attention_products(self.attention_fp32_precision)
                    if reference is not None:
                        self._check_int8(reference)
                if self.mode in ("kernel", "auto") and self.fuse_ffn:
                    self._fuse_ffn()
                if self.mode in ("kernel", "auto") and self.dense_decode:
                    self._dense_decode()
                if self.mode in ("kernel", "auto") and self.fuse_norms:
                    self._fuse_norms()
        finally:
            self.model.train(was_training)
        record = dict(getattr(self.model, "_" + STRUCTURE_ATTR, {}) or {})
        for name, changes in self.structure.items():
            record.setdefault(name, []).extend(changes)
        setattr(self.model, "_" + STRUCTURE_ATTR, record)
        config = getattr(self.model, "config", None)
        if config is not None:
            setattr(config, STRUCTURE_ATTR, record)
        return self.model
