// planted.cu -- kernels for the simulator's own tests (compiled for the simulator only, never
// for the GPU): kernels with a planted bug that the simulator must report, their correct
// twins, and a probe of the warp intrinsics and dynamic shared memory.
//
// Launch: block (256,1,1) unless noted, grid (ceil(n / 256),1,1).
#include "common.cuh"

// Reverses each block's 256-element slice of x into out, through shared memory.
// Correct: a barrier between the writes and the reads.
extern "C" __global__ __launch_bounds__(256) void reverse_ok(int n, const float* x, float* out) {
  __shared__ float tile[256];
  const int t = threadIdx.x;
  const int i = blockIdx.x * 256 + t;
  tile[t] = i < n ? x[i] : 0.0f;
  __syncthreads();
  const int j = blockIdx.x * 256 + (255 - t);
  if (j < n) out[j] = tile[t];
}

// PLANTED BUG: the same without the barrier. Thread t reads tile[255 - t], which thread 255 - t
// wrote in the same barrier interval: a data race (on a GPU it usually "works" for small blocks).
extern "C" __global__ __launch_bounds__(256) void reverse_missing_barrier(int n, const float* x, float* out) {
  __shared__ float tile[256];
  const int t = threadIdx.x;
  const int i = blockIdx.x * 256 + t;
  tile[t] = i < n ? x[i] : 0.0f;
  const int j = blockIdx.x * 256 + (255 - t);
  if (j < n) out[j] = tile[255 - t];
}

// Correct: y = 2 x, grid-stride.
extern "C" __global__ __launch_bounds__(256) void double_ok(long long n, const float* x, float* y) {
  const long long stride = (long long)gridDim.x * blockDim.x;
  for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) y[i] = 2.0f * x[i];
}

// PLANTED BUG: `<=` for `<` in the write's guard: the thread with i == n writes y[n].
extern "C" __global__ __launch_bounds__(256) void double_off_by_one(long long n, const float* x, float* y) {
  const long long stride = (long long)gridDim.x * blockDim.x;
  for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i <= n; i += stride) {
    const float v = i < n ? x[i] : 0.0f;
    y[i] = 2.0f * v;
  }
}

// Correct: per-block sum of x (block of 256) by a shared-memory tree, every thread reaching
// every barrier.
extern "C" __global__ __launch_bounds__(256) void block_sum_ok(int n, const float* x, float* out) {
  __shared__ float tile[256];
  const int t = threadIdx.x;
  const int i = blockIdx.x * 256 + t;
  tile[t] = i < n ? x[i] : 0.0f;
  __syncthreads();
  for (int s = 128; s > 0; s >>= 1) {
    if (t < s) tile[t] += tile[t + s];
    __syncthreads();
  }
  if (t == 0) out[blockIdx.x] = tile[0];
}

// PLANTED BUG: threads past the end return before the barriers, so in the last block the
// __syncthreads is reached by only some of its threads (a barrier in a divergent branch; on a
// GPU: undefined behaviour, a hang or a wrong sum).
extern "C" __global__ __launch_bounds__(256) void block_sum_divergent_barrier(int n, const float* x, float* out) {
  __shared__ float tile[256];
  const int t = threadIdx.x;
  const int i = blockIdx.x * 256 + t;
  if (i >= n) return;
  tile[t] = x[i];
  __syncthreads();
  for (int s = 128; s > 0; s >>= 1) {
    if (t < s && i + s < n) tile[t] += tile[t + s];
    __syncthreads();
  }
  if (t == 0) out[blockIdx.x] = tile[0];
}

// Probe of the shim (block (64,1,1), grid (1,1,1), dynamic shared memory 64 floats; n = 64).
// out[0..64): __shfl_down_sync(v, 1); out[64..128): __shfl_up_sync(v, 2); out[128..192):
// __shfl_sync(v, 5) with width 8; out[192..256): dynamic shared memory reversed;
// out[256], out[259]: the low and high 16 bits of __ballot_sync(v > 0) of warp 0 (as floats);
// out[257]: __syncthreads_count(v > 0); out[258]: atomicAdd of every v.
extern "C" __global__ __launch_bounds__(64) void probe(int n, const float* x, float* out) {
  extern __shared__ float dyn[];
  const int t = threadIdx.x;
  const float v = x[t];
  out[t] = __shfl_down_sync(0xffffffffu, v, 1);
  out[64 + t] = __shfl_up_sync(0xffffffffu, v, 2);
  out[128 + t] = __shfl_sync(0xffffffffu, v, 5, 8);
  dyn[t] = v;
  const unsigned ballot = __ballot_sync(0xffffffffu, v > 0.0f);
  const int count = __syncthreads_count(v > 0.0f);
  out[192 + t] = dyn[n - 1 - t];
  if (t == 0) {
    out[256] = (float)(ballot & 0xffffu);
    out[259] = (float)(ballot >> 16);
    out[257] = (float)count;
    out[258] = 0.0f;
  }
  __syncthreads();
  atomicAdd(&out[258], v);
}

