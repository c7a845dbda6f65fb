// CUDA kernels of sparsekernels::bsr_linear (forward), bsr_dsd (input gradient) and
// bsr_sdd (weight gradient). No torch headers: see bsr_linear.cuh for the API and
// bsr_linear_binding.cpp for the torch glue.
//
// Forward and input gradient are one "block-row product": output column block r gathers,
// for each stored block p of its row in the index (ptr[r] <= p < ptr[r+1]), the input
// columns idx[p]*BI:+BI times the block seen as [BI in][BO out]. Forward: BO = bm,
// BI = bk, the block [bm][bk] is [out][in] (out-major). Input gradient: BO = bk, BI = bm,
// the block values[perm[p]] is [in][out]. One CTA computes a tile of kTileM tokens x BO
// outputs, staging kTileM x KC slices of x and BO x KC slices of the block in shared
// memory; fp16/bf16 multiply on the tensor cores (WMMA 16x16x16, fp32 accumulators),
// fp32 with plain FMAs. Empty block rows write bias (or zeros).
//
// The weight gradient runs one CTA per (stored block, token range): blocks of g.T @ x,
// accumulated in fp32 over token chunks; several token ranges (when the stored blocks
// alone cannot fill the GPU) write fp32 partials that a second kernel sums in order.
//
// Staging is single-buffered (load, sync, multiply, sync) with 16-byte global reads where
// the operands are aligned: simple and correct first; the Triton kernels
// (sparsekernels/ops/triton/bsr_linear.py) are the tuned path.
#include "bsr_linear.cuh"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>

#include <climits>
#include <type_traits>

