// cuda_sim.h -- the host shim that lets the kernels of kernels/*.cu compile with the system C++
// compiler (C++20) and run on the CPU with CUDA's semantics. build.rs includes it at the top of
// each kernel file's simulator build; the .cu sources are not changed (see build.rs: the only
// rewrites are `extern "C" __global__` -> internal linkage, and `extern __shared__` arrays).
//
// What it provides, and how it maps onto the simulator runtime (runtime.cc):
//   * threadIdx, blockIdx, blockDim, gridDim, warpSize: values read from the runtime (by value,
//     so that reading them is not a memory access the checker sees);
//   * __global__, __device__, __host__, __forceinline__, __restrict__, __launch_bounds__,
//     __align__, #pragma unroll (ignored);
//   * __shared__: function-static storage in the `tessera_shared` section, so that the runtime
//     knows every shared-memory address (race tracking); one block runs at a time, so one copy
//     per variable is the block's shared memory;
//   * __syncthreads (+ _count/_and/_or), __syncwarp, the warp shuffles, __ballot_sync, __any_sync,
//     __all_sync: blocking calls into the runtime, which runs the block's threads as fibers;
//   * atomicAdd/Sub/Max/Min/Exch/CAS, __ldg, __threadfence, the float intrinsics the kernels use,
//     and the vector types with CUDA's alignment;
//   * __pipeline_memcpy_async / __pipeline_commit / __pipeline_wait_prior (cuda_pipeline_primitives.h,
//     the asynchronous global -> shared copies): the data lands at the wait, as late as a GPU may
//     deliver it, so a read before the wait sees the old contents.
//
// Every load and store the kernel code makes is instrumented by the compiler's
// -fsanitize=thread pass; the runtime defines the __tsan_* callbacks (there is no libtsan), and
// checks each access: global memory against the buffers passed to the launch, shared memory
// for races between barriers.
#pragma once

#include <math.h>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <bit>

// ---- the runtime's interface ------------------------------------------------------------------
struct uint3 {
  unsigned int x, y, z;
};
struct dim3 {
  unsigned int x = 1, y = 1, z = 1;
};

namespace tsim {
// A call site, for messages.
struct Site {
  const char* file;
  int line;
};
enum ShflKind : int { kShflIdx = 0, kShflUp = 1, kShflDown = 2, kShflXor = 3 };
enum VoteKind : int { kBallot = 0, kAny = 1, kAll = 2 };
}  // namespace tsim

extern "C" {
uint3 tsim_thread_idx();
uint3 tsim_block_idx();
dim3 tsim_block_dim();
dim3 tsim_grid_dim();
void tsim_syncthreads(const char* file, int line);
int tsim_syncthreads_reduce(const char* file, int line, int kind, int pred);
void tsim_syncwarp(const char* file, int line, unsigned mask);
unsigned long long tsim_shfl(const char* file, int line, unsigned mask, unsigned long long bits, int kind, int arg,
                             int width);
unsigned tsim_vote(const char* file, int line, unsigned mask, int kind, int pred);
void* tsim_dynamic_smem();
// Atomics: checked like any access, done under the runtime's rules (one thread runs at a time).
int tsim_atomic_cas_i32(int* p, int cmp, int val);
unsigned long long tsim_atomic_cas_u64(unsigned long long* p, unsigned long long cmp, unsigned long long val);
int tsim_atomic_add_i32(int* p, int v);
unsigned tsim_atomic_add_u32(unsigned* p, unsigned v);
float tsim_atomic_add_f32(float* p, float v);
int tsim_atomic_exch_i32(int* p, int v);
float tsim_atomic_exch_f32(float* p, float v);
int tsim_atomic_max_i32(int* p, int v);
int tsim_atomic_min_i32(int* p, int v);
void tsim_trap(const char* file, int line);
// Asynchronous copies global -> shared (runtime.cc: read at issue, landed at the wait).
void tsim_pipeline_memcpy_async(const char* file, int line, void* dst, const void* src, size_t size, size_t zfill);
void tsim_pipeline_commit();
void tsim_pipeline_wait_prior(size_t prior);
}

