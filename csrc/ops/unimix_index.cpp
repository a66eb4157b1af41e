// unimix_index: the class index of every row of logits [M, K] drawn by inverse CDF with one uniform per row
// from p = (1 - unimix) softmax(logits) + unimix / K. Sixteen rows at a time, one per SIMD lane, so the max, the
// sum and the running CDF are plain vector adds instead of reductions across a short row; torch's softmax +
// cumsum + compare-and-count took ~8.5 ms for M = 131072, K = 32.
#include "ops/ops.hpp"
#include "ops/avx512_bf16.hpp"
namespace fastdream::ops {
namespace {

template <typename T>
__attribute__((always_inline)) inline void index_tile(const T* __restrict__ logits, const float* __restrict__ noise,
                                                       int64_t* __restrict__ out, int64_t rows, int64_t k_count,
                                                       float unimix, float* __restrict__ buf,
                                                       const float* __restrict__ bias, int64_t period, int64_t row) {
  // buf [K, 16]: logit k of the tile's rows at buf[16 k + r], one row per lane; lanes past `rows` hold zeros.
  // bias [period, K] (or null): row `row + r` adds bias row (row + r) % period (a head's bias per latent).
  auto bias_row = [&](int64_t r) { return bias + (row + r) % period * k_count; };
  if (rows == kLanes && k_count % kLanes == 0) {
    Floats block[kLanes];
    for (int64_t k0 = 0; k0 < k_count; k0 += kLanes) {
      for (int64_t r = 0; r < kLanes; ++r)
        block[r] = load_row(logits + r * k_count + k0) + (bias ? load_lanes(bias_row(r) + k0) : Floats{});
      transpose16(block);
      for (int64_t k = 0; k < kLanes; ++k) store_lanes(buf + (k0 + k) * kLanes, block[k]);
    }
  } else {
    for (int64_t k = 0; k < k_count; ++k)
      for (int64_t r = 0; r < kLanes; ++r)
        buf[k * kLanes + r] = r < rows ? load_float(logits, r * k_count + k) + (bias ? bias_row(r)[k] : 0.0f) : 0.0f;
  }
  Floats top = load_lanes(buf);
  for (int64_t k = 1; k < k_count; ++k) {
    const Floats v = load_lanes(buf + k * kLanes);
    top = v > top ? v : top;
  }
  Floats total = {};
  for (int64_t k = 0; k < k_count; ++k) {
    const Floats e = exp_clamped(load_lanes(buf + k * kLanes) - top);
    store_lanes(buf + k * kLanes, e);
    total += e;
  }
  Floats u = {};
  for (int64_t r = 0; r < rows; ++r) u[r] = noise[r];
  // index = #{k : cdf_k < u}, cdf_k = (1 - unimix) Σ_{j<=k} e_j / Σ e + unimix (k + 1) / K.
  const Floats scale = (1.0f - unimix) / total;
  Floats cdf = {};
  Ints count = {};
  for (int64_t k = 0; k < k_count; ++k) {
    cdf += load_lanes(buf + k * kLanes);
    count -= cdf * scale + unimix * static_cast<float>(k + 1) / static_cast<float>(k_count) < u;  // true is -1
  }
  for (int64_t r = 0; r < rows; ++r) out[r] = std::min<int64_t>(count[r], k_count - 1);
}

template <typename T>
__attribute__((always_inline)) inline void index_rows(const T* logits, const float* noise, int64_t* out,
                                                       int64_t row0, int64_t row1, int64_t k_count, float unimix,
                                                       const float* bias, int64_t period) {
  std::vector<float> buf(static_cast<size_t>(k_count * kLanes));
  for (int64_t r = row0; r < row1; r += kLanes) {
    if (r + (kPrefetchRows + 1) * kLanes <= row1) prefetch(logits + (r + kPrefetchRows * kLanes) * k_count, kLanes * k_count);
    index_tile(logits + r * k_count, noise + r, out + r, std::min(kLanes, row1 - r), k_count, unimix, buf.data(),
               bias, period, r);
  }
}

FASTDREAM_CLONES
void unimix_index_rows_f32(const float* logits, const float* noise, int64_t* out, int64_t row0, int64_t row1,
                           int64_t k_count, float unimix, const float* bias, int64_t period) {
  index_rows(logits, noise, out, row0, row1, k_count, unimix, bias, period);
}

FASTDREAM_CLONES
void unimix_index_rows_bf16(const uint16_t* logits, const float* noise, int64_t* out, int64_t row0, int64_t row1,
                            int64_t k_count, float unimix, const float* bias, int64_t period) {
  index_rows(logits, noise, out, row0, row1, k_count, unimix, bias, period);
}

#ifdef FASTDREAM_BF16_DOT
// unimix_index for bfloat16 logits of an even K, whole 16-row tiles [tile0, tile1) (row0 = 16 tile0). A row's
// K words are K/2 dwords (classes 2j, 2j+1): a 16 x 16 dword transpose (64 shuffles) puts dword j of the 16 rows
// in one vector, a shift and a mask split it into classes 2j and 2j+1 as floats, one row per lane (the float
// path converts first, then transposes twice as many vectors). exp is 2^t as exp_neg's, degree 5 (1.6e-7 relative,
// as the portable path's degree-6 Taylor polynomial). bias_t: transposed_bias (or null).
FASTDREAM_BF16_DOT __attribute__((always_inline)) inline void transpose16_dwords(__m512i* r) {
  __m512i t[16], u[16];
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
  }
  // u[4q + j]: column 4 L + j of rows 4q..4q+3 in 128-bit lane L.
  for (int q = 0; q < 4; ++q) {
    u[4 * q] = _mm512_unpacklo_epi64(t[4 * q], t[4 * q + 2]);
    u[4 * q + 1] = _mm512_unpackhi_epi64(t[4 * q], t[4 * q + 2]);
    u[4 * q + 2] = _mm512_unpacklo_epi64(t[4 * q + 1], t[4 * q + 3]);
    u[4 * q + 3] = _mm512_unpackhi_epi64(t[4 * q + 1], t[4 * q + 3]);
  }
  for (int j = 0; j < 4; ++j) {
    const __m512i lo01 = _mm512_shuffle_i32x4(u[j], u[4 + j], 0x44), hi01 = _mm512_shuffle_i32x4(u[j], u[4 + j], 0xEE);
    const __m512i lo23 = _mm512_shuffle_i32x4(u[8 + j], u[12 + j], 0x44);
    const __m512i hi23 = _mm512_shuffle_i32x4(u[8 + j], u[12 + j], 0xEE);
    r[j] = _mm512_shuffle_i32x4(lo01, lo23, 0x88);
    r[4 + j] = _mm512_shuffle_i32x4(lo01, lo23, 0xDD);
    r[8 + j] = _mm512_shuffle_i32x4(hi01, hi23, 0x88);
    r[12 + j] = _mm512_shuffle_i32x4(hi01, hi23, 0xDD);
  }
}

FASTDREAM_BF16_DOT __attribute__((always_inline)) inline __m512 exp_nonpositive(__m512 x) {
  const __m512 t = _mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f));
  const __m512 f = _mm512_reduce_ps(t, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
  __m512 p = _mm512_fmadd_ps(f, _mm512_set1_ps(0.0018775727f), _mm512_set1_ps(0.0089893444f));
  p = _mm512_fmadd_ps(f, p, _mm512_set1_ps(0.055826318f));
  p = _mm512_fmadd_ps(f, p, _mm512_set1_ps(0.24015361f));
  p = _mm512_fmadd_ps(f, p, _mm512_set1_ps(0.69315308f));
  p = _mm512_fmadd_ps(f, p, _mm512_set1_ps(0.99999994f));
  return _mm512_scalef_ps(p, t);
}

