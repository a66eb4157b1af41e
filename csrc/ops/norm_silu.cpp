// norm_silu: SiLU(LayerNorm(x [+ add] [+ add_bias]) * weight + bias) per row, one pass per row with a cheaper
// exp than inductor's; the plain or the grouped [G, M, C/G] layout out (as a block matmul reads it).
#include "ops/ops.hpp"
#include "ops/norm_rows.hpp"
namespace fastdream::ops {
namespace {

// Row m's output goes straight into out [M, C] (rows ld apart: out may be a column slice of a wider array), or
// with groups > 1 through tmp [C] into out [G, M, C/G] (group g of every row contiguous: the layout a block
// matmul's bmm reads, so no transposed copy follows).
template <typename T>
__attribute__((always_inline)) inline T* row_out(T* out, T* tmp, int64_t m, int64_t ld, int64_t groups) {
  return groups > 1 ? tmp : out + m * ld;
}
template <typename T>
__attribute__((always_inline)) inline void scatter_groups(const T* tmp, T* out, int64_t m, int64_t m_count,
                                                          int64_t c_count, int64_t groups) {
  if (groups <= 1) return;
  const int64_t cg = c_count / groups;
  for (int64_t g = 0; g < groups; ++g) std::memcpy(out + (g * m_count + m) * cg, tmp + g * cg, cg * sizeof(T));
}

// What norm_silu may add to row m of x before the norm: `add` [G, M, C/G] of x's dtype (laid out as a block
// matmul's bmm leaves it, no transposed copy) and `bias` [C] float32 — the layer's parts an addmm had summed,
// copying one of them into its output on one thread first.
template <typename T>
struct Addend {
  const T* add = nullptr;
  int64_t groups = 1;
  const float* bias = nullptr;
};

// norm_silu's inputs of row m (prefetch): x's row and the addend's G slices of it.
template <typename T>
__attribute__((always_inline)) inline void prefetch_rows(const T* x, const Addend<T>& a, int64_t m, int64_t m_count,
                                                         int64_t c_count) {
  prefetch(x + m * c_count, c_count);
  const int64_t cg = c_count / a.groups;
  if (a.add)
    for (int64_t g = 0; g < a.groups; ++g) prefetch(a.add + (g * m_count + m) * cg, cg);
}

template <typename T>
__attribute__((always_inline)) inline void add_into(float* __restrict__ buf, const Addend<T>& a, int64_t m,
                                                    int64_t m_count, int64_t c_count) {
  if (a.add) {
    const int64_t cg = c_count / a.groups;
    for (int64_t g = 0; g < a.groups; ++g) {
      const T* src = a.add + (g * m_count + m) * cg;
      float* dst = buf + g * cg;
      int64_t j = 0;
      for (; j + kLanes <= cg; j += kLanes) store_lanes(dst + j, load_lanes(dst + j) + load_row(src + j));
      for (; j < cg; ++j) dst[j] += load_float(src, j);
    }
  }
  if (a.bias) {
    int64_t c = 0;
    for (; c + kLanes <= c_count; c += kLanes) store_lanes(buf + c, load_lanes(buf + c) + load_lanes(a.bias + c));
    for (; c < c_count; ++c) buf[c] += a.bias[c];
  }
}

#ifdef FASTDREAM_BF16_DOT
// Row m of x plus its addend (add_into's sum, in its order: x + add, then + bias) into buf [C] in one pass, for
// C/Ga a multiple of 16: add_into read and rewrote buf once per part (the dream's block-GRU norm, add and bias, ran
// 17 % slower so).
FASTDREAM_BF16_DOT __attribute__((always_inline)) inline void load_row_with_addend(const uint16_t* __restrict__ row,
                                                                                  const Addend<uint16_t>& a, int64_t m,
                                                                                  int64_t m_count, int64_t c_count,
                                                                                  float* __restrict__ buf) {
  const int64_t cg = c_count / a.groups;
  for (int64_t g = 0; g < a.groups; ++g) {
    const uint16_t* part = a.add ? a.add + (g * m_count + m) * cg : nullptr;
    for (int64_t j = 0; j < cg; j += kLanes) {
      const int64_t c = g * cg + j;
      __m512 v = load_bf16(row + c);
      if (part) v = _mm512_add_ps(v, load_bf16(part + j));
      if (a.bias) v = _mm512_add_ps(v, _mm512_loadu_ps(a.bias + c));
      _mm512_storeu_ps(buf + c, v);
    }
  }
}

FASTDREAM_BF16_DOT
void norm_silu_rows_bf16_avx512(const uint16_t* x, const float* w, const float* b, uint16_t* out, int64_t row0,
                                int64_t row1, int64_t m_count, int64_t c_count, int64_t groups, float eps,
                                const Addend<uint16_t>& addend, int64_t ld) {
  std::vector<float> buf(static_cast<size_t>(kNormRows * c_count));
  std::vector<uint16_t> tmp(static_cast<size_t>(kNormRows * c_count));
  uint16_t* dst[kNormRows];
  const bool fused_add = (addend.add || addend.bias) && c_count / addend.groups % kLanes == 0;
  const int64_t cg = c_count / groups;
  const bool direct = groups > 1 && cg % (2 * kLanes) == 0;  // grouped output straight from the norm
  for (int64_t m0 = row0; m0 < row1; m0 += kNormRows) {
    const int64_t rows = std::min(kNormRows, row1 - m0);
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t m = m0 + r;
      const uint16_t* row = x + m * c_count;
      float* row_buf = buf.data() + r * c_count;
      if (m + kPrefetchRows < row1) prefetch_rows(x, addend, m + kPrefetchRows, m_count, c_count);
      if (fused_add) {
        load_row_with_addend(row, addend, m, m_count, c_count, row_buf);
      } else {
        for (int64_t c = 0; c < c_count; c += kLanes) _mm512_storeu_ps(row_buf + c, load_bf16(row + c));
        add_into(row_buf, addend, m, m_count, c_count);
      }
      dst[r] = direct ? out + m * cg : row_out(out, tmp.data() + r * c_count, m, ld, groups);
    }
    norm_silu_rows_of_block(buf.data(), rows, w, b, dst, c_count, eps, direct ? cg : c_count, direct ? m_count * cg : 0);
    if (!direct)
      for (int64_t r = 0; r < rows; ++r) scatter_groups(tmp.data() + r * c_count, out, m0 + r, m_count, c_count, groups);
  }
}
#else
void norm_silu_rows_bf16_avx512(const uint16_t*, const float*, const float*, uint16_t*, int64_t, int64_t, int64_t,
                                int64_t, int64_t, float, const Addend<uint16_t>&, int64_t) {}
#endif

// norm_silu over rows [row0, row1) of x [M, C] (plus the addend); buf holds one row in float32.
template <typename T>
__attribute__((always_inline)) inline void norm_silu_rows(const T* __restrict__ x, const float* __restrict__ weight,
                                                          const float* __restrict__ bias, T* __restrict__ out,
                                                          int64_t row0, int64_t row1, int64_t m_count, int64_t c_count,
                                                          int64_t groups, float eps, const Addend<T>& addend,
                                                          int64_t ld) {
  std::vector<float> buf(static_cast<size_t>(c_count));
  std::vector<T> tmp(static_cast<size_t>(c_count));
  for (int64_t m = row0; m < row1; ++m) {
    const T* row = x + m * c_count;
    if (m + kPrefetchRows < row1) prefetch_rows(x, addend, m + kPrefetchRows, m_count, c_count);
    int64_t c = 0;
    for (; c + kLanes <= c_count; c += kLanes) store_lanes(buf.data() + c, load_row(row + c));
    for (; c < c_count; ++c) buf[c] = load_float(row, c);
    add_into(buf.data(), addend, m, m_count, c_count);
    norm_silu_row(buf.data(), weight, bias, row_out(out, tmp.data(), m, ld, groups), c_count, eps);
    scatter_groups(tmp.data(), out, m, m_count, c_count, groups);
  }
}

FASTDREAM_CLONES
void norm_silu_rows_f32(const float* x, const float* w, const float* b, float* out, int64_t row0, int64_t row1,
                        int64_t m_count, int64_t c_count, int64_t groups, float eps, const Addend<float>& addend,
                        int64_t ld) {
  norm_silu_rows(x, w, b, out, row0, row1, m_count, c_count, groups, eps, addend, ld);
}

FASTDREAM_CLONES
void norm_silu_rows_bf16(const uint16_t* x, const float* w, const float* b, uint16_t* out, int64_t row0,
                         int64_t row1, int64_t m_count, int64_t c_count, int64_t groups, float eps,
                         const Addend<uint16_t>& addend, int64_t ld) {
  norm_silu_rows(x, w, b, out, row0, row1, m_count, c_count, groups, eps, addend, ld);
}

}  // namespace

