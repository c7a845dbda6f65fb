// "Dense x sparse -> dense" on the CPU: the driver under bsr_linear's forward and input
// gradient, and under the fused block-sparse FFN.
//
// dsd_block computes one output block column for a run of rows, serially; dsd spreads
// (row chunk, output block) items over the threads. The fused FFN calls dsd_block from its
// own per-chunk loop, so both share one inner loop and one summation order.
#pragma once

#include <ATen/Parallel.h>
#include <omp.h>

#include <algorithm>
#include <cstdint>

#include "microkernel.h"

namespace sparsekernels {
namespace cpu {

// The sparse operand of out = A @ S: output block o (BO wide) sums, over entries e in
// [ptr[o], ptr[o+1]), A's columns [in_idx[e]*BI, +BI) times the [BI, BO] row-major block
// at blocks + blk(e)*BI*BO, where blk(e) = blk_idx ? blk_idx[e] : e.
struct SparseOperand {
  const int32_t* ptr;
  const int32_t* in_idx;
  const int32_t* blk_idx;
  int64_t n_out;
  int64_t bi;
};

// out[0:rows, o*BO : +BO] = A[0:rows, :] @ S[:, o*BO : +BO] (+ bias), serially.
template <typename T, int BO>
inline void dsd_block(const T* A, int64_t rows, int64_t lda, const T* blocks,
                      const SparseOperand& s, int64_t o, const T* bias, T* out, int64_t ldo) {
  constexpr int L = Vec<T>::L;
  constexpr int NV = BO / L;
  constexpr int MR = tile_rows<T, BO>();
  using V = typename Vec<T>::type;
  const int64_t bi = s.bi;
  const int64_t block_elems = bi * BO;
  // Partial sums are kept in registers over `group` stored blocks (about 128 reduction
  // terms, as a BLAS K panel) and then added to the output tile in L1: two-level
  // summation, as accurate as BLAS, for a few memory operations per 128 FMAs.
  const int32_t group = static_cast<int32_t>(std::max<int64_t>(1, 128 / bi));
  const int32_t e0 = s.ptr[o], e1 = s.ptr[o + 1];
  V init[NV];
  for (int j = 0; j < NV; ++j) init[j] = bias ? loadu<T>(bias + o * BO + j * L) : V{};
  for (int64_t t = 0; t < rows; t += MR) {
    const int mr = static_cast<int>(std::min<int64_t>(MR, rows - t));
    T* c = out + t * ldo + o * BO;
    if (e0 == e1) {  // an empty block row: the bias (or zeros)
      for (int r = 0; r < mr; ++r)
        for (int j = 0; j < NV; ++j) storeu<T>(c + r * ldo + j * L, init[j]);
      continue;
    }
    for (int32_t g0 = e0; g0 < e1; g0 += group) {
      const int32_t g1 = std::min(e1, g0 + group);
      V acc[MR][NV];
      for (int r = 0; r < MR; ++r)
        for (int j = 0; j < NV; ++j) acc[r][j] = g0 == e0 ? init[j] : V{};
      for (int32_t e = g0; e < g1; ++e) {
        const T* a = A + t * lda + static_cast<int64_t>(s.in_idx[e]) * bi;
        const T* b = blocks + static_cast<int64_t>(s.blk_idx ? s.blk_idx[e] : e) * block_elems;
        if (mr == MR) {
          micro_kernel<T, BO, MR>(a, lda, 1, b, BO, bi, acc);
        } else {
          micro_kernel_tail<T, BO, MR>(mr, a, lda, 1, b, BO, bi, acc);
        }
      }
      for (int r = 0; r < mr; ++r)
        for (int j = 0; j < NV; ++j) {
          T* cp = c + r * ldo + j * L;
          storeu<T>(cp, g0 == e0 ? acc[r][j] : loadu<T>(cp) + acc[r][j]);
        }
    }
  }
}

// out[rows, n_out*BO] = A @ S (+ bias), threaded over (row chunk, output block) items.
template <typename T, int BO>
void dsd(const T* A, int64_t rows, int64_t lda, const T* blocks, const SparseOperand& s,
         const T* bias, T* out, int64_t ldo) {
  constexpr int MR = tile_rows<T, BO>();
  // Token chunk: about 2 MFLOP of work per (chunk, output block) item, so scheduling stays
  // cheap at low density, between 96 and 512 rows (the A panel's stored columns in L2).
  const int64_t nnz = s.ptr[s.n_out] - s.ptr[0];
  const double per_row = 2.0 * BO * s.bi * std::max<double>(1.0, double(nnz) / std::max<int64_t>(1, s.n_out));
  const int64_t target = std::min<int64_t>(512, std::max<int64_t>(96, static_cast<int64_t>(2e6 / per_row)));
  const int64_t mc = std::max<int64_t>(MR, (target / MR) * MR);
  const int64_t n_chunks = (rows + mc - 1) / mc;
  const int64_t items = n_chunks * s.n_out;
#pragma omp parallel for schedule(dynamic, 1) num_threads(at::get_num_threads())
  for (int64_t item = 0; item < items; ++item) {
    const int64_t chunk = item / s.n_out;
    const int64_t o = item % s.n_out;
    const int64_t t0 = chunk * mc;
    dsd_block<T, BO>(A + t0 * lda, std::min(rows, t0 + mc) - t0, lda, blocks, s, o, bias,
                     out + t0 * ldo, ldo);
  }
}

}  // namespace cpu
}  // namespace sparsekernels
