// CUDA kernels of sparsekernels::bsr_linear and its backward ops, behind a torch-free API:
// raw device pointers, sizes, strides (in elements) and a stream. The torch glue (input
// checks, allocation, the current stream, op registration) is bsr_linear_binding.cpp.
//
// W is a block-sparse [N, K] matrix in BSR form with blocks of (block_m, block_k), each
// side 16, 32, 64 or 128; values[e] is block e, row-major ([block_m][block_k]), and the
// int32 index arrays are those of sparsekernels.formats.block_sparse.BlockSparseTensor.
// Every function returns the launch status (cudaSuccess, cudaErrorInvalidValue for an
// unsupported argument, or the error of the launch); none synchronizes.
#pragma once

#include <cstddef>
#include <cstdint>

#include <cuda_runtime_api.h>

namespace sparsekernels {
namespace cuda {

enum class ScalarType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// The largest block-row (or block-column) count a launch supports (the grid's y extent).
constexpr int64_t kMaxBlockRows = 65535;

// y[T, N] = x[T, K] @ W.T (+ bias[N]), N = block_rows * block_m, fp32 accumulation.
// x rows are stride_x apart (unit column stride), y rows stride_y apart. bias may be null.
// Block row r with no stored block gets bias (or zeros).
cudaError_t bsr_linear_forward(ScalarType dtype, const void* x, int64_t stride_x,
                               const void* values, const int32_t* crow_indices,
                               const int32_t* col_indices, const void* bias, void* y,
                               int64_t stride_y, int64_t tokens, int64_t block_rows,
                               int block_m, int block_k, cudaStream_t stream);

// out[T, K] = grad[T, N] @ W (the input gradient), K = block_cols * block_k, walking the
// transposed index: block column c holds values[transpose_perm[p]] for
// ccol_indices[c] <= p < ccol_indices[c + 1], at block row row_indices_t[p].
cudaError_t bsr_dsd(ScalarType dtype, const void* grad, int64_t stride_grad, const void* values,
                    const int32_t* ccol_indices, const int32_t* row_indices_t,
                    const int32_t* transpose_perm, void* out, int64_t stride_out,
                    int64_t tokens, int64_t block_cols, int block_m, int block_k,
                    cudaStream_t stream);

// How many token ranges bsr_sdd should reduce separately so that about two CTAs run per
// SM; 1 when the stored blocks alone fill the GPU.
int bsr_sdd_splits(int64_t tokens, int64_t nnz, int num_sms);

// Bytes of fp32 workspace bsr_sdd needs for `splits` token ranges (0 when splits == 1).
size_t bsr_sdd_workspace_bytes(int64_t nnz, int block_m, int block_k, int splits);

// out[e] = grad[:, row_e*block_m:+block_m].T @ x[:, col_e*block_k:+block_k] for the nnz
// stored blocks (the weight gradient), out contiguous [nnz, block_m, block_k]. With
// splits > 1 each token range writes fp32 partials to `workspace` (bsr_sdd_workspace_bytes)
// and a second kernel sums them in a fixed order: the result is deterministic.
cudaError_t bsr_sdd(ScalarType dtype, const void* grad, int64_t stride_grad, const void* x,
                    int64_t stride_x, const int32_t* row_indices, const int32_t* col_indices,
                    void* out, int64_t tokens, int64_t nnz, int block_m, int block_k,
                    int splits, float* workspace, cudaStream_t stream);

}  // namespace cuda
}  // namespace sparsekernels
