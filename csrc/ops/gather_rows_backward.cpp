// gather_rows_backward: the weight gradient of a gather-sum of rows (nets.onehot_linear):
//   out[r, :] = sum over (m, s) with rows[m, s] == r of g[m, :]
// Column block by column block, the output slice stays in cache and g is read once; torch's S index_adds
// re-read all of g once per latent. Every check happens before any memory is touched.
#include "ops/ops.hpp"

namespace fastdream::ops {
namespace {

FASTDREAM_CLONES
void accumulate(const float* __restrict__ g, const int64_t* __restrict__ rows, float* __restrict__ out,
                int64_t m_count, int64_t s_count, int64_t width, int64_t col0, int64_t col1) {
  // One 64-float column block at a time: its slice of `out` (num_rows x 256 B) stays in L2 while
  // every g row adds its matching slice into it; each element of g is read once.
  constexpr int64_t kBlock = 64;
  for (int64_t c = col0; c < col1; c += kBlock) {
    const int64_t w = std::min(kBlock, col1 - c);
    for (int64_t m = 0; m < m_count; ++m) {
      const float* src = g + m * width + c;
      const int64_t* r = rows + m * s_count;
      for (int64_t s = 0; s < s_count; ++s) {
        float* dst = out + r[s] * width + c;
        if (w == kBlock) {
          for (int64_t k = 0; k < kBlock; ++k) dst[k] += src[k];
        } else {
          for (int64_t k = 0; k < w; ++k) dst[k] += src[k];
        }
      }
    }
  }
}

}  // namespace

py::array_t<float> gather_rows_backward(const py::array& g, const py::array& rows, int64_t num_rows,
                                        int threads) {
  if (!g.dtype().is(py::dtype::of<float>()))
    throw py::type_error("gather_rows_backward: g dtype " + std::string(py::str(g.dtype())) + ", expected float32");
  if (!rows.dtype().is(py::dtype::of<int64_t>()))
    throw py::type_error("gather_rows_backward: rows dtype " + std::string(py::str(rows.dtype())) +
                         ", expected int64");
  if (g.ndim() != 2 || rows.ndim() != 2 || g.shape(0) != rows.shape(0))
    throw py::value_error("gather_rows_backward: g " + shape_of(g) + " and rows " + shape_of(rows) +
                          " must be [M, O] and [M, S]");
  if (!(g.flags() & py::array::c_style) || !(rows.flags() & py::array::c_style))
    throw py::value_error("gather_rows_backward: g and rows must be C-contiguous");
  if (num_rows < 1) throw py::value_error("gather_rows_backward: num_rows must be >= 1, got " + std::to_string(num_rows));
  const int64_t m_count = g.shape(0), width = g.shape(1), s_count = rows.shape(1);
  const auto* r = static_cast<const int64_t*>(rows.data());
  for (int64_t i = 0; i < m_count * s_count; ++i) {
    if (r[i] < 0 || r[i] >= num_rows)
      throw py::index_error("gather_rows_backward: row index " + std::to_string(r[i]) + " outside [0, " +
                            std::to_string(num_rows) + ")");
  }
  py::array_t<float> out({num_rows, width});
  auto* o = static_cast<float*>(out.mutable_data());
  std::fill(o, o + num_rows * width, 0.0f);
  const auto* src = static_cast<const float*>(g.data());
  // Threads split the columns (16-float blocks), so no two write the same float.
  const int64_t blocks = (width + 15) / 16;
  const int n = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>({threads, blocks, 64})));
  auto col = [&](int t) { return std::min(width, blocks * t / n * 16); };  // first column of thread t
  {
    py::gil_scoped_release release;
#pragma omp parallel for num_threads(n) schedule(static)
    for (int t = 0; t < n; ++t) accumulate(src, r, o, m_count, s_count, width, col(t), col(t + 1));
  }
  return out;
}

}  // namespace fastdream::ops