namespace sparsekernels {
namespace cuda {
namespace {

using namespace nvcuda;

// --- element conversions ---------------------------------------------------------------
template <typename T>
struct Convert;

template <>
struct Convert<float> {
  static __device__ __forceinline__ float to_float(float v) { return v; }
  static __device__ __forceinline__ float from_float(float v) { return v; }
};

template <>
struct Convert<__half> {
  static __device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
  static __device__ __forceinline__ __half from_float(float v) { return __float2half_rn(v); }
};

template <>
struct Convert<__nv_bfloat16> {
  static __device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
  static __device__ __forceinline__ __nv_bfloat16 from_float(float v) {
    return __float2bfloat16_rn(v);
  }
};

// WMMA needs sm_70 for fp16 and sm_80 for bf16. Builds for older architectures (a wide
// TORCH_CUDA_ARCH_LIST) get a trapping stub there; the binding refuses such devices first.
template <typename T>
__host__ __device__ constexpr bool wmma_supported() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 700
  return false;
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  return !std::is_same<T, __nv_bfloat16>::value;
#else
  return true;
#endif
}

// --- launch constants ------------------------------------------------------------------
constexpr int kTileM = 64;         // tokens per CTA in the block-row product
constexpr int kWmmaThreads = 128;  // 4 warps, one 16-token slab each
constexpr int kFmaThreads = 256;   // 16 x 16 threads
constexpr int kFmaChunk = 16;      // in-dim slice staged per step (fp32 path)
constexpr int kPad = 8;            // row padding (elements) of the WMMA staging tiles
constexpr int kSddThreads = 256;   // 8 warps
constexpr int kSddWarps = kSddThreads / 32;
constexpr int kSddWmmaChunk = 32;  // tokens staged per step (fp16/bf16)
constexpr int kSddFmaChunk = 16;   // tokens staged per step (fp32)
constexpr int kSplitQuantum = 32;  // tokens per split are a multiple of this
constexpr int kMinTokensPerSplit = 1024;

// --- shared-memory staging -------------------------------------------------------------
// Global reads are 16 bytes wide (kVec<T> elements) when the host found the operand
// aligned for it (`vec`), else one element wide; either way consecutive threads read
// consecutive addresses (coalesced). Shared-memory writes are element-wise.
template <typename T>
constexpr int kVec = 16 / static_cast<int>(sizeof(T));

// v[0:kVec] = src[0:kVec], src 16-byte aligned
template <typename T>
__device__ __forceinline__ void load_vec(T (&v)[kVec<T>], const T* __restrict__ src) {
  const uint4 bits = *reinterpret_cast<const uint4*>(src);
  const T* e = reinterpret_cast<const T*>(&bits);
#pragma unroll
  for (int j = 0; j < kVec<T>; ++j) v[j] = e[j];
}

// dst[r][c] (row stride LD) = src[(m0 + r) * stride + c] for r < ROWS, c < COLS; zero
// for rows at or past `limit`. vec: src and stride are 16-byte aligned.
template <typename T, int ROWS, int COLS, int LD, int NT>
__device__ __forceinline__ void stage_rows(T* dst, const T* __restrict__ src, int64_t stride,
                                           int64_t m0, int64_t limit, bool vec) {
  constexpr int V = kVec<T>;
  static_assert(COLS % V == 0, "staged widths are multiples of 16 bytes");
  if (vec) {
    for (int l = threadIdx.x; l < ROWS * COLS / V; l += NT) {
      const int r = l / (COLS / V);
      const int c = (l % (COLS / V)) * V;
      const int64_t t = m0 + r;
      T v[V];
      if (t < limit) {
        load_vec<T>(v, src + t * stride + c);
      } else {
#pragma unroll
        for (int j = 0; j < V; ++j) v[j] = Convert<T>::from_float(0.f);
      }
#pragma unroll
      for (int j = 0; j < V; ++j) dst[r * LD + c + j] = v[j];
    }
  } else {
    for (int l = threadIdx.x; l < ROWS * COLS; l += NT) {
      const int r = l / COLS;
      const int c = l % COLS;
      const int64_t t = m0 + r;
      dst[r * LD + c] = t < limit ? src[t * stride + c] : Convert<T>::from_float(0.f);
    }
  }
}

// dst[o][i] (row stride LD) = element (o, k0 + i) of the block at wb seen as [BO out] x
// [block_in in], for o < BO, i < KC. out_major: the block is stored [BO][block_in]
// (forward), else [block_in][BO] (input gradient). Reads follow the storage order.
// vec: wb is 16-byte aligned (then so is every run read, as BO, KC, k0 are multiples of 16).
template <typename T, int BO, int KC, int LD, int NT>
__device__ __forceinline__ void stage_block(T* dst, const T* __restrict__ wb, int block_in,
                                            int k0, bool out_major, bool vec) {
  constexpr int V = kVec<T>;
  static_assert(KC % V == 0 && BO % V == 0, "block runs are multiples of 16 bytes");
  if (vec && out_major) {
    for (int l = threadIdx.x; l < BO * KC / V; l += NT) {
      const int o = l / (KC / V);
      const int i = (l % (KC / V)) * V;
      T v[V];
      load_vec<T>(v, wb + static_cast<int64_t>(o) * block_in + k0 + i);
#pragma unroll
      for (int j = 0; j < V; ++j) dst[o * LD + i + j] = v[j];
    }
  } else if (vec) {
    for (int l = threadIdx.x; l < BO * KC / V; l += NT) {
      const int i = l / (BO / V);
      const int o = (l % (BO / V)) * V;
      T v[V];
      load_vec<T>(v, wb + static_cast<int64_t>(k0 + i) * BO + o);
#pragma unroll
      for (int j = 0; j < V; ++j) dst[(o + j) * LD + i] = v[j];
    }
  } else if (out_major) {
    for (int l = threadIdx.x; l < BO * KC; l += NT) {
      const int o = l / KC;
      const int i = l % KC;
      dst[o * LD + i] = wb[static_cast<int64_t>(o) * block_in + k0 + i];
    }
  } else {
    for (int l = threadIdx.x; l < BO * KC; l += NT) {
      const int i = l / BO;
      const int o = l % BO;
      dst[o * LD + i] = wb[static_cast<int64_t>(k0 + i) * BO + o];
    }
  }
}

// --- block-row product (forward and input gradient) ------------------------------------
template <typename T>
struct RowblockArgs {
  const T* x;            // [tokens, *] rows stride_x apart
  int64_t stride_x;
  const T* values;       // [nnz, BO * block_in]
  const int32_t* ptr;    // [block_rows + 1]
  const int32_t* idx;    // input block of each stored block
  const int32_t* perm;   // values index of each stored block, or null (identity)
  const T* bias;         // [block_rows * BO] or null
  T* out;                // [tokens, block_rows * BO] rows stride_out apart
  int64_t stride_out;
  int64_t tokens;
  int block_in;
  bool out_major;
  bool vec_x;  // x and stride_x allow 16-byte reads
  bool vec_w;  // values allow 16-byte reads
};

template <typename T, int BO, int KC>
__device__ __forceinline__ void rowblock_wmma(const RowblockArgs<T>& a) {
  constexpr int LD = KC + kPad;
  constexpr int LDC = BO + 4;
  constexpr int NF = BO / 16;
  constexpr int kStageBytes = (kTileM + BO) * LD * static_cast<int>(sizeof(T));
  constexpr int kEpilogueBytes = kTileM * LDC * static_cast<int>(sizeof(float));
  __shared__ __align__(128) unsigned char smem[kStageBytes > kEpilogueBytes ? kStageBytes
                                                                             : kEpilogueBytes];
  T* xs = reinterpret_cast<T*>(smem);  // [kTileM][LD], A row-major
  T* ws = xs + kTileM * LD;            // [BO][LD], B column-major: B(i, o) = ws[o][i]

  const int warp = threadIdx.x / 32;
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * kTileM;
  const int r = blockIdx.y;
  const int start = a.ptr[r];
  const int end = a.ptr[r + 1];

  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[NF];
#pragma unroll
  for (int j = 0; j < NF; ++j) wmma::fill_fragment(acc[j], 0.f);

  for (int p = start; p < end; ++p) {
    const int64_t blk = a.perm != nullptr ? a.perm[p] : p;
    const T* wb = a.values + blk * BO * a.block_in;
    const T* xb = a.x + static_cast<int64_t>(a.idx[p]) * a.block_in;
    for (int k0 = 0; k0 < a.block_in; k0 += KC) {
      __syncthreads();  // the previous slice is consumed
      stage_rows<T, kTileM, KC, LD, kWmmaThreads>(xs, xb + k0, a.stride_x, m0, a.tokens,
                                                  a.vec_x);
      stage_block<T, BO, KC, LD, kWmmaThreads>(ws, wb, a.block_in, k0, a.out_major, a.vec_w);
      __syncthreads();
#pragma unroll
      for (int kk = 0; kk < KC; kk += 16) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> af;
        wmma::load_matrix_sync(af, xs + warp * 16 * LD + kk, LD);
#pragma unroll
        for (int j = 0; j < NF; ++j) {
          wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> bf;
          wmma::load_matrix_sync(bf, ws + j * 16 * LD + kk, LD);
          wmma::mma_sync(acc[j], af, bf, acc[j]);
        }
      }
    }
  }

