// reduce.cu -- gradient reductions, vector updates and deterministic sums (plus the MSE loss,
// whose forward pass is a sum of squares).
//
//   col_sum(rows, cols, x, beta, out)        out[j] = (beta != 0 ? beta * out[j] : 0) + sum_i x[i*cols + j]
//       (the bias gradient of a rows x cols row-major matrix). Launch: block (TESSERA_COLSUM_COLS,
//       TESSERA_COLSUM_ROWS, 1) = (32, 8, 1), grid (ceil(cols / 32), 1, 1). Thread (tx, ty) sums rows
//       ty, ty+8, ty+16, ... of column blockIdx.x*32 + tx into four accumulators (rows in turn), then
//       one thread per column adds the 8 partials in order ty = 0..7. Fixed order, no atomics:
//       the result depends only on rows, cols and the data. When beta == 0, out is not read.
//   col_sum_seg(rows, cols, x, partials)   partials[s*cols + j] = sum of x[i*cols + j] over the rows i of
//       segment s = [s*TESSERA_COLSUM_SEG, (s+1)*TESSERA_COLSUM_SEG) that exist. Launch: block (32, 8, 1),
//       grid (ceil(cols / 32), ceil(rows / TESSERA_COLSUM_SEG), 1); the same per-thread order as
//       col_sum within the segment. The host then runs col_sum over the segments x cols partials:
//       for tall inputs (rows >= TESSERA_COLSUM_TWO_PASS_ROWS) the grid has ceil(rows / 64) times
//       the blocks, enough to keep every SM's loads in flight. The choice and the segments depend
//       only on rows, so the result still depends only on rows, cols and the data.
//   sum_scaled(k, n, srcs, scale, out)       out[i] = scale * (srcs[0][i] + srcs[1][i] + ... + srcs[k-1][i]),
//       added left to right. srcs is a device array of k device pointers; out may alias srcs[0]
//       (each element is read and written by the same thread). k = 0 writes zeros.
//   axpy(n, a, x, y)                         y[i] += a * x[i]
//   scale(n, a, x)                           x[i] *= a
//   mse_bwd(n, scale, pred, target, dpred)   dpred[i] = scale * (pred[i] - target[i])  (dpred may alias pred)
//       These four: block (TESSERA_EW_THREADS,1,1) = 256, any grid (grid-stride); a float4 loop
//       when every pointer is 16-byte aligned (launch-uniform test) plus a scalar tail.
//   partial_sum(n, squared, x, partials)     partials[b] = sum over block b's grid-stride elements of
//                                            (squared ? x*x : x)
//   mse_partial(n, pred, target, partials)   the same with (pred - target)^2
//       Launch: exactly grid (TESSERA_REDUCE_BLOCKS,1,1) = 512, block (TESSERA_REDUCE_THREADS,1,1) = 256.
//       Thread t of block b adds elements e = b*256 + t, e + G, e + 2G, ... (G = 512*256) in that
//       order into one accumulator (loads are issued 8 at a time, the adds stay in order), then the
//       block sums its 256 values with a fixed shuffle tree. Scalar loads on purpose: the order
//       must not depend on the pointer's alignment, so the result depends only on n and the data.
//   final_sum(m, partials, scale, out)       out[0] = scale * sum_{i<m} partials[i]
//       Launch: grid (1,1,1), block (TESSERA_REDUCE_THREADS,1,1). Same fixed order as partial_sum
//       (thread t adds t, t+256, ...; then the shuffle tree). Any m >= 1 (m = 0 writes 0).
//
// Layout: flat contiguous f32 arrays; n (long long) may exceed 2^31; rows * cols may too.
#include "common.cuh"

