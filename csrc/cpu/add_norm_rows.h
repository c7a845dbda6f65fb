// The rows of add_layer_norm (y = layer_norm(x + residual)), shared by its op
// (add_layer_norm.cpp) and by the sparse kernels that end a post-norm block with it as an
// epilogue (AddNorm below): the linear kernels call it on a chunk of rows once every output
// block of the chunk is written, the fused FFN kernels on each chunk they finish, while the
// rows are still in cache. Both paths run these functions, so fused and unfused agree bit
// for bit.
#pragma once

#include <ATen/ATen.h>

#include <cmath>
#include <vector>

#include "norm_rows.h"

namespace sparsekernels {
namespace cpu {
namespace add_norm_detail {

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
  const __mmask16 tail = lowp::tail_lanes(n);
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

}  // namespace add_norm_detail

// y[i] = layer_norm(x[i] + r[i]) for rows [r0, r1) of width n (row stride n); y may be x.
// buf: n floats of scratch.
template <typename T>
void add_layer_norm_rows(const T* x, const T* r, const float* w, const float* b, float eps,
                         int64_t n, int64_t r0, int64_t r1, float* buf, T* y) {
#ifdef SK_LOWP_X86
  if (lowp::use_avx512()) return add_norm_detail::rows_avx512<T>(x, r, w, b, eps, n, r0, r1, buf, y);
#endif
  for (int64_t i = r0; i < r1; ++i)
    add_norm_detail::row_generic<T>(x + i * n, r + i * n, w, b, eps, n, buf, y + i * n);
}

// A kernel's epilogue out = layer_norm(out + residual) (weight, bias optional), applied in
// place to the rows of its [rows, n] output. residual: [rows, n] contiguous, of out's dtype.
struct AddNorm {
  const void* residual;
  const float* weight;
  const float* bias;
  float eps;
};

// The epilogue on rows [t0, t1) of out (row stride n), with a scratch row per thread.
template <typename T>
void apply_add_norm(const AddNorm& a, T* out, int64_t n, int64_t t0, int64_t t1) {
  thread_local std::vector<float> buf;
  if (buf.size() < static_cast<size_t>(n)) buf.resize(n);
  add_layer_norm_rows<T>(out, static_cast<const T*>(a.residual), a.weight, a.bias, a.eps, n,
                         t0, t1, buf.data(), out);
}

// lowp::for_items over a layer's (row chunk, output block) items, then, when `an` is given,
// the epilogue on each chunk's rows of out (row stride n) as the chunk completes.
template <typename OutT, typename F>
void for_items_add_norm(int64_t rows, int64_t mc, int64_t n_out, const AddNorm* an, OutT* out,
                        int64_t n, const F& f) {
  if (an == nullptr) return lowp::for_items(rows, mc, n_out, f);
  lowp::for_items(rows, mc, n_out, f, [&](int64_t t0, int64_t t1) {
    apply_add_norm<OutT>(*an, out, n, t0, t1);
  });
}

// The epilogue on all rows of out, split over the threads (for the kernels' paths without
// row chunks: a few rows).
template <typename T>
void apply_add_norm_all(const AddNorm& a, T* out, int64_t rows, int64_t n) {
  for_row_parts(rows, n, [&](int64_t r0, int64_t r1) { apply_add_norm<T>(a, out, n, r0, r1); });
}

// residual is what a direct entry's epilogue takes for a layer mapping x [..., k] to n
// outputs: x's leading dims and n, the output's dtype (out_type, default x's), on the CPU
// (else the caller runs unfused).
inline bool residual_fits(const at::Tensor& residual, const at::Tensor& x, int64_t n,
                          std::optional<at::ScalarType> out_type = std::nullopt) {
  if (!residual.device().is_cpu() || residual.scalar_type() != out_type.value_or(x.scalar_type()) ||
      residual.dim() != x.dim() || x.dim() < 1 || residual.size(-1) != n)
    return false;
  for (int64_t d = 0; d + 1 < x.dim(); ++d)
    if (residual.size(d) != x.size(d)) return false;
  return true;
}

// The tensors behind an AddNorm (kept alive by the holder) after checking them against a
// kernel's output of `rows` x `n` in `dtype`; `op` names the caller in errors.
struct AddNormArgs {
  at::Tensor residual, weight, bias;
  AddNorm epilogue;
};
inline AddNormArgs add_norm_args(const at::Tensor& residual,
                                 const std::optional<at::Tensor>& weight,
                                 const std::optional<at::Tensor>& bias, double eps,
                                 int64_t rows, int64_t n, at::ScalarType dtype, const char* op) {
  check_rows(residual, eps, op);
  TORCH_CHECK(residual.scalar_type() == dtype && residual.size(-1) == n &&
                  residual.numel() == rows * n,
              "sparsekernels: ", op, "'s residual must be [", rows, ", ", n, "] rows in ", dtype,
              " (the output's), got ", residual.sizes(), " ", residual.scalar_type());
  AddNormArgs a;
  a.residual = residual.reshape({rows, n}).contiguous();
  a.weight = norm_param(weight, n, op, "weight");
  a.bias = norm_param(bias, n, op, "bias");
  a.epilogue = AddNorm{a.residual.data_ptr(), a.weight.defined() ? a.weight.data_ptr<float>() : nullptr,
                       a.bias.defined() ? a.bias.data_ptr<float>() : nullptr,
                       static_cast<float>(eps)};
  return a;
}

}  // namespace cpu
}  // namespace sparsekernels
