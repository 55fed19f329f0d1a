// Exact leaders for logits a narrow-dtype matmul rounded (see engine/logits.py).
//
//   refine_logits  for each row t: m = max(logits[t]); every v with logits[t, v] >= m - margin(m)
//                  gets logits[t, v] = dot(hidden[t], weight[v]) in float32
//
// A bf16 matmul rounds each float32 sum to bf16: at most half a bf16 step off, a step being
// 2^(b - 7) for a value in the binade [2^b, 2^(b + 1)). A token whose exact logit beats the
// rounded leader's can be at most one step (of the leader's binade, or two of its own,
// one binade up) below the rounded maximum, so margin(m) = 2 steps of m's binade catches
// every token that could be the exact argmax. One vectorised pass finds the maximum, a
// second compares eight at a time and recomputes the few candidates in place.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>

#include <cmath>

#include "dispatch.h"
#include "vec8.h"

namespace {

float row_max(const float* x, int64_t n) {
  vec8 best = vec8{} - INFINITY;
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    const vec8 v = load(x + i);
    best = v > best ? v : best;
  }
  float m = max(best);
  for (; i < n; ++i) m = std::max(m, x[i]);
  return m;
}

// Two bf16 steps in m's binade: 2 * 2^(floor(log2 |m|) - 7).
float margin_of(float m) {
  int e = 0;
  std::frexp(std::max(std::fabs(m), 1e-30f), &e);  // |m| = f * 2^e, f in [0.5, 1)
  return std::ldexp(1.f, e - 7);
}

template <typename T>
float dot(const T* a, const T* b, int64_t n) {
  vec8 acc = {};
  for (int64_t i = 0; i < n; i += kLanes) {
    const int64_t k = std::min<int64_t>(kLanes, n - i);
    acc += load(a + i, k) * load(b + i, k);
  }
  return sum(acc);
}

template <typename T>
void refine_row(float* logits, int64_t V, const T* hidden, const T* weight, int64_t H, int64_t sw) {
  const float m = row_max(logits, V);
  if (!std::isfinite(m)) return;
  const float floor_ = m - margin_of(m);
  const vec8 limit = vec8{} + floor_;
  for (int64_t i = 0; i < V; i += kLanes) {
    const int64_t k = std::min<int64_t>(kLanes, V - i);
    if (k == kLanes) {
      const ivec8 hit = load(logits + i) >= limit;
      bool any = false;
      for (int64_t j = 0; j < kLanes; ++j) any |= hit[j] != 0;
      if (!any) continue;
    }
    for (int64_t v = i; v < i + k; ++v)
      if (logits[v] >= floor_) logits[v] = dot(hidden, weight + v * sw, H);
  }
}

}  // namespace

// logits [n, V] float32 contiguous, in place; hidden [n, H], weight [V, H] of one dtype
// (float32 or bf16), last dims contiguous.
void refine_logits(at::Tensor& logits, const at::Tensor& hidden, const at::Tensor& weight) {
  TORCH_CHECK(logits.is_cpu() && logits.dim() == 2 && logits.is_contiguous()
              && logits.scalar_type() == at::kFloat, "logits must be contiguous [n, V] float32 on the CPU; got ",
              logits.sizes(), " ", logits.scalar_type());
  TORCH_CHECK(hidden.is_cpu() && weight.is_cpu() && hidden.dim() == 2 && weight.dim() == 2
              && hidden.stride(1) == 1 && weight.stride(1) == 1 && hidden.size(0) == logits.size(0)
              && weight.size(0) == logits.size(1) && weight.size(1) == hidden.size(1)
              && hidden.scalar_type() == weight.scalar_type(),
              "need hidden [", logits.size(0), ", H] and weight [", logits.size(1),
              ", H] of one dtype with contiguous rows; got ", hidden.sizes(), " ", hidden.scalar_type(),
              ", ", weight.sizes(), " ", weight.scalar_type());
  const int64_t n = logits.size(0), V = logits.size(1), H = hidden.size(1);
  DISPATCH_FLOAT_BF16(hidden.scalar_type(), "refine_logits", [&] {
    const scalar_t *hp = hidden.data_ptr<scalar_t>(), *wp = weight.data_ptr<scalar_t>();
    float* lp = logits.data_ptr<float>();
    const int64_t sh = hidden.stride(0), sw = weight.stride(0);
    at::parallel_for(0, n, 1, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) refine_row(lp + t * V, V, hp + t * sh, wp, H, sw);
    });
  });
}
