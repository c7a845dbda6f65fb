// Quantized block-sparse Linear on the CPU: int8 blocks with one fp32 scale per output
// channel (symmetric), y = x @ (scale * Wq).T + bias, in two kernels:
//   w8    weight-only: float activations (fp32 or bf16) times int8 weights converted in
//         registers; for decode (a few tokens), where reading the weights is the cost and
//         int8 reads a quarter of fp32's bytes;
//   w8a8  activations quantized per row (dynamic, affine: u8 codes with a zero point) and
//         multiplied in int8 with
//         int32 accumulation (vpdpbusd, four products per lane: four times the fp32 rate),
//         for prefill and encoders.
// Both read one packed layout, [nnz, bk/4, bm, 4] (pack below), so a layer caches one copy.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <string>
#include <tuple>
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

// (packed blocks [nnz, bk/4, bm, 4], comp [N] = row sums of the stored int8 weights: the
// zero-point compensation, zero[t] * comp[n])
std::tuple<at::Tensor, at::Tensor> bsr_pack_int8_cpu(const at::Tensor& values,
                                                     const at::Tensor& crow) {
  TORCH_CHECK(values.dim() == 3 && values.scalar_type() == at::kChar && values.device().is_cpu(),
              "sparsekernels: int8 values must be an int8 CPU tensor [nnz, bm, bk], got ",
              values.scalar_type(), " ", values.sizes(), " on ", values.device());
  check_index(crow, "crow_indices");
  const int64_t nnz = values.size(0), bm = values.size(1), bk = values.size(2);
  TORCH_CHECK(bk % 4 == 0, "sparsekernels: int8 blocks need a width divisible by 4, got ", bk);
  const int64_t nbr = crow.numel() - 1;
  const int32_t* c = crow.data_ptr<int32_t>();
  TORCH_CHECK(nbr >= 0 && c[0] == 0 && c[nbr] == nnz, "sparsekernels: crow_indices must run ",
              "from 0 to the number of stored blocks (", nnz, ")");
  const at::Tensor packed = values.reshape({nnz, bm, bk / 4, 4}).permute({0, 2, 1, 3}).contiguous();
  const at::Tensor sums = values.to(at::kInt).sum(2).to(at::kInt).contiguous();  // [nnz, bm]
  at::Tensor comp = at::zeros({nbr * bm}, values.options().dtype(at::kInt));
  const int32_t* sp = sums.data_ptr<int32_t>();
  int32_t* cp = comp.data_ptr<int32_t>();
  for (int64_t i = 0; i < nbr; ++i) {
    TORCH_CHECK(c[i] <= c[i + 1], "sparsekernels: crow_indices decrease at ", i);
    for (int32_t e = c[i]; e < c[i + 1]; ++e)
      for (int64_t n = 0; n < bm; ++n) cp[i * bm + n] += sp[e * bm + n];
  }
  return {packed, comp};
}

template <typename OutT>
OutT* out_ptr(at::Tensor& out) {
  if constexpr (std::is_same_v<OutT, float>) return out.data_ptr<float>();
  else return reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>());
}

}  // namespace

