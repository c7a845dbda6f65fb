// Low-precision block-sparse kernels on the CPU: bf16 x bf16 and int8 x int8 products with
// fp32 / int32 accumulation, and int8 weights with float activations (weight-only).
//
// Layouts (made once by the packing functions, cached by the modules):
//   bf16: W.T blocks with k in pairs     [nnz, bk/2, bm, 2]  (vdpbf16ps: 2 products a lane)
//   int8: W.T blocks with k in quads     [nnz, bk/4, bm, 4]  (vpdpbusd: 4 products a lane)
// The weight-only kernel reads the int8 layout too, so a layer keeps one packed copy.
//
// Each kernel has an AVX-512 path, compiled with __attribute__((target(...))) so a build for
// a CPU without those features still compiles, chosen at run time from the CPU's features
// (use_bf16 / use_vnni), and a portable scalar path with the same layouts and results up to
// rounding. The AVX-512 functions are called from plain functions (the OpenMP loops), never
// from lambdas: a lambda does not inherit its enclosing function's target.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <omp.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>
#include <type_traits>
#include <vector>

#include "activation.h"
#include "cpu_features.h"

namespace sparsekernels {
namespace cpu {
namespace lowp {

// ---- scalar helpers ----------------------------------------------------------------------
inline float bf16_to_float(uint16_t h) {
  const uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// round to nearest even, as torch and vcvtneps2bf16 do
inline uint16_t float_to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40);  // NaN
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

template <typename T>
inline float load_float(const T* p);
template <>
inline float load_float<float>(const float* p) { return *p; }
template <>
inline float load_float<uint16_t>(const uint16_t* p) { return bf16_to_float(*p); }

template <typename T>
inline void store_float(T* p, float v);
template <>
inline void store_float<float>(float* p, float v) { *p = v; }
template <>
inline void store_float<uint16_t>(uint16_t* p, float v) { *p = float_to_bf16(v); }

// ---- the sparse operand --------------------------------------------------------------------
// Output block o sums, over entries e in [ptr[o], ptr[o+1]), input columns [idx[e]*bk, +bk)
// times packed block e (bk x BO, in the layout of the kernel).
struct Rows {
  const int32_t* ptr;
  const int32_t* idx;
  int64_t n_out;
  int64_t bk;
};

// Register tile: about 24 vector accumulators of 16 lanes for an output block BO wide.
template <int BO>
constexpr int tile_rows() {
  return BO / 16 >= 24 ? 1 : 24 / (BO / 16);
}

// Rows per work item: about `work` multiply-adds per (row chunk, output block) item so the
// scheduling stays cheap at low density, between 96 and 512 rows (the A panel in L2).
inline int64_t chunk_rows(const Rows& s, int64_t bo, int64_t mr, double work, int64_t rows) {
  const int64_t nnz = s.ptr[s.n_out] - s.ptr[0];
  const double per_row = double(bo) * s.bk * std::max<double>(1.0, double(nnz) / std::max<int64_t>(1, s.n_out));
  const int64_t target = std::min<int64_t>(512, std::max<int64_t>(96, static_cast<int64_t>(work / per_row)));
  const int64_t mc = std::max<int64_t>(mr, (target / mr) * mr);
  return std::min<int64_t>(mc, std::max<int64_t>(mr, (rows + mr - 1) / mr * mr));
}

// f(t0, t1, o) over (row chunk, output block) items, on the ATen thread count. With `done`,
// done(t0, t1) once per row chunk, by the thread that finishes the chunk's last output block,
// while the other threads go on with later items: an epilogue that needs whole rows (a
// LayerNorm) runs on rows still in cache, without a barrier.
template <typename F, typename G = std::nullptr_t>
void for_items(int64_t rows, int64_t mc, int64_t n_out, const F& f, const G& done = nullptr) {
  constexpr bool kDone = !std::is_same_v<G, std::nullptr_t>;
  const int64_t n_chunks = (rows + mc - 1) / mc;
  const int64_t items = n_chunks * n_out;
  std::unique_ptr<std::atomic<int64_t>[]> left;
  if constexpr (kDone) {
    left.reset(new std::atomic<int64_t>[n_chunks]);
    for (int64_t c = 0; c < n_chunks; ++c) left[c].store(n_out, std::memory_order_relaxed);
  }
#pragma omp parallel for schedule(dynamic, 1) num_threads(at::get_num_threads())
  for (int64_t item = 0; item < items; ++item) {
    const int64_t chunk = item / n_out, o = item % n_out;
    const int64_t t0 = chunk * mc, t1 = std::min(rows, t0 + mc);
    f(t0, t1, o);
    if constexpr (kDone) {
      // acq_rel: the last one sees every other thread's writes to the chunk
      if (left[chunk].fetch_sub(1, std::memory_order_acq_rel) == 1) done(t0, t1);
    }
  }
}

// ============================================================================================
// bf16 x bf16 -> fp32 (vdpbf16ps); A rows bf16, B packed [bk/2][BO][2]
// ============================================================================================
#ifdef SK_LOWP_X86
SK_TARGET_BF16 inline void store16(float* p, __m512 v) { _mm512_storeu_ps(p, v); }
SK_TARGET_BF16 inline void store16(uint16_t* p, __m512 v) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), (__m256i)_mm512_cvtneps_pbh(v));
}

