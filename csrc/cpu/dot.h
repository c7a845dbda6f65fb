// Few rows times a block-sparse W.T, on the blocks as stored ([bm, bk] row-major): the
// path for fewer rows than a register tile when the caller has no packed W.T blocks.
//
// out[t, i*bm + n] = sum over the stored blocks e of block row i of W_e[n, :] . x_t[cols(e)]:
// dot products along k in vector lanes, so each weight is read once for all rows (no
// packing: at one row packing would cost more than the product). A run of L outputs is
// reduced lane-wise at once (a transpose-and-add tree), not one horizontal sum per output.
#pragma once

#include <ATen/Parallel.h>
#include <omp.h>

#include <algorithm>
#include <cstdint>

#include "dsd.h"
#include "microkernel.h"

namespace sparsekernels {
namespace cpu {

template <typename T>
struct IVec;
template <>
struct IVec<float> {
  typedef int32_t type __attribute__((vector_size(64)));
};
template <>
struct IVec<double> {
  typedef int64_t type __attribute__((vector_size(64)));
};

// Lanes [0, L/2) from a, [L/2, L) from b: each output lane adds the two halves of a run of
// 2H input lanes, so a vector holding runs of 2H partial sums per source ends holding runs
// of H.
template <typename T, int H>
inline typename Vec<T>::type fold(typename Vec<T>::type a, typename Vec<T>::type b) {
  constexpr int L = Vec<T>::L;
  typename IVec<T>::type lo, hi;
  for (int j = 0; j < L; ++j) {
    const int src = (j / (L / 2)) * L, jj = j % (L / 2);
    lo[j] = src + (jj / H) * 2 * H + jj % H;
    hi[j] = lo[j] + H;
  }
  return __builtin_shuffle(a, b, lo) + __builtin_shuffle(a, b, hi);
}

template <typename T, int H>
inline void fold_level(typename Vec<T>::type* v) {
  for (int i = 0; i < H; ++i) v[i] = fold<T, H>(v[2 * i], v[2 * i + 1]);
  if constexpr (H > 1) fold_level<T, H / 2>(v);
}

// Lane i of the result is the sum of the lanes of v[i], i < L (v is overwritten).
template <typename T>
inline typename Vec<T>::type transpose_sum(typename Vec<T>::type* v) {
  fold_level<T, Vec<T>::L / 2>(v);
  return v[0];
}

// RT rows, block rows [i0, i1), serially. NR output rows are computed at once so that one
// row still has independent FMA chains.
template <typename T, int RT>
inline void dot_group(const T* A, int64_t lda, const T* values, int64_t bm, int64_t bk,
                      const int32_t* crow, const int32_t* col, int64_t i0, int64_t i1,
                      const T* bias, T* out, int64_t ldo) {
  constexpr int L = Vec<T>::L;
  constexpr int NR = RT == 1 ? 4 : RT == 2 ? 2 : 1;
  using V = typename Vec<T>::type;
  for (int64_t i = i0; i < i1; ++i) {
    const int32_t e0 = crow[i], e1 = crow[i + 1];
    for (int64_t n0 = 0; n0 < bm; n0 += L) {
      V sums[RT][L];
      for (int64_t n = n0; n < n0 + L; n += NR) {
        V acc[RT][NR];
        for (int t = 0; t < RT; ++t)
          for (int q = 0; q < NR; ++q) acc[t][q] = V{};
        for (int32_t e = e0; e < e1; ++e) {
          const T* w = values + (static_cast<int64_t>(e) * bm + n) * bk;
          const T* xe = A + static_cast<int64_t>(col[e]) * bk;
          for (int64_t kk = 0; kk < bk; kk += L) {
            V xv[RT];
#pragma GCC unroll 8
            for (int t = 0; t < RT; ++t) xv[t] = loadu<T>(xe + t * lda + kk);
#pragma GCC unroll 4
            for (int q = 0; q < NR; ++q) {
              const V wv = loadu<T>(w + q * bk + kk);
#pragma GCC unroll 8
              for (int t = 0; t < RT; ++t) acc[t][q] += wv * xv[t];
            }
          }
        }
        for (int t = 0; t < RT; ++t)
          for (int q = 0; q < NR; ++q) sums[t][n - n0 + q] = acc[t][q];
      }
      const V b = bias ? loadu<T>(bias + i * bm + n0) : V{};
      for (int t = 0; t < RT; ++t)
        storeu<T>(out + t * ldo + i * bm + n0, transpose_sum<T>(sums[t]) + b);
    }
  }
}

// All rows (in groups of at most 8), block rows [i0, i1), serially.
template <typename T>
inline void dot_range(const T* A, int64_t rows, int64_t lda, const T* values, int64_t bm,
                      int64_t bk, const int32_t* crow, const int32_t* col, int64_t i0, int64_t i1,
                      const T* bias, T* out, int64_t ldo) {
  for (int64_t t = 0; t < rows; t += 8)
    dispatch_rows<8>(static_cast<int>(std::min<int64_t>(8, rows - t)), [&](auto m) {
      dot_group<T, decltype(m)::value>(A + t * lda, lda, values, bm, bk, crow, col, i0, i1, bias,
                                       out + t * ldo, ldo);
    });
}

// out[rows, nbr*bm] = A @ W.T (+ bias), each thread an equal share of the stored blocks.
template <typename T>
void dot_rows(const T* A, int64_t rows, int64_t lda, const T* values, int64_t bm, int64_t bk,
              const int32_t* crow, const int32_t* col, int64_t nbr, const T* bias, T* out,
              int64_t ldo) {
  const int64_t macs = rows * (crow[nbr] - crow[0]) * bm * bk;
#pragma omp parallel num_threads(threads_for(macs))
  {
    int64_t i0, i1;
    split_stored(crow, nbr, omp_get_num_threads(), omp_get_thread_num(), &i0, &i1);
    dot_range<T>(A, rows, lda, values, bm, bk, crow, col, i0, i1, bias, out, ldo);
  }
}

}  // namespace cpu
}  // namespace sparsekernels