  // epilogue: accumulators -> shared (reusing the staging space) -> + bias -> out
  __syncthreads();
  float* cs = reinterpret_cast<float*>(smem);  // [kTileM][LDC]
#pragma unroll
  for (int j = 0; j < NF; ++j) {
    wmma::store_matrix_sync(cs + warp * 16 * LDC + j * 16, acc[j], LDC, wmma::mem_row_major);
  }
  __syncthreads();
  const int64_t n0 = static_cast<int64_t>(r) * BO;
  for (int l = threadIdx.x; l < kTileM * BO; l += kWmmaThreads) {
    const int row = l / BO;
    const int o = l % BO;
    const int64_t t = m0 + row;
    if (t < a.tokens) {
      float v = cs[row * LDC + o];
      if (a.bias != nullptr) v += Convert<T>::to_float(a.bias[n0 + o]);
      a.out[t * a.stride_out + n0 + o] = Convert<T>::from_float(v);
    }
  }
}

template <typename T, int BO, int KC>
__global__ void __launch_bounds__(kWmmaThreads) bsr_rowblock_wmma_kernel(RowblockArgs<T> a) {
  if constexpr (wmma_supported<T>()) {
    rowblock_wmma<T, BO, KC>(a);
  } else {
    __trap();
  }
}

template <int BO>
__global__ void __launch_bounds__(kFmaThreads) bsr_rowblock_fma_kernel(RowblockArgs<float> a) {
  constexpr int KC = kFmaChunk;
  constexpr int LD = KC + 1;  // odd stride: column reads hit distinct banks
  constexpr int NA = kTileM / 16;
  constexpr int NB = BO / 16;
  __shared__ float xs[kTileM * LD];
  __shared__ float ws[BO * LD];

  const int tx = threadIdx.x % 16;  // outputs tx + 16 j
  const int ty = threadIdx.x / 16;  // tokens ty + 16 i
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * kTileM;
  const int r = blockIdx.y;
  const int start = a.ptr[r];
  const int end = a.ptr[r + 1];

  float acc[NA][NB];
#pragma unroll
  for (int i = 0; i < NA; ++i)
#pragma unroll
    for (int j = 0; j < NB; ++j) acc[i][j] = 0.f;

  for (int p = start; p < end; ++p) {
    const int64_t blk = a.perm != nullptr ? a.perm[p] : p;
    const float* wb = a.values + blk * BO * a.block_in;
    const float* xb = a.x + static_cast<int64_t>(a.idx[p]) * a.block_in;
    for (int k0 = 0; k0 < a.block_in; k0 += KC) {
      __syncthreads();
      stage_rows<float, kTileM, KC, LD, kFmaThreads>(xs, xb + k0, a.stride_x, m0, a.tokens,
                                                     a.vec_x);
      stage_block<float, BO, KC, LD, kFmaThreads>(ws, wb, a.block_in, k0, a.out_major,
                                                  a.vec_w);
      __syncthreads();
#pragma unroll
      for (int kk = 0; kk < KC; ++kk) {
        float xv[NA];
        float wv[NB];
#pragma unroll
        for (int i = 0; i < NA; ++i) xv[i] = xs[(ty + 16 * i) * LD + kk];
#pragma unroll
        for (int j = 0; j < NB; ++j) wv[j] = ws[(tx + 16 * j) * LD + kk];
#pragma unroll
        for (int i = 0; i < NA; ++i)
#pragma unroll
          for (int j = 0; j < NB; ++j) acc[i][j] = fmaf(xv[i], wv[j], acc[i][j]);
      }
    }
  }

  const int64_t n0 = static_cast<int64_t>(r) * BO;
#pragma unroll
  for (int i = 0; i < NA; ++i) {
    const int64_t t = m0 + ty + 16 * i;
    if (t >= a.tokens) continue;
#pragma unroll
    for (int j = 0; j < NB; ++j) {
      const int64_t n = n0 + tx + 16 * j;
      const float b = a.bias != nullptr ? a.bias[n] : 0.f;
      a.out[t * a.stride_out + n] = acc[i][j] + b;
    }
  }
}

// --- weight gradient -------------------------------------------------------------------
template <typename T>
struct SddArgs {
  const T* grad;  // [tokens, N] rows stride_grad apart
  int64_t stride_grad;
  const T* x;     // [tokens, K] rows stride_x apart
  int64_t stride_x;
  const int32_t* rows;
  const int32_t* cols;
  T* out;          // [nnz, BM, BK], written when partial is null
  float* partial;  // [splits, nnz, BM, BK] or null
  int64_t tokens;
  int64_t tokens_per_split;
  int64_t nnz;
  bool vec_grad;  // grad and stride_grad allow 16-byte reads
  bool vec_x;     // x and stride_x allow 16-byte reads
};

// Element (n, k) of block e: into out (T) or, with several splits, into the fp32 partials.
template <typename T, int BM, int BK>
__device__ __forceinline__ void sdd_store(const SddArgs<T>& a, int64_t e, int n, int k, float v) {
  const int64_t offset = (e * BM + n) * BK + k;
  if (a.partial != nullptr) {
    a.partial[static_cast<int64_t>(blockIdx.y) * a.nnz * BM * BK + offset] = v;
  } else {
    a.out[offset] = Convert<T>::from_float(v);
  }
}

template <typename T, int BM, int BK>
__device__ __forceinline__ void sdd_wmma(const SddArgs<T>& a) {
  constexpr int TC = kSddWmmaChunk;
  constexpr int LDG = BM + kPad;
  constexpr int LDX = BK + kPad;
  constexpr int FK = BK / 16;
  constexpr int NFR = (BM / 16) * FK;  // 16x16 output fragments of the block
  constexpr int NPW = (NFR + kSddWarps - 1) / kSddWarps;
  __shared__ __align__(128) T gs[TC * LDG];  // g rows: A = g.T, column-major
  __shared__ __align__(128) T xs[TC * LDX];  // x rows: B, row-major
  __shared__ __align__(128) float scratch[kSddWarps][16 * 16];

  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int64_t e = blockIdx.x;
  const int64_t n0 = static_cast<int64_t>(a.rows[e]) * BM;
  const int64_t k0 = static_cast<int64_t>(a.cols[e]) * BK;
  const int64_t t_begin = static_cast<int64_t>(blockIdx.y) * a.tokens_per_split;
  const int64_t t_end = min(a.tokens, t_begin + a.tokens_per_split);

  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[NPW];
#pragma unroll
  for (int q = 0; q < NPW; ++q) wmma::fill_fragment(acc[q], 0.f);

  for (int64_t t0 = t_begin; t0 < t_end; t0 += TC) {
    __syncthreads();
    stage_rows<T, TC, BM, LDG, kSddThreads>(gs, a.grad + n0, a.stride_grad, t0, t_end,
                                            a.vec_grad);
    stage_rows<T, TC, BK, LDX, kSddThreads>(xs, a.x + k0, a.stride_x, t0, t_end, a.vec_x);
    __syncthreads();
#pragma unroll
    for (int q = 0; q < NPW; ++q) {
      const int f = warp + q * kSddWarps;
      if (f < NFR) {  // uniform across the warp
        const int fm = f / FK;
        const int fk = f % FK;
#pragma unroll
        for (int kk = 0; kk < TC; kk += 16) {
          wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::col_major> af;
          wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> bf;
          wmma::load_matrix_sync(af, gs + kk * LDG + fm * 16, LDG);
          wmma::load_matrix_sync(bf, xs + kk * LDX + fk * 16, LDX);
          wmma::mma_sync(acc[q], af, bf, acc[q]);
        }
      }
    }
  }

#pragma unroll
  for (int q = 0; q < NPW; ++q) {
    const int f = warp + q * kSddWarps;
    if (f < NFR) {
      const int fm = f / FK;
      const int fk = f % FK;
      wmma::store_matrix_sync(scratch[warp], acc[q], 16, wmma::mem_row_major);
      __syncwarp();
      for (int l = lane; l < 16 * 16; l += 32) {
        sdd_store<T, BM, BK>(a, e, fm * 16 + l / 16, fk * 16 + l % 16, scratch[warp][l]);
      }
      __syncwarp();
    }
  }
}

template <typename T, int BM, int BK>
__global__ void __launch_bounds__(kSddThreads) bsr_sdd_wmma_kernel(SddArgs<T> a) {
  if constexpr (wmma_supported<T>()) {
    sdd_wmma<T, BM, BK>(a);
  } else {
    __trap();
  }
}

template <int BM, int BK>
__global__ void __launch_bounds__(kSddThreads) bsr_sdd_fma_kernel(SddArgs<float> a) {
  constexpr int TC = kSddFmaChunk;
  constexpr int NA = BM / 16;
  constexpr int NB = BK / 16;
  __shared__ float gs[TC * BM];
  __shared__ float xs[TC * BK];

  const int tx = threadIdx.x % 16;  // block columns tx + 16 j
  const int ty = threadIdx.x / 16;  // block rows ty + 16 i
  const int64_t e = blockIdx.x;
  const int64_t n0 = static_cast<int64_t>(a.rows[e]) * BM;
  const int64_t k0 = static_cast<int64_t>(a.cols[e]) * BK;
  const int64_t t_begin = static_cast<int64_t>(blockIdx.y) * a.tokens_per_split;
  const int64_t t_end = min(a.tokens, t_begin + a.tokens_per_split);

  float acc[NA][NB];
#pragma unroll
  for (int i = 0; i < NA; ++i)
#pragma unroll
    for (int j = 0; j < NB; ++j) acc[i][j] = 0.f;

  for (int64_t t0 = t_begin; t0 < t_end; t0 += TC) {
    __syncthreads();
    stage_rows<float, TC, BM, BM, kSddThreads>(gs, a.grad + n0, a.stride_grad, t0, t_end,
                                               a.vec_grad);
    stage_rows<float, TC, BK, BK, kSddThreads>(xs, a.x + k0, a.stride_x, t0, t_end, a.vec_x);
    __syncthreads();
#pragma unroll
    for (int tt = 0; tt < TC; ++tt) {
      float gv[NA];
      float xv[NB];
#pragma unroll
      for (int i = 0; i < NA; ++i) gv[i] = gs[tt * BM + ty + 16 * i];
#pragma unroll
      for (int j = 0; j < NB; ++j) xv[j] = xs[tt * BK + tx + 16 * j];
#pragma unroll
      for (int i = 0; i < NA; ++i)
#pragma unroll
        for (int j = 0; j < NB; ++j) acc[i][j] = fmaf(gv[i], xv[j], acc[i][j]);
    }
  }

#pragma unroll
  for (int i = 0; i < NA; ++i)
#pragma unroll
    for (int j = 0; j < NB; ++j) sdd_store<float, BM, BK>(a, e, ty + 16 * i, tx + 16 * j, acc[i][j]);
}

// out[i] = sum over s of partial[s][i], in split order (deterministic).
template <typename T>
__global__ void sum_splits_kernel(const float* __restrict__ partial, T* __restrict__ out,
                                  int64_t count, int splits) {
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < count;
       i += step) {
    float v = 0.f;
    for (int s = 0; s < splits; ++s) v += partial[s * count + i];
    out[i] = Convert<T>::from_float(v);
  }
}

