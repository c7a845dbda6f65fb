// Fused block-sparse FFN in int8 (w8a8) on the CPU: act(x @ W1.T + b1) @ W2.T + b2 with both
// layers' weights int8 (per-output-channel scales) and the [T, N1] intermediate never in
// memory. Each thread takes a chunk of rows and:
//   quantizes its x rows per row (u8 codes + a scale), in its own buffer;
//   FFN1 in int8 -> fp32 intermediate with bias, in its buffer (L2), activation in place;
//   re-quantizes each intermediate row (the second layer's dynamic activation scale);
//   FFN2 in int8 -> the output (fp32 or bf16, the input's dtype).
// Per row this is exactly bsr_linear_int8(w8a8) -> activation in fp32 -> bsr_linear_int8(w8a8).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "glue.h"
#include "lowp.h"
#include "lowp_microkernel.h"

namespace sparsekernels {
namespace cpu {
namespace lowp {
namespace {

struct Layer {
  const int8_t* packed;
  Rows s;
  Int8Epilogue ep;
};

template <int BO1, int BO2, typename InT, typename OutT>
void ffn_int8(const InT* X, int64_t rows, int64_t k, const Layer& l1, Activation act,
              const Layer& l2, OutT* out, int64_t wanted) {
  constexpr int64_t q = std::max(tile_rows<BO1>(), tile_rows<BO2>());
  const int64_t n1 = l1.s.n_out * BO1, n2 = l2.s.n_out * BO2;
  for_row_chunks(rows, q, wanted, [&](int64_t t0, int64_t rc, int64_t mc) {
    // per-thread buffers, reused across calls (no page faults per chunk)
    thread_local std::vector<uint8_t> xq, hq;
    thread_local std::vector<float> xs, h, hs;
    thread_local std::vector<int32_t> xz, hz;
    if (xq.size() < static_cast<size_t>(mc * k)) xq.resize(mc * k);
    if (h.size() < static_cast<size_t>(mc * n1)) {
      h.resize(mc * n1);
      hq.resize(mc * n1);
    }
    if (xs.size() < static_cast<size_t>(mc)) {
      xs.resize(mc);
      hs.resize(mc);
      xz.resize(mc);
      hz.resize(mc);
    }
    for (int64_t r = 0; r < rc; ++r)
      quantize_row<InT>(X + (t0 + r) * k, k, xq.data() + r * k, &xs[r], &xz[r]);
    Int8Epilogue e1 = l1.ep, e2 = l2.ep;
    e1.xscale = xs.data();
    e1.xzero = xz.data();
    e2.xscale = hs.data();
    e2.xzero = hz.data();
    for (int64_t o = 0; o < l1.s.n_out; ++o)
      block_u8s8<BO1, float>(xq.data(), rc, k, l1.packed, l1.s, o, e1, h.data(), n1);
    activate(h.data(), rc, n1, act);
    for (int64_t r = 0; r < rc; ++r)
      quantize_row<float>(h.data() + r * n1, n1, hq.data() + r * n1, &hs[r], &hz[r]);
    for (int64_t o = 0; o < l2.s.n_out; ++o)
      block_u8s8<BO2, OutT>(hq.data(), rc, n1, l2.packed, l2.s, o, e2, out + t0 * n2, n2);
  });
}

at::Tensor bsr_ffn_int8_cpu(const at::Tensor& x, const at::Tensor& packed1, const at::Tensor& comp1,
                            const at::Tensor& scale1, const at::Tensor& crow1,
                            const at::Tensor& col1, const std::optional<at::Tensor>& bias1,
                            const at::Tensor& packed2, const at::Tensor& comp2,
                            const at::Tensor& scale2, const at::Tensor& crow2,
                            const at::Tensor& col2, const std::optional<at::Tensor>& bias2,
                            const std::string& activation) {
  check_rows(x, "x");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16,
              "sparsekernels: int8 layers take float32 or bfloat16 inputs, got ", x.scalar_type());
  const Activation act = parse_activation(activation);
  check_int8_layer(packed1, comp1, scale1, crow1, col1, bias1, x.size(1), "W1");
  const int64_t bm1 = packed1.size(2), bm2 = packed2.size(2);
  const int64_t n1 = (crow1.numel() - 1) * bm1, n2 = (crow2.numel() - 1) * bm2;
  check_int8_layer(packed2, comp2, scale2, crow2, col2, bias2, n1, "W2");
  at::Tensor bb1, bb2;
  if (bias1.has_value()) bb1 = bias1->to(at::kFloat).contiguous();
  if (bias2.has_value()) bb2 = bias2->to(at::kFloat).contiguous();
  const at::Tensor xc = x.contiguous();
  const int64_t rows = x.size(0), k = x.size(1);
  at::Tensor out = at::empty({rows, n2}, x.options());
  if (rows == 0) return out;
  const Layer l1{packed1.data_ptr<int8_t>(),
                 Rows{crow1.data_ptr<int32_t>(), col1.data_ptr<int32_t>(), crow1.numel() - 1, packed1.size(1) * 4},
                 Int8Epilogue{comp1.data_ptr<int32_t>(), scale1.data_ptr<float>(), nullptr,
                              bb1.defined() ? bb1.data_ptr<float>() : nullptr, nullptr}};
  const Layer l2{packed2.data_ptr<int8_t>(),
                 Rows{crow2.data_ptr<int32_t>(), col2.data_ptr<int32_t>(), crow2.numel() - 1, packed2.size(1) * 4},
                 Int8Epilogue{comp2.data_ptr<int32_t>(), scale2.data_ptr<float>(), nullptr,
                              bb2.defined() ? bb2.data_ptr<float>() : nullptr, nullptr}};
  // rows per chunk: about half the weight bytes per intermediate row's bytes (bsr_ffn.cpp);
  // an intermediate row is n1 floats and n1 codes
  const int64_t weight_bytes = packed1.numel() + packed2.numel();
  const int64_t wanted = std::clamp<int64_t>(weight_bytes / (2 * 5 * std::max<int64_t>(1, n1)), 48, 192);
  dispatch_block(bm1, [&](auto bo1) {
    dispatch_block(bm2, [&](auto bo2) {
      constexpr int BO1 = decltype(bo1)::value, BO2 = decltype(bo2)::value;
      if (x.scalar_type() == at::kBFloat16) {
        ffn_int8<BO1, BO2, uint16_t, uint16_t>(
            reinterpret_cast<const uint16_t*>(xc.data_ptr<at::BFloat16>()), rows, k, l1, act, l2,
            reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>()), wanted);
      } else {
        ffn_int8<BO1, BO2, float, float>(xc.data_ptr<float>(), rows, k, l1, act, l2,
                                         out.data_ptr<float>(), wanted);
      }
    });
  });
  return out;
}

}  // namespace
}  // namespace lowp
}  // namespace cpu
}  // namespace sparsekernels

TORCH_LIBRARY_FRAGMENT(sparsekernels_C, m) {
  m.def("bsr_ffn_int8_cpu(Tensor x, Tensor packed1, Tensor comp1, Tensor scale1, Tensor crow1, "
        "Tensor col1, Tensor? bias1, Tensor packed2, Tensor comp2, Tensor scale2, Tensor crow2, "
        "Tensor col2, Tensor? bias2, str activation) -> Tensor",
        &sparsekernels::cpu::lowp::bsr_ffn_int8_cpu);
}
