// twohot_decode: the two-hot expectation over the bins, mapped back by symexp (model/maths.py:
// twohot_decode), one exp per logit and no probabilities written.
#include "ops/ops.hpp"

namespace fastdream::ops {
namespace {

// twohot_decode: symexp(Σ_k softmax(logits + bias)_k bins_k) per row of logits [M, K] (nets.twohot_decode), float32
// results. Rows go 16 columns at a time; the last partial block is padded with -inf logits (exp gives ~0).
__attribute__((always_inline)) inline float symexp(float x) { return std::copysign(std::expm1(std::fabs(x)), x); }

constexpr int kDecodeRows = 4;

// R rows from m0 (buf: R padded rows), each stage (logits, max, sums) across the R rows so one row's reduction
// chains overlap the others' arithmetic, as norm_silu_block_bf16's.
template <int R, typename T>
__attribute__((always_inline)) inline void twohot_decode_block(const T* __restrict__ logits, float* __restrict__ out,
                                                               int64_t m0, int64_t row1, int64_t k_count,
                                                               float* __restrict__ buf,
                                                               const float* __restrict__ padded_bins,
                                                               const float* __restrict__ padded_bias) {
  const int64_t full = k_count / kLanes * kLanes, padded = (k_count + kLanes - 1) / kLanes * kLanes;
  Floats high[R], total[R], weighted[R];
  for (int r = 0; r < R; ++r) {
    const int64_t m = m0 + r;
    if (m + kPrefetchRows < row1) prefetch(logits + (m + kPrefetchRows) * k_count, k_count);
    const T* row = logits + m * k_count;
    float* row_buf = buf + r * padded;
    for (int64_t k = 0; k < full; k += kLanes) store_lanes(row_buf + k, load_row(row + k) + load_lanes(padded_bias + k));
    for (int64_t k = full; k < padded; ++k) row_buf[k] = k < k_count ? load_float(row, k) + padded_bias[k] : -INFINITY;
  }
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r) {
    const float* row_buf = buf + r * padded;
    Floats top = load_lanes(row_buf);
    for (int64_t k = kLanes; k < padded; k += kLanes) {
      const Floats v = load_lanes(row_buf + k);
      top = v > top ? v : top;
    }
    high[r] = Floats{} + lane_max(top);
  }
  for (int r = 0; r < R; ++r) total[r] = weighted[r] = Floats{};
  for (int64_t k = 0; k < padded; k += kLanes) {
    const Floats bins = load_lanes(padded_bins + k);
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) {
      const Floats e = exp_clamped(load_lanes(buf + r * padded + k) - high[r]);
      total[r] += e;
      weighted[r] += e * bins;
    }
  }
  for (int r = 0; r < R; ++r) out[m0 + r] = symexp(lane_sum(weighted[r]) / lane_sum(total[r]));
}

template <typename T>
__attribute__((always_inline)) inline void twohot_decode_rows(const T* __restrict__ logits, float* __restrict__ out,
                                                              int64_t row0, int64_t row1, int64_t k_count,
                                                              float* __restrict__ buf,
                                                              const float* __restrict__ padded_bins,
                                                              const float* __restrict__ padded_bias) {
  int64_t m = row0;
  for (; m + kDecodeRows <= row1; m += kDecodeRows)
    twohot_decode_block<kDecodeRows>(logits, out, m, row1, k_count, buf, padded_bins, padded_bias);
  for (; m < row1; ++m) twohot_decode_block<1>(logits, out, m, row1, k_count, buf, padded_bins, padded_bias);
}

template <typename T>
__attribute__((always_inline)) inline void twohot_decode_range(const T* logits, const float* bins, const float* bias,
                                                               float* out, int64_t row0, int64_t row1, int64_t k_count) {
  const int64_t padded = (k_count + kLanes - 1) / kLanes * kLanes;
  std::vector<float> buf(static_cast<size_t>(kDecodeRows * padded)), padded_bins(static_cast<size_t>(padded), 0.0f),
      padded_bias(static_cast<size_t>(padded), 0.0f);
  std::copy(bins, bins + k_count, padded_bins.begin());
  if (bias) std::copy(bias, bias + k_count, padded_bias.begin());
  twohot_decode_rows(logits, out, row0, row1, k_count, buf.data(), padded_bins.data(), padded_bias.data());
}

FASTDREAM_CLONES
void twohot_decode_rows_f32(const float* logits, const float* bins, const float* bias, float* out, int64_t row0,
                            int64_t row1, int64_t k_count) {
  twohot_decode_range(logits, bins, bias, out, row0, row1, k_count);
}

FASTDREAM_CLONES
void twohot_decode_rows_bf16(const uint16_t* logits, const float* bins, const float* bias, float* out, int64_t row0,
                             int64_t row1, int64_t k_count) {
  twohot_decode_range(logits, bins, bias, out, row0, row1, k_count);
}

}  // namespace

py::array_t<float> twohot_decode(const py::array& logits, const py::array& bins, bool bfloat16, int threads,
                                 const std::optional<py::array>& bias) {
  check_floats(logits, bfloat16, "twohot_decode", "logits");
  if (logits.ndim() != 2 || logits.shape(1) < 1 || !(logits.flags() & py::array::c_style))
    throw py::value_error("twohot_decode: logits " + shape_of(logits) + " must be a C-contiguous [M, K] with K >= 1");
  const int64_t m_count = logits.shape(0), k_count = logits.shape(1);
  check_vector(bins, k_count, "twohot_decode", "bins");
  if (bias) check_vector(*bias, k_count, "twohot_decode", "bias");
  py::array_t<float> out(m_count);
  const void* src = logits.data();
  const auto* b = static_cast<const float*>(bins.data());
  const auto* lb = bias ? static_cast<const float*>(bias->data()) : nullptr;
  auto* o = static_cast<float*>(out.mutable_data());
  const int n = threads_for(threads, m_count, m_count * k_count);
  {
    py::gil_scoped_release release;
#pragma omp parallel for num_threads(n) schedule(static)
    for (int t = 0; t < n; ++t) {
      const int64_t r0 = m_count * t / n, r1 = m_count * (t + 1) / n;
      if (bfloat16)
        twohot_decode_rows_bf16(static_cast<const uint16_t*>(src), b, lb, o, r0, r1, k_count);
      else
        twohot_decode_rows_f32(static_cast<const float*>(src), b, lb, o, r0, r1, k_count);
    }
  }
  return out;
}

}  // namespace fastdream::ops
