// Fused block-sparse FFN in int8 (w8a8) on the CPU: act(x @ W1.T + b1) @ W2.T + b2 with both
// layers' weights int8 (per-output-channel scales) and the [T, N1] intermediate never in
// memory. Each thread takes a chunk of rows and:
//   quantizes its x rows per row (u8 codes + a scale), in its own buffer;
//   FFN1 in int8 -> fp32 intermediate with bias, in its buffer (L2), activation in place;
//   re-quantizes each intermediate row (the second layer's dynamic activation scale);
//   FFN2 in int8 -> the output (fp32 or bf16, the input's dtype).
// Per row this is exactly bsr_linear_int8(w8a8) -> activation in fp32 -> bsr_linear_int8(w8a8).
// The gated form (Llama MLPs) quantizes x once for gate and up and multiplies act(gate) by
// up in the same buffer before re-quantizing.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "add_norm_rows.h"
#include "direct.h"
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

// up == nullptr: act(x W1^T) W2^T; else the gated form act(x Wg^T) * (x Wu^T) Wd^T with
// l1 = gate (up shares its shape and block size, so one quantized x feeds both).
// an: out = layer_norm(out + residual) on each chunk's rows once they are written.
template <int BO1, int BO2, typename InT, typename OutT>
void ffn_int8(const InT* X, int64_t rows, int64_t k, const Layer& l1, const Layer* up,
              Activation act, const Layer& l2, OutT* out, int64_t wanted, const AddNorm* an) {
  constexpr int64_t q = std::max(tile_rows<BO1>(), tile_rows<BO2>());
  const int64_t n1 = l1.s.n_out * BO1, n2 = l2.s.n_out * BO2;
  for_row_chunks(rows, q, wanted, [&](int64_t t0, int64_t rc, int64_t mc) {
    // per-thread buffers, reused across calls (no page faults per chunk)
    thread_local std::vector<uint8_t> xq, hq;
    thread_local std::vector<float> xs, h, hu, hs;
    thread_local std::vector<int32_t> xz, hz;
    if (xq.size() < static_cast<size_t>(mc * k)) xq.resize(mc * k);
    if (h.size() < static_cast<size_t>(mc * n1)) {
      h.resize(mc * n1);
      hq.resize(mc * n1);
    }
    if (up && hu.size() < static_cast<size_t>(mc * n1)) hu.resize(mc * n1);
    if (xs.size() < static_cast<size_t>(mc)) {
      xs.resize(mc);
      hs.resize(mc);
      xz.resize(mc);
      hz.resize(mc);
    }
    quantize_rows<InT>(X + t0 * k, k, rc, k, xq.data(), xs.data(), xz.data());
    Int8Epilogue e1 = l1.ep, e2 = l2.ep;
    e1.xscale = xs.data();
    e1.xzero = xz.data();
    e2.xscale = hs.data();
    e2.xzero = hz.data();
    blocks_u8s8<BO1, float>(xq.data(), rc, k, l1.packed, l1.s, e1, h.data(), n1);
    cpu::activate(h.data(), rc, n1, n1, act, at::kFloat);
    if (up) {
      Int8Epilogue eu = up->ep;
      eu.xscale = xs.data();
      eu.xzero = xz.data();
      blocks_u8s8<BO1, float>(xq.data(), rc, k, up->packed, up->s, eu, hu.data(), n1);
      float* hp = h.data();
      const float* up_h = hu.data();
      for (int64_t i = 0; i < rc * n1; ++i) hp[i] *= up_h[i];
    }
    quantize_rows<float>(h.data(), n1, rc, n1, hq.data(), hs.data(), hz.data());
    blocks_u8s8<BO2, OutT>(hq.data(), rc, n1, l2.packed, l2.s, e2, out + t0 * n2, n2);
    if (an) apply_add_norm<OutT>(*an, out, n2, t0, t0 + rc);
  });
}

// One int8 layer's tensors (checked) -> Layer; the bias in fp32 is kept alive by `bias_f32`.
Layer make_layer(const at::Tensor& packed, const at::Tensor& comp, const at::Tensor& scale,
                 const at::Tensor& crow, const at::Tensor& col,
                 const std::optional<at::Tensor>& bias, int64_t in_features, const char* name,
                 at::Tensor& bias_f32) {
  check_int8_layer(packed, comp, scale, crow, col, bias, in_features, name);
  if (bias.has_value()) bias_f32 = bias->to(at::kFloat).contiguous();
  return Layer{packed.data_ptr<int8_t>(),
               Rows{crow.data_ptr<int32_t>(), col.data_ptr<int32_t>(), crow.numel() - 1,
                    packed.size(1) * 4},
               Int8Epilogue{comp.data_ptr<int32_t>(), scale.data_ptr<float>(), nullptr,
                            bias_f32.defined() ? bias_f32.data_ptr<float>() : nullptr, nullptr}};
}

