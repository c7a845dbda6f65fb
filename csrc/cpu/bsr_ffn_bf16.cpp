// bsr_ffn and bsr_gated_ffn in bf16 on CPUs with AVX-512 BF16, one engine for both:
//   plain  out = act(x @ W1.T + b1) @ W2.T + b2
//   gated  out = (act(x @ Wg.T + bg) * (x @ Wu.T + bu)) @ Wd.T + bd
// bf16 inputs and weights, fp32 accumulation, and the [T, N1] intermediate in fp32 where it
// gets its bias, activation (and up product), rounded to bf16 once (what an unfused bf16 FFN
// feeds its last layer) and multiplied by the last weight. Two schedules, as ffn.h's:
//   row chunks  (many rows) each thread takes whole rows through every layer, a chunk at a
//               time, its intermediate rows in buffers of its own;
//   split units (fewer rows than a register tile per thread: decode) the threads split the
//               hidden block columns, then, after one barrier, the output block columns.
// Both compute every output element with the same products in the same order.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <omp.h>

#include <algorithm>
#include <vector>

#include "add_norm_rows.h"
#include "dsd.h"
#include "glue.h"
#include "lowp.h"
#include "lowp_microkernel.h"

namespace sparsekernels {
namespace cpu {
namespace lowp {

namespace {

const uint16_t* bits(const at::Tensor& t) {
  return reinterpret_cast<const uint16_t*>(t.data_ptr<at::BFloat16>());
}

// One layer as the engine reads it; `blocks` keeps the tensor the pointers read alive.
struct Layer16 {
  at::Tensor blocks, bias_f;
  const uint16_t* b = nullptr;
  bool wt = false;
  Rows s{};
  const float* bias = nullptr;
  int64_t bm = 0, bk = 0;
};

Layer16 layer16(const at::Tensor& values, const at::Tensor& crow, const at::Tensor& col,
                const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& packed,
                int64_t in_width, const char* name) {
  TORCH_CHECK(values.dim() == 3, "sparsekernels: ", name, " values must be [nnz, bm, bk], got ",
              values.sizes());
  Layer16 l;
  l.bm = values.size(1);
  l.bk = values.size(2);
  TORCH_CHECK(in_width % l.bk == 0, "sparsekernels: ", name, " reads ", in_width,
              " inputs, not a multiple of its block width ", l.bk);
  check_block_index(crow, col, values.size(0), in_width / l.bk, name);
  l.blocks = bf16_operand(values, packed, name, &l.wt);
  l.b = bits(l.blocks);
  l.s = Rows{crow.data_ptr<int32_t>(), col.data_ptr<int32_t>(), crow.numel() - 1, l.bk};
  if (bias.has_value()) {
    TORCH_CHECK(bias->numel() == l.s.n_out * l.bm, "sparsekernels: ", name, " bias has ",
                bias->numel(), " values for ", l.s.n_out * l.bm, " outputs");
    l.bias_f = bias->to(at::kFloat).contiguous();
    l.bias = l.bias_f.data_ptr<float>();
  }
  return l;
}

#ifdef SK_LOWP_X86
// Output block columns [o0, o1) of w for rows of A (written at their own columns of out);
// `fma`: the call has at most kStoredRows rows (decided per call, not per chunk, so a row's
// result never depends on how the rows were split).
// `pairs`: where the stored blocks go in the pair layout for the calling thread's later row
// chunks (each column paired into it at its blocks' own offset, then multiplied from there);
// nullptr: paired per column into a scratch of their own (column_pairs).
// `Act`: applied to the fp32 sums before they are stored (see block_bf16_avx512).
template <int BO, typename OutT, Activation Act = Activation::kNone>
void columns(const Layer16& w, const uint16_t* A, int64_t rows, int64_t lda, int64_t o0,
             int64_t o1, OutT* out, int64_t ldo, bool fma, uint16_t* pairs = nullptr) {
  const int64_t per = w.bk * BO;
  for (int64_t o = o0; o < o1; ++o) {
    if (w.wt && !fma && pairs != nullptr) {
      const int64_t e0 = w.s.ptr[o];
      to_pairs<BO>(w.b + e0 * per, w.s.ptr[o + 1] - e0, w.bk, pairs + e0 * per);
      block_bf16_avx512<BO, OutT, false, Act>(A, rows, lda, pairs, w.s, o, w.bias, out, ldo);
    } else if (w.wt && fma)
      block_bf16_avx512<BO, OutT, true, Act>(A, rows, lda, w.b, w.s, o, w.bias, out, ldo);
    else if (w.wt)
      block_bf16_wt_avx512<BO, OutT, Act>(A, rows, lda, w.b, w.s, o, w.bias, out, ldo);
    else
      block_bf16_avx512<BO, OutT, false, Act>(A, rows, lda, w.b, w.s, o, w.bias, out, ldo);
  }
}

// The intermediate's block columns [o0, o1) for rows of X: act(first) (* up), rounded to
// bf16 into hb; h and u are fp32 scratch with hb's row stride n1.
template <int BO1>
void hidden(const Layer16& w1, const Layer16* up, Activation act, const uint16_t* X,
            int64_t rows, int64_t ldx, int64_t o0, int64_t o1, float* h, float* u, uint16_t* hb,
            int64_t n1, bool fma, uint16_t* pairs1 = nullptr, uint16_t* pairs_up = nullptr) {
  if (o1 <= o0 || rows == 0) return;
  const int64_t c0 = o0 * BO1, width = (o1 - o0) * BO1;
  if (!up && has_act16(act)) {  // bias, activation and rounding on the tiles' registers
    if (act == Activation::kGelu)
      columns<BO1, uint16_t, Activation::kGelu>(w1, X, rows, ldx, o0, o1, hb, n1, fma, pairs1);
    else if (act == Activation::kRelu)
      columns<BO1, uint16_t, Activation::kRelu>(w1, X, rows, ldx, o0, o1, hb, n1, fma, pairs1);
    else
      columns<BO1, uint16_t>(w1, X, rows, ldx, o0, o1, hb, n1, fma, pairs1);
    return;
  }
  columns<BO1, float>(w1, X, rows, ldx, o0, o1, h, n1, fma, pairs1);
  cpu::activate(h + c0, rows, width, n1, act, at::kFloat);
  if (up) columns<BO1, float>(*up, X, rows, ldx, o0, o1, u, n1, fma, pairs_up);
  for (int64_t t = 0; t < rows; ++t) {
    float* hr = h + t * n1 + c0;
    if (up) {
      const float* ur = u + t * n1 + c0;
      for (int64_t j = 0; j < width; ++j) hr[j] *= ur[j];  // one rounding, as torch's mul
    }
    to_bf16(hr, hb + t * n1 + c0, width);
  }
}

// The most a thread keeps of a layer's blocks paired for its later row chunks: each thread
// holds its own copy for as long as it lives (larger layers pair per chunk, as before).
constexpr int64_t kPairedBytes = int64_t{8} << 20;

template <int BO1, int BO2>
void ffn16(const uint16_t* X, int64_t rows, int64_t ldx, const Layer16& w1, const Layer16* up,
           Activation act, const Layer16& w2, uint16_t* out, int64_t ldo, const AddNorm* an) {
  constexpr int64_t q = std::max(tile_rows<BO1>(), tile_rows<BO2>());
  const int64_t n1 = w1.s.n_out * BO1;
  const int64_t nt = at::get_num_threads();
  const bool fma = rows <= kStoredRows;
  if (rows < nt * q) {  // split units: each weight read once per call
    std::vector<float> h(rows * n1), u(up ? rows * n1 : 0);
    std::vector<uint16_t> hb(rows * n1);
    std::vector<int32_t> both;  // hidden columns split by the stored blocks of both layers
    const int32_t* ptr1 = w1.s.ptr;
    if (up) {
      both.resize(w1.s.n_out + 1);
      for (int64_t o = 0; o <= w1.s.n_out; ++o) both[o] = w1.s.ptr[o] + up->s.ptr[o];
      ptr1 = both.data();
    }
#pragma omp parallel num_threads(nt)
    {
      const int64_t n = omp_get_num_threads(), tid = omp_get_thread_num();
      int64_t o0, o1;
      split_stored(ptr1, w1.s.n_out, n, tid, &o0, &o1);
      hidden<BO1>(w1, up, act, X, rows, ldx, o0, o1, h.data(), up ? u.data() : nullptr,
                  hb.data(), n1, fma);
#pragma omp barrier
      int64_t p0, p1;
      split_stored(w2.s.ptr, w2.s.n_out, n, tid, &p0, &p1);
      columns<BO2, uint16_t>(w2, hb.data(), rows, n1, p0, p1, out, ldo, fma);
    }
    if (an) apply_add_norm_all<uint16_t>(*an, out, rows, ldo);
    return;
  }
  // rows per chunk: about half the weight bytes per intermediate row's bytes (bsr_ffn.cpp),
  // and the chunk's fp32 scratch (h, and u when gated) about an L2's worth
  const int64_t weight_bytes = 2 * w1.bk * BO1 * (w1.s.ptr[w1.s.n_out] +
                                                  (up ? up->s.ptr[up->s.n_out] : 0)) +
                               2 * w2.bk * BO2 * w2.s.ptr[w2.s.n_out];
  int64_t wanted = std::clamp<int64_t>(weight_bytes / (2 * 6 * std::max<int64_t>(1, n1)), 48, 192);
  if (up) wanted = std::max<int64_t>(q, std::min(wanted, (int64_t{1} << 20) / (10 * n1)));
  // stored blocks a thread may pair once for its later row chunks (see below)
  const bool may_pair = w1.wt && !fma && weight_bytes <= kPairedBytes;
  for_row_chunks(rows, q, wanted, [&](int64_t t0, int64_t rc, int64_t mc) {
    // one set of buffers per thread, reused across calls (no page faults per chunk)
    thread_local std::vector<float> h, u;
    thread_local std::vector<uint16_t> hb;
    if (h.size() < static_cast<size_t>(mc * n1)) {
      h.resize(mc * n1);
      hb.resize(mc * n1);
    }
    if (up && u.size() < static_cast<size_t>(mc * n1)) u.resize(mc * n1);
    // A thread with several chunks pairs the stored blocks once: its first chunk into
    // buffers it keeps, which its later chunks read as packed blocks. (Pairing per chunk
    // repeats the work per chunk; pairing the whole layer in a pass of its own reads every
    // weight from memory twice.)
    const int64_t n_th = omp_get_num_threads(), tid = omp_get_thread_num();
    const int64_t r0 = rows * tid / n_th, r1 = rows * (tid + 1) / n_th;
    if (!may_pair || r1 - r0 <= mc) {
      hidden<BO1>(w1, up, act, X + t0 * ldx, rc, ldx, 0, w1.s.n_out, h.data(), u.data(),
                  hb.data(), n1, fma);
      columns<BO2, uint16_t>(w2, hb.data(), rc, n1, 0, w2.s.n_out, out + t0 * ldo, ldo, fma);
      if (an) apply_add_norm<uint16_t>(*an, out, ldo, t0, t0 + rc);
      return;
    }
    thread_local std::vector<uint16_t> pairs1, pairs_up, pairs2;
    auto paired = [&](const Layer16& w, int64_t bo, std::vector<uint16_t>& buf) {
      if (!w.wt) return w;  // packed by the caller: nothing to pair
      const size_t need = static_cast<size_t>(w.s.ptr[w.s.n_out]) * w.bk * bo;
      if (buf.size() < need) buf.resize(need);
      Layer16 p = w;
      p.b = buf.data();
      p.wt = false;
      return p;
    };
    const Layer16 p1 = paired(w1, BO1, pairs1), p2 = paired(w2, BO2, pairs2);
    const Layer16 pu = up ? paired(*up, BO1, pairs_up) : Layer16{};
    if (t0 == r0) {  // the first chunk: pair while multiplying
      hidden<BO1>(w1, up, act, X + t0 * ldx, rc, ldx, 0, w1.s.n_out, h.data(), u.data(),
                  hb.data(), n1, fma, pairs1.data(), up ? pairs_up.data() : nullptr);
      columns<BO2, uint16_t>(w2, hb.data(), rc, n1, 0, w2.s.n_out, out + t0 * ldo, ldo, fma,
                             pairs2.data());
    } else {
      hidden<BO1>(p1, up ? &pu : nullptr, act, X + t0 * ldx, rc, ldx, 0, p1.s.n_out, h.data(),
                  u.data(), hb.data(), n1, fma);
      columns<BO2, uint16_t>(p2, hb.data(), rc, n1, 0, p2.s.n_out, out + t0 * ldo, ldo, fma);
    }
    if (an) apply_add_norm<uint16_t>(*an, out, ldo, t0, t0 + rc);
  });
}
#endif

at::Tensor run16(const at::Tensor& x, const Layer16& w1, const Layer16* up, const Layer16& w2,
                 Activation act, const AddNorm* an = nullptr) {
  const int64_t n2 = w2.s.n_out * w2.bm;
  at::Tensor out = at::empty({x.size(0), n2}, x.options().dtype(at::kBFloat16));
  if (x.size(0) == 0 || n2 == 0) return out;
  const int64_t ldx = x.size(0) > 1 ? x.stride(0) : x.size(1);
#ifdef SK_LOWP_X86
  dispatch_block(w1.bm, [&](auto bo1) {
    dispatch_block(w2.bm, [&](auto bo2) {
      ffn16<decltype(bo1)::value, decltype(bo2)::value>(
          bits(x), x.size(0), ldx, w1, up, act, w2,
          reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>()), n2, an);
    });
  });
#else
  TORCH_CHECK(false, "sparsekernels: the bf16 FFN kernels need an x86 CPU with AVX-512 BF16");
#endif
  return out;
}

}  // namespace

at::Tensor bsr_ffn_bf16(const at::Tensor& x, const at::Tensor& values1, const at::Tensor& crow1,
                        const at::Tensor& col1, const std::optional<at::Tensor>& bias1,
                        const at::Tensor& values2, const at::Tensor& crow2, const at::Tensor& col2,
                        const std::optional<at::Tensor>& bias2, const std::string& activation,
                        const std::optional<at::Tensor>& packed1,
                        const std::optional<at::Tensor>& packed2, const AddNorm* an) {
  const Activation act = parse_activation(activation);
  const Layer16 w1 = layer16(values1, crow1, col1, bias1, packed1, x.size(1), "W1");
  const Layer16 w2 = layer16(values2, crow2, col2, bias2, packed2, w1.s.n_out * w1.bm, "W2");
  return run16(x, w1, nullptr, w2, act, an);
}

at::Tensor bsr_gated_ffn_bf16(
    const at::Tensor& x, const at::Tensor& values_g, const at::Tensor& crow_g,
    const at::Tensor& col_g, const std::optional<at::Tensor>& bias_g, const at::Tensor& values_u,
    const at::Tensor& crow_u, const at::Tensor& col_u, const std::optional<at::Tensor>& bias_u,
    const at::Tensor& values_d, const at::Tensor& crow_d, const at::Tensor& col_d,
    const std::optional<at::Tensor>& bias_d, const std::string& activation,
    const std::optional<at::Tensor>& packed_g, const std::optional<at::Tensor>& packed_u,
    const std::optional<at::Tensor>& packed_d) {
  const Activation act = parse_activation(activation);
  const Layer16 g = layer16(values_g, crow_g, col_g, bias_g, packed_g, x.size(1), "gate");
  const Layer16 u = layer16(values_u, crow_u, col_u, bias_u, packed_u, x.size(1), "up");
  TORCH_CHECK(g.bm == u.bm && g.bk == u.bk && g.s.n_out == u.s.n_out,
              "sparsekernels: gate and up must have the same shape and block size, got ",
              g.s.n_out * g.bm, " outputs in ", g.bm, "x", g.bk, " blocks and ",
              u.s.n_out * u.bm, " in ", u.bm, "x", u.bk);
  const Layer16 d = layer16(values_d, crow_d, col_d, bias_d, packed_d, g.s.n_out * g.bm, "down");
  return run16(x, g, &u, d, act);
}

}  // namespace lowp
}  // namespace cpu
}  // namespace sparsekernels
