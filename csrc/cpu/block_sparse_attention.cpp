// Block-sparse attention on the CPU: FlashAttention-style forward (online softmax) and
// backward (dK/dV per key block, dQ per query block) that visit only the stored
// (query block, key block) pairs of the layout.
//
// Grouped-query attention: k and v have Hkv <= H heads, query head h reads key/value head
// h / G (G = H / Hkv). A forward work item is one query block of one key/value head's whole
// group: each key block is read from memory and packed once, then used by every query head
// of the group that stores it (decode is memory-bound: the KV cache is read once per call).
// The dK/dV items are key blocks of a key/value head and sum their group's query heads.
// Positions: query i sits at Lk - Lq + i (the queries end the keys, as in a KV cache);
// causal and the sliding window are applied per element, blocks they empty are skipped.
// Few work items (decode: B * Hkv of them) are split along their key blocks, each part with
// its own softmax statistics, and merged after (flash-decoding), so that every thread
// streams part of the cache.
//
// The layout arrives as the bool block mask [B or 1, H, nq, nk]; the kernel turns it into
// compressed lists in one serial pass: no extra torch ops (each one wakes the thread pool)
// per call. The products use the register-blocked micro-kernel of microkernel.h in fp32 /
// fp64; bf16 inputs use AVX512-BF16 dot products (fp32 accumulation) when the CPU has them
// (checked at run time, the build needs no flag), else they are converted to fp32. On those,
// a tile whose scores are all kept (no mask, every key visible) takes its softmax step on the
// product's registers and has O rescaled inside P V: no pass over a stored score tile.
#if defined(__GNUC__) && !defined(__clang__) && __GNUC__ < 13
// GCC 12's AVX-512 intrinsics pass an undefined register to their masked builtins (GCC bug
// 105593): a false -Wuninitialized per inlined call. Before the headers, where it is reported.
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <omp.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <numeric>
#include <vector>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define SPARSEKERNELS_BF16_DOT 1
#endif

#include "direct.h"
#include "glue.h"
#include "microkernel.h"

namespace sparsekernels {
namespace cpu {
namespace {

constexpr double kLog2e = 1.4426950408889634;
constexpr double kMaskFloor = -1.0e30;  // finite masks stay finite in log2 units
constexpr int64_t kItemsPerThread = 8;  // fewer forward items than this per thread: split them

// C[R, BO] (+)= A[R, kdim] * B[kdim, BO] for a compile-time row count R: the accumulators
// stay in registers (a runtime row count would keep them in memory; decode has 1 to 16 rows).
template <typename T, int BO, int R>
void gemm_rows(const T* a, int64_t sa_r, int64_t sa_k, const T* b, int64_t ldb, int64_t kdim,
               T* c, int64_t ldc, bool accumulate) {
  constexpr int L = Vec<T>::L;
  constexpr int NV = BO / L;
  using V = typename Vec<T>::type;
  V acc[R][NV];
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < NV; ++j) acc[r][j] = accumulate ? loadu<T>(c + r * ldc + j * L) : V{};
  micro_kernel<T, BO, R>(a, sa_r, sa_k, b, ldb, kdim, acc);
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < NV; ++j) storeu<T>(c + r * ldc + j * L, acc[r][j]);
}

// f(std::integral_constant<int, m>) for a runtime 1 <= m <= R.
template <int R, typename F>
void dispatch_rows(int m, F&& f) {
  if constexpr (R > 1) {
    if (m < R) return dispatch_rows<R - 1>(m, f);
  }
  f(std::integral_constant<int, R>{});
}

// C[m, BO] (+)= A[m, kdim] * B[kdim, BO]; A(r, k) = a[r * sa_r + k * sa_k], B row k at b + k*ldb.
template <typename T, int BO>
void gemm_fixed(int64_t m, const T* a, int64_t sa_r, int64_t sa_k, const T* b, int64_t ldb,
                int64_t kdim, T* c, int64_t ldc, bool accumulate) {
  constexpr int MR = tile_rows<T, BO>();
  for (int64_t r0 = 0; r0 < m; r0 += MR)
    dispatch_rows<MR>(static_cast<int>(std::min<int64_t>(MR, m - r0)), [&](auto rows) {
      gemm_rows<T, BO, decltype(rows)::value>(a + r0 * sa_r, sa_r, sa_k, b, ldb, kdim,
                                              c + r0 * ldc, ldc, accumulate);
    });
}

template <typename T>
void gemm(int64_t width, int64_t m, const T* a, int64_t sa_r, int64_t sa_k, const T* b,
          int64_t ldb, int64_t kdim, T* c, int64_t ldc, bool accumulate) {
  dispatch_block(
      width,
      [&](auto bo) {
        gemm_fixed<T, decltype(bo)::value>(m, a, sa_r, sa_k, b, ldb, kdim, c, ldc, accumulate);
      },
      "attention block size or head dim");
}

// --- exp2 ------------------------------------------------------------------------------------
typedef int32_t VInt __attribute__((vector_size(64)));

// 2^f for |f| <= 1/2 by a polynomial of degree Deg (Horner): 7 for fp32 results (relative
// error far below fp32's), 5 where the result is rounded to bf16 next (about 1e-7 relative,
// still below fp32's own rounding; two FMAs fewer per 16 values), 4 for an attention tile's
// probabilities (2.9e-6 relative, measured in float32 over [-1/2, 1/2]: a seven-hundredth of
// the bf16 rounding they get for P V; the fp32 sum inherits it).
template <int Deg, typename V>
inline V exp2_poly(V f) {
  static_assert(Deg == 4 || Deg == 5 || Deg == 7, "exp2_poly: degree 4, 5 or 7");
  if constexpr (Deg == 7) {
    V p = f * 1.525273380405984e-05f + 1.5403530393381608e-04f;
    p = p * f + 1.3333558146428443e-03f;
    p = p * f + 9.618129107628477e-03f;
    p = p * f + 5.550410866482158e-02f;
    p = p * f + 2.402265069591007e-01f;
    p = p * f + 6.931471805599453e-01f;
    return p * f + 1.0f;
  } else if constexpr (Deg == 4) {
    V p = f * 9.582847349584115e-03f + 5.590643896020627e-02f;
    p = p * f + 2.4024098819859213e-01f;
    p = p * f + 6.931241911147928e-01f;
    return p * f + 1.0f;
  } else {
    V p = f * 1.3264726899094232e-03f + 9.67151266056224e-03f;
    p = p * f + 5.550733744244451e-02f;
    p = p * f + 2.402224208491929e-01f;
    p = p * f + 6.931469775984711e-01f;
    return p * f + 1.0f;
  }
}

// 2^x for a vector of floats; exactly 0 below 2^-126 (and for -inf), nan for nan (a nan
// score, from a nan in q or k, makes its row nan as torch's attention does). x = n + f with n
// an integer and |f| <= 1/2: 2^f by exp2_poly, times 2^n.
#if defined(__AVX512F__)
// AVX-512: the rounding and the 2^n scaling are one instruction each (vrndscaleps, vscalefps)
template <int Deg = 7>
inline Vec<float>::type vexp2(Vec<float>::type xv) {
  const __m512 x = (__m512)xv;
  const __m512 lo = _mm512_set1_ps(-126.0f);
  const __m512 xc = _mm512_max_ps(lo, x);  // vmaxps returns its second operand for a nan
  const __m512 n = _mm512_roundscale_ps(xc, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 p = (__m512)exp2_poly<Deg>((Vec<float>::type)_mm512_sub_ps(xc, n));
  const __mmask16 keep = _mm512_cmp_ps_mask(x, lo, _CMP_NLT_UQ);  // x >= lo, or nan
  return (Vec<float>::type)_mm512_maskz_mov_ps(keep, _mm512_scalef_ps(p, n));
}
#else
template <int Deg = 7>
inline Vec<float>::type vexp2(Vec<float>::type x) {
  using V = Vec<float>::type;
  const V lo = V{} - 126.0f;
  const V xc = x < lo ? lo : x;
  const V t = xc + 0.5f;
  VInt ti = __builtin_convertvector(t, VInt);  // truncates toward zero
  V tf = __builtin_convertvector(ti, V);
  ti = tf > t ? ti - 1 : ti;  // floor
  tf = __builtin_convertvector(ti, V);
  const V p = exp2_poly<Deg>(xc - tf);  // f in [-0.5, 0.5)
  const VInt bits = (ti + 127) << 23;
  const V r = p * reinterpret_cast<const V&>(bits);
  return x < lo ? V{} : r;
}
#endif

// Horizontal sum / max of 16 lanes: a shuffle tree (a serial chain of 16 scalar operations
// cost as much as the row's exponentials at 64 keys). Vector extensions, not GCC's
// _mm512_reduce_*, which read an undefined register (a warning per inlined call).
template <typename Op>
inline float reduce16(Vec<float>::type v, Op op) {
  v = op(v, __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7));
  v = op(v, __builtin_shufflevector(v, v, 4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11));
  v = op(v, __builtin_shufflevector(v, v, 2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13));
  v = op(v, __builtin_shufflevector(v, v, 1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14));
  return v[0];
}

inline float hsum(Vec<float>::type v) {
  return reduce16(v, [](Vec<float>::type a, Vec<float>::type b) { return a + b; });
}

inline float hmax(Vec<float>::type v) {
  return reduce16(v, [](Vec<float>::type a, Vec<float>::type b) { return a > b ? a : b; });
}

// p[j] = 2^(s[j] * scale - shift) for j < n (n a multiple of 16 for floats); returns the sum.
inline float exp2_row(float* s, int64_t n, float shift, float scale = 1.0f) {
  using V = Vec<float>::type;
  V sum{};
  for (int64_t j = 0; j < n; j += 16) {
    const V p = vexp2(loadu<float>(s + j) * scale - shift);
    storeu<float>(s + j, p);
    sum += p;
  }
  return hsum(sum);
}

inline double exp2_row(double* s, int64_t n, double shift, double scale = 1.0) {
  double total = 0.0;
  for (int64_t j = 0; j < n; ++j) {
    s[j] = std::exp2(s[j] * scale - shift);
    total += s[j];
  }
  return total;
}

// max(init, s[0..n)); n a multiple of 16 for floats. -inf entries are fine (no NaN here).
inline float row_max(const float* s, int64_t n, float init) {
  using V = Vec<float>::type;
  V mx = V{} + init;
  for (int64_t j = 0; j < n; j += 16) {
    const V x = loadu<float>(s + j);
    mx = x > mx ? x : mx;
  }
  return hmax(mx);
}

inline double row_max(const double* s, int64_t n, double init) {
  double out = init;
  for (int64_t j = 0; j < n; ++j) out = std::max(out, s[j]);
  return out;
}

// --- problem description -----------------------------------------------------------------------
// Sizes, positions and the layout: what decides which (query, key) pairs are computed.
struct Shape {
  int64_t B, H, Hkv, G, Lq, Lk, D, bq, bk, nq, nk;
  int64_t off;  // the position of query 0: Lk - Lq (the queries end the keys)
  bool causal;
  int64_t window;  // > 0: a query at position p sees keys j with p - window < j (< p + window)
  const bool* layout;  // [Bl, H, nq, nk] contiguous
  int64_t Bl;

