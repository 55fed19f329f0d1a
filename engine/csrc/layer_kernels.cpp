// Fused elementwise parts of a Llama decoder layer, one row (token) at a time:
//
//   rms_norm      out[t] = x[t] * rsqrt(mean(x[t]^2) + eps) * w         x, out [T, H]
//   add_rms_norm  residual[t] += x[t]; out[t] = rms_norm(residual[t])     residual in x's dtype or
//                                                                     float32, out in x's dtype
//   rotary        q[t, h] = q[t, h] * cos[t] + rotate_half(q[t, h]) * sin[t], and k, in place
//                 rotate_half([a | b]) = [-b | a]                        q [T, h, D], cos [T, D]
//   silu_mul      out[t] = silu(gate_up[t, :I]) * gate_up[t, I:]        gate_up [T, 2I]
//
// Float32 math on float32 or bf16 tensors. Results round to bf16 where torch's own code
// does: once for rms_norm (torch's kernel is fused too), after every op for rotary and
// silu_mul (torch runs them op by op), so the two paths agree to the last bit or one ulp.
// Rows take any stride; the last dim must be contiguous.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <algorithm>
#include <cmath>
#include <type_traits>

#include "dispatch.h"
#include "vec8.h"

namespace {

// Below this many elements (~100 us of work) a call runs on the calling thread: waking the
// OpenMP team costs more than it saves at decode batch sizes, and on a loaded machine a
// descheduled worker stalls the whole call for a time slice. Long prefills still split.
constexpr int64_t kMinParallelElements = 1 << 17;

// fn(t) for every row t in [0, rows), split across threads only when rows * width is large.
template <typename F>
void for_rows(int64_t rows, int64_t width, const F& fn) {
  const int64_t grain = std::max<int64_t>(1, kMinParallelElements / std::max<int64_t>(width, 1));
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) fn(t);
  });
}

// fn(i, n) for each run of n <= kLanes elements starting at i in [0, size): n is the
// compile-time kLanes for every full run, so only the last one takes the partial load.
template <typename F>
inline void for_lanes(int64_t size, const F& fn) {
  int64_t i = 0;
  for (; i + kLanes <= size; i += kLanes) fn(i, std::integral_constant<int64_t, kLanes>{});
  if (i < size) fn(i, size - i);
}

template <typename T, typename W>
void norm_row(const T* x, const W* w, W* out, int64_t H, float eps) {
  vec8 squares = {};
  for_lanes(H, [&](int64_t i, auto n) {
    const vec8 v = load(x + i, n);
    squares += v * v;
  });
  const float r = 1.f / std::sqrt(sum(squares) / static_cast<float>(H) + eps);
  for_lanes(H, [&](int64_t i, auto n) { store(out + i, load(x + i, n) * r * load(w + i, n), n); });
}

template <typename T, typename R>
void add_row(const T* x, R* residual, int64_t H) {
  for_lanes(H, [&](int64_t i, auto n) { store(residual + i, load(residual + i, n) + load(x + i, n), n); });
}

template <typename T>
void rotate_head(T* x, const T* cos, const T* sin, int64_t half) {
  for_lanes(half, [&](int64_t i, auto n) {
    const vec8 a = load(x + i, n), b = load(x + half + i, n);
    store(x + i, round_to<T>(a * load(cos + i, n)) - round_to<T>(b * load(sin + i, n)), n);
    store(x + half + i, round_to<T>(b * load(cos + half + i, n)) + round_to<T>(a * load(sin + half + i, n)), n);
  });
}

template <typename T>
void silu_mul_row(const T* gate, const T* up, T* out, int64_t I) {
  for_lanes(I, [&](int64_t i, auto n) {
    const vec8 g = load(gate + i, n);
    store(out + i, round_to<T>(g / (1.f + exp8(-g))) * load(up + i, n), n);
  });
}

template <typename T, typename R>
void add_norm_rows(const T* x, int64_t sx, R* residual, int64_t sr, const T* w, T* out, int64_t rows,
                   int64_t H, double eps) {
  for_rows(rows, H, [&](int64_t t) {
    add_row(x + t * sx, residual + t * sr, H);
    norm_row(residual + t * sr, w, out + t * H, H, static_cast<float>(eps));
  });
}

void check_rows(const at::Tensor& x, int64_t dims, const char* name) {
  TORCH_CHECK(x.is_cpu() && x.dim() == dims && x.stride(-1) == 1, name, " must be a ", dims,
              "-d CPU tensor with a contiguous last dim; got ", x.sizes(), " strides ", x.strides());
}

void check_norm(const at::Tensor& x, const at::Tensor& weight) {
  check_rows(x, 2, "x");
  TORCH_CHECK(weight.is_cpu() && weight.dim() == 1 && weight.size(0) == x.size(1) && weight.is_contiguous()
              && weight.scalar_type() == x.scalar_type(), "weight must be contiguous [", x.size(1),
              "] on the CPU in x's dtype; got ", weight.sizes(), " ", weight.scalar_type());
}

}  // namespace

