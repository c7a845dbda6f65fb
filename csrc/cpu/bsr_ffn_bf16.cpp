// bsr_ffn in bf16 on CPUs with AVX-512 BF16: act(x @ W1.T + b1) @ W2.T + b2 with bf16 inputs
// and weights, fp32 accumulation, and the [T, N1] intermediate kept in each thread's buffer
// (as bsr_ffn.cpp does in fp32): FFN1's fp32 result gets its bias and activation there, is
// rounded to bf16 once (what an unfused bf16 FFN feeds its second layer) and multiplied by W2.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <vector>

#include "glue.h"
#include "lowp.h"
#include "lowp_microkernel.h"

namespace sparsekernels {
namespace cpu {
namespace lowp {

namespace {

// The caller's packing (checked), the blocks as stored (W.T: paired per column in the kernel,
// `wt` set), or a packed copy.
at::Tensor packed_or_pack(const at::Tensor& values, const std::optional<at::Tensor>& packed,
                          const char* name, bool* wt) {
  *wt = !packed.has_value() && stored_transposed(values);
  if (*wt) return values;
  if (!packed.has_value()) return pack_bf16(values);
  const int64_t nnz = values.size(0), bm = values.size(1), bk = values.size(2);
  TORCH_CHECK(packed->dim() == 4 && packed->size(0) == nnz && packed->size(1) == bk / 2 &&
                  packed->size(2) == bm && packed->size(3) == 2 &&
                  packed->scalar_type() == at::kBFloat16 && packed->is_contiguous(),
              "sparsekernels: ", name, " must be the bf16 packing of its values [", nnz, ", ",
              bk / 2, ", ", bm, ", 2], got ", packed->sizes(), " ", packed->scalar_type());
  return *packed;
}

const uint16_t* bits(const at::Tensor& t) {
  return reinterpret_cast<const uint16_t*>(t.data_ptr<at::BFloat16>());
}

#ifdef SK_LOWP_X86
template <int BO1, int BO2>
void ffn_bf16(const uint16_t* X, int64_t rows, int64_t ldx, const uint16_t* p1, bool wt1,
              const Rows& s1, const float* b1, Activation act, const uint16_t* p2, bool wt2,
              const Rows& s2, const float* b2, uint16_t* out, int64_t ldo, int64_t wanted) {
  constexpr int64_t q = std::max(tile_rows<BO1>(), tile_rows<BO2>());
  const int64_t n1 = s1.n_out * BO1;
  for_row_chunks(rows, q, wanted, [&](int64_t t0, int64_t rc, int64_t mc) {
    // one buffer pair per thread, reused across calls (no page faults per chunk)
    thread_local std::vector<float> h;
    thread_local std::vector<uint16_t> hb;
    if (h.size() < static_cast<size_t>(mc * n1)) {
      h.resize(mc * n1);
      hb.resize(mc * n1);
    }
    for (int64_t o = 0; o < s1.n_out; ++o) {
      if (wt1)
        block_bf16_wt_avx512<BO1, float>(X + t0 * ldx, rc, ldx, p1, s1, o, b1, h.data(), n1);
      else
        block_bf16_avx512<BO1, float>(X + t0 * ldx, rc, ldx, p1, s1, o, b1, h.data(), n1);
    }
    activate(h.data(), rc, n1, act);
    to_bf16(h.data(), hb.data(), rc * n1);
    for (int64_t o = 0; o < s2.n_out; ++o) {
      if (wt2)
        block_bf16_wt_avx512<BO2, uint16_t>(hb.data(), rc, n1, p2, s2, o, b2, out + t0 * ldo,
                                            ldo);
      else
        block_bf16_avx512<BO2, uint16_t>(hb.data(), rc, n1, p2, s2, o, b2, out + t0 * ldo, ldo);
    }
  });
}
#endif

}  // namespace

at::Tensor bsr_ffn_bf16(const at::Tensor& x, const at::Tensor& values1, const at::Tensor& crow1,
                        const at::Tensor& col1, const std::optional<at::Tensor>& bias1,
                        const at::Tensor& values2, const at::Tensor& crow2, const at::Tensor& col2,
                        const std::optional<at::Tensor>& bias2, const std::string& activation,
                        const std::optional<at::Tensor>& packed1,
                        const std::optional<at::Tensor>& packed2) {
  const Activation act = parse_activation(activation);
  const int64_t bm1 = values1.size(1), bk1 = values1.size(2);
  const int64_t bm2 = values2.size(1), bk2 = values2.size(2);
  const int64_t n1 = (crow1.numel() - 1) * bm1, n2 = (crow2.numel() - 1) * bm2;
  check_block_index(crow1, col1, values1.size(0), x.size(1) / bk1, "W1");
  check_block_index(crow2, col2, values2.size(0), n1 / bk2, "W2");
  at::Tensor bb1, bb2;
  if (bias1.has_value()) bb1 = bias1->to(at::kFloat).contiguous();
  if (bias2.has_value()) bb2 = bias2->to(at::kFloat).contiguous();
  bool wt1 = false, wt2 = false;
  const at::Tensor p1 = packed_or_pack(values1, packed1, "packed1", &wt1);
  const at::Tensor p2 = packed_or_pack(values2, packed2, "packed2", &wt2);
  at::Tensor out = at::empty({x.size(0), n2}, x.options().dtype(at::kBFloat16));
  if (x.size(0) == 0) return out;
  const int64_t ldx = x.size(0) > 1 ? x.stride(0) : x.size(1);
  const Rows s1{crow1.data_ptr<int32_t>(), col1.data_ptr<int32_t>(), crow1.numel() - 1, bk1};
  const Rows s2{crow2.data_ptr<int32_t>(), col2.data_ptr<int32_t>(), crow2.numel() - 1, bk2};
  // rows per chunk: about half the weight bytes per intermediate row's bytes (bsr_ffn.cpp)
  const int64_t weight_bytes = 2 * (values1.numel() + values2.numel());
  const int64_t wanted = std::clamp<int64_t>(weight_bytes / (2 * 6 * std::max<int64_t>(1, n1)), 48, 192);
#ifdef SK_LOWP_X86
  dispatch_block(bm1, [&](auto bo1) {
    dispatch_block(bm2, [&](auto bo2) {
      ffn_bf16<decltype(bo1)::value, decltype(bo2)::value>(
          bits(x), x.size(0), ldx, bits(p1), wt1, s1,
          bb1.defined() ? bb1.data_ptr<float>() : nullptr, act, bits(p2), wt2, s2,
          bb2.defined() ? bb2.data_ptr<float>() : nullptr,
          reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>()), n2, wanted);
    });
  });
#else
  TORCH_CHECK(false, "sparsekernels: bsr_ffn_bf16 needs an x86 CPU with AVX-512 BF16");
#endif
  return out;
}

}  // namespace lowp
}  // namespace cpu
}  // namespace sparsekernels