// One 16-row tile's logits (plus bias) into buf [K, 16] as floats, class-major; returns their max per row.
FASTDREAM_BF16_DOT __attribute__((always_inline)) inline __m512 tile_logits(const uint16_t* src, const float* bt,
                                                                           float* buf, int64_t k_count) {
  const __m512i high = _mm512_set1_epi32(static_cast<int>(0xFFFF0000u));
  const int64_t dwords = k_count / 2;
  __m512 top = _mm512_set1_ps(-INFINITY);
  for (int64_t d0 = 0; d0 < dwords; d0 += kLanes) {
    const int64_t nd = std::min<int64_t>(kLanes, dwords - d0);
    const __mmask16 mask = static_cast<__mmask16>((1u << nd) - 1);
    __m512i r[16];
    for (int i = 0; i < 16; ++i) r[i] = _mm512_maskz_loadu_epi32(mask, src + i * k_count + 2 * d0);
    transpose16_dwords(r);
    for (int64_t j = 0; j < nd; ++j) {
      const int64_t k = 2 * (d0 + j);
      __m512 even = _mm512_castsi512_ps(_mm512_slli_epi32(r[j], 16));
      __m512 odd = _mm512_castsi512_ps(_mm512_and_si512(r[j], high));
      if (bt) {
        even = _mm512_add_ps(even, _mm512_loadu_ps(bt + k * kLanes));
        odd = _mm512_add_ps(odd, _mm512_loadu_ps(bt + (k + 1) * kLanes));
      }
      top = _mm512_max_ps(top, _mm512_max_ps(even, odd));
      _mm512_storeu_ps(buf + k * kLanes, even);
      _mm512_storeu_ps(buf + (k + 1) * kLanes, odd);
    }
  }
  return top;
}

