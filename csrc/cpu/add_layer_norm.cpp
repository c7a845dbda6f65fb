// A residual add and the LayerNorm after it in one pass over each row:
// y = (s - mean(s)) / sqrt(var(s) + eps) * weight + bias, s = x + residual, for the post-norm
// blocks of BERT-style encoders (each attention and FFN output). torch runs the two as an add
// and a layer_norm, which read and write the activations five times; here each row is read
// once, kept in L1 in fp32 (s is never rounded to bf16, as torch's bf16 add rounds it), and
// written once. fp32 and bf16 rows; statistics in fp32, two passes (mean, then the squared
// deviations), as accurate as torch's.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

#include "direct.h"
#include "norm_rows.h"

namespace sparsekernels {
namespace cpu {
namespace {

// One row, portable: s into buf, then the statistics and the output.
template <typename T>
void row_generic(const T* x, const T* r, const float* w, const float* b, float eps, int64_t n,
                 float* buf, T* y) {
  float sum = 0.f;
  for (int64_t j = 0; j < n; ++j) {
    buf[j] = lowp::load_float(x + j) + lowp::load_float(r + j);
    sum += buf[j];
  }
  const float mean = sum / static_cast<float>(n);
  float sq = 0.f;
  for (int64_t j = 0; j < n; ++j) sq += (buf[j] - mean) * (buf[j] - mean);
  const float rstd = 1.f / std::sqrt(sq / static_cast<float>(n) + eps);
  for (int64_t j = 0; j < n; ++j) {
    const float v = (buf[j] - mean) * rstd;
    lowp::store_float(y + j, (w ? v * w[j] : v) + (b ? b[j] : 0.f));
  }
}

#ifdef SK_LOWP_X86
// (buf[j:j+16] - mean) * rstd * w + b
SK_TARGET_AVX512 inline __m512 normed(const float* buf, const float* w, const float* b, int64_t j,
                                      __mmask16 m, __m512 mean, __m512 rstd) {
  __m512 v = _mm512_mul_ps(_mm512_sub_ps(load16(buf + j, m), mean), rstd);
  if (w) v = _mm512_mul_ps(v, load16(w + j, m));
  if (b) v = _mm512_add_ps(v, load16(b + j, m));
  return v;
}

// Rows [r0, r1), each: s = x + r into buf (16 partial sums of the mean), the squared
// deviations from buf, then the output from buf. Masked loads and stores only for a row's
// tail: some CPUs (AMD Zen 4) run masked stores at a fraction of the plain ones' rate.
template <typename T>
SK_TARGET_AVX512 void rows_avx512(const T* x, const T* r, const float* w, const float* b,
                                  float eps, int64_t n, int64_t r0, int64_t r1, float* buf, T* y) {
  constexpr __mmask16 all = 0xffff;
  const int64_t body = n / 16 * 16;
  const __mmask16 tail = static_cast<__mmask16>((1u << (n - body)) - 1u);
  const float inv_n = 1.f / static_cast<float>(n);
  for (int64_t i = r0; i < r1; ++i) {
    const T* xi = x + i * n;
    const T* ri = r + i * n;
    __m512 acc = _mm512_setzero_ps();
    for (int64_t j = 0; j < body; j += 16) {
      const __m512 s = _mm512_add_ps(load16(xi + j, all), load16(ri + j, all));
      _mm512_storeu_ps(buf + j, s);
      acc = _mm512_add_ps(acc, s);
    }
    if (tail) {
      const __m512 s = _mm512_add_ps(load16(xi + body, tail), load16(ri + body, tail));
      _mm512_mask_storeu_ps(buf + body, tail, s);
      acc = _mm512_add_ps(acc, s);  // masked lanes are 0
    }
    const __m512 mv = _mm512_set1_ps(_mm512_reduce_add_ps(acc) * inv_n);
    acc = _mm512_setzero_ps();
    for (int64_t j = 0; j < body; j += 16) {
      const __m512 d = _mm512_sub_ps(_mm512_loadu_ps(buf + j), mv);
      acc = _mm512_fmadd_ps(d, d, acc);
    }
    if (tail) {
      const __m512 d = _mm512_maskz_sub_ps(tail, _mm512_maskz_loadu_ps(tail, buf + body), mv);
      acc = _mm512_fmadd_ps(d, d, acc);
    }
    const __m512 rv = _mm512_set1_ps(1.f / std::sqrt(_mm512_reduce_add_ps(acc) * inv_n + eps));
    T* yi = y + i * n;
    for (int64_t j = 0; j < body; j += 16) store16(yi + j, normed(buf, w, b, j, all, mv, rv));
    if (tail) store16(yi + body, normed(buf, w, b, body, tail, mv, rv), tail);
  }
}
#endif

template <typename T>
void run(const T* x, const T* r, const float* w, const float* b, float eps, int64_t rows, int64_t n,
         T* y) {
  const bool wide = lowp::use_avx512();
  for_row_parts(rows, n, [&](int64_t r0, int64_t r1) {
    std::vector<float> buf(n);
#ifdef SK_LOWP_X86
    if (wide) return rows_avx512<T>(x, r, w, b, eps, n, r0, r1, buf.data(), y);
#endif
    for (int64_t i = r0; i < r1; ++i)
      row_generic<T>(x + i * n, r + i * n, w, b, eps, n, buf.data(), y + i * n);
  });
}

}  // namespace

at::Tensor add_layer_norm_cpu(const at::Tensor& x, const at::Tensor& residual,
                              const std::optional<at::Tensor>& weight,
                              const std::optional<at::Tensor>& bias, double eps) {
  check_rows(x, eps, "add_layer_norm");
  TORCH_CHECK(residual.scalar_type() == x.scalar_type() && residual.sizes() == x.sizes() &&
                  residual.device().is_cpu(),
              "sparsekernels: add_layer_norm's x and residual must have one shape and dtype on "
              "the CPU, got ", x.sizes(), " ", x.scalar_type(), " and ", residual.sizes(), " ",
              residual.scalar_type(), " on ", residual.device());
  const int64_t n = x.size(-1);
  const at::Tensor w = norm_param(weight, n, "add_layer_norm", "weight");
  const at::Tensor b = norm_param(bias, n, "add_layer_norm", "bias");
  const at::Tensor xc = x.contiguous(), rc = residual.contiguous();
  at::Tensor y = at::empty_like(xc);
  if (xc.numel() == 0 || n == 0) return y;
  const int64_t rows = xc.numel() / n;
  const float* wp = w.defined() ? w.data_ptr<float>() : nullptr;
  const float* bp = b.defined() ? b.data_ptr<float>() : nullptr;
  const float e = static_cast<float>(eps);
  dispatch_rows(xc.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    run<T>(row_data<T>(xc), row_data<T>(rc), wp, bp, e, rows, n, row_data<T>(y));
  });
  return y;
}

}  // namespace cpu
}  // namespace sparsekernels

TORCH_LIBRARY_FRAGMENT(sparsekernels_C, m) {
  m.def("add_layer_norm_cpu(Tensor x, Tensor residual, Tensor? weight, Tensor? bias, float eps) "
        "-> Tensor",
        &sparsekernels::cpu::add_layer_norm_cpu);
}