// ---- qualifiers ---------------------------------------------------------------------------------
#define __global__ __attribute__((noinline))
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__ __attribute__((noinline))
#define __restrict__ __restrict
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))
#define __shared__ static __attribute__((section("tessera_shared")))
#define __constant__ static const

#define threadIdx (tsim_thread_idx())
#define blockIdx (tsim_block_idx())
#define blockDim (tsim_block_dim())
#define gridDim (tsim_grid_dim())
#define warpSize 32

// ---- vector types -----------------------------------------------------------------------------
struct __attribute__((aligned(8))) float2 {
  float x, y;
};
struct __attribute__((aligned(16))) float4 {
  float x, y, z, w;
};
struct __attribute__((aligned(8))) int2 {
  int x, y;
};
struct __attribute__((aligned(16))) int4 {
  int x, y, z, w;
};
inline float2 make_float2(float x, float y) { return float2{x, y}; }
inline float4 make_float4(float x, float y, float z, float w) { return float4{x, y, z, w}; }
inline int2 make_int2(int x, int y) { return int2{x, y}; }
inline int4 make_int4(int x, int y, int z, int w) { return int4{x, y, z, w}; }

// ---- synchronisation and warp intrinsics --------------------------------------------------------
#define __syncthreads() tsim_syncthreads(__FILE__, __LINE__)
#define __syncthreads_count(p) tsim_syncthreads_reduce(__FILE__, __LINE__, 0, (p) ? 1 : 0)
#define __syncthreads_and(p) tsim_syncthreads_reduce(__FILE__, __LINE__, 1, (p) ? 1 : 0)
#define __syncthreads_or(p) tsim_syncthreads_reduce(__FILE__, __LINE__, 2, (p) ? 1 : 0)
#define __syncwarp(...) tsim_syncwarp(__FILE__, __LINE__, tsim::syncwarp_mask(__VA_ARGS__))
#define __threadfence() __atomic_thread_fence(__ATOMIC_SEQ_CST)
#define __threadfence_block() __atomic_thread_fence(__ATOMIC_SEQ_CST)
#define __trap() tsim_trap(__FILE__, __LINE__)

namespace tsim {
inline unsigned syncwarp_mask() { return 0xffffffffu; }
inline unsigned syncwarp_mask(unsigned m) { return m; }

template <class T>
inline unsigned long long to_bits(T v) {
  static_assert(sizeof(T) <= 8, "shuffles move 32- or 64-bit values");
  unsigned long long b = 0;
  std::memcpy(&b, &v, sizeof(T));
  return b;
}
template <class T>
inline T from_bits(unsigned long long b) {
  T v;
  std::memcpy(&v, &b, sizeof(T));
  return v;
}
template <class T>
inline T shfl(Site s, unsigned mask, T v, int kind, int arg, int width) {
  return from_bits<T>(tsim_shfl(s.file, s.line, mask, to_bits(v), kind, arg, width));
}
}  // namespace tsim

#define __shfl_sync(mask, v, src, ...) \
  tsim::shfl(tsim::Site{__FILE__, __LINE__}, (mask), (v), tsim::kShflIdx, (src), tsim_width(__VA_ARGS__))
#define __shfl_up_sync(mask, v, d, ...) \
  tsim::shfl(tsim::Site{__FILE__, __LINE__}, (mask), (v), tsim::kShflUp, (d), tsim_width(__VA_ARGS__))
#define __shfl_down_sync(mask, v, d, ...) \
  tsim::shfl(tsim::Site{__FILE__, __LINE__}, (mask), (v), tsim::kShflDown, (d), tsim_width(__VA_ARGS__))
#define __shfl_xor_sync(mask, v, m, ...) \
  tsim::shfl(tsim::Site{__FILE__, __LINE__}, (mask), (v), tsim::kShflXor, (m), tsim_width(__VA_ARGS__))