  bool stored(int64_t b, int64_t h, int64_t qb, int64_t kb) const {
    return layout[(((Bl == 1 ? 0 : b) * H + h) * nq + qb) * nk + kb];
  }
  // query row i may see key j (< Lk) by position
  bool sees(int64_t i, int64_t j) const {
    const int64_t d = i + off - j;
    if (causal && d < 0) return false;
    return window <= 0 || (d < window && (causal || -d < window));
  }
  // some pair of (query block qb, key block kb) is visible by position
  bool reachable(int64_t qb, int64_t kb) const {
    if (!causal && window <= 0) return true;
    const int64_t lo = qb * bq + off - (std::min(kb * bk + bk, Lk) - 1);
    const int64_t hi = std::min(qb * bq + bq, Lq) - 1 + off - kb * bk;
    if (causal && hi < 0) return false;
    return window <= 0 || (lo < window && (causal || hi > -window));
  }
  // every pair of the tile (rows q0..q0+qr, the bk columns from k0) is a key visible by position
  bool all_visible(int64_t q0, int64_t qr, int64_t k0) const {
    if (k0 + bk > Lk) return false;
    if (!causal && window <= 0) return true;
    const int64_t lo = q0 + off - (k0 + bk - 1), hi = q0 + qr - 1 + off - k0;
    if (causal && lo < 0) return false;
    return window <= 0 || (hi < window && (causal || lo > -window));
  }
};

// E: the element type of q, k, v; A: the accumulation / softmax type.
template <typename E, typename A>
struct Problem : Shape {
  const E *q, *k, *v;
  int64_t sq[3], sk[3], sv[3];  // batch, head, row strides (unit stride along D)
  A qk_scale;  // scale * log2(e)
  // mask, broadcast to [B, H, Lq, Lk] through strides
  const uint8_t* mask_bool = nullptr;
  const A* mask_add = nullptr;
  int64_t sm[4] = {0, 0, 0, 0};
};

// Scores of one (query block, key block) tile in log2 units, -inf where not allowed.
// S [qr, bk] holds q k^T on entry (rows = query rows of the block, head h).
template <typename E, typename A>
void finish_scores(const Problem<E, A>& P, int64_t b, int64_t h, int64_t q0, int64_t qr,
                   int64_t k0, A* S) {
  const int64_t bk = P.bk;
  const A neg_inf = -std::numeric_limits<A>::infinity();
  const A scale = P.qk_scale;
  const bool visible = P.all_visible(q0, qr, k0);
  const bool masked = P.mask_bool || P.mask_add;
  constexpr int64_t kRowMax = 128;  // the largest attention block
  if (visible && masked && bk <= kRowMax) {
    // every position in range: the mask alone decides, one row of log2-unit addends at a
    // time (a key-padding mask broadcasts over the queries: one row for the whole tile)
    A add[kRowMax];
    auto fill = [&](int64_t moff) {
      for (int64_t j = 0; j < bk; ++j) {
        const int64_t at = moff + (k0 + j) * P.sm[3];
        if (P.mask_bool && P.mask_bool[at] == 0) {
          add[j] = neg_inf;
        } else if (P.mask_add) {
          A mv = P.mask_add[at];
          if (mv != neg_inf) mv = std::max<A>(mv, static_cast<A>(kMaskFloor));
          add[j] = mv * static_cast<A>(kLog2e);
        } else {
          add[j] = A(0);
        }
      }
    };
    const int64_t base = b * P.sm[0] + h * P.sm[1];
    if (P.sm[2] == 0) fill(base);
    for (int64_t r = 0; r < qr; ++r) {
      if (P.sm[2] != 0) fill(base + (q0 + r) * P.sm[2]);
      A* s = S + r * bk;
      for (int64_t j = 0; j < bk; ++j) s[j] = s[j] * scale + add[j];
    }
    return;
  }
  const bool plain = visible && !masked;
  for (int64_t r = 0; r < qr; ++r) {
    A* s = S + r * bk;
    if (plain) {
      for (int64_t j = 0; j < bk; ++j) s[j] *= scale;
      continue;
    }
    const int64_t i = q0 + r;
    const int64_t moff = b * P.sm[0] + h * P.sm[1] + i * P.sm[2];
    for (int64_t j = 0; j < bk; ++j) {
      const int64_t kj = k0 + j;
      bool ok = kj < P.Lk && P.sees(i, kj);
      A val = s[j] * scale;
      if (ok && P.mask_bool) ok = P.mask_bool[moff + kj * P.sm[3]] != 0;
      if (ok && P.mask_add) {
        A mv = P.mask_add[moff + kj * P.sm[3]];
        if (mv != neg_inf) mv = std::max<A>(mv, static_cast<A>(kMaskFloor));
        val += mv * static_cast<A>(kLog2e);
      }
      s[j] = ok ? val : neg_inf;
    }
  }
}

// 16 x 32-bit lanes; may_alias: reads floats and bf16 pairs alike.
typedef uint32_t U32x16 __attribute__((vector_size(64), may_alias, aligned(4)));

// Transposes 16 rows of 16 32-bit lanes in registers: four butterfly stages of two-source
// shuffles; the stage of width W pairs rows i and i + W (i & W == 0), the first keeping the
// first W lanes of every 2W-lane chunk of both, the second the last W.
#define SK_PAIRS(W, LO, HI)                          \
  for (int i = 0; i < 16; ++i)                       \
    if (!(i & W)) {                                  \
      const U32x16 a = r[i], b = r[i + W];           \
      r[i] = __builtin_shufflevector(a, b, SK_##LO);  \
      r[i + W] = __builtin_shufflevector(a, b, SK_##HI); \
    }
#define SK_LO8 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23
#define SK_HI8 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31
#define SK_LO4 0, 1, 2, 3, 16, 17, 18, 19, 8, 9, 10, 11, 24, 25, 26, 27
#define SK_HI4 4, 5, 6, 7, 20, 21, 22, 23, 12, 13, 14, 15, 28, 29, 30, 31
#define SK_LO2 0, 1, 16, 17, 4, 5, 20, 21, 8, 9, 24, 25, 12, 13, 28, 29
#define SK_HI2 2, 3, 18, 19, 6, 7, 22, 23, 10, 11, 26, 27, 14, 15, 30, 31
#define SK_LO1 0, 16, 2, 18, 4, 20, 6, 22, 8, 24, 10, 26, 12, 28, 14, 30
#define SK_HI1 1, 17, 3, 19, 5, 21, 7, 23, 9, 25, 11, 27, 13, 29, 15, 31
inline void transpose16(U32x16 (&r)[16]) {
  SK_PAIRS(8, LO8, HI8)
  SK_PAIRS(4, LO4, HI4)
  SK_PAIRS(2, LO2, HI2)
  SK_PAIRS(1, LO1, HI1)
}
#undef SK_PAIRS
#undef SK_LO8
#undef SK_HI8
#undef SK_LO4
#undef SK_HI4
#undef SK_LO2
#undef SK_HI2
#undef SK_LO1
#undef SK_HI1

// dst[d * bk + j] = src[j * lds + d] for j < rows, 0 for rows <= j < bk; d < width. 32-bit
// elements; width a multiple of 16, bk of 16. Reads the source row by row (sequential, so the
// hardware prefetcher streams it from memory).
inline void transpose32(const uint32_t* src, int64_t lds, int64_t rows, int64_t width,
                        int64_t bk, uint32_t* dst) {
  for (int64_t j0 = 0; j0 < bk; j0 += 16)
    for (int64_t d0 = 0; d0 < width; d0 += 16) {
      U32x16 r[16];
      for (int i = 0; i < 16; ++i)
        r[i] = j0 + i < rows ? *reinterpret_cast<const U32x16*>(src + (j0 + i) * lds + d0)
                             : U32x16{};
      transpose16(r);
      for (int i = 0; i < 16; ++i) *reinterpret_cast<U32x16*>(dst + (d0 + i) * bk + j0) = r[i];
    }
}

// K block [kr, D] -> Kt [D, bk], zero columns past kr.
template <typename T>
void pack_transposed(const T* src, int64_t ld, int64_t kr, int64_t D, int64_t bk, T* dst) {
  if constexpr (sizeof(T) == 4) {
    if (D % 16 == 0) {
      transpose32(reinterpret_cast<const uint32_t*>(src), ld, kr, D, bk,
                  reinterpret_cast<uint32_t*>(dst));
      return;
    }
  }
  for (int64_t j = 0; j < kr; ++j) {
    const T* row = src + j * ld;
    for (int64_t d = 0; d < D; ++d) dst[d * bk + j] = row[d];
  }
  for (int64_t d = 0; d < D; ++d)
    for (int64_t j = kr; j < bk; ++j) dst[d * bk + j] = T(0);
}

// Ask for the rows of a [rows, D] block ahead of use (the next stored key block); Write: to
// be written (an output row's lines owned before the store, which else waits for them).
template <typename T, bool Write = false>
inline void prefetch_rows(const T* src, int64_t ld, int64_t rows, int64_t D) {
  constexpr int64_t per_line = 64 / sizeof(T);
  for (int64_t j = 0; j < rows; ++j)
    for (int64_t d = 0; d < D; d += per_line) __builtin_prefetch(src + j * ld + d, Write, 2);
}

// --- tiles: how one (query block, key block) pair is multiplied -------------------------------
// fp32 / fp64: K packed transposed for S = Q K^T, V read in place for O += P V.
template <typename T>
struct FloatTile {
  using E = T;
  using A = T;
  using QE = T;  // the query rows as the products read them
  static constexpr bool kPacksV = false;
  static constexpr bool kFusedSoftmax = false;
  static constexpr int64_t kQRowExtra = 0;  // a staged query row's length past D
  static const QE* stage_q(const E* q, int64_t&, int64_t, int64_t, QE*) { return q; }
  static void pack_k(const E* k, int64_t ld, int64_t kr, int64_t D, int64_t bk, E* buf) {
    pack_transposed(k, ld, kr, D, bk, buf);
  }
  static void pack_v(const E*, int64_t, int64_t, int64_t, int64_t, E*) {}
  static void scores(const E* q, int64_t ldq, int64_t qr, const E* kbuf, int64_t D, int64_t bk,
                     A* S) {
    gemm<T>(bk, qr, q, ldq, 1, kbuf, bk, D, S, bk, false);
  }
  // the row's probabilities 2^(s * scale - shift), in place (P V reads them there)
  static A exp_row(A* s, int64_t bk, A shift, A scale, E*) {
    return exp2_row(s, bk, shift, scale);
  }
  // O += P V (softmax_step rescaled O: alpha is null)
  static void accumulate(const A* P, int64_t qr, int64_t bk, int64_t kr, const E* v,
                         int64_t ldv, const E*, const E*, int64_t D, const A*, A* O) {
    gemm<T>(D, qr, P, bk, 1, v, ldv, kr, O, D, true);
  }
  // dst[d] = o[d] * inv, an output row
  static void store_row(const A* o, A inv, int64_t D, E* dst) {
    for (int64_t d = 0; d < D; ++d) dst[d] = o[d] * inv;
  }
};

// Rows of the bf16 / int8 register tiles for a width (a key block for Q K^T, the head dim for
// P V) of 16-float accumulator vectors per row: about 24 accumulators.
constexpr int bf16_tile_rows(int64_t width) {
  return width / 16 >= 8 ? 3 : static_cast<int>(24 / (width / 16 > 0 ? width / 16 : 1));
}

#ifdef SPARSEKERNELS_BF16_DOT
#define SPARSEKERNELS_AVX512BF16 \
  __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx512bf16")))

// VDPBF16PS multiplies pairs of bf16 and adds both products to an fp32 lane: the reduction
// dim is stored in pairs, (x[2t], x[2t+1]) as one 32-bit unit.
inline uint32_t load_pair(const c10::BFloat16* p) {
  uint32_t u;
  std::memcpy(&u, p, 4);
  return u;
}

// acc[R][BK/16] = Q[R, D] K^T; kp: K as pairs along D, [D/2][BK] 32-bit units.
template <int BK, int R>
SPARSEKERNELS_AVX512BF16 inline void bf16_qk(const c10::BFloat16* q, int64_t ldq,
                                             const uint32_t* kp, int64_t D,
                                             __m512 (&acc)[R][BK / 16]) {
  constexpr int NV = BK / 16;
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < NV; ++j) acc[r][j] = _mm512_setzero_ps();
  for (int64_t dp = 0; dp < D / 2; ++dp) {
    __m512bh b[NV];
    for (int j = 0; j < NV; ++j) b[j] = (__m512bh)_mm512_loadu_si512(kp + dp * BK + j * 16);
    for (int r = 0; r < R; ++r) {
      const __m512bh a = (__m512bh)_mm512_set1_epi32(load_pair(q + r * ldq + 2 * dp));
      for (int j = 0; j < NV; ++j) acc[r][j] = _mm512_dpbf16_ps(acc[r][j], a, b[j]);
    }
  }
}

// S[R, BK] = Q[R, D] K^T
template <int BK, int R>
SPARSEKERNELS_AVX512BF16 void bf16_scores_rows(const c10::BFloat16* q, int64_t ldq,
                                               const uint32_t* kp, int64_t D, float* S) {
  constexpr int NV = BK / 16;
  __m512 acc[R][NV];
  bf16_qk<BK, R>(q, ldq, kp, D, acc);
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < NV; ++j) _mm512_storeu_ps(S + r * BK + j * 16, acc[r][j]);
}

// f(BK, R, r0) (BK, R as std::integral_constant) over the row tiles of qr rows, for a key
// block of bk: the register tiles of every Q K^T product (bf16, int8, with the fused step).
template <typename F>
void over_row_tiles(int64_t bk, int64_t qr, F&& f) {
  dispatch_block(bk, [&](auto w) {
    constexpr int MR = bf16_tile_rows(decltype(w)::value);
    for (int64_t r0 = 0; r0 < qr; r0 += MR)
      dispatch_rows<MR>(static_cast<int>(std::min<int64_t>(MR, qr - r0)),
                        [&](auto rows) { f(w, rows, r0); });
  }, "attention key block");
}

// Lane i = op over the 16 lanes of v[i], for N <= 16 vectors: four halving stages that each
// combine two vectors (shuffle both ways, one op), so rows share the shuffles a reduction per
// row would repeat (22 instructions for 6 rows, against 48 and a blend per row). After the
// stages lane 4q + t holds row q + 4t; one permute puts row i in lane i.
template <int N, typename Op>
SPARSEKERNELS_AVX512BF16 inline __m512 reduce_lanes(const __m512 (&v)[N], Op op) {
  static_assert(N >= 1 && N <= 16, "reduce_lanes: 1 to 16 vectors");
  constexpr int N1 = (N + 1) / 2, N2 = (N1 + 1) / 2, N3 = (N2 + 1) / 2;
  __m512 a[N1], b[N2], c[N3];
#pragma GCC unroll 8
  for (int i = 0; i < N1; ++i) {  // 256-bit halves: row 2i in quarters 0-1, 2i + 1 in 2-3
    const __m512 x = v[2 * i], y = v[std::min(2 * i + 1, N - 1)];
    a[i] = op(_mm512_shuffle_f32x4(x, y, 0x44), _mm512_shuffle_f32x4(x, y, 0xEE));
  }
#pragma GCC unroll 4
  for (int i = 0; i < N2; ++i) {  // 128-bit quarters: quarter q holds row 4i + q
    const __m512 x = a[2 * i], y = a[std::min(2 * i + 1, N1 - 1)];
    b[i] = op(_mm512_shuffle_f32x4(x, y, 0x88), _mm512_shuffle_f32x4(x, y, 0xDD));
  }
#pragma GCC unroll 2
  for (int i = 0; i < N3; ++i) {  // lane pairs: quarter q holds rows 8i + q and 8i + 4 + q
    const __m512 x = b[2 * i], y = b[std::min(2 * i + 1, N2 - 1)];
    c[i] = op(_mm512_shuffle_ps(x, y, 0x44), _mm512_shuffle_ps(x, y, 0xEE));
  }
  const __m512 x = c[0], y = c[N3 - 1];
  const __m512 d = op(_mm512_shuffle_ps(x, y, 0x88), _mm512_shuffle_ps(x, y, 0xDD));
  return _mm512_permutexvar_ps(
      _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15), d);
}

