// The FFN activations the fused CPU kernels apply to their intermediate, in one place for
// every precision (fp32 / bf16 engine in ffn.h, bf16 and int8 kernels in lowp_*).
#pragma once

#include <ATen/ATen.h>

#include <string>

#include "cpu_features.h"

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

#ifdef SK_LOWP_X86
// GELU(x) = x / 2 * (1 + erf(x / sqrt(2))) on 16 lanes. erf is the odd / even rational
// approximation Eigen and XLA use for float (absolute error below 1e-7; the argument clamped
// to [-4, 4], where erf is +-1 in fp32): no exp, so far fewer instructions than ATen's erf,
// whose cost was a visible part of a fused low-precision FFN's time.
// A nan stays nan (min / max return their second operand when one is nan).
SK_TARGET_AVX512 inline __m512 gelu16(__m512 x) {
  const __m512 z = _mm512_max_ps(_mm512_set1_ps(-4.f),
                                 _mm512_min_ps(_mm512_set1_ps(4.f),
                                               _mm512_mul_ps(x, _mm512_set1_ps(0.70710678f))));
  const __m512 z2 = _mm512_mul_ps(z, z);
  __m512 p = _mm512_fmadd_ps(z2, _mm512_set1_ps(-2.72614225801306e-10f),
                             _mm512_set1_ps(2.77068142495902e-08f));
  p = _mm512_fmadd_ps(z2, p, _mm512_set1_ps(-2.10102402082508e-06f));
  p = _mm512_fmadd_ps(z2, p, _mm512_set1_ps(-5.69250639462346e-05f));
  p = _mm512_fmadd_ps(z2, p, _mm512_set1_ps(-7.34990630326855e-04f));
  p = _mm512_fmadd_ps(z2, p, _mm512_set1_ps(-2.95459980854025e-03f));
  p = _mm512_fmadd_ps(z2, p, _mm512_set1_ps(-1.60960333262415e-02f));
  __m512 q = _mm512_fmadd_ps(z2, _mm512_set1_ps(-1.45660718464996e-05f),
                             _mm512_set1_ps(-2.13374055278905e-04f));
  q = _mm512_fmadd_ps(z2, q, _mm512_set1_ps(-1.68282697438203e-03f));
  q = _mm512_fmadd_ps(z2, q, _mm512_set1_ps(-7.37332916720468e-03f));
  q = _mm512_fmadd_ps(z2, q, _mm512_set1_ps(-1.42647390514189e-02f));
  const __m512 erf = _mm512_div_ps(_mm512_mul_ps(z, p), q);
  const __m512 half = _mm512_mul_ps(x, _mm512_set1_ps(0.5f));
  return _mm512_fmadd_ps(half, erf, half);
}

// act on 16 lanes, for the activations with a vector form here (has_act16)
template <Activation A>
SK_TARGET_AVX512 inline __m512 act16(__m512 x) {
  if constexpr (A == Activation::kGelu) return gelu16(x);
  else if constexpr (A == Activation::kRelu) return _mm512_max_ps(_mm512_setzero_ps(), x);
  else return x;
}

inline bool has_act16(Activation act) {
  return (act == Activation::kGelu || act == Activation::kRelu || act == Activation::kNone) &&
         lowp::use_avx512();
}

template <Activation A>
SK_TARGET_AVX512 void activate16(float* h, int64_t rows, int64_t width, int64_t ld) {
  const __mmask16 tail = lowp::tail_lanes(width);
  for (int64_t t = 0; t < rows; ++t) {
    float* r = h + t * ld;
    int64_t j = 0;
    for (; j + 16 <= width; j += 16) _mm512_storeu_ps(r + j, act16<A>(_mm512_loadu_ps(r + j)));
    if (tail) _mm512_mask_storeu_ps(r + j, tail, act16<A>(_mm512_maskz_loadu_ps(tail, r + j)));
  }
}
#endif

// In place on h[0:rows, 0:width] (row stride ld), by ATen's vectorised kernels: exactly what
// F.gelu & co. give. They run serially here: inside an OpenMP region at::parallel_for does
// not spawn threads.
inline void activate_aten(void* h, int64_t rows, int64_t width, int64_t ld, Activation act,
                          at::ScalarType st) {
  if (act == Activation::kNone || rows == 0 || width == 0) return;
  at::Tensor t = at::from_blob(h, {rows, width}, {ld, 1}, at::TensorOptions().dtype(st));
  switch (act) {
    case Activation::kNone: break;
    case Activation::kGelu: at::gelu_(t); break;
    case Activation::kGeluTanh: at::gelu_(t, "tanh"); break;
    case Activation::kRelu: at::relu_(t); break;
    case Activation::kSilu: at::silu_(t); break;
  }
}

// The same, fp32 GELU / ReLU on AVX-512 (act16: within an ulp or two of ATen's, not equal)
inline void activate(void* h, int64_t rows, int64_t width, int64_t ld, Activation act,
                     at::ScalarType st) {
#ifdef SK_LOWP_X86
  if (st == at::kFloat && has_act16(act) && rows > 0 && width > 0) {
    float* f = static_cast<float*>(h);
    if (act == Activation::kGelu) activate16<Activation::kGelu>(f, rows, width, ld);
    else if (act == Activation::kRelu) activate16<Activation::kRelu>(f, rows, width, ld);
    return;
  }
#endif
  activate_aten(h, rows, width, ld, act, st);
}

}  // namespace cpu
}  // namespace sparsekernels
