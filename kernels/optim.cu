// optim.cu -- optimizer updates, one fused pass over a flat parameter buffer.
//
//   sgd_step:   gg = grad_scale * g[i] + weight_decay * w[i]
//               mom[i] = momentum * mom[i] + gg
//               w[i]  -= lr * mom[i]
//   adamw_step: gg = grad_scale * g[i]
//               m[i] = beta1 * m[i] + (1 - beta1) * gg
//               v[i] = beta2 * v[i] + (1 - beta2) * gg * gg
//               w[i] = w[i] * decay - step * m[i] / (sqrtf(v[i] * inv_bc2) + eps)
//               with decay = 1 - lr * weight_decay, step = lr / (1 - beta1^t) and
//               inv_bc2 = 1 / (1 - beta2^t) computed on the host in double (t = step, from 1):
//               one division per element instead of three.
// grad_scale folds in gradient averaging and global-norm clipping (1 when unused).
//
// Layout: w, g, mom / m, v are flat contiguous f32 arrays of n elements (n >= 0, may exceed
// 2^31), distinct buffers (no aliasing between them).
// Launch: block (TESSERA_EW_THREADS,1,1) = 256, any grid (grid-stride).
// Versions inside: a float4 loop when every pointer is 16-byte aligned (launch-uniform test),
// then a scalar tail for the last n % 4 elements; otherwise the scalar loop throughout. Both
// paths apply the same per-element function.
#include "common.cuh"

namespace {

__device__ __forceinline__ void sgd_elem(float lr, float momentum, float weight_decay, float grad_scale,
                                         float& w, float g, float& mom) {
  const float gg = grad_scale * g + weight_decay * w;
  mom = momentum * mom + gg;
  w -= lr * mom;
}

__device__ __forceinline__ void adamw_elem(float decay, float beta1, float beta2, float eps,
                                           float step, float inv_bc2, float grad_scale,
                                           float& w, float g, float& m, float& v) {
  const float gg = grad_scale * g;
  m = beta1 * m + (1.0f - beta1) * gg;
  v = beta2 * v + (1.0f - beta2) * gg * gg;
  w = w * decay - step * m / (sqrtf(v * inv_bc2) + eps);
}

}  // namespace

extern "C" __global__ __launch_bounds__(256) void sgd_step(long long n, float lr, float momentum, float weight_decay, float grad_scale, float* w, const float* g, float* mom) {
  const long long tid = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  const long long stride = (long long)gridDim.x * blockDim.x;
  long long done = 0;
  if (tessera_aligned16(w) && tessera_aligned16(g) && tessera_aligned16(mom)) {
    const long long n4 = n >> 2;
    float4* w4 = reinterpret_cast<float4*>(w);
    const float4* g4 = reinterpret_cast<const float4*>(g);
    float4* m4 = reinterpret_cast<float4*>(mom);
    for (long long i = tid; i < n4; i += stride) {
      float4 wv = w4[i];
      const float4 gv = g4[i];
      float4 mv = m4[i];
      sgd_elem(lr, momentum, weight_decay, grad_scale, wv.x, gv.x, mv.x);
      sgd_elem(lr, momentum, weight_decay, grad_scale, wv.y, gv.y, mv.y);
      sgd_elem(lr, momentum, weight_decay, grad_scale, wv.z, gv.z, mv.z);
      sgd_elem(lr, momentum, weight_decay, grad_scale, wv.w, gv.w, mv.w);
      w4[i] = wv;
      m4[i] = mv;
    }
    done = n4 << 2;
  }
  for (long long i = done + tid; i < n; i += stride) {
    float wv = w[i], mv = mom[i];
    sgd_elem(lr, momentum, weight_decay, grad_scale, wv, g[i], mv);
    w[i] = wv;
    mom[i] = mv;
  }
}

extern "C" __global__ __launch_bounds__(256) void adamw_step(long long n, float decay, float beta1, float beta2, float eps, float step, float inv_bc2, float grad_scale, float* w, const float* g, float* m, float* v) {
  const long long tid = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  const long long stride = (long long)gridDim.x * blockDim.x;
  long long done = 0;
  if (tessera_aligned16(w) && tessera_aligned16(g) && tessera_aligned16(m) && tessera_aligned16(v)) {
    const long long n4 = n >> 2;
    float4* w4 = reinterpret_cast<float4*>(w);
    const float4* g4 = reinterpret_cast<const float4*>(g);
    float4* m4 = reinterpret_cast<float4*>(m);
    float4* v4 = reinterpret_cast<float4*>(v);
    for (long long i = tid; i < n4; i += stride) {
      float4 wv = w4[i];
      const float4 gv = g4[i];
      float4 mv = m4[i];
      float4 vv = v4[i];
      adamw_elem(decay, beta1, beta2, eps, step, inv_bc2, grad_scale, wv.x, gv.x, mv.x, vv.x);
      adamw_elem(decay, beta1, beta2, eps, step, inv_bc2, grad_scale, wv.y, gv.y, mv.y, vv.y);
      adamw_elem(decay, beta1, beta2, eps, step, inv_bc2, grad_scale, wv.z, gv.z, mv.z, vv.z);
      adamw_elem(decay, beta1, beta2, eps, step, inv_bc2, grad_scale, wv.w, gv.w, mv.w, vv.w);
      w4[i] = wv;
      m4[i] = mv;
      v4[i] = vv;
    }
    done = n4 << 2;
  }
  for (long long i = done + tid; i < n; i += stride) {
    float wv = w[i], mv = m[i], vv = v[i];
    adamw_elem(decay, beta1, beta2, eps, step, inv_bc2, grad_scale, wv, g[i], mv, vv);
    w[i] = wv;
    m[i] = mv;
    v[i] = vv;
  }
}
