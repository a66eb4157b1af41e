// What every C++ op of fastdream.fast._ops shares: the code-path macros, the switch that picks the AVX512_BF16
// paths, the argument checks (run before any memory is touched) and the thread split. Each op lives in its own
// file beside this one (norm_silu.cpp, gather_norm_silu.cpp, ...), its portable and AVX512_BF16 paths side by side.
//
// Every kernel splits its work over OpenMP threads. Loaded after torch (fastdream imports torch first), the
// library binds to the libgomp torch loaded (same soname), so the ops run on torch's own worker threads: threads
// of our own had to share a core with those workers, which spin for a while after each of torch's parallel
// regions (2 of them were no faster than 1 inside a compiled rollout).
#pragma once

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <numeric>
#include <optional>
#include <string>
#include <vector>

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#include <immintrin.h>
#endif

#include "shape_str.hpp"
#include "simd.hpp"

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

namespace fastdream::ops {

namespace py = pybind11;
using namespace fastdream::simd;  // the kernels are written in its vector vocabulary

// Whether this CPU (and this build) has the AVX512_BF16 instructions of the FASTDREAM_BF16_DOT functions.
inline bool avx512_bf16_supported() {
#ifdef FASTDREAM_BF16_DOT
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512bf16");
#else
  return false;
#endif
}

// Whether the AVX512_BF16 paths run: supported, FASTDREAM_PORTABLE_OPS unset at import, and not switched off by
// set_avx512_bf16 (tests run every op on both paths in one process). Read once per call, before the GIL is let go.
inline bool avx512_bf16_enabled = avx512_bf16_supported() && !std::getenv("FASTDREAM_PORTABLE_OPS");

inline std::string shape_of(const py::array& a) {
  return fastdream::shape_str(std::vector<int64_t>(a.shape(), a.shape() + a.ndim()));
}

// Checks a float32 array, or with bfloat16 one of 16-bit words holding bfloat16 (numpy has no bfloat16).
inline void check_floats(const py::array& a, bool bfloat16, const char* op, const char* name) {
  const bool ok = bfloat16 ? a.dtype().is(py::dtype::of<uint16_t>()) || a.dtype().is(py::dtype::of<int16_t>())
                           : a.dtype().is(py::dtype::of<float>());
  if (!ok)
    throw py::type_error(std::string(op) + ": " + name + " dtype " + std::string(py::str(a.dtype())) +
                         (bfloat16 ? ", expected 16-bit words holding bfloat16" : ", expected float32"));
}

// The output array given as `out` (or a new [M, C] one): [M, C] of the op's dtype, writable, its columns
// contiguous and its rows ld >= C elements apart (a column slice of a wider array: several ops write the parts
// of one concatenation in place). Returns ld.
inline int64_t checked_out(const py::array& out, bool bfloat16, int64_t m_count, int64_t c_count, const char* op) {
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
inline void check_written_in_place(const py::array& a, const py::dtype& dtype, const std::vector<int64_t>& shape,
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
inline void check_vector(const py::array& a, int64_t n, const char* op, const char* name) {
  if (!a.dtype().is(py::dtype::of<float>()))
    throw py::type_error(std::string(op) + ": " + name + " dtype " + std::string(py::str(a.dtype())) +
                         ", expected float32");
  if (a.ndim() != 1 || a.shape(0) != n || !(a.flags() & py::array::c_style))
    throw py::value_error(std::string(op) + ": " + name + " " + shape_of(a) + " must be a contiguous [" +
                          std::to_string(n) + "]");
}

// Rows of work per thread: all rows to one thread below ~64k elements.
inline int threads_for(int threads, int64_t rows, int64_t elements) {
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>({threads, rows, elements / 65536 + 1})));
}

}  // namespace fastdream::ops
