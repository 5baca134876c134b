// The CPU kernels as one Python module, built on first use by bucketserve.executor.kernels.
// the tensor type casters alone, not all of torch/extension.h (with it the whole build took 31 s here, now 14)
#include <pybind11/stl.h>
#include <torch/csrc/utils/pybind.h>

#include <optional>
#include <vector>

namespace bucketserve {
at::Tensor paged_decode_attention(at::Tensor q, at::Tensor key_pool, at::Tensor value_pool,
                                     at::Tensor tables, at::Tensor lengths, double scale);
at::Tensor prefill_attention(at::Tensor q, at::Tensor key_pool, at::Tensor value_pool, at::Tensor tables,
                             std::vector<int64_t> lengths, std::vector<int64_t> contexts, double scale);
at::Tensor rms_norm(at::Tensor x, std::optional<at::Tensor> delta, at::Tensor weight, double eps);
at::Tensor silu_mul(at::Tensor gate_up);
void rope_(at::Tensor qkv, at::Tensor cos, at::Tensor sin, int64_t heads, int64_t dim);
void kv_write(at::Tensor key_pool, at::Tensor value_pool, at::Tensor slots, at::Tensor keys, at::Tensor values);
}  // namespace bucketserve

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  // without the GIL while they run, as torch's own ops: the threads that stream text and responses need it
  // (holding it, attention alone kept them waiting a fifth of a decode step)
  const auto no_gil = pybind11::call_guard<pybind11::gil_scoped_release>();
  m.def("paged_decode_attention", &bucketserve::paged_decode_attention, "decode attention over a paged KV pool", no_gil);
  m.def("prefill_attention", &bucketserve::prefill_attention, "causal attention of packed prompts (or chunks of them) over a paged KV pool", no_gil);
  m.def("rms_norm", &bucketserve::rms_norm, "RMSNorm of each row, the residual add (x += delta) fused", no_gil);
  m.def("silu_mul", &bucketserve::silu_mul, "silu(gate) * up of a fused gate/up projection", no_gil);
  m.def("rope_", &bucketserve::rope_, "rotary embedding in place on the q and k heads of a fused qkv", no_gil);
  m.def("kv_write", &bucketserve::kv_write, "a step's keys and values to their rows of the paged pool", no_gil);
}
