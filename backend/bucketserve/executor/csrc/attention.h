// Attention of one query position's heads over cached keys and values, for the decode kernel
// (paged_attention.cpp), which runs it for each row's one new position over its pages; the prefill kernel
// (prefill_attention.cpp) shares its softmax and its scheduling of jobs. Two passes over the keys
// and values: the scores of every position against the query heads of a group (reading the keys once),
// then one softmax over them and the weighted sum of the values (reading the values once, for several query
// heads at a time). A position's scores fit in L2 (max_model_len floats per query head). With the head size
// known at compile time (64, 128): scores are computed 16 positions at a time and reduced across lanes
// together, the softmax's exp is vectorized, and the value accumulators live in registers.
#pragma once
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <numeric>
#include <vector>

#include "vec.h"

namespace bucketserve {

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

// query vectors per pass over the values: kValuesPerPass x DIM / 16 accumulators stay in registers
template <int DIM>
constexpr int kValuesPerPass = DIM <= 64 ? 4 : 2;

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

// One position's `group` query heads (q_row: group x DIM, one after another) against `length` positions of
// kv head `kv_head`, kept in blocks of page_size positions: block i at (pages[i] * kv_heads + kv_head) *
// page_size * DIM of each pool. Holds one thread's scratch buffers.
template <int DIM, typename T>
class GroupAttention {
 public:
  explicit GroupAttention(int64_t group) : group_(group), query_(group * DIM), acc_(group * DIM), totals_(group) {}

  void operator()(const T* __restrict q_row, float scale, int64_t length, const T* __restrict key_pool,
                  const T* __restrict value_pool, const int64_t* __restrict pages, int64_t page_size, int64_t kv_heads,
                  int64_t kv_head, T* __restrict out_row) {
    constexpr int G = kValuesPerPass<DIM>;
    const int64_t group = group_;
    for (int64_t i = 0; i < group * DIM; ++i) query_[i] = static_cast<float>(q_row[i]) * scale;
    scores_.resize(group * length);
    for (int64_t start = 0; start < length; start += page_size) {  // pass 1: scores, keys read once
      const int64_t n = std::min(page_size, length - start);
      const T* keys = key_pool + (pages[start / page_size] * kv_heads + kv_head) * page_size * DIM;
      if (start + page_size < length)
        prefetch_block(key_pool + (pages[start / page_size + 1] * kv_heads + kv_head) * page_size * DIM, page_size * DIM);
      for (int64_t g = 0; g < group; ++g) scores_of<DIM>(query_.data() + g * DIM, keys, n, scores_.data() + g * length + start);
    }
    for (int64_t g = 0; g < group; ++g) totals_[g] = softmax_numerators(scores_.data() + g * length, length);
    int64_t g = 0;  // pass 2: values read once per G query heads
    for (; g + G <= group; g += G)
      weighted_values<DIM, G>(scores_.data() + g * length, length, value_pool, pages, page_size, kv_heads, kv_head,
                              acc_.data() + g * DIM);
    for (; g < group; ++g)
      weighted_values<DIM, 1>(scores_.data() + g * length, length, value_pool, pages, page_size, kv_heads, kv_head,
                              acc_.data() + g * DIM);
    for (g = 0; g < group; ++g) {
      const float inverse = 1.f / totals_[g];
      for (int64_t d = 0; d < DIM; ++d) out_row[g * DIM + d] = static_cast<T>(acc_[g * DIM + d] * inverse);
    }
  }

 private:
  int64_t group_;
  std::vector<float> query_, acc_, scores_, totals_;
};

// Runs jobs 0..jobs-1, costliest first, each taken by whichever thread is free next. Costs differ by up to
// the context length between jobs: the contiguous split of at::parallel_for left one thread with the long
// ones while the others waited for it. `worker()` makes one thread's job function (holding its scratch).
template <typename Cost, typename MakeWorker>
void run_costliest_first(int64_t jobs, const Cost& cost, const MakeWorker& worker) {
  std::vector<int64_t> order(jobs);
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return cost(a) > cost(b); });
  std::atomic<int64_t> next{0};
  at::parallel_for(0, std::min<int64_t>(at::get_num_threads(), jobs), 1, [&](int64_t, int64_t) {
    auto run = worker();
    for (int64_t i = next.fetch_add(1, std::memory_order_relaxed); i < jobs;
         i = next.fetch_add(1, std::memory_order_relaxed))
      run(order[i]);
  });
}

}  // namespace bucketserve