// One register tile: rows [0, MR) (FULL) or [0, mr) of A against output block o. FULL keeps
// every index a constant, so the accumulators stay in registers. The blocks are either
// packed for vdpbf16ps ([bk/2][BO][2], two products per lane and instruction), or, STORED,
// the W.T blocks as SparseLinear keeps them on the CPU ([bk][BO], one bf16 each), each weight
// widened to fp32 for an FMA: at decode the call is memory-bound, and reading the stored
// bf16 (half of fp32's bytes) with nothing packed per call is what counts.
template <int BO, int MR, bool FULL, bool STORED, typename OutT,
          Activation Act = Activation::kNone>
SK_TARGET_BF16 inline void tile_bf16(int mr, const uint16_t* A, int64_t lda,
                                     const uint16_t* blocks, const Rows& s, int64_t o,
                                     const float* bias, OutT* c, int64_t ldo, int64_t first) {
  constexpr int NV = BO / 16;
  const int rows = FULL ? MR : mr;
  __m512 acc[MR][NV];
  for (int j = 0; j < NV; ++j) {
    const __m512 init = bias ? _mm512_loadu_ps(bias + o * BO + j * 16) : _mm512_setzero_ps();
    for (int r = 0; r < MR; ++r) acc[r][j] = init;
  }
  for (int32_t e = s.ptr[o]; e < s.ptr[o + 1]; ++e) {
    const uint16_t* a = A + static_cast<int64_t>(s.idx[e]) * s.bk;
    const uint16_t* b = blocks + static_cast<int64_t>(e - first) * s.bk * BO;
    if constexpr (STORED) {
      for (int64_t k = 0; k < s.bk; ++k) {
        __m512 bv[NV];
#pragma GCC unroll 8
        for (int j = 0; j < NV; ++j)
          bv[j] = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(
              reinterpret_cast<const __m256i*>(b + k * BO + j * 16))), 16));
#pragma GCC unroll 16
        for (int r = 0; r < rows; ++r) {
          const __m512 av = _mm512_set1_ps(bf16_to_float(a[r * lda + k]));
#pragma GCC unroll 8
          for (int j = 0; j < NV; ++j) acc[r][j] = _mm512_fmadd_ps(av, bv[j], acc[r][j]);
        }
      }
    } else {
      for (int64_t k = 0; k < s.bk; k += 2) {
        __m512bh bv[NV];
#pragma GCC unroll 8
        for (int j = 0; j < NV; ++j)
          bv[j] = (__m512bh)_mm512_loadu_si512(static_cast<const void*>(b + k * BO + j * 32));
#pragma GCC unroll 24
        for (int r = 0; r < rows; ++r) {
          int32_t pair;
          std::memcpy(&pair, a + r * lda + k, 4);
          const __m512bh av = (__m512bh)_mm512_set1_epi32(pair);
#pragma GCC unroll 8
          for (int j = 0; j < NV; ++j) acc[r][j] = _mm512_dpbf16_ps(acc[r][j], av, bv[j]);
        }
      }
    }
  }
  for (int r = 0; r < rows; ++r)
    for (int j = 0; j < NV; ++j) store16(c + r * ldo + j * 16, act16<Act>(acc[r][j]));
}

// Rows of the STORED tile: 16 accumulators whatever the block width (the FMA path needs no
// registers for pairs).
template <int BO>
constexpr int stored_tile_rows() {
  return 16 / (BO / 16) > 0 ? 16 / (BO / 16) : 1;
}

