// Block-sparse Linear on the CPU: forward (x @ W.T + b), input gradient (g @ W) and weight
// gradient (blocks of g.T @ x), all built on one "dense x sparse -> dense" driver.
//
// Cost model (BENCH.md): the forward does 2*T*K*N*density FLOPs; the kernel keeps a
// register tile of MR tokens x one output block (about 24 vector accumulators) and walks
// only the stored blocks of that output block, so FLOPs and weight bytes shrink with the
// density while each activation element is read from L1/L2.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <omp.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "add_norm_rows.h"
#include "direct.h"
#include "dot.h"
#include "dsd.h"
#include "glue.h"
#include "lowp.h"
#include "microkernel.h"

namespace sparsekernels {
namespace cpu {
namespace {

// out[e] = G[:, row[e]*bm, +bm].T @ X[:, col[e]*BO, +BO]: a [bm, BO] block per stored block.
template <typename T, int BO>
void sdd(const T* G, int64_t ldg, const T* X, int64_t ldx, int64_t rows, const int32_t* row,
         const int32_t* col, int64_t nnz, int64_t bm, T* out) {
  constexpr int L = Vec<T>::L;
  constexpr int NV = BO / L;
  constexpr int MR = NV >= 16 ? 1 : std::min(8, 16 / NV);  // divides every bm in {16..128}
  constexpr int64_t kPanel = 128;
  using V = typename Vec<T>::type;
#pragma omp parallel for schedule(dynamic, 1) num_threads(at::get_num_threads())
  for (int64_t e = 0; e < nnz; ++e) {
    const T* g = G + static_cast<int64_t>(row[e]) * bm;
    const T* x = X + static_cast<int64_t>(col[e]) * BO;
    T* c = out + e * bm * BO;
    for (int64_t n0 = 0; n0 < bm; n0 += MR) {
      V total[MR][NV];
      for (int r = 0; r < MR; ++r)
        for (int j = 0; j < NV; ++j) total[r][j] = V{};
      // partial sums over 128-token panels, then added: two-level summation over T
      for (int64_t t0 = 0; t0 < rows; t0 += kPanel) {
        V acc[MR][NV];
        for (int r = 0; r < MR; ++r)
          for (int j = 0; j < NV; ++j) acc[r][j] = V{};
        micro_kernel<T, BO, MR>(g + t0 * ldg + n0, 1, ldg, x + t0 * ldx, ldx,
                                std::min<int64_t>(kPanel, rows - t0), acc);
        for (int r = 0; r < MR; ++r)
          for (int j = 0; j < NV; ++j) total[r][j] += acc[r][j];
      }
      for (int r = 0; r < MR; ++r)
        for (int j = 0; j < NV; ++j) storeu<T>(c + (n0 + r) * BO + j * L, total[r][j]);
    }
  }
}

// ---- torch entry points ------------------------------------------------------------
at::Tensor bsr_linear_cpu(const at::Tensor& x, const at::Tensor& values,
                          const at::Tensor& crow_indices, const at::Tensor& col_indices,
                          const std::optional<at::Tensor>& bias,
                          const std::optional<at::Tensor>& packed_arg) {
  check_rows(x, "x");
  check_layer(values, crow_indices, col_indices, "W");
  const int64_t bm = values.size(1), bk = values.size(2);
  const int64_t n = (crow_indices.numel() - 1) * bm;
  TORCH_CHECK(x.size(1) % bk == 0, "sparsekernels: input width ", x.size(1),
              " is not a multiple of the block width ", bk);
  if (lowp::bf16_native(x, values))  // AVX-512 BF16 (bsr_linear_bf16.cpp)
    return lowp::bsr_linear_bf16(x, values, crow_indices, col_indices, bias, packed_arg);
  const auto ct = compute_type(x.scalar_type());
  const at::Tensor xc = x.scalar_type() == ct ? x : x.to(ct);
  const std::optional<at::Tensor> packed_in = free_packed(values, ct, packed_arg);
  at::Tensor b;
  if (bias.has_value()) {
    TORCH_CHECK(bias->numel() == n, "sparsekernels: bias has ", bias->numel(), " values for ",
                n, " outputs");
    b = in_compute_type(*bias, ct);
  }
  at::Tensor out = at::empty({x.size(0), n}, x.options().dtype(ct));
  const int64_t lda = x.size(0) > 1 ? xc.stride(0) : x.size(1);
  const int64_t rows = x.size(0);
  dispatch_float(ct, [&](auto tag) {
    using T = decltype(tag);
    const T* bias_ptr = b.defined() ? b.data_ptr<T>() : nullptr;
    dispatch_block(bm, [&](auto bo) {
      constexpr int BO = decltype(bo)::value;
      if (reads_stored_blocks(rows, tile_rows<T, BO>(), packed_in.has_value())) {
        const at::Tensor vc = in_compute_type(values, ct);
        dot_rows<T>(xc.data_ptr<T>(), rows, lda, vc.data_ptr<T>(), bm, bk,
                    crow_indices.data_ptr<int32_t>(), col_indices.data_ptr<int32_t>(),
                    crow_indices.numel() - 1, bias_ptr, out.data_ptr<T>(), n);
        return;
      }
      // W.T blocks, so each row of the kernel's B operand is one contiguous output vector
      const at::Tensor packed = packed_blocks(values, ct, packed_in);
      SparseOperand s{crow_indices.data_ptr<int32_t>(), col_indices.data_ptr<int32_t>(), nullptr,
                      crow_indices.numel() - 1, bk};
      dsd<T, BO>(xc.data_ptr<T>(), rows, lda, packed.data_ptr<T>(), s, bias_ptr,
                 out.data_ptr<T>(), n);
    });
  });
  return out.scalar_type() == x.scalar_type() ? out : out.to(x.scalar_type());
}

// Rows of the register tile of the kernels' tiled path for `dtype` (its compute type) and
// output blocks `block_out` wide: below it, a call without packed blocks runs dot products on
// the blocks as stored (see reads_stored_blocks). For the router.
int64_t bsr_tile_rows_cpu(at::ScalarType dtype, int64_t block_out) {
  return tile_rows_of(dtype, block_out);
}

// The operand SparseLinear caches for inference (bsr_linear's `packed`): made by the rule the
// kernels apply per call, so the two cannot drift apart.
at::Tensor bsr_pack_cpu(const at::Tensor& values) {
  TORCH_CHECK(values.dim() == 3 && values.device().is_cpu(),
              "sparsekernels: values must be [nnz, bm, bk] on the CPU, got ", values.sizes(),
              " on ", values.device());
  if (lowp::bf16_native_values(values)) return lowp::pack_bf16(values);
  return packed_blocks(values, compute_type(values.scalar_type()), std::nullopt);
}

at::Tensor bsr_dsd_cpu(const at::Tensor& grad, const at::Tensor& values,
                       const at::Tensor& ccol_indices, const at::Tensor& row_indices_t,
                       const at::Tensor& transpose_perm) {
  check_rows(grad, "grad");
  check_index(ccol_indices, "ccol_indices");
  check_index(row_indices_t, "row_indices_t");
  check_index(transpose_perm, "transpose_perm");
  const int64_t bm = values.size(1), bk = values.size(2);
  const int64_t k = (ccol_indices.numel() - 1) * bk;
  const auto ct = compute_type(grad.scalar_type());
  const at::Tensor gc = grad.scalar_type() == ct ? grad : grad.to(ct);
  const at::Tensor vc = in_compute_type(values, ct);
  at::Tensor out = at::empty({grad.size(0), k}, grad.options().dtype(ct));
  const int64_t lda = grad.size(0) > 1 ? gc.stride(0) : grad.size(1);
  dispatch_float(ct, [&](auto tag) {
    using T = decltype(tag);
    dispatch_block(bk, [&](auto bo) {
      SparseOperand s{ccol_indices.data_ptr<int32_t>(), row_indices_t.data_ptr<int32_t>(),
                      transpose_perm.data_ptr<int32_t>(), ccol_indices.numel() - 1, bm};
      dsd<T, decltype(bo)::value>(gc.data_ptr<T>(), grad.size(0), lda, vc.data_ptr<T>(), s,
                                  nullptr, out.data_ptr<T>(), k);
    });
  });
  return out.scalar_type() == grad.scalar_type() ? out : out.to(grad.scalar_type());
}

at::Tensor bsr_sdd_cpu(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& row_indices,
                       const at::Tensor& col_indices, int64_t block_m, int64_t block_k) {
  check_rows(grad, "grad");
  check_rows(x, "x");
  check_index(row_indices, "row_indices");
  check_index(col_indices, "col_indices");
  TORCH_CHECK(grad.size(0) == x.size(0), "sparsekernels: grad has ", grad.size(0),
              " rows but x has ", x.size(0));
  const auto ct = compute_type(grad.scalar_type());
  const at::Tensor gc = grad.scalar_type() == ct ? grad.contiguous() : grad.to(ct).contiguous();
  const at::Tensor xc = x.scalar_type() == ct ? x.contiguous() : x.to(ct).contiguous();
  const int64_t nnz = row_indices.numel();
  at::Tensor out = at::empty({nnz, block_m, block_k}, grad.options().dtype(ct));
  dispatch_float(ct, [&](auto tag) {
    using T = decltype(tag);
    dispatch_block(block_k, [&](auto bo) {
      sdd<T, decltype(bo)::value>(gc.data_ptr<T>(), gc.size(1), xc.data_ptr<T>(), xc.size(1),
                                  grad.size(0), row_indices.data_ptr<int32_t>(),
                                  col_indices.data_ptr<int32_t>(), nnz, block_m,
                                  out.data_ptr<T>());
    });
  });
  return out.scalar_type() == grad.scalar_type() ? out : out.to(grad.scalar_type());
}

}  // namespace
}  // namespace cpu
}  // namespace sparsekernels