// 2^x for the probabilities of a tile (x = score * scale - max <= 0): vexp2 without its mask
// for exact zeros, the clamp at -150 instead, where 2^n's scaling rounds to 0; between 2^-149
// and 2^-126 a denormal stays (rounding to bf16 flushes it to 0; the fp32 sum cannot see it).
// -inf gives 0, nan stays nan, as in vexp2.
template <int Deg>
SPARSEKERNELS_AVX512BF16 inline __m512 vexp2_tile(__m512 x) {
  const __m512 xc = _mm512_max_ps(_mm512_set1_ps(-150.0f), x);  // nan: its second operand
  const __m512 n = _mm512_roundscale_ps(xc, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 p = (__m512)exp2_poly<Deg>((Vec<float>::type)_mm512_sub_ps(xc, n));
  return _mm512_scalef_ps(p, n);
}

// The online-softmax step of R rows of a tile whose scores are all kept (no mask, every key
// visible, scale > 0), on the product's registers: no pass over a stored S. acc holds the
// scores; row r's are multiplied by scale[r] (log2 units). The tile's probabilities
// 2^(s * scale - max) go to p (bf16, row r at p + r * ldp); the running max m and sum l are
// updated, and alpha[r] is the factor O's row must be rescaled by (0 when nothing was kept
// yet, 1 when the max did not change), applied by bf16_pv_rows. The rows' statistics are the
// lanes of one vector: no scalar exp2 call (the accumulators were spilled around it) and no
// branch on the data (whether a row's max moved is a coin toss a branch mispredicts).
// softmax_lanes: rows G0 to G0 + N (N <= 16) of it.
template <int BK, int R, int G0, int N>
SPARSEKERNELS_AVX512BF16 inline void softmax_lanes(const __m512 (&acc)[R][BK / 16],
                                                   const float* scale, float* m, float* l,
                                                   float* alpha, c10::BFloat16* p,
                                                   int64_t ldp) {
  using V = Vec<float>::type;
  constexpr int NV = BK / 16;
  constexpr int kInf = 0x08 | 0x10;  // vfpclassps: +inf, -inf
  constexpr __mmask16 rows = static_cast<__mmask16>((1u << N) - 1);
  const auto vmax = [](__m512 x, __m512 y) { return _mm512_max_ps(x, y); };
  const auto vadd = [](__m512 x, __m512 y) { return _mm512_add_ps(x, y); };
  __m512 part[N];
#pragma GCC unroll 16
  for (int i = 0; i < N; ++i) {
    part[i] = acc[G0 + i][0];
#pragma GCC unroll 8
    for (int j = 1; j < NV; ++j) part[i] = _mm512_max_ps(part[i], acc[G0 + i][j]);
  }
  const __m512 mx = reduce_lanes<N>(part, vmax);
  const __m512 vscale = _mm512_maskz_loadu_ps(rows, scale + G0);
  const __m512 old = _mm512_maskz_loadu_ps(rows, m + G0);
  // std::max(old, x): old where x is nan (vmaxps returns its second operand for a nan)
  const __m512 now = _mm512_max_ps(_mm512_mul_ps(mx, vscale), old);
  const __m512 shift = _mm512_maskz_mov_ps(~_mm512_fpclass_ps_mask(now, kInf), now);
  // 0 where nothing was kept yet (old = -inf); 2^0 = 1 exactly where the max did not move
  const __m512 a = _mm512_maskz_mov_ps(~_mm512_fpclass_ps_mask(old, kInf),
                                       (__m512)vexp2((V)_mm512_sub_ps(old, shift)));
#pragma GCC unroll 16
  for (int i = 0; i < N; ++i) {
    const __m512i lane = _mm512_set1_epi32(i);
    const __m512 rs = _mm512_permutexvar_ps(lane, vscale);
    const __m512 rh = _mm512_permutexvar_ps(lane, shift);
    part[i] = _mm512_setzero_ps();
#pragma GCC unroll 8
    for (int j = 0; j < NV; ++j) {
      const __m512 e = vexp2_tile<4>(_mm512_fmsub_ps(acc[G0 + i][j], rs, rh));
      part[i] = _mm512_add_ps(part[i], e);
      _mm256_storeu_si256((__m256i*)(p + (G0 + i) * ldp + j * 16),
                          (__m256i)_mm512_cvtneps_pbh(e));
    }
  }
  const __m512 sums = reduce_lanes<N>(part, vadd);
  _mm512_mask_storeu_ps(l + G0, rows,
                        _mm512_fmadd_ps(_mm512_maskz_loadu_ps(rows, l + G0), a, sums));
  _mm512_mask_storeu_ps(m + G0, rows, now);
  _mm512_mask_storeu_ps(alpha + G0, rows, a);
}

template <int BK, int R>
SPARSEKERNELS_AVX512BF16 inline void softmax_registers(const __m512 (&acc)[R][BK / 16],
                                                       const float* scale, float* m, float* l,
                                                       float* alpha, c10::BFloat16* p,
                                                       int64_t ldp) {
  if constexpr (R <= 16) {
    softmax_lanes<BK, R, 0, R>(acc, scale, m, l, alpha, p, ldp);
  } else {  // narrow key blocks: up to 24 rows
    softmax_lanes<BK, R, 0, 16>(acc, scale, m, l, alpha, p, ldp);
    softmax_lanes<BK, R, 16, R - 16>(acc, scale, m, l, alpha, p, ldp);
  }
}

// The scores of R rows and their softmax step (softmax_registers, one scale for all rows)
template <int BK, int R>
SPARSEKERNELS_AVX512BF16 void bf16_scores_softmax_rows(const c10::BFloat16* q, int64_t ldq,
                                                       const uint32_t* kp, int64_t D,
                                                       float scale, float* m, float* l,
                                                       float* alpha, c10::BFloat16* p,
                                                       int64_t ldp) {
  __m512 acc[R][BK / 16];
  bf16_qk<BK, R>(q, ldq, kp, D, acc);
  float scales[R];
  for (int r = 0; r < R; ++r) scales[r] = scale;
  softmax_registers<BK, R>(acc, scales, m, l, alpha, p, ldp);
}

// bf16_scores_softmax_rows over qr rows and a key block of bk (both bf16 tiles' fused step)
void bf16_scores_softmax(const c10::BFloat16* q, int64_t ldq, int64_t qr, const uint32_t* kp,
                         int64_t D, int64_t bk, float scale, float* m, float* l, float* alpha,
                         c10::BFloat16* p, int64_t ldp) {
  over_row_tiles(bk, qr, [&](auto w, auto rows, int64_t r0) {
    bf16_scores_softmax_rows<decltype(w)::value, decltype(rows)::value>(
        q + r0 * ldq, ldq, kp, D, scale, m + r0, l + r0, alpha + r0, p + r0 * ldp, ldp);
  });
}

// O[R, DV] = O * alpha + P[R, 2 * npairs] V (alpha: one factor per row, or none); pp: P in
// bf16, rows of ldp pairs; vp: V as pairs along the keys, [npairs][DV] 32-bit units.
template <int DV, int R>
SPARSEKERNELS_AVX512BF16 void bf16_pv_rows(const uint32_t* pp, int64_t ldp, int64_t npairs,
                                           const uint32_t* vp, const float* alpha, float* O) {
  constexpr int NV = DV / 16;
  __m512 acc[R][NV];
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < NV; ++j) {
      acc[r][j] = _mm512_loadu_ps(O + r * DV + j * 16);
      if (alpha) acc[r][j] = _mm512_mul_ps(acc[r][j], _mm512_set1_ps(alpha[r]));
    }
  for (int64_t jp = 0; jp < npairs; ++jp) {
    __m512bh b[NV];
    for (int j = 0; j < NV; ++j) b[j] = (__m512bh)_mm512_loadu_si512(vp + jp * DV + j * 16);
    for (int r = 0; r < R; ++r) {
      const __m512bh a = (__m512bh)_mm512_set1_epi32(pp[r * ldp + jp]);
      for (int j = 0; j < NV; ++j) acc[r][j] = _mm512_dpbf16_ps(acc[r][j], a, b[j]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < NV; ++j) _mm512_storeu_ps(O + r * DV + j * 16, acc[r][j]);
}

template <int DV>
void bf16_pv(const uint32_t* pp, int64_t ldp, int64_t qr, int64_t npairs, const uint32_t* vp,
             const float* alpha, float* O) {
  constexpr int MR = bf16_tile_rows(DV);
  for (int64_t r0 = 0; r0 < qr; r0 += MR)
    dispatch_rows<MR>(static_cast<int>(std::min<int64_t>(MR, qr - r0)), [&](auto rows) {
      bf16_pv_rows<DV, decltype(rows)::value>(pp + r0 * ldp, ldp, npairs, vp,
                                              alpha ? alpha + r0 : nullptr, O + r0 * DV);
    });
}

// One row of P = 2^(s * scale - shift) straight to bf16 (round to nearest even) for P V;
// returns the sum of the fp32 values (the softmax denominator). bk a multiple of 16.
SPARSEKERNELS_AVX512BF16 float bf16_exp_row(const float* s, int64_t bk, float shift,
                                            float scale, c10::BFloat16* out) {
  using V = Vec<float>::type;
  V sum{};
  for (int64_t j = 0; j < bk; j += 16) {
    const V p = vexp2(loadu<float>(s + j) * scale - shift);
    sum += p;
    _mm256_storeu_si256((__m256i*)(out + j), (__m256i)_mm512_cvtneps_pbh((__m512)p));
  }
  return hsum(sum);
}

// V block [kr, D] -> pairs along the keys [ceil(kr/2)][D] (a zero row pads an odd kr).
SPARSEKERNELS_AVX512BF16 void bf16_pack_v(const c10::BFloat16* v, int64_t ld, int64_t kr,
                                          int64_t D, uint32_t* vp) {
  alignas(64) uint16_t lo_idx[32], hi_idx[32];
  for (int t = 0; t < 16; ++t) {
    lo_idx[2 * t] = t, lo_idx[2 * t + 1] = 32 + t;
    hi_idx[2 * t] = 16 + t, hi_idx[2 * t + 1] = 48 + t;
  }
  const __m512i lo = _mm512_load_si512(lo_idx), hi = _mm512_load_si512(hi_idx);
  for (int64_t jp = 0; jp < (kr + 1) / 2; ++jp) {
    const c10::BFloat16* r0 = v + 2 * jp * ld;
    const c10::BFloat16* r1 = 2 * jp + 1 < kr ? r0 + ld : nullptr;
    for (int64_t d = 0; d < D; d += 32) {
      const __mmask32 m = D - d >= 32 ? ~__mmask32(0) : (__mmask32(1) << (D - d)) - 1;
      const __m512i a = _mm512_maskz_loadu_epi16(m, r0 + d);
      const __m512i b = r1 ? _mm512_maskz_loadu_epi16(m, r1 + d) : _mm512_setzero_si512();
      _mm512_storeu_si512(vp + jp * D + d, _mm512_permutex2var_epi16(a, lo, b));
      if (D - d > 16) _mm512_storeu_si512(vp + jp * D + d + 16, _mm512_permutex2var_epi16(a, hi, b));
    }
  }
}

// K block [kr, D] -> pairs along D, transposed: [D/2][bk] 32-bit units, zero past kr.
inline void bf16_pack_k(const c10::BFloat16* k, int64_t ld, int64_t kr, int64_t D, int64_t bk,
                        uint32_t* kp) {
  const int64_t dp_n = D / 2;
  if (dp_n % 16 == 0 && ld % 2 == 0) {  // rows of whole 32-bit pairs
    transpose32(reinterpret_cast<const uint32_t*>(k), ld / 2, kr, dp_n, bk, kp);
    return;
  }
  for (int64_t j = 0; j < kr; ++j) {
    const c10::BFloat16* row = k + j * ld;
    for (int64_t dp = 0; dp < dp_n; ++dp) kp[dp * bk + j] = load_pair(row + 2 * dp);
  }
  for (int64_t dp = 0; dp < dp_n; ++dp)
    for (int64_t j = kr; j < bk; ++j) kp[dp * bk + j] = 0;
}

// dst[d] = o[d] * inv rounded to bf16 (to nearest even, as c10::BFloat16), 16 lanes at a time:
// a scalar conversion per element cost a tenth of the kernel.
SPARSEKERNELS_AVX512BF16 void bf16_store_row(const float* o, float inv, int64_t D,
                                             c10::BFloat16* dst) {
  const __m512 s = _mm512_set1_ps(inv);
  int64_t d = 0;
  for (; d + 16 <= D; d += 16)  // whole vectors without a mask
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + d),
                        (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(_mm512_loadu_ps(o + d), s)));
  if (d < D) {
    const __mmask16 m = (__mmask16(1) << (D - d)) - 1;
    const __m512 x = _mm512_mul_ps(_mm512_maskz_loadu_ps(m, o + d), s);
    _mm256_mask_storeu_epi16(dst + d, m, (__m256i)_mm512_cvtneps_pbh(x));
  }
}