// --- host-side dispatch ----------------------------------------------------------------
template <typename T>
struct Tag {
  using type = T;
};

template <typename F>
cudaError_t with_dtype(ScalarType dtype, F&& f) {
  switch (dtype) {
    case ScalarType::kFloat32: return f(Tag<float>{});
    case ScalarType::kFloat16: return f(Tag<__half>{});
    case ScalarType::kBFloat16: return f(Tag<__nv_bfloat16>{});
  }
  return cudaErrorInvalidValue;
}

template <typename F>
cudaError_t with_block(int b, F&& f) {
  switch (b) {
    case 16: return f(std::integral_constant<int, 16>{});
    case 32: return f(std::integral_constant<int, 32>{});
    case 64: return f(std::integral_constant<int, 64>{});
    case 128: return f(std::integral_constant<int, 128>{});
  }
  return cudaErrorInvalidValue;
}

bool valid_block(int b) { return b == 16 || b == 32 || b == 64 || b == 128; }

// Rows of `p` spaced `stride` elements of `elem` bytes apart can be read 16 bytes at a time.
bool rows_aligned16(const void* p, int64_t stride, size_t elem) {
  return reinterpret_cast<uintptr_t>(p) % 16 == 0 && (stride * static_cast<int64_t>(elem)) % 16 == 0;
}