// out[0:rows, o*BO : +BO] = act(A[0:rows] @ S[:, o*BO : +BO] + bias), fp32 accumulation over
// every stored block in registers (the output is rounded once, as torch's bf16 matmul does;
// the activation, when there is one, on the fp32 sums before that rounding).
// `blocks` starts at block `first` (0: the whole tensor; a column's own copy: its first block).
template <int BO, typename OutT, bool STORED = false, Activation Act = Activation::kNone>
SK_TARGET_BF16 void block_bf16_avx512(const uint16_t* A, int64_t rows, int64_t lda,
                                      const uint16_t* blocks, const Rows& s, int64_t o,
                                      const float* bias, OutT* out, int64_t ldo,
                                      int64_t first = 0) {
  constexpr int MR = STORED ? stored_tile_rows<BO>() : tile_rows<BO>();
  int64_t t = 0;
  for (; t + MR <= rows; t += MR)
    tile_bf16<BO, MR, true, STORED, OutT, Act>(MR, A + t * lda, lda, blocks, s, o, bias,
                                             out + t * ldo + o * BO, ldo, first);
  if (t < rows)
    tile_bf16<BO, MR, false, STORED, OutT, Act>(static_cast<int>(rows - t), A + t * lda, lda,
                                              blocks, s, o, bias, out + t * ldo + o * BO, ldo,
                                              first);
}

// Blocks [0, n) as SparseLinear stores them on the CPU (W.T, [bk][BO] each) rewritten in the
// vdpbf16ps pair layout ([bk/2][BO][2]: lane i of a vector holds rows k and k + 1 of output
// i) at dst.
template <int BO>
SK_TARGET_BF16 inline void to_pairs(const uint16_t* wt, int64_t n, int64_t bk, uint16_t* dst) {
  alignas(64) uint16_t lo_idx[32], hi_idx[32];
  for (int i = 0; i < 32; ++i) {  // even lanes from row k, odd lanes from row k + 1 (+32)
    lo_idx[i] = static_cast<uint16_t>((i & 1 ? 32 : 0) + i / 2);
    hi_idx[i] = static_cast<uint16_t>(lo_idx[i] + 16);
  }
  const __m512i lo = _mm512_load_si512(lo_idx), hi = _mm512_load_si512(hi_idx);
  for (int64_t k = 0; k < n * bk; k += 2) {  // row pairs, block after block (bk is even)
    const uint16_t* r0 = wt + k * BO;
    const uint16_t* r1 = r0 + BO;
    uint16_t* d = dst + k * BO;
    if constexpr (BO == 16) {
      const __m512i a = _mm512_castsi256_si512(_mm256_loadu_si256(
          reinterpret_cast<const __m256i*>(r0)));
      const __m512i b = _mm512_castsi256_si512(_mm256_loadu_si256(
          reinterpret_cast<const __m256i*>(r1)));
      _mm512_storeu_si512(d, _mm512_permutex2var_epi16(a, lo, b));
    } else {
      for (int h = 0; h < BO / 32; ++h) {
        const __m512i a = _mm512_loadu_si512(r0 + 32 * h);
        const __m512i b = _mm512_loadu_si512(r1 + 32 * h);
        _mm512_storeu_si512(d + 64 * h, _mm512_permutex2var_epi16(a, lo, b));
        _mm512_storeu_si512(d + 64 * h + 32, _mm512_permutex2var_epi16(a, hi, b));
      }
    }
  }
}

// The blocks of output column o in the pair layout, in this thread's buffer. Done per (row
// chunk, column) inside the kernel, in cache, it costs a few percent of the products that
// follow, where a packed copy of every weight per call (at::permute + contiguous, or a pass of
// its own) cost more than that: each pass reads the whole weight from memory again.
template <int BO>
SK_TARGET_BF16 inline const uint16_t* column_pairs(const uint16_t* wt, const Rows& s, int64_t o) {
  thread_local std::vector<uint16_t> buf;
  const int64_t e0 = s.ptr[o], e1 = s.ptr[o + 1], per = s.bk * BO;
  if (buf.size() < static_cast<size_t>((e1 - e0) * per)) buf.resize((e1 - e0) * per);
  to_pairs<BO>(wt + e0 * per, e1 - e0, s.bk, buf.data());
  return buf.data();
}

