// Fused gated block-sparse FFN on the CPU (Llama / Mistral / Qwen SwiGLU, Gemma GeGLU):
//   out = (act(x @ Wg.T + bg) * (x @ Wu.T + bu)) @ Wd.T + bd
// with the [T, N1] intermediate never in memory (the engine and its schedules: ffn.h).
// Gate and up share a block size, so each hidden block column is made from one block row
// of each.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <string>

#include "direct.h"
#include "ffn.h"
#include "glue.h"
#include "lowp.h"

namespace sparsekernels {
namespace cpu {
namespace {

at::Tensor bsr_gated_ffn_cpu(
    const at::Tensor& x, const at::Tensor& values_g, const at::Tensor& crow_g,
    const at::Tensor& col_g, const std::optional<at::Tensor>& bias_g, const at::Tensor& values_u,
    const at::Tensor& crow_u, const at::Tensor& col_u, const std::optional<at::Tensor>& bias_u,
    const at::Tensor& values_d, const at::Tensor& crow_d, const at::Tensor& col_d,
    const std::optional<at::Tensor>& bias_d, const std::string& activation,
    const std::optional<at::Tensor>& packed_g, const std::optional<at::Tensor>& packed_u,
    const std::optional<at::Tensor>& packed_d) {
  check_rows(x, "x");
  const Activation act = parse_activation(activation);
  if (lowp::bf16_native(x, values_g) && lowp::bf16_native_values(values_u) &&
      lowp::bf16_native_values(values_d))  // bsr_ffn_bf16.cpp
    return lowp::bsr_gated_ffn_bf16(x, values_g, crow_g, col_g, bias_g, values_u, crow_u, col_u,
                                    bias_u, values_d, crow_d, col_d, bias_d, activation,
                                    packed_g, packed_u, packed_d);
  const auto ct = compute_type(x.scalar_type());
  const int64_t rows = x.size(0);
  const LayerTensors g = layer_tensors(values_g, crow_g, col_g, bias_g, packed_g, ct, rows, "gate");
  const LayerTensors u = layer_tensors(values_u, crow_u, col_u, bias_u, packed_u, ct, rows, "up");
  const LayerTensors d = layer_tensors(values_d, crow_d, col_d, bias_d, packed_d, ct, rows, "down");
  TORCH_CHECK(g.bm == u.bm && g.bk == u.bk && crow_g.numel() == crow_u.numel(),
              "sparsekernels: gate and up must have the same shape and block size, got ",
              (crow_g.numel() - 1) * g.bm, " outputs in ", g.bm, "x", g.bk, " blocks and ",
              (crow_u.numel() - 1) * u.bm, " in ", u.bm, "x", u.bk);
  return run_ffn(x, g, &u, d, act, ct);
}

}  // namespace

at::Tensor gated_ffn_inference(
    const at::Tensor& x, const at::Tensor& values_g, const at::Tensor& crow_g,
    const at::Tensor& col_g, const std::optional<at::Tensor>& bias_g, const at::Tensor& values_u,
    const at::Tensor& crow_u, const at::Tensor& col_u, const std::optional<at::Tensor>& bias_u,
    const at::Tensor& values_d, const at::Tensor& crow_d, const at::Tensor& col_d,
    const std::optional<at::Tensor>& bias_d, const std::string& activation, int64_t in_features) {
  if (!takes_rows(x, values_g, in_features)) return at::Tensor();
  return with_leading_dims(
      x, bsr_gated_ffn_cpu(x.reshape({-1, in_features}), values_g, crow_g, col_g, bias_g,
                           values_u, crow_u, col_u, bias_u, values_d, crow_d, col_d, bias_d,
                           activation, std::nullopt, std::nullopt, std::nullopt));
}

}  // namespace cpu
}  // namespace sparsekernels

TORCH_LIBRARY_FRAGMENT(sparsekernels_C, m) {
  m.def("bsr_gated_ffn_cpu(Tensor x, Tensor values_g, Tensor crow_g, Tensor col_g, Tensor? bias_g, "
        "Tensor values_u, Tensor crow_u, Tensor col_u, Tensor? bias_u, Tensor values_d, "
        "Tensor crow_d, Tensor col_d, Tensor? bias_d, str activation, Tensor? packed_g=None, "
        "Tensor? packed_u=None, Tensor? packed_d=None) -> Tensor",
        &sparsekernels::cpu::bsr_gated_ffn_cpu);
}
