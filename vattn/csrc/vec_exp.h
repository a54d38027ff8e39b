// e^x sixteen float32 lanes at a time (AVX-512) or eight (AVX2 + FMA), shared by our CPU extensions
// (vattn/cpp_extension.py puts this folder on their include path and hashes it into their build keys). GCC leaves a
// scalar e^x with a select and bit casts unvectorized, so the softmax and SiLU loops use this instead.
//
// x = k ln2 + f with |f| <= ln2 / 2, e^f by Cephes' degree-6 polynomial, 2^k through the exponent bits (k >= -127);
// about 1 ulp for x in [-87, 88]. Callers clamp or mask outside that range.
#pragma once

#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
#include <immintrin.h>
#endif

namespace vattn {

#if defined(__AVX512F__)

inline __m512 exp16(__m512 x) {
  const __m512 k = _mm512_roundscale_ps(_mm512_fmadd_ps(x, _mm512_set1_ps(1.44269504088896341f), _mm512_set1_ps(0.5f)),
                                        _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
  __m512 f = _mm512_fnmadd_ps(k, _mm512_set1_ps(0.693359375f), x);
  f = _mm512_fmadd_ps(k, _mm512_set1_ps(2.12194440e-4f), f);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(_mm512_mul_ps(p, f), f, _mm512_add_ps(f, _mm512_set1_ps(1.f)));
  const __m512i e = _mm512_add_epi32(_mm512_cvttps_epi32(_mm512_max_ps(k, _mm512_set1_ps(-127.f))),
                                     _mm512_set1_epi32(127));
  return _mm512_mul_ps(p, _mm512_castsi512_ps(_mm512_slli_epi32(e, 23)));
}
#endif

#if defined(__AVX2__) && defined(__FMA__)
inline __m256 exp8(__m256 x) {
  const __m256 k = _mm256_round_ps(_mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(0.5f)),
                                   _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
  __m256 f = _mm256_fnmadd_ps(k, _mm256_set1_ps(0.693359375f), x);
  f = _mm256_fmadd_ps(k, _mm256_set1_ps(2.12194440e-4f), f);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_fmadd_ps(_mm256_mul_ps(p, f), f, _mm256_add_ps(f, _mm256_set1_ps(1.f)));
  const __m256i e = _mm256_add_epi32(_mm256_cvttps_epi32(_mm256_max_ps(k, _mm256_set1_ps(-127.f))),
                                     _mm256_set1_epi32(127));
  return _mm256_mul_ps(p, _mm256_castsi256_ps(_mm256_slli_epi32(e, 23)));
}
#endif

}  // namespace vattn