template <typename T, int BO>
cudaError_t launch_rowblock(const RowblockArgs<T>& a, int64_t block_rows, cudaStream_t stream) {
  if (a.tokens <= 0 || block_rows <= 0) return cudaSuccess;
  const int64_t tiles = (a.tokens + kTileM - 1) / kTileM;
  if (block_rows > kMaxBlockRows || tiles > INT_MAX) return cudaErrorInvalidValue;
  const dim3 grid(static_cast<unsigned>(tiles), static_cast<unsigned>(block_rows));
  if constexpr (std::is_same<T, float>::value) {
    bsr_rowblock_fma_kernel<BO><<<grid, kFmaThreads, 0, stream>>>(a);
  } else if (a.block_in % 32 == 0) {
    bsr_rowblock_wmma_kernel<T, BO, 32><<<grid, kWmmaThreads, 0, stream>>>(a);
  } else {
    bsr_rowblock_wmma_kernel<T, BO, 16><<<grid, kWmmaThreads, 0, stream>>>(a);
  }
  return cudaGetLastError();
}

template <typename T>
cudaError_t run_rowblock(const RowblockArgs<T>& a, int block_out, int64_t block_rows,
                         cudaStream_t stream) {
  return with_block(block_out, [&](auto bo) {
    return launch_rowblock<T, decltype(bo)::value>(a, block_rows, stream);
  });
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

int64_t tokens_per_split(int64_t tokens, int splits) {
  return ceil_div(ceil_div(tokens, splits), kSplitQuantum) * kSplitQuantum;
}

}  // namespace

