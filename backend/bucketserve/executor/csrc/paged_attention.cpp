// Decode attention over a paged KV pool, for the CPU: each (row, kv head) reads exactly its own pages,
// in place (no gather, no copy). Two passes over the row: the scores of every cached position against the
// query heads of the group (reading the keys once), then one softmax over them and the weighted sum of
// the values (reading the values once). A row's scores fit in L2 (max_model_len floats per query head);
// with the head size known at compile time (64, 128) the value accumulator lives in registers.
// Built on first use with the other kernels (module.cpp, by bucketserve.executor.kernels); the torch path in
// attention.py computes the same thing where this cannot be built.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "vec.h"

namespace bucketserve {
namespace {

// q . k over DIM (a multiple of 16) with independent accumulators
template <int DIM, typename T>
inline float dot(const float* q, const T* k) {
  Floats acc[DIM / 16];
  for (int i = 0; i < DIM / 16; ++i) acc[i] = load16(q + 16 * i) * load16(k + 16 * i);
  for (int width = DIM / 32; width > 0; width /= 2)
    for (int i = 0; i < width; ++i) acc[i] += acc[i + width];
  return sum16(acc[0]);
}

struct Shape {
  int64_t rows, heads, kv_heads, page_size, dim, most_pages;
  float scale;
};

// DIM > 0: the head size, known at compile time; 0: read from shape.dim
template <typename T, int DIM>
void decode(const T* __restrict q, const T* __restrict key_pool, const T* __restrict value_pool,
            const int64_t* __restrict tables, const int64_t* __restrict lengths, T* __restrict out, const Shape s) {
  const int64_t dim = DIM > 0 ? DIM : s.dim, group = s.heads / s.kv_heads, page_size = s.page_size;
  at::parallel_for(0, s.rows * s.kv_heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> query(group * dim), acc(dim), scores;
    for (int64_t job = begin; job < end; ++job) {
      const int64_t row = job / s.kv_heads, kv_head = job % s.kv_heads, length = lengths[row];
      const int64_t* pages = tables + row * s.most_pages;
      const T* q_row = q + (row * s.heads + kv_head * group) * dim;
      for (int64_t i = 0; i < group * dim; ++i) query[i] = static_cast<float>(q_row[i]) * s.scale;
      scores.resize(group * length);
      for (int64_t start = 0; start < length; start += page_size) {  // pass 1: scores, keys read once
        const int64_t n = std::min(page_size, length - start);
        const T* keys = key_pool + (pages[start / page_size] * s.kv_heads + kv_head) * page_size * dim;
        for (int64_t g = 0; g < group; ++g) {
          const float* __restrict qg = query.data() + g * dim;
          float* __restrict out_g = scores.data() + g * length + start;
          for (int64_t t = 0; t < n; ++t) {
            const T* __restrict k = keys + t * dim;
            if constexpr (DIM > 0) {
              out_g[t] = dot<DIM>(qg, k);
            } else {
              float sum = 0.f;
              for (int64_t d = 0; d < dim; ++d) sum += qg[d] * static_cast<float>(k[d]);
              out_g[t] = sum;
            }
          }
        }
      }
      for (int64_t g = 0; g < group; ++g) {  // softmax, then pass 2: values read once
        float* __restrict w = scores.data() + g * length;
        const float best = *std::max_element(w, w + length);
        float total = 0.f;
        for (int64_t t = 0; t < length; ++t) {
          w[t] = std::exp(w[t] - best);
          total += w[t];
        }
        float* a = acc.data();
        if constexpr (DIM > 0) {
          Floats sums[DIM / 16] = {};  // in registers across the whole row
          for (int64_t start = 0; start < length; start += page_size) {
            const int64_t n = std::min(page_size, length - start);
            const T* values = value_pool + (pages[start / page_size] * s.kv_heads + kv_head) * page_size * dim;
            for (int64_t t = 0; t < n; ++t)
              for (int i = 0; i < DIM / 16; ++i) sums[i] += w[start + t] * load16(values + t * DIM + 16 * i);
          }
          __builtin_memcpy(a, sums, sizeof(sums));
        } else {
          std::fill(a, a + dim, 0.f);
          for (int64_t start = 0; start < length; start += page_size) {
            const int64_t n = std::min(page_size, length - start);
            const T* values = value_pool + (pages[start / page_size] * s.kv_heads + kv_head) * page_size * dim;
            for (int64_t t = 0; t < n; ++t)
              for (int64_t d = 0; d < dim; ++d) a[d] += w[start + t] * static_cast<float>(values[t * dim + d]);
          }
        }
        T* o = out + (row * s.heads + kv_head * group + g) * dim;
        const float inverse = 1.f / total;
        for (int64_t d = 0; d < dim; ++d) o[d] = static_cast<T>(a[d] * inverse);
      }
    }
  });
}

template <typename T>
void dispatch_dim(const T* q, const T* keys, const T* values, const int64_t* tables, const int64_t* lengths, T* out,
                  const Shape& s) {
  if constexpr (!std::is_same_v<T, double>) {  // the vector paths are float32 lanes
    if (s.dim == 64) return decode<T, 64>(q, keys, values, tables, lengths, out, s);
    if (s.dim == 128) return decode<T, 128>(q, keys, values, tables, lengths, out, s);
  }
  decode<T, 0>(q, keys, values, tables, lengths, out, s);
}

}  // namespace

// q [rows, heads, dim]; pools [pages, kv_heads, page_size, dim]; tables [rows, most_pages] (int64); lengths [rows]
torch::Tensor paged_decode_attention(torch::Tensor q, torch::Tensor key_pool, torch::Tensor value_pool,
                                     torch::Tensor tables, torch::Tensor lengths, double scale) {
  TORCH_CHECK(q.is_contiguous() && key_pool.is_contiguous() && value_pool.is_contiguous(), "contiguous inputs");
  TORCH_CHECK(tables.scalar_type() == torch::kLong && lengths.scalar_type() == torch::kLong, "int64 tables");
  auto out = torch::empty_like(q);
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
