// The CPU kernels as one Python module, built on first use by bucketserve.executor.kernels.
#include <torch/extension.h>

#include <optional>

namespace bucketserve {
torch::Tensor paged_decode_attention(torch::Tensor q, torch::Tensor key_pool, torch::Tensor value_pool,
                                     torch::Tensor tables, torch::Tensor lengths, double scale);
torch::Tensor rms_norm(torch::Tensor x, std::optional<torch::Tensor> delta, torch::Tensor weight, double eps);
torch::Tensor silu_mul(torch::Tensor gate_up);
void rope_(torch::Tensor qkv, torch::Tensor cos, torch::Tensor sin, int64_t heads, int64_t dim);
}  // namespace bucketserve

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("paged_decode_attention", &bucketserve::paged_decode_attention, "decode attention over a paged KV pool");
  m.def("rms_norm", &bucketserve::rms_norm, "RMSNorm of each row, the residual add (x += delta) fused");
  m.def("silu_mul", &bucketserve::silu_mul, "silu(gate) * up of a fused gate/up projection");
  m.def("rope_", &bucketserve::rope_, "rotary embedding in place on the q and k heads of a fused qkv");
}
