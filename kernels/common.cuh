// common.cuh -- definitions shared by every tessera kernel file.
//
// What it holds:
//   * the activation codes and tessera_act / tessera_act_grad (the one definition of each
//     activation and its derivative that the GEMM epilogue and activation.cu share);
//   * the launch constants the host needs (block sizes, GEMM tile sizes). The build script
//     turns every `#define TESSERA_NAME <integer literal>` line below into a Rust const, so
//     keep those lines in exactly that form (comments go on their own lines, above);
//   * small device helpers (alignment test, fixed-order warp/block sums).
//
// Plain CUDA C only (no inline PTX, no cooperative groups, no cub, no tensor cores; the
// asynchronous copies of cuda_pipeline_primitives.h are allowed): the same sources are also
// compiled for the CPU with a shim (kernels/sim/cuda_sim.h) that emulates threadIdx,
// __syncthreads, the __shfl_*_sync intrinsics and the __pipeline_* copies.
#pragma once

// ---- activation codes (the `act` argument of gemm_* / act_fwd / act_bwd) -------------------
// identity
#define TESSERA_ACT_NONE 0
// max(z, 0); derivative 1 for z > 0, 0 otherwise (relu'(0) = 0)
#define TESSERA_ACT_RELU 1
// 0.5 z (1 + tanh(sqrt(2/pi) (z + 0.044715 z^3)))
#define TESSERA_ACT_GELU_TANH 2
// 0.5 z (1 + erf(z / sqrt(2)))
#define TESSERA_ACT_GELU_ERF 3
// z * sigmoid(z)
#define TESSERA_ACT_SILU 4

// ---- GEMM (gemm.cu) -------------------------------------------------------------------------
// gemm_{nn,nt,tn,tt}: block (TESSERA_GEMM_THREADS,1,1),
//   grid (ceil(n / TESSERA_GEMM_BN), ceil(m / TESSERA_GEMM_BM), 1), no dynamic shared memory.
#define TESSERA_GEMM_BM 128
#define TESSERA_GEMM_BN 128
#define TESSERA_GEMM_THREADS 256
// gemm_small_{nn,nt,tn,tt}: block (TESSERA_GEMM_SMALL_THREADS,1,1),
//   grid (ceil(n / TESSERA_GEMM_SMALL_BN), ceil(m / TESSERA_GEMM_SMALL_BM), 1).
#define TESSERA_GEMM_SMALL_BM 64
#define TESSERA_GEMM_SMALL_BN 64
#define TESSERA_GEMM_SMALL_THREADS 256
// gemm_wide{8,16}_*: block (TESSERA_GEMM_WIDE_THREADS,1,1), grid as gemm_* (128 x 128 tiles).
#define TESSERA_GEMM_WIDE_THREADS 128

// ---- element-wise kernels (activation.cu, optim.cu, axpy/scale/sum_scaled/mse_bwd) ----------
// block (TESSERA_EW_THREADS,1,1), any grid (grid-stride loops).
#define TESSERA_EW_THREADS 256

// ---- reductions (reduce.cu) -----------------------------------------------------------------
// col_sum: block (TESSERA_COLSUM_COLS, TESSERA_COLSUM_ROWS, 1), grid (ceil(cols / 32), 1, 1).
#define TESSERA_COLSUM_COLS 32
#define TESSERA_COLSUM_ROWS 8
// col_sum_seg: rows per segment (grid.y = ceil(rows / TESSERA_COLSUM_SEG)); the host sums tall
// inputs (rows >= TESSERA_COLSUM_TWO_PASS_ROWS) in two passes, col_sum_seg then col_sum.
#define TESSERA_COLSUM_SEG 64
#define TESSERA_COLSUM_TWO_PASS_ROWS 256
// partial_sum / mse_partial: exactly grid (TESSERA_REDUCE_BLOCKS,1,1), block (TESSERA_REDUCE_THREADS,1,1).
// final_sum: grid (1,1,1), block (TESSERA_REDUCE_THREADS,1,1).
#define TESSERA_REDUCE_BLOCKS 512
#define TESSERA_REDUCE_THREADS 256

// ---- softmax cross-entropy (loss.cu) --------------------------------------------------------
// one warp per row: block (TESSERA_XENT_THREADS,1,1), grid (ceil(rows / (TESSERA_XENT_THREADS / 32)),1,1).
#define TESSERA_XENT_THREADS 256

// ---- activations ------------------------------------------------------------------------------
// The compile-time form: with ACT a constant, the branches fold away. An unknown code yields NaN
// so that a bad code is loud rather than silently the identity (the host validates codes).
template <int ACT>
__device__ __forceinline__ float tessera_act_c(float z) {
  if (ACT == TESSERA_ACT_NONE) {
    return z;
  } else if (ACT == TESSERA_ACT_RELU) {
    return z > 0.0f ? z : 0.0f;
  } else if (ACT == TESSERA_ACT_GELU_TANH) {
    // 0.5 (1 + tanh u) = 1 / (1 + e) for u >= 0 and e / (1 + e) for u < 0, e = exp(-2|u|):
    // exact where tanh u rounds to -1 (large negative z), unlike 1 + tanhf(u).
    const float c = 0.7978845608028654f;  // sqrt(2/pi)
    const float u = c * (z + 0.044715f * z * z * z);
    const float e = expf(-2.0f * fabsf(u));
    const float h = (u >= 0.0f ? 1.0f : e) / (1.0f + e);
    return z * h;
  } else if (ACT == TESSERA_ACT_GELU_ERF) {
    return 0.5f * z * (1.0f + erff(z * 0.7071067811865476f));  // 1/sqrt(2)
  } else if (ACT == TESSERA_ACT_SILU) {
    const float s = 1.0f / (1.0f + expf(-z));
    return z * s;
  } else {
    return __int_as_float(0x7fc00000);  // NaN
  }
}

