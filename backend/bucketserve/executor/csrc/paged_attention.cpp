// Decode attention over a paged KV pool, for the CPU: each (row, kv head) reads exactly its own pages,
// in place (no gather, no copy), through GroupAttention (attention.h).
// Built on first use with the other kernels (module.cpp, by bucketserve.executor.kernels); the torch path in
// attention.py computes the same thing where this cannot be built.
// ATen's headers only, not torch/extension.h (module.cpp binds the functions to Python):
// each file then compiles in a fraction of the time
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "attention.h"

namespace bucketserve {
namespace {

struct Shape {
  int64_t rows, heads, kv_heads, page_size, dim, most_pages;
  float scale;
};

// every (row, kv head) job, longest row first
template <typename MakeWorker>
void for_each_job(const Shape& s, const int64_t* lengths, const MakeWorker& worker) {
  run_costliest_first(s.rows * s.kv_heads, [&](int64_t job) { return lengths[job / s.kv_heads]; }, worker);
}

// a vector path: the head size DIM is known at compile time
template <typename T, int DIM>
void decode(const T* __restrict q, const T* __restrict key_pool, const T* __restrict value_pool,
            const int64_t* __restrict tables, const int64_t* __restrict lengths, T* __restrict out, const Shape s) {
  const int64_t group = s.heads / s.kv_heads;
  for_each_job(s, lengths, [&] {
    return [&, attend = GroupAttention<DIM, T>(group)](int64_t job) mutable {
      const int64_t row = job / s.kv_heads, kv_head = job % s.kv_heads;
      const int64_t first = (row * s.heads + kv_head * group) * DIM;
      attend(q + first, s.scale, lengths[row], key_pool, value_pool, tables + row * s.most_pages, s.page_size,
             s.kv_heads, kv_head, out + first);
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
