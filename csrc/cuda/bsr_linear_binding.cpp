// Torch glue for the CUDA kernels of bsr_linear.cu (compiled only in CUDA builds): checks
// the inputs, allocates the outputs, runs on the current stream and registers
//   sparsekernels_C::bsr_linear_cuda, bsr_dsd_cuda, bsr_sdd_cuda
// which sparsekernels/ops/bsr_linear.py calls through sparsekernels.ops._ext.
// The current stream comes from c10/cuda/CUDAStream.h (at::cuda::getCurrentCUDAStream is
// the same function); ATen/cuda/CUDAContext.h is avoided since it pulls in the cuBLAS,
// cuSPARSE and cuSOLVER headers, which this file does not need.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#include <torch/library.h>

#include <optional>

#include "bsr_linear.cuh"

namespace {

namespace skc = sparsekernels::cuda;

skc::ScalarType scalar_type(const at::Tensor& t, const char* op, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat: return skc::ScalarType::kFloat32;
    case at::kHalf: return skc::ScalarType::kFloat16;
    case at::kBFloat16: return skc::ScalarType::kBFloat16;
    default:
      TORCH_CHECK(false, op, ": ", name, " must be float32, float16 or bfloat16, got ",
                  t.scalar_type());
  }
}

bool valid_block(int64_t b) { return b == 16 || b == 32 || b == 64 || b == 128; }

void check_cuda(const at::Tensor& t, const at::Tensor& like, const char* op, const char* name) {
  TORCH_CHECK(t.is_cuda(), op, ": ", name, " must be a CUDA tensor, got one on ", t.device(),
              " (the 'cuda' backend runs CUDA tensors; use backend='auto' or 'cpu')");
  TORCH_CHECK(t.device() == like.device(), op, ": ", name, " is on ", t.device(),
              " but the input is on ", like.device());
}

// [T, width] with unit column stride (rows may be any stride apart).
at::Tensor dense_rows(const at::Tensor& t, const at::Tensor& like, const char* op,
                      const char* name) {
  check_cuda(t, like, op, name);
  TORCH_CHECK(t.dim() == 2, op, ": ", name, " must be 2-D [T, features], got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == like.scalar_type(), op, ": ", name, " is ", t.scalar_type(),
              ", expected ", like.scalar_type());
  return (t.stride(1) == 1 || t.size(1) <= 1) ? t : t.contiguous();
}

at::Tensor index_array(const at::Tensor& t, const at::Tensor& like, int64_t length,
                       const char* op, const char* name) {
  check_cuda(t, like, op, name);
  TORCH_CHECK(t.scalar_type() == at::kInt, op, ": ", name, " must be int32, got ",
              t.scalar_type(), " (BlockSparseTensor builds int32 indices)");
  TORCH_CHECK(t.dim() == 1, op, ": ", name, " must be 1-D, got ", t.sizes());
  TORCH_CHECK(length < 0 || t.numel() == length, op, ": ", name, " must have ", length,
              " entries, got ", t.numel());
  return t.contiguous();
}

at::Tensor block_values(const at::Tensor& values, const at::Tensor& like, const char* op) {
  check_cuda(values, like, op, "values");
  TORCH_CHECK(values.dim() == 3, op, ": values must be [nnz, block_m, block_k], got ",
              values.sizes());
  TORCH_CHECK(values.scalar_type() == like.scalar_type(), op, ": values are ",
              values.scalar_type(), " but the input is ", like.scalar_type(),
              "; cast one of them");
  TORCH_CHECK(valid_block(values.size(1)) && valid_block(values.size(2)), op,
              ": block sides must be 16, 32, 64 or 128, got (", values.size(1), ", ",
              values.size(2), ")");
  return values.contiguous();
}

void check_launch(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, op, ": CUDA kernel launch failed: ",
              cudaGetErrorString(err));
}

