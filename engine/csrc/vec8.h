// Eight floats in one AVX2 register (GCC/Clang vector extension): full-width loads, FMAs and
// compares without intrinsics or -ffast-math. Tensors of float, bf16 or fp16 are loaded
// widened to float and stored back narrowed with round-to-nearest-even, as torch does.
#pragma once

#include <c10/util/BFloat16.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>

using vec8 = float __attribute__((vector_size(32)));
using ivec8 = int32_t __attribute__((vector_size(32)));
using u16x8 = uint16_t __attribute__((vector_size(16)));
constexpr int64_t kLanes = 8;

// bf16 is the top half of a float: widening is a shift, narrowing rounds the low half away.
inline vec8 bf16_to_float(u16x8 h) { return (vec8)(__builtin_convertvector(h, ivec8) << 16); }

// The float nearest v (ties to even) with a zero low half. A NaN whose payload sits only
// in the low half would come out as infinity: float_to_bf16 checks for NaN, round_to need
// not, as products and sums of bf16 values carry no such payload.
inline ivec8 round_bits(vec8 v) {
  const ivec8 bits = (ivec8)v;
  return (bits + 0x7FFF + ((bits >> 16) & 1)) & ~0xFFFF;
}

inline u16x8 float_to_bf16(vec8 v) {
  const ivec8 half = v != v ? ivec8{} + 0x7FC0 : round_bits(v) >> 16;  // NaN stays NaN
  return __builtin_convertvector(half & 0xFFFF, u16x8);
}

// Elements [0, n) of p (n <= kLanes; the rest read as 0).
template <typename T>
inline vec8 load(const T* p, int64_t n = kLanes) {
  T buf[kLanes] = {};
  if (n < kLanes) p = static_cast<const T*>(std::memcpy(buf, p, n * sizeof(T)));
  vec8 v;
  if constexpr (std::is_same_v<T, float>) {
    std::memcpy(&v, p, sizeof v);
  } else if constexpr (std::is_same_v<T, c10::BFloat16>) {
    u16x8 h;
    std::memcpy(&h, p, sizeof h);
    v = bf16_to_float(h);
  } else {
    for (int64_t i = 0; i < kLanes; ++i) v[i] = static_cast<float>(p[i]);  // fp16: widen
  }
  return v;
}

// Stores lanes [0, n) of v into p.
template <typename T>
inline void store(T* p, vec8 v, int64_t n = kLanes) {
  static_assert(std::is_same_v<T, float> || std::is_same_v<T, c10::BFloat16>, "float or bf16 only");
  if constexpr (std::is_same_v<T, float>) {
    std::memcpy(p, &v, n * sizeof(float));
  } else {
    const u16x8 h = float_to_bf16(v);
    std::memcpy(p, &h, n * sizeof(T));
  }
}

// v rounded to T's precision: torch stores every intermediate of an elementwise expression
// in the tensors' dtype, so bf16 parity needs the same roundings in between.
template <typename T>
inline vec8 round_to(vec8 v) {
  if constexpr (std::is_same_v<T, float>) return v;
  else return (vec8)round_bits(v);
}

inline float sum(vec8 v) {
  float s = 0.f;
  for (int64_t i = 0; i < kLanes; ++i) s += v[i];
  return s;
}