// block_bf16_avx512 on the W.T blocks as stored (see column_pairs): nothing packed per call.
template <int BO, typename OutT, Activation Act = Activation::kNone>
SK_TARGET_BF16 void block_bf16_wt_avx512(const uint16_t* A, int64_t rows, int64_t lda,
                                         const uint16_t* wt, const Rows& s, int64_t o,
                                         const float* bias, OutT* out, int64_t ldo) {
  if (rows == 0) return;
  const uint16_t* pairs = column_pairs<BO>(wt, s, o);
  block_bf16_avx512<BO, OutT, false, Act>(A, rows, lda, pairs, s, o, bias, out, ldo, s.ptr[o]);
}

// One row against the blocks as stored ([bm, bk], no packing): a dot product per output.
SK_TARGET_BF16 inline void dot_bf16_avx512(const uint16_t* x, const uint16_t* values, int64_t bm,
                                           int64_t bk, const int32_t* crow, const int32_t* col,
                                           int64_t i, const float* bias, uint16_t* out) {
  for (int64_t n = 0; n < bm; ++n) {
    __m512 acc = _mm512_setzero_ps();
    for (int32_t e = crow[i]; e < crow[i + 1]; ++e) {
      const uint16_t* w = values + (static_cast<int64_t>(e) * bm + n) * bk;
      const uint16_t* xe = x + static_cast<int64_t>(col[e]) * bk;
      for (int64_t kk = 0; kk < bk; kk += 32) {
        const __mmask32 m = bk - kk >= 32 ? 0xffffffffu : 0xffffu;
        acc = _mm512_dpbf16_ps(acc, (__m512bh)_mm512_maskz_loadu_epi16(m, w + kk),
                               (__m512bh)_mm512_maskz_loadu_epi16(m, xe + kk));
      }
    }
    out[i * bm + n] = float_to_bf16(_mm512_reduce_add_ps(acc) + (bias ? bias[i * bm + n] : 0.f));
  }
}

SK_TARGET_BF16 inline void to_bf16_avx512(const float* src, uint16_t* dst, int64_t n) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) store16(dst + i, _mm512_loadu_ps(src + i));
  for (; i < n; ++i) dst[i] = float_to_bf16(src[i]);
}
#endif  // SK_LOWP_X86

inline void to_bf16(const float* src, uint16_t* dst, int64_t n) {
#ifdef SK_LOWP_X86
  if (use_bf16()) return to_bf16_avx512(src, dst, n);
#endif
  for (int64_t i = 0; i < n; ++i) dst[i] = float_to_bf16(src[i]);
}

// ============================================================================================
// int8: activations quantized per row to unsigned codes with a zero point (affine), weights
// int8 symmetric per output channel
// ============================================================================================
// A row's codes: u8 = clamp(round(x * inv) + zero, 0, 255) over [lo, hi] = [min(x, 0),
// max(x, 0)], scale = (hi - lo) / 255, inv = 255 / (hi - lo), zero = round(-lo * inv): x is
// about scale * (u8 - zero), and 0 is a code. Unsigned codes are what vpdpbusd (u8 x s8)
// takes; sum_k (u8 - zero) w = sum_k u8 w - zero * sum_k w, so each output subtracts
// zero[t] * wsum[n], with wsum[n] = sum_k w[n, k] computed once from the weights (packing).
// (A symmetric code is the case zero = 128; the affine one spends all 256 codes on the row's
// range, which halves the step for one-signed rows such as the FFN's GELU output.)
inline void row_params(float lo, float hi, float* scale, float* inv, int32_t* zero) {
  const float range = hi - lo;
  *scale = range / 255.0f;
  *inv = range > 0.f ? 255.0f / range : 0.f;
  *zero = static_cast<int32_t>(std::nearbyint(-lo * *inv));
}

inline uint8_t code(float x, float inv, int32_t zero) {
  const float v = std::nearbyint(x * inv) + static_cast<float>(zero);
  return static_cast<uint8_t>(std::min(255.f, std::max(0.f, v)));
}

template <typename T>
void quantize_row_generic(const T* x, int64_t k, uint8_t* q, float* scale, int32_t* zero) {
  float lo = 0.f, hi = 0.f;
  for (int64_t i = 0; i < k; ++i) {
    lo = std::min(lo, load_float<T>(x + i));
    hi = std::max(hi, load_float<T>(x + i));
  }
  float inv;
  row_params(lo, hi, scale, &inv, zero);
  for (int64_t i = 0; i < k; ++i) q[i] = code(load_float<T>(x + i), inv, *zero);
}

