// Sixteen-lane float vectors (GCC vector types) and the maths the kernels in ops.cpp share: bfloat16
// loads and round-to-nearest-even stores, a clamped exp, sigmoid/SiLU, lane reductions, a 16 x 16
// in-register transpose. Header-only and always inlined, so every target clone of a kernel gets them
// compiled for its own instruction set.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

namespace fastdream::simd {

constexpr int64_t kLanes = 16;
// Sixteen lanes as GCC vector types: AVX-512 registers in the x86-64-v4 clone, pairs or quads of
// narrower ones in the others.
typedef float Floats __attribute__((vector_size(4 * kLanes)));
typedef int32_t Ints __attribute__((vector_size(4 * kLanes)));

inline float load_float(const float* p, int64_t i) { return p[i]; }
inline float load_float(const uint16_t* p, int64_t i) {  // bfloat16: the high half of a float32
  const uint32_t bits = static_cast<uint32_t>(p[i]) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

// exp(x) for x clamped to [-87, 88]: 2^n · e^r with |r| <= ln2 / 2 and a Taylor polynomial of degree
// Degree: 6 gives a relative error of ~2e-7 (float32 results), 4 ~4e-5 (enough under bfloat16's 2^-9
// spacing, two fewer multiply-adds). n is rounded by adding 1.5 · 2^23, whose low mantissa bits are n.
template <int Degree = 6>
__attribute__((always_inline)) inline Floats exp_clamped(Floats x) {
  static_assert(Degree == 4 || Degree == 6, "exp_clamped: degree 4 or 6");
  const Floats lo = Floats{} - 87.0f, hi = Floats{} + 88.0f, shift = Floats{} + 12582912.0f;
  x = x < lo ? lo : x;
  x = x > hi ? hi : x;
  const Floats t = x * 1.44269504088896341f + shift;
  const Floats n = t - shift;
  const Floats r = (x - n * 0.693145751953125f) - n * 1.42860682030941723e-6f;
  Floats p;
  if constexpr (Degree == 6)
    p = 1.0f + r * (1.0f + r * (0.5f + r * (1.0f / 6 + r * (1.0f / 24 + r * (1.0f / 120 + r * (1.0f / 720))))));
  else
    p = 1.0f + r * (1.0f + r * (0.5f + r * (1.0f / 6 + r * (1.0f / 24))));
  const Ints bits = (reinterpret_cast<const Ints&>(t) + (127 - 0x4B400000)) << 23;
  return p * reinterpret_cast<const Floats&>(bits);
}

// Rows a kernel will read a few iterations ahead, asked for now: inside a dream its inputs come from DRAM (the
// matmuls' outputs are not left in cache) and this CPU's hardware prefetchers did not run ahead of a row loop:
// unimix_index took 1.24 ms on [131072, 32] inside a dream against 0.43 ms with these (0.42 ms in cache).
constexpr int64_t kPrefetchRows = 4;
// Gathers ask for the table row kGatherAhead latents on while one adds up: the rows are random, so the hardware
// prefetchers cannot guess them (an N=4096 xs gather_norm_silu, alternated in one process: 0.44-0.45 ms without,
// 0.40-0.41 ms with; 2 or 6 latents ahead the same).
constexpr int64_t kGatherAhead = 4;
template <typename T>
__attribute__((always_inline)) inline void prefetch(const T* p, int64_t count) {
  const char* bytes = reinterpret_cast<const char*>(p);
  for (int64_t b = 0; b < count * static_cast<int64_t>(sizeof(T)); b += 64) __builtin_prefetch(bytes + b, 0, 3);
}

inline Floats load_lanes(const float* p) {
  Floats v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
inline void store_lanes(float* p, Floats v) { std::memcpy(p, &v, sizeof v); }

typedef uint16_t Words __attribute__((vector_size(2 * kLanes)));

inline Floats load_row(const float* p) { return load_lanes(p); }
inline Floats load_row(const uint16_t* p) {
  Words w;
  std::memcpy(&w, p, sizeof w);
  const Ints bits = __builtin_convertvector(w, Ints) << 16;
  return reinterpret_cast<const Floats&>(bits);
}

// 32 bfloat16 words at p added, as float32, into even (columns 0, 2, ..., 30) and odd (1, 3, ..., 31): one
// 64-byte load, a shift and a mask.
__attribute__((always_inline)) inline void split_words(const uint16_t* p, Floats& even, Floats& odd) {
  Ints w;
  std::memcpy(&w, p, sizeof w);
  const Ints lo = w << 16, hi = w & static_cast<int32_t>(0xFFFF0000u);
  even += reinterpret_cast<const Floats&>(lo);
  odd += reinterpret_cast<const Floats&>(hi);
}

// The inverse of split_words' column order: lo = columns 0..15, hi = 16..31.
__attribute__((always_inline)) inline void interleave(Floats even, Floats odd, Floats& lo, Floats& hi) {
  lo = __builtin_shuffle(even, odd, Ints{0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23});
  hi = __builtin_shuffle(even, odd, Ints{8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31});
}

// One round of the in-register transpose: rows i and i + B (i & B == 0) swap their off-diagonal
// B x B blocks. Lane masks index the pair (a, c) as 0..15 for a, 16..31 for c.
template <int B>
__attribute__((always_inline)) inline void transpose_round(Floats* v) {
  Ints lo, hi;
#pragma GCC unroll 16
  for (int l = 0; l < kLanes; ++l) {
    lo[l] = (l & B) ? kLanes + l - B : l;
    hi[l] = (l & B) ? kLanes + l : l + B;
  }
#pragma GCC unroll 16
  for (int i = 0; i < kLanes; ++i) {
    if (i & B) continue;
    const Floats a = v[i], c = v[i + B];
    v[i] = __builtin_shuffle(a, c, lo);
    v[i + B] = __builtin_shuffle(a, c, hi);
  }
}

// 16 x 16 transpose in four rounds (B = 8, 4, 2, 1): 64 two-vector shuffles instead of 256 scalar
// loads and stores.
__attribute__((always_inline)) inline void transpose16(Floats* v) {
  transpose_round<8>(v);
  transpose_round<4>(v);
  transpose_round<2>(v);
  transpose_round<1>(v);
}

typedef uint32_t Words32 __attribute__((vector_size(4 * kLanes)));

inline void store_row(float* p, Floats v) { store_lanes(p, v); }
inline void store_row(uint16_t* p, Floats v) {  // round to nearest even bfloat16
  const Words32 bits = reinterpret_cast<const Words32&>(v);
  const Words w = __builtin_convertvector((bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16, Words);
  std::memcpy(p, &w, sizeof w);
}
inline void store_float(float* p, int64_t i, float v) { p[i] = v; }
inline void store_float(uint16_t* p, int64_t i, float v) {
  uint32_t bits;
  std::memcpy(&bits, &v, sizeof bits);
  p[i] = static_cast<uint16_t>((bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16);
}

// σ(v) = 1 / (1 + exp(-v)) and silu(v) = v σ(v); exp_clamped keeps exp(-v) finite (σ(-88) is 0 to float32 anyway).
template <int Degree>
__attribute__((always_inline)) inline Floats sigmoid(Floats v) { return 1.0f / (1.0f + exp_clamped<Degree>(-v)); }
template <int Degree>
__attribute__((always_inline)) inline Floats silu(Floats v) { return v / (1.0f + exp_clamped<Degree>(-v)); }
inline float sigmoid(float v) { return 1.0f / (1.0f + std::exp(std::min(-v, 88.0f))); }

// Reduces the 16 lanes by halving (4 shuffle rounds) instead of 15 dependent scalar steps.
template <typename Op>
__attribute__((always_inline)) inline float lane_reduce(Floats v, Op op) {
  v = op(v, __builtin_shuffle(v, Ints{8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7}));
  v = op(v, __builtin_shuffle(v, Ints{4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11}));
  v = op(v, __builtin_shuffle(v, Ints{2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13}));
  v = op(v, __builtin_shuffle(v, Ints{1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14}));
  return v[0];
}
__attribute__((always_inline)) inline float lane_sum(Floats v) {
  return lane_reduce(v, [](Floats x, Floats y) { return x + y; });
}
__attribute__((always_inline)) inline float lane_max(Floats v) {
  return lane_reduce(v, [](Floats x, Floats y) { return x > y ? x : y; });
}

// The exp degree for results of type T: bfloat16 results round away what degree 6 adds.
template <typename T>
constexpr int kExpDegree = std::is_same_v<T, uint16_t> ? 4 : 6;

}  // namespace fastdream::simd