py::array norm_silu(const py::array& x, const py::array& weight, const py::array& bias, double eps, bool bfloat16,
                    int threads, int64_t groups, const std::optional<py::array>& add,
                    const std::optional<py::array>& add_bias, const std::optional<py::array>& out_arg) {
  check_floats(x, bfloat16, "norm_silu", "x");
  if (x.ndim() != 2 || x.shape(1) < 1 || !(x.flags() & py::array::c_style))
    throw py::value_error("norm_silu: x " + shape_of(x) + " must be a C-contiguous [M, C] with C >= 1");
  const int64_t m_count = x.shape(0), c_count = x.shape(1);
  check_vector(weight, c_count, "norm_silu", "weight");
  check_vector(bias, c_count, "norm_silu", "bias");
  if (!(eps > 0.0)) throw py::value_error("norm_silu: eps must be > 0, got " + std::to_string(eps));
  if (groups < 1 || c_count % groups != 0)
    throw py::value_error("norm_silu: groups " + std::to_string(groups) + " must be >= 1 and divide C = " +
                          std::to_string(c_count));
  if (add) {
    check_floats(*add, bfloat16, "norm_silu", "add");
    if (add->ndim() != 3 || add->shape(0) < 1 || add->shape(1) != m_count || add->shape(0) * add->shape(2) != c_count ||
        !(add->flags() & py::array::c_style))
      throw py::value_error("norm_silu: add " + shape_of(*add) + " must be a C-contiguous [G, " +
                            std::to_string(m_count) + ", C/G] with C = " + std::to_string(c_count));
  }
  if (add_bias) check_vector(*add_bias, c_count, "norm_silu", "add_bias");
  const int64_t add_groups = add ? add->shape(0) : 1;
  const void* add_data = add ? add->data() : nullptr;
  const auto* add_b = add_bias ? static_cast<const float*>(add_bias->data()) : nullptr;
  const Addend<float> addend_f32{static_cast<const float*>(add_data), add_groups, add_b};
  const Addend<uint16_t> addend_bf16{static_cast<const uint16_t*>(add_data), add_groups, add_b};
  if (out_arg && groups > 1) throw py::value_error("norm_silu: out is for groups = 1, got groups " + std::to_string(groups));
  const int64_t ld = out_arg ? checked_out(*out_arg, bfloat16, m_count, c_count, "norm_silu") : c_count;
  py::array out = out_arg ? *out_arg
                  : groups > 1 ? py::array(x.dtype(), {groups, m_count, c_count / groups})
                               : py::array(x.dtype(), {m_count, c_count});
  const auto* w = static_cast<const float*>(weight.data());
  const auto* b = static_cast<const float*>(bias.data());
  const void* src = x.data();
  void* dst = out.mutable_data();
  const float e = static_cast<float>(eps);
  const int n = threads_for(threads, m_count, m_count * c_count);
  const bool fast = avx512_bf16_enabled && c_count % (2 * kLanes) == 0;
  {
    py::gil_scoped_release release;
#pragma omp parallel for num_threads(n) schedule(static)
    for (int t = 0; t < n; ++t) {
      const int64_t r0 = m_count * t / n, r1 = m_count * (t + 1) / n;
      if (bfloat16 && fast)
        norm_silu_rows_bf16_avx512(static_cast<const uint16_t*>(src), w, b, static_cast<uint16_t*>(dst), r0, r1,
                                   m_count, c_count, groups, e, addend_bf16, ld);
      else if (bfloat16)
        norm_silu_rows_bf16(static_cast<const uint16_t*>(src), w, b, static_cast<uint16_t*>(dst), r0, r1, m_count,
                            c_count, groups, e, addend_bf16, ld);
      else
        norm_silu_rows_f32(static_cast<const float*>(src), w, b, static_cast<float*>(dst), r0, r1, m_count, c_count,
                           groups, e, addend_f32, ld);
    }
  }
  return out;
}

}  // namespace fastdream::ops
