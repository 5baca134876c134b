// Causal attention of packed prompts (one after another, no padding), for the CPU. Each sequence computes some
// positions this step (a whole prompt, or the next chunk of one) after those it already has in the paged KV pool;
// its keys and values, this step's included, are read from its pages. A job is one sequence's kv head over a
// block of its new positions. It first copies the keys it reads into scratch, transposed
// ([dim][position], so that one vector holds 16 positions' values of one dimension), and the values as they
// are; both in float32. The block's query vectors (its positions x the kv head's group of query heads) then go
// through in tiles, as a small matrix product each: the scores of kTile vectors against 16 keys at a time
// (each key vector loaded once for the whole tile), one softmax per vector over its positions, and the
// weighted sum of the values for a few vectors at once (each value vector loaded once for them). One query
// vector at a time, as decode does, reached 114 GFLOP/s here on a 2,000-token prompt and 99 on 300-token
// ones (16 heads over 4 kv heads); tiles 150 and 123; tiles in jobs of up to 1,024 vectors 155 and 120-130,
// and as much with 4 heads of their own; torch's flash SDPA, run once per sequence, 120 and 60.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/zeros.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "attention.h"

namespace bucketserve {
namespace {

// query vectors per job (positions x the group's query heads), at most: a job copies the keys up to its last
// position, so fewer vectors per job copy the same keys more often (64 positions of one head each ran a
// 1,024-token prompt of a model with 4 heads at 67 GFLOP/s here, 1,024 vectors at 137; with 4 query heads per kv
// head 115 and 141)
constexpr int64_t kJobVectors = 1024;
constexpr int64_t kMinBlock = 64;  // positions per job at least
constexpr int64_t kJobsPerThread = 4;  // smaller blocks while there are fewer jobs than this per thread
constexpr int kTile = 8;        // query vectors scored together: kTile accumulators, one key vector load each

struct Packed {
  // per job block: its sequence, the sequence's first row in q, its positions before this step, its positions
  // in all (before this step and this step's), and the block's first new position (counted from the context)
  std::vector<int64_t> seqs, starts, contexts, totals, blocks;
  int64_t heads, kv_heads, q_stride, page_size, most_pages, block;  // block: new positions per job
  const int64_t* tables;  // [sequences, most_pages]: each sequence's pages
  float scale;
};

inline int64_t round16(int64_t n) { return (n + 15) / 16 * 16; }

// one thread's scratch, sized for the longest sequence
template <int DIM>
struct Scratch {
  explicit Scratch(int64_t longest)
      : capacity(round16(longest)), keys(DIM * capacity), values(capacity * DIM), scores(kTile * capacity),
        query(kTile * DIM), totals(kTile) {}
  int64_t capacity;
  std::vector<float> keys, values, scores, query, totals;
};

// scores (before the softmax) of kTile query vectors against keys [0, end), 16 at a time
template <int DIM>
inline void tile_scores(const float* __restrict query, const float* __restrict keys, int64_t capacity, int64_t end,
                        float* __restrict scores) {
  for (int64_t t = 0; t < end; t += 16) {
    Floats acc[kTile] = {};
    for (int d = 0; d < DIM; ++d) {
      const Floats k = load16(keys + d * capacity + t);
      for (int r = 0; r < kTile; ++r) acc[r] += query[r * DIM + d] * k;
    }
    for (int r = 0; r < kTile; ++r) store16(scores + r * capacity + t, acc[r]);
  }
}

// out rows of G vectors: their weights (zero past each vector's own length) times the values [0, end). The
// accumulation is weighted_values' (attention.h) over contiguous scratch, writing each row straight out: calling
// weighted_values itself (one page of `capacity` positions) measured 4% slower on a 2,000-token prompt
template <int DIM, int G, typename T>
inline void tile_values(const float* __restrict weights, int64_t capacity, const float* __restrict values, int64_t end,
                        const float* __restrict totals, T* const* __restrict out) {
  Floats acc[G][DIM / 16] = {};
  for (int64_t t = 0; t < end; ++t) {
    for (int i = 0; i < DIM / 16; ++i) {
      const Floats v = load16(values + t * DIM + 16 * i);
      for (int g = 0; g < G; ++g) acc[g][i] += weights[g * capacity + t] * v;
    }
  }
  for (int g = 0; g < G; ++g) {
    const float inverse = 1.f / totals[g];
    for (int i = 0; i < DIM / 16; ++i)
      for (int j = 0; j < 16; ++j) out[g][16 * i + j] = static_cast<T>(acc[g][i][j] * inverse);
  }
}

template <typename T, int DIM>
void prefill(const T* __restrict q, const T* __restrict key_pool, const T* __restrict value_pool, T* __restrict out,
             const Packed& p, int64_t longest) {
  constexpr int G = kValuesPerPass<DIM>;
  static_assert(kTile % G == 0, "a tile splits into passes over the values");
  const int64_t group = p.heads / p.kv_heads, jobs = static_cast<int64_t>(p.blocks.size()) * p.kv_heads;
  // positions counted from the sequence's start: the block covers [first, last), attending to keys [0, last)
  const auto first_of = [&](int64_t block) { return p.contexts[block] + p.blocks[block]; };
  const auto last_of = [&](int64_t block) { return std::min(first_of(block) + p.block, p.totals[block]); };
  const auto cost = [&](int64_t job) {
    const int64_t block = job / p.kv_heads;
    return (last_of(block) - first_of(block)) * (last_of(block) + first_of(block));
  };
  run_costliest_first(jobs, cost, [&] {
    return [&, s = Scratch<DIM>(longest)](int64_t job) mutable {
      const int64_t block = job / p.kv_heads, kv_head = job % p.kv_heads, context = p.contexts[block];
      const int64_t first = first_of(block), last = last_of(block), cap = s.capacity;
      const int64_t* pages = p.tables + p.seqs[block] * p.most_pages;
      // q's rows hold the new positions only: position `context` is the sequence's first row there
      const int64_t start = p.starts[block] - context;
      for (int64_t t = 0; t < last; ++t) {
        const int64_t row = ((pages[t / p.page_size] * p.kv_heads + kv_head) * p.page_size + t % p.page_size) * DIM;
        const T* key = key_pool + row;
        const T* value = value_pool + row;
        for (int d = 0; d < DIM; ++d) {
          s.keys[d * cap + t] = static_cast<float>(key[d]);
          s.values[t * DIM + d] = static_cast<float>(value[d]);
        }
      }
      // the block's vectors, position after position and within one the group's heads; a last tile that is
      // not full repeats its last vector
      const int64_t vectors = (last - first) * group;
      for (int64_t tile = 0; tile < vectors; tile += kTile) {
        int64_t lengths[kTile];
        T* rows[kTile];
        for (int r = 0; r < kTile; ++r) {
          const int64_t vector = std::min(tile + r, vectors - 1), position = first + vector / group;
          const int64_t head = kv_head * group + vector % group;
          const T* query = q + (start + position) * p.q_stride + head * DIM;
          for (int d = 0; d < DIM; ++d) s.query[r * DIM + d] = static_cast<float>(query[d]) * p.scale;
          lengths[r] = position + 1;
          rows[r] = out + ((start + position) * p.heads + head) * DIM;
        }
        const int64_t end = lengths[kTile - 1];  // the tile's longest: positions only grow within it
        tile_scores<DIM>(s.query.data(), s.keys.data(), cap, end, s.scores.data());
        for (int r = 0; r < kTile; ++r) {
          float* row = s.scores.data() + r * cap;
          s.totals[r] = softmax_numerators(row, lengths[r]);
          std::fill(row + lengths[r], row + end, 0.f);
        }
        // vectors past the block's last repeat it: their rows are its row, written again with the same values
        for (int64_t r = 0; r < std::min<int64_t>(kTile, vectors - tile); r += G)
          tile_values<DIM, G>(s.scores.data() + r * cap, cap, s.values.data(), lengths[r + G - 1], s.totals.data() + r,
                              rows + r);
      }
    };
  });
}

}  // namespace

// q [tokens, heads, dim] (dim and heads contiguous; rows may be strided, as a view of a fused projection): this
// step's new positions of each sequence, packed one after another from row 0. Pools [pages, kv_heads, page_size,
// dim] already hold every sequence's keys and values, this step's included; tables [sequences, most_pages] (int64)
// its pages; lengths: its new positions; contexts: its positions before them. Returns [tokens, heads, dim]; rows
// past the last sequence come out zero.
at::Tensor prefill_attention(at::Tensor q, at::Tensor key_pool, at::Tensor value_pool, at::Tensor tables,
                             std::vector<int64_t> lengths, std::vector<int64_t> contexts, double scale) {
  TORCH_CHECK(q.dim() == 3 && key_pool.dim() == 4 && key_pool.sizes() == value_pool.sizes(),
              "q [tokens, heads, dim], pools [pages, kv_heads, page_size, dim]");
  const int64_t tokens = q.size(0), heads = q.size(1), dim = q.size(2), kv_heads = key_pool.size(1);
  TORCH_CHECK(key_pool.size(3) == dim && heads % kv_heads == 0, "the pools must match q's head size");
  TORCH_CHECK(dim == 64 || dim == 128, "head size 64 or 128, got ", dim);
  TORCH_CHECK(key_pool.scalar_type() == q.scalar_type() && value_pool.scalar_type() == q.scalar_type(), "q and the pools of one dtype");
  TORCH_CHECK(q.stride(2) == 1 && q.stride(1) == dim, "q's heads and dim must be contiguous");
  TORCH_CHECK(key_pool.is_contiguous() && value_pool.is_contiguous(), "contiguous pools");
  const int64_t sequences = static_cast<int64_t>(lengths.size());
  TORCH_CHECK(contexts.size() == lengths.size(), "one context per sequence");
  TORCH_CHECK(tables.scalar_type() == at::kLong && tables.dim() == 2 && tables.size(0) == sequences, "int64 tables [sequences, most_pages]");
  const auto t = tables.contiguous();
  const int64_t page_size = key_pool.size(2), most_pages = t.size(1);
  int64_t block = std::max(kMinBlock, kJobVectors / (heads / kv_heads));
  const auto jobs = [&](int64_t size) {
    int64_t n = 0;
    for (const int64_t length : lengths) n += (length + size - 1) / size;
    return n * kv_heads;
  };
  while (block > kMinBlock && jobs(block) < kJobsPerThread * at::get_num_threads()) block /= 2;
  Packed p{{}, {}, {}, {}, {}, heads, kv_heads, q.stride(0), page_size, most_pages, block, t.data_ptr<int64_t>(),
           static_cast<float>(scale)};
  int64_t start = 0, longest = 1;
  for (int64_t i = 0; i < sequences; ++i) {
    const int64_t n = lengths[i], context = contexts[i];
    TORCH_CHECK(n > 0 && context >= 0, "sequence lengths must be positive, contexts not negative");
    TORCH_CHECK(context + n <= most_pages * page_size, "a sequence's tables cover fewer positions than it has");
    for (int64_t first = 0; first < n; first += p.block) {
      p.seqs.push_back(i);
      p.starts.push_back(start);
      p.contexts.push_back(context);
      p.totals.push_back(context + n);
      p.blocks.push_back(first);
    }
    start += n;
    longest = std::max(longest, context + n);
  }
  TORCH_CHECK(start <= tokens, "the sequences hold ", start, " tokens, q only ", tokens);
  auto out = at::zeros({tokens, heads, dim}, q.options());
  AT_DISPATCH_FLOATING_TYPES_AND(at::ScalarType::BFloat16, q.scalar_type(), "prefill_attention", [&] {
    if constexpr (std::is_same_v<scalar_t, double>) {
      TORCH_CHECK(false, "float32 or bfloat16");
    } else if (dim == 64) {
      prefill<scalar_t, 64>(q.data_ptr<scalar_t>(), key_pool.data_ptr<scalar_t>(), value_pool.data_ptr<scalar_t>(),
                            out.data_ptr<scalar_t>(), p, longest);
    } else {
      prefill<scalar_t, 128>(q.data_ptr<scalar_t>(), key_pool.data_ptr<scalar_t>(), value_pool.data_ptr<scalar_t>(),
                             out.data_ptr<scalar_t>(), p, longest);
    }
  });
  return out;
}

}  // namespace bucketserve
