// The vector maths the AVX512_BF16 paths share (exp, SiLU, sigmoid, bfloat16 loads), for bfloat16 rows where
// the CPU has AVX512_BF16 (checked at run time: common.hpp's avx512_bf16_enabled; elsewhere the portable clones).
// These are the instructions GCC's vector types cannot name: vcvtne2ps2bf16 rounds two vectors to nearest-even
// bfloat16 in one instruction (five integer ops and a word shuffle per vector otherwise), vscalefps applies exp's
// 2^n and vrcp14ps the SiLU's reciprocal (14 bits, beyond bfloat16's 8).
#pragma once

#include "ops/common.hpp"

#ifdef FASTDREAM_BF16_DOT
namespace fastdream::ops {

// exp(-y) as 2^t, t = -y·log2(e): vreduceps splits off f = t - floor(t) in [0, 1), a minimax polynomial
// gives 2^f, vscalefps multiplies by 2^floor(t) (overflowing to inf, underflowing to 0: no clamp needed).
// Degree 3: 7.5e-5 relative (under bfloat16's 2^-9 spacing), degree 4: 2.7e-6. 6-7 instructions against the
// 11 of a rounded n and a Taylor polynomial in r = y - n·ln2.
template <int Degree>
FASTDREAM_BF16_DOT __attribute__((always_inline)) inline __m512 exp_neg(__m512 y) {
  static_assert(Degree == 3 || Degree == 4, "exp_neg: degree 3 or 4");
  const __m512 t = _mm512_mul_ps(y, _mm512_set1_ps(-1.44269504088896341f));
  const __m512 f = _mm512_reduce_ps(t, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
  __m512 p;
  if constexpr (Degree == 3) {
    p = _mm512_fmadd_ps(f, _mm512_set1_ps(0.07802403f), _mm512_set1_ps(0.22606707f));
    p = _mm512_fmadd_ps(f, p, _mm512_set1_ps(0.69583398f));
    p = _mm512_fmadd_ps(f, p, _mm512_set1_ps(0.99992514f));
  } else {
    p = _mm512_fmadd_ps(f, _mm512_set1_ps(0.013534121f), _mm512_set1_ps(0.052011482f));
    p = _mm512_fmadd_ps(f, p, _mm512_set1_ps(0.2414428f));
    p = _mm512_fmadd_ps(f, p, _mm512_set1_ps(0.69300383f));
    p = _mm512_fmadd_ps(f, p, _mm512_set1_ps(1.0000026f));
  }
  return _mm512_scalef_ps(p, t);
}
FASTDREAM_BF16_DOT __attribute__((always_inline)) inline __m512 silu_bf16(__m512 y) {
  return _mm512_mul_ps(y, _mm512_rcp14_ps(_mm512_add_ps(exp_neg<3>(y), _mm512_set1_ps(1.0f))));
}

// σ(v) for the GRU's float32 state: exp_neg<4>'s ~3e-6 (the inputs are bf16 matmul outputs) and one Newton
// step on vrcp14ps (~1e-8), where a division took a divider slot per vector.
FASTDREAM_BF16_DOT __attribute__((always_inline)) inline __m512 sigmoid_avx512(__m512 v) {
  const __m512 d = _mm512_add_ps(exp_neg<4>(v), _mm512_set1_ps(1.0f));
  const __m512 r = _mm512_rcp14_ps(d);
  return _mm512_mul_ps(r, _mm512_fnmadd_ps(d, r, _mm512_set1_ps(2.0f)));
}

FASTDREAM_BF16_DOT __attribute__((always_inline)) inline __m512 load_bf16(const uint16_t* p) {
  const __m512i words = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return _mm512_castsi512_ps(_mm512_slli_epi32(words, 16));
}

}  // namespace fastdream::ops
#endif
