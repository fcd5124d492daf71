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

// ---- the transformer's ops (transformer.cu) --------------------------------------------------
// layernorm_fwd / layernorm_bwd: one warp per row, block (TESSERA_LN_THREADS,1,1), any grid
// (grid-stride over rows in steps of TESSERA_LN_THREADS / 32).
#define TESSERA_LN_THREADS 256
// layernorm_dparams: block (TESSERA_COLSUM_COLS, TESSERA_COLSUM_ROWS, 1), grid (ceil(c / 32), 1, 1).
// embed_fwd, embed_bwd_wte, embed_bwd_wpe: block (TESSERA_EMBED_THREADS,1,1); see transformer.cu.
#define TESSERA_EMBED_THREADS 256
// attn_fwd, attn_bwd_dq, attn_bwd_dkv: one warp per (sequence, head, position), block
// (TESSERA_ATTN_THREADS,1,1), any grid (grid-stride); head size at most TESSERA_ATTN_MAX_HEAD.
#define TESSERA_ATTN_THREADS 256
#define TESSERA_ATTN_MAX_HEAD 256

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

// ---- accurate tails ---------------------------------------------------------------------------
// The same algorithms as the CPU's (host/ops/activation.rs), so that every backend keeps 1e-6
// relative accuracy wherever a result is a normal float, and the signed zero where it underflows.

// e^(a + a_lo) as p * 2^n1 * 2^n2, applied to a factor m with one rounding into the subnormal
// range, the last: m e^a keeps its relative accuracy even where e^a alone is subnormal.
// a_lo: a small correction to a (the low part of an argument computed in more than f32, or 0).
// Below a = -172: the signed zero of m (exact underflow for |m| < 2^98, true of every caller);
// above 88.75: m times infinity.
struct TesseraExp {
  float p, s1, s2, a;
};
__device__ __forceinline__ TesseraExp tessera_exp(float a, float a_lo) {
  const float shift = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  const float x = fminf(fmaxf(a, -172.0f), 88.75f);
  const float k = x * 1.44269504f + shift;
  const float n = k - shift;
  const float r = (x - n * 0.69314575f - n * 1.4286068e-6f) + a_lo;
  const float p =
      1.0f + r * (1.0f + r * (0.5f + r * (1.0f / 6.0f + r * (1.0f / 24.0f + r * (1.0f / 120.0f +
             r * (1.0f / 720.0f + r * (1.0f / 5040.0f)))))));
  const int ni = __float_as_int(k) - __float_as_int(shift);
  const int n1 = ni >> 1, n2 = ni - n1;  // n in [-248, 128]: both halves normal
  TesseraExp e;
  e.p = p;
  e.s1 = __int_as_float((n1 + 127) << 23);
  e.s2 = __int_as_float((n2 + 127) << 23);
  e.a = a;
  return e;
}
__device__ __forceinline__ float tessera_exp_times(TesseraExp e, float m) {
  if (e.a < -172.0f) return m * 0.0f;
  if (e.a > 88.75f) return m * __int_as_float(0x7f800000);  // m * inf
  return (m * e.p) * e.s1 * e.s2;
}

// erfcx(t) = e^(t^2) erfc(t) for t >= 0, relative error below 2e-7: (1 + 2t) erfcx(t) as a
// degree-12 polynomial in q = (t - 2) / (t + 2) (Shepherd and Laframboise's transformation; a
// Chebyshev interpolant fitted in 40-digit arithmetic). host/ops/activation.rs holds the same
// list as ERFCX_COEFFS, and a test compares them.
__device__ __forceinline__ float tessera_erfcx(float t) {
  constexpr float TESSERA_ERFCX_COEFFS[13] = {1.2769784f, -0.09276376f, -0.16603039f, 0.1640494f, -0.054220185f, -0.008018636f, 0.008724295f, 0.0012166655f, -0.0014635117f, -0.0003571779f, 0.00022110545f, 6.310018e-5f, -2.0108931e-5f};
  const float q = (t - 2.0f) / (t + 2.0f);
  float p = TESSERA_ERFCX_COEFFS[12];
#pragma unroll
  for (int i = 11; i >= 0; --i) p = p * q + TESSERA_ERFCX_COEFFS[i];
  return t == __int_as_float(0x7f800000) ? 0.0f : p / (1.0f + 2.0f * t);
}