namespace sparsekernels {
namespace cpu {

at::Tensor linear_inference(const at::Tensor& x, const at::Tensor& values,
                            const at::Tensor& crow_indices, const at::Tensor& col_indices,
                            const std::optional<at::Tensor>& bias, int64_t in_features) {
  if (!takes_rows(x, values, in_features)) return at::Tensor();
  return with_leading_dims(x, bsr_linear_cpu(x.reshape({-1, in_features}), values, crow_indices,
                                             col_indices, bias, std::nullopt));
}

at::Tensor linear_add_norm_inference(const at::Tensor& x, const at::Tensor& values,
                                     const at::Tensor& crow_indices, const at::Tensor& col_indices,
                                     const std::optional<at::Tensor>& bias, int64_t in_features,
                                     const at::Tensor& residual,
                                     const std::optional<at::Tensor>& weight,
                                     const std::optional<at::Tensor>& norm_bias, double eps) {
  // the epilogue runs in the bf16 kernels; other calls take the unfused path
  if (!takes_rows(x, values, in_features) || !lowp::bf16_native(x, values) || values.dim() != 3)
    return at::Tensor();
  const int64_t n = (crow_indices.numel() - 1) * values.size(1);
  if (!residual_fits(residual, x, n)) return at::Tensor();
  const at::Tensor x2 = x.reshape({-1, in_features});
  check_rows(x2, "x");
  const AddNormArgs a = add_norm_args(residual, weight, norm_bias, eps, x2.size(0), n,
                                      x.scalar_type(), "bsr_linear + add_layer_norm");
  return with_leading_dims(x, lowp::bsr_linear_bf16(x2, values, crow_indices, col_indices, bias,
                                                    std::nullopt, &a.epilogue));
}

}  // namespace cpu
}  // namespace sparsekernels

TORCH_LIBRARY_FRAGMENT(sparsekernels_C, m) {
  m.def("bsr_linear_cpu(Tensor x, Tensor values, Tensor crow_indices, Tensor col_indices, "
        "Tensor? bias, Tensor? packed=None) -> Tensor",
        &sparsekernels::cpu::bsr_linear_cpu);
  m.def("bsr_pack_cpu(Tensor values) -> Tensor", &sparsekernels::cpu::bsr_pack_cpu);
  m.def("bsr_tile_rows_cpu(ScalarType dtype, int block_out) -> int",
        &sparsekernels::cpu::bsr_tile_rows_cpu);
  m.def("bsr_dsd_cpu(Tensor grad, Tensor values, Tensor ccol_indices, Tensor row_indices_t, "
        "Tensor transpose_perm) -> Tensor",
        &sparsekernels::cpu::bsr_dsd_cpu);
  m.def("bsr_sdd_cpu(Tensor grad, Tensor x, Tensor row_indices, Tensor col_indices, "
        "int block_m, int block_k) -> Tensor",
        &sparsekernels::cpu::bsr_sdd_cpu);
}