// bf16 inputs, fp32 accumulation and softmax; both products on VDPBF16PS. P is rounded to
// bf16 for P V, as FlashAttention does on GPUs.
struct Bf16Tile {
  using E = c10::BFloat16;
  using A = float;
  using QE = c10::BFloat16;
  static constexpr bool kPacksV = true;
  static constexpr bool kFusedSoftmax = true;
  static constexpr int64_t kQRowExtra = 0;
  static const QE* stage_q(const E* q, int64_t&, int64_t, int64_t, QE*) { return q; }
  static void pack_k(const E* k, int64_t ld, int64_t kr, int64_t D, int64_t bk, E* buf) {
    bf16_pack_k(k, ld, kr, D, bk, reinterpret_cast<uint32_t*>(buf));
  }
  static void pack_v(const E* v, int64_t ld, int64_t kr, int64_t D, int64_t, E* buf) {
    bf16_pack_v(v, ld, kr, D, reinterpret_cast<uint32_t*>(buf));
  }
  static void scores(const E* q, int64_t ldq, int64_t qr, const E* kbuf, int64_t D, int64_t bk,
                     A* S) {
    const auto* kp = reinterpret_cast<const uint32_t*>(kbuf);
    over_row_tiles(bk, qr, [&](auto w, auto rows, int64_t r0) {
      bf16_scores_rows<decltype(w)::value, decltype(rows)::value>(q + r0 * ldq, ldq, kp, D,
                                                                  S + r0 * bk);
    });
  }
  // the scores and their softmax step at once (plain tiles); P to pbuf, rows of bk
  static void scores_softmax(const QE* q, int64_t ldq, int64_t qr, const E* kbuf, int64_t D,
                             int64_t bk, A scale, A* m, A* l, A* alpha, E* pbuf) {
    bf16_scores_softmax(q, ldq, qr, reinterpret_cast<const uint32_t*>(kbuf), D, bk, scale, m,
                        l, alpha, pbuf, bk);
  }
  // P goes to the bf16 buffer P V reads (row r at pout = pbuf + r * bk)
  static A exp_row(A* s, int64_t bk, A shift, A scale, E* pout) {
    return bf16_exp_row(s, bk, shift, scale, pout);
  }
  // O = O * alpha + P V (alpha null: O += P V)
  static void accumulate(const A*, int64_t qr, int64_t bk, int64_t kr, const E*, int64_t,
                         const E* vbuf, const E* pbuf, int64_t D, const A* alpha, A* O) {
    const auto* pp = reinterpret_cast<const uint32_t*>(pbuf);
    const auto* vp = reinterpret_cast<const uint32_t*>(vbuf);
    dispatch_block(D, [&](auto w) { bf16_pv<decltype(w)::value>(pp, bk / 2, qr, (kr + 1) / 2,
                                                                 vp, alpha, O); },
                   "head dim");
  }
  static void store_row(const A* o, A inv, int64_t D, E* dst) { bf16_store_row(o, inv, D, dst); }
};

// rows x n fp32 -> bf16 (round to nearest even), row by row.
SPARSEKERNELS_AVX512BF16 void bf16_round_rows(const float* src, int64_t lds, int64_t rows,
                                              int64_t n, c10::BFloat16* dst, int64_t ldd) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t j = 0; j < n; j += 16) {
      const __mmask16 m = n - j >= 16 ? __mmask16(0xFFFF) : (__mmask16(1) << (n - j)) - 1;
      const __m512 x = _mm512_maskz_loadu_ps(m, src + r * lds + j);
      _mm256_mask_storeu_epi16(dst + r * ldd + j, m, (__m256i)_mm512_cvtneps_pbh(x));
    }
}

// fp32 inputs and output, both products in bf16 (the inputs rounded to bf16 as they are
// packed, the query rows once per item; fp32 accumulation and softmax): torch's
// fp32_precision "bf16" for attention. The fp32 buffers of the generic item hold the bf16
// data: a packed K or V block takes the first half of its D * bk floats and the rounded rows
// it is packed from the second; a row of P takes half of its bk floats.
struct F32Bf16Tile {
  using E = float;
  using A = float;
  using QE = c10::BFloat16;
  static constexpr bool kPacksV = true;
  static constexpr bool kFusedSoftmax = true;
  static constexpr int64_t kQRowExtra = 0;
  // the item's query rows rounded to bf16 into buf (rows of D)
  static const QE* stage_q(const E* q, int64_t& ldq, int64_t rows, int64_t D, QE* buf) {
    bf16_round_rows(q, ldq, rows, D, buf, D);
    ldq = D;
    return buf;
  }
  static c10::BFloat16* staging(E* buf, int64_t D, int64_t bk) {
    return reinterpret_cast<c10::BFloat16*>(buf + D * bk / 2);
  }
  static void pack_k(const E* k, int64_t ld, int64_t kr, int64_t D, int64_t bk, E* buf) {
    c10::BFloat16* rows = staging(buf, D, bk);
    bf16_round_rows(k, ld, kr, D, rows, D);
    bf16_pack_k(rows, D, kr, D, bk, reinterpret_cast<uint32_t*>(buf));
  }
  static void pack_v(const E* v, int64_t ld, int64_t kr, int64_t D, int64_t bk, E* buf) {
    c10::BFloat16* rows = staging(buf, D, bk);
    bf16_round_rows(v, ld, kr, D, rows, D);
    bf16_pack_v(rows, D, kr, D, reinterpret_cast<uint32_t*>(buf));
  }
  static void scores(const QE* q, int64_t ldq, int64_t qr, const E* kbuf, int64_t D,
                     int64_t bk, A* S) {
    Bf16Tile::scores(q, ldq, qr, reinterpret_cast<const c10::BFloat16*>(kbuf), D, bk, S);
  }
  // P rows of bk floats hold 2 * bk bf16
  static void scores_softmax(const QE* q, int64_t ldq, int64_t qr, const E* kbuf, int64_t D,
                             int64_t bk, A scale, A* m, A* l, A* alpha, E* pbuf) {
    bf16_scores_softmax(q, ldq, qr, reinterpret_cast<const uint32_t*>(kbuf), D, bk, scale, m,
                        l, alpha, reinterpret_cast<c10::BFloat16*>(pbuf), 2 * bk);
  }
  static A exp_row(A* s, int64_t bk, A shift, A scale, E* pout) {
    return bf16_exp_row(s, bk, shift, scale, reinterpret_cast<c10::BFloat16*>(pout));
  }
  static void accumulate(const A*, int64_t qr, int64_t bk, int64_t kr, const E*, int64_t,
                         const E* vbuf, const E* pbuf, int64_t D, const A* alpha, A* O) {
    const auto* pp = reinterpret_cast<const uint32_t*>(pbuf);  // rows of bk floats = bk pairs
    const auto* vp = reinterpret_cast<const uint32_t*>(vbuf);
    dispatch_block(D, [&](auto w) { bf16_pv<decltype(w)::value>(pp, bk, qr, (kr + 1) / 2, vp,
                                                                 alpha, O); },
                   "head dim");
  }
  static void store_row(const A* o, A inv, int64_t D, E* dst) {
    FloatTile<float>::store_row(o, inv, D, dst);
  }
};
// --- Q K^T in int8 -----------------------------------------------------------------------------
// SageAttention's split for the CPU: the query and key rows quantized to int8 on the fly, each
// with its own scale (max |x| / 127, round to nearest even), Q K^T on VNNI (four int8 products
// per 32-bit lane, twice VDPBF16PS's rate), the softmax and P V as the bf16 tiles run them.
// VPDPBUSD multiplies unsigned by signed bytes: a query row is stored as q + 128 (u8) and
// 128 * sum(k) is taken off each key's sum, exactly, in int32.
#define SPARSEKERNELS_AVX512VNNI \
  __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx512bf16,avx512vnni")))

template <typename E>
SPARSEKERNELS_AVX512VNNI inline __m512 load16_ps(const E* x) {
  if constexpr (std::is_same<E, float>::value) {
    return _mm512_loadu_ps(x);
  } else {
    const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  }
}

// Rows of D (a multiple of 16) values to int8: row r's out[d] = round(x[d] / scale) (+ 128
// with `offset`; rows ldo bytes apart), scale[r] = max |x| / 127 (0 for a zero row, nan for
// a row with an inf or nan: its scores are nan).
// All maxima first: the rows' loads (the projections left them in L3) overlap.
template <typename E>
SPARSEKERNELS_AVX512VNNI void quantize_rows_i8(const E* x, int64_t ld, int64_t rows, int64_t D,
                                               bool offset, uint8_t* out, int64_t ldo,
                                               float* scale) {
  for (int64_t r = 0; r < rows; ++r) {
    if (r + 8 < rows)
      for (int64_t d = 0; d < D; d += 64 / int64_t(sizeof(E)))
        __builtin_prefetch(x + (r + 8) * ld + d, 0, 3);
    __m512 mx = _mm512_setzero_ps();
    __mmask16 nan = 0;  // (vmaxps drops a nan operand)
    for (int64_t d = 0; d < D; d += 16) {
      const __m512 v = load16_ps(x + r * ld + d);
      mx = _mm512_max_ps(mx, _mm512_abs_ps(v));
      nan |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    }
    scale[r] = nan ? std::numeric_limits<float>::quiet_NaN() : _mm512_reduce_max_ps(mx);
  }
  const __m128i flip = _mm_set1_epi8(offset ? char(0x80) : 0);
  for (int64_t r = 0; r < rows; ++r) {
    const float amax = scale[r];
    uint8_t* o = out + r * ldo;
    if (!std::isfinite(amax)) {
      std::fill(o, o + D, uint8_t(offset ? 128 : 0));
      scale[r] = std::numeric_limits<float>::quiet_NaN();
      continue;
    }
    const __m512 inv = _mm512_set1_ps(amax > 0.f ? 127.f / amax : 0.f);
    for (int64_t d = 0; d < D; d += 16) {
      const __m512i v = _mm512_cvtps_epi32(_mm512_mul_ps(load16_ps(x + r * ld + d), inv));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(o + d),
                       _mm_xor_si128(_mm512_cvtsepi32_epi8(v), flip));
    }
    scale[r] = amax / 127.f;
  }
}

