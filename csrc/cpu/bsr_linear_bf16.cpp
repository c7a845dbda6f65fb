// bsr_linear in bf16 on CPUs with AVX-512 BF16: bf16 inputs and weights, fp32 accumulation
// (vdpbf16ps: two products per lane and instruction, twice the fp32 FMA rate), the output
// rounded to bf16 once. bsr_linear_cpu hands bf16 work here when bf16_native() holds; on
// other CPUs it keeps its fp32 conversion path.
//
// Also: the shared index check and `lowp_isa_cpu`, which names the paths this CPU runs.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <omp.h>

#include "add_norm_rows.h"
#include "dsd.h"
#include "glue.h"
#include "lowp.h"
#include "lowp_microkernel.h"

namespace sparsekernels {
namespace cpu {
namespace lowp {

void check_block_index(const at::Tensor& crow, const at::Tensor& col, int64_t nnz,
                       int64_t n_cols, const char* name) {
  check_index(crow, name);
  check_index(col, name);
  TORCH_CHECK(col.numel() == nnz, "sparsekernels: ", name, " has ", col.numel(),
              " column indices for ", nnz, " stored blocks");
  const int32_t* c = crow.data_ptr<int32_t>();
  const int64_t n = crow.numel() - 1;
  TORCH_CHECK(n >= 0 && c[0] == 0 && c[n] == nnz, "sparsekernels: ", name,
              " row pointers must run from 0 to the number of stored blocks (", nnz, ")");
  for (int64_t i = 0; i < n; ++i)
    TORCH_CHECK(c[i] <= c[i + 1], "sparsekernels: ", name, " row pointers decrease at ", i);
  const int32_t* k = col.data_ptr<int32_t>();
  for (int64_t e = 0; e < nnz; ++e)
    TORCH_CHECK(k[e] >= 0 && k[e] < n_cols, "sparsekernels: ", name, " block column ", k[e],
                " at ", e, " is outside [0, ", n_cols, ")");
}

bool bf16_native_values(const at::Tensor& values) {
  return values.scalar_type() == at::kBFloat16 && values.device().is_cpu() && use_bf16();
}

bool bf16_native(const at::Tensor& x, const at::Tensor& values) {
  return x.scalar_type() == at::kBFloat16 && bf16_native_values(values);
}

at::Tensor pack_bf16(const at::Tensor& values) {
  TORCH_CHECK(values.dim() == 3 && values.size(2) % 2 == 0, "sparsekernels: values must be ",
              "[nnz, bm, bk] with an even bk, got ", values.sizes());
  const int64_t nnz = values.size(0), bm = values.size(1), bk = values.size(2);
  return values.to(at::kBFloat16).reshape({nnz, bm, bk / 2, 2}).permute({0, 2, 1, 3}).contiguous();
}

namespace {

const uint16_t* bits(const at::Tensor& t) {
  return reinterpret_cast<const uint16_t*>(t.data_ptr<at::BFloat16>());
}

// Few rows against the blocks as stored: no packing per call (SparseLinear caches no packed
// blocks for one row).
constexpr int64_t kDotRows = 4;

}  // namespace

bool stored_transposed(const at::Tensor& values) {
  const int64_t bm = values.size(1), bk = values.size(2);
  return values.size(0) > 0 && values.stride(0) == bm * bk && values.stride(1) == 1 &&
         values.stride(2) == bm && bm % 16 == 0 && bk % 2 == 0;
}

at::Tensor bf16_operand(const at::Tensor& values, const std::optional<at::Tensor>& packed,
                        const char* name, bool* stored) {
  *stored = !packed.has_value() && stored_transposed(values);
  if (*stored) return values;
  if (!packed.has_value()) return pack_bf16(values);
  const int64_t nnz = values.size(0), bm = values.size(1), bk = values.size(2);
  TORCH_CHECK(packed->dim() == 4 && packed->size(0) == nnz && packed->size(1) == bk / 2 &&
                  packed->size(2) == bm && packed->size(3) == 2,
              "sparsekernels: ", name, " must be the bf16 packing of values [", nnz, ", ", bk / 2,
              ", ", bm, ", 2] (sparsekernels.ops.bsr_linear.pack), got ", packed->sizes());
  TORCH_CHECK(packed->scalar_type() == at::kBFloat16 && packed->device().is_cpu() &&
                  packed->is_contiguous(),
              "sparsekernels: ", name, " must be a contiguous bf16 CPU tensor, got ",
              packed->scalar_type(), " on ", packed->device());
  return *packed;
}

at::Tensor bsr_linear_bf16(const at::Tensor& x, const at::Tensor& values, const at::Tensor& crow,
                           const at::Tensor& col, const std::optional<at::Tensor>& bias,
                           const std::optional<at::Tensor>& packed_in, const AddNorm* an) {
  TORCH_CHECK(values.dim() == 3, "sparsekernels: values must be [nnz, bm, bk]");
  const int64_t bm = values.size(1), bk = values.size(2);
  const int64_t nbr = crow.numel() - 1, n = nbr * bm, rows = x.size(0);
  TORCH_CHECK(x.size(1) % bk == 0, "sparsekernels: input width ", x.size(1),
              " is not a multiple of the block width ", bk);
  check_block_index(crow, col, values.size(0), x.size(1) / bk, "W");
  at::Tensor b;
  if (bias.has_value()) b = bias->to(at::kFloat).contiguous();
  const float* bias_ptr = b.defined() ? b.data_ptr<float>() : nullptr;
  at::Tensor out = at::empty({rows, n}, x.options().dtype(at::kBFloat16));
  if (rows == 0 || n == 0) return out;
  const int64_t lda = rows > 1 ? x.stride(0) : x.size(1);
  const uint16_t* xp = bits(x);
  uint16_t* op = reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>());
#ifdef SK_LOWP_X86
  if (!packed_in.has_value() && rows <= kStoredRows && stored_transposed(values)) {
    const uint16_t* vp = bits(values);
    const Rows s{crow.data_ptr<int32_t>(), col.data_ptr<int32_t>(), nbr, bk};
    const int64_t macs = rows * values.size(0) * bm * bk;
    dispatch_block(bm, [&](auto bo) {
      constexpr int BO = decltype(bo)::value;
#pragma omp parallel num_threads(threads_for(macs))
      {
        int64_t o0, o1;
        split_stored(s.ptr, nbr, omp_get_num_threads(), omp_get_thread_num(), &o0, &o1);
        for (int64_t o = o0; o < o1; ++o)
          block_bf16_avx512<BO, uint16_t, true>(xp, rows, lda, vp, s, o, bias_ptr, op, n);
      }
    });
    if (an) apply_add_norm_all<uint16_t>(*an, op, rows, n);
    return out;
  }
  if (!packed_in.has_value() && rows <= kDotRows) {
    const at::Tensor vc = values.contiguous();
    const uint16_t* vp = bits(vc);
    const int32_t* cp = crow.data_ptr<int32_t>();
    const int32_t* kp = col.data_ptr<int32_t>();
#pragma omp parallel for schedule(static) num_threads(at::get_num_threads())
    for (int64_t i = 0; i < nbr; ++i)
      for (int64_t t = 0; t < rows; ++t)
        dot_bf16_avx512(xp + t * lda, vp, bm, bk, cp, kp, i, bias_ptr, op + t * n);
    if (an) apply_add_norm_all<uint16_t>(*an, op, rows, n);
    return out;
  }
#endif
  bool wt = false;  // the blocks as stored (W.T), paired per column inside the kernel
  const at::Tensor packed = bf16_operand(values, packed_in, "packed", &wt);
  const uint16_t* pp = bits(packed);
  const Rows s{crow.data_ptr<int32_t>(), col.data_ptr<int32_t>(), nbr, bk};
  dispatch_block(bm, [&](auto bo) {
    constexpr int BO = decltype(bo)::value;
    // bf16 does twice the work of fp32 per instruction: twice dsd's per-item work
    const int64_t mc = chunk_rows(s, BO, tile_rows<BO>(), 4e6, rows);
    for_items_add_norm(rows, mc, nbr, an, op, n, [&](int64_t t0, int64_t t1, int64_t o) {
#ifdef SK_LOWP_X86
      if (wt)
        block_bf16_wt_avx512<BO, uint16_t>(xp + t0 * lda, t1 - t0, lda, pp, s, o, bias_ptr,
                                           op + t0 * n, n);
      else
        block_bf16_avx512<BO, uint16_t>(xp + t0 * lda, t1 - t0, lda, pp, s, o, bias_ptr,
                                        op + t0 * n, n);
#endif
    });
  });
  return out;
}

namespace {

// The paths this CPU runs: "avx512_bf16", "avx512_vnni" (comma-separated) or "generic".
std::string lowp_isa_cpu() {
  std::string out;
  if (use_bf16()) out += "avx512_bf16";
  if (use_vnni()) out += out.empty() ? "avx512_vnni" : ",avx512_vnni";
  return out.empty() ? "generic" : out;
}

}  // namespace
}  // namespace lowp
}  // namespace cpu
}  // namespace sparsekernels

TORCH_LIBRARY_FRAGMENT(sparsekernels_C, m) {
  m.def("lowp_isa_cpu() -> str", &sparsekernels::cpu::lowp::lowp_isa_cpu);
}
