// Argument checks and dtype / block-size dispatch shared by the CPU kernels' torch entry
// points (bsr_linear, bsr_ffn).
#pragma once

#include <ATen/ATen.h>

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

// W.T blocks in the compute type, [nnz, bk, bm]: the kernel's B operand. `packed`, when
// given, is that tensor made once by the caller (SparseLinear's inference cache); checked.
inline at::Tensor packed_blocks(const at::Tensor& values, at::ScalarType ct,
                                const std::optional<at::Tensor>& packed) {
  if (!packed.has_value()) return values.to(ct).transpose(1, 2).contiguous();
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

}  // namespace cpu
}  // namespace sparsekernels
