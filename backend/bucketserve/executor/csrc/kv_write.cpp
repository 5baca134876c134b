// A step's KV write in one pass: each token's key and value heads go straight from the fused qkv projection's
// output (strided views into it) to their pool rows. torch's index_copy_ needs contiguous sources, so it took
// two passes: a copy of each strided view, then the scatter.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cstring>

namespace bucketserve {

// pools [pages, kv_heads, page_size, dim]; keys, values [tokens, kv_heads, dim], dim contiguous;
// slots [tokens * kv_heads]: the pool row (of dim values) of each token's head, token-major
void kv_write(at::Tensor key_pool, at::Tensor value_pool, at::Tensor slots, at::Tensor keys, at::Tensor values) {
  TORCH_CHECK(key_pool.is_contiguous() && value_pool.is_contiguous() && key_pool.sizes() == value_pool.sizes(),
              "the key and value pools must be contiguous and of one shape");
  TORCH_CHECK(keys.dim() == 3 && keys.sizes() == values.sizes(), "keys and values must be [tokens, kv_heads, dim]");
  TORCH_CHECK(keys.stride(2) == 1 && values.stride(2) == 1, "keys and values must be contiguous along dim");
  TORCH_CHECK(keys.scalar_type() == key_pool.scalar_type() && values.scalar_type() == key_pool.scalar_type() &&
                  value_pool.scalar_type() == key_pool.scalar_type(),
              "keys, values and the pools must have one dtype");
  TORCH_CHECK(key_pool.dim() == 4 && key_pool.size(1) == keys.size(1) && key_pool.size(3) == keys.size(2),
              "the pools' kv_heads and dim must match the keys'");
  const int64_t tokens = keys.size(0), heads = keys.size(1), dim = keys.size(2);
  TORCH_CHECK(slots.scalar_type() == at::kLong && slots.is_contiguous() && slots.numel() == tokens * heads,
              "slots must be contiguous int64, one per token and kv head");
  const int64_t pool_rows = key_pool.numel() / dim;
  const int64_t* slot = slots.data_ptr<int64_t>();
  for (int64_t i = 0; i < slots.numel(); ++i) {
    TORCH_CHECK(slot[i] >= 0 && slot[i] < pool_rows, "slot ", slot[i], " is outside the pool (", pool_rows, " rows)");
  }
  const int64_t item = keys.element_size(), row_bytes = dim * item;
  char* kp = static_cast<char*>(key_pool.data_ptr());
  char* vp = static_cast<char*>(value_pool.data_ptr());
  const char* ks = static_cast<const char*>(keys.data_ptr());
  const char* vs = static_cast<const char*>(values.data_ptr());
  const int64_t k0 = keys.stride(0) * item, k1 = keys.stride(1) * item;
  const int64_t v0 = values.stride(0) * item, v1 = values.stride(1) * item;
  at::parallel_for(0, tokens, 64, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      for (int64_t h = 0; h < heads; ++h) {
        const int64_t row = slot[t * heads + h];
        std::memcpy(kp + row * row_bytes, ks + t * k0 + h * k1, row_bytes);
        std::memcpy(vp + row * row_bytes, vs + t * v0 + h * v1, row_bytes);
      }
    }
  });
}

}  // namespace bucketserve
