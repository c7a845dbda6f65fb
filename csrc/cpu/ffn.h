// The fused block-sparse FFNs on the CPU (bsr_ffn, bsr_gated_ffn), in one engine:
//
//   plain  out = act(x @ W1.T + b1) @ W2.T + b2
//   gated  out = (act(x @ Wg.T + bg) * (x @ Wu.T + bu)) @ Wd.T + bd
//
// where the [T, N1] intermediate never reaches memory. Two schedules:
//   row chunks  (many rows) each thread takes whole rows through both layers, a chunk at a
//               time, its intermediate rows in an L2-sized buffer of its own;
//   split units (fewer rows than a register tile per thread: decode) the threads split the
//               hidden units, each streaming an equal share of the first layer's stored
//               blocks, then, after one barrier, the outputs: each weight is read once. The
//               [rows, N1] intermediate is shared but only rows x N1 (tiny at decode).
// Every product runs bsr_linear's kernels (dsd_block on packed W.T blocks, or dot.h on the
// blocks as stored, by the same rule per layer) and the activation runs ATen's own kernel,
// so in fp32 / fp64 the fused result equals the unfused bsr_linear calls bit for bit with
// relu or none, and within the last bit with the transcendental activations (ATen's vector
// and scalar loops may split a strided run differently from a contiguous tensor).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <omp.h>

#include <algorithm>
#include <memory>
#include <string>
#include <vector>

#include "dot.h"
#include "activation.h"
#include "dsd.h"
#include "glue.h"

