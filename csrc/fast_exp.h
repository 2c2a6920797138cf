// exp over a vector of fp32 for the vocabulary passes, which are bound by exp throughput on CPU
// (two per element in the loss forward, one in its backward and in sampling).
//
// With AVX512: exp(x) = 2^(k/16) * e^r, k = round(16 x / ln 2), r = x - k ln2/16 in
// [-ln2/32, ln2/32] (two-constant Cody-Waite reduction, so r keeps full precision for large |x|).
// 2^(k/16) is a 16-entry table lookup in one register (vpermps on k's low 4 bits) times
// 2^floor(k/16) applied by vscalefps, which also underflows to exactly 0 and overflows to inf;
// e^r is a cubic (truncation error r^4/24 < 1e-8). About 12 instructions against exp_u20's 20,
// with a few ulp of error instead of its ~20. Elsewhere exp_u20.
#pragma once

#include <ATen/cpu/vec/vec.h>

#include <type_traits>

namespace qadapter {

using at::vec::Vectorized;

#if defined(CPU_CAPABILITY_AVX512)
inline Vectorized<float> exp_avx512(const Vectorized<float>& x_in) {
  const __m512 powers = _mm512_setr_ps(  // 2^(j/16), j = 0..15
      1.0f, 1.0442737824274138f, 1.0905077326652577f, 1.1387886347566916f, 1.1892071150027210f,
      1.2418578120734840f, 1.2968395546510096f, 1.3542555469368927f, 1.4142135623730951f, 1.4768261459394993f,
      1.5422108254079407f, 1.6104903319492543f, 1.6817928305074290f, 1.7562521603732995f, 1.8340080864093424f,
      1.9152065613971474f);
  // [-110, 100] keeps 16 x / ln 2 and k finite (x = -inf or 1e38 would give inf - inf = NaN below)
  // and still ends at exactly 0 (e^-110 < 2^-150) and inf (e^100 > 2^128). min(c, x) and max(c, x)
  // return x when x is NaN, so NaN propagates.
  const __m512 x = _mm512_max_ps(_mm512_set1_ps(-110.f), _mm512_min_ps(_mm512_set1_ps(100.f), x_in));
  const __m512 k = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(23.083120654223414f)),  // 16 / ln 2
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  // ln2/16 = hi + lo with hi on 12 significant bits, so k * hi is exact for |k| < 4096 (here |k| <= 2540).
  __m512 r = _mm512_fnmadd_ps(k, _mm512_set1_ps(0.0433197021484375f), x);
  r = _mm512_fnmadd_ps(k, _mm512_set1_ps(1.9966364561696537e-06f), r);
  __m512 p = _mm512_fmadd_ps(_mm512_set1_ps(1.f / 6.f), r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
  const __m512 scaled = _mm512_mul_ps(_mm512_permutexvar_ps(_mm512_cvtps_epi32(k), powers), p);
  return _mm512_scalef_ps(scaled, _mm512_mul_ps(k, _mm512_set1_ps(1.f / 16.f)));
}
#endif

template <typename acc_t>
Vectorized<acc_t> vexp(const Vectorized<acc_t>& x) {
  if constexpr (std::is_same_v<acc_t, float>) {
#if defined(CPU_CAPABILITY_AVX512)
    return exp_avx512(x);
#else
    return x.exp_u20();  // ~1e-6 relative: ample for a softmax normaliser
#endif
  } else {
    return x.exp();
  }
}

}  // namespace qadapter
