// Fused paged decode attention on the CPU: one query token per sequence attends over its
// keys and values, read in place from the paged cache through its block table.
//
//   q [B, H, D], H = KVH * G      k, v cache [num_blocks, block_size, KVH, D]
//   block_tables [B, max_blocks]  position p is cache[block_tables[b][p / block_size], p % block_size]
//   seq_lens [B]                  the query is at position seq_len - 1; with a window it sees
//                                 only positions >= seq_len - window
//
// Tasks are (b, kv head) pairs; each serves that kv head's G query heads, so every cached
// K/V row is read once. Online softmax in float32, folding in one cache block at a time.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <vector>

#include "vec8.h"

namespace {

// q . k over n vectors; two accumulators so consecutive FMAs need not wait on each other.
template <typename T>
inline float dot(const vec8* q, const T* k, int64_t n) {
  vec8 a = {}, b = {};
  int64_t i = 0;
  for (; i + 1 < n; i += 2) {
    a += q[i] * load(k + i * kLanes);
    b += q[i + 1] * load(k + (i + 1) * kLanes);
  }
  if (i < n) a += q[i] * load(k + i * kLanes);
  a += b;
  return sum(a);
}

struct Shape {
  int64_t heads, kv_heads, group, dim, vecs, block_size, max_blocks, num_blocks;
  int64_t q_sb, q_sh;        // q strides (batch, head)
  int64_t c_sn, c_sb, c_sh;  // cache strides (block, slot, kv head), the same for k and v
  float scale;
  std::optional<int64_t> window;
};

// Running softmax state of the G query heads of one (b, kv head) task.
struct Softmax {
  std::vector<vec8> q, acc;    // [G, D / kLanes]; q pre-scaled
  std::vector<float> m, l, p;  // m, l: [G]; p: scores, then probabilities [G, block_size]
  explicit Softmax(const Shape& s)
      : q(s.group * s.vecs), acc(s.group * s.vecs, vec8{}), m(s.group, -INFINITY), l(s.group, 0.f),
        p(s.group * s.block_size) {}
};

// Folds slots [lo, hi) of one cache block (k, v: its rows of this kv head) into the state.
template <typename T>
void fold_block(const Shape& s, Softmax& st, const T* k, const T* v, int64_t lo, int64_t hi) {
  const int64_t G = s.group, nv = s.vecs, n = hi - lo;
  for (int64_t t = 0; t < n; ++t)
    for (int64_t g = 0; g < G; ++g) st.p[g * n + t] = dot(&st.q[g * nv], k + (lo + t) * s.c_sb, nv);
  for (int64_t g = 0; g < G; ++g) {
    float* p = &st.p[g * n];
    const float m_new = std::max(st.m[g], *std::max_element(p, p + n));
    const float rescale = std::exp(st.m[g] - m_new);
    float sum = 0.f;
    for (int64_t t = 0; t < n; ++t) sum += (p[t] = std::exp(p[t] - m_new));
    st.l[g] = st.l[g] * rescale + sum;
    st.m[g] = m_new;
    for (int64_t i = 0; i < nv; ++i) {
      vec8 a = st.acc[g * nv + i] * rescale;
      for (int64_t t = 0; t < n; ++t) a += p[t] * load(v + (lo + t) * s.c_sb + i * kLanes);
      st.acc[g * nv + i] = a;
    }
  }
}

// Blocks sit anywhere in the cache, so the hardware prefetcher cannot guess the next one.
template <typename T>
inline void prefetch_block(const Shape& s, int64_t block, int64_t kvh, const T* k, const T* v) {
  if (block < 0 || block >= s.num_blocks) return;  // reported when it is reached
  const int64_t at = block * s.c_sn + kvh * s.c_sh;
  for (int64_t t = 0; t < s.block_size; ++t)
    for (int64_t i = 0; i < s.dim; i += 64 / sizeof(T)) {
      __builtin_prefetch(k + at + t * s.c_sb + i);
      __builtin_prefetch(v + at + t * s.c_sb + i);
    }
}

template <typename T>
void attend(const Shape& s, const T* q, const T* k, const T* v, const int64_t* table,
            int64_t seq_len, int64_t kvh, T* out) {
  const int64_t G = s.group, D = s.dim, nv = s.vecs, bs = s.block_size, last = seq_len - 1;
  TORCH_CHECK(seq_len >= 1 && last / bs < s.max_blocks, "seq_len ", seq_len, " not in [1, ",
              s.max_blocks * bs, "]");
  Softmax st(s);
  q += kvh * G * s.q_sh;
  for (int64_t g = 0; g < G; ++g)
    for (int64_t i = 0; i < D; ++i) st.q[g * nv + i / kLanes][i % kLanes] = q[g * s.q_sh + i] * s.scale;
  const int64_t first = s.window ? std::max<int64_t>(0, seq_len - *s.window) : 0;
  for (int64_t j = first / bs; j <= last / bs; ++j) {
    if (j < last / bs) prefetch_block(s, table[j + 1], kvh, k, v);
    TORCH_CHECK(table[j] >= 0 && table[j] < s.num_blocks, "block id ", table[j], " not in [0, ",
                s.num_blocks, ")");
    const int64_t at = table[j] * s.c_sn + kvh * s.c_sh;
    fold_block(s, st, k + at, v + at, j == first / bs ? first % bs : 0, j == last / bs ? last % bs + 1 : bs);
  }
  out += kvh * G * D;
  for (int64_t g = 0; g < G; ++g)
    for (int64_t i = 0; i < D; ++i) out[g * D + i] = st.acc[g * nv + i / kLanes][i % kLanes] / st.l[g];
}

Shape check_shapes(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                   const at::Tensor& tables, const at::Tensor& lens) {
  TORCH_CHECK(q.dim() == 3 && k.dim() == 4 && k.sizes() == v.sizes() && k.strides() == v.strides()
              && q.size(2) == k.size(3) && q.size(1) % k.size(2) == 0 && q.size(2) % kLanes == 0,
              "need q [B, H, D] and k, v caches [num_blocks, block_size, KVH, D] of one layout, "
              "H % KVH == 0 and D % ", kLanes, " == 0; got q ", q.sizes(), ", cache ", k.sizes());
  TORCH_CHECK(q.is_cpu() && k.is_cpu() && v.is_cpu() && tables.is_cpu() && lens.is_cpu(), "CPU tensors only");
  TORCH_CHECK(q.stride(2) == 1 && k.stride(3) == 1 && q.scalar_type() == k.scalar_type()
              && k.scalar_type() == v.scalar_type(), "q and caches need one dtype, contiguous last dims");
  TORCH_CHECK(tables.scalar_type() == at::kLong && tables.dim() == 2 && tables.size(0) == q.size(0)
              && lens.scalar_type() == at::kLong && lens.dim() == 1 && lens.size(0) == q.size(0),
              "need int64 block_tables [B, max_blocks] and seq_lens [B] with B = ", q.size(0));
  const int64_t kv_heads = k.size(2), dim = q.size(2);
  return {q.size(1), kv_heads, q.size(1) / kv_heads, dim, dim / kLanes, k.size(1), tables.size(1),
          k.size(0), q.stride(0), q.stride(1), k.stride(0), k.stride(1), k.stride(2), 1.f, std::nullopt};
}

}  // namespace

at::Tensor paged_decode_attention(const at::Tensor& q, const at::Tensor& k_cache,
                                  const at::Tensor& v_cache, const at::Tensor& block_tables,
                                  const at::Tensor& seq_lens, double scale, std::optional<int64_t> window) {
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