// --- public API ------------------------------------------------------------------------
cudaError_t bsr_linear_forward(ScalarType dtype, const void* x, int64_t stride_x,
                               const void* values, const int32_t* crow_indices,
                               const int32_t* col_indices, const void* bias, void* y,
                               int64_t stride_y, int64_t tokens, int64_t block_rows,
                               int block_m, int block_k, cudaStream_t stream) {
  if (!valid_block(block_m) || !valid_block(block_k)) return cudaErrorInvalidValue;
  return with_dtype(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    const RowblockArgs<T> a{static_cast<const T*>(x), stride_x, static_cast<const T*>(values),
                            crow_indices, col_indices, nullptr, static_cast<const T*>(bias),
                            static_cast<T*>(y), stride_y, tokens, block_k, true,
                            rows_aligned16(x, stride_x, sizeof(T)),
                            rows_aligned16(values, 0, sizeof(T))};
    return run_rowblock<T>(a, block_m, block_rows, stream);
  });
}

cudaError_t bsr_dsd(ScalarType dtype, const void* grad, int64_t stride_grad, const void* values,
                    const int32_t* ccol_indices, const int32_t* row_indices_t,
                    const int32_t* transpose_perm, void* out, int64_t stride_out,
                    int64_t tokens, int64_t block_cols, int block_m, int block_k,
                    cudaStream_t stream) {
  if (!valid_block(block_m) || !valid_block(block_k)) return cudaErrorInvalidValue;
  return with_dtype(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    const RowblockArgs<T> a{static_cast<const T*>(grad), stride_grad,
                            static_cast<const T*>(values), ccol_indices, row_indices_t,
                            transpose_perm, nullptr, static_cast<T*>(out), stride_out, tokens,
                            block_m, false, rows_aligned16(grad, stride_grad, sizeof(T)),
                            rows_aligned16(values, 0, sizeof(T))};
    return run_rowblock<T>(a, block_k, block_cols, stream);
  });
}

