// Fused paged decode attention on the CPU: one query token per sequence attends over its
// keys and values, read in place from the paged cache through its block table.
//
//   q [B, H, D], H = KVH * G      k, v cache [num_blocks, block_size, KVH, D]
//   block_tables [B, max_blocks]  position p is cache[block_tables[b][p / block_size], p % block_size]
//   seq_lens [B]                  the query is at position seq_len - 1; with a window it sees
//                                 only positions >= seq_len - window
//
// Tasks are sequences: a block's rows of every kv head are read in one pass, each key and
// value vector once for the G query heads sharing it (G <= kMaxGroup). Online softmax in
// float32, folding in one cache block at a time.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>

#include <algorithm>
#include <cstring>
#include <cmath>
#include <optional>
#include <type_traits>
#include <vector>

#include "vec8.h"

constexpr int64_t kMaxGroup = 16;  // query heads per kv head the kernel takes
constexpr int64_t kPrefetchLines = 4;
constexpr int64_t kMaxVecs = 32;  // head_dim <= 256

namespace {

struct Shape {
  int64_t heads, kv_heads, group, dim, vecs, block_size, max_blocks, num_blocks;
  int64_t q_sb, q_sh;        // q strides (batch, head)
  int64_t c_sn, c_sb, c_sh;  // cache strides (block, slot, kv head), the same for k and v
  float scale;
  std::optional<int64_t> window;
};

// Running softmax state of one sequence's H query heads; reused across a thread's tasks.
struct Softmax {
  std::vector<vec8> q, acc;    // [H, D / kLanes]; q pre-scaled
  std::vector<float> m, l, rescale;  // [H]: running max, running sum, this block's rescale
  std::vector<float> p;              // one block's scores, then probabilities [H, block_size]
  explicit Softmax(const Shape& s)
      : q(s.heads * s.vecs), acc(s.heads * s.vecs), m(s.heads), l(s.heads), rescale(s.heads),
        p(s.heads * s.block_size) {}
};

// NV: D / kLanes when the kernel was specialised for it (the loops then unroll and the
// accumulators stay in registers), 0 for any other head size (read from the shape).
template <int NV>
constexpr int64_t vecs_of(const Shape& s) { return NV ? NV : s.vecs; }

// Query heads served per pass over a block's keys or values: each vector of the cache is
// loaded and widened once for up to C heads, C chosen so their accumulators fit the
// vector registers (32 with AVX-512, 16 with AVX2).
#ifdef __AVX512F__
constexpr int kRegisters = 32;
#else
constexpr int kRegisters = 16;
#endif
template <int NV>
constexpr int kHeadsPerPass = NV ? std::max(1, std::min<int>(kMaxGroup, (kRegisters - 4) / NV)) : 1;

// p[h][t] = q[h] . k[t] for slots t < n of the C heads from h0 (all of kv head kvh's).
template <int NV, int C, typename T>
void scores_pass(const Shape& s, Softmax& st, const T* k, int64_t kvh, int64_t h0, int64_t c, int64_t n) {
  const int64_t nv = vecs_of<NV>(s);
  const vec8* q = &st.q[h0 * nv];
  for (int64_t t = 0; t < n; t += 2) {  // two keys at a time: 2C independent chains
    const bool pair = t + 1 < n;
    const T* k0 = k + t * s.c_sb + kvh * s.c_sh;
    const T* k1 = pair ? k0 + s.c_sb : k0;
    vec8 a0[C] = {}, a1[C] = {};
    for (int64_t i = 0; i < nv; ++i) {
      const vec8 x0 = load(k0 + i * kLanes), x1 = load(k1 + i * kLanes);
      for (int64_t j = 0; j < C; ++j)
        if (j < c) {
          a0[j] += q[j * nv + i] * x0;
          a1[j] += q[j * nv + i] * x1;
        }
    }
    for (int64_t j = 0; j < c; ++j) {
      st.p[(h0 + j) * s.block_size + t] = sum(a0[j]);
      if (pair) st.p[(h0 + j) * s.block_size + t + 1] = sum(a1[j]);
    }
  }
}

template <int NV, typename T>
void scores(const Shape& s, Softmax& st, const T* k, int64_t kvh, int64_t n) {
  constexpr int C = kHeadsPerPass<NV>;
  for (int64_t g = 0; g < s.group; g += C)
    scores_pass<NV, C>(s, st, k, kvh, kvh * s.group + g, std::min<int64_t>(C, s.group - g), n);
}

// Scores of head h over n slots -> probabilities; rescales the head's running state.
void softmax_step(const Shape& s, Softmax& st, int64_t h, int64_t n) {
  float* p = &st.p[h * s.block_size];
  float block_max = -INFINITY;
  for (int64_t t = 0; t < n; ++t) block_max = std::max(block_max, p[t]);
  const float m_new = std::max(st.m[h], block_max);
  const float rescale = std::exp(st.m[h] - m_new);
  vec8 total = {};
  for (int64_t t = 0; t < n; t += kLanes) {
    const int64_t k = std::min<int64_t>(kLanes, n - t);
    const vec8 e = exp8(load(p + t, k) - m_new);
    std::memcpy(p + t, &e, k * sizeof(float));
    for (int64_t j = 0; j < k; ++j) total[j] += e[j];
  }
  st.l[h] = st.l[h] * rescale + sum(total);
  st.m[h] = m_new;
  st.rescale[h] = rescale;
}

// acc[h] = acc[h] * rescale[h] + sum_t p[h][t] v[t] for the c <= C heads from h0.
template <int NV, int C, typename T>
void accumulate_pass(const Shape& s, Softmax& st, const T* v, int64_t kvh, int64_t h0, int64_t c, int64_t n) {
  constexpr int64_t kVecs = NV ? NV : kMaxVecs;
  const int64_t nv = vecs_of<NV>(s);
  vec8 a[C][kVecs];
  for (int64_t j = 0; j < c; ++j)
    for (int64_t i = 0; i < nv; ++i) a[j][i] = st.acc[(h0 + j) * nv + i] * st.rescale[h0 + j];
  for (int64_t t = 0; t < n; ++t) {
    const T* row = v + t * s.c_sb + kvh * s.c_sh;
    float w[C];
    for (int64_t j = 0; j < c; ++j) w[j] = st.p[(h0 + j) * s.block_size + t];
    for (int64_t i = 0; i < nv; ++i) {
      const vec8 vv = load(row + i * kLanes);
      for (int64_t j = 0; j < C; ++j)
        if (j < c) a[j][i] += w[j] * vv;
    }
  }
  for (int64_t j = 0; j < c; ++j)
    for (int64_t i = 0; i < nv; ++i) st.acc[(h0 + j) * nv + i] = a[j][i];
}

template <int NV, typename T>
void accumulate(const Shape& s, Softmax& st, const T* v, int64_t kvh, int64_t n) {
  constexpr int C = kHeadsPerPass<NV>;
  for (int64_t g = 0; g < s.group; g += C)
    accumulate_pass<NV, C>(s, st, v, kvh, kvh * s.group + g, std::min<int64_t>(C, s.group - g), n);
}

// Blocks sit anywhere in the cache, so the hardware prefetcher cannot guess the next one:
// touching the first lines of its k and v runs (a block's rows of all kv heads are one
// contiguous run in a [.., slot, kvh, D] cache) starts its streams early. Prefetching every
// line of the block instead was slower here (25 -> 38 ms for SmolLM2's 30 layers at batch
// 32): the requests fill the core's miss buffers and stall the loads the step needs now.
template <typename T>
inline void prefetch_block(const Shape& s, int64_t block, const T* k, const T* v) {
  if (block < 0 || block >= s.num_blocks) return;  // reported when it is reached
  constexpr int64_t kLine = 64 / sizeof(T);
  for (int64_t i = 0; i < kPrefetchLines; ++i) {
    __builtin_prefetch(k + block * s.c_sn + i * kLine);
    __builtin_prefetch(v + block * s.c_sn + i * kLine);
  }
}

// One sequence, all heads: blocks in order, each folded into every head's softmax state.
template <int NV, typename T>
void attend(const Shape& s, Softmax& st, const T* q, const T* k, const T* v, const int64_t* table,
            int64_t seq_len, T* out) {
  const int64_t D = s.dim, nv = s.vecs, bs = s.block_size, last = seq_len - 1;
  TORCH_CHECK(seq_len >= 1 && last / bs < s.max_blocks, "seq_len ", seq_len, " not in [1, ",
              s.max_blocks * bs, "]");
  for (int64_t h = 0; h < s.heads; ++h) {
    for (int64_t i = 0; i < D; ++i) st.q[h * nv + i / kLanes][i % kLanes] = q[h * s.q_sh + i] * s.scale;
    st.m[h] = -INFINITY;
    st.l[h] = 0.f;
  }
  std::fill(st.acc.begin(), st.acc.end(), vec8{});
  const int64_t first = s.window ? std::max<int64_t>(0, seq_len - *s.window) : 0;
  for (int64_t j = first / bs; j <= last / bs; ++j) {
    if (j < last / bs) prefetch_block(s, table[j + 1], k, v);
    TORCH_CHECK(table[j] >= 0 && table[j] < s.num_blocks, "block id ", table[j], " not in [0, ",
                s.num_blocks, ")");
    const int64_t lo = j == first / bs ? first % bs : 0, hi = j == last / bs ? last % bs + 1 : bs;
    const int64_t at = table[j] * s.c_sn + lo * s.c_sb;
    for (int64_t kvh = 0; kvh < s.kv_heads; ++kvh) {
      scores<NV>(s, st, k + at, kvh, hi - lo);
      for (int64_t g = 0; g < s.group; ++g) softmax_step(s, st, kvh * s.group + g, hi - lo);
      accumulate<NV>(s, st, v + at, kvh, hi - lo);
    }
  }
  for (int64_t h = 0; h < s.heads; ++h)
    for (int64_t i = 0; i < D; ++i) out[h * D + i] = st.acc[h * nv + i / kLanes][i % kLanes] / st.l[h];
}

Shape check_shapes(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                   const at::Tensor& tables, const at::Tensor& lens) {
  TORCH_CHECK(q.dim() == 3 && k.dim() == 4 && k.sizes() == v.sizes() && k.strides() == v.strides()
              && q.size(2) == k.size(3) && q.size(1) % k.size(2) == 0 && q.size(2) % kLanes == 0
              && q.size(1) / k.size(2) <= kMaxGroup && q.size(2) <= kMaxVecs * kLanes,
              "need q [B, H, D] and k, v caches [num_blocks, block_size, KVH, D] of one layout, "
              "H % KVH == 0, H / KVH <= ", kMaxGroup, ", D <= ", kMaxVecs * kLanes, " and D % ", kLanes,
              " == 0; got q ", q.sizes(),
              ", cache ", k.sizes());
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
    auto run = [&](auto nv) {  // nv: std::integral_constant, the specialised head size (0: any)
      at::parallel_for(0, q.size(0), 1, [&](int64_t begin, int64_t end) {
        Softmax st(s);
        for (int64_t b = begin; b < end; ++b)
          attend<decltype(nv)::value>(s, st, qp + b * s.q_sb, kp, vp, tp + b * s.max_blocks, lp[b],
                                      op + b * s.heads * s.dim);
      });
    };
    switch (s.vecs) {  // head_dim 16, 32, 64, 128
      case 2: run(std::integral_constant<int, 2>{}); break;
      case 4: run(std::integral_constant<int, 4>{}); break;
      case 8: run(std::integral_constant<int, 8>{}); break;
      case 16: run(std::integral_constant<int, 16>{}); break;
      default: run(std::integral_constant<int, 0>{});
    }
  });
  return out;
}
