// A residual add and the LayerNorm after it in one pass over each row:
// y = (s - mean(s)) / sqrt(var(s) + eps) * weight + bias, s = x + residual, for the post-norm
// blocks of BERT-style encoders (each attention and FFN output). torch runs the two as an add
// and a layer_norm, which read and write the activations five times; here each row is read
// once, kept in L1 in fp32 (s is never rounded to bf16, as torch's bf16 add rounds it), and
// written once. fp32 and bf16 rows; statistics in fp32, two passes (mean, then the squared
// deviations), as accurate as torch's.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

#include "add_norm_rows.h"
#include "direct.h"

namespace sparsekernels {
namespace cpu {
namespace {

template <typename T>
void run(const T* x, const T* r, const float* w, const float* b, float eps, int64_t rows, int64_t n,
         T* y) {
  for_row_parts(rows, n, [&](int64_t r0, int64_t r1) {
    std::vector<float> buf(n);
    add_layer_norm_rows<T>(x, r, w, b, eps, n, r0, r1, buf.data(), y);
  });
}

}  // namespace

at::Tensor add_layer_norm_cpu(const at::Tensor& x, const at::Tensor& residual,
                              const std::optional<at::Tensor>& weight,
                              const std::optional<at::Tensor>& bias, double eps) {
  check_rows(x, eps, "add_layer_norm");
  TORCH_CHECK(residual.scalar_type() == x.scalar_type() && residual.sizes() == x.sizes() &&
                  residual.device().is_cpu(),
              "sparsekernels: add_layer_norm's x and residual must have one shape and dtype on "
              "the CPU, got ", x.sizes(), " ", x.scalar_type(), " and ", residual.sizes(), " ",
              residual.scalar_type(), " on ", residual.device());
  const int64_t n = x.size(-1);
  const at::Tensor w = norm_param(weight, n, "add_layer_norm", "weight");
  const at::Tensor b = norm_param(bias, n, "add_layer_norm", "bias");
  const at::Tensor xc = x.contiguous(), rc = residual.contiguous();
  at::Tensor y = at::empty_like(xc);
  if (xc.numel() == 0 || n == 0) return y;
  const int64_t rows = xc.numel() / n;
  const float* wp = w.defined() ? w.data_ptr<float>() : nullptr;
  const float* bp = b.defined() ? b.data_ptr<float>() : nullptr;
  const float e = static_cast<float>(eps);
  dispatch_rows(xc.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    run<T>(row_data<T>(xc), row_data<T>(rc), wp, bp, e, rows, n, row_data<T>(y));
  });
  return y;
}

}  // namespace cpu
}  // namespace sparsekernels

TORCH_LIBRARY_FRAGMENT(sparsekernels_C, m) {
  m.def("add_layer_norm_cpu(Tensor x, Tensor residual, Tensor? weight, Tensor? bias, float eps) "
        "-> Tensor",
        &sparsekernels::cpu::add_layer_norm_cpu);
}