// d act / dz at z.
template <int ACT>
__device__ __forceinline__ float tessera_act_grad_c(float z) {
  if (ACT == TESSERA_ACT_NONE) {
    return 1.0f;
  } else if (ACT == TESSERA_ACT_RELU) {
    return z > 0.0f ? 1.0f : 0.0f;
  } else if (ACT == TESSERA_ACT_GELU_TANH) {
    // d/dz = 0.5 (1 + t) + 0.5 z (1 - t^2) c (1 + 3 * 0.044715 z^2),  t = tanh(c (z + 0.044715 z^3)),
    // with 0.5 (1 + t) and 1 - t^2 = 4 e / (1 + e)^2 from e = exp(-2|u|) (accurate in the tails).
    const float c = 0.7978845608028654f;
    const float z2 = z * z;
    const float u = c * (z + 0.044715f * z2 * z);
    const float e = expf(-2.0f * fabsf(u));
    const float d = 1.0f + e;
    const float h = (u >= 0.0f ? 1.0f : e) / d;
    return h + 2.0f * z * (e / (d * d)) * c * (1.0f + 0.134145f * z2);
  } else if (ACT == TESSERA_ACT_GELU_ERF) {
    // d/dz = Phi(z) + z phi(z) = 0.5 (1 + erf(z / sqrt 2)) + z exp(-z^2 / 2) / sqrt(2 pi)
    return 0.5f * (1.0f + erff(z * 0.7071067811865476f)) +
           z * 0.3989422804014327f * expf(-0.5f * z * z);
  } else if (ACT == TESSERA_ACT_SILU) {
    // d/dz = s (1 + z (1 - s)),  s = sigmoid(z)
    const float s = 1.0f / (1.0f + expf(-z));
    return s * (1.0f + z * (1.0f - s));
  } else {
    return __int_as_float(0x7fc00000);  // NaN
  }
}

// The run-time form (act uniform across the launch, so the switch does not diverge).
__device__ __forceinline__ float tessera_act(int act, float z) {
  switch (act) {
    case TESSERA_ACT_NONE: return tessera_act_c<TESSERA_ACT_NONE>(z);
    case TESSERA_ACT_RELU: return tessera_act_c<TESSERA_ACT_RELU>(z);
    case TESSERA_ACT_GELU_TANH: return tessera_act_c<TESSERA_ACT_GELU_TANH>(z);
    case TESSERA_ACT_GELU_ERF: return tessera_act_c<TESSERA_ACT_GELU_ERF>(z);
    case TESSERA_ACT_SILU: return tessera_act_c<TESSERA_ACT_SILU>(z);
    default: return __int_as_float(0x7fc00000);
  }
}

__device__ __forceinline__ float tessera_act_grad(int act, float z) {
  switch (act) {
    case TESSERA_ACT_NONE: return tessera_act_grad_c<TESSERA_ACT_NONE>(z);
    case TESSERA_ACT_RELU: return tessera_act_grad_c<TESSERA_ACT_RELU>(z);
    case TESSERA_ACT_GELU_TANH: return tessera_act_grad_c<TESSERA_ACT_GELU_TANH>(z);
    case TESSERA_ACT_GELU_ERF: return tessera_act_grad_c<TESSERA_ACT_GELU_ERF>(z);
    case TESSERA_ACT_SILU: return tessera_act_grad_c<TESSERA_ACT_SILU>(z);
    default: return __int_as_float(0x7fc00000);
  }
}

// ---- helpers ------------------------------------------------------------------------------------
__device__ __forceinline__ bool tessera_aligned16(const void* p) {
  return (reinterpret_cast<unsigned long long>(p) & 15ull) == 0ull;
}

// Sum over the 32 lanes of a warp with a fixed xor butterfly. Every lane ends with the same
// bits (each step adds the same two operands on both partner lanes, and + is commutative).
__device__ __forceinline__ float tessera_warp_sum(float v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}

__device__ __forceinline__ float tessera_warp_max(float v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, off));
  return v;
}

// Fixed-order sum over a 1-D block of THREADS threads (THREADS a multiple of 32, <= 1024).
// Every thread must call it (it synchronizes). The result is valid in every thread.
// `scratch` must hold 32 floats of __shared__ memory, not otherwise in use.
template <int THREADS>
__device__ __forceinline__ float tessera_block_sum(float v, float* scratch) {
  constexpr int WARPS = THREADS / 32;
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  v = tessera_warp_sum(v);
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  float t = lane < WARPS ? scratch[lane] : 0.0f;
  t = tessera_warp_sum(t);
  __syncthreads();  // scratch may be reused by the caller after this
  return t;
}