namespace {

// Grid-stride thread accumulation in a fixed order. term(i) yields the term for element i.
template <typename Term>
__device__ __forceinline__ float strided_sum(long long n, long long start, long long stride, Term term) {
  float acc = 0.0f;
  long long i = start;
  // Eight independent loads in flight, added strictly in index order.
  for (; i + 7 * stride < n; i += 8 * stride) {
    float t[8];
#pragma unroll
    for (int u = 0; u < 8; ++u) t[u] = term(i + u * stride);
#pragma unroll
    for (int u = 0; u < 8; ++u) acc += t[u];
  }
  for (; i < n; i += stride) acc += term(i);
  return acc;
}

// The sum of rows [r0, r1) of column j (j < cols) of a row-major matrix, for a (32, 8) block:
// thread (tx, ty) adds rows r0+ty, r0+ty+8, ... into four accumulators (rows in turn), the
// block's 8 partials of each column meet in `part`, and thread (tx, 0) returns their sum in
// order ty = 0..7 (other threads return 0). Fixed order: the result depends only on the rows,
// the columns and the data.
__device__ __forceinline__ float column_segment_sum(int r0, int r1, int cols, const float* x, int j,
                                                    float (*part)[TESSERA_COLSUM_COLS + 1]) {
  const int tx = threadIdx.x, ty = threadIdx.y;
  float s = 0.0f;
  if (j < cols) {
    const long long step = (long long)cols * TESSERA_COLSUM_ROWS;
    const float* p = x + (long long)(r0 + ty) * cols + j;
    float s0 = 0.0f, s1 = 0.0f, s2 = 0.0f, s3 = 0.0f;
    int i = r0 + ty;
    for (; i + 3 * TESSERA_COLSUM_ROWS < r1; i += 4 * TESSERA_COLSUM_ROWS) {
      s0 += __ldg(p);
      s1 += __ldg(p + step);
      s2 += __ldg(p + 2 * step);
      s3 += __ldg(p + 3 * step);
      p += 4 * step;
    }
    for (; i < r1; i += TESSERA_COLSUM_ROWS) {
      s0 += __ldg(p);
      p += step;
    }
    s = (s0 + s1) + (s2 + s3);
  }
  part[ty][tx] = s;
  __syncthreads();
  float t = 0.0f;
  if (ty == 0 && j < cols) {
    t = part[0][tx];
#pragma unroll
    for (int r = 1; r < TESSERA_COLSUM_ROWS; ++r) t += part[r][tx];
  }
  return t;
}

}  // namespace

extern "C" __global__ __launch_bounds__(256) void col_sum(int rows, int cols, const float* x, float beta, float* out) {
  __shared__ float part[TESSERA_COLSUM_ROWS][TESSERA_COLSUM_COLS + 1];
  const int j = blockIdx.x * TESSERA_COLSUM_COLS + threadIdx.x;
  const float t = column_segment_sum(0, rows, cols, x, j, part);
  if (threadIdx.y == 0 && j < cols) out[j] = beta != 0.0f ? beta * out[j] + t : t;
}

extern "C" __global__ __launch_bounds__(256) void col_sum_seg(int rows, int cols, const float* x, float* partials) {
  __shared__ float part[TESSERA_COLSUM_ROWS][TESSERA_COLSUM_COLS + 1];
  const int j = blockIdx.x * TESSERA_COLSUM_COLS + threadIdx.x;
  const int r0 = blockIdx.y * TESSERA_COLSUM_SEG;
  const float t = column_segment_sum(r0, min(rows, r0 + TESSERA_COLSUM_SEG), cols, x, j, part);
  if (threadIdx.y == 0 && j < cols) partials[(long long)blockIdx.y * cols + j] = t;
}

extern "C" __global__ __launch_bounds__(256) void sum_scaled(int k, long long n, const float* const* srcs, float scale, float* out) {
  const long long tid = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  const long long stride = (long long)gridDim.x * blockDim.x;
  bool vec = tessera_aligned16(out);
  for (int t = 0; t < k; ++t) vec = vec && tessera_aligned16(srcs[t]);
  long long done = 0;
  if (vec) {
    const long long n4 = n >> 2;
    for (long long i = tid; i < n4; i += stride) {
      float4 s = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
      if (k > 0) {
        s = reinterpret_cast<const float4*>(srcs[0])[i];
        for (int t = 1; t < k; ++t) {
          const float4 v = reinterpret_cast<const float4*>(srcs[t])[i];
          s.x += v.x; s.y += v.y; s.z += v.z; s.w += v.w;
        }
      }
      s.x *= scale; s.y *= scale; s.z *= scale; s.w *= scale;
      reinterpret_cast<float4*>(out)[i] = s;
    }
    done = n4 << 2;
  }
  for (long long i = done + tid; i < n; i += stride) {
    float s = 0.0f;
    if (k > 0) {
      s = srcs[0][i];
      for (int t = 1; t < k; ++t) s += srcs[t][i];
    }
    out[i] = scale * s;
  }
}