// Correct, and must not be reported: a warp-synchronous tail ordered by __syncwarp (block of 64,
// out[blockIdx.x] = sum of the block's 64 values) and a shared-memory histogram built with
// atomicAdd (out[64 + b] += count of values with (int)x % 8 == b, for the first block only).
extern "C" __global__ __launch_bounds__(64) void warp_sync_and_atomics(int n, const float* x, float* out) {
  __shared__ float s[64];
  __shared__ int hist[8];
  const int t = threadIdx.x;
  const int i = blockIdx.x * 64 + t;
  const float v = i < n ? x[i] : 0.0f;
  s[t] = v;
  if (t < 8) hist[t] = 0;
  __syncthreads();
  if (t < 32) {
    float a = s[t] + s[t + 32];
    __syncwarp();
    s[t] = a;
    for (int off = 16; off > 0; off >>= 1) {
      __syncwarp();
      if (t < off) a += s[t + off];
      __syncwarp();
      if (t < off) s[t] = a;
    }
  }
  if (i < n) atomicAdd(&hist[((int)v) & 7], 1);
  __syncthreads();
  if (t == 0) out[blockIdx.x] = s[0];
  if (blockIdx.x == 0 && t < 8) out[64 + t] = (float)hist[t];
}

// PLANTED BUG: a tile stride of 255 for tiles of 256: each block's last element is the next
// block's first, written by two blocks of one launch (on a GPU: whichever lands last wins).
extern "C" __global__ __launch_bounds__(256) void copy_overlapping_tiles(int n, const float* x, float* y) {
  const int i = blockIdx.x * 255 + threadIdx.x;
  if (i < n) y[i] = x[i];
}

// Correct: reverse through shared memory filled by asynchronous copies (cp.async): each thread
// copies its element, waits for its own copy, and the barrier after the wait publishes them all.
extern "C" __global__ __launch_bounds__(256) void async_reverse_ok(int n, const float* x, float* out) {
  __shared__ __align__(16) float tile[256];
  const int t = threadIdx.x;
  const int i = blockIdx.x * 256 + t;
  if (i < n) {
    __pipeline_memcpy_async(&tile[t], x + i, 4);
  } else {
    __pipeline_memcpy_async(&tile[t], x, 4, 4);  // zero-fill, nothing read
  }
  __pipeline_commit();
  __pipeline_wait_prior(0);
  __syncthreads();
  // Each thread reads another thread's copy: published by that thread's wait and the barrier.
  const int j = blockIdx.x * 256 + (255 - t);
  if (j < n) out[j] = tile[255 - t];
}

// PLANTED BUG: the wait is missing. The barrier orders the issues, not the arrivals: thread
// 255 - t's copy may land after thread t reads it.
extern "C" __global__ __launch_bounds__(256) void async_reverse_missing_wait(int n, const float* x, float* out) {
  __shared__ __align__(16) float tile[256];
  const int t = threadIdx.x;
  const int i = blockIdx.x * 256 + t;
  if (i < n) {
    __pipeline_memcpy_async(&tile[t], x + i, 4);
  } else {
    __pipeline_memcpy_async(&tile[t], x, 4, 4);
  }
  __pipeline_commit();
  __syncthreads();
  const int j = blockIdx.x * 256 + (255 - t);
  if (j < n) out[j] = tile[255 - t];
}

// PLANTED BUG: two commit groups (tile, then tile2); __pipeline_wait_prior(1) lands only the
// older one, so reading tile[t] is right and reading tile2[t] reads a copy still in flight.
extern "C" __global__ __launch_bounds__(256) void async_read_before_wait(int n, const float* x, float* out) {
  __shared__ __align__(16) float tile[256];
  __shared__ __align__(16) float tile2[256];
  const int t = threadIdx.x;
  const int i = blockIdx.x * 256 + t;
  const float* src = i < n ? x + i : x;
  const size_t fill = i < n ? 0 : 4;
  __pipeline_memcpy_async(&tile[t], src, 4, fill);
  __pipeline_commit();
  __pipeline_memcpy_async(&tile2[t], src, 4, fill);
  __pipeline_commit();
  __pipeline_wait_prior(1);
  const float first = tile[t];
  if (i < n) out[i] = first + tile2[t];
}
