// Direct entries (bound in csrc/extension.cpp): the same kernels as the registered ops,
// called without the op dispatcher, whose per-call cost is as large as a decode kernel.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <string>
#include <vector>

namespace sparsekernels {
namespace cpu {

// y [rows, n] computed from x [..., k] viewed as rows, with x's leading dims back.
inline at::Tensor with_leading_dims(const at::Tensor& x, const at::Tensor& y) {
  if (x.dim() == 2) return y;
  std::vector<int64_t> sizes = x.sizes().vec();
  sizes.back() = y.size(1);
  return y.view(sizes);
}

// x is what a layer of `values` with in_features inputs takes on this path: a CPU tensor
// [..., in_features] in the values' dtype (else the caller takes the checked path).
inline bool takes_rows(const at::Tensor& x, const at::Tensor& values, int64_t in_features) {
  return x.dim() >= 1 && x.size(-1) == in_features && x.device().is_cpu() &&
         x.scalar_type() == values.scalar_type() && !x.is_complex();
}

// bsr_linear_cpu for x [..., in_features] (any leading dims) with the blocks as a
// SparseLinear stores them (transposed in memory, so no packing). The layer's index was
// validated when it was built or loaded; x is checked here, and an undefined tensor comes
// back when it is not a CPU tensor of the values' dtype and width in_features (the caller
// then takes the checked path, whose error names the fix).
at::Tensor linear_inference(const at::Tensor& x, const at::Tensor& values,
                            const at::Tensor& crow_indices, const at::Tensor& col_indices,
                            const std::optional<at::Tensor>& bias, int64_t in_features);

// bsr_ffn_cpu / bsr_gated_ffn_cpu for x [..., in_features] with each layer's blocks as a
// SparseLinear stores them (a fused SparseFFN or gated MLP in eager inference); an undefined
// tensor for an x the entry does not take, as linear_inference.
at::Tensor ffn_inference(const at::Tensor& x, const at::Tensor& values1, const at::Tensor& crow1,
                         const at::Tensor& col1, const std::optional<at::Tensor>& bias1,
                         const at::Tensor& values2, const at::Tensor& crow2,
                         const at::Tensor& col2, const std::optional<at::Tensor>& bias2,
                         const std::string& activation, int64_t in_features);
at::Tensor gated_ffn_inference(
    const at::Tensor& x, const at::Tensor& values_g, const at::Tensor& crow_g,
    const at::Tensor& col_g, const std::optional<at::Tensor>& bias_g, const at::Tensor& values_u,
    const at::Tensor& crow_u, const at::Tensor& col_u, const std::optional<at::Tensor>& bias_u,
    const at::Tensor& values_d, const at::Tensor& crow_d, const at::Tensor& col_d,
    const std::optional<at::Tensor>& bias_d, const std::string& activation, int64_t in_features);

// A dense Linear (row-major weight [n, k], as nn.Linear stores it) for x [..., k] with at
// most max_rows rows, on the block-sparse dot path (dense_decode.cpp); an undefined tensor
// for a call it does not take (more rows, another dtype or device, n or k not a multiple of
// 16, a CPU without AVX-512 BF16 for bf16): the caller runs torch's.
at::Tensor dense_linear_inference(const at::Tensor& x, const at::Tensor& weight,
                                  const std::optional<at::Tensor>& bias, int64_t max_rows);

// bsr_linear_int8_cpu for x [..., in_features] (float32 or bfloat16) with the blocks packed
// as QuantizedSparseLinear caches them; scheme "auto" takes w8 up to w8_max_rows rows
// (sparsekernels.ops.precision.W8_MAX_ROWS, passed in so the rule lives in one place) and
// w8a8 above. out_dtype: float32 or bfloat16 (default x's; either for either input). The
// layer's operands are checked as the op checks them; an undefined tensor comes back for an x
// the entry does not take.
at::Tensor int8_linear_inference(const at::Tensor& x, const at::Tensor& packed,
                                 const at::Tensor& comp, const at::Tensor& scale,
                                 const at::Tensor& crow_indices, const at::Tensor& col_indices,
                                 const std::optional<at::Tensor>& bias, const std::string& scheme,
                                 int64_t in_features, int64_t w8_max_rows,
                                 std::optional<at::ScalarType> out_dtype);

// block_sparse_attention_cpu for an eager call that needs no gradient: the same checks and
// kernel, without the softmax statistics (only a backward reads them); the output only.
at::Tensor attention_inference(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                               const at::Tensor& layout, const std::optional<at::Tensor>& mask,
                               bool causal, int64_t window, double scale, int64_t block_q,
                               int64_t block_k, bool bf16_products, bool int8_qk);

// The w8a8 path in two steps, so that layers reading one input quantize it once (an
// attention's q, k and v projections): int8_quantize_rows gives x's rows as that path
// quantizes them ({codes u8 [rows, in_features], scales f32 [rows], zero points i32 [rows]};
// empty for an x it does not take), int8_linear_quantized_inference runs a layer on them
// (x gives the leading dims and the default out_dtype; the rows are checked against it, an
// undefined tensor for an x the entry does not take). The result is int8_linear_inference's
// with scheme w8a8, bit for bit.
std::vector<at::Tensor> int8_quantize_rows(const at::Tensor& x, int64_t in_features);
at::Tensor int8_linear_quantized_inference(
    const at::Tensor& x, const at::Tensor& q, const at::Tensor& xs, const at::Tensor& xz,
    const at::Tensor& packed, const at::Tensor& comp, const at::Tensor& scale,
    const at::Tensor& crow_indices, const at::Tensor& col_indices,
    const std::optional<at::Tensor>& bias, int64_t in_features,
    std::optional<at::ScalarType> out_dtype);

// The same entries with the epilogue out = layer_norm(out + residual) (a post-norm block's
// residual add and LayerNorm, on each chunk of rows the kernel finishes): residual has the
// output's shape and x's dtype; weight / bias the norm's (optional), eps its epsilon. The
// result is what add_layer_norm_cpu of the plain entry's output gives, bit for bit. An
// undefined tensor for a call without that epilogue (SparseLinear layers outside the
// AVX-512 BF16 kernels; an x or residual the entry does not take): the caller runs unfused.
at::Tensor linear_add_norm_inference(const at::Tensor& x, const at::Tensor& values,
                                     const at::Tensor& crow_indices, const at::Tensor& col_indices,
                                     const std::optional<at::Tensor>& bias, int64_t in_features,
                                     const at::Tensor& residual,
                                     const std::optional<at::Tensor>& weight,
                                     const std::optional<at::Tensor>& norm_bias, double eps);
at::Tensor ffn_add_norm_inference(const at::Tensor& x, const at::Tensor& values1,
                                  const at::Tensor& crow1, const at::Tensor& col1,
                                  const std::optional<at::Tensor>& bias1,
                                  const at::Tensor& values2, const at::Tensor& crow2,
                                  const at::Tensor& col2, const std::optional<at::Tensor>& bias2,
                                  const std::string& activation, int64_t in_features,
                                  const at::Tensor& residual,
                                  const std::optional<at::Tensor>& weight,
                                  const std::optional<at::Tensor>& norm_bias, double eps);
at::Tensor int8_linear_add_norm_inference(
    const at::Tensor& x, const at::Tensor& packed, const at::Tensor& comp, const at::Tensor& scale,
    const at::Tensor& crow_indices, const at::Tensor& col_indices,
    const std::optional<at::Tensor>& bias, const std::string& scheme, int64_t in_features,
    int64_t w8_max_rows, const at::Tensor& residual, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& norm_bias, double eps,
    std::optional<at::ScalarType> out_dtype);  // residual in out_dtype (default x's dtype)
// the int8 fused FFN (w8a8) with the epilogue
at::Tensor int8_ffn_add_norm_inference(
    const at::Tensor& x, const at::Tensor& packed1, const at::Tensor& comp1,
    const at::Tensor& scale1, const at::Tensor& crow1, const at::Tensor& col1,
    const std::optional<at::Tensor>& bias1, const at::Tensor& packed2, const at::Tensor& comp2,
    const at::Tensor& scale2, const at::Tensor& crow2, const at::Tensor& col2,
    const std::optional<at::Tensor>& bias2, const std::string& activation, int64_t in_features,
    const at::Tensor& residual, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& norm_bias, double eps);

// sparsekernels::add_layer_norm on the CPU (add_layer_norm.cpp): layer_norm(x + residual) for
// float32 / bfloat16 rows; weight and bias optional, float32 or x's dtype. Raises with what is
// wrong; the registered op add_layer_norm_cpu is the same function.
at::Tensor add_layer_norm_cpu(const at::Tensor& x, const at::Tensor& residual,
                              const std::optional<at::Tensor>& weight,
                              const std::optional<at::Tensor>& bias, double eps);

// sparsekernels::rms_norm on the CPU (rms_norm.cpp): x / rms(x) * (weight, or 1 + weight with
// offset), fp32 statistics; round_normed rounds x / rms to x's dtype before the weight. Raises
// with what is wrong; the registered op rms_norm_cpu is the same function.
at::Tensor rms_norm_cpu(const at::Tensor& x, const std::optional<at::Tensor>& weight,
                        double eps, bool offset, bool round_normed);

}  // namespace cpu
}  // namespace sparsekernels
