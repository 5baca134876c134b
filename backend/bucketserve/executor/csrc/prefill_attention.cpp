// Causal attention of packed prompts (one after another, no padding), for the CPU: every position's query
// heads of a group against the keys and values of its own sequence up to itself, through GroupAttention
// (attention.h). torch's flash SDPA, run once per sequence, reached about 50 GFLOP/s on these shapes here.
// A job is one sequence's kv head over a block of its positions; it first copies the keys and values it
// reads into contiguous scratch (they sit kv_heads apart in the packed projection), then attends each
// position of the block in turn.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/zeros.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "attention.h"

namespace bucketserve {
namespace {

constexpr int64_t kBlock = 64;  // positions per job: enough jobs to share among threads, few key copies

struct Packed {
  std::vector<int64_t> starts, lengths, blocks;  // per job: its sequence's start and length, its first position
  int64_t heads, kv_heads, q_stride, k_stride, v_stride;
  float scale;
};

template <typename T, int DIM>
void prefill(const T* __restrict q, const T* __restrict k, const T* __restrict v, T* __restrict out, const Packed& p,
             int64_t longest) {
  const int64_t group = p.heads / p.kv_heads, jobs = static_cast<int64_t>(p.blocks.size()) * p.kv_heads;
  const auto end_of = [&](int64_t block) { return std::min(p.blocks[block] + kBlock, p.lengths[block]); };
  const auto cost = [&](int64_t job) {
    const int64_t block = job / p.kv_heads;
    return (end_of(block) - p.blocks[block]) * (end_of(block) + p.blocks[block]);
  };
  run_costliest_first(jobs, cost, [&] {
    return [&, attend = GroupAttention<DIM, T>(group), keys = std::vector<T>(longest * DIM),
            values = std::vector<T>(longest * DIM)](int64_t job) mutable {
      const int64_t block = job / p.kv_heads, kv_head = job % p.kv_heads, start = p.starts[block];
      const int64_t first = p.blocks[block], last = end_of(block);
      for (int64_t t = 0; t < last; ++t) {
        std::memcpy(keys.data() + t * DIM, k + (start + t) * p.k_stride + kv_head * DIM, DIM * sizeof(T));
        std::memcpy(values.data() + t * DIM, v + (start + t) * p.v_stride + kv_head * DIM, DIM * sizeof(T));
      }
      const int64_t page = 0;  // the scratch is one block of `last` positions
      for (int64_t i = first; i < last; ++i)
        attend(q + (start + i) * p.q_stride + kv_head * group * DIM, p.scale, i + 1, keys.data(), values.data(), &page,
               last, 1, 0, out + ((start + i) * p.heads + kv_head * group) * DIM);
    };
  });
}

}  // namespace

// q [tokens, heads, dim], k and v [tokens, kv_heads, dim] (dim and heads contiguous; rows may be strided, as
// views of a fused projection); lengths: the sequences packed one after another from row 0. Returns
// [tokens, heads, dim]; rows past the last sequence come out zero.
at::Tensor prefill_attention(at::Tensor q, at::Tensor k, at::Tensor v, std::vector<int64_t> lengths, double scale) {
  TORCH_CHECK(q.dim() == 3 && k.dim() == 3 && k.sizes() == v.sizes(), "q [tokens, heads, dim], k and v [tokens, kv_heads, dim]");
  const int64_t tokens = q.size(0), heads = q.size(1), dim = q.size(2), kv_heads = k.size(1);
  TORCH_CHECK(k.size(0) == tokens && k.size(2) == dim && heads % kv_heads == 0, "k and v must match q's tokens and dim");
  TORCH_CHECK(dim == 64 || dim == 128, "head size 64 or 128, got ", dim);
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(), "q, k and v of one dtype");
  for (const auto& t : {q, k, v})
    TORCH_CHECK(t.stride(2) == 1 && t.stride(1) == dim, "heads and dim must be contiguous");
  Packed p{{}, {}, {}, heads, kv_heads, q.stride(0), k.stride(0), v.stride(0), static_cast<float>(scale)};
  int64_t start = 0, longest = 1;
  for (const int64_t n : lengths) {
    TORCH_CHECK(n > 0, "sequence lengths must be positive");
    for (int64_t first = 0; first < n; first += kBlock) {
      p.starts.push_back(start);
      p.lengths.push_back(n);
      p.blocks.push_back(first);
    }
    start += n;
    longest = std::max(longest, n);
  }
  TORCH_CHECK(start <= tokens, "the sequences hold ", start, " tokens, q only ", tokens);
  auto out = at::zeros({tokens, heads, dim}, q.options());
  AT_DISPATCH_FLOATING_TYPES_AND(at::ScalarType::BFloat16, q.scalar_type(), "prefill_attention", [&] {
    if constexpr (std::is_same_v<scalar_t, double>) {
      TORCH_CHECK(false, "float32 or bfloat16");
    } else if (dim == 64) {
      prefill<scalar_t, 64>(q.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), p, longest);
    } else {
      prefill<scalar_t, 128>(q.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), p, longest);
    }
  });
  return out;
}

}  // namespace bucketserve