#ifdef SK_LOWP_X86
SK_TARGET_VNNI inline __m512 load16f(const float* p) { return _mm512_loadu_ps(p); }
SK_TARGET_VNNI inline __m512 load16f(const uint16_t* p) {
  const __m512i w = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
}

template <typename T>
SK_TARGET_VNNI void quantize_row_avx512(const T* x, int64_t k, uint8_t* q, float* scale,
                                        int32_t* zero) {
  __m512 vlo = _mm512_setzero_ps(), vhi = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= k; i += 16) {
    const __m512 v = load16f(x + i);
    vlo = _mm512_min_ps(vlo, v);
    vhi = _mm512_max_ps(vhi, v);
  }
  float lo = _mm512_reduce_min_ps(vlo), hi = _mm512_reduce_max_ps(vhi);
  for (; i < k; ++i) {
    lo = std::min(lo, load_float<T>(x + i));
    hi = std::max(hi, load_float<T>(x + i));
  }
  float inv;
  row_params(lo, hi, scale, &inv, zero);
  const __m512 vinv = _mm512_set1_ps(inv);
  const __m512i z = _mm512_set1_epi32(*zero), cmin = _mm512_setzero_si512(),
                cmax = _mm512_set1_epi32(255);
  for (i = 0; i + 16 <= k; i += 16) {
    __m512i v = _mm512_add_epi32(_mm512_cvtps_epi32(_mm512_mul_ps(load16f(x + i), vinv)), z);
    v = _mm512_min_epi32(_mm512_max_epi32(v, cmin), cmax);  // round: nearest even (MXCSR)
    _mm_storeu_si128(reinterpret_cast<__m128i*>(q + i), _mm512_cvtepi32_epi8(v));
  }
  for (; i < k; ++i) q[i] = code(load_float<T>(x + i), inv, *zero);
}
#endif

// Rows of x (ld apart) quantized into rows of q (k apart), the ISA asked once for all of them
// (SPARSEKERNELS_CPU_ISA is an environment read: per row it was a visible cost)
template <typename T>
inline void quantize_rows(const T* x, int64_t ld, int64_t rows, int64_t k, uint8_t* q,
                          float* scale, int32_t* zero) {
#ifdef SK_LOWP_X86
  if (use_vnni()) {
    for (int64_t r = 0; r < rows; ++r)
      quantize_row_avx512<T>(x + r * ld, k, q + r * k, scale + r, zero + r);
    return;
  }
#endif
  for (int64_t r = 0; r < rows; ++r)
    quantize_row_generic<T>(x + r * ld, k, q + r * k, scale + r, zero + r);
}

// What the int8 epilogue needs per output column and per row.
struct Int8Epilogue {
  const int32_t* wsum;   // [N] sum_k w (W8A8 only)
  const float* wscale;   // [N] weight scales
  const float* xscale;   // [rows] activation scales (W8A8 only), indexed from the chunk's row 0
  const float* bias;     // [N] or null
  const int32_t* xzero;  // [rows] activation zero points (W8A8 only), as xscale
};

#ifdef SK_LOWP_X86
SK_TARGET_VNNI inline void store16v(float* p, __m512 v) { _mm512_storeu_ps(p, v); }
SK_TARGET_VNNI inline void store16v(uint16_t* p, __m512 v) {
  // round to nearest even by integer arithmetic (this target has no vcvtneps2bf16)
  __m512i u = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7fff)), lsb), 16);
  const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
  r = _mm512_mask_mov_epi32(r, nan, _mm512_or_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(0x40)));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(r));
}

