// gru_gate: the block-GRU update on the block matmul's own output (model/maths.py: gru_gate).
#include "ops/ops.hpp"
#include "ops/avx512_bf16.hpp"
namespace fastdream::ops {
namespace {

// gru_gate's optional bfloat16 copies of the new deter (either may be null): rows [N, D], as the next step's
// matmuls read it, and grouped [G, N, D/G], as its block matmul reads it.
struct GateCopies {
  uint16_t* rows = nullptr;
  uint16_t* grouped = nullptr;
};

// gru_gate's inputs of row n (prefetch): its G slices of y [G, N, 3 D/G] and its deter row.
template <typename T>
__attribute__((always_inline)) inline void prefetch_gate_row(const T* y, const float* deter, int64_t n, int64_t n_count,
                                                             int64_t groups, int64_t dg) {
  for (int64_t g = 0; g < groups; ++g) prefetch(y + (g * n_count + n) * 3 * dg, 3 * dg);
  prefetch(deter + n * groups * dg, groups * dg);
}

// Row n, group g of the gate: its 3 D/G pre-activations in y [G, N, 3 D/G], the group's bias, its old deter and its
// output slices (both paths' loops start from these).
template <typename T>
struct GateSlice {
  const T* y;
  const float* bias;
  const float* deter;
  float* out;
};
template <typename T>
__attribute__((always_inline)) inline GateSlice<T> gate_slice(const T* y, const float* bias, const float* deter,
                                                              float* out, int64_t n, int64_t g, int64_t n_count,
                                                              int64_t groups, int64_t dg) {
  return {y + (g * n_count + n) * 3 * dg, bias + g * 3 * dg, deter + n * groups * dg + g * dg,
          out + n * groups * dg + g * dg};
}

#ifdef FASTDREAM_BF16_DOT
// gru_gate_rows (below) for bfloat16 y with D/G a multiple of 16.
FASTDREAM_BF16_DOT
void gru_gate_rows_bf16_avx512(const uint16_t* y, const float* bias, const float* deter, float* out, int64_t row0,
                               int64_t row1, int64_t n_count, int64_t groups, int64_t dg, const GateCopies& copies) {
  const __m512 one = _mm512_set1_ps(1.0f), two = _mm512_set1_ps(2.0f);
  for (int64_t n = row0; n < row1; ++n) {
    if (n + kPrefetchRows < row1) prefetch_gate_row(y, deter, n + kPrefetchRows, n_count, groups, dg);
    for (int64_t g = 0; g < groups; ++g) {
      const auto [src, b, h, dst] = gate_slice(y, bias, deter, out, n, g, n_count, groups, dg);
      for (int64_t j = 0; j < dg; j += kLanes) {
        const __m512 reset = sigmoid_avx512(_mm512_add_ps(load_bf16(src + j), _mm512_loadu_ps(b + j)));
        const __m512 c = _mm512_add_ps(load_bf16(src + dg + j), _mm512_loadu_ps(b + dg + j));
        const __m512 cand = _mm512_fmsub_ps(two, sigmoid_avx512(_mm512_mul_ps(_mm512_mul_ps(two, reset), c)), one);
        const __m512 u = _mm512_add_ps(load_bf16(src + 2 * dg + j), _mm512_loadu_ps(b + 2 * dg + j));
        const __m512 update = sigmoid_avx512(_mm512_sub_ps(u, one));
        const __m512 old = _mm512_loadu_ps(h + j);
        const __m512 next = _mm512_fmadd_ps(update, _mm512_sub_ps(cand, old), old);
        _mm512_storeu_ps(dst + j, next);
        if (copies.rows || copies.grouped) {
          const __m256i words = (__m256i)_mm512_cvtneps_pbh(next);
          if (copies.rows) _mm256_storeu_si256(reinterpret_cast<__m256i*>(copies.rows + (n * groups + g) * dg + j), words);
          if (copies.grouped)
            _mm256_storeu_si256(reinterpret_cast<__m256i*>(copies.grouped + (g * n_count + n) * dg + j), words);
        }
      }
    }
  }
}
#else
void gru_gate_rows_bf16_avx512(const uint16_t*, const float*, const float*, float*, int64_t, int64_t, int64_t, int64_t,
                               int64_t, const GateCopies&) {}
#endif

// gru_gate: the block-GRU update (model/maths.py: gru_gate) on the block matmul's own
// output y [G, N, 3 · D/G] (group g's reset, candidate and update pre-activations of row n, before the bias):
//   reset = σ(r), cand = tanh(reset · c) = 2σ(2 reset c) − 1, update = σ(u − 1),
//   out[n, g D/G + j] = update · cand + (1 − update) · deter[n, g D/G + j]   (float32).
template <typename T>
__attribute__((always_inline)) inline void gru_gate_rows(const T* __restrict__ y, const float* __restrict__ bias,
                                                         const float* __restrict__ deter, float* __restrict__ out,
                                                         int64_t row0, int64_t row1, int64_t n_count, int64_t groups,
                                                         int64_t dg, const GateCopies& copies) {
  constexpr int kDegree = kExpDegree<T>;
  for (int64_t n = row0; n < row1; ++n) {
    if (n + kPrefetchRows < row1) prefetch_gate_row(y, deter, n + kPrefetchRows, n_count, groups, dg);
    for (int64_t g = 0; g < groups; ++g) {
      const auto [src, b, h, dst] = gate_slice(y, bias, deter, out, n, g, n_count, groups, dg);
      int64_t j = 0;
      for (; j + kLanes <= dg; j += kLanes) {
        const Floats reset = sigmoid<kDegree>(load_row(src + j) + load_lanes(b + j));
        const Floats cand = 2.0f * sigmoid<kDegree>(2.0f * reset * (load_row(src + dg + j) + load_lanes(b + dg + j))) - 1.0f;
        const Floats update = sigmoid<kDegree>(load_row(src + 2 * dg + j) + load_lanes(b + 2 * dg + j) - 1.0f);
        const Floats old = load_lanes(h + j);
        const Floats next = old + update * (cand - old);
        store_lanes(dst + j, next);
        if (copies.rows) store_row(copies.rows + (n * groups + g) * dg + j, next);
        if (copies.grouped) store_row(copies.grouped + (g * n_count + n) * dg + j, next);
      }
      for (; j < dg; ++j) {
        const float reset = sigmoid(load_float(src, j) + b[j]);
        const float cand = 2.0f * sigmoid(2.0f * reset * (load_float(src, dg + j) + b[dg + j])) - 1.0f;
        const float update = sigmoid(load_float(src, 2 * dg + j) + b[2 * dg + j] - 1.0f);
        dst[j] = h[j] + update * (cand - h[j]);
        if (copies.rows) store_float(copies.rows, (n * groups + g) * dg + j, dst[j]);
        if (copies.grouped) store_float(copies.grouped, (g * n_count + n) * dg + j, dst[j]);
      }
    }
  }
}

FASTDREAM_CLONES
void gru_gate_rows_f32(const float* y, const float* bias, const float* deter, float* out, int64_t row0, int64_t row1,
                       int64_t n_count, int64_t groups, int64_t dg, const GateCopies& copies) {
  gru_gate_rows(y, bias, deter, out, row0, row1, n_count, groups, dg, copies);
}

FASTDREAM_CLONES
void gru_gate_rows_bf16(const uint16_t* y, const float* bias, const float* deter, float* out, int64_t row0,
                        int64_t row1, int64_t n_count, int64_t groups, int64_t dg, const GateCopies& copies) {
  gru_gate_rows(y, bias, deter, out, row0, row1, n_count, groups, dg, copies);
}

}  // namespace

py::object gru_gate(const py::array& y, const py::array& bias, const py::array& deter, bool bfloat16, int threads,
                    bool copies, const std::optional<py::array>& rows_out) {
  check_floats(y, bfloat16, "gru_gate", "y");
  if (!deter.dtype().is(py::dtype::of<float>()))
    throw py::type_error("gru_gate: deter dtype " + std::string(py::str(deter.dtype())) + ", expected float32");
  if (y.ndim() != 3 || deter.ndim() != 2 || y.shape(2) % 3 != 0 || y.shape(2) < 3 || y.shape(1) != deter.shape(0) ||
      deter.shape(1) != y.shape(0) * (y.shape(2) / 3))
    throw py::value_error("gru_gate: y " + shape_of(y) + " and deter " + shape_of(deter) +
                          " must be [G, N, 3 D/G] and [N, D]");
  if (!(y.flags() & py::array::c_style) || !(deter.flags() & py::array::c_style))
    throw py::value_error("gru_gate: y and deter must be C-contiguous");
  const int64_t groups = y.shape(0), n_count = y.shape(1), dg = y.shape(2) / 3;
  check_vector(bias, 3 * groups * dg, "gru_gate", "bias");
  py::array_t<float> out({n_count, groups * dg});
  const void* src = y.data();
  const auto* b = static_cast<const float*>(bias.data());
  const auto* h = static_cast<const float*>(deter.data());
  auto* o = static_cast<float*>(out.mutable_data());
  py::array_t<int16_t> rows_copy, grouped_copy;  // bfloat16 words, as the other kernels' bf16 outputs
  GateCopies cp;
  if (copies) {
    if (!bfloat16) throw py::value_error("gru_gate: copies=True needs bfloat16 y (the copies are in y's dtype)");
    if (rows_out)  // the caller's array of bfloat16 words, e.g. one step of a stacked sequence
      check_written_in_place(*rows_out, py::dtype::of<int16_t>(), {n_count, groups * dg}, "gru_gate", "rows_out");
    rows_copy = rows_out ? py::array_t<int16_t>(*rows_out) : py::array_t<int16_t>({n_count, groups * dg});
    grouped_copy = py::array_t<int16_t>({groups, n_count, dg});
    cp.rows = reinterpret_cast<uint16_t*>(rows_copy.mutable_data());
    cp.grouped = reinterpret_cast<uint16_t*>(grouped_copy.mutable_data());
  }
  const int n = threads_for(threads, n_count, n_count * groups * dg * 3);
  const bool fast = avx512_bf16_enabled && dg % kLanes == 0;
  {
    py::gil_scoped_release release;
#pragma omp parallel for num_threads(n) schedule(static)
    for (int t = 0; t < n; ++t) {
      const int64_t r0 = n_count * t / n, r1 = n_count * (t + 1) / n;
      if (bfloat16 && fast)
        gru_gate_rows_bf16_avx512(static_cast<const uint16_t*>(src), b, h, o, r0, r1, n_count, groups, dg, cp);
      else if (bfloat16)
        gru_gate_rows_bf16(static_cast<const uint16_t*>(src), b, h, o, r0, r1, n_count, groups, dg, cp);
      else
        gru_gate_rows_f32(static_cast<const float*>(src), b, h, o, r0, r1, n_count, groups, dg, cp);
    }
  }
  if (copies) return py::make_tuple(out, rows_copy, grouped_copy);
  return std::move(out);
}

}  // namespace fastdream::ops