// Shared with bsr_ffn_int8.cpp: the checks of one quantized layer's operands.
void check_int8_layer(const at::Tensor& packed, const at::Tensor& comp, const at::Tensor& scale,
                      const at::Tensor& crow, const at::Tensor& col,
                      const std::optional<at::Tensor>& bias, int64_t in_features,
                      const char* name) {
  TORCH_CHECK(packed.dim() == 4 && packed.size(3) == 4 && packed.scalar_type() == at::kChar &&
                  packed.is_contiguous() && packed.device().is_cpu(),
              "sparsekernels: ", name, " packed must be a contiguous int8 CPU tensor [nnz, bk/4, ",
              "bm, 4] (sparsekernels.ops.bsr_linear_int8.pack), got ", packed.scalar_type(), " ",
              packed.sizes());
  const int64_t nnz = packed.size(0), bk = packed.size(1) * 4, bm = packed.size(2);
  const int64_t n = (crow.numel() - 1) * bm;
  TORCH_CHECK(in_features % bk == 0, "sparsekernels: ", name, " reads ", in_features,
              " inputs, not a multiple of its block width ", bk);
  check_block_index(crow, col, nnz, in_features / bk, name);
  TORCH_CHECK(comp.scalar_type() == at::kInt && comp.dim() == 1 && comp.numel() == n &&
                  comp.is_contiguous(),
              "sparsekernels: ", name, " comp must be int32 [", n, "] (made by pack), got ",
              comp.scalar_type(), " ", comp.sizes());
  TORCH_CHECK(scale.scalar_type() == at::kFloat && scale.dim() == 1 && scale.numel() == n &&
                  scale.is_contiguous(),
              "sparsekernels: ", name, " scale must be float32 [", n, "], got ",
              scale.scalar_type(), " ", scale.sizes());
  if (bias.has_value())
    TORCH_CHECK(bias->dim() == 1 && bias->numel() == n, "sparsekernels: ", name,
                " bias must have ", n, " elements, got ", bias->sizes());
}

// The w8a8 path's dynamic quantization of x [rows, k] (contiguous, float32 or bfloat16): u8
// codes [rows, k], one scale (float32) and zero point (int32) per row. It depends on x alone,
// so layers that read one input (an attention's q, k and v) can share it.
std::tuple<at::Tensor, at::Tensor, at::Tensor> quantize_activations(const at::Tensor& xc) {
  const int64_t rows = xc.size(0), k = xc.size(1);
  at::Tensor q = at::empty({rows, k}, xc.options().dtype(at::kByte));
  at::Tensor xs = at::empty({rows}, xc.options().dtype(at::kFloat));
  at::Tensor xz = at::empty({rows}, xc.options().dtype(at::kInt));
  uint8_t* qp = q.data_ptr<uint8_t>();
  float* sp = xs.data_ptr<float>();
  int32_t* zp = xz.data_ptr<int32_t>();
  const bool bf16 = xc.scalar_type() == at::kBFloat16;
  at::parallel_for(0, rows, 16, [&](int64_t r0, int64_t r1) {
    if (bf16) {
      quantize_rows<uint16_t>(
          reinterpret_cast<const uint16_t*>(xc.data_ptr<at::BFloat16>()) + r0 * k, k, r1 - r0,
          k, qp + r0 * k, sp + r0, zp + r0);
    } else {
      quantize_rows<float>(xc.data_ptr<float>() + r0 * k, k, r1 - r0, k, qp + r0 * k, sp + r0,
                           zp + r0);
    }
  });
  return {q, xs, xz};
}