// W8A8, one register tile (see tile_bf16):
// out = (acc - xzero[row] * wsum) * xscale[row] * wscale + bias
template <int BO, int MR, bool FULL, typename OutT>
SK_TARGET_VNNI inline void tile_u8s8(int mr, const uint8_t* A, int64_t lda, const int8_t* blocks,
                                     const Rows& s, int64_t o, const Int8Epilogue& ep,
                                     const float* xscale, const int32_t* xzero, OutT* c,
                                     int64_t ldo) {
  constexpr int NV = BO / 16;
  const int rows = FULL ? MR : mr;
  __m512i acc[MR][NV];
  for (int r = 0; r < MR; ++r)
    for (int j = 0; j < NV; ++j) acc[r][j] = _mm512_setzero_si512();
  for (int32_t e = s.ptr[o]; e < s.ptr[o + 1]; ++e) {
    const uint8_t* a = A + static_cast<int64_t>(s.idx[e]) * s.bk;
    const int8_t* b = blocks + static_cast<int64_t>(e) * s.bk * BO;
    for (int64_t k = 0; k < s.bk; k += 4) {
      __m512i bv[NV];
#pragma GCC unroll 8
      for (int j = 0; j < NV; ++j) bv[j] = _mm512_loadu_si512(static_cast<const void*>(b + k * BO + j * 64));
#pragma GCC unroll 24
      for (int r = 0; r < rows; ++r) {
        int32_t quad;
        std::memcpy(&quad, a + r * lda + k, 4);
        const __m512i av = _mm512_set1_epi32(quad);
#pragma GCC unroll 8
        for (int j = 0; j < NV; ++j) acc[r][j] = _mm512_dpbusd_epi32(acc[r][j], av, bv[j]);
      }
    }
  }
  for (int j = 0; j < NV; ++j) {
    const __m512i wsum = _mm512_loadu_si512(static_cast<const void*>(ep.wsum + o * BO + j * 16));
    const __m512 ws = _mm512_loadu_ps(ep.wscale + o * BO + j * 16);
    const __m512 bias = ep.bias ? _mm512_loadu_ps(ep.bias + o * BO + j * 16) : _mm512_setzero_ps();
    for (int r = 0; r < rows; ++r) {
      const __m512i zw = _mm512_mullo_epi32(_mm512_set1_epi32(xzero[r]), wsum);
      const __m512 v = _mm512_cvtepi32_ps(_mm512_sub_epi32(acc[r][j], zw));
      store16v(c + r * ldo + j * 16, _mm512_fmadd_ps(v, _mm512_mul_ps(_mm512_set1_ps(xscale[r]), ws), bias));
    }
  }
}

template <int BO, typename OutT>
SK_TARGET_VNNI void block_u8s8_avx512(const uint8_t* A, int64_t rows, int64_t lda,
                                      const int8_t* blocks, const Rows& s, int64_t o,
                                      const Int8Epilogue& ep, OutT* out, int64_t ldo) {
  constexpr int MR = tile_rows<BO>();
  int64_t t = 0;
  for (; t + MR <= rows; t += MR)
    tile_u8s8<BO, MR, true, OutT>(MR, A + t * lda, lda, blocks, s, o, ep, ep.xscale + t,
                                  ep.xzero + t, out + t * ldo + o * BO, ldo);
  if (t < rows)
    tile_u8s8<BO, MR, false, OutT>(static_cast<int>(rows - t), A + t * lda, lda, blocks, s, o, ep,
                                   ep.xscale + t, ep.xzero + t, out + t * ldo + o * BO, ldo);
}

// W8 (weight-only): float rows times int8 weights, dequantized in registers. The packed
// quad layout gives 16 bytes = 4 outputs x 4 k per 128-bit lane; x[k:k+4] is broadcast to the
// four lanes, and the four k partial sums of each output are added at the end.
// v[q] holds outputs 4q..4q+3, one per 128-bit lane, as 4 partial sums over k; returns the
// 16 sums in output order
SK_TARGET_VNNI inline __m512 reduce_quads(const __m512 (&v)[4]) {
  const __m512 s01 = _mm512_add_ps(_mm512_shuffle_ps(v[0], v[1], _MM_SHUFFLE(2, 0, 2, 0)),
                                   _mm512_shuffle_ps(v[0], v[1], _MM_SHUFFLE(3, 1, 3, 1)));
  const __m512 s23 = _mm512_add_ps(_mm512_shuffle_ps(v[2], v[3], _MM_SHUFFLE(2, 0, 2, 0)),
                                   _mm512_shuffle_ps(v[2], v[3], _MM_SHUFFLE(3, 1, 3, 1)));
  const __m512 r = _mm512_add_ps(_mm512_shuffle_ps(s01, s23, _MM_SHUFFLE(2, 0, 2, 0)),
                                 _mm512_shuffle_ps(s01, s23, _MM_SHUFFLE(3, 1, 3, 1)));
  // lane 4i + q holds output 4q + i
  const __m512i idx = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
  return _mm512_permutexvar_ps(idx, r);
}