inline int tsim_width() { return 32; }
inline int tsim_width(int w) { return w; }
#define __ballot_sync(mask, p) tsim_vote(__FILE__, __LINE__, (mask), tsim::kBallot, (p) ? 1 : 0)
#define __any_sync(mask, p) (tsim_vote(__FILE__, __LINE__, (mask), tsim::kAny, (p) ? 1 : 0) != 0)
#define __all_sync(mask, p) (tsim_vote(__FILE__, __LINE__, (mask), tsim::kAll, (p) ? 1 : 0) != 0)

inline unsigned __activemask() { return 0xffffffffu; }
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz((unsigned)x); }
inline int __ffs(int x) { return __builtin_ffs(x); }

// ---- memory ---------------------------------------------------------------------------------------
template <class T>
inline T __ldg(const T* p) {
  return *p;
}

inline int atomicCAS(int* p, int cmp, int val) { return tsim_atomic_cas_i32(p, cmp, val); }
inline unsigned long long atomicCAS(unsigned long long* p, unsigned long long cmp, unsigned long long val) {
  return tsim_atomic_cas_u64(p, cmp, val);
}
inline int atomicAdd(int* p, int v) { return tsim_atomic_add_i32(p, v); }
inline unsigned atomicAdd(unsigned* p, unsigned v) { return tsim_atomic_add_u32(p, v); }
inline float atomicAdd(float* p, float v) { return tsim_atomic_add_f32(p, v); }
inline int atomicSub(int* p, int v) { return tsim_atomic_add_i32(p, -v); }
inline int atomicExch(int* p, int v) { return tsim_atomic_exch_i32(p, v); }
inline float atomicExch(float* p, float v) { return tsim_atomic_exch_f32(p, v); }
inline int atomicMax(int* p, int v) { return tsim_atomic_max_i32(p, v); }
inline int atomicMin(int* p, int v) { return tsim_atomic_min_i32(p, v); }

// The asynchronous copies of cuda_pipeline_primitives.h (cp.async on sm_80 and later).
namespace tsim {
inline void cp_async(Site s, void* dst, const void* src, size_t size, size_t zfill = 0) {
  tsim_pipeline_memcpy_async(s.file, s.line, dst, src, size, zfill);
}
}  // namespace tsim
#define __pipeline_memcpy_async(...) tsim::cp_async(tsim::Site{__FILE__, __LINE__}, __VA_ARGS__)
#define __pipeline_commit() tsim_pipeline_commit()
#define __pipeline_wait_prior(n) tsim_pipeline_wait_prior(n)

// ---- math -----------------------------------------------------------------------------------------
inline float __int_as_float(int x) { return std::bit_cast<float>(x); }
inline int __float_as_int(float x) { return std::bit_cast<int>(x); }
inline unsigned __float_as_uint(float x) { return std::bit_cast<unsigned>(x); }
inline float __uint_as_float(unsigned x) { return std::bit_cast<float>(x); }
inline float __expf(float x) { return std::exp(x); }
inline float __logf(float x) { return std::log(x); }
inline float __fdividef(float a, float b) { return a / b; }
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
inline float __saturatef(float x) { return x < 0.0f ? 0.0f : (x > 1.0f ? 1.0f : x); }
inline float __fmaf_rn(float a, float b, float c) { return std::fmaf(a, b, c); }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
inline long long min(long long a, long long b) { return a < b ? a : b; }
inline long long max(long long a, long long b) { return a > b ? a : b; }

// ---- launch plumbing (used by the thunks build.rs appends) -----------------------------------
#define TSIM_NO_SANITIZE __attribute__((no_sanitize("thread")))
extern "C" {
struct tsim_launch {
  unsigned grid[3];
  unsigned block[3];
  unsigned long long dyn_smem;
};
struct tsim_arg {
  int kind;
  float f;
  long long i;
  void* p;
  unsigned long long len;
  unsigned long long elem;
  const char* name;
};
typedef void (*tsim_body)(const tsim_arg*);
int tsim_launch_kernel(const char* kernel, int max_threads, const tsim_launch* l, const tsim_arg* args, int nargs,
                       tsim_body body, char* err, unsigned long errlen);
void* tsim_shared(const void* tag, unsigned long size, unsigned long align, unsigned long elem, const char* name);
}
