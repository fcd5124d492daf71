// activation.cu -- element-wise activations and their backward pass.
//
//   act_fwd: y[i]  = tessera_act(act, x[i])                 for i < n   (y may equal x)
//   act_bwd: dx[i] = dy[i] * tessera_act_grad(act, z[i])    for i < n   (dx may equal dy or z)
// `act` is one of the TESSERA_ACT_* codes in common.cuh (an unknown code writes NaN); z is the
// pre-activation saved by the forward pass.
//
// Layout: flat contiguous f32 arrays of n elements (n >= 0; n may exceed 2^31).
// Launch: block (TESSERA_EW_THREADS,1,1) = 256, any grid (grid-stride loops).
//
// Versions inside: a float4 grid-stride loop when every pointer is 16-byte aligned (a
// launch-uniform test), whose scalar tail covers the last n % 4 elements; otherwise a scalar
// grid-stride loop. The activation code is dispatched once per launch to a loop specialised for it.
// Each element is read and written by the same thread, so the in-place aliasing above is safe.
#include "common.cuh"

namespace {

template <int ACT>
__device__ __forceinline__ void act_fwd_loop(long long n, const float* x, float* y) {
  const long long tid = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  const long long stride = (long long)gridDim.x * blockDim.x;
  long long done = 0;
  if (tessera_aligned16(x) && tessera_aligned16(y)) {
    const long long n4 = n >> 2;
    const float4* x4 = reinterpret_cast<const float4*>(x);
    float4* y4 = reinterpret_cast<float4*>(y);
    for (long long i = tid; i < n4; i += stride) {
      float4 v = x4[i];
      v.x = tessera_act_c<ACT>(v.x);
      v.y = tessera_act_c<ACT>(v.y);
      v.z = tessera_act_c<ACT>(v.z);
      v.w = tessera_act_c<ACT>(v.w);
      y4[i] = v;
    }
    done = n4 << 2;
  }
  for (long long i = done + tid; i < n; i += stride) y[i] = tessera_act_c<ACT>(x[i]);
}

template <int ACT>
__device__ __forceinline__ void act_bwd_loop(long long n, const float* z, const float* dy, float* dx) {
  const long long tid = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  const long long stride = (long long)gridDim.x * blockDim.x;
  long long done = 0;
  if (tessera_aligned16(z) && tessera_aligned16(dy) && tessera_aligned16(dx)) {
    const long long n4 = n >> 2;
    const float4* z4 = reinterpret_cast<const float4*>(z);
    const float4* dy4 = reinterpret_cast<const float4*>(dy);
    float4* dx4 = reinterpret_cast<float4*>(dx);
    for (long long i = tid; i < n4; i += stride) {
      const float4 zv = z4[i];
      float4 g = dy4[i];
      g.x *= tessera_act_grad_c<ACT>(zv.x);
      g.y *= tessera_act_grad_c<ACT>(zv.y);
      g.z *= tessera_act_grad_c<ACT>(zv.z);
      g.w *= tessera_act_grad_c<ACT>(zv.w);
      dx4[i] = g;
    }
    done = n4 << 2;
  }
  for (long long i = done + tid; i < n; i += stride) dx[i] = dy[i] * tessera_act_grad_c<ACT>(z[i]);
}

}  // namespace

extern "C" __global__ __launch_bounds__(256) void act_fwd(int act, long long n, const float* x, float* y) {
  switch (act) {
    case TESSERA_ACT_NONE: act_fwd_loop<TESSERA_ACT_NONE>(n, x, y); break;
    case TESSERA_ACT_RELU: act_fwd_loop<TESSERA_ACT_RELU>(n, x, y); break;
    case TESSERA_ACT_GELU_TANH: act_fwd_loop<TESSERA_ACT_GELU_TANH>(n, x, y); break;
    case TESSERA_ACT_GELU_ERF: act_fwd_loop<TESSERA_ACT_GELU_ERF>(n, x, y); break;
    case TESSERA_ACT_SILU: act_fwd_loop<TESSERA_ACT_SILU>(n, x, y); break;
    default: act_fwd_loop<-1>(n, x, y); break;  // unknown code: NaN
  }
}

extern "C" __global__ __launch_bounds__(256) void act_bwd(int act, long long n, const float* z, const float* dy, float* dx) {
  switch (act) {
    case TESSERA_ACT_NONE: act_bwd_loop<TESSERA_ACT_NONE>(n, z, dy, dx); break;
    case TESSERA_ACT_RELU: act_bwd_loop<TESSERA_ACT_RELU>(n, z, dy, dx); break;
    case TESSERA_ACT_GELU_TANH: act_bwd_loop<TESSERA_ACT_GELU_TANH>(n, z, dy, dx); break;
    case TESSERA_ACT_GELU_ERF: act_bwd_loop<TESSERA_ACT_GELU_ERF>(n, z, dy, dx); break;
    case TESSERA_ACT_SILU: act_bwd_loop<TESSERA_ACT_SILU>(n, z, dy, dx); break;
    default: act_bwd_loop<-1>(n, z, dy, dx); break;  // unknown code: NaN
  }
}
