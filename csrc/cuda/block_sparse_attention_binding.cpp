// Torch glue for the CUDA block-sparse attention forward (block_sparse_attention.cu, which
// has no torch headers): checks, dtype / mask preparation, stream, registration.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstdint>

namespace sparsekernels {
namespace cuda {

int block_sparse_attention_forward(
    const void* q, const void* k, const void* v, void* out, float* stats, const int32_t* kv_idx,
    const int32_t* kv_cnt, const void* mask, int mask_kind, const int64_t* q_strides,
    const int64_t* k_strides, const int64_t* v_strides, const int64_t* out_strides,
    const int64_t* mask_strides, int batch, int heads, int kv_heads, int len_q, int len_k,
    int head_dim, int block_q, int block_k, float scale, bool causal, int window, int dtype,
    cudaStream_t stream);

namespace {

int dtype_code(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return 0;
    case at::kHalf: return 1;
    case at::kBFloat16: return 2;
    default:
      TORCH_CHECK(false, "sparsekernels: block_sparse_attention_cuda runs float32, float16 and "
                  "bfloat16, got ", t);
  }
  return -1;
}

at::Tensor rows(const at::Tensor& t) { return t.stride(3) == 1 ? t : t.contiguous(); }

void check_index(const at::Tensor& t, const char* name, int64_t dims) {
  TORCH_CHECK(t.is_cuda() && t.scalar_type() == at::kInt && t.is_contiguous() && t.dim() == dims,
              "sparsekernels: ", name, " must be a contiguous ", dims,
              "-D int32 CUDA tensor, got ", t.scalar_type(), " ", t.sizes());
}

std::tuple<at::Tensor, at::Tensor> block_sparse_attention_cuda(
    const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
    const at::Tensor& kv_idx, const at::Tensor& kv_cnt, const std::optional<at::Tensor>& mask,
    bool causal, int64_t window, double scale, int64_t block_q, int64_t block_k) {
  TORCH_CHECK(q_in.is_cuda() && k_in.is_cuda() && v_in.is_cuda(),
              "sparsekernels: block_sparse_attention_cuda runs CUDA tensors");
  TORCH_CHECK(q_in.dim() == 4 && k_in.dim() == 4 && v_in.dim() == 4 &&
                  k_in.sizes() == v_in.sizes() && q_in.size(0) == k_in.size(0) &&
                  k_in.size(1) > 0 && q_in.size(1) % k_in.size(1) == 0 &&
                  q_in.size(3) == k_in.size(3),
              "sparsekernels: q [B, H, Lq, D], k and v [B, Hkv, Lk, D] with Hkv dividing H "
              "expected, got ", q_in.sizes(), " ", k_in.sizes(), " ", v_in.sizes());
  TORCH_CHECK(window >= 0, "sparsekernels: window must be >= 0 (0: none), got ", window);
  TORCH_CHECK(q_in.scalar_type() == k_in.scalar_type() && q_in.scalar_type() == v_in.scalar_type(),
              "sparsekernels: q, k, v dtypes differ");
  check_index(kv_idx, "kv_idx", 4);
  check_index(kv_cnt, "kv_cnt", 3);
  const c10::cuda::CUDAGuard guard(q_in.device());
  const at::Tensor q = rows(q_in), k = rows(k_in), v = rows(v_in);
  const int dtype = dtype_code(q.scalar_type());
  at::Tensor m;
  int mask_kind = 0;
  if (mask.has_value()) {
    m = *mask;
    TORCH_CHECK(m.dim() <= 4, "sparsekernels: attn_mask must have at most 4 dims");
    if (m.scalar_type() == at::kBool) {
      mask_kind = 1;
    } else if (m.scalar_type() == at::kFloat || m.scalar_type() == at::kHalf ||
               m.scalar_type() == at::kBFloat16) {
      mask_kind = m.scalar_type() == at::kFloat ? 2 : (m.scalar_type() == at::kHalf ? 3 : 4);
    } else {
      m = m.to(at::kFloat);
      mask_kind = 2;
    }
    m = m.expand({q.size(0), q.size(1), q.size(2), k.size(2)});
  }
  at::Tensor out = at::empty(q.sizes(), q.options());
  at::Tensor stats = at::empty({q.size(0), q.size(1), 2, q.size(2)}, q.options().dtype(at::kFloat));
  const int64_t qs[3] = {q.stride(0), q.stride(1), q.stride(2)};
  const int64_t ks[3] = {k.stride(0), k.stride(1), k.stride(2)};
  const int64_t vs[3] = {v.stride(0), v.stride(1), v.stride(2)};
  const int64_t os[3] = {out.stride(0), out.stride(1), out.stride(2)};
  int64_t ms[4] = {0, 0, 0, 0};
  if (m.defined())
    for (int i = 0; i < 4; ++i) ms[i] = m.stride(i);
  const int rc = block_sparse_attention_forward(
      q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(), stats.data_ptr<float>(),
      kv_idx.data_ptr<int32_t>(), kv_cnt.data_ptr<int32_t>(), m.defined() ? m.data_ptr() : nullptr,
      mask_kind, qs, ks, vs, os, ms, static_cast<int>(q.size(0)), static_cast<int>(q.size(1)),
      static_cast<int>(k.size(1)), static_cast<int>(q.size(2)), static_cast<int>(k.size(2)),
      static_cast<int>(q.size(3)), static_cast<int>(block_q), static_cast<int>(block_k),
      static_cast<float>(scale), causal, static_cast<int>(window), dtype,
      c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(rc != 1, "sparsekernels: block_sparse_attention_cuda supports head dims 32, 64, "
              "128 and block sizes 16..128 (multiples of 16), got head dim ", q.size(3),
              ", blocks ", block_q, "x", block_k);
  TORCH_CHECK(rc != 2, "sparsekernels: blocks ", block_q, "x", block_k, " with head dim ",
              q.size(3), " need more shared memory than this GPU has; use smaller blocks");
  TORCH_CHECK(rc == 0, "sparsekernels: block_sparse_attention_cuda failed to launch (code ", rc,
              ")");
  return {out, stats};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(sparsekernels_C, m) {
  m.def(
      "block_sparse_attention_cuda(Tensor q, Tensor k, Tensor v, Tensor kv_idx, Tensor kv_cnt, "
      "Tensor? mask, bool causal, int window, float scale, int block_q, int block_k) -> "
      "(Tensor, Tensor)",
      &block_sparse_attention_cuda);
}

}  // namespace cuda
}  // namespace sparsekernels
