// 16-float vectors (one AVX-512 register, or two or four narrower ones) through GCC/Clang vector extensions,
// shared by the CPU kernels. An older compiler fails the build and the executor falls back to torch ops.
#pragma once
#include <c10/util/BFloat16.h>

#include <cstdint>

namespace bucketserve {

typedef float Floats __attribute__((vector_size(64)));
typedef float UnalignedFloats __attribute__((vector_size(64), aligned(4)));
typedef uint16_t UnalignedHalves __attribute__((vector_size(32), aligned(2)));
typedef uint32_t Words __attribute__((vector_size(64)));
typedef int32_t Ints __attribute__((vector_size(64)));
typedef float Floats8 __attribute__((vector_size(32)));
typedef float Floats4 __attribute__((vector_size(16)));

inline Floats load16(const float* p) { return *reinterpret_cast<const UnalignedFloats*>(p); }

inline Floats load16(const c10::BFloat16* p) {  // bf16 is the upper half of a float
  const Words widened = __builtin_convertvector(*reinterpret_cast<const UnalignedHalves*>(p), Words) << 16;
  return reinterpret_cast<const Floats&>(widened);
}

inline void store16(float* p, Floats v) { *reinterpret_cast<UnalignedFloats*>(p) = v; }

inline Floats splat(float x) { return Floats{} + x; }

inline float sum16(Floats v) {  // halving in registers, not 15 dependent adds
  const Floats8 a = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) +
                    __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
  const Floats4 b = __builtin_shufflevector(a, a, 0, 1, 2, 3) + __builtin_shufflevector(a, a, 4, 5, 6, 7);
  return (b[0] + b[2]) + (b[1] + b[3]);
}

// e^x, 16 lanes at once: x = n ln2 + r with |r| <= ln2 / 2, e^r by a degree-6 polynomial (Cephes' expf
// coefficients, within 2 ulp of the exact value), 2^n added to the exponent bits. x is clamped to
// [-87, 88], so the result never overflows and is ~1e-38 rather than 0 far below.
inline Floats exp16(Floats x) {
  x = x < -87.f ? splat(-87.f) : x;
  x = x > 88.f ? splat(88.f) : x;
  const Floats scaled = x * 1.44269504088896341f;
  Floats n = __builtin_convertvector(__builtin_convertvector(scaled, Ints), Floats);
  n = scaled - n >= 0.5f ? n + 1.f : n;  // round to nearest: truncation rounds toward zero
  n = scaled - n < -0.5f ? n - 1.f : n;
  const Floats r = x - n * 0.693359375f + n * 2.12194440e-4f;
  Floats p = 1.9875691500e-4f * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const Floats e = p * r * r + r + 1.f;
  const Ints bits = reinterpret_cast<const Ints&>(e) + (__builtin_convertvector(n, Ints) << 23);
  return reinterpret_cast<const Floats&>(bits);
}

}  // namespace bucketserve
