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

// kLanes elements of p, widened to float.
template <typename T>
inline vec8 load(const T* p) {
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

// Elements [0, n) of p (n <= kLanes; the rest read as 0).
template <typename T>
inline vec8 load(const T* p, int64_t n) {
  if (n == kLanes) return load(p);
  T buf[kLanes] = {};
  std::memcpy(buf, p, n * sizeof(T));
  return load(static_cast<const T*>(buf));
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

// Lane sum by halves (3 dependent adds, not 7), the order the kernels' tests allow for.
inline float sum(vec8 v) {
  using vec4 = float __attribute__((vector_size(16)));
  const vec4 a = __builtin_shufflevector(v, v, 0, 1, 2, 3) + __builtin_shufflevector(v, v, 4, 5, 6, 7);
  return (a[0] + a[2]) + (a[1] + a[3]);
}

inline float max(vec8 v) {
  float m = v[0];
  for (int64_t i = 1; i < kLanes; ++i) m = v[i] > m ? v[i] : m;
  return m;
}

inline vec8 select(ivec8 mask, vec8 a, vec8 b) { return mask ? a : b; }

// e^x within ~2 ulp (Cephes' expf): x = n ln2 + r with |r| <= ln2 / 2, e^r by a polynomial,
// 2^n written straight into the exponent bits.
inline vec8 exp8(vec8 x) {
  x = select(x < -87.f, vec8{} - 87.f, select(x > 88.f, vec8{} + 88.f, x));
  const vec8 shift = vec8{} + 12582912.f;  // 1.5 * 2^23: adding it rounds to an integer
  const vec8 t = x * 1.44269504f + shift;  // its low mantissa bits now hold n
  const vec8 n = t - shift;
  const vec8 r = x - n * 0.693359375f + n * 2.12194440e-4f;  // ln2 in two parts
  vec8 p = vec8{} + 1.9875691500e-4f;
  for (float c : {1.3981999507e-3f, 8.3334519073e-3f, 4.1665795894e-2f, 1.6666665459e-1f, 5.0000001201e-1f})
    p = p * r + c;
  p = p * r * r + r + 1.f;
  return p * (vec8)(((ivec8)t - (ivec8)shift + 127) << 23);
}