// T consecutive tiles from `tile`: each stage (logits, exps and their sum, the running CDF) runs across the T tiles,
// so one tile's chains (the max, the sum, the CDF: K dependent steps each) overlap the other's arithmetic.
template <int T>
FASTDREAM_BF16_DOT __attribute__((always_inline)) inline void draw_tiles(const uint16_t* logits, const float* noise,
                                                                        int64_t* out, int64_t tile, int64_t tile1,
                                                                        int64_t k_count, float unimix, const float* levels,
                                                                        const float* bias_t, int64_t period, int64_t g,
                                                                        float* buf) {
  __m512 top[T], total[T], scale[T], cdf[T], u[T];
  __m512i count[T];
  for (int i = 0; i < T; ++i) {
    const int64_t row0 = (tile + i) * kLanes;
    const uint16_t* src = logits + row0 * k_count;
    if (tile + i + kPrefetchRows < tile1) prefetch(src + kPrefetchRows * kLanes * k_count, kLanes * k_count);
    const float* bt = bias_t ? bias_t + row0 % period / g * k_count * kLanes : nullptr;
    top[i] = tile_logits(src, bt, buf + i * k_count * kLanes, k_count);
    total[i] = cdf[i] = _mm512_setzero_ps();
    count[i] = _mm512_setzero_si512();
    u[i] = _mm512_loadu_ps(noise + row0);
  }
  for (int64_t k = 0; k < k_count; ++k)
#pragma GCC unroll 4
    for (int i = 0; i < T; ++i) {
      float* at = buf + (i * k_count + k) * kLanes;
      const __m512 e = exp_nonpositive(_mm512_sub_ps(_mm512_loadu_ps(at), top[i]));
      _mm512_storeu_ps(at, e);
      total[i] = _mm512_add_ps(total[i], e);
    }
  // index = #{k : cdf_k < u}, cdf_k = (1 - unimix) Σ_{j<=k} e_j / Σ e + unimix (k + 1) / K: as the portable path.
  for (int i = 0; i < T; ++i) scale[i] = _mm512_div_ps(_mm512_set1_ps(1.0f - unimix), total[i]);
  const __m512i one = _mm512_set1_epi32(1);
  for (int64_t k = 0; k < k_count; ++k) {
    const __m512 level = _mm512_set1_ps(levels[k]);
#pragma GCC unroll 4
    for (int i = 0; i < T; ++i) {
      cdf[i] = _mm512_add_ps(cdf[i], _mm512_loadu_ps(buf + (i * k_count + k) * kLanes));
      const __mmask16 below = _mm512_cmp_ps_mask(_mm512_fmadd_ps(cdf[i], scale[i], level), u[i], _CMP_LT_OQ);
      count[i] = _mm512_mask_add_epi32(count[i], below, count[i], one);
    }
  }
  for (int i = 0; i < T; ++i) {
    const __m512i c = _mm512_min_epi32(count[i], _mm512_set1_epi32(static_cast<int>(k_count - 1)));
    int64_t* dst = out + (tile + i) * kLanes;
    _mm512_storeu_si512(dst, _mm512_cvtepi32_epi64(_mm512_castsi512_si256(c)));
    _mm512_storeu_si512(dst + 8, _mm512_cvtepi32_epi64(_mm512_extracti64x4_epi64(c, 1)));
  }
}

FASTDREAM_BF16_DOT
void unimix_index_tiles_bf16_avx512(const uint16_t* logits, const float* noise, int64_t* out, int64_t tile0,
                                    int64_t tile1, int64_t k_count, float unimix, const float* bias_t, int64_t period) {
  constexpr int kTiles = 2;
  const int64_t g = std::gcd<int64_t>(period, kLanes);  // transposed_bias's slot = phase / g
  std::vector<float> buf(static_cast<size_t>(kTiles * k_count * kLanes)), levels(static_cast<size_t>(k_count));
  for (int64_t k = 0; k < k_count; ++k) levels[k] = unimix * static_cast<float>(k + 1) / static_cast<float>(k_count);
  int64_t tile = tile0;
  for (; tile + kTiles <= tile1; tile += kTiles)
    draw_tiles<kTiles>(logits, noise, out, tile, tile1, k_count, unimix, levels.data(), bias_t, period, g, buf.data());
  for (; tile < tile1; ++tile)
    draw_tiles<1>(logits, noise, out, tile, tile1, k_count, unimix, levels.data(), bias_t, period, g, buf.data());
}
#else
void unimix_index_tiles_bf16_avx512(const uint16_t*, const float*, int64_t*, int64_t, int64_t, int64_t, float,
                                    const float*, int64_t) {}
#endif

