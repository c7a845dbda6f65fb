// 2^x on 16 floats with AVX-512: the one exponential the CPU kernels share (attention's
// softmax, the FFN's GELU). Exactly 0 below 2^-126 (and for -inf); x = n + f with n an integer
// and |f| <= 1/2: 2^f by a degree-7 polynomial, times 2^n (vrndscaleps, vscalefps).
#pragma once

#if defined(__AVX512F__)
#include <immintrin.h>

namespace sparsekernels {
namespace cpu {

inline __m512 exp2_avx512(__m512 x) {
  const __m512 lo = _mm512_set1_ps(-126.0f);
  const __m512 xc = _mm512_max_ps(x, lo);
  const __m512 n = _mm512_roundscale_ps(xc, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(xc, n);
  __m512 p = _mm512_set1_ps(1.525273380405984e-05f);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.5403530393381608e-04f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.3333558146428443e-03f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.618129107628477e-03f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.550410866482158e-02f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.402265069591007e-01f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.931471805599453e-01f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
  const __mmask16 keep = _mm512_cmp_ps_mask(x, lo, _CMP_GE_OQ);
  return _mm512_maskz_mov_ps(keep, _mm512_scalef_ps(p, n));
}

}  // namespace cpu
}  // namespace sparsekernels
#endif
