// Block-sparse attention forward on CUDA: one thread block per (query block, batch*head),
// FlashAttention-style online softmax over only the key blocks stored for that query block.
// Grouped-query attention: k and v have H / group heads, query head h reads head h / group.
// Positions: query i sits at Lk - Lq + i (the queries end the keys, as in a KV cache);
// causal keeps keys j <= Lk - Lq + i, a window w keeps (Lk - Lq + i) - j < w (and without
// causal j - (Lk - Lq + i) < w). The index lists only blocks those leave non-empty.
//
// No torch headers here (the file compile-checks with plain `nvcc -std=c++17 -arch=sm_90 -c`);
// block_sparse_attention_binding.cpp holds the torch glue. fp16/bf16 run both products on
// tensor cores (WMMA 16x16x16, fp32 accumulation); fp32 runs them on CUDA cores in fp32
// (no silent tf32). The backward of the `cuda` backend runs on the Triton kernels, which read
// the same softmax statistics this kernel writes:
//   stats [B, H, 2, Lq] fp32: row max of the scores in log2 units (+inf on rows with no
//   allowed key) and log2 of the row sum of exp2(score - max).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>

#include <cmath>
#include <cstdint>

namespace sparsekernels {
namespace cuda {
namespace {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kMaskFloor = -1.0e30f;  // finite masks stay finite in log2 units
constexpr int kThreads = 128;           // 4 warps
constexpr int kWarps = kThreads / 32;

// mask kinds
enum MaskKind : int { kNoMask = 0, kBoolMask = 1, kFloatMask = 2, kHalfMask = 3, kBf16Mask = 4 };

struct Params {
  const void* q;
  const void* k;
  const void* v;
  void* out;
  float* stats;
  const int32_t* kv_idx;  // [B, H, nq, nk] contiguous
  const int32_t* kv_cnt;  // [B, H, nq] contiguous
  const void* mask;
  int mask_kind;
  int64_t sq[3], sk[3], sv[3], so[3];  // batch, head, row strides; unit stride along D
  int64_t sm[4];                       // mask strides (0 on broadcast dims)
  int B, H, Lq, Lk, nq, nk, bq, bk;
  int group;   // query heads per key/value head
  int offset;  // the position of query 0: Lk - Lq
  int window;  // 0: none
  float qk_scale;  // scale * log2(e)
  bool causal;
};

// cuda_fp16 / cuda_bf16 types convert to and from float (round to nearest even)
template <typename T>
__device__ __forceinline__ float to_float(T x) {
  return static_cast<float>(x);
}

template <typename T>
__device__ __forceinline__ T from_float(float x) {
  return static_cast<T>(x);
}

// Score of one element in log2 units, -inf when not allowed.
__device__ __forceinline__ float finish_score(const Params& p, float dot, int b, int h, int i,
                                              int j) {
  if (i >= p.Lq || j >= p.Lk) return -INFINITY;
  const int dist = i + p.offset - j;  // query position - key position
  if (p.causal && dist < 0) return -INFINITY;
  if (p.window > 0 && (dist >= p.window || (!p.causal && -dist >= p.window))) return -INFINITY;
  float s = dot * p.qk_scale;
  if (p.mask_kind != kNoMask) {
    const int64_t off = b * p.sm[0] + h * p.sm[1] + i * p.sm[2] + j * p.sm[3];
    if (p.mask_kind == kBoolMask) {
      if (!static_cast<const uint8_t*>(p.mask)[off]) return -INFINITY;
    } else {
      float m;
      if (p.mask_kind == kFloatMask) m = static_cast<const float*>(p.mask)[off];
      else if (p.mask_kind == kHalfMask) m = __half2float(static_cast<const __half*>(p.mask)[off]);
      else m = __bfloat162float(static_cast<const __nv_bfloat16*>(p.mask)[off]);
      if (m != -INFINITY) m = fmaxf(m, kMaskFloor);
      s += m * kLog2e;
    }
  }
  return s;
}

// rows x D tile from global (row stride ld, unit stride along D) to shared, zero past `valid`.
template <typename T, int D>
__device__ void load_tile(T* dst, const T* src, int64_t ld, int rows, int valid) {
  for (int e = threadIdx.x; e < rows * D; e += blockDim.x) {
    const int r = e / D, d = e % D;
    dst[e] = r < valid ? src[r * ld + d] : from_float<T>(0.f);
  }
}

// Shared-memory layout (dynamic): Q [bq][D] T | KV [bk][D] T | S [bq][bk] f32 | P [bq][bk] T |
// O [bq][D] f32 | m, l [bq] f32.
template <typename T, int D>
struct Smem {
  T* q;
  T* kv;
  float* s;
  T* pm;
  float* o;
  float* m;
  float* l;
  __device__ Smem(char* base, int bq, int bk) {
    q = reinterpret_cast<T*>(base);
    kv = q + bq * D;
    s = reinterpret_cast<float*>(kv + bk * D);
    pm = reinterpret_cast<T*>(s + bq * bk);
    o = reinterpret_cast<float*>(pm + bq * bk);
    m = o + bq * D;
    l = m + bq;
  }
  static size_t bytes(int bq, int bk) {
    return sizeof(T) * (size_t(bq) * D + size_t(bk) * D + size_t(bq) * bk) +
           sizeof(float) * (size_t(bq) * bk + size_t(bq) * D + 2 * size_t(bq));
  }
};

// S = Q K^T (raw dot products, fp32).
template <typename T, int D>
struct Products {
  // SIMT fallback (fp32 inputs): each thread computes whole dot products.
  static __device__ void scores(const Smem<T, D>& sm, int bq, int bk) {
    for (int e = threadIdx.x; e < bq * bk; e += blockDim.x) {
      const int i = e / bk, j = e % bk;
      const T* qi = sm.q + i * D;
      const T* kj = sm.kv + j * D;
      float acc = 0.f;
#pragma unroll 8
      for (int d = 0; d < D; ++d) acc += to_float(qi[d]) * to_float(kj[d]);
      sm.s[e] = acc;
    }
  }
  // O += P V
  static __device__ void accumulate(const Smem<T, D>& sm, int bq, int bk) {
    for (int e = threadIdx.x; e < bq * D; e += blockDim.x) {
      const int i = e / D, d = e % D;
      const T* pi = sm.pm + i * bk;
      float acc = 0.f;
      for (int j = 0; j < bk; ++j) acc += to_float(pi[j]) * to_float(sm.kv[j * D + d]);
      sm.o[e] += acc;
    }
  }
};

// Tensor cores for fp16 / bf16.
template <typename T, int D>
struct WmmaProducts {
  static __device__ void scores(const Smem<T, D>& sm, int bq, int bk) {
    using namespace nvcuda;
    const int warp = threadIdx.x / 32;
    const int tiles_n = bk / 16, tiles = (bq / 16) * tiles_n;
    for (int t = warp; t < tiles; t += kWarps) {
      const int ti = t / tiles_n, tj = t % tiles_n;
      wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
      wmma::fill_fragment(acc, 0.f);
#pragma unroll
      for (int d = 0; d < D; d += 16) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a;
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> b;  // K^T
        wmma::load_matrix_sync(a, sm.q + ti * 16 * D + d, D);
        wmma::load_matrix_sync(b, sm.kv + tj * 16 * D + d, D);
        wmma::mma_sync(acc, a, b, acc);
      }
      wmma::store_matrix_sync(sm.s + ti * 16 * bk + tj * 16, acc, bk, wmma::mem_row_major);
    }
  }
  static __device__ void accumulate(const Smem<T, D>& sm, int bq, int bk) {
    using namespace nvcuda;
    const int warp = threadIdx.x / 32;
    constexpr int tiles_n = D / 16;
    const int tiles = (bq / 16) * tiles_n;
    for (int t = warp; t < tiles; t += kWarps) {
      const int ti = t / tiles_n, tj = t % tiles_n;
      wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
      float* o = sm.o + ti * 16 * D + tj * 16;
      wmma::load_matrix_sync(acc, o, D, wmma::mem_row_major);
      for (int j = 0; j < bk; j += 16) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a;
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> b;
        wmma::load_matrix_sync(a, sm.pm + ti * 16 * bk + j, bk);
        wmma::load_matrix_sync(b, sm.kv + j * D + tj * 16, D);
        wmma::mma_sync(acc, a, b, acc);
      }
      wmma::store_matrix_sync(o, acc, D, wmma::mem_row_major);
    }
  }
};

template <typename T, int D>
struct ProductsFor {
  using type = WmmaProducts<T, D>;
};
template <int D>
struct ProductsFor<float, D> {
  using type = Products<float, D>;
};

template <typename T, int D>
__global__ void __launch_bounds__(kThreads)
    bsa_forward_kernel(const Params p) {
  extern __shared__ __align__(128) char smem_raw[];
  using Prod = typename ProductsFor<T, D>::type;
  const int bq = p.bq, bk = p.bk;
  Smem<T, D> sm(smem_raw, bq, bk);
  const int qb = blockIdx.x, bh = blockIdx.y, b = bh / p.H, h = bh % p.H;
  const int q0 = qb * bq;
  const int qr = min(bq, p.Lq - q0);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;

  load_tile<T, D>(sm.q, static_cast<const T*>(p.q) + b * p.sq[0] + h * p.sq[1] + q0 * p.sq[2],
                  p.sq[2], bq, qr);
  for (int e = threadIdx.x; e < bq * D; e += blockDim.x) sm.o[e] = 0.f;
  for (int r = threadIdx.x; r < bq; r += blockDim.x) {
    sm.m[r] = -INFINITY;
    sm.l[r] = 0.f;
  }
  const int64_t item = static_cast<int64_t>(bh) * p.nq + qb;
  const int32_t* idx = p.kv_idx + item * p.nk;
  const int cnt = p.kv_cnt[item];
  const int hk = h / p.group;
  const T* kbase = static_cast<const T*>(p.k) + b * p.sk[0] + hk * p.sk[1];
  const T* vbase = static_cast<const T*>(p.v) + b * p.sv[0] + hk * p.sv[1];

  for (int e = 0; e < cnt; ++e) {
    const int k0 = idx[e] * bk;
    const int kr = min(bk, p.Lk - k0);
    __syncthreads();  // previous P V done with the KV buffer
    load_tile<T, D>(sm.kv, kbase + k0 * p.sk[2], p.sk[2], bk, kr);
    __syncthreads();
    Prod::scores(sm, bq, bk);
    __syncthreads();
    // online softmax, one warp per row; P in T for the second product
    for (int r = warp; r < bq; r += kWarps) {
      float* s = sm.s + r * bk;
      float mx = sm.m[r];
      for (int j = lane; j < bk; j += 32) {
        const float v = finish_score(p, s[j], b, h, q0 + r, k0 + j);
        s[j] = v;
        mx = fmaxf(mx, v);
      }
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
      const float shift = mx == -INFINITY ? 0.f : mx;
      float sum = 0.f;
      for (int j = lane; j < bk; j += 32) {
        const float pv = exp2f(s[j] - shift);
        sum += pv;
        sm.pm[r * bk + j] = from_float<T>(pv);
      }
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, o);
      const float alpha = exp2f(sm.m[r] - shift);
      for (int d = lane; d < D; d += 32) sm.o[r * D + d] *= alpha;
      __syncwarp();
      if (lane == 0) {
        sm.l[r] = sm.l[r] * alpha + sum;
        sm.m[r] = mx;
      }
    }
    __syncthreads();
    load_tile<T, D>(sm.kv, vbase + k0 * p.sv[2], p.sv[2], bk, kr);
    __syncthreads();
    Prod::accumulate(sm, bq, bk);
  }
  __syncthreads();
  T* out = static_cast<T*>(p.out) + b * p.so[0] + h * p.so[1] + q0 * p.so[2];
  for (int e = threadIdx.x; e < qr * D; e += blockDim.x) {
    const int r = e / D, d = e % D;
    const float l = sm.l[r];
    out[r * p.so[2] + d] = from_float<T>(l > 0.f ? sm.o[e] / l : 0.f);
  }
  float* st = p.stats + static_cast<int64_t>(bh) * 2 * p.Lq + q0;
  for (int r = threadIdx.x; r < qr; r += blockDim.x) {
    const bool live = sm.l[r] > 0.f;
    st[r] = live ? sm.m[r] : INFINITY;
    st[p.Lq + r] = live ? log2f(sm.l[r]) : 0.f;
  }
}

