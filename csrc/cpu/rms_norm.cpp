// RMSNorm in one pass per row: y = x / sqrt(mean(x^2) + eps) * (weight or 1 + weight), for the
// decoder LLMs' norms (two or more per layer, each five or six ATen ops in transformers, whose
// per-op cost dominates at decode). Statistics in fp32. Two roundings, as the families
// define them: `round_normed` rounds x / rms to x's dtype before the weight multiplies it and
// the product again (Llama, Mistral, Qwen2, Phi-3: weight * h.to(input_dtype)); without it
// the product is computed in fp32 and rounded once (Gemma's x * (1 + w) in float).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cmath>
#include <type_traits>

#include "direct.h"
#include "norm_rows.h"

namespace sparsekernels {
namespace cpu {
namespace {

struct RmsArgs {
  const float* w;  // fp32 weight or nullptr
  float eps;
  bool offset;        // scale by 1 + w
  bool round_normed;  // x / rms rounded to the row dtype before the weight
};

template <typename T>
void row_generic(const T* x, int64_t n, const RmsArgs& a, T* y) {
  float sq = 0.f;
  for (int64_t j = 0; j < n; ++j) sq += lowp::load_float(x + j) * lowp::load_float(x + j);
  const float rstd = 1.f / std::sqrt(sq / static_cast<float>(n) + a.eps);
  for (int64_t j = 0; j < n; ++j) {
    float h = lowp::load_float(x + j) * rstd;
    if constexpr (std::is_same_v<T, uint16_t>)  // rounded to the rows' dtype: bf16
      if (a.round_normed) h = lowp::bf16_to_float(lowp::float_to_bf16(h));
    const float scale = a.w ? (a.offset ? 1.f + a.w[j] : a.w[j]) : 1.f;
    lowp::store_float(y + j, h * scale);
  }
}

#ifdef SK_LOWP_X86
template <typename T>
SK_TARGET_AVX512 inline __m512 out16(const T* x, int64_t j, __mmask16 m, __m512 rstd,
                                     const RmsArgs& a) {
  __m512 h = _mm512_mul_ps(load16(x + j, m), rstd);
  if constexpr (std::is_same_v<T, uint16_t>)
    if (a.round_normed) h = via_bf16(h);
  if (a.w) {
    __m512 w = load16(a.w + j, m);
    if (a.offset) w = _mm512_add_ps(w, _mm512_set1_ps(1.f));
    h = _mm512_mul_ps(h, w);
  }
  return h;
}

template <typename T>
SK_TARGET_AVX512 void rows_avx512(const T* x, int64_t n, int64_t r0, int64_t r1,
                                  const RmsArgs& a, T* y) {
  constexpr __mmask16 all = 0xffff;
  const int64_t body = n / 16 * 16;
  const __mmask16 tail = lowp::tail_lanes(n);
  for (int64_t i = r0; i < r1; ++i) {
    const T* xi = x + i * n;
    __m512 acc = _mm512_setzero_ps();
    for (int64_t j = 0; j < body; j += 16) {
      const __m512 v = load16(xi + j, all);
      acc = _mm512_fmadd_ps(v, v, acc);
    }
    if (tail) {
      const __m512 v = load16(xi + body, tail);
      acc = _mm512_fmadd_ps(v, v, acc);
    }
    const __m512 rstd = _mm512_set1_ps(
        1.f / std::sqrt(_mm512_reduce_add_ps(acc) / static_cast<float>(n) + a.eps));
    T* yi = y + i * n;
    for (int64_t j = 0; j < body; j += 16) store16(yi + j, out16(xi, j, all, rstd, a));
    if (tail) store16(yi + body, out16(xi, body, tail, rstd, a), tail);
  }
}
#endif

template <typename T>
void run(const T* x, int64_t rows, int64_t n, const RmsArgs& a, T* y) {
  const bool wide = lowp::use_avx512();
  for_row_parts(rows, n, [&](int64_t r0, int64_t r1) {
#ifdef SK_LOWP_X86
    if (wide) return rows_avx512<T>(x, n, r0, r1, a, y);
#endif
    for (int64_t i = r0; i < r1; ++i) row_generic<T>(x + i * n, n, a, y + i * n);
  });
}

}  // namespace

at::Tensor rms_norm_cpu(const at::Tensor& x, const std::optional<at::Tensor>& weight,
                        double eps, bool offset, bool round_normed) {
  check_rows(x, eps, "rms_norm");
  const int64_t n = x.size(-1);
  const at::Tensor w = norm_param(weight, n, "rms_norm", "weight");
  const at::Tensor xc = x.contiguous();
  at::Tensor y = at::empty_like(xc);
  if (xc.numel() == 0 || n == 0) return y;
  const RmsArgs a{w.defined() ? w.data_ptr<float>() : nullptr, static_cast<float>(eps), offset,
                  round_normed};
  const int64_t rows = xc.numel() / n;
  dispatch_rows(xc.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    run<T>(row_data<T>(xc), rows, n, a, row_data<T>(y));
  });
  return y;
}

}  // namespace cpu
}  // namespace sparsekernels

TORCH_LIBRARY_FRAGMENT(sparsekernels_C, m) {
  m.def("rms_norm_cpu(Tensor x, Tensor? weight, float eps, bool offset, bool round_normed) -> "
        "Tensor",
        &sparsekernels::cpu::rms_norm_cpu);
}
