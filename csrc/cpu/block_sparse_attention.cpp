// Block-sparse attention on the CPU: FlashAttention-style forward (online softmax) and
// backward (dK/dV per key block, dQ per query block) that visit only the stored
// (query block, key block) pairs of the layout.
//
// The layout arrives as the bool block mask [B or 1, H, nq, nk]; the kernel turns it into
// compressed lists (the key blocks of each query block, and for the backward the query blocks
// of each key block), dropping the blocks that causal masking empties, in one serial pass:
// no extra torch ops (each one wakes the thread pool) per call.
// Cost model (BENCH.md): 4 * bq * bk * D FLOPs and bq * bk exponentials per stored pair in
// the forward; nothing for a missing pair. Each work item (one query block of one head) keeps
// its Q panel, scores and output accumulator in L1/L2 and streams the K/V blocks it needs.
// The products use the register-blocked micro-kernel of microkernel.h; the exponential is a
// vectorised exp2 (range reduction + degree-7 polynomial, ~1 ulp in float).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <omp.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "glue.h"
#include "microkernel.h"

namespace sparsekernels {
namespace cpu {
namespace {

constexpr double kLog2e = 1.4426950408889634;
constexpr double kMaskFloor = -1.0e30;  // finite masks stay finite in log2 units

// C[m, BO] (+)= A[m, kdim] * B[kdim, BO]; A(r, k) = a[r * sa_r + k * sa_k], B row k at b + k*ldb.
template <typename T, int BO>
void gemm_fixed(int64_t m, const T* a, int64_t sa_r, int64_t sa_k, const T* b, int64_t ldb,
                int64_t kdim, T* c, int64_t ldc, bool accumulate) {
  constexpr int L = Vec<T>::L;
  constexpr int NV = BO / L;
  constexpr int MR = tile_rows<T, BO>();
  using V = typename Vec<T>::type;
  for (int64_t r0 = 0; r0 < m; r0 += MR) {
    const int mr = static_cast<int>(std::min<int64_t>(MR, m - r0));
    V acc[MR][NV];
    for (int r = 0; r < MR; ++r)
      for (int j = 0; j < NV; ++j)
        acc[r][j] = (accumulate && r < mr) ? loadu<T>(c + (r0 + r) * ldc + j * L) : V{};
    if (mr == MR)
      micro_kernel<T, BO, MR>(a + r0 * sa_r, sa_r, sa_k, b, ldb, kdim, acc);
    else
      micro_kernel_tail<T, BO, MR>(mr, a + r0 * sa_r, sa_r, sa_k, b, ldb, kdim, acc);
    for (int r = 0; r < mr; ++r)
      for (int j = 0; j < NV; ++j) storeu<T>(c + (r0 + r) * ldc + j * L, acc[r][j]);
  }
}

template <typename T>
void gemm(int64_t width, int64_t m, const T* a, int64_t sa_r, int64_t sa_k, const T* b,
          int64_t ldb, int64_t kdim, T* c, int64_t ldc, bool accumulate) {
  dispatch_block(
      width,
      [&](auto bo) {
        gemm_fixed<T, decltype(bo)::value>(m, a, sa_r, sa_k, b, ldb, kdim, c, ldc, accumulate);
      },
      "attention block size or head dim");
}

// --- exp2 ------------------------------------------------------------------------------------
typedef int32_t VInt __attribute__((vector_size(64)));

// 2^x for a vector of floats; exactly 0 below 2^-126 (and for -inf).
inline Vec<float>::type vexp2(Vec<float>::type x) {
  using V = Vec<float>::type;
  const V lo = V{} - 126.0f;
  const V xc = x < lo ? lo : x;
  const V t = xc + 0.5f;
  VInt ti = __builtin_convertvector(t, VInt);  // truncates toward zero
  V tf = __builtin_convertvector(ti, V);
  ti = tf > t ? ti - 1 : ti;  // floor
  tf = __builtin_convertvector(ti, V);
  const V f = xc - tf;  // in [-0.5, 0.5)
  V p = V{} + 1.525273380405984e-05f;
  p = p * f + 1.5403530393381608e-04f;
  p = p * f + 1.3333558146428443e-03f;
  p = p * f + 9.618129107628477e-03f;
  p = p * f + 5.550410866482158e-02f;
  p = p * f + 2.402265069591007e-01f;
  p = p * f + 6.931471805599453e-01f;
  p = p * f + 1.0f;
  const VInt bits = (ti + 127) << 23;
  const V r = p * reinterpret_cast<const V&>(bits);
  return x < lo ? V{} : r;
}

// p[j] = 2^(s[j] - shift) for j < n (n a multiple of 16 for floats); returns the sum.
inline float exp2_row(float* s, int64_t n, float shift) {
  using V = Vec<float>::type;
  V sum{};
  for (int64_t j = 0; j < n; j += 16) {
    const V p = vexp2(loadu<float>(s + j) - shift);
    storeu<float>(s + j, p);
    sum += p;
  }
  float total = 0.f;
  for (int i = 0; i < 16; ++i) total += sum[i];
  return total;
}

inline double exp2_row(double* s, int64_t n, double shift) {
  double total = 0.0;
  for (int64_t j = 0; j < n; ++j) {
    s[j] = std::exp2(s[j] - shift);
    total += s[j];
  }
  return total;
}

// max(init, s[0..n)); n a multiple of 16 for floats. -inf entries are fine (no NaN here).
inline float row_max(const float* s, int64_t n, float init) {
  using V = Vec<float>::type;
  V mx = V{} + init;
  for (int64_t j = 0; j < n; j += 16) {
    const V x = loadu<float>(s + j);
    mx = x > mx ? x : mx;
  }
  float out = init;
  for (int i = 0; i < 16; ++i) out = std::max(out, mx[i]);
  return out;
}

inline double row_max(const double* s, int64_t n, double init) {
  double out = init;
  for (int64_t j = 0; j < n; ++j) out = std::max(out, s[j]);
  return out;
}

// --- problem description -----------------------------------------------------------------------
template <typename T>
struct Problem {
  const T *q, *k, *v;
  int64_t sq[3], sk[3], sv[3];  // batch, head, row strides (unit stride along D)
  int64_t B, H, Lq, Lk, D, bq, bk, nq, nk;
  bool causal;
  T qk_scale;  // scale * log2(e)
  // mask, broadcast to [B, H, Lq, Lk] through strides
  const uint8_t* mask_bool = nullptr;
  const T* mask_add = nullptr;
  int64_t sm[4] = {0, 0, 0, 0};
};

// Scores of one (query block, key block) tile in log2 units, -inf where not allowed.
// S [qr, bk] holds q k^T on entry (rows = query rows of the block).
template <typename T>
void finish_scores(const Problem<T>& P, int64_t b, int64_t h, int64_t q0, int64_t qr,
                   int64_t k0, T* S) {
  const int64_t bk = P.bk;
  const T neg_inf = -std::numeric_limits<T>::infinity();
  const T scale = P.qk_scale;
  const bool full = k0 + bk <= P.Lk;
  const bool straddles = P.causal && k0 + bk - 1 > q0;
  const bool plain = full && !straddles && !P.mask_bool && !P.mask_add;
  for (int64_t r = 0; r < qr; ++r) {
    T* s = S + r * bk;
    if (plain) {
      for (int64_t j = 0; j < bk; ++j) s[j] *= scale;
      continue;
    }
    const int64_t i = q0 + r;
    const int64_t moff = b * P.sm[0] + h * P.sm[1] + i * P.sm[2];
    for (int64_t j = 0; j < bk; ++j) {
      const int64_t kj = k0 + j;
      bool ok = kj < P.Lk && !(P.causal && kj > i);
      T val = s[j] * scale;
      if (ok && P.mask_bool) ok = P.mask_bool[moff + kj * P.sm[3]] != 0;
      if (ok && P.mask_add) {
        T mv = P.mask_add[moff + kj * P.sm[3]];
        if (mv != neg_inf) mv = std::max<T>(mv, static_cast<T>(kMaskFloor));
        val += mv * static_cast<T>(kLog2e);
      }
      s[j] = ok ? val : neg_inf;
    }
  }
}

// K block [kr, D] -> Kt [D, bk], zero columns past kr. Reads K row by row (sequential, so
// the hardware prefetcher streams it from memory); the scattered writes stay in L1.
template <typename T>
void pack_transposed(const T* src, int64_t ld, int64_t kr, int64_t D, int64_t bk, T* dst) {
  for (int64_t j = 0; j < kr; ++j) {
    const T* row = src + j * ld;
    for (int64_t d = 0; d < D; ++d) dst[d * bk + j] = row[d];
  }
  for (int64_t d = 0; d < D; ++d)
    for (int64_t j = kr; j < bk; ++j) dst[d * bk + j] = T(0);
}

// Ask for the rows of a [rows, D] block ahead of use (the next stored key block).
template <typename T>
inline void prefetch_rows(const T* src, int64_t ld, int64_t rows, int64_t D) {
  constexpr int64_t per_line = 64 / sizeof(T);
  for (int64_t j = 0; j < rows; ++j)
    for (int64_t d = 0; d < D; d += per_line) __builtin_prefetch(src + j * ld + d, 0, 2);
}

// --- layout -> compressed block lists ----------------------------------------------------------
struct BlockLists {
  std::vector<int32_t> ptr;  // [B * H * rows + 1]
  std::vector<int32_t> idx;  // the allowed columns of each row, increasing
};

// Rows are query blocks (by_key = false) or key blocks (by_key = true) of every (b, h).
// layout: bool [Bl, H, nq, nk] contiguous, Bl = 1 (shared by the batch) or B.
inline BlockLists block_lists(const bool* layout, int64_t Bl, int64_t B, int64_t H, int64_t nq,
                              int64_t nk, int64_t bq, int64_t bk, bool causal, bool by_key) {
  const int64_t rows = by_key ? nk : nq, cols = by_key ? nq : nk;
  BlockLists out;
  out.ptr.reserve(B * H * rows + 1);
  out.ptr.push_back(0);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < H; ++h) {
      const bool* lay = layout + ((Bl == 1 ? 0 : b) * H + h) * nq * nk;
      for (int64_t r = 0; r < rows; ++r) {
        for (int64_t c = 0; c < cols; ++c) {
          const int64_t qb = by_key ? c : r, kb = by_key ? r : c;
          // causal (top-left): the block is empty when its first key is after its last query
          if (lay[qb * nk + kb] && !(causal && kb * bk > qb * bq + bq - 1))
            out.idx.push_back(static_cast<int32_t>(c));
        }
        out.ptr.push_back(static_cast<int32_t>(out.idx.size()));
      }
    }
  return out;
}

at::Tensor check_layout(const at::Tensor& layout, const at::Tensor& q, int64_t nq, int64_t nk) {
  TORCH_CHECK(layout.device().is_cpu() && layout.scalar_type() == at::kBool && layout.dim() == 4 &&
                  (layout.size(0) == 1 || layout.size(0) == q.size(0)) &&
                  layout.size(1) == q.size(1) && layout.size(2) == nq && layout.size(3) == nk,
              "sparsekernels: layout must be a bool CPU tensor [1 or B, H, nq, nk] = [1 or ",
              q.size(0), ", ", q.size(1), ", ", nq, ", ", nk, "], got ", layout.scalar_type(), " ",
              layout.sizes());
  return layout.contiguous();
}

// --- forward -----------------------------------------------------------------------------------
template <typename T>
void forward(const Problem<T>& P, const BlockLists& kv, T* out, T* stats) {
  const int64_t bq = P.bq, bk = P.bk, D = P.D;
  const int64_t items = P.B * P.H * P.nq;
#pragma omp parallel num_threads(at::get_num_threads())
  {
    std::vector<T> S(bq * bk), Kt(D * bk), O(bq * D), m(bq), l(bq);
#pragma omp for schedule(dynamic, 1)
    for (int64_t item = 0; item < items; ++item) {
      const int64_t qb = item % P.nq, bh = item / P.nq, b = bh / P.H, h = bh % P.H;
      const int64_t q0 = qb * bq, qr = std::min(bq, P.Lq - q0);
      const T* q = P.q + b * P.sq[0] + h * P.sq[1] + q0 * P.sq[2];
      const T* kbase = P.k + b * P.sk[0] + h * P.sk[1];
      const T* vbase = P.v + b * P.sv[0] + h * P.sv[1];
      const int32_t* idx = kv.idx.data() + kv.ptr[item];
      const int32_t cnt = kv.ptr[item + 1] - kv.ptr[item];
      std::fill(O.begin(), O.end(), T(0));
      std::fill(m.begin(), m.end(), -std::numeric_limits<T>::infinity());
      std::fill(l.begin(), l.end(), T(0));
      for (int32_t e = 0; e < cnt; ++e) {
        const int64_t k0 = static_cast<int64_t>(idx[e]) * bk;
        const int64_t kr = std::min(bk, P.Lk - k0);
        if (e + 1 < cnt) {  // the next pair's K and V come from memory at low density
          const int64_t n0 = static_cast<int64_t>(idx[e + 1]) * bk;
          const int64_t nr = std::min(bk, P.Lk - n0);
          prefetch_rows(kbase + n0 * P.sk[2], P.sk[2], nr, D);
          prefetch_rows(vbase + n0 * P.sv[2], P.sv[2], nr, D);
        }
        pack_transposed(kbase + k0 * P.sk[2], P.sk[2], kr, D, bk, Kt.data());
        gemm<T>(bk, qr, q, P.sq[2], 1, Kt.data(), bk, D, S.data(), bk, false);
        finish_scores(P, b, h, q0, qr, k0, S.data());
        for (int64_t r = 0; r < qr; ++r) {
          T* s = S.data() + r * bk;
          const T mx = row_max(s, bk, m[r]);
          const T shift = std::isinf(mx) ? T(0) : mx;
          const T alpha = std::exp2(m[r] - shift);
          l[r] = l[r] * alpha + exp2_row(s, bk, shift);
          m[r] = mx;
          T* o = O.data() + r * D;
          if (alpha != T(1))
            for (int64_t d = 0; d < D; ++d) o[d] *= alpha;
        }
        gemm<T>(D, qr, S.data(), bk, 1, vbase + k0 * P.sv[2], P.sv[2], kr, O.data(), D, true);
      }
      const int64_t row0 = bh * P.Lq + q0;
      T* st = stats + bh * 2 * P.Lq + q0;
      for (int64_t r = 0; r < qr; ++r) {
        const bool live = l[r] > T(0);
        const T inv = live ? T(1) / l[r] : T(0);
        T* dst = out + (row0 + r) * D;
        for (int64_t d = 0; d < D; ++d) dst[d] = O[r * D + d] * inv;
        st[r] = live ? m[r] : std::numeric_limits<T>::infinity();
        st[P.Lq + r] = live ? std::log2(l[r]) : T(0);
      }
    }
  }
}

// --- backward ----------------------------------------------------------------------------------
// P of one tile from the stored statistics: 2^((s - max) - log2(sum)), 0 on empty rows.
template <typename T>
void probabilities(const T* st, int64_t Lq, int64_t q0, int64_t qr, int64_t bk, T* S) {
  for (int64_t r = 0; r < qr; ++r) {
    const T mx = st[q0 + r], logl = st[Lq + q0 + r];
    T* s = S + r * bk;
    if (std::isinf(mx)) {
      std::fill(s, s + bk, T(0));
      continue;
    }
    for (int64_t j = 0; j < bk; ++j) s[j] -= mx;
    exp2_row(s, bk, logl);
  }
}

template <typename T>
struct Grads {
  const T* dout;  // [B, H, Lq, D] contiguous
  const T* delta;  // [B, H, Lq]
  const T* stats;  // [B, H, 2, Lq]
  T *dq, *dk, *dv;  // contiguous
  float* dscores;  // [B, H, Lq, Lk] or null
};

template <typename T>
void backward_dkdv(const Problem<T>& P, const Grads<T>& G, const BlockLists& qs) {
  const int64_t bq = P.bq, bk = P.bk, D = P.D;
  const int64_t items = P.B * P.H * P.nk;
#pragma omp parallel num_threads(at::get_num_threads())
  {
    std::vector<T> S(bq * bk), dP(bq * bk), Kt(D * bk), Vt(D * bk), dK(bk * D), dV(bk * D);
#pragma omp for schedule(dynamic, 1)
    for (int64_t item = 0; item < items; ++item) {
      const int64_t kb = item % P.nk, bh = item / P.nk, b = bh / P.H, h = bh % P.H;
      const int64_t k0 = kb * bk, kr = std::min(bk, P.Lk - k0);
      pack_transposed(P.k + b * P.sk[0] + h * P.sk[1] + k0 * P.sk[2], P.sk[2], kr, D, bk,
                      Kt.data());
      pack_transposed(P.v + b * P.sv[0] + h * P.sv[1] + k0 * P.sv[2], P.sv[2], kr, D, bk,
                      Vt.data());
      std::fill(dK.begin(), dK.end(), T(0));
      std::fill(dV.begin(), dV.end(), T(0));
      const int32_t* idx = qs.idx.data() + qs.ptr[item];
      const T* st = G.stats + bh * 2 * P.Lq;
      for (int32_t e = 0, cnt = qs.ptr[item + 1] - qs.ptr[item]; e < cnt; ++e) {
        const int64_t q0 = static_cast<int64_t>(idx[e]) * bq, qr = std::min(bq, P.Lq - q0);
        const T* q = P.q + b * P.sq[0] + h * P.sq[1] + q0 * P.sq[2];
        const T* dout = G.dout + (bh * P.Lq + q0) * D;
        gemm<T>(bk, qr, q, P.sq[2], 1, Kt.data(), bk, D, S.data(), bk, false);
        finish_scores(P, b, h, q0, qr, k0, S.data());
        probabilities(st, P.Lq, q0, qr, bk, S.data());
        // dV += P^T dO
        gemm<T>(D, kr, S.data(), 1, bk, dout, D, qr, dV.data(), D, true);
        // dP = dO V^T; dS = P * (dP - delta)
        gemm<T>(bk, qr, dout, D, 1, Vt.data(), bk, D, dP.data(), bk, false);
        const T* delta = G.delta + bh * P.Lq + q0;
        for (int64_t r = 0; r < qr; ++r)
          for (int64_t j = 0; j < bk; ++j)
            dP[r * bk + j] = S[r * bk + j] * (dP[r * bk + j] - delta[r]);
        // dK += dS^T Q
        gemm<T>(D, kr, dP.data(), 1, bk, q, P.sq[2], qr, dK.data(), D, true);
      }
      const T scale = P.qk_scale / static_cast<T>(kLog2e);
      T* dk = G.dk + (bh * P.Lk + k0) * D;
      T* dv = G.dv + (bh * P.Lk + k0) * D;
      for (int64_t x = 0; x < kr * D; ++x) {
        dk[x] = dK[x] * scale;
        dv[x] = dV[x];
      }
    }
  }
}

template <typename T>
void backward_dq(const Problem<T>& P, const Grads<T>& G, const BlockLists& kv) {
  const int64_t bq = P.bq, bk = P.bk, D = P.D;
  const int64_t items = P.B * P.H * P.nq;
#pragma omp parallel num_threads(at::get_num_threads())
  {
    std::vector<T> S(bq * bk), dP(bq * bk), Kt(D * bk), Vt(D * bk), dQ(bq * D);
#pragma omp for schedule(dynamic, 1)
    for (int64_t item = 0; item < items; ++item) {
      const int64_t qb = item % P.nq, bh = item / P.nq, b = bh / P.H, h = bh % P.H;
      const int64_t q0 = qb * bq, qr = std::min(bq, P.Lq - q0);
      const T* q = P.q + b * P.sq[0] + h * P.sq[1] + q0 * P.sq[2];
      const T* dout = G.dout + (bh * P.Lq + q0) * D;
      const T* delta = G.delta + bh * P.Lq + q0;
      const T* st = G.stats + bh * 2 * P.Lq;
      const T* kbase = P.k + b * P.sk[0] + h * P.sk[1];
      const T* vbase = P.v + b * P.sv[0] + h * P.sv[1];
      std::fill(dQ.begin(), dQ.end(), T(0));
      const int32_t* idx = kv.idx.data() + kv.ptr[item];
      for (int32_t e = 0, cnt = kv.ptr[item + 1] - kv.ptr[item]; e < cnt; ++e) {
        const int64_t k0 = static_cast<int64_t>(idx[e]) * bk, kr = std::min(bk, P.Lk - k0);
        pack_transposed(kbase + k0 * P.sk[2], P.sk[2], kr, D, bk, Kt.data());
        pack_transposed(vbase + k0 * P.sv[2], P.sv[2], kr, D, bk, Vt.data());
        gemm<T>(bk, qr, q, P.sq[2], 1, Kt.data(), bk, D, S.data(), bk, false);
        finish_scores(P, b, h, q0, qr, k0, S.data());
        probabilities(st, P.Lq, q0, qr, bk, S.data());
        gemm<T>(bk, qr, dout, D, 1, Vt.data(), bk, D, dP.data(), bk, false);
        for (int64_t r = 0; r < qr; ++r)
          for (int64_t j = 0; j < bk; ++j)
            dP[r * bk + j] = S[r * bk + j] * (dP[r * bk + j] - delta[r]);
        if (G.dscores) {
          float* ds = G.dscores + (bh * P.Lq + q0) * P.Lk + k0;
          for (int64_t r = 0; r < qr; ++r)
            for (int64_t j = 0; j < kr; ++j) ds[r * P.Lk + j] = static_cast<float>(dP[r * bk + j]);
        }
        // dQ += dS K
        gemm<T>(D, qr, dP.data(), bk, 1, kbase + k0 * P.sk[2], P.sk[2], kr, dQ.data(), D, true);
      }
      const T scale = P.qk_scale / static_cast<T>(kLog2e);
      T* dq = G.dq + (bh * P.Lq + q0) * D;
      for (int64_t x = 0; x < qr * D; ++x) dq[x] = dQ[x] * scale;
    }
  }
}

// --- torch glue ----------------------------------------------------------------------------------
at::ScalarType compute_type(at::ScalarType t) {
  return (t == at::kFloat || t == at::kDouble) ? t : at::kFloat;
}

// q/k/v in the compute type with a unit stride along the head dim (a view when possible).
at::Tensor rows(const at::Tensor& t, at::ScalarType ct) {
  at::Tensor x = t.scalar_type() == ct ? t : t.to(ct);
  return x.stride(3) == 1 ? x : x.contiguous();
}

template <typename T>
Problem<T> make_problem(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                        const at::Tensor& mask, bool causal, double scale, int64_t bq,
                        int64_t bk) {
  Problem<T> P;
  P.q = q.data_ptr<T>();
  P.k = k.data_ptr<T>();
  P.v = v.data_ptr<T>();
  for (int i = 0; i < 3; ++i) {
    P.sq[i] = q.stride(i);
    P.sk[i] = k.stride(i);
    P.sv[i] = v.stride(i);
  }
  P.B = q.size(0);
  P.H = q.size(1);
  P.Lq = q.size(2);
  P.Lk = k.size(2);
  P.D = q.size(3);
  P.bq = bq;
  P.bk = bk;
  P.nq = (P.Lq + bq - 1) / bq;
  P.nk = (P.Lk + bk - 1) / bk;
  P.causal = causal;
  P.qk_scale = static_cast<T>(scale * kLog2e);
  if (mask.defined()) {
    if (mask.scalar_type() == at::kBool)
      P.mask_bool = reinterpret_cast<const uint8_t*>(mask.data_ptr<bool>());
    else
      P.mask_add = mask.data_ptr<T>();
    for (int i = 0; i < 4; ++i) P.sm[i] = mask.stride(i);
  }
  return P;
}

at::Tensor prepare_mask(const std::optional<at::Tensor>& mask, at::ScalarType ct,
                        const at::Tensor& q, const at::Tensor& k) {
  if (!mask.has_value()) return at::Tensor();
  at::Tensor m = *mask;
  TORCH_CHECK(m.dim() <= 4, "sparsekernels: attn_mask must have at most 4 dims");
  if (m.scalar_type() != at::kBool && m.scalar_type() != ct) m = m.to(ct);
  return m.expand({q.size(0), q.size(1), q.size(2), k.size(2)});
}

void check_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, int64_t bq,
                  int64_t bk) {
  TORCH_CHECK(q.device().is_cpu() && k.device().is_cpu() && v.device().is_cpu(),
              "sparsekernels: block_sparse_attention_cpu runs CPU tensors");
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4 && k.sizes() == v.sizes() &&
                  q.size(0) == k.size(0) && q.size(1) == k.size(1) && q.size(3) == k.size(3),
              "sparsekernels: q [B, H, Lq, D], k and v [B, H, Lk, D] expected, got ", q.sizes(),
              " ", k.sizes(), " ", v.sizes());
  TORCH_CHECK(bq == 16 || bq == 32 || bq == 64 || bq == 128,
              "sparsekernels: unsupported query block ", bq);
  TORCH_CHECK(bk == 16 || bk == 32 || bk == 64 || bk == 128,
              "sparsekernels: unsupported key block ", bk);
}

