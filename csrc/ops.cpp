// fastdream._ops: small CPU kernels for the training maths (numpy in, numpy out, no torch).
//
// unimix_index: the class index of every row of logits [M, K] drawn by inverse CDF with one uniform
//   per row from p = (1 - unimix) softmax(logits) + unimix / K. Sixteen rows at a time, one per SIMD
//   lane, so the max, the sum and the running CDF are plain vector adds instead of reductions across
//   a short row; torch's softmax + cumsum + compare-and-count took ~8.5 ms for M = 131072, K = 32.
//
// gather_rows_backward: the weight gradient of a gather-sum of rows (nets.onehot_linear):
//   out[r, :] = sum over (m, s) with rows[m, s] == r of g[m, :]
// Column block by column block, the output slice stays in cache and g is read once; torch's S
// index_adds re-read all of g once per latent. Every check happens before any memory is touched.
//
// norm_silu, gru_gate, twohot_decode: the no-grad elementwise maths of a dream step (LayerNorm then SiLU,
//   the block-GRU update, the two-hot expectation), each one pass over its rows with a cheaper exp than
//   inductor's; the vector helpers they share are in simd.hpp.
//
// gather_norm_silu: norm_silu fused behind a one-hot layer's gather-sum of weight rows (and its dense
//   part's matmul output), one pass per row with the sum in registers.
//
// Every kernel splits its work over OpenMP threads. Loaded after torch (fastdream imports torch first),
// this library binds to the libgomp torch loaded (same soname), so they run on torch's own worker
// threads. std::threads of our own had to share a core with those workers, which spin for a while
// after each of torch's parallel regions: 2 of them were no faster than 1 inside a compiled rollout.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <numeric>
#include <optional>
#include <string>
#include <vector>

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#include <immintrin.h>
#endif

#include "shape_str.hpp"
#include "simd.hpp"

namespace py = pybind11;
using namespace fastdream::simd;  // the kernels below are written in its vector vocabulary