// A packed int8 key block: [D/4][bk] 32-bit units (four consecutive int8 of one key along D),
// then bk scales (fp32) and bk corrections 128 * sum(k) (int32); D * bk + 8 * bk bytes.
struct Int8KeyBlock {
  const int32_t* kp;
  const float* scale;
  const int32_t* corr;
  Int8KeyBlock(const void* buf, int64_t D, int64_t bk)
      : kp(static_cast<const int32_t*>(buf)),
        scale(reinterpret_cast<const float*>(static_cast<const char*>(buf) + D * bk)),
        corr(reinterpret_cast<const int32_t*>(static_cast<const char*>(buf) + D * bk + 4 * bk)) {}
};

template <typename E>
SPARSEKERNELS_AVX512VNNI void int8_pack_k(const E* k, int64_t ld, int64_t kr, int64_t D,
                                          int64_t bk, void* buf) {
  auto* kp = static_cast<int32_t*>(buf);
  auto* scale = reinterpret_cast<float*>(static_cast<char*>(buf) + D * bk);
  auto* corr = reinterpret_cast<int32_t*>(static_cast<char*>(buf) + D * bk + 4 * bk);
  alignas(64) uint8_t rows[128 * 256];  // kr <= 128 rows of D <= 256
  quantize_rows_i8(k, ld, kr, D, false, rows, D, scale);
  for (int64_t j = kr; j < bk; ++j) scale[j] = 0.f;
  const int64_t units = D / 4;
  if (units % 16 == 0) {  // rows of whole 16-unit vectors: transposed in registers
    transpose32(reinterpret_cast<const uint32_t*>(rows), units, kr, units, bk,
                reinterpret_cast<uint32_t*>(kp));
  } else {
    for (int64_t j = 0; j < bk; ++j)
      for (int64_t u = 0; u < units; ++u)
        if (j < kr) std::memcpy(kp + u * bk + j, rows + j * D + 4 * u, 4);
        else kp[u * bk + j] = 0;
  }
  // 128 * sum(k) per key, by the same dot product the scores use: 128 (u8) times k
  const __m512i ones = _mm512_set1_epi8(char(0x80));
  for (int64_t j = 0; j < bk; j += 16) {
    __m512i c = _mm512_setzero_si512();
    for (int64_t u = 0; u < units; ++u)
      c = _mm512_dpbusd_epi32(c, ones, _mm512_loadu_si512(kp + u * bk + j));
    _mm512_storeu_si512(corr + j, c);
  }
}

// acc[R][BK/16] = (Q[R, D] K^T) / qs as fp32 (qs[r]: query row r's scale): q rows of D bytes
// (q + 128) followed by the row's scale (fp32), ldq bytes apart.
template <int BK, int R>
SPARSEKERNELS_AVX512VNNI inline void int8_qk(const uint8_t* q, int64_t ldq, const Int8KeyBlock& K,
                                             int64_t D, __m512 (&acc)[R][BK / 16],
                                             float (&qs)[R]) {
  constexpr int NV = BK / 16;
  VInt ai[R][NV];  // (an __m512i array stayed in memory: GCC spilled it every step)
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < NV; ++j) ai[r][j] = VInt{};
  const int32_t* kp = K.kp;
  for (int64_t u = 0; u < D / 4; ++u) {
    __m512i b[NV];
#pragma GCC unroll 8
    for (int j = 0; j < NV; ++j) b[j] = _mm512_loadu_si512(kp + u * BK + j * 16);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      int32_t a4;
      std::memcpy(&a4, q + r * ldq + 4 * u, 4);
      const __m512i a = _mm512_set1_epi32(a4);
#pragma GCC unroll 8
      for (int j = 0; j < NV; ++j)
        ai[r][j] = (VInt)_mm512_dpbusd_epi32((__m512i)ai[r][j], a, b[j]);
    }
  }
  for (int r = 0; r < R; ++r) {
    std::memcpy(&qs[r], q + r * ldq + D, 4);
    for (int j = 0; j < NV; ++j) {
      const __m512i corr = _mm512_loadu_si512(K.corr + j * 16);
      const __m512i exact = _mm512_sub_epi32((__m512i)ai[r][j], corr);
      acc[r][j] = _mm512_mul_ps(_mm512_cvtepi32_ps(exact), _mm512_loadu_ps(K.scale + j * 16));
    }
  }
}

template <int BK, int R>
SPARSEKERNELS_AVX512VNNI void int8_scores_rows(const uint8_t* q, int64_t ldq,
                                               const Int8KeyBlock& K, int64_t D, float* S) {
  __m512 acc[R][BK / 16];
  float qs[R];
  int8_qk<BK, R>(q, ldq, K, D, acc, qs);
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < BK / 16; ++j)
      _mm512_storeu_ps(S + r * BK + j * 16, _mm512_mul_ps(acc[r][j], _mm512_set1_ps(qs[r])));
}

template <int BK, int R>
SPARSEKERNELS_AVX512VNNI void int8_scores_softmax_rows(const uint8_t* q, int64_t ldq,
                                                       const Int8KeyBlock& K, int64_t D,
                                                       float scale, float* m, float* l,
                                                       float* alpha, c10::BFloat16* p,
                                                       int64_t ldp) {
  __m512 acc[R][BK / 16];
  float scales[R];
  int8_qk<BK, R>(q, ldq, K, D, acc, scales);
  for (int r = 0; r < R; ++r) scales[r] *= scale;
  softmax_registers<BK, R>(acc, scales, m, l, alpha, p, ldp);
}

// Q K^T in int8, then the base tile (Bf16Tile for bf16 inputs, F32Bf16Tile for fp32 ones) for
// the softmax, P V and the output. Needs D % 16 == 0 (the packed block fits the base's K
// buffer: D * bk * sizeof(E) >= D * bk + 8 * bk bytes).
template <typename Base>
struct Int8QkTile : Base {
  using E = typename Base::E;
  using A = float;
  using QE = uint8_t;
  static constexpr bool kFusedSoftmax = true;
  static constexpr int64_t kQRowExtra = 4;  // a staged query row: D bytes, then its scale
  static constexpr int64_t kMaxRows = 128;
  static const QE* stage_q(const E* q, int64_t& ldq, int64_t rows, int64_t D, QE* buf) {
    float scale[kMaxRows];
    for (int64_t r0 = 0; r0 < rows; r0 += kMaxRows) {
      const int64_t n = std::min(kMaxRows, rows - r0);
      quantize_rows_i8(q + r0 * ldq, ldq, n, D, true, buf + r0 * (D + 4), D + 4, scale);
      for (int64_t r = 0; r < n; ++r) std::memcpy(buf + (r0 + r) * (D + 4) + D, &scale[r], 4);
    }
    ldq = D + 4;
    return buf;
  }
  static void pack_k(const E* k, int64_t ld, int64_t kr, int64_t D, int64_t bk, E* buf) {
    int8_pack_k(k, ld, kr, D, bk, buf);
  }
  static void scores(const QE* q, int64_t ldq, int64_t qr, const E* kbuf, int64_t D, int64_t bk,
                     A* S) {
    const Int8KeyBlock K(kbuf, D, bk);
    over_row_tiles(bk, qr, [&](auto w, auto rows, int64_t r0) {
      int8_scores_rows<decltype(w)::value, decltype(rows)::value>(q + r0 * ldq, ldq, K, D,
                                                                  S + r0 * bk);
    });
  }
  // P rows of bk E units: bk * sizeof(E) / 2 bf16 apart
  static void scores_softmax(const QE* q, int64_t ldq, int64_t qr, const E* kbuf, int64_t D,
                             int64_t bk, A scale, A* m, A* l, A* alpha, E* pbuf) {
    const Int8KeyBlock K(kbuf, D, bk);
    const int64_t ldp = bk * static_cast<int64_t>(sizeof(E)) / 2;
    auto* p = reinterpret_cast<c10::BFloat16*>(pbuf);
    over_row_tiles(bk, qr, [&](auto w, auto rows, int64_t r0) {
      int8_scores_softmax_rows<decltype(w)::value, decltype(rows)::value>(
          q + r0 * ldq, ldq, K, D, scale, m + r0, l + r0, alpha + r0, p + r0 * ldp, ldp);
    });
  }
};
#endif  // SPARSEKERNELS_BF16_DOT

bool cpu_has_bf16_dot() {
#ifdef SPARSEKERNELS_BF16_DOT
  static const bool ok = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                         __builtin_cpu_supports("avx512vl") &&
                         __builtin_cpu_supports("avx512bf16");
  return ok;
#else
  return false;
#endif
}

bool cpu_has_int8_dot() {
#ifdef SPARSEKERNELS_BF16_DOT
  static const bool ok = cpu_has_bf16_dot() && __builtin_cpu_supports("avx512vnni");
  return ok;
#else
  return false;
#endif
}

// --- layout -> compressed block lists ----------------------------------------------------------
struct BlockLists {
  std::vector<int32_t> ptr;  // [rows + 1]
  std::vector<int32_t> idx;  // the columns of each row, increasing
  int32_t count(int64_t row) const { return ptr[row + 1] - ptr[row]; }
};

// One list per (b, unit, block): units are query heads, or with `grouped` key/value heads
// (a column is listed when any query head of the group stores it); blocks are query blocks
// listing key blocks, or with `by_key` key blocks listing query blocks. Pairs that causal /
// the window leave empty are not listed.
BlockLists block_lists(const Shape& P, bool by_key, bool grouped) {
  const int64_t units = grouped ? P.Hkv : P.H, per = grouped ? P.G : 1;
  const int64_t rows = by_key ? P.nk : P.nq, cols = by_key ? P.nq : P.nk;
  BlockLists out;
  out.ptr.reserve(P.B * units * rows + 1);
  out.ptr.push_back(0);
  for (int64_t b = 0; b < P.B; ++b)
    for (int64_t u = 0; u < units; ++u)
      for (int64_t r = 0; r < rows; ++r) {
        for (int64_t c = 0; c < cols; ++c) {
          const int64_t qb = by_key ? c : r, kb = by_key ? r : c;
          if (!P.reachable(qb, kb)) continue;
          bool any = false;
          for (int64_t t = 0; t < per && !any; ++t) any = P.stored(b, u * per + t, qb, kb);
          if (any) out.idx.push_back(static_cast<int32_t>(c));
        }
        out.ptr.push_back(static_cast<int32_t>(out.idx.size()));
      }
  return out;
}

// --- forward -----------------------------------------------------------------------------------
// Online softmax of one head's rows over one more tile: S holds scores in log2 units times
// 1 / scale (scale > 0: the plain tiles skip finish_scores and scale here); the tile's
// probabilities go where Tile::accumulate reads them (pbuf, rows of bk, or S itself); the
// running max m, sum l and output O (rows of D) are rescaled.
template <typename Tile>
void softmax_step(typename Tile::A* S, int64_t qr, int64_t bk, int64_t D, typename Tile::A scale,
                  typename Tile::A* m, typename Tile::A* l, typename Tile::A* O,
                  typename Tile::E* pbuf) {
  using A = typename Tile::A;
  for (int64_t r = 0; r < qr; ++r) {
    A* s = S + r * bk;
    const A mx = std::max(m[r], row_max(s, bk, -std::numeric_limits<A>::infinity()) * scale);
    const A shift = std::isinf(mx) ? A(0) : mx;
    // nothing kept yet (m = -inf: O and l are 0), or the same max: no rescale, no exp2 call
    const bool first = std::isinf(m[r]), same = m[r] == mx;
    const A alpha = first ? A(0) : same ? A(1) : std::exp2(m[r] - shift);
    l[r] = l[r] * alpha + Tile::exp_row(s, bk, shift, scale, pbuf ? pbuf + r * bk : nullptr);
    m[r] = mx;
    A* o = O + r * D;
    if (!first && !same)
      for (int64_t d = 0; d < D; ++d) o[d] *= alpha;
  }
}

