// LayerNorm+SiLU of rows held in float32, the normalisation norm_silu and gather_norm_silu both end in: the
// portable row (every clone) and, with AVX512_BF16, several rows at a time into bfloat16.
#pragma once

#include "ops/avx512_bf16.hpp"
#include "ops/common.hpp"

namespace fastdream::ops {

// Sums of the C floats at buf (C a multiple of 16) in four independent accumulators: a row's reduction is
// then a chain of C/64 adds, not C/16 (the chains, not the arithmetic, bounded norm_silu at C = 256).
template <typename F>
__attribute__((always_inline)) inline float row_sum(const float* __restrict__ buf, int64_t c_count, F term) {
  Floats part[4] = {};
  int64_t c = 0;
  for (; c + 4 * kLanes <= c_count; c += 4 * kLanes)
    for (int i = 0; i < 4; ++i) part[i] += term(load_lanes(buf + c + i * kLanes));
  for (; c < c_count; c += kLanes) part[0] += term(load_lanes(buf + c));
  return lane_sum((part[0] + part[1]) + (part[2] + part[3]));
}

// SiLU(LayerNorm(row) · weight + bias) of one row held in float32 at buf [C] into dst. Two passes for the
// variance, as torch: no cancellation.
template <typename T>
__attribute__((always_inline)) inline void norm_silu_row(const float* __restrict__ buf, const float* __restrict__ weight,
                                                         const float* __restrict__ bias, T* __restrict__ dst,
                                                         int64_t c_count, float eps) {
  const float inv_c = 1.0f / static_cast<float>(c_count);
  if (c_count % kLanes == 0) {
    const float mean = row_sum(buf, c_count, [](Floats v) { return v; }) * inv_c;
    const float var = row_sum(buf, c_count, [mean](Floats v) { return (v - mean) * (v - mean); }) * inv_c;
    const float rstd = 1.0f / std::sqrt(var + eps), shift = mean * rstd;
    for (int64_t c = 0; c < c_count; c += kLanes) {
      const Floats y = (load_lanes(buf + c) * rstd - shift) * load_lanes(weight + c) + load_lanes(bias + c);
      store_row(dst + c, silu<kExpDegree<T>>(y));
    }
    return;
  }
  float mean = 0.0f, var = 0.0f;
  for (int64_t c = 0; c < c_count; ++c) mean += buf[c];
  mean *= inv_c;
  for (int64_t c = 0; c < c_count; ++c) var += (buf[c] - mean) * (buf[c] - mean);
  const float rstd = 1.0f / std::sqrt(var * inv_c + eps);
  for (int64_t c = 0; c < c_count; ++c) {
    const float y = (buf[c] - mean) * rstd * weight[c] + bias[c];
    store_float(dst, c, y * sigmoid(y));
  }
}

#ifdef FASTDREAM_BF16_DOT
// norm_silu_row into bfloat16 for R rows of buf [R, C] at once, 32 columns per step: row r's column c goes to
// dst[r] + (c / cg) gstride + c % cg (cg a multiple of 32: C and 0 for plain rows, C/G and M C/G for the grouped
// [G, M, C/G] layout, written straight from registers where a row copy and its scatter did it before). Each
// stage (the means, the variances, the outputs) runs across the R rows, so one row's dependent chains (two sums
// reduced across lanes, then a square root and a division) overlap the other rows' arithmetic: a row at a time,
// those chains bounded the kernel at ~1 cycle per value at C = 256, against ~0.6 for four rows.
constexpr int64_t kNormRows = 4;
template <int R>
FASTDREAM_BF16_DOT __attribute__((always_inline)) inline void norm_silu_block_bf16(const float* __restrict__ buf,
                                                                                  const float* __restrict__ weight,
                                                                                  const float* __restrict__ bias,
                                                                                  uint16_t* const* dst,
                                                                                  int64_t c_count, float eps,
                                                                                  int64_t cg, int64_t gstride) {
  const float inv_c = 1.0f / static_cast<float>(c_count);
  float mean[R], rstd[R];
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r) mean[r] = row_sum(buf + r * c_count, c_count, [](Floats v) { return v; }) * inv_c;
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r) {
    const float mu = mean[r];
    const float var = row_sum(buf + r * c_count, c_count, [mu](Floats v) { return (v - mu) * (v - mu); }) * inv_c;
    rstd[r] = 1.0f / std::sqrt(var + eps);
  }
  for (int r = 0; r < R; ++r) {
    const float* row = buf + r * c_count;
    const __m512 scale = _mm512_set1_ps(rstd[r]), shift = _mm512_set1_ps(mean[r] * rstd[r]);
    uint16_t* to = dst[r];  // column c at to + c: shifted by gstride - cg at each group's end
    for (int64_t c0 = 0; c0 < c_count; c0 += cg, to += gstride - cg)
      for (int64_t c = c0; c < c0 + cg; c += 2 * kLanes) {
        __m512 y[2];
        for (int h = 0; h < 2; ++h) {
          const int64_t k = c + h * kLanes;
          y[h] = _mm512_fmadd_ps(_mm512_fmsub_ps(_mm512_loadu_ps(row + k), scale, shift), _mm512_loadu_ps(weight + k),
                                 _mm512_loadu_ps(bias + k));
          y[h] = silu_bf16(y[h]);
        }
        _mm512_storeu_si512(to + c, (__m512i)_mm512_cvtne2ps_pbh(y[1], y[0]));
      }
  }
}

// norm_silu_block_bf16 of the first `rows` (<= kNormRows) rows of buf: a whole block, or its tail a row at a time.
FASTDREAM_BF16_DOT __attribute__((always_inline)) inline void norm_silu_rows_of_block(const float* buf, int64_t rows,
                                                                                     const float* weight,
                                                                                     const float* bias,
                                                                                     uint16_t* const* dst,
                                                                                     int64_t c_count, float eps,
                                                                                     int64_t cg, int64_t gstride) {
  if (rows == kNormRows) return norm_silu_block_bf16<kNormRows>(buf, weight, bias, dst, c_count, eps, cg, gstride);
  for (int64_t r = 0; r < rows; ++r)
    norm_silu_block_bf16<1>(buf + r * c_count, weight, bias, dst + r, c_count, eps, cg, gstride);
}
#endif

}  // namespace fastdream::ops