namespace sparsekernels {
namespace cpu {

// One block-sparse layer as the engine reads it.
template <typename T>
struct Layer {
  const T* blocks;  // W.T blocks [nnz, bk, bm] (tiled kernel) or the stored [nnz, bm, bk] (dot)
  SparseOperand s;  // ptr = crow, in_idx = col, n_out = block rows, bi = bk
  const T* bias;    // [n_out * bm] or null
  bool dot;         // reads_stored_blocks: which of the two `blocks` layouts
};

// Block rows [o0, o1) of w for rows of A, written to out's columns [0, (o1 - o0) * BO),
// serially (a view of the layer whose block row 0 is o0).
template <typename T, int BO>
inline void layer_range(const Layer<T>& w, const T* A, int64_t rows, int64_t lda, int64_t o0,
                        int64_t o1, T* out, int64_t ldo) {
  if (o1 <= o0 || rows == 0) return;
  const T* bias = w.bias ? w.bias + o0 * BO : nullptr;
  if (w.dot) {
    dot_range<T>(A, rows, lda, w.blocks, BO, w.s.bi, w.s.ptr + o0, w.s.in_idx, 0, o1 - o0, bias,
                 out, ldo);
  } else {
    SparseOperand s = w.s;
    s.ptr += o0;
    s.n_out = o1 - o0;
    dsd_range<T, BO>(A, rows, lda, w.blocks, s, 0, o1 - o0, bias, out, ldo);
  }
}

// h[t, j] *= u[t, j] for a [rows, width] run (one rounding, as torch's mul).
template <typename T>
inline void multiply(T* h, int64_t ldh, const T* u, int64_t ldu, int64_t rows, int64_t width) {
  constexpr int L = Vec<T>::L;
  for (int64_t t = 0; t < rows; ++t) {
    T* hr = h + t * ldh;
    const T* ur = u + t * ldu;
    int64_t j = 0;
    for (; j + L <= width; j += L) storeu<T>(hr + j, loadu<T>(hr + j) * loadu<T>(ur + j));
    for (; j < width; ++j) hr[j] *= ur[j];
  }
}

// The intermediate's block columns [o0, o1) for rows of X, written to h's columns
// [0, (o1 - o0) * BO1): act(first layer), times the up projection when gated. `u` holds
// (o1 - o0) * BO1 columns (or a single block's when `per_block`, as the row chunks keep it).
template <typename T, int BO1>
inline void hidden_range(const T* X, int64_t rows, int64_t ldx, const Layer<T>& w1,
                         const Layer<T>* up, Activation act, int64_t o0, int64_t o1, T* h,
                         int64_t ldh, T* u, bool per_block, at::ScalarType st) {
  layer_range<T, BO1>(w1, X, rows, ldx, o0, o1, h, ldh);
  activate(h, rows, (o1 - o0) * BO1, ldh, act, st);
  if (up == nullptr) return;
  if (!per_block) {
    const int64_t width = (o1 - o0) * BO1;
    layer_range<T, BO1>(*up, X, rows, ldx, o0, o1, u, width);
    multiply<T>(h, ldh, u, width, rows, width);
    return;
  }
  for (int64_t o = o0; o < o1; ++o) {
    layer_range<T, BO1>(*up, X, rows, ldx, o, o + 1, u, BO1);
    multiply<T>(h + (o - o0) * BO1, ldh, u, BO1, rows, BO1);
  }
}

// The schedule: split units when the rows cannot give every thread a register tile.
inline bool ffn_splits_units(int64_t rows, int64_t threads, int64_t tile_rows) {
  return rows < threads * tile_rows;
}

// How many rows a thread computes at a time in the row-chunk schedule. Each chunk reads all
// stored weights once more (from L3 at low density), so denser weights want taller chunks:
// about half the weight bytes per intermediate row's bytes, between 48 and 192 rows
// (chosen by bench_ffn: flat at low density, taller chunks ahead at density 1).
inline int64_t wanted_rows(int64_t row_bytes, int64_t weight_bytes) {
  return std::clamp<int64_t>(weight_bytes / (2 * row_bytes), 48, 192);
}

// Scratch that is written before it is read: no zero-fill (a memset of rows x N1 would cost
// as much as a small decode step).
template <typename T>
std::unique_ptr<T[]> scratch(int64_t n) {
  return std::unique_ptr<T[]>(n > 0 ? new T[static_cast<size_t>(n)] : nullptr);
}

template <typename T>
int64_t stored_bytes(const Layer<T>& w, int64_t bo) {
  return static_cast<int64_t>(sizeof(T)) * (w.s.ptr[w.s.n_out] - w.s.ptr[0]) * w.s.bi * bo;
}

template <typename T, int BO1, int BO2>
void ffn_row_chunks(const T* X, int64_t rows, int64_t ldx, const Layer<T>& w1,
                    const Layer<T>* up, Activation act, const Layer<T>& w2, T* out, int64_t ldo,
                    at::ScalarType st) {
  // rows are rounded to the register tiles of both products, so only a range's last
  // chunk can have a partial tile
  constexpr int64_t q = std::max(tile_rows<T, BO1>(), tile_rows<T, BO2>());
  auto round_up = [](int64_t v) { return (v + q - 1) / q * q; };
  const int64_t n1 = w1.s.n_out * BO1;
  const int64_t weight_bytes = stored_bytes(w1, BO1) + (up ? stored_bytes(*up, BO1) : 0) +
                               stored_bytes(w2, BO2);
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
    const auto buffer = scratch<T>(r1 > r0 ? mc * n1 : 0);
    const auto ubuf = scratch<T>(r1 > r0 && up ? mc * BO1 : 0);
    T* h = buffer.get();
    for (int64_t t0 = r0; t0 < r1; t0 += mc) {
      const int64_t rc = std::min(r1, t0 + mc) - t0;
      hidden_range<T, BO1>(X + t0 * ldx, rc, ldx, w1, up, act, 0, w1.s.n_out, h, n1,
                           ubuf.get(), true, st);
      layer_range<T, BO2>(w2, h, rc, n1, 0, w2.s.n_out, out + t0 * ldo, ldo);
    }
  }
}

template <typename T, int BO1, int BO2>
void ffn_split_units(const T* X, int64_t rows, int64_t ldx, const Layer<T>& w1,
                     const Layer<T>* up, Activation act, const Layer<T>& w2, T* out, int64_t ldo,
                     at::ScalarType st) {
  const int64_t n1 = w1.s.n_out * BO1;
  // hidden units are split by the stored blocks of both first-layer weights together
  std::vector<int32_t> both;
  const int32_t* ptr1 = w1.s.ptr;
  if (up) {
    both.resize(w1.s.n_out + 1);
    for (int64_t o = 0; o <= w1.s.n_out; ++o) both[o] = w1.s.ptr[o] + up->s.ptr[o];
    ptr1 = both.data();
  }
  const auto h = scratch<T>(rows * n1);
  const auto u = scratch<T>(up ? rows * n1 : 0);
#pragma omp parallel num_threads(at::get_num_threads())
  {
    const int64_t nt = omp_get_num_threads(), tid = omp_get_thread_num();
    int64_t o0, o1;
    split_stored(ptr1, w1.s.n_out, nt, tid, &o0, &o1);
    if (o1 > o0)
      hidden_range<T, BO1>(X, rows, ldx, w1, up, act, o0, o1, h.get() + o0 * BO1, n1,
                           up ? u.get() + rows * o0 * BO1 : nullptr, false, st);
#pragma omp barrier
    int64_t p0, p1;
    split_stored(w2.s.ptr, w2.s.n_out, nt, tid, &p0, &p1);
    layer_range<T, BO2>(w2, h.get(), rows, n1, p0, p1, out + p0 * BO2, ldo);
  }
}

template <typename T, int BO1, int BO2>
void ffn(const T* X, int64_t rows, int64_t ldx, const Layer<T>& w1, const Layer<T>* up,
         Activation act, const Layer<T>& w2, T* out, int64_t ldo, at::ScalarType st) {
  constexpr int64_t q = std::max(tile_rows<T, BO1>(), tile_rows<T, BO2>());
  if (ffn_splits_units(rows, at::get_num_threads(), q))
    ffn_split_units<T, BO1, BO2>(X, rows, ldx, w1, up, act, w2, out, ldo, st);
  else
    ffn_row_chunks<T, BO1, BO2>(X, rows, ldx, w1, up, act, w2, out, ldo, st);
}

// ---- entry-point glue ----------------------------------------------------------------
// A layer's tensors in the compute type, with its few-row rule applied: `blocks` keeps the
// tensor the Layer points into alive.
struct LayerTensors {
  at::Tensor blocks, bias;
  const at::Tensor* crow;
  const at::Tensor* col;
  int64_t bm, bk;
  bool dot;
};

inline LayerTensors layer_tensors(const at::Tensor& values, const at::Tensor& crow,
                                  const at::Tensor& col, const std::optional<at::Tensor>& bias,
                                  const std::optional<at::Tensor>& packed, at::ScalarType ct,
                                  int64_t rows, const char* name) {
  check_layer(values, crow, col, name);
  LayerTensors l;
  l.crow = &crow;
  l.col = &col;
  l.bm = values.size(1);
  l.bk = values.size(2);
  // bf16 blocks that bsr_pack made for the native bf16 kernels ([nnz, bk/2, bm, 2] pairs,
  // lowp.h) are not this engine's operand in the compute type: it packs from the values
  const bool native_bf16 = packed.has_value() && packed->dim() == 4 &&
                           packed->scalar_type() == at::kBFloat16 && ct != at::kBFloat16;
  const std::optional<at::Tensor> given =
      free_packed(values, ct, native_bf16 ? std::nullopt : packed);
  l.dot = reads_stored_blocks(rows, tile_rows_of(ct, l.bm), given.has_value());
  l.blocks = l.dot ? in_compute_type(values, ct) : packed_blocks(values, ct, given);
  if (bias.has_value()) {
    TORCH_CHECK(bias->numel() == (crow.numel() - 1) * l.bm, "sparsekernels: ", name, " bias has ",
                bias->numel(), " values for ", (crow.numel() - 1) * l.bm, " outputs");
    l.bias = in_compute_type(*bias, ct);
  }
  return l;
}

template <typename T>
Layer<T> as_layer(const LayerTensors& l) {
  return Layer<T>{l.blocks.data_ptr<T>(),
                  SparseOperand{l.crow->data_ptr<int32_t>(), l.col->data_ptr<int32_t>(), nullptr,
                                l.crow->numel() - 1, l.bk},
                  l.bias.defined() ? l.bias.data_ptr<T>() : nullptr, l.dot};
}

// out = the FFN of x (gated when `up` is given), in x's dtype.
inline at::Tensor run_ffn(const at::Tensor& x, const LayerTensors& w1, const LayerTensors* up,
                          const LayerTensors& w2, Activation act, at::ScalarType ct) {
  const int64_t n1 = (w1.crow->numel() - 1) * w1.bm;
  const int64_t n2 = (w2.crow->numel() - 1) * w2.bm;
  TORCH_CHECK(x.size(1) % w1.bk == 0, "sparsekernels: input width ", x.size(1),
              " is not a multiple of the first layer's block width ", w1.bk);
  TORCH_CHECK(n1 % w2.bk == 0, "sparsekernels: the first layer's ", n1,
              " outputs are not a multiple of the last layer's block width ", w2.bk);
  const at::Tensor xc = x.scalar_type() == ct ? x : x.to(ct);
  at::Tensor out = at::empty({x.size(0), n2}, x.options().dtype(ct));
  if (x.size(0) == 0) return out.to(x.scalar_type());
  const int64_t ldx = x.size(0) > 1 ? xc.stride(0) : x.size(1);
  dispatch_float(ct, [&](auto tag) {
    using T = decltype(tag);
    const Layer<T> l1 = as_layer<T>(w1), l2 = as_layer<T>(w2);
    Layer<T> lu;
    if (up) lu = as_layer<T>(*up);
    dispatch_block(w1.bm, [&](auto bo1) {
      dispatch_block(w2.bm, [&](auto bo2) {
        ffn<T, decltype(bo1)::value, decltype(bo2)::value>(
            xc.data_ptr<T>(), x.size(0), ldx, l1, up ? &lu : nullptr, act, l2,
            out.data_ptr<T>(), n2, ct);
      });
    });
  });
  return out.scalar_type() == x.scalar_type() ? out : out.to(x.scalar_type());
}

}  // namespace cpu
}  // namespace sparsekernels