namespace {

// One quantized layer's operands, checked (check_int8_layer, for inputs k wide, and the output
// dtype), as the kernels read them; bias holds the float32 copy ep points into.
struct CheckedLayer {
  at::Tensor bias;
  Rows s;
  Int8Epilogue ep;
};

CheckedLayer checked_layer(const at::Tensor& packed, const at::Tensor& comp,
                           const at::Tensor& scale, const at::Tensor& crow, const at::Tensor& col,
                           const std::optional<at::Tensor>& bias, int64_t k,
                           at::ScalarType out_type) {
  TORCH_CHECK(out_type == at::kFloat || out_type == at::kBFloat16,
              "sparsekernels: int8 layers write float32 or bfloat16 outputs, not ", out_type);
  check_int8_layer(packed, comp, scale, crow, col, bias, k, "W");
  CheckedLayer l;
  if (bias.has_value()) l.bias = bias->to(at::kFloat).contiguous();
  l.s = Rows{crow.data_ptr<int32_t>(), col.data_ptr<int32_t>(), crow.numel() - 1,
             packed.size(1) * 4};
  l.ep = Int8Epilogue{comp.data_ptr<int32_t>(), scale.data_ptr<float>(), nullptr,
                      l.bias.defined() ? l.bias.data_ptr<float>() : nullptr, nullptr};
  return l;
}

// The w8a8 product on quantized rows (q [rows, k] u8 contiguous, xs / xz [rows]) with the
// layer's operands checked by the caller.
at::Tensor run_w8a8(const at::Tensor& q, const at::Tensor& xs, const at::Tensor& xz,
                    const at::Tensor& packed, const Int8Epilogue& ep, const Rows& s,
                    const AddNorm* an, at::ScalarType out_type) {
  const int64_t rows = q.size(0), k = q.size(1), bm = packed.size(2), n = s.n_out * bm;
  at::Tensor out = at::empty({rows, n}, q.options().dtype(out_type));
  if (rows == 0 || n == 0) return out;
  const uint8_t* qp = q.data_ptr<uint8_t>();
  const float* sp = xs.data_ptr<float>();
  const int32_t* zp = xz.data_ptr<int32_t>();
  const int8_t* pp = packed.data_ptr<int8_t>();
  dispatch_block(bm, [&](auto bo) {
    constexpr int BO = decltype(bo)::value;
    const int64_t mc = chunk_rows(s, BO, tile_rows<BO>(), 8e6, rows);
    auto run = [&](auto out_tag) {
      using OutT = decltype(out_tag);
      OutT* op = out_ptr<OutT>(out);
      for_items_add_norm(rows, mc, s.n_out, an, op, n, [&](int64_t t0, int64_t t1, int64_t o) {
        Int8Epilogue e = ep;
        e.xscale = sp + t0;
        e.xzero = zp + t0;
        block_u8s8<BO, OutT>(qp + t0 * k, t1 - t0, k, pp, s, o, e, op + t0 * n, n);
      });
    };
    if (out_type == at::kBFloat16) run(uint16_t{});
    else run(float{});
  });
  return out;
}

}  // namespace

// The layer of linear_int8 (below) on rows quantize_activations made: q [rows, k] u8, xs and
// xz [rows], checked here (they may come from a caller's cache).
at::Tensor linear_w8a8(const at::Tensor& q, const at::Tensor& xs, const at::Tensor& xz,
                       const at::Tensor& packed, const at::Tensor& comp, const at::Tensor& scale,
                       const at::Tensor& crow, const at::Tensor& col,
                       const std::optional<at::Tensor>& bias, at::ScalarType out_type) {
  TORCH_CHECK(q.dim() == 2 && q.scalar_type() == at::kByte && q.is_contiguous() &&
                  q.device().is_cpu(),
              "sparsekernels: quantized rows must be a contiguous uint8 CPU tensor [rows, k] "
              "(from int8_quantize_rows), got ", q.scalar_type(), " ", q.sizes());
  const int64_t rows = q.size(0);
  for (const at::Tensor* t : {&xs, &xz})
    TORCH_CHECK(t->dim() == 1 && t->numel() == rows && t->is_contiguous() &&
                    t->device().is_cpu() &&
                    t->scalar_type() == (t == &xs ? at::kFloat : at::kInt),
                "sparsekernels: quantized rows need ", rows, " ", t == &xs ? "float32 scales"
                : "int32 zero points", " (from int8_quantize_rows), got ", t->scalar_type(), " ",
                t->sizes());
  const CheckedLayer l = checked_layer(packed, comp, scale, crow, col, bias, q.size(1), out_type);
  return run_w8a8(q, xs, xz, packed, l.ep, l.s, nullptr, out_type);
}

