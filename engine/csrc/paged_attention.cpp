// Fused paged decode attention on the CPU: one query token per sequence attends over
// its keys and values read in place from the paged cache through its block table.
//
//   q:            [B, H, D]                     H = KVH * G (G query heads per kv head)
//   k/v cache:    [num_blocks, block_size, KVH, D]
//   block_tables: [B, max_blocks] int64         position p lives at
//                 cache[block_tables[b][p / block_size], p % block_size]
//   seq_lens:     [B] int64                     the query sits at position seq_len - 1
//   window:       keys with p > seq_len - 1 - window, i.e. p >= seq_len - window
//
// Tasks are (b, kv_head) pairs; each serves its G query heads so every cached K/V row is
// read once. Online softmax in float32, folding one cache block at a time.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/csrc/utils/pybind.h>  // not torch/extension.h: halves the compile time

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <optional>
#include <type_traits>
#include <vector>

namespace {

// One AVX2 register of floats, via the GCC/Clang vector extension: full-width loads and
// FMAs without intrinsics or -ffast-math. head_dim must be a multiple of kLanes.
using vec8 = float __attribute__((vector_size(32)));
constexpr int64_t kLanes = 8;

template <typename T>
inline vec8 load8(const T* p) {
  vec8 v;
  if constexpr (std::is_same_v<T, float>) {
    std::memcpy(&v, p, sizeof v);
  } else {
    for (int64_t i = 0; i < kLanes; ++i) v[i] = static_cast<float>(p[i]);
  }
  return v;
}

// q . k over n vectors; two accumulators so consecutive FMAs need not wait on each other.
template <typename T>
inline float dot(const vec8* q, const T* k, int64_t n) {
  vec8 a = {}, b = {};
  int64_t i = 0;
  for (; i + 1 < n; i += 2) {
    a += q[i] * load8(k + i * kLanes);
    b += q[i + 1] * load8(k + (i + 1) * kLanes);
  }
  if (i < n) a += q[i] * load8(k + i * kLanes);
  a += b;
  float s = 0.f;
  for (int64_t j = 0; j < kLanes; ++j) s += a[j];
  return s;
}

struct Shape {
  int64_t heads, kv_heads, group, dim, vecs, block_size, max_blocks, num_blocks;
  int64_t q_sb, q_sh;        // q strides (batch, head)
  int64_t c_sn, c_sb, c_sh;  // cache strides (block, slot, kv head), same for k and v
  float scale;
  std::optional<int64_t> window;
};

// Running softmax state of the G query heads of one (b, kv_head) task.
struct Softmax {
  std::vector<vec8> q, acc;     // [G, D / kLanes]; q pre-scaled
  std::vector<float> m, l, p;   // m, l: [G]; p: scores then probabilities, [G, block_size]
  explicit Softmax(const Shape& s)
      : q(s.group * s.vecs), acc(s.group * s.vecs, vec8{}),
        m(s.group, -std::numeric_limits<float>::infinity()), l(s.group, 0.f),
        p(s.group * s.block_size) {}
};

// Folds slots [lo, hi) of one cache block into the running state.
template <typename T>
void fold_block(const Shape& s, Softmax& st, const T* kb, const T* vb, int64_t lo, int64_t hi) {
  const int64_t G = s.group, nv = s.vecs, n = hi - lo;
  for (int64_t t = 0; t < n; ++t)
    for (int64_t g = 0; g < G; ++g) st.p[g * n + t] = dot(&st.q[g * nv], kb + (lo + t) * s.c_sb, nv);
  for (int64_t g = 0; g < G; ++g) {
    float* p = &st.p[g * n];
    const float m_new = std::max(st.m[g], *std::max_element(p, p + n));
    const float rescale = std::exp(st.m[g] - m_new);
    float sum = 0.f;
    for (int64_t t = 0; t < n; ++t) sum += (p[t] = std::exp(p[t] - m_new));
    st.l[g] = st.l[g] * rescale + sum;
    st.m[g] = m_new;
    for (int64_t i = 0; rescale != 1.f && i < nv; ++i) st.acc[g * nv + i] *= rescale;
  }
  for (int64_t t = 0; t < n; ++t)
    for (int64_t i = 0; i < nv; ++i) {
      const vec8 v = load8(vb + (lo + t) * s.c_sb + i * kLanes);
      for (int64_t g = 0; g < G; ++g) st.acc[g * nv + i] += st.p[g * n + t] * v;
    }
}

template <typename T>
void attend(const Shape& s, const T* q, const T* k, const T* v, const int64_t* table,
            int64_t seq_len, int64_t kvh, T* out) {
  TORCH_CHECK(seq_len >= 1 && seq_len <= s.max_blocks * s.block_size, "seq_len ", seq_len,
              " outside [1, max_blocks * block_size = ", s.max_blocks * s.block_size, "]");
  Softmax st(s);
  const int64_t G = s.group, D = s.dim;
  for (int64_t g = 0; g < G; ++g)
    for (int64_t i = 0; i < D; ++i)
      st.q[g * s.vecs + i / kLanes][i % kLanes] = static_cast<float>(q[(kvh * G + g) * s.q_sh + i]) * s.scale;
  const int64_t first = s.window ? std::max<int64_t>(0, seq_len - *s.window) : 0;
  for (int64_t pos = first; pos < seq_len; pos = (pos / s.block_size + 1) * s.block_size) {
    const int64_t block = table[pos / s.block_size];
    TORCH_CHECK(block >= 0 && block < s.num_blocks, "block id ", block, " out of range");
    const int64_t base = block * s.c_sn + kvh * s.c_sh, lo = pos % s.block_size;
    fold_block(s, st, k + base, v + base, lo, std::min(s.block_size, seq_len - pos + lo));
  }
  for (int64_t g = 0; g < G; ++g)
    for (int64_t i = 0; i < D; ++i)
      out[(kvh * G + g) * D + i] = static_cast<T>(st.acc[g * s.vecs + i / kLanes][i % kLanes] / st.l[g]);
}

Shape check_shapes(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                   const at::Tensor& tables, const at::Tensor& lens) {
  TORCH_CHECK(q.dim() == 3 && k.dim() == 4 && k.sizes() == v.sizes() && k.strides() == v.strides(),
              "expected q [B, H, D] and k, v caches of one shape [num_blocks, block_size, KVH, D]");
  TORCH_CHECK(q.size(2) == k.size(3) && q.size(1) % k.size(2) == 0 && q.size(2) % kLanes == 0, "q ",
              q.sizes(), " does not fit cache ", k.sizes(), ": need equal head_dim, a multiple of ",
              kLanes, ", and H % KVH == 0");
  TORCH_CHECK(q.stride(2) == 1 && k.stride(3) == 1, "q and caches need a contiguous last dim");
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && k.scalar_type() == v.scalar_type(),
              "q, k_cache, v_cache must share a dtype");
  TORCH_CHECK(tables.scalar_type() == at::kLong && tables.dim() == 2 && tables.size(0) == q.size(0)
              && lens.scalar_type() == at::kLong && lens.dim() == 1 && lens.size(0) == q.size(0),
              "expected int64 block_tables [B, max_blocks] and seq_lens [B] with B = ", q.size(0));
  const int64_t kv_heads = k.size(2), dim = q.size(2);
  return {q.size(1), kv_heads, q.size(1) / kv_heads, dim, dim / kLanes, k.size(1), tables.size(1),
          k.size(0), q.stride(0), q.stride(1), k.stride(0), k.stride(1), k.stride(2), 1.f, std::nullopt};
}

}  // namespace

