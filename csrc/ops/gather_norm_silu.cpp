// gather_norm_silu: norm_silu fused behind a one-hot layer's gather-sum of weight rows (and its dense part's
// matmul output), one pass per row with the sum in registers.
#include "ops/ops.hpp"
#include "ops/norm_rows.hpp"
namespace fastdream::ops {
namespace {

// gather_norm_silu's row of S table indices, or null if one lies outside [0, R): checked before any table row
// is read.
// With classes > 0 the S indices are classes, latent s's in [0, classes), and the table rows s · classes + idx[s]
// (written to buf): a rollout passes its draws as they are, not a rows tensor built from them.
__attribute__((always_inline)) inline const int64_t* checked_indices(const int64_t* idx, int64_t s_count,
                                                                     int64_t r_count, int64_t classes, int64_t* buf) {
  if (classes > 0) {
    for (int64_t s = 0; s < s_count; ++s) {
      if (idx[s] < 0 || idx[s] >= classes) return nullptr;
      buf[s] = s * classes + idx[s];
    }
    return buf;
  }
  for (int64_t s = 0; s < s_count; ++s)
    if (idx[s] < 0 || idx[s] >= r_count) return nullptr;
  return idx;
}

// The start of gather_norm_silu's row m (both paths): row m + kPrefetchRows's indices and dense part asked for,
// row m's table rows checked (checked_indices).
template <typename T>
__attribute__((always_inline)) inline const int64_t* gather_row(const T* dense, const int64_t* rows, int64_t m,
                                                                int64_t row1, int64_t s_count, int64_t r_count,
                                                                int64_t c_count, int64_t classes, int64_t* buf) {
  if (m + kPrefetchRows < row1) {
    prefetch(rows + (m + kPrefetchRows) * s_count, s_count);
    if (dense) prefetch(dense + (m + kPrefetchRows) * c_count, c_count);
  }
  return checked_indices(rows + m * s_count, s_count, r_count, classes, buf);
}

#ifdef FASTDREAM_BF16_DOT
// gather_norm_silu_rows with AVX512_BF16: each 64-byte
// table load adds into the even and odd columns' sums by two dot products against (1, 0) and (0, 1) pairs,
// 3 instructions per 32 columns instead of 5 (load, shift, mask, 2 adds). Exact: one product is x · 1,
// the other 0, and the sum rounds to nearest even as an add does (denormal inputs flush to zero).

// NP vectors of 32 bfloat16 columns at src added into the even and odd columns' sums.
template <int NP>
FASTDREAM_BF16_DOT __attribute__((always_inline)) inline void add_row(const uint16_t* __restrict__ src, __m512* even,
                                                                     __m512* odd) {
  const __m512bh pick_even = (__m512bh)_mm512_set1_epi32(0x00003F80), pick_odd = (__m512bh)_mm512_set1_epi32(0x3F800000);
#pragma GCC unroll 8
  for (int v = 0; v < NP; ++v) {
    const __m512bh w = (__m512bh)_mm512_loadu_si512(src + 2 * v * kLanes);
    even[v] = _mm512_dpbf16_ps(even[v], w, pick_even);
    odd[v] = _mm512_dpbf16_ps(odd[v], w, pick_odd);
  }
}

// NP vectors of 32 columns per block: 8 (256 columns, a whole xs row) keeps 16 sums, enough independent dot
// products per latent to cover their latency; fewer pair the latents into two sets of sums instead (the
// 8-vector blocks: ~1-2 % of an xs gather). The block's table row kGatherAhead latents on is asked for.
template <int NP>
FASTDREAM_BF16_DOT __attribute__((always_inline)) inline void dot_block(const uint16_t* __restrict__ dense_row,
                                                                       const uint16_t* __restrict__ table,
                                                                       const int64_t* __restrict__ idx, int64_t s_count,
                                                                       int64_t c_count, float* __restrict__ buf) {
  constexpr int kSets = NP >= 8 ? 1 : 2;
  __m512 even[kSets][NP], odd[kSets][NP];
#pragma GCC unroll 8
  for (int v = 0; v < NP; ++v)
#pragma GCC unroll 2
    for (int k = 0; k < kSets; ++k) even[k][v] = odd[k][v] = _mm512_setzero_ps();
  if (dense_row) add_row<NP>(dense_row, even[0], odd[0]);
  int64_t s = 0;
  for (; s + kSets <= s_count; s += kSets)
#pragma GCC unroll 2
    for (int k = 0; k < kSets; ++k) {
      if (s + k + kGatherAhead < s_count) prefetch(table + idx[s + k + kGatherAhead] * c_count, 2 * NP * kLanes);
      add_row<NP>(table + idx[s + k] * c_count, even[k], odd[k]);
    }
  for (; s < s_count; ++s) add_row<NP>(table + idx[s] * c_count, even[0], odd[0]);
#pragma GCC unroll 8
  for (int v = 0; v < NP; ++v) {
    Floats lo, hi;
    if constexpr (kSets == 2)
      interleave((Floats)_mm512_add_ps(even[0][v], even[1][v]), (Floats)_mm512_add_ps(odd[0][v], odd[1][v]), lo, hi);
    else
      interleave((Floats)even[0][v], (Floats)odd[0][v], lo, hi);
    store_lanes(buf + 2 * v * kLanes, lo);
    store_lanes(buf + (2 * v + 1) * kLanes, hi);
  }
}

FASTDREAM_BF16_DOT
bool gather_norm_silu_rows_bf16_dot(const uint16_t* dense, const uint16_t* table, const int64_t* rows, const float* w,
                                    const float* b, uint16_t* out, int64_t row0, int64_t row1, int64_t s_count,
                                    int64_t r_count, int64_t c_count, float eps, int64_t classes, int64_t ld) {
  std::vector<float> buf(static_cast<size_t>(kNormRows * c_count));
  std::vector<int64_t> abs_rows(static_cast<size_t>(s_count));
  uint16_t* dst[kNormRows];
  for (int64_t m0 = row0; m0 < row1; m0 += kNormRows) {
    const int64_t block = std::min(kNormRows, row1 - m0);
    for (int64_t r = 0; r < block; ++r) {
      const int64_t m = m0 + r;
      const int64_t* idx = gather_row(dense, rows, m, row1, s_count, r_count, c_count, classes, abs_rows.data());
      if (!idx) return false;
      const uint16_t* dense_row = dense ? dense + m * c_count : nullptr;
      float* row_buf = buf.data() + r * c_count;
      int64_t c = 0;
      for (; c + 16 * kLanes <= c_count; c += 16 * kLanes)
        dot_block<8>(dense_row ? dense_row + c : nullptr, table + c, idx, s_count, c_count, row_buf + c);
      for (; c + 8 * kLanes <= c_count; c += 8 * kLanes)
        dot_block<4>(dense_row ? dense_row + c : nullptr, table + c, idx, s_count, c_count, row_buf + c);
      for (; c < c_count; c += 2 * kLanes)
        dot_block<1>(dense_row ? dense_row + c : nullptr, table + c, idx, s_count, c_count, row_buf + c);
      dst[r] = out + m * ld;
    }
    norm_silu_rows_of_block(buf.data(), block, w, b, dst, c_count, eps, c_count, 0);
  }
  return true;
}
#else
bool gather_norm_silu_rows_bf16_dot(const uint16_t*, const uint16_t*, const int64_t*, const float*, const float*,
                                    uint16_t*, int64_t, int64_t, int64_t, int64_t, int64_t, float, int64_t, int64_t) {
  return false;
}
#endif

// gather_norm_silu: norm_silu of dense[m] + Σ_s table[rows[m, s]] per row m (nets.onehot_norm_silu: a layer
// on one-hot inputs as a gather-sum of weight rows, plus its dense inputs' matmul, then LayerNorm and SiLU).
// Sixteen vectors (256 columns) of the sum stay in registers while the S table rows add into them; the row
// reaches memory once, already normalised. embedding_bag, the add and norm_silu took three passes.
template <int NV, typename T>
__attribute__((always_inline)) inline void gather_block(const T* __restrict__ dense_row, const T* __restrict__ table,
                                                        const int64_t* __restrict__ idx, int64_t s_count,
                                                        int64_t c_count, float* __restrict__ buf) {
  if constexpr (std::is_same_v<T, uint16_t> && NV % 2 == 0) {
    // bfloat16: 32 columns per 64-byte load, split into even and odd columns by one shift and one mask
    // (a 16-lane widening compiled to two half-width ones and a merge); interleaved again once per row.
    Floats even[NV / 2], odd[NV / 2];
#pragma GCC unroll 8
    for (int v = 0; v < NV / 2; ++v) {
      even[v] = odd[v] = Floats{};
      if (dense_row) split_words(dense_row + 2 * v * kLanes, even[v], odd[v]);
    }
    for (int64_t s = 0; s < s_count; ++s) {
      if (s + kGatherAhead < s_count) prefetch(table + idx[s + kGatherAhead] * c_count, NV * kLanes);
      const T* src = table + idx[s] * c_count;
#pragma GCC unroll 8
      for (int v = 0; v < NV / 2; ++v) split_words(src + 2 * v * kLanes, even[v], odd[v]);
    }
#pragma GCC unroll 8
    for (int v = 0; v < NV / 2; ++v) {
      Floats lo, hi;
      interleave(even[v], odd[v], lo, hi);
      store_lanes(buf + 2 * v * kLanes, lo);
      store_lanes(buf + (2 * v + 1) * kLanes, hi);
    }
  } else {
    Floats acc[NV];
#pragma GCC unroll 16
    for (int v = 0; v < NV; ++v) acc[v] = dense_row ? load_row(dense_row + v * kLanes) : Floats{};
    for (int64_t s = 0; s < s_count; ++s) {
      if (s + kGatherAhead < s_count) prefetch(table + idx[s + kGatherAhead] * c_count, NV * kLanes);
      const T* src = table + idx[s] * c_count;
#pragma GCC unroll 16
      for (int v = 0; v < NV; ++v) acc[v] += load_row(src + v * kLanes);
    }
#pragma GCC unroll 16
    for (int v = 0; v < NV; ++v) store_lanes(buf + v * kLanes, acc[v]);
  }
}

// Rows [row0, row1); false (and the rows from the bad one on left unwritten) at a row index outside [0, R).
template <typename T>
__attribute__((always_inline)) inline bool gather_norm_silu_rows(const T* dense, const T* table, const int64_t* rows,
                                                                 const float* weight, const float* bias, T* out,
                                                                 int64_t row0, int64_t row1, int64_t s_count,
                                                                 int64_t r_count, int64_t c_count, float eps,
                                                                 int64_t classes, int64_t ld) {
  std::vector<float> buf(static_cast<size_t>(c_count));
  std::vector<int64_t> abs_rows(static_cast<size_t>(s_count));
  constexpr int64_t kBlock = 16 * kLanes;
  for (int64_t m = row0; m < row1; ++m) {
    const int64_t* idx = gather_row(dense, rows, m, row1, s_count, r_count, c_count, classes, abs_rows.data());
    if (!idx) return false;
    const T* dense_row = dense ? dense + m * c_count : nullptr;
    int64_t c = 0;
    if (c_count % kLanes == 0) {
      for (; c + kBlock <= c_count; c += kBlock)
        gather_block<16>(dense_row ? dense_row + c : nullptr, table + c, idx, s_count, c_count, buf.data() + c);
      for (; c < c_count; c += kLanes)
        gather_block<1>(dense_row ? dense_row + c : nullptr, table + c, idx, s_count, c_count, buf.data() + c);
    } else {
      for (; c < c_count; ++c) {
        float sum = dense_row ? load_float(dense_row, c) : 0.0f;
        for (int64_t s = 0; s < s_count; ++s) sum += load_float(table, idx[s] * c_count + c);
        buf[c] = sum;
      }
    }
    norm_silu_row(buf.data(), weight, bias, out + m * ld, c_count, eps);
  }
  return true;
}

FASTDREAM_CLONES
bool gather_norm_silu_rows_f32(const float* dense, const float* table, const int64_t* rows, const float* w,
                               const float* b, float* out, int64_t row0, int64_t row1, int64_t s_count,
                               int64_t r_count, int64_t c_count, float eps, int64_t classes, int64_t ld) {
  return gather_norm_silu_rows(dense, table, rows, w, b, out, row0, row1, s_count, r_count, c_count, eps, classes, ld);
}

FASTDREAM_CLONES
bool gather_norm_silu_rows_bf16(const uint16_t* dense, const uint16_t* table, const int64_t* rows, const float* w,
                                const float* b, uint16_t* out, int64_t row0, int64_t row1, int64_t s_count,
                                int64_t r_count, int64_t c_count, float eps, int64_t classes, int64_t ld) {
  return gather_norm_silu_rows(dense, table, rows, w, b, out, row0, row1, s_count, r_count, c_count, eps, classes, ld);
}


}  // namespace

py::array gather_norm_silu(const std::optional<py::array>& dense, const py::array& table, const py::array& rows,
                           const py::array& weight, const py::array& bias, double eps, bool bfloat16, int threads,
                           int64_t classes, const std::optional<py::array>& out_arg) {
  check_floats(table, bfloat16, "gather_norm_silu", "table");
  if (table.ndim() != 2 || table.shape(0) < 1 || table.shape(1) < 1 || !(table.flags() & py::array::c_style))
    throw py::value_error("gather_norm_silu: table " + shape_of(table) + " must be a C-contiguous [R, C] with R, C >= 1");
  if (!rows.dtype().is(py::dtype::of<int64_t>()))
    throw py::type_error("gather_norm_silu: rows dtype " + std::string(py::str(rows.dtype())) + ", expected int64");
  if (rows.ndim() != 2 || !(rows.flags() & py::array::c_style))
    throw py::value_error("gather_norm_silu: rows " + shape_of(rows) + " must be a C-contiguous [M, S]");
  const int64_t m_count = rows.shape(0), s_count = rows.shape(1), r_count = table.shape(0), c_count = table.shape(1);
  if (classes < 0 || (classes > 0 && r_count != s_count * classes))
    throw py::value_error("gather_norm_silu: classes " + std::to_string(classes) + " must be 0 (rows index the table) " +
                          "or K with table rows R = S * K (rows [M, S] hold classes), got table " + shape_of(table) +
                          " and rows " + shape_of(rows));
  if (dense) {
    check_floats(*dense, bfloat16, "gather_norm_silu", "dense");
    if (dense->ndim() != 2 || dense->shape(0) != m_count || dense->shape(1) != c_count ||
        !(dense->flags() & py::array::c_style))
      throw py::value_error("gather_norm_silu: dense " + shape_of(*dense) + " must be a C-contiguous [" +
                            std::to_string(m_count) + ", " + std::to_string(c_count) + "] (rows [M, S], table [R, C])");
  }
  check_vector(weight, c_count, "gather_norm_silu", "weight");
  check_vector(bias, c_count, "gather_norm_silu", "bias");
  if (!(eps > 0.0)) throw py::value_error("gather_norm_silu: eps must be > 0, got " + std::to_string(eps));
  const int64_t ld = out_arg ? checked_out(*out_arg, bfloat16, m_count, c_count, "gather_norm_silu") : c_count;
  py::array out = out_arg ? *out_arg : py::array(table.dtype(), {m_count, c_count});
  const void* d = dense ? dense->data() : nullptr;
  const void* tab = table.data();
  const auto* r = static_cast<const int64_t*>(rows.data());
  const auto* w = static_cast<const float*>(weight.data());
  const auto* b = static_cast<const float*>(bias.data());
  void* o = out.mutable_data();
  const float e = static_cast<float>(eps);
  const int n = threads_for(threads, m_count, m_count * c_count * (s_count + 1));
  bool ok = true;
  const bool dot = avx512_bf16_enabled && c_count % (2 * kLanes) == 0;
  {
    py::gil_scoped_release release;
#pragma omp parallel for num_threads(n) schedule(static) reduction(&& : ok)
    for (int t = 0; t < n; ++t) {
      const int64_t r0 = m_count * t / n, r1 = m_count * (t + 1) / n;
      if (bfloat16 && dot)
        ok = ok && gather_norm_silu_rows_bf16_dot(static_cast<const uint16_t*>(d), static_cast<const uint16_t*>(tab),
                                                  r, w, b, static_cast<uint16_t*>(o), r0, r1, s_count, r_count,
                                                  c_count, e, classes, ld);
      else if (bfloat16)
        ok = ok && gather_norm_silu_rows_bf16(static_cast<const uint16_t*>(d), static_cast<const uint16_t*>(tab), r,
                                              w, b, static_cast<uint16_t*>(o), r0, r1, s_count, r_count, c_count, e,
                                              classes, ld);
      else
        ok = ok && gather_norm_silu_rows_f32(static_cast<const float*>(d), static_cast<const float*>(tab), r, w, b,
                                             static_cast<float*>(o), r0, r1, s_count, r_count, c_count, e, classes,
                                             ld);
    }
  }
  if (!ok) {
    const int64_t bound = classes > 0 ? classes : r_count;
    const int64_t* bad = std::find_if(r, r + m_count * s_count, [&](int64_t i) { return i < 0 || i >= bound; });
    throw py::index_error("gather_norm_silu: " + std::string(classes > 0 ? "class" : "row") + " index " +
                          std::to_string(*bad) + " outside [0, " + std::to_string(bound) + ") of table " +
                          shape_of(table));
  }
  return out;
}

}  // namespace fastdream::ops
