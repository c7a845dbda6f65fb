// The FFN activations the fused CPU kernels apply to their intermediate, in one place for
// every precision (fp32 / bf16 engine in ffn.h, bf16 and int8 kernels in lowp_*).
#pragma once

#include <ATen/ATen.h>

#include <string>

#include "vexp.h"

namespace sparsekernels {
namespace cpu {

enum class Activation { kNone, kGelu, kGeluTanh, kRelu, kSilu };

inline Activation parse_activation(const std::string& name) {
  if (name == "none") return Activation::kNone;
  if (name == "gelu") return Activation::kGelu;
  if (name == "gelu_tanh") return Activation::kGeluTanh;
  if (name == "relu") return Activation::kRelu;
  if (name == "silu") return Activation::kSilu;
  TORCH_CHECK(false, "sparsekernels: unknown FFN activation '", name,
              "'; use none, gelu, gelu_tanh, relu or silu");
}

// GELU (erf form) on float rows: gelu(x) = x (1 - erfc(z) / 2), z = x / sqrt(2), with
// erfc(|z|) = t exp(-z^2 + P(t)), t = 1 / (1 + |z| / 2) (the Chebyshev fit of Numerical Recipes'
// erfcc: relative error below 1.2e-7 for every z, so the negative side, x erfc(|z|) / 2, keeps
// float precision where 1 + erf(z) would cancel). About half of ATen's vectorised erf per
// element. A row's last partial vector goes through the same code (in a padded copy), so an
// element's result does not depend on where it sits in the row.
#if defined(__AVX512F__)
inline __m512 gelu16(__m512 x) {
  const __m512 half = _mm512_set1_ps(0.5f), one = _mm512_set1_ps(1.0f);
  const __m512 z = _mm512_abs_ps(_mm512_mul_ps(x, _mm512_set1_ps(0.70710678118654752f)));
  const __m512 t = _mm512_div_ps(one, _mm512_fmadd_ps(half, z, one));
  __m512 q = _mm512_set1_ps(0.17087277f);
  q = _mm512_fmadd_ps(q, t, _mm512_set1_ps(-0.82215223f));
  q = _mm512_fmadd_ps(q, t, _mm512_set1_ps(1.48851587f));
  q = _mm512_fmadd_ps(q, t, _mm512_set1_ps(-1.13520398f));
  q = _mm512_fmadd_ps(q, t, _mm512_set1_ps(0.27886807f));
  q = _mm512_fmadd_ps(q, t, _mm512_set1_ps(-0.18628806f));
  q = _mm512_fmadd_ps(q, t, _mm512_set1_ps(0.09678418f));
  q = _mm512_fmadd_ps(q, t, _mm512_set1_ps(0.37409196f));
  q = _mm512_fmadd_ps(q, t, _mm512_set1_ps(1.00002368f));
  q = _mm512_fmadd_ps(q, t, _mm512_set1_ps(-1.26551223f));
  const __m512 y = _mm512_fnmadd_ps(z, z, q);  // -z^2 + P(t), natural-log units
  const __m512 erfc = _mm512_mul_ps(t, exp2_avx512(_mm512_mul_ps(y, _mm512_set1_ps(1.4426950408889634f))));
  const __m512 hx = _mm512_mul_ps(half, x);
  // x >= 0: x - x erfc / 2; x < 0: x erfc / 2 (NaN stays NaN through the products)
  const __mmask16 neg = _mm512_cmp_ps_mask(x, _mm512_setzero_ps(), _CMP_LT_OQ);
  return _mm512_mask_mul_ps(_mm512_fnmadd_ps(hx, erfc, x), neg, hx, erfc);
}

inline void gelu_row_avx512(float* p, int64_t n) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) _mm512_storeu_ps(p + i, gelu16(_mm512_loadu_ps(p + i)));
  if (i < n) {
    const __mmask16 m = static_cast<__mmask16>((1u << (n - i)) - 1);
    _mm512_mask_storeu_ps(p + i, m, gelu16(_mm512_maskz_loadu_ps(m, p + i)));
  }
}
#endif

// In place on h[0:rows, 0:width] (row stride ld). ATen's vectorised kernels run serially
// here: inside an OpenMP region at::parallel_for does not spawn threads.
inline void activate(void* h, int64_t rows, int64_t width, int64_t ld, Activation act,
                     at::ScalarType st) {
  if (act == Activation::kNone || rows == 0 || width == 0) return;
#if defined(__AVX512F__)
  if (act == Activation::kGelu && st == at::kFloat) {
    for (int64_t r = 0; r < rows; ++r) gelu_row_avx512(static_cast<float*>(h) + r * ld, width);
    return;
  }
#endif
  at::Tensor t = at::from_blob(h, {rows, width}, {ld, 1}, at::TensorOptions().dtype(st));
  switch (act) {
    case Activation::kNone: break;
    case Activation::kGelu: at::gelu_(t); break;
    case Activation::kGeluTanh: at::gelu_(t, "tanh"); break;
    case Activation::kRelu: at::relu_(t); break;
    case Activation::kSilu: at::silu_(t); break;
  }
}

// The fused kernels' activation in place on a contiguous float32 CPU tensor (the unfused
// composition the tests compare the fused kernels with, bit for bit).
inline void ffn_activation_(const at::Tensor& h, const std::string& name) {
  TORCH_CHECK(h.device().is_cpu() && h.scalar_type() == at::kFloat && h.is_contiguous() &&
                  h.dim() >= 1,
              "sparsekernels.ffn_activation_: needs a contiguous float32 CPU tensor, got ",
              h.scalar_type(), " on ", h.device());
  const int64_t width = h.size(-1);
  activate(h.data_ptr<float>(), width ? h.numel() / width : 0, width, width,
           parse_activation(name), at::kFloat);
}

}  // namespace cpu
}  // namespace sparsekernels