// -z^2 / 2 as hi + lo, exact (fmaf gives the rounding error of z * z).
__device__ __forceinline__ void tessera_neg_half_square(float z, float* hi, float* lo) {
  const float s = z * z;
  *hi = -0.5f * s;
  *lo = -0.5f * fmaf(z, z, -s);
}

// GELU (tanh): -2|u| as hi + lo with u = sqrt(2/pi) (z + 0.044715 z^3) computed in double (at
// z = -10, -2|u| is -87, and its f32 rounding alone would cost 1e-5 of the result); u's sign.
__device__ __forceinline__ bool tessera_gelu_tanh_arg(float z, float* hi, float* lo) {
  const double zd = z;
  const double u = 0.7978845608028654 * (zd + 0.044715 * zd * zd * zd);
  const double a = -2.0 * fabs(u);
  *hi = (float)a;
  *lo = (float)(a - (double)*hi);
  return u >= 0.0;
}

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
    // z sigmoid(2u): z / (1 + e) for u >= 0 and z e / (1 + e) for u < 0, e = exp(-2|u|), the
    // factor e applied last (exact where tanh u rounds to -1 and where e alone is subnormal).
    float a, lo;
    const bool pos = tessera_gelu_tanh_arg(z, &a, &lo);
    const TesseraExp e = tessera_exp(a, lo);
    const float d = 1.0f + tessera_exp_times(e, 1.0f);
    return pos ? z / d : tessera_exp_times(e, z / d);
  } else if (ACT == TESSERA_ACT_GELU_ERF) {
    // z Phi(z), Phi(z) = e^(-z^2/2) erfcx(|z|/sqrt 2) / 2 for z < 0, 1 minus that above: no
    // 1 + erf(z) to cancel in the negative tail.
    float a, lo;
    tessera_neg_half_square(z, &a, &lo);
    const TesseraExp g = tessera_exp(a, lo);
    const float w = 0.5f * tessera_erfcx(fabsf(z) * 0.70710678f);
    return z < 0.0f ? tessera_exp_times(g, z * w) : z * (1.0f - tessera_exp_times(g, w));
  } else if (ACT == TESSERA_ACT_SILU) {
    // z / (1 + e^-z) for z >= 0; z e^z / (1 + e^z) below, the factor e^z applied last.
    const TesseraExp e = tessera_exp(-fabsf(z), 0.0f);
    const float d = 1.0f + tessera_exp_times(e, 1.0f);
    return z < 0.0f ? tessera_exp_times(e, z / d) : z / d;
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
    // d/dz = sigmoid(2u) + z 2e / (1 + e)^2 du/dz, e = exp(-2|u|), du/dz = c (1 + 3 * 0.044715 z^2);
    // for u < 0 the sigmoid is e / (1 + e), so the factor e is applied last.
    float a, lo;
    const bool pos = tessera_gelu_tanh_arg(z, &a, &lo);
    const TesseraExp e = tessera_exp(a, lo);
    const float d = 1.0f + tessera_exp_times(e, 1.0f);
    const double zd = z;
    const float du = (float)(0.7978845608028654 * (1.0 + 3.0 * 0.044715 * zd * zd));
    const float slope = 2.0f * z * du / (d * d);
    return pos ? 1.0f / d + tessera_exp_times(e, slope) : tessera_exp_times(e, 1.0f / d + slope);
  } else if (ACT == TESSERA_ACT_GELU_ERF) {
    // d/dz = Phi(z) + z phi(z), phi(z) = e^(-z^2/2) / sqrt(2 pi).
    float a, lo;
    tessera_neg_half_square(z, &a, &lo);
    const TesseraExp g = tessera_exp(a, lo);
    const float w = 0.5f * tessera_erfcx(fabsf(z) * 0.70710678f);
    const float zp = z * 0.398942280f;  // z / sqrt(2 pi)
    return z < 0.0f ? tessera_exp_times(g, w + zp) : 1.0f - tessera_exp_times(g, w - zp);
  } else if (ACT == TESSERA_ACT_SILU) {
    // s (1 + z (1 - s)), s = sigmoid(z), from e = e^-|z| (the factor e^z applied last below 0).
    const TesseraExp e = tessera_exp(-fabsf(z), 0.0f);
    const float ev = tessera_exp_times(e, 1.0f);
    const float d = 1.0f + ev;
    return z < 0.0f ? tessera_exp_times(e, (1.0f + z / d) / d) : (1.0f + z * ev / d) / d;
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
