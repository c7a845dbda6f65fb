// Register-blocked GEMM micro-kernel for the CPU kernels (bsr_linear, attention).
//
// C[MR, BO] += A[MR, kdim] * B[kdim, BO]: MR rows of A are broadcast one element at a time,
// a row of B is loaded as BO/L vectors, and MR*BO/L accumulators stay in registers. A is
// addressed through two strides so the same code reads row-major X, a transposed gradient,
// or a gathered panel. Written with GCC/Clang vector extensions so it compiles for any
// target; built with -march=native it becomes AVX-512 (or AVX2) FMAs.
#pragma once

#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>

namespace sparsekernels {
namespace cpu {

template <typename T>
struct Vec;

template <>
struct Vec<float> {
  typedef float type __attribute__((vector_size(64)));
  typedef float unaligned __attribute__((vector_size(64), may_alias, aligned(4)));
  static constexpr int L = 16;
};

template <>
struct Vec<double> {
  typedef double type __attribute__((vector_size(64)));
  typedef double unaligned __attribute__((vector_size(64), may_alias, aligned(8)));
  static constexpr int L = 8;
};

template <typename T>
inline typename Vec<T>::type loadu(const T* p) {
  return *reinterpret_cast<const typename Vec<T>::unaligned*>(p);
}

template <typename T>
inline void storeu(T* p, typename Vec<T>::type v) {
  *reinterpret_cast<typename Vec<T>::unaligned*>(p) = v;
}

// Rows of the register tile for an output block of width BO: about 24 accumulators.
template <typename T, int BO>
constexpr int tile_rows() {
  constexpr int nv = BO / Vec<T>::L;
  return nv >= 24 ? 1 : 24 / nv;
}

// acc[MR][NV] += A[MR, kdim] * B[kdim, BO]; A(r, k) = a[r * sa_r + k * sa_k], B row k at b + k * ldb.
template <typename T, int BO, int MR>
inline void micro_kernel(const T* __restrict a, int64_t sa_r, int64_t sa_k,
                         const T* __restrict b, int64_t ldb, int64_t kdim,
                         typename Vec<T>::type (&acc)[MR][BO / Vec<T>::L]) {
  constexpr int L = Vec<T>::L;
  constexpr int NV = BO / L;
  using V = typename Vec<T>::type;
  for (int64_t k = 0; k < kdim; ++k) {
    V bv[NV];
#pragma GCC unroll 16
    for (int j = 0; j < NV; ++j) bv[j] = loadu<T>(b + k * ldb + j * L);
#pragma GCC unroll 24
    for (int r = 0; r < MR; ++r) {
      const T ar = a[r * sa_r + k * sa_k];
#pragma GCC unroll 16
      for (int j = 0; j < NV; ++j) acc[r][j] += ar * bv[j];
    }
  }
}

// f(std::integral_constant<int, m>) for the runtime row count m in [1, MR]: a partial tile
// gets its own register-resident accumulators instead of micro_kernel_tail's runtime loop.
template <int MR, typename F, int... I>
inline void dispatch_rows_impl(int m, F&& f, std::integer_sequence<int, I...>) {
  (void)((m == I + 1 ? (f(std::integral_constant<int, I + 1>{}), true) : false) || ...);
}

template <int MR, typename F>
inline void dispatch_rows(int m, F&& f) {
  dispatch_rows_impl<MR>(m, f, std::make_integer_sequence<int, MR>{});
}

// The same product for a runtime row count mr <= MR (tails); slower, used for < MR rows.
template <typename T, int BO, int MR>
inline void micro_kernel_tail(int mr, const T* __restrict a, int64_t sa_r, int64_t sa_k,
                              const T* __restrict b, int64_t ldb, int64_t kdim,
                              typename Vec<T>::type (&acc)[MR][BO / Vec<T>::L]) {
  constexpr int L = Vec<T>::L;
  constexpr int NV = BO / L;
  using V = typename Vec<T>::type;
  for (int64_t k = 0; k < kdim; ++k) {
    V bv[NV];
#pragma GCC unroll 16
    for (int j = 0; j < NV; ++j) bv[j] = loadu<T>(b + k * ldb + j * L);
    for (int r = 0; r < mr; ++r) {
      const T ar = a[r * sa_r + k * sa_k];
#pragma GCC unroll 16
      for (int j = 0; j < NV; ++j) acc[r][j] += ar * bv[j];
    }
  }
}

}  // namespace cpu
}  // namespace sparsekernels
