// A dense Linear at decode row counts on the CPU: y = x W^T + b for at most a few rows of x
// and a row-major W [n, k] (an LM head, a layer left unpruned). The weight is streamed once
// by the block-sparse dot path (dot.h) reading it as one stored [16, k] block per 16 output
// rows: a view, no copy, so a tied embedding stays tied. torch's GEMV runs these shapes on
// one thread at a fraction of the copy bandwidth on this kind of CPU (bench/results).
#include <ATen/ATen.h>

#include <numeric>
#include <vector>

#include "direct.h"
#include "dot.h"
#include "lowp_microkernel.h"

namespace sparsekernels {
namespace cpu {

namespace {
constexpr int64_t kRowsPerBlock = 16;  // one block row of the dot path per 16 outputs
}  // namespace

at::Tensor dense_linear_inference(const at::Tensor& x, const at::Tensor& weight,
                                  const std::optional<at::Tensor>& bias, int64_t max_rows) {
  if (weight.dim() != 2 || !weight.is_contiguous() || !weight.device().is_cpu()) return {};
  const int64_t n = weight.size(0), k = weight.size(1);
  if (!takes_rows(x, weight, k) || n == 0 || n % kRowsPerBlock != 0 || k % 16 != 0) return {};
  const auto st = weight.scalar_type();
  const bool bf16 = st == at::kBFloat16;
  if (st != at::kFloat && !(bf16 && lowp::use_bf16())) return {};
  const int64_t rows = x.numel() / k;
  if (rows == 0 || rows > max_rows) return {};
  if (bias.has_value() && (bias->dim() != 1 || bias->numel() != n ||
                           bias->scalar_type() != st || !bias->device().is_cpu()))
    return {};
  const at::Tensor x2 = x.reshape({rows, k}).contiguous();
  at::Tensor out = at::empty({rows, n}, x.options());
  const int64_t nbr = n / kRowsPerBlock;
  std::vector<int32_t> crow(nbr + 1), col(nbr, 0);  // block row i: its one block, column 0
  std::iota(crow.begin(), crow.end(), 0);
  if (!bf16) {
    const at::Tensor b = bias.has_value() ? bias->contiguous() : at::Tensor();
    dot_rows<float>(x2.data_ptr<float>(), rows, k, weight.data_ptr<float>(), kRowsPerBlock, k,
                    crow.data(), col.data(), nbr, b.defined() ? b.data_ptr<float>() : nullptr,
                    out.data_ptr<float>(), n);
    return with_leading_dims(x, out);
  }
#ifdef SK_LOWP_X86
  const at::Tensor b = bias.has_value() ? bias->to(at::kFloat).contiguous() : at::Tensor();
  const float* bp = b.defined() ? b.data_ptr<float>() : nullptr;
  const auto* xp = reinterpret_cast<const uint16_t*>(x2.data_ptr<at::BFloat16>());
  const auto* wp = reinterpret_cast<const uint16_t*>(weight.data_ptr<at::BFloat16>());
  auto* op = reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>());
  const int64_t macs = rows * n * k;
#pragma omp parallel for schedule(static) num_threads(threads_for(macs))
  for (int64_t i = 0; i < nbr; ++i)
    for (int64_t t = 0; t < rows; ++t)
      lowp::dot_bf16_avx512(xp + t * k, wp, kRowsPerBlock, k, crow.data(), col.data(), i, bp,
                            op + t * n);
  return with_leading_dims(x, out);
#else
  return {};
#endif
}

}  // namespace cpu
}  // namespace sparsekernels
