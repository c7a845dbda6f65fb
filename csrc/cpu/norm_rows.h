// Shared pieces of the row-wise norm kernels (add_layer_norm.cpp, rms_norm.cpp): AVX-512
// loads and rounding stores of fp32 / bf16 rows, the split of rows over threads, the checks of
// the rows, epsilon and a norm's weight / bias vector, and the dispatch on the rows' dtype.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <optional>
#include <type_traits>

#include "lowp_microkernel.h"

namespace sparsekernels {
namespace cpu {

#ifdef SK_LOWP_X86
// 16 lanes of a row at p, masked for the row's tail.
SK_TARGET_AVX512 inline __m512 load16(const float* p, __mmask16 m) {
  return m == 0xffff ? _mm512_loadu_ps(p) : _mm512_maskz_loadu_ps(m, p);
}
SK_TARGET_AVX512 inline __m512 load16(const uint16_t* p, __mmask16 m) {
  const __m256i h = m == 0xffff ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))
                                : _mm256_maskz_loadu_epi16(m, p);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
SK_TARGET_AVX512 inline void store16(float* p, __m512 v, __mmask16 m) {
  _mm512_mask_storeu_ps(p, m, v);
}
SK_TARGET_AVX512 inline void store16(float* p, __m512 v) { _mm512_storeu_ps(p, v); }
// Round to nearest even as vcvtneps2bf16 (and float_to_bf16) does, with AVX-512F integer
// operations, so the bf16 rows need no AVX-512 BF16.
SK_TARGET_AVX512 inline __m256i round_bf16(__m512 v) {
  const __m512i u = _mm512_castps_si512(v);
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  const __m512i half = _mm512_add_epi32(odd, _mm512_set1_epi32(0x7fff));
  __m512i h = _mm512_srli_epi32(_mm512_add_epi32(u, half), 16);
  const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);  // quiet, sign kept
  h = _mm512_mask_or_epi32(h, nan, _mm512_srli_epi32(u, 16), _mm512_set1_epi32(0x40));
  return _mm512_cvtepi32_epi16(h);
}
SK_TARGET_AVX512 inline void store16(uint16_t* p, __m512 v, __mmask16 m) {
  _mm256_mask_storeu_epi16(p, m, round_bf16(v));
}
SK_TARGET_AVX512 inline void store16(uint16_t* p, __m512 v) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), round_bf16(v));
}
// v rounded to bf16 and widened back (what storing and reloading a bf16 value gives)
SK_TARGET_AVX512 inline __m512 via_bf16(__m512 v) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(round_bf16(v)), 16));
}
#endif

// f(r0, r1) over parts of `rows` rows of width n: one part below a fork / join's worth of
// work (a decode step's few rows), else one per thread.
template <typename F>
void for_row_parts(int64_t rows, int64_t n, const F& f) {
  const int nt = rows * n < (int64_t{1} << 15)
                     ? 1
                     : static_cast<int>(std::min<int64_t>(rows, at::get_num_threads()));
  if (nt == 1) return f(0, rows);
#pragma omp parallel num_threads(nt)
  {
    const int64_t t = omp_get_thread_num(), k = omp_get_num_threads();
    f(rows * t / k, rows * (t + 1) / k);
  }
}

// x is what op's kernel takes: float32 or bfloat16 rows on the CPU; eps finite and >= 0.
inline void check_rows(const at::Tensor& x, double eps, const char* op) {
  TORCH_CHECK(x.device().is_cpu() &&
                  (x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16),
              "sparsekernels: ", op, " takes a float32 or bfloat16 CPU x, got ", x.scalar_type(),
              " on ", x.device());
  TORCH_CHECK(x.dim() >= 1, "sparsekernels: ", op, "'s x needs a last dimension");
  TORCH_CHECK(eps >= 0 && std::isfinite(eps), "sparsekernels: ", op, "'s eps must be a ",
              "finite number >= 0, got ", eps);
}

// f(T{}) with T the element type the kernels use for rows of dtype st: float, or uint16_t
// (bf16 bits); row_data<T> the matching pointer.
template <typename F>
void dispatch_rows(at::ScalarType st, const F& f) {
  if (st == at::kBFloat16) {
    f(uint16_t{});
  } else {
    f(float{});
  }
}
template <typename T>
T* row_data(const at::Tensor& t) {
  if constexpr (std::is_same_v<T, uint16_t>) {
    return reinterpret_cast<uint16_t*>(t.data_ptr<at::BFloat16>());
  } else {
    return t.data_ptr<float>();
  }
}

// A norm's weight or bias: undefined when absent, else a float32 copy (or the tensor itself)
// after checking it is a float32 / bfloat16 CPU vector of the rows' width.
inline at::Tensor norm_param(const std::optional<at::Tensor>& p, int64_t n, const char* op,
                             const char* name) {
  if (!p.has_value() || !p->defined()) return {};
  TORCH_CHECK(p->dim() == 1 && p->size(0) == n && p->device().is_cpu() &&
                  (p->scalar_type() == at::kFloat || p->scalar_type() == at::kBFloat16),
              "sparsekernels: ", op, "'s ", name, " must be a float32 or bfloat16 CPU ",
              "vector of the rows' width ", n, ", got ", p->sizes(), " ", p->scalar_type(),
              " on ", p->device());
  return p->to(at::kFloat).contiguous();
}


}  // namespace cpu
}  // namespace sparsekernels