// Rows [0, qr) of O / l in E, row r at dst + r * ld (zeros where no key was allowed), for a
// forward that keeps no statistics: the reciprocals first, in a loop the compiler vectorizes,
// so that no row's stores wait on its own division.
template <typename Tile>
void finish_rows(const typename Tile::A* O, const typename Tile::A* l, int64_t qr, int64_t D,
                 typename Tile::E* dst, int64_t ld) {
  using A = typename Tile::A;
  constexpr int64_t kChunk = 64;
  A inv[kChunk];
  for (int64_t r0 = 0; r0 < qr; r0 += kChunk) {
    const int64_t n = std::min(kChunk, qr - r0);
    for (int64_t r = 0; r < n; ++r) inv[r] = l[r0 + r] > A(0) ? A(1) / l[r0 + r] : A(0);
    for (int64_t r = 0; r < n; ++r)
      Tile::store_row(O + (r0 + r) * D, inv[r], D, dst + (r0 + r) * ld);
  }
}

// out row = O / l in E (zeros where no key was allowed); stats (when kept for a backward):
// max (+inf there), log2(l).
template <typename Tile>
void finish_row(const typename Tile::A* o, typename Tile::A m, typename Tile::A l, int64_t D,
                typename Tile::E* dst, typename Tile::A* st_max, typename Tile::A* st_log) {
  using A = typename Tile::A;
  const bool live = l > A(0);
  const A inv = live ? A(1) / l : A(0);
  Tile::store_row(o, inv, D, dst);
  if (st_max == nullptr) return;
  *st_max = live ? m : std::numeric_limits<A>::infinity();
  *st_log = live ? std::log2(l) : A(0);
}

// One forward work item: query block qb of every query head of key/value head hk, over the
// stored key blocks idx[e0, e1). The group's query rows are stacked head by head (rows apart),
// so that a key block all of them store is one product of G * rows rows.
template <typename Tile>
struct ForwardScratch {
  using E = typename Tile::E;
  using A = typename Tile::A;
  using QE = typename Tile::QE;
  static constexpr bool kStagesQ = !std::is_same<E, QE>::value;
  std::vector<E> Q, Kb, Vb, Pb;
  std::vector<QE> Qs;  // the query rows as the products read them (when not E)
  std::vector<A> S, O, m, l, alpha;
  std::vector<char> stores;
  // more than one slot: the packed K / V blocks of key/value head `owner` (b * Hkv + hk), one
  // slot per key block, kept for that head's next query blocks (packed[kb]: slot kb holds kb)
  std::vector<char> packed;
  int64_t owner = -1;
  ForwardScratch(int64_t G, int64_t rows, int64_t D, int64_t bk, int64_t slots)
      : Q(G > 1 ? G * rows * D : 0), Kb(slots * D * bk),
        Vb(Tile::kPacksV ? slots * D * bk : 0), Pb(Tile::kPacksV ? G * rows * bk : 0),
        Qs(kStagesQ ? G * rows * (D + Tile::kQRowExtra) : 0), S(G * rows * bk),
        O(G * rows * D), m(G * rows),
        l(G * rows), alpha(Tile::kFusedSoftmax ? G * rows : 0), stores(G), packed(slots) {}
};

// Rows per step of the fused tiles: whole register tiles of Q K^T (a key block of bk) and of
// P V (head dim D), at least 12.
inline int64_t fused_step(int64_t bk, int64_t D) {
  const int64_t both = std::lcm(bf16_tile_rows(bk), bf16_tile_rows(D));
  return both * ((12 + both - 1) / both);
}

template <typename Tile>
void forward_item(const Problem<typename Tile::E, typename Tile::A>& P, int64_t b, int64_t hk,
                  int64_t qb, const int32_t* idx, int64_t e0, int64_t e1, int64_t rows,
                  ForwardScratch<Tile>& w) {
  using E = typename Tile::E;
  using A = typename Tile::A;
  const int64_t G = P.G, bk = P.bk, D = P.D;
  const int64_t q0 = qb * P.bq, qr = std::min(P.bq, P.Lq - q0);
  // the query rows: read in place for one head, stacked head by head (rows apart) for a group
  const E* Q = P.q + b * P.sq[0] + hk * G * P.sq[1] + q0 * P.sq[2];
  int64_t ldq = P.sq[2];
  if (G > 1) {
    for (int64_t g = 0; g < G; ++g)
      for (int64_t r = 0; r < qr; ++r) {
        const E* src = Q + g * P.sq[1] + r * P.sq[2];
        std::copy(src, src + D, w.Q.data() + (g * rows + r) * D);
      }
    Q = w.Q.data();
    ldq = D;
  }
  const typename Tile::QE* Qs = Tile::stage_q(Q, ldq, (G - 1) * rows + qr, D, w.Qs.data());
  std::fill(w.O.begin(), w.O.end(), A(0));
  std::fill(w.m.begin(), w.m.end(), -std::numeric_limits<A>::infinity());
  std::fill(w.l.begin(), w.l.end(), A(0));
  const E* kbase = P.k + b * P.sk[0] + hk * P.sk[1];
  const E* vbase = P.v + b * P.sv[0] + hk * P.sv[1];
  const bool keep = w.packed.size() > 1;  // this head's packed blocks outlive the item
  if (keep && w.owner != b * P.Hkv + hk) {
    std::fill(w.packed.begin(), w.packed.end(), 0);
    w.owner = b * P.Hkv + hk;
  }
  for (int64_t e = e0; e < e1; ++e) {
    const int64_t kb = idx[e], k0 = kb * bk, kr = std::min(bk, P.Lk - k0);
    E* kbuf = w.Kb.data() + (keep ? kb : 0) * D * bk;
    E* vbuf = Tile::kPacksV ? w.Vb.data() + (keep ? kb : 0) * D * bk : nullptr;
    const bool have = keep && w.packed[kb];
    // the next pair's K is asked for once this K is read, its V once this V is: memory
    // works while this pair computes (asking for both before reading this pair stalled)
    const int64_t n0 = e + 1 < e1 && !(keep && w.packed[idx[e + 1]])
                           ? static_cast<int64_t>(idx[e + 1]) * bk : -1;
    const int64_t nr = n0 >= 0 ? std::min(bk, P.Lk - n0) : 0;
    if (!have) Tile::pack_k(kbase + k0 * P.sk[2], P.sk[2], kr, D, bk, kbuf);
    if (nr) prefetch_rows(kbase + n0 * P.sk[2], P.sk[2], nr, D);
    if (!have) Tile::pack_v(vbase + k0 * P.sv[2], P.sv[2], kr, D, bk, vbuf);
    if (keep) w.packed[kb] = 1;
    bool all = qr == rows;
    for (int64_t g = 0; g < G; ++g) all &= (w.stores[g] = P.stored(b, hk * G + g, qb, kb)) != 0;
    // no mask, every pair visible by position, a positive scale: scores need no finishing
    const bool plain = !P.mask_bool && !P.mask_add && P.qk_scale > A(0) &&
                       P.all_visible(q0, qr, k0);
    // the stacked rows of heads [g0, g0 + n) at once
    auto run = [&](int64_t g0, int64_t n) {
      const int64_t off = g0 * rows, m_rows = (n - 1) * rows + qr;
      E* pbuf = Tile::kPacksV ? w.Pb.data() + off * bk : nullptr;
      if constexpr (Tile::kFusedSoftmax) {
        if (plain) {  // the softmax step on the products' registers, O's rescale in P V's
          // a few rows at a time through both products, whole register tiles of each: their
          // P and O rows stay in L1 from one to the other (all the rows' P and O at once, with
          // the packed K and V, outgrew it)
          const int64_t step = fused_step(bk, D);
          for (int64_t c = 0; c < m_rows; c += step) {
            const int64_t n = std::min(step, m_rows - c), o = off + c;
            Tile::scores_softmax(Qs + o * ldq, ldq, n, kbuf, D, bk, P.qk_scale, w.m.data() + o,
                                 w.l.data() + o, w.alpha.data() + o, pbuf + c * bk);
            Tile::accumulate(nullptr, n, bk, kr, vbase + k0 * P.sv[2], P.sv[2], vbuf,
                             pbuf + c * bk, D, w.alpha.data() + o, w.O.data() + o * D);
          }
          return;
        }
      }
      Tile::scores(Qs + off * ldq, ldq, m_rows, kbuf, D, bk, w.S.data() + off * bk);
      if (plain) {  // every score kept as it is: the scale is applied in the softmax pass
        softmax_step<Tile>(w.S.data() + off * bk, m_rows, bk, D, P.qk_scale, w.m.data() + off,
                           w.l.data() + off, w.O.data() + off * D, pbuf);
      } else {
        for (int64_t g = g0; g < g0 + n; ++g)
          finish_scores(P, b, hk * G + g, q0, qr, k0, w.S.data() + g * rows * bk);
        softmax_step<Tile>(w.S.data() + off * bk, m_rows, bk, D, A(1), w.m.data() + off,
                           w.l.data() + off, w.O.data() + off * D, pbuf);
      }
      Tile::accumulate(w.S.data() + off * bk, m_rows, bk, kr, vbase + k0 * P.sv[2], P.sv[2],
                       vbuf, pbuf, D, nullptr, w.O.data() + off * D);
    };
    if (all) {
      run(0, G);
    } else {
      for (int64_t g = 0; g < G; ++g)
        if (w.stores[g]) run(g, 1);
    }
    if (nr) prefetch_rows(vbase + n0 * P.sv[2], P.sv[2], nr, D);
  }
}

// Ask for the query rows and first stored key / value block of the item a thread likely takes
// next (items go out in order, a chunk at a time per thread): the projections that wrote q, k and
// v left them in memory, not in this core's cache, and an item reads them before computing.
template <typename E, typename A>
void prefetch_item(const Problem<E, A>& P, const BlockLists& kv, int64_t item) {
  const int64_t qb = item % P.nq, bhk = item / P.nq, b = bhk / P.Hkv, hk = bhk % P.Hkv;
  const int64_t q0 = qb * P.bq, qr = std::min(P.bq, P.Lq - q0);
  for (int64_t g = 0; g < P.G; ++g)
    prefetch_rows(P.q + b * P.sq[0] + (hk * P.G + g) * P.sq[1] + q0 * P.sq[2], P.sq[2], qr, P.D);
  if (kv.count(item) == 0) return;
  const int64_t k0 = static_cast<int64_t>(kv.idx[kv.ptr[item]]) * P.bk;
  const int64_t kr = std::min(P.bk, P.Lk - k0);
  prefetch_rows(P.k + b * P.sk[0] + hk * P.sk[1] + k0 * P.sk[2], P.sk[2], kr, P.D);
  prefetch_rows(P.v + b * P.sv[0] + hk * P.sv[1] + k0 * P.sv[2], P.sv[2], kr, P.D);
}

