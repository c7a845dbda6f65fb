// The importable module sparsekernels._C. The kernels register into the `sparsekernels_C`
// op namespace (TORCH_LIBRARY_FRAGMENT in their own source files), and importing this
// module runs those registrations. The module's own functions are the direct entries that
// skip the op dispatcher where its per-call cost matters (decode): see cpu/direct.h.
#include <torch/extension.h>

#include "cpu/direct.h"

PYBIND11_MODULE(_C, m) {
  m.def("linear_inference", &sparsekernels::cpu::linear_inference,
        "bsr_linear on the CPU for an eager call that needs no gradient (SparseLinear); None "
        "when x is not [..., in_features] in the values' dtype on the CPU",
        pybind11::arg("x"), pybind11::arg("values"), pybind11::arg("crow_indices"),
        pybind11::arg("col_indices"), pybind11::arg("bias"), pybind11::arg("in_features"));
  m.def("ffn_inference", &sparsekernels::cpu::ffn_inference,
        "bsr_ffn on the CPU for an eager call that needs no gradient (a fused SparseFFN); None "
        "when x is not [..., in_features] in the values' dtype on the CPU",
        pybind11::arg("x"), pybind11::arg("values1"), pybind11::arg("crow1"),
        pybind11::arg("col1"), pybind11::arg("bias1"), pybind11::arg("values2"),
        pybind11::arg("crow2"), pybind11::arg("col2"), pybind11::arg("bias2"),
        pybind11::arg("activation"), pybind11::arg("in_features"));
  m.def("gated_ffn_inference", &sparsekernels::cpu::gated_ffn_inference,
        "bsr_gated_ffn on the CPU for an eager call that needs no gradient (a fused gated MLP); "
        "None when x is not [..., in_features] in the values' dtype on the CPU",
        pybind11::arg("x"), pybind11::arg("values_g"), pybind11::arg("crow_g"),
        pybind11::arg("col_g"), pybind11::arg("bias_g"), pybind11::arg("values_u"),
        pybind11::arg("crow_u"), pybind11::arg("col_u"), pybind11::arg("bias_u"),
        pybind11::arg("values_d"), pybind11::arg("crow_d"), pybind11::arg("col_d"),
        pybind11::arg("bias_d"), pybind11::arg("activation"), pybind11::arg("in_features"));
  m.def("dense_linear_inference", &sparsekernels::cpu::dense_linear_inference,
        "a dense Linear's forward at decode rows (the weight streamed once, no copy) for an "
        "eager call that needs no gradient; None for a call it does not take",
        pybind11::arg("x"), pybind11::arg("weight"), pybind11::arg("bias"),
        pybind11::arg("max_rows"));
  m.def("int8_linear_inference", &sparsekernels::cpu::int8_linear_inference,
        "bsr_linear_int8 on the CPU for an eager call that needs no gradient "
        "(QuantizedSparseLinear) on its packed blocks; None when x is not [..., in_features] "
        "float32 or bfloat16 on the CPU; out_dtype float32 or bfloat16 (default x's)",
        pybind11::arg("x"), pybind11::arg("packed"), pybind11::arg("comp"), pybind11::arg("scale"),
        pybind11::arg("crow_indices"), pybind11::arg("col_indices"), pybind11::arg("bias"),
        pybind11::arg("scheme"), pybind11::arg("in_features"), pybind11::arg("w8_max_rows"),
        pybind11::arg("out_dtype") = pybind11::none());
  m.def("attention_inference", &sparsekernels::cpu::attention_inference,
        "block_sparse_attention on the CPU for an eager call that needs no gradient: the op's "
        "checks and kernel without the softmax statistics; the output [B, H, Lq, D]",
        pybind11::arg("q"), pybind11::arg("k"), pybind11::arg("v"), pybind11::arg("layout"),
        pybind11::arg("mask"), pybind11::arg("causal"), pybind11::arg("window"),
        pybind11::arg("scale"), pybind11::arg("block_q"), pybind11::arg("block_k"),
        pybind11::arg("bf16_products"), pybind11::arg("int8_qk"));
  m.def("int8_quantize_rows", &sparsekernels::cpu::int8_quantize_rows,
        "x's rows quantized as the w8a8 int8 kernels quantize them: [codes (uint8), scales "
        "(float32), zero points (int32)]; empty for an x that is not [..., in_features] float32 "
        "or bfloat16 on the CPU",
        pybind11::arg("x"), pybind11::arg("in_features"));
  m.def("int8_linear_quantized_inference",
        &sparsekernels::cpu::int8_linear_quantized_inference,
        "int8_linear_inference (scheme w8a8) on rows int8_quantize_rows made from x; None for an "
        "x it does not take",
        pybind11::arg("x"), pybind11::arg("q"), pybind11::arg("xs"), pybind11::arg("xz"),
        pybind11::arg("packed"), pybind11::arg("comp"), pybind11::arg("scale"),
        pybind11::arg("crow_indices"), pybind11::arg("col_indices"), pybind11::arg("bias"),
        pybind11::arg("in_features"), pybind11::arg("out_dtype") = pybind11::none());
  // the same with a post-norm block's epilogue: layer_norm(out + residual) (cpu/direct.h)
  m.def("linear_add_norm_inference", &sparsekernels::cpu::linear_add_norm_inference,
        "linear_inference, then layer_norm(out + residual) on each finished chunk of rows (bf16 "
        "on AVX-512 BF16); None for a call without that epilogue (run unfused)",
        pybind11::arg("x"), pybind11::arg("values"), pybind11::arg("crow_indices"),
        pybind11::arg("col_indices"), pybind11::arg("bias"), pybind11::arg("in_features"),
        pybind11::arg("residual"), pybind11::arg("weight"), pybind11::arg("norm_bias"),
        pybind11::arg("eps"));
  m.def("ffn_add_norm_inference", &sparsekernels::cpu::ffn_add_norm_inference,
        "ffn_inference, then layer_norm(out + residual) on each finished chunk of rows (bf16 on "
        "AVX-512 BF16); None for a call without that epilogue (run unfused)",
        pybind11::arg("x"), pybind11::arg("values1"), pybind11::arg("crow1"),
        pybind11::arg("col1"), pybind11::arg("bias1"), pybind11::arg("values2"),
        pybind11::arg("crow2"), pybind11::arg("col2"), pybind11::arg("bias2"),
        pybind11::arg("activation"), pybind11::arg("in_features"), pybind11::arg("residual"),
        pybind11::arg("weight"), pybind11::arg("norm_bias"), pybind11::arg("eps"));
  m.def("int8_linear_add_norm_inference", &sparsekernels::cpu::int8_linear_add_norm_inference,
        "int8_linear_inference, then layer_norm(out + residual) on each finished chunk of rows; "
        "None for a call it does not take (run unfused); the residual in out_dtype (default x's)",
        pybind11::arg("x"), pybind11::arg("packed"), pybind11::arg("comp"), pybind11::arg("scale"),
        pybind11::arg("crow_indices"), pybind11::arg("col_indices"), pybind11::arg("bias"),
        pybind11::arg("scheme"), pybind11::arg("in_features"), pybind11::arg("w8_max_rows"),
        pybind11::arg("residual"), pybind11::arg("weight"), pybind11::arg("norm_bias"),
        pybind11::arg("eps"), pybind11::arg("out_dtype") = pybind11::none());
  m.def("int8_ffn_add_norm_inference", &sparsekernels::cpu::int8_ffn_add_norm_inference,
        "the fused int8 FFN (w8a8), then layer_norm(out + residual) on each chunk of rows it "
        "finishes; None for a call it does not take (run unfused)",
        pybind11::arg("x"), pybind11::arg("packed1"), pybind11::arg("comp1"),
        pybind11::arg("scale1"), pybind11::arg("crow1"), pybind11::arg("col1"),
        pybind11::arg("bias1"), pybind11::arg("packed2"), pybind11::arg("comp2"),
        pybind11::arg("scale2"), pybind11::arg("crow2"), pybind11::arg("col2"),
        pybind11::arg("bias2"), pybind11::arg("activation"), pybind11::arg("in_features"),
        pybind11::arg("residual"), pybind11::arg("weight"), pybind11::arg("norm_bias"),
        pybind11::arg("eps"));
  m.def("add_layer_norm", &sparsekernels::cpu::add_layer_norm_cpu,
        "layer_norm(x + residual) on the CPU for an eager call that needs no gradient (the op "
        "add_layer_norm_cpu without the dispatcher)",
        pybind11::arg("x"), pybind11::arg("residual"), pybind11::arg("weight"),
        pybind11::arg("bias"), pybind11::arg("eps"));
  m.def("rms_norm", &sparsekernels::cpu::rms_norm_cpu,
        "RMSNorm on the CPU for an eager call that needs no gradient (the op rms_norm_cpu "
        "without the dispatcher)",
        pybind11::arg("x"), pybind11::arg("weight"), pybind11::arg("eps"),
        pybind11::arg("offset"), pybind11::arg("round_normed"));
}
