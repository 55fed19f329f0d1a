// out = x @ w.T + bias for a few rows of float32 activations and a bf16 weight, in float32:
//
//   x [M, K] float32, w [N, K] bf16, bias [N] float32 or none  ->  out [M, N] float32
//
// Decode on a CPU without bf16 instructions is memory-bound: this reads the weight at two
// bytes an element, where a float32 copy costs four. Each bf16 is widened in registers
// (exactly: a bf16 is a float's top half) and multiplied into every row's accumulator, so
// the weight streams through once per group of kMaxRows rows. The result is float32 math
// on the bf16 values, equal to F.linear on the widened weight up to summation order.
// Output features are split across torch's threads.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <algorithm>
#include <optional>

#if defined(__FMA__)
#include <immintrin.h>
#endif

#include "vec8.h"

namespace {

constexpr int64_t kMaxRows = 8;   // rows per pass over the weight: M accumulators per output
constexpr int64_t kGrain = 64;    // output features per task, at least

inline vec8 fma(vec8 a, vec8 b, vec8 c) {
#if defined(__FMA__)
  return (vec8)_mm256_fmadd_ps((__m256)a, (__m256)b, (__m256)c);
#else
  return a * b + c;
#endif
}

// Outputs [n, n + NB) of rows [0, M): NB weight rows at once, so that each x load feeds NB
// FMAs and M * NB independent accumulators hide the FMA latency.
template <int M, int NB>
void dot_block(const float* x, int64_t sx, const c10::BFloat16* w, int64_t K, int64_t n,
               const float* bias, float* out, int64_t so) {
  vec8 acc[M][NB] = {};
  const c10::BFloat16* wn = w + n * K;
  int64_t k = 0;
  for (; k + kLanes <= K; k += kLanes) {
    vec8 wv[NB];
    for (int j = 0; j < NB; ++j) wv[j] = load(wn + j * K + k);
    for (int m = 0; m < M; ++m) {
      const vec8 xv = load(x + m * sx + k);
      for (int j = 0; j < NB; ++j) acc[m][j] = fma(xv, wv[j], acc[m][j]);
    }
  }
  if (k < K) {  // the partial last vector reads zeros past K
    vec8 wv[NB];
    for (int j = 0; j < NB; ++j) wv[j] = load(wn + j * K + k, K - k);
    for (int m = 0; m < M; ++m) {
      const vec8 xv = load(x + m * sx + k, K - k);
      for (int j = 0; j < NB; ++j) acc[m][j] = fma(xv, wv[j], acc[m][j]);
    }
  }
  for (int m = 0; m < M; ++m)
    for (int j = 0; j < NB; ++j) out[m * so + n + j] = sum(acc[m][j]) + (bias ? bias[n + j] : 0.f);
}

// Outputs [begin, end) of M rows.
template <int M>
void dot_range(const float* x, int64_t sx, const c10::BFloat16* w, int64_t K, int64_t begin,
               int64_t end, const float* bias, float* out, int64_t so) {
  constexpr int NB = M <= 2 ? 4 : M <= 4 ? 2 : 1;  // M * NB + NB of 16 AVX2 registers
  int64_t n = begin;
  for (; n + NB <= end; n += NB) dot_block<M, NB>(x, sx, w, K, n, bias, out, so);
  for (; n < end; ++n) dot_block<M, 1>(x, sx, w, K, n, bias, out, so);
}

using RangeFn = void (*)(const float*, int64_t, const c10::BFloat16*, int64_t, int64_t, int64_t,
                         const float*, float*, int64_t);
constexpr RangeFn kRangeFns[kMaxRows] = {dot_range<1>, dot_range<2>, dot_range<3>, dot_range<4>,
                                         dot_range<5>, dot_range<6>, dot_range<7>, dot_range<8>};

}  // namespace

// x [M, K] float32 (rows may be strided), weight [N, K] bf16 contiguous, bias [N] float32.
// -> [M, N] float32. Any M; one pass over the weight per kMaxRows rows.
at::Tensor bf16_linear(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.is_cpu() && x.dim() == 2 && x.scalar_type() == at::kFloat && x.stride(1) == 1,
              "x must be [M, K] float32 on the CPU with contiguous rows; got ", x.sizes(), " ",
              x.scalar_type());
  TORCH_CHECK(weight.is_cpu() && weight.dim() == 2 && weight.scalar_type() == at::kBFloat16
              && weight.is_contiguous() && weight.size(1) == x.size(1),
              "weight must be contiguous [N, ", x.size(1), "] bfloat16 on the CPU; got ", weight.sizes(),
              " ", weight.scalar_type());
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0);
  const float* bp = nullptr;
  if (bias.has_value()) {
    TORCH_CHECK(bias->is_cpu() && bias->dim() == 1 && bias->size(0) == N && bias->is_contiguous()
                && bias->scalar_type() == at::kFloat, "bias must be contiguous [", N,
                "] float32; got ", bias->sizes(), " ", bias->scalar_type());
    bp = bias->data_ptr<float>();
  }
  at::Tensor out = at::empty({M, N}, x.options());
  const float* xp = x.data_ptr<float>();
  const c10::BFloat16* wp = weight.data_ptr<c10::BFloat16>();
  float* op = out.data_ptr<float>();
  const int64_t sx = x.stride(0);
  at::parallel_for(0, N, kGrain, [&](int64_t begin, int64_t end) {
    for (int64_t m = 0; m < M; m += kMaxRows) {
      const int64_t rows = std::min(kMaxRows, M - m);
      kRangeFns[rows - 1](xp + m * sx, sx, wp, K, begin, end, bp, op + m * N, N);
    }
  });
  return out;
}