// The fp16 / bf16 kernels use tensor cores through WMMA: sm_70+ for fp16, sm_80+ for bf16.
void check_arch(skc::ScalarType dtype, const at::Tensor& t, const char* op) {
  if (dtype == skc::ScalarType::kFloat32) return;
  int major = 0;
  check_launch(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor,
                                      t.get_device()),
               op);
  const int need = dtype == skc::ScalarType::kBFloat16 ? 8 : 7;
  TORCH_CHECK(major >= need, op, ": ", t.scalar_type(), " needs a GPU of compute capability ",
              need, ".0 or newer, this one is ", major, ".x; use float32 or the 'triton' backend");
}

at::Tensor bsr_linear_cuda(const at::Tensor& x, const at::Tensor& values,
                           const at::Tensor& crow_indices, const at::Tensor& col_indices,
                           const std::optional<at::Tensor>& bias) {
  constexpr const char* op = "sparsekernels_C::bsr_linear_cuda";
  const auto dtype = scalar_type(x, op, "x");
  const at::Tensor x2 = dense_rows(x, x, op, "x");
  const at::Tensor vals = block_values(values, x, op);
  const int64_t nnz = vals.size(0), bm = vals.size(1), bk = vals.size(2);
  const at::Tensor crow = index_array(crow_indices, x, -1, op, "crow_indices");
  const at::Tensor col = index_array(col_indices, x, nnz, op, "col_indices");
  TORCH_CHECK(crow.numel() >= 1, op, ": crow_indices needs at least one entry");
  TORCH_CHECK(x2.size(1) % bk == 0, op, ": x has ", x2.size(1),
              " features, not a multiple of the block width ", bk);
  const int64_t block_rows = crow.numel() - 1;
  TORCH_CHECK(block_rows <= skc::kMaxBlockRows, op, ": at most ", skc::kMaxBlockRows,
              " block rows are supported, got ", block_rows);
  const int64_t n = block_rows * bm;
  at::Tensor b;
  if (bias.has_value()) {
    check_cuda(*bias, x, op, "bias");
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == n, op, ": bias must be [", n, "], got ",
                bias->sizes());
    TORCH_CHECK(bias->scalar_type() == x.scalar_type(), op, ": bias is ", bias->scalar_type(),
                ", expected ", x.scalar_type());
    b = bias->contiguous();
  }
  at::Tensor y = at::empty({x2.size(0), n}, x2.options());
  if (y.numel() == 0) return y;
  const c10::cuda::CUDAGuard guard(x.device());
  check_arch(dtype, x, op);
  check_launch(skc::bsr_linear_forward(dtype, x2.data_ptr(), x2.stride(0), vals.data_ptr(),
                                       crow.data_ptr<int32_t>(), col.data_ptr<int32_t>(),
                                       b.defined() ? b.data_ptr() : nullptr, y.data_ptr(),
                                       y.stride(0), x2.size(0), block_rows,
                                       static_cast<int>(bm), static_cast<int>(bk),
                                       c10::cuda::getCurrentCUDAStream().stream()),
               op);
  return y;
}

at::Tensor bsr_dsd_cuda(const at::Tensor& grad, const at::Tensor& values,
                        const at::Tensor& ccol_indices, const at::Tensor& row_indices_t,
                        const at::Tensor& transpose_perm) {
  constexpr const char* op = "sparsekernels_C::bsr_dsd_cuda";
  const auto dtype = scalar_type(grad, op, "grad");
  const at::Tensor g2 = dense_rows(grad, grad, op, "grad");
  const at::Tensor vals = block_values(values, grad, op);
  const int64_t nnz = vals.size(0), bm = vals.size(1), bk = vals.size(2);
  const at::Tensor ccol = index_array(ccol_indices, grad, -1, op, "ccol_indices");
  const at::Tensor rows_t = index_array(row_indices_t, grad, nnz, op, "row_indices_t");
  const at::Tensor perm = index_array(transpose_perm, grad, nnz, op, "transpose_perm");
  TORCH_CHECK(ccol.numel() >= 1, op, ": ccol_indices needs at least one entry");
  TORCH_CHECK(g2.size(1) % bm == 0, op, ": grad has ", g2.size(1),
              " features, not a multiple of the block height ", bm);
  const int64_t block_cols = ccol.numel() - 1;
  TORCH_CHECK(block_cols <= skc::kMaxBlockRows, op, ": at most ", skc::kMaxBlockRows,
              " block columns are supported, got ", block_cols);
  at::Tensor out = at::empty({g2.size(0), block_cols * bk}, g2.options());
  if (out.numel() == 0) return out;
  const c10::cuda::CUDAGuard guard(grad.device());
  check_arch(dtype, grad, op);
  check_launch(skc::bsr_dsd(dtype, g2.data_ptr(), g2.stride(0), vals.data_ptr(),
                            ccol.data_ptr<int32_t>(), rows_t.data_ptr<int32_t>(),
                            perm.data_ptr<int32_t>(), out.data_ptr(), out.stride(0), g2.size(0),
                            block_cols, static_cast<int>(bm), static_cast<int>(bk),
                            c10::cuda::getCurrentCUDAStream().stream()),
               op);
  return out;
}

