// The FFN activations the fused CPU kernels apply to their intermediate, in one place for
// every precision (fp32 / bf16 engine in ffn.h, bf16 and int8 kernels in lowp_*).
#pragma once

#include <ATen/ATen.h>

#include <string>

namespace sparsekernels {
namespace cpu {

enum class Activation { kNone, kGelu, kGeluTanh, kRelu, kSilu };

inline Activation parse_activation(const std::string& name) {
  if (name == "none") return Activation::kNone;
  if (name == "gelu") return Activation::kGelu;
  if (name == "gelu_tanh") return Activation::kGeluTanh;
  if (name == "relu") return Activation::kRelu;
  if (name == "silu") return Activation::kSilu;
  TORCH_CHECK(false, "sparsekernels: unknown FFN activation '", name,
              "'; use none, gelu, gelu_tanh, relu or silu");
}

// In place on h[0:rows, 0:width] (row stride ld). ATen's vectorised kernels run serially
// here: inside an OpenMP region at::parallel_for does not spawn threads.
inline void activate(void* h, int64_t rows, int64_t width, int64_t ld, Activation act,
                     at::ScalarType st) {
  if (act == Activation::kNone || rows == 0 || width == 0) return;
  at::Tensor t = at::from_blob(h, {rows, width}, {ld, 1}, at::TensorOptions().dtype(st));
  switch (act) {
    case Activation::kNone: break;
    case Activation::kGelu: at::gelu_(t); break;
    case Activation::kGeluTanh: at::gelu_(t, "tanh"); break;
    case Activation::kRelu: at::relu_(t); break;
    case Activation::kSilu: at::silu_(t); break;
  }
}

}  // namespace cpu
}  // namespace sparsekernels