at::Tensor paged_decode_attention(const at::Tensor& q, const at::Tensor& k_cache,
                                  const at::Tensor& v_cache, const at::Tensor& block_tables,
                                  const at::Tensor& seq_lens, double scale,
                                  std::optional<int64_t> window) {
  Shape s = check_shapes(q, k_cache, v_cache, block_tables, seq_lens);
  TORCH_CHECK(!window || *window >= 1, "window must be >= 1, got ", window.value_or(0));
  s.scale = static_cast<float>(scale);
  s.window = window;
  const at::Tensor tables = block_tables.contiguous(), lens = seq_lens.contiguous();
  at::Tensor out = at::empty({q.size(0), s.heads, s.dim}, q.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "paged_decode", [&] {
    const auto *qp = q.data_ptr<scalar_t>(), *kp = k_cache.data_ptr<scalar_t>();
    const auto* vp = v_cache.data_ptr<scalar_t>();
    auto* op = out.data_ptr<scalar_t>();
    const int64_t *tp = tables.data_ptr<int64_t>(), *lp = lens.data_ptr<int64_t>();
    at::parallel_for(0, q.size(0) * s.kv_heads, 1, [&](int64_t begin, int64_t end) {
      for (int64_t task = begin; task < end; ++task) {
        const int64_t b = task / s.kv_heads, kvh = task % s.kv_heads;
        attend(s, qp + b * s.q_sb, kp, vp, tp + b * s.max_blocks, lp[b], kvh, op + b * s.heads * s.dim);
      }
    });
  });
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("paged_decode_attention", &paged_decode_attention, "Fused paged decode attention (CPU)",
        py::arg("q"), py::arg("k_cache"), py::arg("v_cache"), py::arg("block_tables"),
        py::arg("seq_lens"), py::arg("scale"), py::arg("window") = py::none());
}
