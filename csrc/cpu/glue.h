// Argument checks and dtype / block-size dispatch shared by the CPU kernels' torch entry
// points (bsr_linear, bsr_ffn).
#pragma once

#include <ATen/ATen.h>

#include "microkernel.h"

#include <optional>
#include <type_traits>

namespace sparsekernels {
namespace cpu {

inline void check_index(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kInt && t.dim() == 1 &&
                  t.is_contiguous(),
              "sparsekernels: ", name, " must be a contiguous 1-D int32 CPU tensor, got ",
              t.scalar_type(), " ", t.sizes());
}

inline void check_rows(const at::Tensor& x, const char* name) {
  TORCH_CHECK(x.device().is_cpu() && x.dim() == 2 && (x.size(0) <= 1 || x.stride(1) == 1),
              "sparsekernels: ", name, " must be a 2-D CPU tensor with unit column stride, got ",
              x.sizes(), " strides ", x.strides());
}

// Half and bfloat16 compute in float: the CPU has no fast native path for them here.
inline at::ScalarType compute_type(at::ScalarType t) {
  return (t == at::kFloat || t == at::kDouble) ? t : at::kFloat;
}

// t in the compute type, contiguous; t itself (no dispatcher round trip) when it already is.
inline at::Tensor in_compute_type(const at::Tensor& t, at::ScalarType ct) {
  if (t.scalar_type() == ct && t.is_contiguous()) return t;
  return t.to(ct).contiguous();
}

// The cheap part of checking a layer's index: shapes and the two ends of crow (contents are
// the BlockSparseTensor's invariants; these catch arrays of another layer or a wrong size).
inline void check_layer(const at::Tensor& values, const at::Tensor& crow, const at::Tensor& col,
                        const char* name) {
  TORCH_CHECK(values.dim() == 3 && values.device().is_cpu(), "sparsekernels: ", name,
              " values must be a [nnz, bm, bk] CPU tensor, got ", values.sizes(), " on ",
              values.device());
  check_index(crow, name);
  check_index(col, name);
  TORCH_CHECK(crow.numel() >= 1 && col.numel() == values.size(0), "sparsekernels: ", name,
              " has ", values.size(0), " blocks but ", col.numel(), " column indices");
  const int32_t* c = crow.data_ptr<int32_t>();
  TORCH_CHECK(c[0] == 0 && c[crow.numel() - 1] == values.size(0), "sparsekernels: ", name,
              " crow_indices must run from 0 to the block count ", values.size(0), ", got ",
              c[0], " to ", c[crow.numel() - 1]);
}

// The packed W.T blocks a call has for free: the caller's `packed`, else `values` itself when
// it already holds them (a SparseLinear on the CPU stores its blocks transposed, so
// values.transpose(1, 2) is contiguous), else none.
inline std::optional<at::Tensor> free_packed(const at::Tensor& values, at::ScalarType ct,
                                             const std::optional<at::Tensor>& packed) {
  if (packed.has_value()) return packed;
  if (values.dim() == 3 && values.scalar_type() == ct && values.size(0) > 0 &&
      !values.is_contiguous() && values.transpose(1, 2).is_contiguous())
    return values.transpose(1, 2);
  return std::nullopt;
}

// The few-row rule every CPU kernel applies to one layer: with packed W.T blocks (passed, or
// the stored layout: free_packed) it runs the register-tiled kernel; without them, fewer rows
// than a register tile run dot products on the blocks as stored (dot.h), and more rows pack
// W.T per call and tile. The caller (the router) decides whether to pass packed blocks;
// tile_rows_of tells it the threshold.
inline bool reads_stored_blocks(int64_t rows, int64_t tile_rows, bool packed_given) {
  return !packed_given && rows < tile_rows;
}

// W.T blocks in the compute type, [nnz, bk, bm]: the kernel's B operand. `packed`, when
// given, is that tensor made once by the caller (SparseLinear's inference cache); checked.
inline at::Tensor packed_blocks(const at::Tensor& values, at::ScalarType ct,
                                const std::optional<at::Tensor>& packed) {
  if (!packed.has_value()) return values.to(ct).transpose(1, 2).contiguous();
  TORCH_CHECK(packed->defined(), "sparsekernels: packed is an undefined tensor");
  TORCH_CHECK(packed->dim() == 3 && packed->size(0) == values.size(0) &&
                  packed->size(1) == values.size(2) && packed->size(2) == values.size(1),
              "sparsekernels: packed must be values.transpose(1, 2) [", values.size(0), ", ",
              values.size(2), ", ", values.size(1), "], got ", packed->sizes());
  TORCH_CHECK(packed->device().is_cpu() && packed->scalar_type() == ct && packed->is_contiguous(),
              "sparsekernels: packed must be a contiguous ", ct, " CPU tensor, got ",
              packed->scalar_type(), " on ", packed->device());
  return *packed;
}

// f(std::integral_constant<int, bo>) for the supported widths; `what` names the width in
// the error (a block size, a head dim).
template <typename F>
void dispatch_block(int64_t bo, F&& f, const char* what = "block size") {
  switch (bo) {
    case 16: f(std::integral_constant<int, 16>{}); break;
    case 32: f(std::integral_constant<int, 32>{}); break;
    case 64: f(std::integral_constant<int, 64>{}); break;
    case 128: f(std::integral_constant<int, 128>{}); break;
    default: TORCH_CHECK(false, "sparsekernels: unsupported ", what, " ", bo,
                         "; use 16, 32, 64 or 128");
  }
}

template <typename F>
void dispatch_float(at::ScalarType t, F&& f) {
  if (t == at::kDouble) f(double{});
  else f(float{});
}

// Rows of the register tile for output blocks of width bo in compute type ct.
inline int64_t tile_rows_of(at::ScalarType ct, int64_t bo) {
  int64_t rows = 0;
  dispatch_float(compute_type(ct), [&](auto tag) {
    using T = decltype(tag);
    dispatch_block(bo, [&](auto b) { rows = tile_rows<T, decltype(b)::value>(); });
  });
  return rows;
}

}  // namespace cpu
}  // namespace sparsekernels