// out: row (b, h, i) at b * so[0] + h * so[1] + i * so[2] (unit stride along D).
template <typename Tile>
void forward(const Problem<typename Tile::E, typename Tile::A>& P, const BlockLists& kv,
             typename Tile::E* out, const int64_t (&so)[3], typename Tile::A* stats) {
  using A = typename Tile::A;
  const int64_t G = P.G, bq = P.bq, bk = P.bk, D = P.D;
  const int64_t rows = std::min(bq, P.Lq);  // rows of a query block, at most
  const int64_t items = P.B * P.Hkv * P.nq;
  const int64_t threads = at::get_num_threads();
  int64_t longest = 0;
  for (int64_t i = 0; i < items; ++i) longest = std::max<int64_t>(longest, kv.count(i));
  int64_t splits = 1;
  if (threads > 1 && items < kItemsPerThread * threads)
    splits = std::max<int64_t>(1, std::min(longest, (kItemsPerThread * threads + items - 1) / items));
  const int64_t units = items * splits;
  const int64_t part_ld = D + 2;  // a part's row: O[D], m, l
  std::vector<A> parts(splits > 1 ? units * G * rows * part_ld : 0);
  // with enough of them, a thread takes every query block of a key/value head in a row: the
  // head's K and V blocks come from its own cache after the first query block
  const int64_t chunk = splits == 1 && P.B * P.Hkv >= kItemsPerThread * threads ? P.nq : 1;
  // and packs each K / V block once for all of them, where a head's blocks fit in L2
  const int64_t slots =
      chunk > 1 && P.nq > 1 && 2 * P.nk * D * bk * sizeof(typename Tile::E) <= (256 << 10)
          ? P.nk : 1;
#pragma omp parallel num_threads(threads)
  {
    ForwardScratch<Tile> w(G, rows, D, bk, slots);
#pragma omp for schedule(dynamic, chunk)
    for (int64_t u = 0; u < units; ++u) {
      const int64_t item = u / splits, part = u % splits;
      const int64_t qb = item % P.nq, bhk = item / P.nq, b = bhk / P.Hkv, hk = bhk % P.Hkv;
      const int64_t q0 = qb * bq, qr = std::min(bq, P.Lq - q0);
      const int64_t cnt = kv.count(item);
      if (splits == 1) {  // the item this thread likely takes next
        const int64_t next = u % chunk != chunk - 1 ? u + 1 : u + 1 + (threads - 1) * chunk;
        if (next < units) prefetch_item(P, kv, next);
      }
      if (splits == 1)  // the item's output rows, written after it computes
        for (int64_t g = 0; g < G; ++g)
          prefetch_rows<typename Tile::E, true>(
              out + b * so[0] + (hk * G + g) * so[1] + q0 * so[2], so[2], qr, D);
      forward_item<Tile>(P, b, hk, qb, kv.idx.data() + kv.ptr[item], cnt * part / splits,
                         cnt * (part + 1) / splits, rows, w);
      for (int64_t g = 0; g < G; ++g) {
        if (splits == 1 && stats == nullptr) {
          finish_rows<Tile>(w.O.data() + g * rows * D, w.l.data() + g * rows, qr, D,
                            out + b * so[0] + (hk * G + g) * so[1] + q0 * so[2], so[2]);
          continue;
        }
        const int64_t bh = b * P.H + hk * G + g;
        for (int64_t r = 0; r < qr; ++r) {
          const A* o = w.O.data() + (g * rows + r) * D;
          const A mr = w.m[g * rows + r], lr = w.l[g * rows + r];
          if (splits == 1) {
            A* st = stats ? stats + bh * 2 * P.Lq + q0 + r : nullptr;
            finish_row<Tile>(o, mr, lr, D, out + b * so[0] + (hk * G + g) * so[1] + (q0 + r) * so[2],
                             st, st ? st + P.Lq : nullptr);
          } else {
            A* dst = parts.data() + ((u * G + g) * rows + r) * part_ld;
            std::copy(o, o + D, dst);
            dst[D] = mr;
            dst[D + 1] = lr;
          }
        }
      }
    }
    if (splits > 1) {
      // merge the parts of each row: rescale each to the largest max and add
#pragma omp for schedule(static)
      for (int64_t ig = 0; ig < items * G; ++ig) {
        const int64_t item = ig / G, g = ig % G;
        const int64_t qb = item % P.nq, bhk = item / P.nq, b = bhk / P.Hkv, hk = bhk % P.Hkv;
        const int64_t q0 = qb * bq, qr = std::min(bq, P.Lq - q0);
        const int64_t bh = b * P.H + hk * G + g;
        A* o = w.O.data();
        for (int64_t r = 0; r < qr; ++r) {
          auto part_row = [&](int64_t s) {
            return parts.data() + (((item * splits + s) * G + g) * rows + r) * part_ld;
          };
          A mx = -std::numeric_limits<A>::infinity();
          for (int64_t s = 0; s < splits; ++s) mx = std::max(mx, part_row(s)[D]);
          const A shift = std::isinf(mx) ? A(0) : mx;
          A lsum = 0;
          std::fill(o, o + D, A(0));
          for (int64_t s = 0; s < splits; ++s) {
            const A* p = part_row(s);
            if (p[D + 1] == A(0)) continue;
            const A wgt = std::exp2(p[D] - shift);
            lsum += p[D + 1] * wgt;
            for (int64_t d = 0; d < D; ++d) o[d] += p[d] * wgt;
          }
          A* st = stats ? stats + bh * 2 * P.Lq + q0 + r : nullptr;
          finish_row<Tile>(o, mx, lsum, D, out + b * so[0] + (hk * G + g) * so[1] + (q0 + r) * so[2],
                           st, st ? st + P.Lq : nullptr);
        }
      }
    }
  }
}

// --- backward (fp32 / fp64) ----------------------------------------------------------------------
// P of one tile from the stored statistics: 2^((s - max) - log2(sum)), 0 on empty rows.
template <typename T>
void probabilities(const T* st, int64_t Lq, int64_t q0, int64_t qr, int64_t bk, T* S) {
  for (int64_t r = 0; r < qr; ++r) {
    const T mx = st[q0 + r], logl = st[Lq + q0 + r];
    T* s = S + r * bk;
    if (std::isinf(mx)) {
      std::fill(s, s + bk, T(0));
      continue;
    }
    for (int64_t j = 0; j < bk; ++j) s[j] -= mx;
    exp2_row(s, bk, logl);
  }
}

template <typename T>
struct Grads {
  const T* dout;  // [B, H, Lq, D] contiguous
  const T* delta;  // [B, H, Lq]
  const T* stats;  // [B, H, 2, Lq]
  T *dq, *dk, *dv;  // contiguous; dk, dv [B, Hkv, Lk, D]
  float* dscores;  // [B, H, Lq, Lk] or null
};

// dK, dV of one key block of a key/value head: the sum over its group's query heads.
template <typename T>
void backward_dkdv(const Problem<T, T>& P, const Grads<T>& G, const BlockLists& qs) {
  const int64_t bq = P.bq, bk = P.bk, D = P.D;
  const int64_t items = P.B * P.Hkv * P.nk;
#pragma omp parallel num_threads(at::get_num_threads())
  {
    std::vector<T> S(bq * bk), dP(bq * bk), Kt(D * bk), Vt(D * bk), dK(bk * D), dV(bk * D);
#pragma omp for schedule(dynamic, 1)
    for (int64_t item = 0; item < items; ++item) {
      const int64_t kb = item % P.nk, bhk = item / P.nk, b = bhk / P.Hkv, hk = bhk % P.Hkv;
      const int64_t k0 = kb * bk, kr = std::min(bk, P.Lk - k0);
      pack_transposed(P.k + b * P.sk[0] + hk * P.sk[1] + k0 * P.sk[2], P.sk[2], kr, D, bk,
                      Kt.data());
      pack_transposed(P.v + b * P.sv[0] + hk * P.sv[1] + k0 * P.sv[2], P.sv[2], kr, D, bk,
                      Vt.data());
      std::fill(dK.begin(), dK.end(), T(0));
      std::fill(dV.begin(), dV.end(), T(0));
      const int32_t* idx = qs.idx.data() + qs.ptr[item];
      for (int32_t e = 0, cnt = qs.count(item); e < cnt; ++e) {
        const int64_t qb = idx[e], q0 = qb * bq, qr = std::min(bq, P.Lq - q0);
        for (int64_t g = 0; g < P.G; ++g) {
          const int64_t h = hk * P.G + g, bh = b * P.H + h;
          if (!P.stored(b, h, qb, kb)) continue;
          const T* q = P.q + b * P.sq[0] + h * P.sq[1] + q0 * P.sq[2];
          const T* dout = G.dout + (bh * P.Lq + q0) * D;
          gemm<T>(bk, qr, q, P.sq[2], 1, Kt.data(), bk, D, S.data(), bk, false);
          finish_scores(P, b, h, q0, qr, k0, S.data());
          probabilities(G.stats + bh * 2 * P.Lq, P.Lq, q0, qr, bk, S.data());
          // dV += P^T dO
          gemm<T>(D, kr, S.data(), 1, bk, dout, D, qr, dV.data(), D, true);
          // dP = dO V^T; dS = P * (dP - delta)
          gemm<T>(bk, qr, dout, D, 1, Vt.data(), bk, D, dP.data(), bk, false);
          const T* delta = G.delta + bh * P.Lq + q0;
          for (int64_t r = 0; r < qr; ++r)
            for (int64_t j = 0; j < bk; ++j)
              dP[r * bk + j] = S[r * bk + j] * (dP[r * bk + j] - delta[r]);
          // dK += dS^T Q
          gemm<T>(D, kr, dP.data(), 1, bk, q, P.sq[2], qr, dK.data(), D, true);
        }
      }
      const T scale = P.qk_scale / static_cast<T>(kLog2e);
      T* dk = G.dk + (bhk * P.Lk + k0) * D;
      T* dv = G.dv + (bhk * P.Lk + k0) * D;
      for (int64_t x = 0; x < kr * D; ++x) {
        dk[x] = dK[x] * scale;
        dv[x] = dV[x];
      }
    }
  }
}

template <typename T>
void backward_dq(const Problem<T, T>& P, const Grads<T>& G, const BlockLists& kv) {
  const int64_t bq = P.bq, bk = P.bk, D = P.D;
  const int64_t items = P.B * P.H * P.nq;
#pragma omp parallel num_threads(at::get_num_threads())
  {
    std::vector<T> S(bq * bk), dP(bq * bk), Kt(D * bk), Vt(D * bk), dQ(bq * D);
#pragma omp for schedule(dynamic, 1)
    for (int64_t item = 0; item < items; ++item) {
      const int64_t qb = item % P.nq, bh = item / P.nq, b = bh / P.H, h = bh % P.H;
      const int64_t hk = h / P.G;
      const int64_t q0 = qb * bq, qr = std::min(bq, P.Lq - q0);
      const T* q = P.q + b * P.sq[0] + h * P.sq[1] + q0 * P.sq[2];
      const T* dout = G.dout + (bh * P.Lq + q0) * D;
      const T* delta = G.delta + bh * P.Lq + q0;
      const T* st = G.stats + bh * 2 * P.Lq;
      const T* kbase = P.k + b * P.sk[0] + hk * P.sk[1];
      const T* vbase = P.v + b * P.sv[0] + hk * P.sv[1];
      std::fill(dQ.begin(), dQ.end(), T(0));
      const int32_t* idx = kv.idx.data() + kv.ptr[item];
      for (int32_t e = 0, cnt = kv.count(item); e < cnt; ++e) {
        const int64_t k0 = static_cast<int64_t>(idx[e]) * bk, kr = std::min(bk, P.Lk - k0);
        pack_transposed(kbase + k0 * P.sk[2], P.sk[2], kr, D, bk, Kt.data());
        pack_transposed(vbase + k0 * P.sv[2], P.sv[2], kr, D, bk, Vt.data());
        gemm<T>(bk, qr, q, P.sq[2], 1, Kt.data(), bk, D, S.data(), bk, false);
        finish_scores(P, b, h, q0, qr, k0, S.data());
        probabilities(st, P.Lq, q0, qr, bk, S.data());
        gemm<T>(bk, qr, dout, D, 1, Vt.data(), bk, D, dP.data(), bk, false);
        for (int64_t r = 0; r < qr; ++r)
          for (int64_t j = 0; j < bk; ++j)
            dP[r * bk + j] = S[r * bk + j] * (dP[r * bk + j] - delta[r]);
        if (G.dscores) {
          float* ds = G.dscores + (bh * P.Lq + q0) * P.Lk + k0;
          for (int64_t r = 0; r < qr; ++r)
            for (int64_t j = 0; j < kr; ++j) ds[r * P.Lk + j] = static_cast<float>(dP[r * bk + j]);
        }
        // dQ += dS K
        gemm<T>(D, qr, dP.data(), bk, 1, kbase + k0 * P.sk[2], P.sk[2], kr, dQ.data(), D, true);
      }
      const T scale = P.qk_scale / static_cast<T>(kLog2e);
      T* dq = G.dq + (bh * P.Lq + q0) * D;
      for (int64_t x = 0; x < qr * D; ++x) dq[x] = dQ[x] * scale;
    }
  }
}

// --- torch glue ----------------------------------------------------------------------------------
// q/k/v in `ct` with a unit stride along the head dim (a view when possible).
at::Tensor rows(const at::Tensor& t, at::ScalarType ct) {
  at::Tensor x = t.scalar_type() == ct ? t : t.to(ct);
  return x.stride(3) == 1 ? x : x.contiguous();
}

at::Tensor check_layout(const at::Tensor& layout, const at::Tensor& q, int64_t nq, int64_t nk) {
  TORCH_CHECK(layout.device().is_cpu() && layout.scalar_type() == at::kBool && layout.dim() == 4 &&
                  (layout.size(0) == 1 || layout.size(0) == q.size(0)) &&
                  layout.size(1) == q.size(1) && layout.size(2) == nq && layout.size(3) == nk,
              "sparsekernels: layout must be a bool CPU tensor [1 or B, H, nq, nk] = [1 or ",
              q.size(0), ", ", q.size(1), ", ", nq, ", ", nk, "], got ", layout.scalar_type(), " ",
              layout.sizes());
  return layout.contiguous();
}