// One tile of W8: rows [0, MR) (FULL) or [0, mr) against 16 outputs (group j of block o).
template <int BO, int MR, bool FULL, typename OutT>
SK_TARGET_VNNI inline void tile_w8(int mr, const float* A, int64_t lda, const int8_t* blocks,
                                   const Rows& s, int64_t o, int j, const Int8Epilogue& ep,
                                   OutT* c, int64_t ldo) {
  const int rows = FULL ? MR : mr;
  __m512 acc[MR][4];
  for (int r = 0; r < MR; ++r)
    for (int q = 0; q < 4; ++q) acc[r][q] = _mm512_setzero_ps();
  for (int32_t e = s.ptr[o]; e < s.ptr[o + 1]; ++e) {
    const float* a = A + static_cast<int64_t>(s.idx[e]) * s.bk;
    const int8_t* b = blocks + static_cast<int64_t>(e) * s.bk * BO + j * 64;
    for (int64_t k = 0; k < s.bk; k += 4) {
      const int8_t* bq = b + k * BO;
      __m512 w[4];
#pragma GCC unroll 4
      for (int q = 0; q < 4; ++q)
        w[q] = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(bq + 16 * q))));
#pragma GCC unroll 8
      for (int r = 0; r < rows; ++r) {
        const __m512 xv = _mm512_broadcast_f32x4(_mm_loadu_ps(a + r * lda + k));
#pragma GCC unroll 4
        for (int q = 0; q < 4; ++q) acc[r][q] = _mm512_fmadd_ps(w[q], xv, acc[r][q]);
      }
    }
  }
  const __m512 ws = _mm512_loadu_ps(ep.wscale + o * BO + j * 16);
  const __m512 bias = ep.bias ? _mm512_loadu_ps(ep.bias + o * BO + j * 16) : _mm512_setzero_ps();
  for (int r = 0; r < rows; ++r)
    store16v(c + r * ldo + j * 16, _mm512_fmadd_ps(reduce_quads(acc[r]), ws, bias));
}

template <int BO, typename OutT>
SK_TARGET_VNNI void block_w8_avx512(const float* A, int64_t rows, int64_t lda,
                                    const int8_t* blocks, const Rows& s, int64_t o,
                                    const Int8Epilogue& ep, OutT* out, int64_t ldo) {
  constexpr int MR = 6;  // 6 rows x 4 accumulators per 16 outputs
  for (int j = 0; j < BO / 16; ++j) {
    int64_t t = 0;
    for (; t + MR <= rows; t += MR)
      tile_w8<BO, MR, true, OutT>(MR, A + t * lda, lda, blocks, s, o, j, ep, out + t * ldo + o * BO, ldo);
    if (t < rows)
      tile_w8<BO, MR, false, OutT>(static_cast<int>(rows - t), A + t * lda, lda, blocks, s, o, j, ep,
                                   out + t * ldo + o * BO, ldo);
  }
}
#endif  // SK_LOWP_X86

// Portable paths: the same layouts and the same integer sums; float sums in another order.
template <int BO, typename OutT>
void block_u8s8_generic(const uint8_t* A, int64_t rows, int64_t lda, const int8_t* blocks,
                        const Rows& s, int64_t o, const Int8Epilogue& ep, OutT* out, int64_t ldo) {
  const int64_t blk = s.bk * BO;
  int32_t acc[BO];
  for (int64_t t = 0; t < rows; ++t) {
    std::fill(acc, acc + BO, 0);
    for (int32_t e = s.ptr[o]; e < s.ptr[o + 1]; ++e) {
      const uint8_t* a = A + t * lda + static_cast<int64_t>(s.idx[e]) * s.bk;
      const int8_t* b = blocks + static_cast<int64_t>(e) * blk;
      for (int64_t k = 0; k < s.bk; k += 4)
        for (int n = 0; n < BO; ++n)
          for (int u = 0; u < 4; ++u)
            acc[n] += static_cast<int32_t>(a[k + u]) * static_cast<int32_t>(b[k * BO + n * 4 + u]);
    }
    for (int n = 0; n < BO; ++n) {
      const int64_t c = o * BO + n;
      const float v = static_cast<float>(acc[n] - ep.xzero[t] * ep.wsum[c]) * (ep.xscale[t] * ep.wscale[c]) +
                      (ep.bias ? ep.bias[c] : 0.f);
      store_float<OutT>(out + t * ldo + c, v);
    }
  }
}