int bsr_sdd_splits(int64_t tokens, int64_t nnz, int num_sms) {
  if (tokens <= 0 || nnz <= 0) return 1;
  int64_t splits = ceil_div(2 * static_cast<int64_t>(num_sms > 0 ? num_sms : 1), nnz);
  splits = min(splits, ceil_div(tokens, kMinTokensPerSplit));
  splits = min(splits, kMaxBlockRows);
  return static_cast<int>(splits > 1 ? splits : 1);
}

size_t bsr_sdd_workspace_bytes(int64_t nnz, int block_m, int block_k, int splits) {
  if (splits <= 1) return 0;
  return static_cast<size_t>(splits) * nnz * block_m * block_k * sizeof(float);
}

cudaError_t bsr_sdd(ScalarType dtype, const void* grad, int64_t stride_grad, const void* x,
                    int64_t stride_x, const int32_t* row_indices, const int32_t* col_indices,
                    void* out, int64_t tokens, int64_t nnz, int block_m, int block_k,
                    int splits, float* workspace, cudaStream_t stream) {
  if (!valid_block(block_m) || !valid_block(block_k) || splits < 1 || nnz > INT_MAX ||
      splits > kMaxBlockRows) {
    return cudaErrorInvalidValue;
  }
  if (nnz <= 0) return cudaSuccess;
  return with_dtype(dtype, [&](auto tag) -> cudaError_t {
    using T = typename decltype(tag)::type;
    const int64_t count = nnz * block_m * block_k;
    if (tokens <= 0) {  // an empty sum: all-zero bytes are 0.0 in every supported dtype
      return cudaMemsetAsync(out, 0, static_cast<size_t>(count) * sizeof(T), stream);
    }
    const int64_t per_split = tokens_per_split(tokens, splits);
    const int used = static_cast<int>(ceil_div(tokens, per_split));  // <= splits
    if (used > 1 && workspace == nullptr) return cudaErrorInvalidValue;
    const SddArgs<T> a{static_cast<const T*>(grad), stride_grad, static_cast<const T*>(x),
                       stride_x, row_indices, col_indices, static_cast<T*>(out),
                       used > 1 ? workspace : nullptr, tokens, per_split, nnz,
                       rows_aligned16(grad, stride_grad, sizeof(T)),
                       rows_aligned16(x, stride_x, sizeof(T))};
    const dim3 grid(static_cast<unsigned>(nnz), static_cast<unsigned>(used));
    cudaError_t err = with_block(block_m, [&](auto bm) {
      return with_block(block_k, [&](auto bk) {
        constexpr int BM = decltype(bm)::value;
        constexpr int BK = decltype(bk)::value;
        if constexpr (std::is_same<T, float>::value) {
          bsr_sdd_fma_kernel<BM, BK><<<grid, kSddThreads, 0, stream>>>(a);
        } else {
          bsr_sdd_wmma_kernel<T, BM, BK><<<grid, kSddThreads, 0, stream>>>(a);
        }
        return cudaGetLastError();
      });
    });
    if (err != cudaSuccess || used == 1) return err;
    const int threads = 256;
    const int64_t blocks = min(ceil_div(count, threads), static_cast<int64_t>(65535));
    sum_splits_kernel<T><<<static_cast<unsigned>(blocks), threads, 0, stream>>>(
        workspace, static_cast<T*>(out), count, used);
    return cudaGetLastError();
  });
}

}  // namespace cuda
}  // namespace sparsekernels
