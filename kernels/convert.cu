// convert.cu -- conversions between f32 and the 16-bit floats (bf16 and f16), element-wise.
//
//   f32_to_bf16(n, x, y): y[i] = bf16 bits of x[i], rounded to nearest, ties to even; a NaN
//                         stays a NaN (quiet, sign and top payload kept); overflow rounds to inf.
//   bf16_to_f32(n, x, y): y[i] = the f32 of bf16 bits x[i] (exact).
//   f32_to_f16(n, x, y):  y[i] = IEEE binary16 bits of x[i], rounded to nearest, ties to even,
//                         subnormals kept, overflow to inf, NaN quiet with its top payload.
//   f16_to_f32(n, x, y):  y[i] = the f32 of binary16 bits x[i] (exact; subnormals too).
// The 16-bit values are held as their bits (unsigned short): the same bits as the `half`
// crate's bf16 and f16 on the host, and as __float2bfloat16_rn / __float2half_rn, written out
// so that the simulator runs the same code.
//
// Layout: flat contiguous arrays of n elements (n >= 0; n may exceed 2^31).
// Launch: block (TESSERA_EW_THREADS,1,1) = 256, any grid (grid-stride loops).
#include "common.cuh"

namespace {

__device__ __forceinline__ unsigned short f32_bf16(float f) {
  unsigned int u = __float_as_uint(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return (unsigned short)((u >> 16) | 0x0040u);
  u += 0x7fffu + ((u >> 16) & 1u);
  return (unsigned short)(u >> 16);
}

__device__ __forceinline__ unsigned short f32_f16(float f) {
  const unsigned int x = __float_as_uint(f);
  const unsigned int sign = (x >> 16) & 0x8000u;
  const unsigned int exp = x & 0x7f800000u;
  const unsigned int man = x & 0x007fffffu;
  if (exp == 0x7f800000u) return (unsigned short)(sign | 0x7c00u | (man != 0u ? 0x0200u : 0u) | (man >> 13));
  const int half_exp = (int)(exp >> 23) - 127 + 15;
  if (half_exp >= 0x1f) return (unsigned short)(sign | 0x7c00u);
  if (half_exp <= 0) {
    if (14 - half_exp > 24) return (unsigned short)sign;
    const unsigned int m = man | 0x00800000u;
    unsigned int half_man = m >> (14 - half_exp);
    const unsigned int round_bit = 1u << (13 - half_exp);
    if ((m & round_bit) != 0u && (m & (3u * round_bit - 1u)) != 0u) half_man += 1u;
    return (unsigned short)(sign | half_man);
  }
  const unsigned int bits = sign | ((unsigned int)half_exp << 10) | (man >> 13);
  const unsigned int round_bit = 0x00001000u;
  return (unsigned short)((man & round_bit) != 0u && (man & (3u * round_bit - 1u)) != 0u ? bits + 1u : bits);
}

__device__ __forceinline__ float f16_f32(unsigned short h) {
  const unsigned int sign = ((unsigned int)h & 0x8000u) << 16;
  const unsigned int exp = (unsigned int)h & 0x7c00u;
  const unsigned int man = (unsigned int)h & 0x03ffu;
  if (exp == 0x7c00u) return __uint_as_float(sign | 0x7f800000u | (man != 0u ? 0x00400000u | (man << 13) : 0u));
  if (exp == 0u) {
    // A subnormal (or zero): man * 2^-24, exact in f32.
    const float v = (float)man * 5.9604644775390625e-8f;
    return __uint_as_float(sign | __float_as_uint(v));
  }
  return __uint_as_float(sign | ((exp + (112u << 10)) << 13) | (man << 13));
}

}  // namespace

extern "C" __global__ __launch_bounds__(256) void f32_to_bf16(long long n, const float* x, unsigned short* y) {
  const long long stride = (long long)gridDim.x * blockDim.x;
  for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) y[i] = f32_bf16(x[i]);
}

extern "C" __global__ __launch_bounds__(256) void bf16_to_f32(long long n, const unsigned short* x, float* y) {
  const long long stride = (long long)gridDim.x * blockDim.x;
  for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride)
    y[i] = __uint_as_float((unsigned int)x[i] << 16);
}

extern "C" __global__ __launch_bounds__(256) void f32_to_f16(long long n, const float* x, unsigned short* y) {
  const long long stride = (long long)gridDim.x * blockDim.x;
  for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) y[i] = f32_f16(x[i]);
}

extern "C" __global__ __launch_bounds__(256) void f16_to_f32(long long n, const unsigned short* x, float* y) {
  const long long stride = (long long)gridDim.x * blockDim.x;
  for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) y[i] = f16_f32(x[i]);
}
