// Entry points of the low-precision CPU kernels that other translation units call: the bf16
// kernels behind bsr_linear / bsr_ffn (their torch entry points hand bf16 work here when the
// CPU has AVX-512 BF16; otherwise they keep converting to fp32), and shared checks.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <string>

namespace sparsekernels {
namespace cpu {

struct AddNorm;  // add_norm_rows.h

namespace lowp {

// True when bf16 x and weights run the AVX-512 BF16 kernels (the CPU has them and
// SPARSEKERNELS_CPU_ISA does not force the portable path).
bool bf16_native(const at::Tensor& x, const at::Tensor& values);
bool bf16_native_values(const at::Tensor& values);

// bsr_linear in bf16: x [T, K] bf16 rows, values [nnz, bm, bk] bf16, packed (optional) the
// blocks in the bf16 layout [nnz, bk/2, bm, 2] made by pack_bf16. an (optional): the epilogue
// out = layer_norm(out + residual), its operands checked by the caller.
at::Tensor bsr_linear_bf16(const at::Tensor& x, const at::Tensor& values, const at::Tensor& crow,
                           const at::Tensor& col, const std::optional<at::Tensor>& bias,
                           const std::optional<at::Tensor>& packed,
                           const AddNorm* an = nullptr);
at::Tensor pack_bf16(const at::Tensor& values);
// values laid out as SparseLinear keeps them on the CPU: W.T blocks ([nnz][bk][bm] in memory),
// bm a multiple of 16; the bf16 kernels read these as they are, packing nothing per call.
bool stored_transposed(const at::Tensor& values);
// The blocks a bf16 kernel reads: the caller's packing (checked: shape, dtype, layout), the
// values themselves when stored_transposed (*stored set: the kernel pairs them per column), or
// a packed copy.
at::Tensor bf16_operand(const at::Tensor& values, const std::optional<at::Tensor>& packed,
                        const char* name, bool* stored);
// Up to this many rows in a call, the bf16 kernels read stored W.T blocks with FMAs (each
// weight widened to fp32): pairing them for vdpbf16ps would move every block twice for
// products that are memory-bound.
constexpr int64_t kStoredRows = 16;

// bsr_ffn in bf16 (fp32 intermediate in each thread's buffer, never in memory)
at::Tensor bsr_ffn_bf16(const at::Tensor& x, const at::Tensor& values1, const at::Tensor& crow1,
                        const at::Tensor& col1, const std::optional<at::Tensor>& bias1,
                        const at::Tensor& values2, const at::Tensor& crow2, const at::Tensor& col2,
                        const std::optional<at::Tensor>& bias2, const std::string& activation,
                        const std::optional<at::Tensor>& packed1,
                        const std::optional<at::Tensor>& packed2, const AddNorm* an = nullptr);

// bsr_gated_ffn in bf16: down(act(gate(x)) * up(x)), the same engine
at::Tensor bsr_gated_ffn_bf16(
    const at::Tensor& x, const at::Tensor& values_g, const at::Tensor& crow_g,
    const at::Tensor& col_g, const std::optional<at::Tensor>& bias_g, const at::Tensor& values_u,
    const at::Tensor& crow_u, const at::Tensor& col_u, const std::optional<at::Tensor>& bias_u,
    const at::Tensor& values_d, const at::Tensor& crow_d, const at::Tensor& col_d,
    const std::optional<at::Tensor>& bias_d, const std::string& activation,
    const std::optional<at::Tensor>& packed_g, const std::optional<at::Tensor>& packed_u,
    const std::optional<at::Tensor>& packed_d);

// A block-sparse index read by a kernel: crow [n_rows + 1] from 0 to nnz, non-decreasing;
// col [nnz] within [0, n_cols). Raises with what is wrong.
void check_block_index(const at::Tensor& crow, const at::Tensor& col, int64_t nnz,
                       int64_t n_cols, const char* name);

// One quantized layer's operands (packed blocks, comp, scale, index, bias) for inputs of
// width in_features; raises with what is wrong.
void check_int8_layer(const at::Tensor& packed, const at::Tensor& comp, const at::Tensor& scale,
                      const at::Tensor& crow, const at::Tensor& col,
                      const std::optional<at::Tensor>& bias, int64_t in_features,
                      const char* name);

}  // namespace lowp
}  // namespace cpu
}  // namespace sparsekernels