// bias [P, K] laid out for 16-row tiles, one row per lane: [slot][k][lane] = bias[(phase + lane) % P][k] for each
// phase = row0 % P a tile can start at (multiples of g = gcd(P, 16); slot = phase / g).
std::vector<float> transposed_bias(const float* bias, int64_t period, int64_t k_count) {
  const int64_t g = std::gcd<int64_t>(period, kLanes), slots = period / g;
  std::vector<float> out(static_cast<size_t>(slots * k_count * kLanes));
  for (int64_t slot = 0; slot < slots; ++slot)
    for (int64_t k = 0; k < k_count; ++k)
      for (int64_t lane = 0; lane < kLanes; ++lane)
        out[(slot * k_count + k) * kLanes + lane] = bias[(slot * g + lane) % period * k_count + k];
  return out;
}


}  // namespace

py::array_t<int64_t> unimix_index(const py::array& logits, const py::array& noise, double unimix, bool bfloat16,
                                   int threads, const std::optional<py::array>& bias,
                                   const std::optional<py::array>& out_arg) {
  check_floats(logits, bfloat16, "unimix_index", "logits");
  if (!noise.dtype().is(py::dtype::of<float>()))
    throw py::type_error("unimix_index: noise dtype " + std::string(py::str(noise.dtype())) + ", expected float32");
  if (logits.ndim() != 2 || noise.ndim() != 1 || logits.shape(0) != noise.shape(0) || logits.shape(1) < 1)
    throw py::value_error("unimix_index: logits " + shape_of(logits) + " and noise " + shape_of(noise) +
                          " must be [M, K] with K >= 1 and [M]");
  if (!(logits.flags() & py::array::c_style) || !(noise.flags() & py::array::c_style))
    throw py::value_error("unimix_index: logits and noise must be C-contiguous");
  if (!(unimix >= 0.0 && unimix < 1.0))
    throw py::value_error("unimix_index: unimix must be in [0, 1), got " + std::to_string(unimix));
  const int64_t m_count = logits.shape(0), k_count = logits.shape(1);
  int64_t period = 1;
  if (bias) {
    if (!bias->dtype().is(py::dtype::of<float>()))
      throw py::type_error("unimix_index: bias dtype " + std::string(py::str(bias->dtype())) + ", expected float32");
    if (bias->ndim() != 1 || bias->shape(0) < k_count || bias->shape(0) % k_count != 0 ||
        !(bias->flags() & py::array::c_style))
      throw py::value_error("unimix_index: bias " + shape_of(*bias) + " must be a contiguous [P * K] for K = " +
                            std::to_string(k_count) + " (row m adds bias row m % P)");
    period = bias->shape(0) / k_count;
  }
  if (out_arg) check_written_in_place(*out_arg, py::dtype::of<int64_t>(), {m_count}, "unimix_index", "out");
  py::array_t<int64_t> out = out_arg ? *out_arg : py::array_t<int64_t>(m_count);
  auto* o = static_cast<int64_t*>(out.mutable_data());
  const auto* u = static_cast<const float*>(noise.data());
  const float mix = static_cast<float>(unimix);
  const void* data = logits.data();
  const auto* lb = bias ? static_cast<const float*>(bias->data()) : nullptr;
  // bfloat16 rows of an even K: whole 16-row tiles take the AVX512_BF16 path where it runs.
  const bool fast = bfloat16 && avx512_bf16_enabled && k_count % 2 == 0;
  const std::vector<float> bias_t = fast && lb ? transposed_bias(lb, period, k_count) : std::vector<float>();
  auto run = [&](int64_t row0, int64_t row1) {
    if (fast) {
      const int64_t whole = row0 + (row1 - row0) / kLanes * kLanes;
      unimix_index_tiles_bf16_avx512(static_cast<const uint16_t*>(data), u, o, row0 / kLanes, whole / kLanes,
                                     k_count, mix, lb ? bias_t.data() : nullptr, period);
      row0 = whole;
    }
    if (row0 == row1) return;
    if (bfloat16)
      unimix_index_rows_bf16(static_cast<const uint16_t*>(data), u, o, row0, row1, k_count, mix, lb, period);
    else
      unimix_index_rows_f32(static_cast<const float*>(data), u, o, row0, row1, k_count, mix, lb, period);
  };
  // Whole 16-row tiles per thread; below ~64k logits one thread does it all.
  const int64_t tiles = (m_count + kLanes - 1) / kLanes;
  const int n = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>({threads, tiles, m_count * k_count / 65536 + 1})));
  {
    py::gil_scoped_release release;
#pragma omp parallel for num_threads(n) schedule(static)
    for (int t = 0; t < n; ++t) run(std::min(m_count, tiles * t / n * kLanes), std::min(m_count, tiles * (t + 1) / n * kLanes));
  }
  return out;
}

}  // namespace fastdream::ops