template <int BO, typename OutT>
void block_w8_generic(const float* A, int64_t rows, int64_t lda, const int8_t* blocks,
                      const Rows& s, int64_t o, const Int8Epilogue& ep, OutT* out, int64_t ldo) {
  const int64_t blk = s.bk * BO;
  float acc[BO];
  for (int64_t t = 0; t < rows; ++t) {
    std::fill(acc, acc + BO, 0.f);
    for (int32_t e = s.ptr[o]; e < s.ptr[o + 1]; ++e) {
      const float* a = A + t * lda + static_cast<int64_t>(s.idx[e]) * s.bk;
      const int8_t* b = blocks + static_cast<int64_t>(e) * blk;
      for (int64_t k = 0; k < s.bk; k += 4)
        for (int n = 0; n < BO; ++n)
          for (int u = 0; u < 4; ++u) acc[n] += a[k + u] * static_cast<float>(b[k * BO + n * 4 + u]);
    }
    for (int n = 0; n < BO; ++n) {
      const int64_t c = o * BO + n;
      store_float<OutT>(out + t * ldo + c, acc[n] * ep.wscale[c] + (ep.bias ? ep.bias[c] : 0.f));
    }
  }
}

template <int BO, typename OutT>
inline void block_u8s8(const uint8_t* A, int64_t rows, int64_t lda, const int8_t* blocks,
                       const Rows& s, int64_t o, const Int8Epilogue& ep, OutT* out, int64_t ldo) {
#ifdef SK_LOWP_X86
  if (use_vnni()) return block_u8s8_avx512<BO, OutT>(A, rows, lda, blocks, s, o, ep, out, ldo);
#endif
  block_u8s8_generic<BO, OutT>(A, rows, lda, blocks, s, o, ep, out, ldo);
}

// block_u8s8 for every output block of the layer (o = 0 .. s.n_out), the ISA asked once
template <int BO, typename OutT>
inline void blocks_u8s8(const uint8_t* A, int64_t rows, int64_t lda, const int8_t* blocks,
                        const Rows& s, const Int8Epilogue& ep, OutT* out, int64_t ldo) {
#ifdef SK_LOWP_X86
  if (use_vnni()) {
    for (int64_t o = 0; o < s.n_out; ++o)
      block_u8s8_avx512<BO, OutT>(A, rows, lda, blocks, s, o, ep, out, ldo);
    return;
  }
#endif
  for (int64_t o = 0; o < s.n_out; ++o)
    block_u8s8_generic<BO, OutT>(A, rows, lda, blocks, s, o, ep, out, ldo);
}

template <int BO, typename OutT>
inline void block_w8(const float* A, int64_t rows, int64_t lda, const int8_t* blocks,
                     const Rows& s, int64_t o, const Int8Epilogue& ep, OutT* out, int64_t ldo) {
#ifdef SK_LOWP_X86
  if (use_vnni()) return block_w8_avx512<BO, OutT>(A, rows, lda, blocks, s, o, ep, out, ldo);
#endif
  block_w8_generic<BO, OutT>(A, rows, lda, blocks, s, o, ep, out, ldo);
}

// Fused FFN row split: each thread takes an equal contiguous range of rows in chunks of
// about `wanted` rows (whole tiles of q rows but the last); body(t0, rc, mc) runs one chunk
// of rc rows, mc the chunk size its buffers need. The ranges are not rounded to whole tiles:
// 128 rows on 2 threads of 12-row tiles ran as 72 + 56 rows, the first thread a tile longer.
template <typename F>
void for_row_chunks(int64_t rows, int64_t q, int64_t wanted, const F& body) {
  auto round_up = [q](int64_t v) { return (v + q - 1) / q * q; };
#pragma omp parallel num_threads(at::get_num_threads())
  {
    const int64_t nt = omp_get_num_threads(), tid = omp_get_thread_num();
    const int64_t r0 = rows * tid / nt, r1 = rows * (tid + 1) / nt;
    const int64_t pieces = std::max<int64_t>(1, (r1 - r0 + wanted - 1) / wanted);
    const int64_t mc = round_up((r1 - r0 + pieces - 1) / pieces);
    for (int64_t t0 = r0; t0 < r1; t0 += mc) body(t0, std::min(r1, t0 + mc) - t0, mc);
  }
}

}  // namespace lowp
}  // namespace cpu
}  // namespace sparsekernels