template <typename T, int D>
int launch(const Params& p, cudaStream_t stream) {
  const size_t smem = Smem<T, D>::bytes(p.bq, p.bk);
  int device = 0, max_smem = 0;
  cudaGetDevice(&device);
  cudaDeviceGetAttribute(&max_smem, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
  if (smem > static_cast<size_t>(max_smem)) return 2;  // blocks too large for this GPU
  if (smem > 48 * 1024 &&
      cudaFuncSetAttribute(bsa_forward_kernel<T, D>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                           static_cast<int>(smem)) != cudaSuccess)
    return 3;
  const dim3 grid(p.nq, p.B * p.H);
  bsa_forward_kernel<T, D><<<grid, kThreads, smem, stream>>>(p);
  return cudaGetLastError() == cudaSuccess ? 0 : 4;
}

template <typename T>
int launch_dim(const Params& p, int head_dim, cudaStream_t stream) {
  switch (head_dim) {
    case 32: return launch<T, 32>(p, stream);
    case 64: return launch<T, 64>(p, stream);
    case 128: return launch<T, 128>(p, stream);
    default: return 1;
  }
}

}  // namespace

// Returns 0 on success; 1 unsupported head dim / block size / dtype / head grouping, 2 blocks
// too large for shared memory, 3 shared-memory opt-in failed, 4 launch error. dtype: 0 fp32,
// 1 fp16, 2 bf16. Strides: q/k/v/out [batch, head, row] (unit stride along the head dim), mask
// [4]; k and v have kv_heads heads, which divide heads.
int block_sparse_attention_forward(
    const void* q, const void* k, const void* v, void* out, float* stats, const int32_t* kv_idx,
    const int32_t* kv_cnt, const void* mask, int mask_kind, const int64_t* q_strides,
    const int64_t* k_strides, const int64_t* v_strides, const int64_t* out_strides,
    const int64_t* mask_strides, int batch, int heads, int kv_heads, int len_q, int len_k,
    int head_dim, int block_q, int block_k, float scale, bool causal, int window, int dtype,
    cudaStream_t stream) {
  if (block_q % 16 || block_k % 16 || block_q < 16 || block_k < 16 || block_q > 128 ||
      block_k > 128 || kv_heads <= 0 || heads % kv_heads || window < 0)
    return 1;
  Params p;
  p.q = q;
  p.k = k;
  p.v = v;
  p.out = out;
  p.stats = stats;
  p.kv_idx = kv_idx;
  p.kv_cnt = kv_cnt;
  p.mask = mask;
  p.mask_kind = mask ? mask_kind : kNoMask;
  for (int i = 0; i < 3; ++i) {
    p.sq[i] = q_strides[i];
    p.sk[i] = k_strides[i];
    p.sv[i] = v_strides[i];
    p.so[i] = out_strides[i];
  }
  for (int i = 0; i < 4; ++i) p.sm[i] = mask ? mask_strides[i] : 0;
  p.B = batch;
  p.H = heads;
  p.Lq = len_q;
  p.Lk = len_k;
  p.bq = block_q;
  p.bk = block_k;
  p.nq = (len_q + block_q - 1) / block_q;
  p.nk = (len_k + block_k - 1) / block_k;
  p.group = heads / kv_heads;
  p.offset = len_k - len_q;
  p.window = window;
  p.qk_scale = scale * kLog2e;
  p.causal = causal;
  if (p.nq == 0 || batch * heads == 0) return 0;
  switch (dtype) {
    case 0: return launch_dim<float>(p, head_dim, stream);
    case 1: return launch_dim<__half>(p, head_dim, stream);
    case 2: return launch_dim<__nv_bfloat16>(p, head_dim, stream);
    default: return 1;
  }
}

}  // namespace cuda
}  // namespace sparsekernels