// The fused kernel on checked layers; `extra`: the weight bytes beyond l1 and l2 (up's).
at::Tensor run_ffn_int8(const at::Tensor& x, const Layer& l1, int64_t bm1, const Layer* up,
                        Activation act, const Layer& l2, int64_t bm2, int64_t weight_bytes,
                        const AddNorm* an = nullptr) {
  const int64_t n1 = l1.s.n_out * bm1, n2 = l2.s.n_out * bm2;
  const at::Tensor xc = x.contiguous();
  const int64_t rows = x.size(0), k = x.size(1);
  at::Tensor out = at::empty({rows, n2}, x.options());
  if (rows == 0) return out;
  // rows per chunk: about half the weight bytes per intermediate row's bytes (bsr_ffn.cpp);
  // an intermediate row is n1 floats and n1 codes (and n1 more floats for up)
  const int64_t row_bytes = (up ? 9 : 5) * std::max<int64_t>(1, n1);
  const int64_t wanted = std::clamp<int64_t>(weight_bytes / (2 * row_bytes), 48, 192);
  dispatch_block(bm1, [&](auto bo1) {
    dispatch_block(bm2, [&](auto bo2) {
      constexpr int BO1 = decltype(bo1)::value, BO2 = decltype(bo2)::value;
      if (x.scalar_type() == at::kBFloat16) {
        ffn_int8<BO1, BO2, uint16_t, uint16_t>(
            reinterpret_cast<const uint16_t*>(xc.data_ptr<at::BFloat16>()), rows, k, l1, up, act,
            l2, reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>()), wanted, an);
      } else {
        ffn_int8<BO1, BO2, float, float>(xc.data_ptr<float>(), rows, k, l1, up, act, l2,
                                         out.data_ptr<float>(), wanted, an);
      }
    });
  });
  return out;
}

void check_x(const at::Tensor& x) {
  check_rows(x, "x");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16,
              "sparsekernels: int8 layers take float32 or bfloat16 inputs, got ", x.scalar_type());
}

at::Tensor bsr_ffn_int8_cpu(const at::Tensor& x, const at::Tensor& packed1, const at::Tensor& comp1,
                            const at::Tensor& scale1, const at::Tensor& crow1,
                            const at::Tensor& col1, const std::optional<at::Tensor>& bias1,
                            const at::Tensor& packed2, const at::Tensor& comp2,
                            const at::Tensor& scale2, const at::Tensor& crow2,
                            const at::Tensor& col2, const std::optional<at::Tensor>& bias2,
                            const std::string& activation) {
  check_x(x);
  const Activation act = parse_activation(activation);
  at::Tensor b1, b2;
  const Layer l1 = make_layer(packed1, comp1, scale1, crow1, col1, bias1, x.size(1), "W1", b1);
  const int64_t bm1 = packed1.size(2), bm2 = packed2.size(2);
  const Layer l2 = make_layer(packed2, comp2, scale2, crow2, col2, bias2,
                              (crow1.numel() - 1) * bm1, "W2", b2);
  return run_ffn_int8(x, l1, bm1, nullptr, act, l2, bm2, packed1.numel() + packed2.numel());
}