// bsr_linear_int8_cpu with its output in out_type (float32 or bfloat16, either input dtype),
// and out = layer_norm(out + residual) as its epilogue when `an` is given (its residual:
// [rows, n] in out_type, checked by the caller).
at::Tensor linear_int8(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& comp,
                       const at::Tensor& scale, const at::Tensor& crow, const at::Tensor& col,
                       const std::optional<at::Tensor>& bias, const std::string& scheme,
                       const AddNorm* an, at::ScalarType out_type) {
  check_rows(x, "x");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16,
              "sparsekernels: int8 layers take float32 or bfloat16 inputs, got ", x.scalar_type());
  TORCH_CHECK(scheme == "w8" || scheme == "w8a8", "sparsekernels: unknown int8 scheme '", scheme,
              "'; use w8 (weight-only) or w8a8 (dynamic int8 activations)");
  const CheckedLayer l = checked_layer(packed, comp, scale, crow, col, bias, x.size(1), out_type);
  const Rows& s = l.s;
  const Int8Epilogue& ep = l.ep;
  const int64_t rows = x.size(0), k = x.size(1), bm = packed.size(2), n = s.n_out * bm;
  if (scheme == "w8a8") {
    const auto [q, xs, xz] = quantize_activations(x.contiguous());
    return run_w8a8(q, xs, xz, packed, ep, s, an, out_type);
  }
  at::Tensor out = at::empty({rows, n}, x.options().dtype(out_type));
  if (rows == 0 || n == 0) return out;
  const int8_t* pp = packed.data_ptr<int8_t>();
  const bool bf16 = x.scalar_type() == at::kBFloat16, out_bf16 = out_type == at::kBFloat16;
  // w8: float rows (bf16 rows are widened once: a few rows, the weights dominate)
  const at::Tensor xf = bf16 ? x.to(at::kFloat).contiguous() : x;
  const int64_t lda = rows > 1 ? xf.stride(0) : k;
  const float* xp = xf.data_ptr<float>();
  dispatch_block(bm, [&](auto bo) {
    constexpr int BO = decltype(bo)::value;
    const int64_t mc = chunk_rows(s, BO, 6, 2e6, rows);
    auto run = [&](auto out_tag) {
      using OutT = decltype(out_tag);
      OutT* op = out_ptr<OutT>(out);
      for_items_add_norm(rows, mc, s.n_out, an, op, n, [&](int64_t t0, int64_t t1, int64_t o) {
        block_w8<BO, OutT>(xp + t0 * lda, t1 - t0, lda, pp, s, o, ep, op + t0 * n, n);
      });
    };
    if (out_bf16) run(uint16_t{});
    else run(float{});
  });
  return out;
}

at::Tensor bsr_linear_int8_cpu(const at::Tensor& x, const at::Tensor& packed,
                               const at::Tensor& comp, const at::Tensor& scale,
                               const at::Tensor& crow, const at::Tensor& col,
                               const std::optional<at::Tensor>& bias, const std::string& scheme) {
  return linear_int8(x, packed, comp, scale, crow, col, bias, scheme, nullptr, x.scalar_type());
}

}  // namespace lowp

at::Tensor int8_linear_inference(const at::Tensor& x, const at::Tensor& packed,
                                 const at::Tensor& comp, const at::Tensor& scale,
                                 const at::Tensor& crow_indices, const at::Tensor& col_indices,
                                 const std::optional<at::Tensor>& bias, const std::string& scheme,
                                 int64_t in_features, int64_t w8_max_rows,
                                 std::optional<at::ScalarType> out_dtype) {
  if (x.dim() < 1 || x.size(-1) != in_features || !x.device().is_cpu() ||
      (x.scalar_type() != at::kFloat && x.scalar_type() != at::kBFloat16))
    return at::Tensor();
  at::Tensor x2 = x.reshape({-1, in_features});
  if (x2.size(0) > 1 && x2.stride(1) != 1) x2 = x2.contiguous();
  const std::string chosen = scheme == "auto" ? (x2.size(0) <= w8_max_rows ? "w8" : "w8a8") : scheme;
  return with_leading_dims(x, lowp::linear_int8(x2, packed, comp, scale, crow_indices,
                                                col_indices, bias, chosen, nullptr,
                                                out_dtype.value_or(x.scalar_type())));
}