std::tuple<at::Tensor, at::Tensor> block_sparse_attention_cpu(
    const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
    const at::Tensor& layout_in, const std::optional<at::Tensor>& mask, bool causal, double scale,
    int64_t block_q, int64_t block_k) {
  check_inputs(q_in, k_in, v_in, block_q, block_k);
  const auto ct = compute_type(q_in.scalar_type());
  const at::Tensor q = rows(q_in, ct), k = rows(k_in, ct), v = rows(v_in, ct);
  const at::Tensor m = prepare_mask(mask, ct, q, k);
  at::Tensor out = at::empty(q.sizes(), q.options().dtype(ct));
  at::Tensor stats = at::empty({q.size(0), q.size(1), 2, q.size(2)},
                               q.options().dtype(ct == at::kDouble ? at::kDouble : at::kFloat));
  auto run = [&](auto tag) {
    using T = decltype(tag);
    auto P = make_problem<T>(q, k, v, m, causal, scale, block_q, block_k);
    const at::Tensor lay = check_layout(layout_in, q, P.nq, P.nk);
    const BlockLists kv = block_lists(lay.data_ptr<bool>(), lay.size(0), P.B, P.H, P.nq, P.nk,
                                      P.bq, P.bk, causal, false);
    forward<T>(P, kv, out.data_ptr<T>(), stats.data_ptr<T>());
  };
  if (q.numel() > 0) {
    if (ct == at::kDouble) run(double{});
    else run(float{});
  }
  if (out.scalar_type() != q_in.scalar_type()) out = out.to(q_in.scalar_type());
  return {out, stats};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> block_sparse_attention_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& q_in, const at::Tensor& k_in,
    const at::Tensor& v_in, const at::Tensor& out, const at::Tensor& stats_in,
    const at::Tensor& layout_in, const std::optional<at::Tensor>& mask, bool causal,
    double scale, int64_t block_q, int64_t block_k, bool need_dscores) {
  check_inputs(q_in, k_in, v_in, block_q, block_k);
  const auto ct = compute_type(q_in.scalar_type());
  const at::Tensor q = rows(q_in, ct), k = rows(k_in, ct), v = rows(v_in, ct);
  const at::Tensor m = prepare_mask(mask, ct, q, k);
  const at::Tensor dout = grad_out.to(ct).contiguous();
  const at::Tensor delta = (dout * out.to(ct)).sum(-1).contiguous();
  const at::Tensor stats = stats_in.to(ct).contiguous();
  at::Tensor dq = at::empty(q.sizes(), q.options().dtype(ct));
  at::Tensor dk = at::empty(k.sizes(), k.options().dtype(ct));
  at::Tensor dv = at::empty(v.sizes(), v.options().dtype(ct));
  at::Tensor ds = need_dscores
                      ? at::zeros({q.size(0), q.size(1), q.size(2), k.size(2)},
                                  q.options().dtype(at::kFloat))
                      : at::empty({0}, q.options().dtype(at::kFloat));
  auto run = [&](auto tag) {
    using T = decltype(tag);
    auto P = make_problem<T>(q, k, v, m, causal, scale, block_q, block_k);
    Grads<T> G{dout.data_ptr<T>(), delta.data_ptr<T>(), stats.data_ptr<T>(), dq.data_ptr<T>(),
               dk.data_ptr<T>(), dv.data_ptr<T>(),
               need_dscores ? ds.data_ptr<float>() : nullptr};
    const at::Tensor lay = check_layout(layout_in, q, P.nq, P.nk);
    const bool* l = lay.data_ptr<bool>();
    backward_dkdv<T>(P, G, block_lists(l, lay.size(0), P.B, P.H, P.nq, P.nk, P.bq, P.bk,
                                       causal, true));
    backward_dq<T>(P, G, block_lists(l, lay.size(0), P.B, P.H, P.nq, P.nk, P.bq, P.bk, causal,
                                     false));
  };
  if (q.numel() > 0 && k.numel() > 0) {
    if (ct == at::kDouble) run(double{});
    else run(float{});
  } else {
    dq.zero_();
    dk.zero_();
    dv.zero_();
  }
  const auto t = q_in.scalar_type();
  if (ct != t) {
    dq = dq.to(t);
    dk = dk.to(t);
    dv = dv.to(t);
  }
  return {dq, dk, dv, ds};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(sparsekernels_C, m) {
  m.def(
      "block_sparse_attention_cpu(Tensor q, Tensor k, Tensor v, Tensor layout, Tensor? mask, "
      "bool causal, float scale, int block_q, int block_k) -> (Tensor, Tensor)",
      &block_sparse_attention_cpu);
  m.def(
      "block_sparse_attention_backward_cpu(Tensor grad_out, Tensor q, Tensor k, Tensor v, "
      "Tensor out, Tensor stats, Tensor layout, Tensor? mask, bool causal, float scale, "
      "int block_q, int block_k, bool need_dscores) -> "
      "(Tensor, Tensor, Tensor, Tensor)",
      &block_sparse_attention_backward_cpu);
}

}  // namespace cpu
}  // namespace sparsekernels
