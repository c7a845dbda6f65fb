// Fused block-sparse FFN on the CPU: out = act(x @ W1.T + b1) @ W2.T + b2, where the
// [T, N1] intermediate never reaches memory.
//
// Why: unfused, the intermediate (T x N1 values: 25 MB for 2,048 tokens of a BERT-base FFN
// in fp32) is written by FFN1, read and written again by the activation, and read by FFN2.
// At low density that traffic and the separate activation pass cost about as much as the
// two sparse matmuls. Here each thread takes a chunk of rows, computes their intermediate
// rows into a buffer that stays in its L2 (bias and activation applied there), and at once
// multiplies them by W2. Both products run the same dsd_block as bsr_linear, so the fused
// result rounds exactly as bsr_linear -> activation -> bsr_linear does.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <omp.h>
#include <torch/library.h>

#include <algorithm>
#include <string>
#include <vector>

#include "dsd.h"
#include "glue.h"
#include "lowp.h"

namespace sparsekernels {
namespace cpu {
namespace {

enum class Activation { kNone, kGelu, kGeluTanh, kRelu };

Activation parse_activation(const std::string& name) {
  if (name == "none") return Activation::kNone;
  if (name == "gelu") return Activation::kGelu;
  if (name == "gelu_tanh") return Activation::kGeluTanh;
  if (name == "relu") return Activation::kRelu;
  TORCH_CHECK(false, "sparsekernels: unknown FFN activation '", name,
              "'; use none, gelu, gelu_tanh or relu");
}

// In place on a [rows, n] buffer. ATen's vectorised kernels run serially here: inside an
// OpenMP region at::parallel_for does not spawn threads.
void activate(at::Tensor h, Activation act) {
  switch (act) {
    case Activation::kNone: break;
    case Activation::kGelu: at::gelu_(h); break;
    case Activation::kGeluTanh: at::gelu_(h, "tanh"); break;
    case Activation::kRelu: at::relu_(h); break;
  }
}

// How many rows a thread computes at a time. Each chunk reads all stored weights once more
// (from L3 at low density), so denser weights want taller chunks: about half the weight
// bytes per intermediate row's bytes, between 48 and 192 rows (measured, BERT-base FFN,
// 2 threads: flat from 24 to 96 at density 0.1; 192 is 1.1x faster than 96 at density 1).
int64_t wanted_rows(int64_t row_bytes, int64_t weight_bytes) {
  return std::clamp<int64_t>(weight_bytes / (2 * row_bytes), 48, 192);
}

template <typename T, int BO1, int BO2>
void ffn(const T* X, int64_t rows, int64_t ldx, const T* blocks1, const SparseOperand& s1,
         const T* b1, Activation act, const T* blocks2, const SparseOperand& s2, const T* b2,
         T* out, int64_t ldo, at::ScalarType st) {
  // rows are rounded to the register tiles of both products, so only a range's last
  // chunk can have a partial tile
  constexpr int64_t q = std::max(tile_rows<T, BO1>(), tile_rows<T, BO2>());
  auto round_up = [](int64_t v) { return (v + q - 1) / q * q; };
  const int64_t n1 = s1.n_out * BO1;
  const int64_t weight_bytes = static_cast<int64_t>(sizeof(T)) *
      ((s1.ptr[s1.n_out] - s1.ptr[0]) * s1.bi * BO1 + (s2.ptr[s2.n_out] - s2.ptr[0]) * s2.bi * BO2);
  const int64_t wanted = wanted_rows(n1 * sizeof(T), weight_bytes);
#pragma omp parallel num_threads(at::get_num_threads())
  {
    // Each thread takes an equal contiguous range of rows (in whole register tiles) and
    // splits it into equal chunks: with a few chunks per thread, a dynamic schedule of
    // fixed-size chunks leaves one thread a chunk behind (10-20% at 1,024 rows).
    const int64_t nt = omp_get_num_threads(), tid = omp_get_thread_num();
    const int64_t per = round_up((rows + nt - 1) / nt);
    const int64_t r0 = std::min(rows, tid * per), r1 = std::min(rows, r0 + per);
    const int64_t pieces = std::max<int64_t>(1, (r1 - r0 + wanted - 1) / wanted);
    const int64_t mc = round_up((r1 - r0 + pieces - 1) / pieces);
    std::vector<T> buffer(r1 > r0 ? static_cast<size_t>(mc * n1) : 0);
    T* h = buffer.data();
    for (int64_t t0 = r0; t0 < r1; t0 += mc) {
      const int64_t rc = std::min(r1, t0 + mc) - t0;
      for (int64_t o = 0; o < s1.n_out; ++o)
        dsd_block<T, BO1>(X + t0 * ldx, rc, ldx, blocks1, s1, o, b1, h, n1);
      activate(at::from_blob(h, {rc, n1}, at::TensorOptions().dtype(st)), act);
      for (int64_t o = 0; o < s2.n_out; ++o)
        dsd_block<T, BO2>(h, rc, n1, blocks2, s2, o, b2, out + t0 * ldo, ldo);
    }
  }
}

void check_weight(const at::Tensor& values, const at::Tensor& crow, const at::Tensor& col,
                  const char* name) {
  TORCH_CHECK(values.dim() == 3, "sparsekernels: ", name, " values must be [nnz, bm, bk], got ",
              values.sizes());
  check_index(crow, name);
  check_index(col, name);
}

at::Tensor bsr_ffn_cpu(const at::Tensor& x, const at::Tensor& values1, const at::Tensor& crow1,
                       const at::Tensor& col1, const std::optional<at::Tensor>& bias1,
                       const at::Tensor& values2, const at::Tensor& crow2, const at::Tensor& col2,
                       const std::optional<at::Tensor>& bias2, int64_t hidden,
                       const std::string& activation, const std::optional<at::Tensor>& packed1,
                       const std::optional<at::Tensor>& packed2) {
  check_rows(x, "x");
  check_weight(values1, crow1, col1, "W1");
  check_weight(values2, crow2, col2, "W2");
  const Activation act = parse_activation(activation);
  const int64_t bm1 = values1.size(1), bk1 = values1.size(2);
  const int64_t bm2 = values2.size(1), bk2 = values2.size(2);
  const int64_t n1 = (crow1.numel() - 1) * bm1;
  const int64_t n2 = (crow2.numel() - 1) * bm2;
  TORCH_CHECK(x.size(1) % bk1 == 0, "sparsekernels: input width ", x.size(1),
              " is not a multiple of W1's block width ", bk1);
  TORCH_CHECK(hidden == n1 && n1 % bk2 == 0, "sparsekernels: W1 has ", n1,
              " outputs but W2 reads ", hidden, " inputs in blocks of ", bk2);
  if (lowp::bf16_native(x, values1) && lowp::bf16_native_values(values2))  // bsr_ffn_bf16.cpp
    return lowp::bsr_ffn_bf16(x, values1, crow1, col1, bias1, values2, crow2, col2, bias2,
                              activation, packed1, packed2);
  const auto ct = compute_type(x.scalar_type());
  const at::Tensor xc = x.scalar_type() == ct ? x : x.to(ct);
  at::Tensor bb1, bb2;
  if (bias1.has_value()) bb1 = bias1->to(ct).contiguous();
  if (bias2.has_value()) bb2 = bias2->to(ct).contiguous();
  // W.T blocks, as bsr_linear packs them: a row of the kernel's B operand is one output vector
  const at::Tensor p1 = packed_blocks(values1, ct, packed1);
  const at::Tensor p2 = packed_blocks(values2, ct, packed2);
  at::Tensor out = at::empty({x.size(0), n2}, x.options().dtype(ct));
  if (x.size(0) == 0) return out.to(x.scalar_type());
  const int64_t ldx = x.size(0) > 1 ? xc.stride(0) : x.size(1);
  const SparseOperand s1{crow1.data_ptr<int32_t>(), col1.data_ptr<int32_t>(), nullptr,
                         crow1.numel() - 1, bk1};
  const SparseOperand s2{crow2.data_ptr<int32_t>(), col2.data_ptr<int32_t>(), nullptr,
                         crow2.numel() - 1, bk2};
  dispatch_float(ct, [&](auto tag) {
    using T = decltype(tag);
    dispatch_block(bm1, [&](auto bo1) {
      dispatch_block(bm2, [&](auto bo2) {
        ffn<T, decltype(bo1)::value, decltype(bo2)::value>(
            xc.data_ptr<T>(), x.size(0), ldx, p1.data_ptr<T>(), s1,
            bb1.defined() ? bb1.data_ptr<T>() : nullptr, act, p2.data_ptr<T>(), s2,
            bb2.defined() ? bb2.data_ptr<T>() : nullptr, out.data_ptr<T>(), n2, ct);
      });
    });
  });
  return out.scalar_type() == x.scalar_type() ? out : out.to(x.scalar_type());
}

}  // namespace
}  // namespace cpu
}  // namespace sparsekernels

TORCH_LIBRARY_FRAGMENT(sparsekernels_C, m) {
  m.def("bsr_ffn_cpu(Tensor x, Tensor values1, Tensor crow1, Tensor col1, Tensor? bias1, "
        "Tensor values2, Tensor crow2, Tensor col2, Tensor? bias2, int hidden, str activation, "
        "Tensor? packed1=None, Tensor? packed2=None) -> Tensor",
        &sparsekernels::cpu::bsr_ffn_cpu);
}
