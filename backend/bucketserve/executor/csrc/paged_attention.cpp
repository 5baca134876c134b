// Decode attention over a paged KV pool, for the CPU: each (row, kv head) reads exactly its own pages,
// in place (no gather, no copy). Two passes over the row: the scores of every cached position against the
// query heads of the group (reading the keys once), then one softmax over them and the weighted sum of
// the values (reading the values once, for several query heads at a time). A row's scores fit in L2
// (max_model_len floats per query head). With the head size known at compile time (64, 128): scores are
// computed 16 positions at a time and reduced across lanes together, the softmax's exp is vectorized,
// and the value accumulators live in registers.
// Built on first use with the other kernels (module.cpp, by bucketserve.executor.kernels); the torch path in
// attention.py computes the same thing where this cannot be built.
// ATen's headers only, not torch/extension.h (module.cpp binds the functions to Python):
// each file then compiles in a fraction of the time
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <numeric>
#include <type_traits>
#include <vector>

#include "vec.h"

namespace bucketserve {
namespace {

// lane j of the result: the sum of the 16 lanes of v[j]; 30 shuffles and 15 adds instead of 16 reductions
inline Floats transpose_sum(const Floats* v) {
  Floats c[8], d[4], e[2];
  for (int i = 0; i < 8; ++i)
    c[i] = __builtin_shufflevector(v[2 * i], v[2 * i + 1], 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23) +
           __builtin_shufflevector(v[2 * i], v[2 * i + 1], 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
  for (int i = 0; i < 4; ++i)
    d[i] = __builtin_shufflevector(c[2 * i], c[2 * i + 1], 0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27) +
           __builtin_shufflevector(c[2 * i], c[2 * i + 1], 4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31);
  for (int i = 0; i < 2; ++i)
    e[i] = __builtin_shufflevector(d[2 * i], d[2 * i + 1], 0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20, 21, 24, 25, 28, 29) +
           __builtin_shufflevector(d[2 * i], d[2 * i + 1], 2, 3, 6, 7, 10, 11, 14, 15, 18, 19, 22, 23, 26, 27, 30, 31);
  return __builtin_shufflevector(e[0], e[1], 0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30) +
         __builtin_shufflevector(e[0], e[1], 1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
}

// ask for the next page's block early: blocks of a row are kv_heads x 4 KB apart, where the hardware
// prefetcher, which stays within a 4 KB memory page, loses the stream
template <typename T>
inline void prefetch_block(const T* block, int64_t elements) {
  const char* p = reinterpret_cast<const char*>(block);
  for (int64_t offset = 0; offset < elements * static_cast<int64_t>(sizeof(T)); offset += 64) __builtin_prefetch(p + offset);
}

// q . k over DIM (a multiple of 16) with independent accumulators
template <int DIM, typename T>
inline float dot(const float* q, const T* k) {
  Floats acc[DIM / 16];
  for (int i = 0; i < DIM / 16; ++i) acc[i] = load16(q + 16 * i) * load16(k + 16 * i);
  for (int width = DIM / 32; width > 0; width /= 2)
    for (int i = 0; i < width; ++i) acc[i] += acc[i + width];
  return sum16(acc[0]);
}

// the scores of n consecutive keys against one query head
template <int DIM, typename T>
inline void scores_of(const float* __restrict qg, const T* __restrict keys, int64_t n, float* __restrict out) {
  int64_t t = 0;
  for (; t + 16 <= n; t += 16) {
    Floats partial[16];
    for (int j = 0; j < 16; ++j) {
      const T* k = keys + (t + j) * DIM;
      Floats acc = load16(qg) * load16(k);
      for (int i = 1; i < DIM / 16; ++i) acc += load16(qg + 16 * i) * load16(k + 16 * i);
      partial[j] = acc;
    }
    store16(out + t, transpose_sum(partial));
  }
  for (; t < n; ++t) out[t] = dot<DIM>(qg, keys + t * DIM);
}

// scores -> exp(score - max) in place; returns their sum
inline float softmax_numerators(float* __restrict w, int64_t length) {
  Floats best16 = splat(-INFINITY);
  int64_t t = 0;
  for (; t + 16 <= length; t += 16) {
    const Floats v = load16(w + t);
    best16 = v > best16 ? v : best16;
  }
  float best = -INFINITY;
  for (int j = 0; j < 16; ++j) best = std::max(best, best16[j]);
  for (; t < length; ++t) best = std::max(best, w[t]);
  Floats total16 = {};
  for (t = 0; t + 16 <= length; t += 16) {
    const Floats e = exp16(load16(w + t) - best);
    store16(w + t, e);
    total16 += e;
  }
  float total = sum16(total16);
  for (; t < length; ++t) {
    w[t] = std::exp(w[t] - best);
    total += w[t];
  }
  return total;
}

// the weighted sums of a row's values for G query heads at once (each value vector loaded once for all G)
template <int DIM, int G, typename T>
inline void weighted_values(const float* __restrict weights, int64_t length, const T* __restrict value_pool,
                            const int64_t* __restrict pages, int64_t page_size, int64_t kv_heads, int64_t kv_head,
                            float* __restrict acc) {
  Floats sums[G][DIM / 16] = {};
  for (int64_t start = 0; start < length; start += page_size) {
    const int64_t n = std::min(page_size, length - start);
    const T* values = value_pool + (pages[start / page_size] * kv_heads + kv_head) * page_size * DIM;
    if (start + page_size < length)
      prefetch_block(value_pool + (pages[start / page_size + 1] * kv_heads + kv_head) * page_size * DIM, page_size * DIM);
    for (int64_t t = 0; t < n; ++t) {
      for (int i = 0; i < DIM / 16; ++i) {
        const Floats v = load16(values + t * DIM + 16 * i);
        for (int g = 0; g < G; ++g) sums[g][i] += weights[g * length + start + t] * v;
      }
    }
  }
  __builtin_memcpy(acc, sums, sizeof(sums));
}

struct Shape {
  int64_t rows, heads, kv_heads, page_size, dim, most_pages;
  float scale;
};

// Runs every (row, kv head) job, longest row first, each taken by whichever thread is free next. A job's
// cost is its row's length, which differs by up to the context length between rows: the contiguous split
// of at::parallel_for left one thread with the long rows while the others waited for it. `worker()` makes
// one thread's job function (holding that thread's scratch buffers).
template <typename MakeWorker>
void for_each_job(const Shape& s, const int64_t* lengths, const MakeWorker& worker) {
  const int64_t jobs = s.rows * s.kv_heads;
  std::vector<int64_t> order(jobs);
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(),
                   [&](int64_t a, int64_t b) { return lengths[a / s.kv_heads] > lengths[b / s.kv_heads]; });
  std::atomic<int64_t> next{0};
  at::parallel_for(0, std::min<int64_t>(at::get_num_threads(), jobs), 1, [&](int64_t, int64_t) {
    auto run = worker();
    for (int64_t i = next.fetch_add(1, std::memory_order_relaxed); i < jobs;
         i = next.fetch_add(1, std::memory_order_relaxed))
      run(order[i]);
  });
}

// a vector path: the head size DIM is known at compile time
template <typename T, int DIM>
void decode(const T* __restrict q, const T* __restrict key_pool, const T* __restrict value_pool,
            const int64_t* __restrict tables, const int64_t* __restrict lengths, T* __restrict out, const Shape s) {
  constexpr int G = DIM <= 64 ? 4 : 2;  // query heads per pass over the values: G x DIM / 16 accumulators
  const int64_t group = s.heads / s.kv_heads, page_size = s.page_size;
  for_each_job(s, lengths, [&] {
    return [&, query = std::vector<float>(group * DIM), acc = std::vector<float>(group * DIM),
            scores = std::vector<float>(), totals = std::vector<float>(group)](int64_t job) mutable {
      const int64_t row = job / s.kv_heads, kv_head = job % s.kv_heads, length = lengths[row];
      const int64_t* pages = tables + row * s.most_pages;
      const T* q_row = q + (row * s.heads + kv_head * group) * DIM;
      for (int64_t i = 0; i < group * DIM; ++i) query[i] = static_cast<float>(q_row[i]) * s.scale;
      scores.resize(group * length);
      for (int64_t start = 0; start < length; start += page_size) {  // pass 1: scores, keys read once
        const int64_t n = std::min(page_size, length - start);
        const T* keys = key_pool + (pages[start / page_size] * s.kv_heads + kv_head) * page_size * DIM;
        if (start + page_size < length)
          prefetch_block(key_pool + (pages[start / page_size + 1] * s.kv_heads + kv_head) * page_size * DIM, page_size * DIM);
        for (int64_t g = 0; g < group; ++g)
          scores_of<DIM>(query.data() + g * DIM, keys, n, scores.data() + g * length + start);
      }
      for (int64_t g = 0; g < group; ++g) totals[g] = softmax_numerators(scores.data() + g * length, length);
      int64_t g = 0;  // pass 2: values read once per G query heads
      for (; g + G <= group; g += G)
        weighted_values<DIM, G>(scores.data() + g * length, length, value_pool, pages, page_size, s.kv_heads, kv_head,
                                acc.data() + g * DIM);
      for (; g < group; ++g)
        weighted_values<DIM, 1>(scores.data() + g * length, length, value_pool, pages, page_size, s.kv_heads, kv_head,
                                acc.data() + g * DIM);
      for (g = 0; g < group; ++g) {
        T* o = out + (row * s.heads + kv_head * group + g) * DIM;
        const float inverse = 1.f / totals[g];
        for (int64_t d = 0; d < DIM; ++d) o[d] = static_cast<T>(acc[g * DIM + d] * inverse);
      }
    };
  });
}

// any head size (and float64): plain loops
template <typename T>
void decode_any(const T* __restrict q, const T* __restrict key_pool, const T* __restrict value_pool,
                const int64_t* __restrict tables, const int64_t* __restrict lengths, T* __restrict out, const Shape s) {
  const int64_t dim = s.dim, group = s.heads / s.kv_heads, page_size = s.page_size;
  for_each_job(s, lengths, [&] {
    return [&, acc = std::vector<float>(dim), scores = std::vector<float>()](int64_t job) mutable {
      const int64_t row = job / s.kv_heads, kv_head = job % s.kv_heads, length = lengths[row];
      const int64_t* pages = tables + row * s.most_pages;
      scores.resize(length);
      for (int64_t g = 0; g < group; ++g) {
        const T* qg = q + (row * s.heads + kv_head * group + g) * dim;
        for (int64_t t = 0; t < length; ++t) {
          const T* k = key_pool + ((pages[t / page_size] * s.kv_heads + kv_head) * page_size + t % page_size) * dim;
          float sum = 0.f;
          for (int64_t d = 0; d < dim; ++d) sum += static_cast<float>(qg[d]) * s.scale * static_cast<float>(k[d]);
          scores[t] = sum;
        }
        const float best = *std::max_element(scores.begin(), scores.end());
        float total = 0.f;
        std::fill(acc.begin(), acc.end(), 0.f);
        for (int64_t t = 0; t < length; ++t) {
          const float w = std::exp(scores[t] - best);
          total += w;
          const T* v = value_pool + ((pages[t / page_size] * s.kv_heads + kv_head) * page_size + t % page_size) * dim;
          for (int64_t d = 0; d < dim; ++d) acc[d] += w * static_cast<float>(v[d]);
        }
        T* o = out + (row * s.heads + kv_head * group + g) * dim;
        for (int64_t d = 0; d < dim; ++d) o[d] = static_cast<T>(acc[d] / total);
      }
    };
  });
}

template <typename T>
void dispatch_dim(const T* q, const T* keys, const T* values, const int64_t* tables, const int64_t* lengths, T* out,
                  const Shape& s) {
  if constexpr (!std::is_same_v<T, double>) {  // the vector paths are float32 lanes
    if (s.dim == 64) return decode<T, 64>(q, keys, values, tables, lengths, out, s);
    if (s.dim == 128) return decode<T, 128>(q, keys, values, tables, lengths, out, s);
  }
  decode_any<T>(q, keys, values, tables, lengths, out, s);
}

}  // namespace

// q [rows, heads, dim]; pools [pages, kv_heads, page_size, dim]; tables [rows, most_pages] (int64); lengths [rows]
at::Tensor paged_decode_attention(at::Tensor q, at::Tensor key_pool, at::Tensor value_pool,
                                     at::Tensor tables, at::Tensor lengths, double scale) {
  TORCH_CHECK(q.is_contiguous() && key_pool.is_contiguous() && value_pool.is_contiguous(), "contiguous inputs");
  TORCH_CHECK(tables.scalar_type() == at::kLong && lengths.scalar_type() == at::kLong, "int64 tables");
  auto out = at::empty_like(q);
  const auto t = tables.contiguous(), n = lengths.contiguous();
  const Shape shape{q.size(0), q.size(1), key_pool.size(1), key_pool.size(2), q.size(2), t.size(1),
                    static_cast<float>(scale)};
  AT_DISPATCH_FLOATING_TYPES_AND(at::ScalarType::BFloat16, q.scalar_type(), "paged_decode_attention", [&] {
    dispatch_dim<scalar_t>(q.data_ptr<scalar_t>(), key_pool.data_ptr<scalar_t>(), value_pool.data_ptr<scalar_t>(),
                           t.data_ptr<int64_t>(), n.data_ptr<int64_t>(), out.data_ptr<scalar_t>(), shape);
  });
  return out;
}

}  // namespace bucketserve