namespace {

// Built for x86-64-v4 (AVX-512 F/BW/DQ/VL), v3 (AVX2, FMA) and baseline x86-64; the loader picks the widest
// this CPU runs (GCC function multiversioning), so the wheel stays portable. Elsewhere: the plain build.
// A bare "avx512f" clone (no FMA, no BW) ran norm_silu 15 % slower.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define FASTDREAM_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
// AVX-512 with its bfloat16 dot product (Zen 4 and later, Cooper Lake, Sapphire Rapids): chosen at run time.
#define FASTDREAM_BF16_DOT __attribute__((target("arch=x86-64-v4,avx512bf16")))
#else
#define FASTDREAM_CLONES
#endif

// Whether the AVX512_BF16 paths (FASTDREAM_BF16_DOT functions) run: the CPU has the instructions and
// FASTDREAM_PORTABLE_OPS is unset (tests compare both paths on one machine).
#ifdef FASTDREAM_BF16_DOT
const bool kAvx512Bf16 = __builtin_cpu_supports("avx512bf16") && !std::getenv("FASTDREAM_PORTABLE_OPS");
#else
constexpr bool kAvx512Bf16 = false;
#endif

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

std::string shape_of(const py::array& a) {
  return fastdream::shape_str(std::vector<int64_t>(a.shape(), a.shape() + a.ndim()));
}

// Checks a float32 array, or with bfloat16 one of 16-bit words holding bfloat16 (numpy has no bfloat16).
void check_floats(const py::array& a, bool bfloat16, const char* op, const char* name) {
  const bool ok = bfloat16 ? a.dtype().is(py::dtype::of<uint16_t>()) || a.dtype().is(py::dtype::of<int16_t>())
                           : a.dtype().is(py::dtype::of<float>());
  if (!ok)
    throw py::type_error(std::string(op) + ": " + name + " dtype " + std::string(py::str(a.dtype())) +
                         (bfloat16 ? ", expected 16-bit words holding bfloat16" : ", expected float32"));
}

// The output array given as `out` (or a new [M, C] one): [M, C] of the op's dtype, writable, its columns
// contiguous and its rows ld >= C elements apart (a column slice of a wider array: several ops write the parts
// of one concatenation in place). Returns ld.
int64_t checked_out(const py::array& out, bool bfloat16, int64_t m_count, int64_t c_count, const char* op) {
  check_floats(out, bfloat16, op, "out");
  const int64_t item = static_cast<int64_t>(out.itemsize());
  if (out.ndim() != 2 || out.shape(0) != m_count || out.shape(1) != c_count)
    throw py::value_error(std::string(op) + ": out " + shape_of(out) + " must be [" + std::to_string(m_count) + ", " +
                          std::to_string(c_count) + "]");
  if (!out.writeable()) throw py::value_error(std::string(op) + ": out is read-only");
  if ((c_count > 1 && out.strides(1) != item) || out.strides(0) % item != 0 ||
      (m_count > 1 && out.strides(0) / item < c_count))
    throw py::value_error(std::string(op) + ": out's columns must be contiguous and its rows at least C = " +
                          std::to_string(c_count) + " elements apart, got strides (" + std::to_string(out.strides(0)) +
                          ", " + std::to_string(out.strides(1)) + ") bytes");
  return m_count > 1 ? out.strides(0) / item : c_count;
}

// A caller's array to write into as it is: `dtype` exactly (a converting cast would write a copy, not the
// caller's memory), C-contiguous, writable and of shape `shape`.
void check_written_in_place(const py::array& a, const py::dtype& dtype, const std::vector<int64_t>& shape,
                            const char* op, const char* name) {
  if (!a.dtype().is(dtype))
    throw py::type_error(std::string(op) + ": " + name + " dtype " + std::string(py::str(a.dtype())) + ", expected " +
                         std::string(py::str(dtype)));
  if (std::vector<int64_t>(a.shape(), a.shape() + a.ndim()) != shape || !(a.flags() & py::array::c_style) ||
      !a.writeable())
    throw py::value_error(std::string(op) + ": " + name + " " + shape_of(a) + " must be a writable C-contiguous " +
                          fastdream::shape_str(shape));
}

// Checks a float32 vector of n elements.
void check_vector(const py::array& a, int64_t n, const char* op, const char* name) {
  if (!a.dtype().is(py::dtype::of<float>()))
    throw py::type_error(std::string(op) + ": " + name + " dtype " + std::string(py::str(a.dtype())) +
                         ", expected float32");
  if (a.ndim() != 1 || a.shape(0) != n || !(a.flags() & py::array::c_style))
    throw py::value_error(std::string(op) + ": " + name + " " + shape_of(a) + " must be a contiguous [" +
                          std::to_string(n) + "]");
}

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

// ---------------------------------------------------------------- unimix_index

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

void unimix_index_tiles_bf16_avx512(const uint16_t* logits, const float* noise, int64_t* out, int64_t tile0,
                                    int64_t tile1, int64_t k_count, float unimix, const float* bias_t, int64_t period);

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
  const bool fast = bfloat16 && kAvx512Bf16 && k_count % 2 == 0;
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


// ---------------------------------------------------------------- norm_silu, gather_norm_silu, gru_gate

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
// gru_gate's optional bfloat16 copies of the new deter (either may be null): rows [N, D], as the next step's
// matmuls read it, and grouped [G, N, D/G], as its block matmul reads it.
struct GateCopies {
  uint16_t* rows = nullptr;
  uint16_t* grouped = nullptr;
};

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

// gru_gate's inputs of row n (prefetch): its G slices of y [G, N, 3 D/G] and its deter row.
template <typename T>
__attribute__((always_inline)) inline void prefetch_gate_row(const T* y, const float* deter, int64_t n, int64_t n_count,
                                                             int64_t groups, int64_t dg) {
  for (int64_t g = 0; g < groups; ++g) prefetch(y + (g * n_count + n) * 3 * dg, 3 * dg);
  prefetch(deter + n * groups * dg, groups * dg);
}

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
// ---------------------------------------------------------------- AVX512_BF16 paths
// For bfloat16 rows with C a multiple of 32 where the CPU has AVX512_BF16 (checked at run time; elsewhere
// the clones above): the instructions GCC's vector types cannot name. vcvtne2ps2bf16 rounds two vectors to
// nearest-even bfloat16 in one instruction (five integer ops and a word shuffle per vector otherwise),
// vscalefps applies exp's 2^n and vrcp14ps the SiLU's reciprocal (14 bits, beyond bfloat16's 8).
// FASTDREAM_PORTABLE_OPS=1 keeps the portable clones (tests compare the two paths on one machine): see
// kAvx512Bf16 at the top.

// exp(-y) as 2^t, t = -y·log2(e): vreduceps splits off f = t - floor(t) in [0, 1), a minimax polynomial
// gives 2^f, vscalefps multiplies by 2^floor(t) (overflowing to inf, underflowing to 0: no clamp needed).
// Degree 3: 7.5e-5 relative (under bfloat16's 2^-9 spacing), degree 4: 2.7e-6. 6-7 instructions against the
// 11 of a rounded n and a Taylor polynomial in r = y - n·ln2 (this CPU runs ~one 512-bit op per cycle).
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

// gru_gate_rows (below) for bfloat16 y with D/G a multiple of 16.
FASTDREAM_BF16_DOT
void gru_gate_rows_bf16_avx512(const uint16_t* y, const float* bias, const float* deter, float* out, int64_t row0,
                               int64_t row1, int64_t n_count, int64_t groups, int64_t dg, const GateCopies& copies) {
  const __m512 one = _mm512_set1_ps(1.0f), two = _mm512_set1_ps(2.0f);
  for (int64_t n = row0; n < row1; ++n) {
    if (n + kPrefetchRows < row1) prefetch_gate_row(y, deter, n + kPrefetchRows, n_count, groups, dg);
    for (int64_t g = 0; g < groups; ++g) {
      const uint16_t* src = y + (g * n_count + n) * 3 * dg;
      const float* b = bias + g * 3 * dg;
      const float* h = deter + n * groups * dg + g * dg;
      float* dst = out + n * groups * dg + g * dg;
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
void unimix_index_tiles_bf16_avx512(const uint16_t*, const float*, int64_t*, int64_t, int64_t, int64_t, float,
                                    const float*, int64_t) {}
void gru_gate_rows_bf16_avx512(const uint16_t*, const float*, const float*, float*, int64_t, int64_t, int64_t, int64_t,
                               int64_t, const GateCopies&) {}
void norm_silu_rows_bf16_avx512(const uint16_t*, const float*, const float*, uint16_t*, int64_t, int64_t, int64_t,
                                int64_t, int64_t, float, const Addend<uint16_t>&, int64_t) {}
bool gather_norm_silu_rows_bf16_dot(const uint16_t*, const uint16_t*, const int64_t*, const float*, const float*,
                                    uint16_t*, int64_t, int64_t, int64_t, int64_t, int64_t, float, int64_t, int64_t) {
  return false;
}
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

// Rows of work per thread: all rows to one thread below ~64k elements.
int threads_for(int threads, int64_t rows, int64_t elements) {
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>({threads, rows, elements / 65536 + 1})));
}

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
  const bool fast = kAvx512Bf16 && c_count % (2 * kLanes) == 0;
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
  const bool dot = kAvx512Bf16 && c_count % (2 * kLanes) == 0;
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

// take_rows: out[n] = table[index[n]] for table [A, C] and index [N] int64 (all checked to lie in [0, A) before any
// row is copied) into out [N, C] (checked_out: e.g. a column slice of the array several ops fill in place).
py::array take_rows(const py::array& table, const py::array& index, const py::array& out, bool bfloat16, int threads) {
  check_floats(table, bfloat16, "take_rows", "table");
  if (table.ndim() != 2 || table.shape(0) < 1 || !(table.flags() & py::array::c_style))
    throw py::value_error("take_rows: table " + shape_of(table) + " must be a C-contiguous [A, C] with A >= 1");
  if (!index.dtype().is(py::dtype::of<int64_t>()))
    throw py::type_error("take_rows: index dtype " + std::string(py::str(index.dtype())) + ", expected int64");
  if (index.ndim() != 1 || !(index.flags() & py::array::c_style))
    throw py::value_error("take_rows: index " + shape_of(index) + " must be a contiguous [N]");
  const int64_t n_count = index.shape(0), a_count = table.shape(0), c_count = table.shape(1);
  const int64_t ld = checked_out(out, bfloat16, n_count, c_count, "take_rows");
  const auto* idx = static_cast<const int64_t*>(index.data());
  const int64_t* bad = std::find_if(idx, idx + n_count, [&](int64_t i) { return i < 0 || i >= a_count; });
  if (bad != idx + n_count)
    throw py::index_error("take_rows: index " + std::to_string(*bad) + " outside [0, " + std::to_string(a_count) +
                          ") of table " + shape_of(table));
  const auto* src = static_cast<const char*>(table.data());
  auto* dst = static_cast<char*>(py::array(out).mutable_data());
  const int64_t row_bytes = c_count * table.itemsize(), ld_bytes = ld * table.itemsize();
  const int n = threads_for(threads, n_count, n_count * c_count);
  {
    py::gil_scoped_release release;
#pragma omp parallel for num_threads(n) schedule(static)
    for (int64_t i = 0; i < n_count; ++i) std::memcpy(dst + i * ld_bytes, src + idx[i] * row_bytes, row_bytes);
  }
  return out;
}

// gru_gate: the block-GRU update (kernels/reference.py: gru_gate_reference) on the block matmul's own
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
      const T* src = y + (g * n_count + n) * 3 * dg;
      const float* b = bias + g * 3 * dg;
      const float* h = deter + n * groups * dg + g * dg;
      float* dst = out + n * groups * dg + g * dg;
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
  const bool fast = kAvx512Bf16 && dg % kLanes == 0;
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

}  // namespace

PYBIND11_MODULE(_ops, m) {
  m.doc() = "Small CPU kernels for fastdream's training maths.";
  m.attr("avx512_bf16") = kAvx512Bf16;
  m.def("gather_rows_backward", &gather_rows_backward, py::arg("g"), py::arg("rows"), py::arg("num_rows"),
        py::arg("threads") = 1,
        "out [num_rows, O] float32: out[rows[m, s]] += g[m] for g [M, O] float32 and rows [M, S] int64.");
  m.def("unimix_index", &unimix_index, py::arg("logits"), py::arg("noise"), py::arg("unimix"),
        py::arg("bfloat16") = false, py::arg("threads") = 1, py::arg("bias") = py::none(), py::arg("out") = py::none(),
        "index [M] int64: inverse-CDF draw from (1 - unimix) softmax(logits) + unimix / K for logits [M, K]\n"
        "(float32, or bfloat16 passed as 16-bit words with bfloat16=True) and one uniform noise [M] float32 per row;\n"
        "bias [P * K] float32 or None: row m's logits plus bias row m % P (a head's bias, one row per latent).\n"
        "out: None, or the contiguous int64 [M] to write (e.g. one step of a stacked sequence).");
  m.def("norm_silu", &norm_silu, py::arg("x"), py::arg("weight"), py::arg("bias"), py::arg("eps"),
        py::arg("bfloat16") = false, py::arg("threads") = 1, py::arg("groups") = 1, py::arg("add") = py::none(),
        py::arg("add_bias") = py::none(), py::arg("out") = py::none(),
        "[M, C] of x's dtype: silu(layer_norm(x) * weight + bias) per row of x [M, C] (float32, or bfloat16 as\n"
        "16-bit words with bfloat16=True), weight and bias [C] float32; the maths in float32. groups > 1: the\n"
        "result laid out [G, M, C/G] (column block g of every row together), as a block matmul reads it.\n"
        "add [Ga, M, C/Ga] (x's dtype) and add_bias [C] float32, or None: added to x's rows before the norm.\n"
        "out: None, or the [M, C] array to write (groups = 1; its rows any stride apart: e.g. a column slice).");
  m.def("gather_norm_silu", &gather_norm_silu, py::arg("dense"), py::arg("table"), py::arg("rows"), py::arg("weight"),
        py::arg("bias"), py::arg("eps"), py::arg("bfloat16") = false, py::arg("threads") = 1, py::arg("classes") = 0,
        py::arg("out") = py::none(),
        "[M, C] of table's dtype: silu(layer_norm(dense[m] + sum_s table[rows[m, s]]) * weight + bias) per row m, for\n"
        "table [R, C] and dense [M, C] or None (float32, or bfloat16 as 16-bit words with bfloat16=True), rows [M, S]\n"
        "int64 in [0, R), weight and bias [C] float32; the maths in float32. classes = K > 0: rows hold each latent's\n"
        "class in [0, K) and the table row is s * K + rows[m, s] (R = S * K). out: as norm_silu's.");
  m.def("take_rows", &take_rows, py::arg("table"), py::arg("index"), py::arg("out"), py::arg("bfloat16") = false,
        py::arg("threads") = 1,
        "out: out[n] = table[index[n]] for table [A, C] (float32, or bfloat16 as 16-bit words with bfloat16=True),\n"
        "index [N] int64 in [0, A) and out [N, C] of table's dtype, its rows any stride apart (e.g. a column slice).");
  m.def("twohot_decode", &twohot_decode, py::arg("logits"), py::arg("bins"), py::arg("bfloat16") = false,
        py::arg("threads") = 1, py::arg("bias") = py::none(),
        "[M] float32: symexp(sum_k softmax(logits + bias)_k bins_k) per row of logits [M, K] (float32, or bfloat16\n"
        "as 16-bit words with bfloat16=True) over bins [K] float32; bias [K] float32 or None (the head's bias,\n"
        "added here instead of by an addmm that copied it into every output row on one thread).");
  m.def("gru_gate", &gru_gate, py::arg("y"), py::arg("bias"), py::arg("deter"), py::arg("bfloat16") = false,
        py::arg("threads") = 1, py::arg("copies") = false, py::arg("rows_out") = py::none(),
        "next deter [N, D] float32: the block-GRU update from the block matmul's output y [G, N, 3 D/G] (float32,\n"
        "or bfloat16 as 16-bit words with bfloat16=True) before its bias [3 D] float32, and deter [N, D] float32.\n"
        "copies=True: (deter, its bfloat16 words [N, D], the same [G, N, D/G]) for the next step's matmuls;\n"
        "rows_out: None, or the C-contiguous [N, D] words array to write the first copy into (returned as it).");
}
