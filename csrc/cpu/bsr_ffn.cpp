// Fused block-sparse FFN on the CPU: out = act(x @ W1.T + b1) @ W2.T + b2, where the
// [T, N1] intermediate never reaches memory (the engine and its schedules: ffn.h).
//
// Why: unfused, the intermediate (T x N1 values: 25 MB for 2,048 tokens of a BERT-base FFN
// in fp32) is written by FFN1, read and written again by the activation, and read by FFN2.
// At low density that traffic and the separate activation pass cost about as much as the
// two sparse matmuls; at decode, three calls cost more than one.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <string>

#include "add_norm_rows.h"
#include "direct.h"
#include "ffn.h"
#include "glue.h"
#include "lowp.h"

namespace sparsekernels {
namespace cpu {
namespace {

at::Tensor bsr_ffn_cpu(const at::Tensor& x, const at::Tensor& values1, const at::Tensor& crow1,
                       const at::Tensor& col1, const std::optional<at::Tensor>& bias1,
                       const at::Tensor& values2, const at::Tensor& crow2, const at::Tensor& col2,
                       const std::optional<at::Tensor>& bias2, int64_t hidden,
                       const std::string& activation, const std::optional<at::Tensor>& packed1,
                       const std::optional<at::Tensor>& packed2) {
  check_rows(x, "x");
  const Activation act = parse_activation(activation);
  if (lowp::bf16_native(x, values1) && lowp::bf16_native_values(values2)) {  // bsr_ffn_bf16.cpp
    TORCH_CHECK(values1.dim() == 3 && values2.dim() == 3 && x.size(1) % values1.size(2) == 0 &&
                    hidden == (crow1.numel() - 1) * values1.size(1) &&
                    hidden % values2.size(2) == 0,
                "sparsekernels: the FFN's shapes do not chain (x ", x.sizes(), ", W1 blocks ",
                values1.sizes(), ", W2 blocks ", values2.sizes(), ", hidden ", hidden, ")");
    return lowp::bsr_ffn_bf16(x, values1, crow1, col1, bias1, values2, crow2, col2, bias2,
                              activation, packed1, packed2);
  }
  const auto ct = compute_type(x.scalar_type());
  const LayerTensors w1 = layer_tensors(values1, crow1, col1, bias1, packed1, ct, x.size(0), "W1");
  const LayerTensors w2 = layer_tensors(values2, crow2, col2, bias2, packed2, ct, x.size(0), "W2");
  const int64_t n1 = (crow1.numel() - 1) * w1.bm;
  TORCH_CHECK(hidden == n1, "sparsekernels: W1 has ", n1, " outputs but W2 reads ", hidden,
              " inputs");
  return run_ffn(x, w1, nullptr, w2, act, ct);
}

}  // namespace

at::Tensor ffn_inference(const at::Tensor& x, const at::Tensor& values1, const at::Tensor& crow1,
                         const at::Tensor& col1, const std::optional<at::Tensor>& bias1,
                         const at::Tensor& values2, const at::Tensor& crow2,
                         const at::Tensor& col2, const std::optional<at::Tensor>& bias2,
                         const std::string& activation, int64_t in_features) {
  if (!takes_rows(x, values1, in_features)) return at::Tensor();
  const int64_t hidden = (crow1.numel() - 1) * values1.size(1);
  return with_leading_dims(x, bsr_ffn_cpu(x.reshape({-1, in_features}), values1, crow1, col1,
                                          bias1, values2, crow2, col2, bias2, hidden, activation,
                                          std::nullopt, std::nullopt));
}

at::Tensor ffn_add_norm_inference(const at::Tensor& x, const at::Tensor& values1,
                                  const at::Tensor& crow1, const at::Tensor& col1,
                                  const std::optional<at::Tensor>& bias1,
                                  const at::Tensor& values2, const at::Tensor& crow2,
                                  const at::Tensor& col2, const std::optional<at::Tensor>& bias2,
                                  const std::string& activation, int64_t in_features,
                                  const at::Tensor& residual,
                                  const std::optional<at::Tensor>& weight,
                                  const std::optional<at::Tensor>& norm_bias, double eps) {
  // the epilogue runs in the bf16 kernels; other calls take the unfused path
  if (!takes_rows(x, values1, in_features) || !lowp::bf16_native(x, values1) ||
      !lowp::bf16_native_values(values2) || values1.dim() != 3 || values2.dim() != 3)
    return at::Tensor();
  const int64_t hidden = (crow1.numel() - 1) * values1.size(1);
  const int64_t n = (crow2.numel() - 1) * values2.size(1);
  if (!residual_fits(residual, x, n)) return at::Tensor();
  const at::Tensor x2 = x.reshape({-1, in_features});
  check_rows(x2, "x");
  parse_activation(activation);  // raises on an unknown name before anything runs
  TORCH_CHECK(x2.size(1) % values1.size(2) == 0 && hidden % values2.size(2) == 0,
              "sparsekernels: the FFN's shapes do not chain (x ", x2.sizes(), ", W1 blocks ",
              values1.sizes(), ", W2 blocks ", values2.sizes(), ")");
  const AddNormArgs a = add_norm_args(residual, weight, norm_bias, eps, x2.size(0), n,
                                      x.scalar_type(), "bsr_ffn + add_layer_norm");
  return with_leading_dims(x, lowp::bsr_ffn_bf16(x2, values1, crow1, col1, bias1, values2, crow2,
                                                 col2, bias2, activation, std::nullopt,
                                                 std::nullopt, &a.epilogue));
}

}  // namespace cpu
}  // namespace sparsekernels

TORCH_LIBRARY_FRAGMENT(sparsekernels_C, m) {
  m.def("bsr_ffn_cpu(Tensor x, Tensor values1, Tensor crow1, Tensor col1, Tensor? bias1, "
        "Tensor values2, Tensor crow2, Tensor col2, Tensor? bias2, int hidden, str activation, "
        "Tensor? packed1=None, Tensor? packed2=None) -> Tensor",
        &sparsekernels::cpu::bsr_ffn_cpu);
}