// x [T, H], weight [H] -> [T, H] contiguous.
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  check_norm(x, weight);
  at::Tensor out = at::empty(x.sizes(), x.options());
  DISPATCH_FLOAT_BF16(x.scalar_type(), "rms_norm", [&] {
    const scalar_t *xp = x.data_ptr<scalar_t>(), *wp = weight.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    const int64_t H = x.size(1), sx = x.stride(0);
    for_rows(x.size(0), H, [&](int64_t t) { norm_row(xp + t * sx, wp, op + t * H, H, eps); });
  });
  return out;
}

// x [T, H] and weight [H] of one dtype; residual [T, H] in that dtype or float32 (a float32
// residual stream keeps every layer's add exact to float32 in a bf16 model: the sum the
// reference rounds to bf16 after each of 2 x layers adds is where bf16 error builds up).
// residual += x in place -> rms_norm(residual) [T, H] contiguous, in x's dtype.
at::Tensor add_rms_norm(const at::Tensor& x, at::Tensor& residual, const at::Tensor& weight, double eps) {
  check_norm(x, weight);
  check_rows(residual, 2, "residual");
  TORCH_CHECK(residual.sizes() == x.sizes()
              && (residual.scalar_type() == x.scalar_type() || residual.scalar_type() == at::kFloat),
              "residual must be ", x.sizes(), " in x's dtype (", x.scalar_type(), ") or float32; got ",
              residual.sizes(), " ", residual.scalar_type());
  at::Tensor out = at::empty(x.sizes(), x.options());
  DISPATCH_FLOAT_BF16(x.scalar_type(), "add_rms_norm", [&] {
    if (residual.scalar_type() == at::kFloat)
      add_norm_rows(x.data_ptr<scalar_t>(), x.stride(0), residual.data_ptr<float>(), residual.stride(0),
                    weight.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), x.size(0), x.size(1), eps);
    else
      add_norm_rows(x.data_ptr<scalar_t>(), x.stride(0), residual.data_ptr<scalar_t>(), residual.stride(0),
                    weight.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), x.size(0), x.size(1), eps);
  });
  return out;
}

// q [T, h, D], k [T, kvh, D] (any strides but the last), cos, sin [T, D] or [T, 1, D]
// contiguous: q and k rotated in place.
void rotary(at::Tensor& q, at::Tensor& k, const at::Tensor& cos, const at::Tensor& sin) {
  check_rows(q, 3, "q");
  check_rows(k, 3, "k");
  const int64_t T = q.size(0), D = q.size(2);
  TORCH_CHECK(k.size(0) == T && k.size(2) == D && D % 2 == 0, "need q [T, h, D], k [T, kvh, D], D even; got ",
              q.sizes(), ", ", k.sizes());
  TORCH_CHECK(cos.is_cpu() && sin.is_cpu() && cos.numel() == T * D && cos.size(-1) == D
              && sin.sizes() == cos.sizes() && cos.is_contiguous() && sin.is_contiguous(),
              "cos and sin must be contiguous CPU [", T, ", ", D, "]; got ", cos.sizes(), ", ", sin.sizes());
  for (const auto& t : {k, cos, sin})
    TORCH_CHECK(t.scalar_type() == q.scalar_type(), "q, k, cos and sin need one dtype");
  DISPATCH_FLOAT_BF16(q.scalar_type(), "rotary", [&] {
    scalar_t *qp = q.data_ptr<scalar_t>(), *kp = k.data_ptr<scalar_t>();
    const scalar_t *cp = cos.data_ptr<scalar_t>(), *sp = sin.data_ptr<scalar_t>();
    for_rows(T, (q.size(1) + k.size(1)) * D, [&](int64_t t) {
      for (int64_t h = 0; h < q.size(1); ++h)
        rotate_head(qp + t * q.stride(0) + h * q.stride(1), cp + t * D, sp + t * D, D / 2);
      for (int64_t h = 0; h < k.size(1); ++h)
        rotate_head(kp + t * k.stride(0) + h * k.stride(1), cp + t * D, sp + t * D, D / 2);
    });
  });
}

// gate_up [T, 2I] -> [T, I] contiguous.
at::Tensor silu_mul(const at::Tensor& gate_up) {
  check_rows(gate_up, 2, "gate_up");
  TORCH_CHECK(gate_up.size(1) % 2 == 0, "gate_up's last dim must be even; got ", gate_up.sizes());
  const int64_t T = gate_up.size(0), I = gate_up.size(1) / 2, s = gate_up.stride(0);
  at::Tensor out = at::empty({T, I}, gate_up.options());
  DISPATCH_FLOAT_BF16(gate_up.scalar_type(), "silu_mul", [&] {
    const scalar_t* gp = gate_up.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    for_rows(T, 2 * I, [&](int64_t t) { silu_mul_row(gp + t * s, gp + t * s + I, op + t * I, I); });
  });
  return out;
}