std::vector<at::Tensor> int8_quantize_rows(const at::Tensor& x, int64_t in_features) {
  if (x.dim() < 1 || x.size(-1) != in_features || in_features <= 0 || !x.device().is_cpu() ||
      (x.scalar_type() != at::kFloat && x.scalar_type() != at::kBFloat16))
    return {};
  const auto [q, xs, xz] = lowp::quantize_activations(x.reshape({-1, in_features}).contiguous());
  return {q, xs, xz};
}

at::Tensor int8_linear_quantized_inference(
    const at::Tensor& x, const at::Tensor& q, const at::Tensor& xs, const at::Tensor& xz,
    const at::Tensor& packed, const at::Tensor& comp, const at::Tensor& scale,
    const at::Tensor& crow_indices, const at::Tensor& col_indices,
    const std::optional<at::Tensor>& bias, int64_t in_features,
    std::optional<at::ScalarType> out_dtype) {
  if (x.dim() < 1 || x.size(-1) != in_features || in_features <= 0 || !x.device().is_cpu() ||
      (x.scalar_type() != at::kFloat && x.scalar_type() != at::kBFloat16))
    return at::Tensor();
  TORCH_CHECK(q.dim() == 2 && q.size(0) == x.numel() / in_features && q.size(1) == in_features,
              "sparsekernels: quantized rows [", q.sizes(), "] are not x's rows [",
              x.numel() / in_features, ", ", in_features, "]");
  return with_leading_dims(x, lowp::linear_w8a8(q, xs, xz, packed, comp, scale, crow_indices,
                                                col_indices, bias,
                                                out_dtype.value_or(x.scalar_type())));
}

at::Tensor int8_linear_add_norm_inference(
    const at::Tensor& x, const at::Tensor& packed, const at::Tensor& comp, const at::Tensor& scale,
    const at::Tensor& crow_indices, const at::Tensor& col_indices,
    const std::optional<at::Tensor>& bias, const std::string& scheme, int64_t in_features,
    int64_t w8_max_rows, const at::Tensor& residual, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& norm_bias, double eps,
    std::optional<at::ScalarType> out_dtype) {
  if (x.dim() < 1 || x.size(-1) != in_features || !x.device().is_cpu() ||
      (x.scalar_type() != at::kFloat && x.scalar_type() != at::kBFloat16))
    return at::Tensor();
  if (packed.dim() != 4) return at::Tensor();  // the op's check names the fix
  // the layer itself is checked by linear_int8 before any kernel runs
  const int64_t n = (crow_indices.numel() - 1) * packed.size(2);
  const at::ScalarType out_type = out_dtype.value_or(x.scalar_type());
  if (!residual_fits(residual, x, n, out_type)) return at::Tensor();
  at::Tensor x2 = x.reshape({-1, in_features});
  if (x2.size(0) > 1 && x2.stride(1) != 1) x2 = x2.contiguous();
  const int64_t rows = x2.size(0);
  const AddNormArgs a = add_norm_args(residual, weight, norm_bias, eps, rows, n, out_type,
                                      "int8 linear + add_layer_norm");
  const std::string chosen = scheme == "auto" ? (rows <= w8_max_rows ? "w8" : "w8a8") : scheme;
  return with_leading_dims(x, lowp::linear_int8(x2, packed, comp, scale, crow_indices,
                                                col_indices, bias, chosen, &a.epilogue, out_type));
}

}  // namespace cpu
}  // namespace sparsekernels

TORCH_LIBRARY_FRAGMENT(sparsekernels_C, m) {
  m.def("bsr_pack_int8_cpu(Tensor values, Tensor crow_indices) -> (Tensor, Tensor)",
        &sparsekernels::cpu::lowp::bsr_pack_int8_cpu);
  m.def("bsr_linear_int8_cpu(Tensor x, Tensor packed, Tensor comp, Tensor scale, "
        "Tensor crow_indices, Tensor col_indices, Tensor? bias, str scheme) -> Tensor",
        &sparsekernels::cpu::lowp::bsr_linear_int8_cpu);
}