at::Tensor bsr_sdd_cuda(const at::Tensor& grad, const at::Tensor& x,
                        const at::Tensor& row_indices, const at::Tensor& col_indices,
                        int64_t block_m, int64_t block_k) {
  constexpr const char* op = "sparsekernels_C::bsr_sdd_cuda";
  const auto dtype = scalar_type(grad, op, "grad");
  TORCH_CHECK(valid_block(block_m) && valid_block(block_k), op,
              ": block sides must be 16, 32, 64 or 128, got (", block_m, ", ", block_k, ")");
  const at::Tensor g2 = dense_rows(grad, grad, op, "grad");
  const at::Tensor x2 = dense_rows(x, grad, op, "x");
  TORCH_CHECK(g2.size(0) == x2.size(0), op, ": grad [T, N] and x [T, K] need the same T, got ",
              g2.sizes(), " and ", x2.sizes());
  TORCH_CHECK(g2.size(1) % block_m == 0 && x2.size(1) % block_k == 0, op, ": grad width ",
              g2.size(1), " and x width ", x2.size(1), " must be multiples of the block size (",
              block_m, ", ", block_k, ")");
  const at::Tensor rows = index_array(row_indices, grad, -1, op, "row_indices");
  const int64_t nnz = rows.numel();
  const at::Tensor cols = index_array(col_indices, grad, nnz, op, "col_indices");
  TORCH_CHECK(nnz <= INT32_MAX, op, ": too many stored blocks (", nnz, ")");
  at::Tensor out = at::empty({nnz, block_m, block_k}, g2.options());
  if (nnz == 0) return out;
  const c10::cuda::CUDAGuard guard(grad.device());
  check_arch(dtype, grad, op);
  int sms = 0;
  check_launch(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, grad.get_device()),
               op);
  const int splits = skc::bsr_sdd_splits(g2.size(0), nnz, sms);
  at::Tensor workspace;
  if (splits > 1) {
    const auto bytes = skc::bsr_sdd_workspace_bytes(nnz, static_cast<int>(block_m),
                                                    static_cast<int>(block_k), splits);
    workspace = at::empty({static_cast<int64_t>(bytes / sizeof(float))},
                          g2.options().dtype(at::kFloat));
  }
  check_launch(skc::bsr_sdd(dtype, g2.data_ptr(), g2.stride(0), x2.data_ptr(), x2.stride(0),
                            rows.data_ptr<int32_t>(), cols.data_ptr<int32_t>(), out.data_ptr(),
                            g2.size(0), nnz, static_cast<int>(block_m),
                            static_cast<int>(block_k), splits,
                            workspace.defined() ? workspace.data_ptr<float>() : nullptr,
                            c10::cuda::getCurrentCUDAStream().stream()),
               op);
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(sparsekernels_C, m) {
  m.def("bsr_linear_cuda(Tensor x, Tensor values, Tensor crow_indices, Tensor col_indices, "
        "Tensor? bias) -> Tensor",
        &bsr_linear_cuda);
  m.def("bsr_dsd_cuda(Tensor grad, Tensor values, Tensor ccol_indices, Tensor row_indices_t, "
        "Tensor transpose_perm) -> Tensor",
        &bsr_dsd_cuda);
  m.def("bsr_sdd_cuda(Tensor grad, Tensor x, Tensor row_indices, Tensor col_indices, "
        "int block_m, int block_k) -> Tensor",
        &bsr_sdd_cuda);
}
