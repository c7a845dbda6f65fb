// "Dense x sparse -> dense" on the CPU: the driver under bsr_linear's forward and input
// gradient, and under the fused block-sparse FFNs.
//
// dsd_block computes one output block column for a run of rows, serially; dsd spreads
// (row chunk, output block) items over the threads, or, for fewer rows than a register
// tile, gives each thread one contiguous run of output blocks holding an equal share of the
// stored blocks. The fused FFNs call dsd_block from their own loops, so all share one inner
// loop and one summation order: a row's result never depends on how rows were grouped.
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

// Thread `tid` of `nt` takes output blocks [*o0, *o1): contiguous runs holding about equal
// numbers of stored blocks (the bytes a memory-bound call streams), cut by binary search.
inline void split_stored(const int32_t* ptr, int64_t n_out, int64_t nt, int64_t tid, int64_t* o0,
                         int64_t* o1) {
  const int64_t total = ptr[n_out] - ptr[0];
  auto cut = [&](int64_t k) -> int64_t {
    if (k <= 0) return 0;
    if (k >= nt) return n_out;
    const int64_t target = ptr[0] + (total * k + nt / 2) / nt;
    return std::lower_bound(ptr, ptr + n_out + 1, target) - ptr;
  };
  *o0 = std::min(n_out, cut(tid));
  *o1 = std::max(*o0, std::min(n_out, cut(tid + 1)));
}

// One tile of M rows of output block o: c[0:M, 0:BO] = A[0:M, :] @ S[:, o] (+ init).
template <typename T, int BO, int M>
inline void dsd_tile(const T* A, int64_t lda, const T* blocks, const SparseOperand& s, int64_t o,
                     const typename Vec<T>::type (&init)[BO / Vec<T>::L], T* c, int64_t ldo) {
  constexpr int L = Vec<T>::L;
  constexpr int NV = BO / L;
  using V = typename Vec<T>::type;
  const int64_t bi = s.bi;
  const int64_t block_elems = bi * BO;
  // Partial sums are kept in registers over `group` stored blocks (about 128 reduction
  // terms, as a BLAS K panel) and then added to the output tile in L1: two-level
  // summation, as accurate as BLAS, for a few memory operations per 128 FMAs.
  const int32_t group = static_cast<int32_t>(std::max<int64_t>(1, 128 / bi));
  const int32_t e0 = s.ptr[o], e1 = s.ptr[o + 1];
  if (e0 == e1) {  // an empty block row: the bias (or zeros)
    for (int r = 0; r < M; ++r)
      for (int j = 0; j < NV; ++j) storeu<T>(c + r * ldo + j * L, init[j]);
    return;
  }
  for (int32_t g0 = e0; g0 < e1; g0 += group) {
    const int32_t g1 = std::min(e1, g0 + group);
    V acc[M][NV];
    for (int r = 0; r < M; ++r)
      for (int j = 0; j < NV; ++j) acc[r][j] = g0 == e0 ? init[j] : V{};
    for (int32_t e = g0; e < g1; ++e) {
      const T* a = A + static_cast<int64_t>(s.in_idx[e]) * bi;
      const T* b = blocks + static_cast<int64_t>(s.blk_idx ? s.blk_idx[e] : e) * block_elems;
      micro_kernel<T, BO, M>(a, lda, 1, b, BO, bi, acc);
    }
    for (int r = 0; r < M; ++r)
      for (int j = 0; j < NV; ++j) {
        T* cp = c + r * ldo + j * L;
        storeu<T>(cp, g0 == e0 ? acc[r][j] : loadu<T>(cp) + acc[r][j]);
      }
  }
}

// out[0:rows, o*BO : +BO] = A[0:rows, :] @ S[:, o*BO : +BO] (+ bias), serially.
template <typename T, int BO>
inline void dsd_block(const T* A, int64_t rows, int64_t lda, const T* blocks,
                      const SparseOperand& s, int64_t o, const T* bias, T* out, int64_t ldo) {
  constexpr int L = Vec<T>::L;
  constexpr int NV = BO / L;
  constexpr int MR = tile_rows<T, BO>();
  using V = typename Vec<T>::type;
  V init[NV];
  for (int j = 0; j < NV; ++j) init[j] = bias ? loadu<T>(bias + o * BO + j * L) : V{};
  int64_t t = 0;
  for (; t + MR <= rows; t += MR)
    dsd_tile<T, BO, MR>(A + t * lda, lda, blocks, s, o, init, out + t * ldo + o * BO, ldo);
  if (t < rows)
    dispatch_rows<MR>(static_cast<int>(rows - t), [&](auto m) {
      dsd_tile<T, BO, decltype(m)::value>(A + t * lda, lda, blocks, s, o, init,
                                          out + t * ldo + o * BO, ldo);
    });
}

// Threads for a few-row product of `macs` multiply-adds: one below a fork / join's worth of
// work (waking a second thread costs about as much as 16K multiply-adds on one), else all.
inline int threads_for(int64_t macs) {
  constexpr int64_t kSerialMacs = int64_t{1} << 14;
  return macs < kSerialMacs ? 1 : at::get_num_threads();
}

// Output blocks [o0, o1) of out = A @ S (+ bias) for all rows, serially.
template <typename T, int BO>
inline void dsd_range(const T* A, int64_t rows, int64_t lda, const T* blocks,
                      const SparseOperand& s, int64_t o0, int64_t o1, const T* bias, T* out,
                      int64_t ldo) {
  for (int64_t o = o0; o < o1; ++o) dsd_block<T, BO>(A, rows, lda, blocks, s, o, bias, out, ldo);
}

// out[rows, n_out*BO] = A @ S (+ bias), threaded.
template <typename T, int BO>
void dsd(const T* A, int64_t rows, int64_t lda, const T* blocks, const SparseOperand& s,
         const T* bias, T* out, int64_t ldo) {
  constexpr int MR = tile_rows<T, BO>();
  if (rows <= MR) {
    // One tile of rows (decode): the call streams the stored blocks once, so each thread
    // takes an equal share of them as one contiguous run (sequential reads, no scheduling).
    const int64_t macs = rows * (s.ptr[s.n_out] - s.ptr[0]) * BO * s.bi;
#pragma omp parallel num_threads(threads_for(macs))
    {
      int64_t o0, o1;
      split_stored(s.ptr, s.n_out, omp_get_num_threads(), omp_get_thread_num(), &o0, &o1);
      dsd_range<T, BO>(A, rows, lda, blocks, s, o0, o1, bias, out, ldo);
    }
    return;
  }
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