// The shape of a call; `layout` (checked, contiguous) must outlive the Shape.
Shape make_shape(const at::Tensor& q, const at::Tensor& k, const at::Tensor& layout, bool causal,
                 int64_t window, int64_t bq, int64_t bk) {
  Shape S;
  S.B = q.size(0);
  S.H = q.size(1);
  S.Hkv = k.size(1);
  S.G = S.H / S.Hkv;
  S.Lq = q.size(2);
  S.Lk = k.size(2);
  S.D = q.size(3);
  S.bq = bq;
  S.bk = bk;
  S.nq = (S.Lq + bq - 1) / bq;
  S.nk = (S.Lk + bk - 1) / bk;
  S.off = S.Lk - S.Lq;
  S.causal = causal;
  S.window = window;
  S.layout = layout.data_ptr<bool>();
  S.Bl = layout.size(0);
  return S;
}

template <typename E, typename A>
Problem<E, A> make_problem(const Shape& shape, const at::Tensor& q, const at::Tensor& k,
                           const at::Tensor& v, const at::Tensor& mask, double scale) {
  Problem<E, A> P;
  static_cast<Shape&>(P) = shape;
  P.q = reinterpret_cast<const E*>(q.data_ptr());
  P.k = reinterpret_cast<const E*>(k.data_ptr());
  P.v = reinterpret_cast<const E*>(v.data_ptr());
  for (int i = 0; i < 3; ++i) {
    P.sq[i] = q.stride(i);
    P.sk[i] = k.stride(i);
    P.sv[i] = v.stride(i);
  }
  P.qk_scale = static_cast<A>(scale * kLog2e);
  if (mask.defined()) {
    if (mask.scalar_type() == at::kBool)
      P.mask_bool = reinterpret_cast<const uint8_t*>(mask.data_ptr<bool>());
    else
      P.mask_add = mask.data_ptr<A>();
    for (int i = 0; i < 4; ++i) P.sm[i] = mask.stride(i);
  }
  return P;
}

// bool masks stay bool; additive ones in the accumulation type `at`.
at::Tensor prepare_mask(const std::optional<at::Tensor>& mask, at::ScalarType at_,
                        const at::Tensor& q, const at::Tensor& k) {
  if (!mask.has_value()) return at::Tensor();
  at::Tensor m = *mask;
  TORCH_CHECK(m.dim() <= 4, "sparsekernels: attn_mask must have at most 4 dims");
  if (m.scalar_type() != at::kBool && m.scalar_type() != at_) m = m.to(at_);
  return m.expand({q.size(0), q.size(1), q.size(2), k.size(2)});
}

void check_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, int64_t window,
                  int64_t bq, int64_t bk) {
  TORCH_CHECK(q.device().is_cpu() && k.device().is_cpu() && v.device().is_cpu(),
              "sparsekernels: block_sparse_attention_cpu runs CPU tensors");
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4 && k.sizes() == v.sizes() &&
                  q.size(0) == k.size(0) && k.size(1) > 0 && q.size(1) % k.size(1) == 0 &&
                  q.size(3) == k.size(3),
              "sparsekernels: q [B, H, Lq, D], k and v [B, Hkv, Lk, D] with Hkv dividing H "
              "expected, got ", q.sizes(), " ", k.sizes(), " ", v.sizes());
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && q.scalar_type() == v.scalar_type(),
              "sparsekernels: q, k, v dtypes differ");
  TORCH_CHECK(window >= 0, "sparsekernels: window must be >= 0 (0: none), got ", window);
  TORCH_CHECK(bq == 16 || bq == 32 || bq == 64 || bq == 128,
              "sparsekernels: unsupported query block ", bq);
  TORCH_CHECK(bk == 16 || bk == 32 || bk == 64 || bk == 128,
              "sparsekernels: unsupported key block ", bk);
}

// allow_bf16_dot: bf16 inputs run on AVX512-BF16 dot products when this CPU has them; false
// (or a CPU without them) converts them to fp32 first. bf16_products: fp32 inputs run both
// products in bf16 (fp32 accumulation, softmax and output) when this CPU has the dot
// products; elsewhere, and for other dtypes, it changes nothing. int8_qk: fp32 and bf16
// inputs run Q K^T in int8 (Int8QkTile) and P V in bf16 where the CPU has AVX512-VNNI and
// -BF16 and D is a multiple of 16 up to 256; elsewhere it is bf16_products.
std::tuple<at::Tensor, at::Tensor> block_sparse_attention_cpu(
    const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
    const at::Tensor& layout_in, const std::optional<at::Tensor>& mask, bool causal,
    int64_t window, double scale, int64_t block_q, int64_t block_k, bool allow_bf16_dot,
    bool need_stats, bool bf16_products, bool int8_qk) {
  check_inputs(q_in, k_in, v_in, window, block_q, block_k);
  const bool bf16_dot =
      allow_bf16_dot && q_in.scalar_type() == at::kBFloat16 && cpu_has_bf16_dot();
  // fp32 inputs with bf16 products: only where the CPU multiplies bf16 (else plain fp32,
  // which is faster than rounding for the fp32 products)
  const bool f32_bf16 = (bf16_products || int8_qk) && q_in.scalar_type() == at::kFloat &&
                        cpu_has_bf16_dot();
  const int64_t D = q_in.size(3);
  const bool int8 = int8_qk && (bf16_dot || f32_bf16) && D % 16 == 0 && D <= 256 &&
                    cpu_has_int8_dot();
  const auto ct = bf16_dot ? at::kBFloat16 : compute_type(q_in.scalar_type());
  const auto acc = ct == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor q = rows(q_in, ct), k = rows(k_in, ct), v = rows(v_in, ct);
  const at::Tensor m = prepare_mask(mask, acc, q, k);
  // out [B, H, Lq, D] as a view of [B, Lq, H, D] memory (as SDPA's CPU flash kernel returns
  // it): a model's attention output goes back to [B, Lq, H * D] with no copy
  at::Tensor out = at::empty({q.size(0), q.size(2), q.size(1), q.size(3)}, q.options().dtype(ct))
                       .transpose(1, 2);
  const int64_t so[3] = {out.stride(0), out.stride(1), out.stride(2)};
  // the softmax statistics only a backward reads ([B, H, 2, Lq]; empty without one)
  at::Tensor stats = need_stats ? at::empty({q.size(0), q.size(1), 2, q.size(2)},
                                            q.options().dtype(acc))
                                : at::empty({0}, q.options().dtype(acc));
  const int64_t nq = (q.size(2) + block_q - 1) / block_q, nk = (k.size(2) + block_k - 1) / block_k;
  const at::Tensor lay = check_layout(layout_in, q, nq, nk);
  const Shape shape = make_shape(q, k, lay, causal, window, block_q, block_k);
  if (q.numel() > 0) {
    const BlockLists kv = block_lists(shape, false, true);
    auto run = [&](auto tile) {
      using Tile = decltype(tile);
      using E = typename Tile::E;
      using A = typename Tile::A;
      const auto P = make_problem<E, A>(shape, q, k, v, m, scale);
      forward<Tile>(P, kv, reinterpret_cast<E*>(out.data_ptr()), so,
                    need_stats ? stats.data_ptr<A>() : nullptr);
    };
#ifdef SPARSEKERNELS_BF16_DOT
    if (bf16_dot && int8) run(Int8QkTile<Bf16Tile>{});
    else if (bf16_dot) run(Bf16Tile{});
    else if (f32_bf16 && int8) run(Int8QkTile<F32Bf16Tile>{});
    else if (f32_bf16) run(F32Bf16Tile{});
    else
#endif
    if (ct == at::kDouble) run(FloatTile<double>{});
    else run(FloatTile<float>{});
  }
  if (out.scalar_type() != q_in.scalar_type()) out = out.to(q_in.scalar_type());
  return {out, stats};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> block_sparse_attention_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& q_in, const at::Tensor& k_in,
    const at::Tensor& v_in, const at::Tensor& out, const at::Tensor& stats_in,
    const at::Tensor& layout_in, const std::optional<at::Tensor>& mask, bool causal,
    int64_t window, double scale, int64_t block_q, int64_t block_k, bool need_dscores) {
  check_inputs(q_in, k_in, v_in, window, block_q, block_k);
  const auto ct = compute_type(q_in.scalar_type());
  const at::Tensor q = rows(q_in, ct), k = rows(k_in, ct), v = rows(v_in, ct);
  const at::Tensor m = prepare_mask(mask, ct, q, k);
  const at::Tensor dout = grad_out.to(ct).contiguous();
  const at::Tensor delta = (dout * out.to(ct)).sum(-1).contiguous();
  const at::Tensor stats = stats_in.to(ct).contiguous();
  at::Tensor dq = at::empty(q.sizes(), q.options().dtype(ct));
  at::Tensor dk = at::empty(k.sizes(), k.options().dtype(ct));
  at::Tensor dv = at::empty(v.sizes(), v.options().dtype(ct));
  at::Tensor ds = need_dscores
                      ? at::zeros({q.size(0), q.size(1), q.size(2), k.size(2)},
                                  q.options().dtype(at::kFloat))
                      : at::empty({0}, q.options().dtype(at::kFloat));
  const int64_t nq = (q.size(2) + block_q - 1) / block_q, nk = (k.size(2) + block_k - 1) / block_k;
  const at::Tensor lay = check_layout(layout_in, q, nq, nk);
  const Shape shape = make_shape(q, k, lay, causal, window, block_q, block_k);
  auto run = [&](auto tag) {
    using T = decltype(tag);
    auto P = make_problem<T, T>(shape, q, k, v, m, scale);
    Grads<T> G{dout.data_ptr<T>(), delta.data_ptr<T>(), stats.data_ptr<T>(), dq.data_ptr<T>(),
               dk.data_ptr<T>(), dv.data_ptr<T>(),
               need_dscores ? ds.data_ptr<float>() : nullptr};
    backward_dkdv<T>(P, G, block_lists(shape, true, true));
    backward_dq<T>(P, G, block_lists(shape, false, false));
  };
  if (q.numel() > 0 && k.numel() > 0) {
    if (ct == at::kDouble) run(double{});
    else run(float{});
  } else {
    dq.zero_();
    dk.zero_();
    dv.zero_();
  }
  const auto t = q_in.scalar_type();
  if (ct != t) {
    dq = dq.to(t);
    dk = dk.to(t);
    dv = dv.to(t);
  }
  return {dq, dk, dv, ds};
}

bool cpu_has_avx512_bf16() { return cpu_has_bf16_dot(); }
bool cpu_has_avx512_vnni_bf16() { return cpu_has_int8_dot(); }

}  // namespace

at::Tensor attention_inference(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                               const at::Tensor& layout, const std::optional<at::Tensor>& mask,
                               bool causal, int64_t window, double scale, int64_t block_q,
                               int64_t block_k, bool bf16_products, bool int8_qk) {
  return std::get<0>(block_sparse_attention_cpu(q, k, v, layout, mask, causal, window, scale,
                                                block_q, block_k, true, false, bf16_products,
                                                int8_qk));
}

TORCH_LIBRARY_FRAGMENT(sparsekernels_C, m) {
  m.def(
      "block_sparse_attention_cpu(Tensor q, Tensor k, Tensor v, Tensor layout, Tensor? mask, "
      "bool causal, int window, float scale, int block_q, int block_k, bool allow_bf16_dot, "
      "bool need_stats=True, bool bf16_products=False, bool int8_qk=False) -> (Tensor, Tensor)",
      &block_sparse_attention_cpu);
  m.def(
      "block_sparse_attention_backward_cpu(Tensor grad_out, Tensor q, Tensor k, Tensor v, "
      "Tensor out, Tensor stats, Tensor layout, Tensor? mask, bool causal, int window, "
      "float scale, int block_q, int block_k, bool need_dscores) -> "
      "(Tensor, Tensor, Tensor, Tensor)",
      &block_sparse_attention_backward_cpu);
  // whether the CPU kernels can use AVX512-BF16 dot products here (tests, benchmarks)
  m.def("cpu_has_avx512_bf16() -> bool", &cpu_has_avx512_bf16);
  // and int8 dot products (VNNI) beside them: fp32_precision "int8" runs Q K^T in int8
  m.def("cpu_has_avx512_vnni_bf16() -> bool", &cpu_has_avx512_vnni_bf16);
}

}  // namespace cpu
}  // namespace sparsekernels