// out = (act(x Wg^T + bg) * (x Wu^T + bu)) Wd^T + bd: per row exactly bsr_linear_int8(w8a8)
// of gate and up -> act(gate) * up in fp32 -> bsr_linear_int8(w8a8) of down.
at::Tensor bsr_gated_ffn_int8_cpu(
    const at::Tensor& x, const at::Tensor& packed_g, const at::Tensor& comp_g,
    const at::Tensor& scale_g, const at::Tensor& crow_g, const at::Tensor& col_g,
    const std::optional<at::Tensor>& bias_g, const at::Tensor& packed_u,
    const at::Tensor& comp_u, const at::Tensor& scale_u, const at::Tensor& crow_u,
    const at::Tensor& col_u, const std::optional<at::Tensor>& bias_u,
    const at::Tensor& packed_d, const at::Tensor& comp_d, const at::Tensor& scale_d,
    const at::Tensor& crow_d, const at::Tensor& col_d, const std::optional<at::Tensor>& bias_d,
    const std::string& activation) {
  check_x(x);
  const Activation act = parse_activation(activation);
  at::Tensor bg, bu, bd;
  const Layer g = make_layer(packed_g, comp_g, scale_g, crow_g, col_g, bias_g, x.size(1), "gate", bg);
  const Layer u = make_layer(packed_u, comp_u, scale_u, crow_u, col_u, bias_u, x.size(1), "up", bu);
  const int64_t bm1 = packed_g.size(2), bm2 = packed_d.size(2);
  TORCH_CHECK(packed_u.size(2) == bm1 && packed_u.size(1) == packed_g.size(1) &&
                  crow_u.numel() == crow_g.numel(),
              "sparsekernels: gate and up must have the same shape and block size, got ",
              (crow_g.numel() - 1) * bm1, " outputs in ", bm1, "-row blocks and ",
              (crow_u.numel() - 1) * packed_u.size(2), " in ", packed_u.size(2), "-row blocks");
  const Layer d = make_layer(packed_d, comp_d, scale_d, crow_d, col_d, bias_d,
                             (crow_g.numel() - 1) * bm1, "down", bd);
  return run_ffn_int8(x, g, bm1, &u, act, d, bm2,
                      packed_g.numel() + packed_u.numel() + packed_d.numel());
}

}  // namespace
}  // namespace lowp

at::Tensor int8_ffn_add_norm_inference(
    const at::Tensor& x, const at::Tensor& packed1, const at::Tensor& comp1,
    const at::Tensor& scale1, const at::Tensor& crow1, const at::Tensor& col1,
    const std::optional<at::Tensor>& bias1, const at::Tensor& packed2, const at::Tensor& comp2,
    const at::Tensor& scale2, const at::Tensor& crow2, const at::Tensor& col2,
    const std::optional<at::Tensor>& bias2, const std::string& activation, int64_t in_features,
    const at::Tensor& residual, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& norm_bias, double eps) {
  if (x.dim() < 1 || x.size(-1) != in_features || !x.device().is_cpu() ||
      (x.scalar_type() != at::kFloat && x.scalar_type() != at::kBFloat16))
    return at::Tensor();
  const at::Tensor x2 = x.reshape({-1, in_features});
  lowp::check_x(x2);
  const Activation act = parse_activation(activation);
  at::Tensor b1, b2;
  const lowp::Layer l1 = lowp::make_layer(packed1, comp1, scale1, crow1, col1, bias1,
                                          in_features, "W1", b1);
  const int64_t bm1 = packed1.size(2), bm2 = packed2.size(2);
  const lowp::Layer l2 = lowp::make_layer(packed2, comp2, scale2, crow2, col2, bias2,
                                          (crow1.numel() - 1) * bm1, "W2", b2);
  const int64_t n2 = (crow2.numel() - 1) * bm2;
  if (!residual_fits(residual, x, n2)) return at::Tensor();
  const AddNormArgs a = add_norm_args(residual, weight, norm_bias, eps, x2.size(0), n2,
                                      x.scalar_type(), "int8 FFN + add_layer_norm");
  return with_leading_dims(x, lowp::run_ffn_int8(x2, l1, bm1, nullptr, act, l2, bm2,
                                                 packed1.numel() + packed2.numel(),
                                                 &a.epilogue));
}

}  // namespace cpu
}  // namespace sparsekernels

TORCH_LIBRARY_FRAGMENT(sparsekernels_C, m) {
  m.def("bsr_ffn_int8_cpu(Tensor x, Tensor packed1, Tensor comp1, Tensor scale1, Tensor crow1, "
        "Tensor col1, Tensor? bias1, Tensor packed2, Tensor comp2, Tensor scale2, Tensor crow2, "
        "Tensor col2, Tensor? bias2, str activation) -> Tensor",
        &sparsekernels::cpu::lowp::bsr_ffn_int8_cpu);
  m.def("bsr_gated_ffn_int8_cpu(Tensor x, Tensor packed_g, Tensor comp_g, Tensor scale_g, "
        "Tensor crow_g, Tensor col_g, Tensor? bias_g, Tensor packed_u, Tensor comp_u, "
        "Tensor scale_u, Tensor crow_u, Tensor col_u, Tensor? bias_u, Tensor packed_d, "
        "Tensor comp_d, Tensor scale_d, Tensor crow_d, Tensor col_d, Tensor? bias_d, "
        "str activation) -> Tensor",
        &sparsekernels::cpu::lowp::bsr_gated_ffn_int8_cpu);
}