extern "C" __global__ __launch_bounds__(256) void axpy(long long n, float a, const float* x, float* y) {
  const long long tid = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  const long long stride = (long long)gridDim.x * blockDim.x;
  long long done = 0;
  if (tessera_aligned16(x) && tessera_aligned16(y)) {
    const long long n4 = n >> 2;
    const float4* x4 = reinterpret_cast<const float4*>(x);
    float4* y4 = reinterpret_cast<float4*>(y);
    for (long long i = tid; i < n4; i += stride) {
      const float4 xv = x4[i];
      float4 yv = y4[i];
      yv.x += a * xv.x; yv.y += a * xv.y; yv.z += a * xv.z; yv.w += a * xv.w;
      y4[i] = yv;
    }
    done = n4 << 2;
  }
  for (long long i = done + tid; i < n; i += stride) y[i] += a * x[i];
}

extern "C" __global__ __launch_bounds__(256) void scale(long long n, float a, float* x) {
  const long long tid = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  const long long stride = (long long)gridDim.x * blockDim.x;
  long long done = 0;
  if (tessera_aligned16(x)) {
    const long long n4 = n >> 2;
    float4* x4 = reinterpret_cast<float4*>(x);
    for (long long i = tid; i < n4; i += stride) {
      float4 v = x4[i];
      v.x *= a; v.y *= a; v.z *= a; v.w *= a;
      x4[i] = v;
    }
    done = n4 << 2;
  }
  for (long long i = done + tid; i < n; i += stride) x[i] *= a;
}

extern "C" __global__ __launch_bounds__(256) void partial_sum(long long n, int squared, const float* x, float* partials) {
  __shared__ float scratch[32];
  const long long start = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  const long long stride = (long long)gridDim.x * blockDim.x;
  float acc;
  if (squared) {
    acc = strided_sum(n, start, stride, [=](long long i) { const float v = __ldg(x + i); return v * v; });
  } else {
    acc = strided_sum(n, start, stride, [=](long long i) { return __ldg(x + i); });
  }
  const float total = tessera_block_sum<TESSERA_REDUCE_THREADS>(acc, scratch);
  if (threadIdx.x == 0) partials[blockIdx.x] = total;
}

extern "C" __global__ __launch_bounds__(256) void final_sum(int m, const float* partials, float scale, float* out) {
  __shared__ float scratch[32];
  const float acc = strided_sum((long long)m, (long long)threadIdx.x, (long long)blockDim.x,
                                [=](long long i) { return __ldg(partials + i); });
  const float total = tessera_block_sum<TESSERA_REDUCE_THREADS>(acc, scratch);
  if (threadIdx.x == 0) out[0] = scale * total;
}

extern "C" __global__ __launch_bounds__(256) void mse_partial(long long n, const float* pred, const float* target, float* partials) {
  __shared__ float scratch[32];
  const long long start = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  const long long stride = (long long)gridDim.x * blockDim.x;
  const float acc = strided_sum(n, start, stride, [=](long long i) {
    const float d = __ldg(pred + i) - __ldg(target + i);
    return d * d;
  });
  const float total = tessera_block_sum<TESSERA_REDUCE_THREADS>(acc, scratch);
  if (threadIdx.x == 0) partials[blockIdx.x] = total;
}

extern "C" __global__ __launch_bounds__(256) void mse_bwd(long long n, float scale, const float* pred, const float* target, float* dpred) {
  const long long tid = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  const long long stride = (long long)gridDim.x * blockDim.x;
  long long done = 0;
  if (tessera_aligned16(pred) && tessera_aligned16(target) && tessera_aligned16(dpred)) {
    const long long n4 = n >> 2;
    const float4* p4 = reinterpret_cast<const float4*>(pred);
    const float4* t4 = reinterpret_cast<const float4*>(target);
    float4* d4 = reinterpret_cast<float4*>(dpred);
    for (long long i = tid; i < n4; i += stride) {
      const float4 p = p4[i], t = t4[i];
      d4[i] = make_float4(scale * (p.x - t.x), scale * (p.y - t.y), scale * (p.z - t.z), scale * (p.w - t.w));
    }
    done = n4 << 2;
  }
  for (long long i = done + tid; i < n; i += stride) dpred[i] = scale * (pred[i] - target[i]);
}
