// The elementwise steps of a Llama layer, fused: each reads its input once and writes its output once,
// where torch ops take two to five passes (and a strided pass for silu on half of the gate/up output).
// float32 only; the executor uses torch ops for other dtypes.
// ATen's headers only, not torch/extension.h (module.cpp binds the functions to Python):
// each file then compiles in a fraction of the time
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <optional>

#include "vec.h"

namespace bucketserve {
namespace {

void check_rows(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() == 2 && t.is_contiguous() && t.scalar_type() == at::kFloat, name,
              " must be a contiguous 2-d float32 tensor");
}

inline float mean_square(const float* x, int64_t n) {
  Floats acc = {};
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const Floats v = load16(x + i);
    acc += v * v;
  }
  float total = sum16(acc);
  for (; i < n; ++i) total += x[i] * x[i];
  return total / static_cast<float>(n);
}

}  // namespace

// weight * (x / sqrt(mean(x^2) + eps)) per row; with delta, x += delta first, in place (the residual add)
at::Tensor rms_norm(at::Tensor x, std::optional<at::Tensor> delta, at::Tensor weight, double eps) {
  check_rows(x, "x");
  TORCH_CHECK(weight.is_contiguous() && weight.scalar_type() == at::kFloat && weight.numel() == x.size(1),
              "weight must be float32 with one value per column of x");
  if (delta) {
    check_rows(*delta, "delta");
    TORCH_CHECK(delta->sizes() == x.sizes(), "delta must have the shape of x");
  }
  auto out = at::empty_like(x);
  const int64_t n = x.size(1);
  float* xs = x.data_ptr<float>();
  const float* ds = delta ? delta->data_ptr<float>() : nullptr;
  const float* w = weight.data_ptr<float>();
  float* o = out.data_ptr<float>();
  const float epsilon = static_cast<float>(eps);
  at::parallel_for(0, x.size(0), 8, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      float* r = xs + row * n;
      if (ds != nullptr) {
        const float* d = ds + row * n;
        int64_t i = 0;
        for (; i + 16 <= n; i += 16) store16(r + i, load16(r + i) + load16(d + i));
        for (; i < n; ++i) r[i] += d[i];
      }
      const float inverse = 1.f / std::sqrt(mean_square(r, n) + epsilon);
      float* out_row = o + row * n;
      int64_t i = 0;
      for (; i + 16 <= n; i += 16) store16(out_row + i, load16(w + i) * (load16(r + i) * inverse));
      for (; i < n; ++i) out_row[i] = w[i] * (r[i] * inverse);
    }
  });
  return out;
}

// gate_up [tokens, 2 x inter] -> silu(gate) * up [tokens, inter]
at::Tensor silu_mul(at::Tensor gate_up) {
  check_rows(gate_up, "gate_up");
  TORCH_CHECK(gate_up.size(1) % 2 == 0, "gate_up must have an even number of columns");
  const int64_t n = gate_up.size(1) / 2;
  auto out = at::empty({gate_up.size(0), n}, gate_up.options());
  const float* in = gate_up.data_ptr<float>();
  float* o = out.data_ptr<float>();
  at::parallel_for(0, gate_up.size(0), 4, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const float* gate = in + row * 2 * n;
      const float* up = gate + n;
      float* out_row = o + row * n;
      int64_t i = 0;
      for (; i + 16 <= n; i += 16) {
        const Floats g = load16(gate + i);
        store16(out_row + i, g / (1.f + exp16(-g)) * load16(up + i));
      }
      for (; i < n; ++i) out_row[i] = gate[i] / (1.f + std::exp(-gate[i])) * up[i];
    }
  });
  return out;
}

// Rotary embedding in place on the first `heads` heads of each row of qkv [tokens, >= heads x dim]:
// x * cos + rotate_half(x) * sin, as transformers computes it; cos and sin [tokens, dim]
void rope_(at::Tensor qkv, at::Tensor cos, at::Tensor sin, int64_t heads, int64_t dim) {
  check_rows(qkv, "qkv");
  check_rows(cos, "cos");
  check_rows(sin, "sin");
  TORCH_CHECK(dim % 2 == 0 && heads * dim <= qkv.size(1) && cos.size(1) == dim && sin.size(1) == dim &&
              cos.size(0) == qkv.size(0) && sin.size(0) == qkv.size(0), "rope_: shapes do not match");
  const int64_t half = dim / 2, width = qkv.size(1);
  float* x = qkv.data_ptr<float>();
  const float* c = cos.data_ptr<float>();
  const float* s = sin.data_ptr<float>();
  at::parallel_for(0, qkv.size(0), 8, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const float* cr = c + row * dim;
      const float* sr = s + row * dim;
      for (int64_t head = 0; head < heads; ++head) {
        float* h = x + row * width + head * dim;
        int64_t i = 0;
        for (; i + 16 <= half; i += 16) {
          const Floats a = load16(h + i), b = load16(h + half + i);
          store16(h + i, a * load16(cr + i) + (-b) * load16(sr + i));
          store16(h + half + i, b * load16(cr + half + i) + a * load16(sr + half + i));
        }
        for (; i < half; ++i) {
          const float a = h[i], b = h[half + i];
          h[i] = a * cr[i] + (-b) * sr[i];
          h[half + i] = b * cr[half + i] + a * sr[half + i];
        }
      }
    }
  });
}

}  // namespace bucketserve
