// Decode attention over a paged KV pool, for the CPU: each (row, kv head) reads exactly its own pages once,
// scores them against its query heads and folds them into an online softmax (no gather, no copy).
// Built on first use by bucketserve.executor.kernels (torch.utils.cpp_extension); the torch path in
// attention.py computes the same thing where this cannot be built.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace {

template <typename T>
void decode(const T* q, const T* key_pool, const T* value_pool, const int64_t* tables, const int64_t* lengths, T* out,
            int64_t rows, int64_t heads, int64_t kv_heads, int64_t page_size, int64_t dim, int64_t most_pages,
            float scale) {
  const int64_t group = heads / kv_heads;
  at::parallel_for(0, rows * kv_heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> acc(group * dim), query(group * dim), best(group), total(group), scores(page_size);
    for (int64_t job = begin; job < end; ++job) {
      const int64_t row = job / kv_heads, kv_head = job % kv_heads, length = lengths[row];
      const T* q_row = q + (row * heads + kv_head * group) * dim;
      for (int64_t i = 0; i < group * dim; ++i) query[i] = static_cast<float>(q_row[i]) * scale;
      std::fill(acc.begin(), acc.end(), 0.f);
      std::fill(best.begin(), best.end(), -std::numeric_limits<float>::infinity());
      std::fill(total.begin(), total.end(), 0.f);
      for (int64_t p = 0; p * page_size < length; ++p) {
        const int64_t page = tables[row * most_pages + p], n = std::min(page_size, length - p * page_size);
        const T* keys = key_pool + (page * kv_heads + kv_head) * page_size * dim;
        const T* values = value_pool + (page * kv_heads + kv_head) * page_size * dim;
        for (int64_t g = 0; g < group; ++g) {
          const float* qg = query.data() + g * dim;
          float page_best = -std::numeric_limits<float>::infinity();
          for (int64_t t = 0; t < n; ++t) {
            const T* k = keys + t * dim;
            float dot = 0.f;
#pragma omp simd reduction(+ : dot)
            for (int64_t d = 0; d < dim; ++d) dot += qg[d] * static_cast<float>(k[d]);
            scores[t] = dot;
            page_best = std::max(page_best, dot);
          }
          const float new_best = std::max(best[g], page_best), rescale = std::exp(best[g] - new_best);
          float* a = acc.data() + g * dim;
          float sum = total[g] * rescale;
#pragma omp simd
          for (int64_t d = 0; d < dim; ++d) a[d] *= rescale;
          for (int64_t t = 0; t < n; ++t) {
            const float w = std::exp(scores[t] - new_best);
            const T* v = values + t * dim;
            sum += w;
#pragma omp simd
            for (int64_t d = 0; d < dim; ++d) a[d] += w * static_cast<float>(v[d]);
          }
          total[g] = sum;
          best[g] = new_best;
        }
      }
      T* o = out + (row * heads + kv_head * group) * dim;
      for (int64_t g = 0; g < group; ++g)
        for (int64_t d = 0; d < dim; ++d) o[g * dim + d] = static_cast<T>(acc[g * dim + d] / total[g]);
    }
  });
}

}  // namespace

// q [rows, heads, dim]; pools [pages, kv_heads, page_size, dim]; tables [rows, most_pages] (int64); lengths [rows]
torch::Tensor paged_decode_attention(torch::Tensor q, torch::Tensor key_pool, torch::Tensor value_pool,
                                     torch::Tensor tables, torch::Tensor lengths, double scale) {
  TORCH_CHECK(q.is_contiguous() && key_pool.is_contiguous() && value_pool.is_contiguous(), "contiguous inputs");
  TORCH_CHECK(tables.scalar_type() == torch::kLong && lengths.scalar_type() == torch::kLong, "int64 tables");
  auto out = torch::empty_like(q);
  const auto t = tables.contiguous(), n = lengths.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND(at::ScalarType::BFloat16, q.scalar_type(), "paged_decode_attention", [&] {
    decode<scalar_t>(q.data_ptr<scalar_t>(), key_pool.data_ptr<scalar_t>(), value_pool.data_ptr<scalar_t>(),
                     t.data_ptr<int64_t>(), n.data_ptr<int64_t>(), out.data_ptr<scalar_t>(), q.size(0), q.size(1),
                     key_pool.size(1), key_pool.size(2), q.size(2), t.size(1), static_cast<float>(scale));
  });
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("paged_decode_attention", &paged_decode_attention, "decode attention over a paged KV pool (CPU)");
}
