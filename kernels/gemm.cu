// gemm.cu -- single-precision GEMM with a fused epilogue (alpha, beta, bias, activation).
//
// Computes, for C of m x n:
//   c[i,j] = alpha * sum_p opA[i,p] * opB[p,j] + (beta != 0 ? beta * c[i,j] : 0) + (bias_opt ? bias_opt[j] : 0)
// then the activation:
//   * act_out_opt != nullptr: act_out_opt[i,j] = tessera_act(act, c[i,j]); c keeps the pre-activation.
//   * act_out_opt == nullptr and act != TESSERA_ACT_NONE: the activation is applied in place,
//     c[i,j] = tessera_act(act, pre-activation).
//   * act_out_opt == nullptr and act == TESSERA_ACT_NONE: c holds the pre-activation.
// When beta == 0, C is never read (it may hold NaN poison).
//
// Layout: row-major, contiguous, f32. Suffix letters: first = A, second = B; 'n' = as stored,
// 't' = transposed. A is stored m x k ('n', lda = k) or k x m ('t', lda = m); B is stored
// k x n ('n', ldb = n) or n x k ('t', ldb = k); C (and act_out_opt) is m x n (ldc = n).
// bias_opt, if given, has n entries. act_out_opt may equal c.
//
// Preconditions: m, n, k >= 1 (no divisibility assumed; k = 0 also works and gives
// alpha*0 + beta*c + bias). A and B must not overlap C. Indices into A, B and C are 64-bit, so
// matrices beyond 2^31 elements are fine; grid.y = ceil(m / BM) must stay <= 65535.
//
// Launch (no dynamic shared memory; static shared memory < 48 KiB). The 128 x 128 kernels carry
// __launch_bounds__(256, 2): two blocks per SM need <= 128 registers per thread, which the
// compiler otherwise exceeds by a few (133 at sm_90); at 128 there are no spills.
//   gemm_{nn,nt,tn,tt}:        block (TESSERA_GEMM_THREADS,1,1) = 256,
//                              grid (ceil(n / TESSERA_GEMM_BN), ceil(m / TESSERA_GEMM_BM), 1), 128 x 128 tiles
//   gemm_small_{nn,nt,tn,tt}:  block (TESSERA_GEMM_SMALL_THREADS,1,1) = 256,
//                              grid (ceil(n / TESSERA_GEMM_SMALL_BN), ceil(m / TESSERA_GEMM_SMALL_BM), 1), 64 x 64 tiles
//   gemm_pipe8_*, gemm_pipe16_*: as gemm_* (128 x 128 tiles)
//   gemm_wide8_*, gemm_wide16_*: block (TESSERA_GEMM_WIDE_THREADS,1,1) = 128, grid as gemm_*
//   gemm_splitk_{nn,nt,tn,tt}(m, n, k, kc, a, b, ws): split-K, the 64 x 64 tile's body over one
//                              k chunk per grid.z: block (TESSERA_GEMM_SMALL_THREADS,1,1), grid
//                              (ceil(n / 64), ceil(m / 64), splits) with splits = ceil(k / kc), kc a
//                              multiple of 16; block z writes its partial product (no epilogue) to
//                              ws[z*m*n ..] (m x n each). Then
//   gemm_splitk_reduce(mn, n, splits, ws, alpha, beta, c, bias_opt, act, act_out_opt): block
//                              (TESSERA_EW_THREADS,1,1), any grid (grid-stride over mn = m*n): each
//                              output sums its splits in the order z = 0, 1, ... (deterministic: no
//                              atomics) and applies the epilogue above.
//
// Versions inside (two templates: gemm_body, instantiated eight times, and gemm_async_body,
// sixteen times; both share tile_math and the epilogue, so every version sums each output over k
// in the same order and gives the same values):
//   * big:   128 x 128 block tile, BK = 8, 256 threads, 8 x 8 outputs per thread (two 4-row groups
//            64 rows apart x two 4-column groups 64 columns apart), double-buffered shared memory
//            with one __syncthreads per k-tile, the next k-tile's global loads in flight during the
//            current tile's math.
//   * small: 64 x 64 block tile, BK = 16, 256 threads, 4 x 4 outputs per thread; same pipeline.
//   * pipe8 / pipe16: the big tile, the k-tiles moved global -> shared by asynchronous copies
//            (__pipeline_memcpy_async, i.e. cp.async; no staging registers), BK = 8 with three
//            stages / BK = 16 with two. Candidates for tuning on an H100/H200: the host runs
//            them only when asked (GemmKernel::Pipe8 / Pipe16); see bench/NOTES.md.
//   * wide8 / wide16: as pipe8 / pipe16 with 128 threads of 8 x 16 outputs (the shape cuBLAS's
//            FP32 kernels use: fewer shared loads per FMA, about 200-240 registers, two blocks
//            per SM).
// Shared tiles are stored k-major (tile[p][row]) with 4 floats of padding per row, so that the
// math reads float4 fragments and the transposing stores of k-contiguous operands do not
// conflict. Each warp covers a 4 x 8 patch of threads, so a float4 fragment read is one
// shared-memory wavefront per operand.
// Global loads: a float4 per thread per operand per k-tile when the operand's contiguous
// dimension is a multiple of 4 and its base pointer is 16-byte aligned (a run-time, launch-uniform
// test); otherwise four guarded scalar loads. Out-of-range elements load as 0, so edge tiles need
// no special math. Epilogue: the block tile goes through shared memory one 64 x 64 quadrant at a
// time and is written row by row (coalesced scalar accesses, per-element guards, one copy of the
// activation code).
#include "common.cuh"
#ifdef __CUDACC__
#include <cuda_pipeline_primitives.h>  // __pipeline_memcpy_async (cp.async), sm_80 and later
#endif

namespace {

constexpr int kPad = 4;  // floats of padding per shared-tile row (keeps float4 alignment)

// One operand's R x BK slice (R along m or n, BK along k) of a k-tile, moved global -> registers
// -> shared memory. KCONTIG: element (r, p) sits at src[(r0 + r) * kdim + (k0 + p)] (k contiguous);
// otherwise at src[(k0 + p) * rdim + (r0 + r)] (r contiguous). Each thread moves L float4-shaped
// groups of 4 elements, 4 consecutive along the contiguous dimension.
template <int R, int BK, int THREADS, bool KCONTIG>
struct TileIO {
  static constexpr int L = R * BK / 4 / THREADS;
  static_assert(L >= 1 && L * 4 * THREADS == R * BK, "tile must split evenly into float4 groups");
  static_assert(R % 4 == 0 && BK % 4 == 0, "tile dims must be multiples of 4");

  // Coordinates (r, p) inside the tile of this thread's s-th group.
  __device__ __forceinline__ static void coords(int tid, int s, int& r, int& p) {
    const int f = tid + s * THREADS;
    if (KCONTIG) {
      r = f / (BK / 4);
      p = (f % (BK / 4)) * 4;
    } else {
      p = f / (R / 4);
      r = (f % (R / 4)) * 4;
    }
  }

  __device__ __forceinline__ static void load(const float* __restrict__ src, int rdim, int kdim,
                                              int r0, int k0, bool vec, int tid,
                                              float (&reg)[L][4]) {
#pragma unroll
    for (int s = 0; s < L; ++s) {
      int r, p;
      coords(tid, s, r, p);
      const int gr = r0 + r;
      const int gk = k0 + p;
      if (KCONTIG) {
        const float* ptr = src + (long long)gr * kdim + gk;
        if (vec) {
          // kdim % 4 == 0 and gk % 4 == 0: the group is either wholly inside or wholly outside.
          if (gr < rdim && gk < kdim) {
            const float4 v = __ldg(reinterpret_cast<const float4*>(ptr));
            reg[s][0] = v.x; reg[s][1] = v.y; reg[s][2] = v.z; reg[s][3] = v.w;
          } else {
            reg[s][0] = 0.0f; reg[s][1] = 0.0f; reg[s][2] = 0.0f; reg[s][3] = 0.0f;
          }
        } else {
          const bool rin = gr < rdim;
#pragma unroll
          for (int q = 0; q < 4; ++q) reg[s][q] = (rin && gk + q < kdim) ? __ldg(ptr + q) : 0.0f;
        }
      } else {
        const float* ptr = src + (long long)gk * rdim + gr;
        if (vec) {
          // rdim % 4 == 0 and gr % 4 == 0: wholly inside or wholly outside.
          if (gk < kdim && gr < rdim) {
            const float4 v = __ldg(reinterpret_cast<const float4*>(ptr));
            reg[s][0] = v.x; reg[s][1] = v.y; reg[s][2] = v.z; reg[s][3] = v.w;
          } else {
            reg[s][0] = 0.0f; reg[s][1] = 0.0f; reg[s][2] = 0.0f; reg[s][3] = 0.0f;
          }
        } else {
          const bool kin = gk < kdim;
#pragma unroll
          for (int q = 0; q < 4; ++q) reg[s][q] = (kin && gr + q < rdim) ? __ldg(ptr + q) : 0.0f;
        }
      }
    }
  }

  // Shared tile layout: tile[p][r], row length R + kPad.
  __device__ __forceinline__ static void store(float (*tile)[R + kPad], int tid,
                                               const float (&reg)[L][4]) {
#pragma unroll
    for (int s = 0; s < L; ++s) {
      int r, p;
      coords(tid, s, r, p);
      if (KCONTIG) {
#pragma unroll
        for (int q = 0; q < 4; ++q) tile[p + q][r] = reg[s][q];
      } else {
        *reinterpret_cast<float4*>(&tile[p][r]) = make_float4(reg[s][0], reg[s][1], reg[s][2], reg[s][3]);
      }
    }
  }
};


// Thread (ty, tx) of a BM x BN tile computed by (BM/TM) x (BN/TN) threads: warps are 4 (m) x 8 (n)
// threads, laid out row-major over the block.
template <int BN, int TN>
__device__ __forceinline__ void thread_coords(int tid, int& ty, int& tx) {
  constexpr int WX = BN / TN / 8;  // warps along n
  const int warp = tid >> 5, lane = tid & 31;
  ty = (warp / WX) * 4 + (lane >> 3);
  tx = (warp % WX) * 8 + (lane & 7);
}

// The math of one k-tile: acc += (the BK x BM tile As)^T (the BK x BN tile Bs), both k-major.
// The thread's TM rows are TM/4 groups of 4 spaced BM/(TM/4) apart, its TN columns TN/4 groups
// of 4 spaced BN/(TN/4) apart; each group is one float4 shared load per k step.
template <int BM, int BN, int BK, int TM, int TN>
__device__ __forceinline__ void tile_math(const float (*As)[BM + kPad], const float (*Bs)[BN + kPad], int ty,
                                          int tx, float (&acc)[TM][TN]) {
  constexpr int GM = TM / 4, GN = TN / 4;
  constexpr int SM = BM / GM, SN = BN / GN;
#pragma unroll
  for (int p = 0; p < BK; ++p) {
    float af[TM], bf[TN];
#pragma unroll
    for (int g = 0; g < GM; ++g) {
      const float4 v = *reinterpret_cast<const float4*>(&As[p][g * SM + ty * 4]);
      af[g * 4 + 0] = v.x; af[g * 4 + 1] = v.y; af[g * 4 + 2] = v.z; af[g * 4 + 3] = v.w;
    }
#pragma unroll
    for (int h = 0; h < GN; ++h) {
      const float4 v = *reinterpret_cast<const float4*>(&Bs[p][h * SN + tx * 4]);
      bf[h * 4 + 0] = v.x; bf[h * 4 + 1] = v.y; bf[h * 4 + 2] = v.z; bf[h * 4 + 3] = v.w;
    }
#pragma unroll
    for (int i = 0; i < TM; ++i)
#pragma unroll
      for (int j = 0; j < TN; ++j) acc[i][j] = fmaf(af[i], bf[j], acc[i][j]);
  }
}

// Epilogue. The block tile is staged through smem (SMEM_FLOATS floats, free when this is called:
// every thread has finished reading its k-tiles) one SM x SN quadrant at a time -- quadrant
// (g, h) holds every thread's output group (g, h) -- and then the block walks the quadrant row
// by row, so global reads of C and writes of C / act_out are coalesced and the activation code
// exists once instead of once per output register. Edges are plain per-element guards.
template <int BM, int BN, int TM, int TN, int THREADS, int SMEM_FLOATS>
__device__ __forceinline__ void epilogue(float* smem, const float (&acc)[TM][TN], int ty, int tx, int m0, int n0,
                                         int m, int n, float alpha, float beta, float* c, const float* bias,
                                         int act, float* act_out) {
  constexpr int GM = TM / 4, GN = TN / 4;
  constexpr int SM = BM / GM, SN = BN / GN;
  static_assert(SM * SN <= SMEM_FLOATS, "epilogue quadrant must fit in the tile buffers");
  static_assert(SM == (BM / TM) * 4 && SN == (BN / TN) * 4, "a quadrant is one 4 x 4 group per thread");
  const int tid = threadIdx.x;
  float* cs = smem;  // SM x SN, row length SN
#pragma unroll 1
  for (int q = 0; q < GM * GN; ++q) {
#pragma unroll
    for (int g = 0; g < GM; ++g)
#pragma unroll
      for (int h = 0; h < GN; ++h)
        if (g * GN + h == q) {
#pragma unroll
          for (int i = 0; i < 4; ++i)
            *reinterpret_cast<float4*>(&cs[(ty * 4 + i) * SN + tx * 4]) =
                make_float4(acc[g * 4 + i][h * 4 + 0], acc[g * 4 + i][h * 4 + 1],
                            acc[g * 4 + i][h * 4 + 2], acc[g * 4 + i][h * 4 + 3]);
        }
    __syncthreads();
    const int qr = m0 + (q / GN) * SM;
    const int qc = n0 + (q % GN) * SN;
#pragma unroll 4
    for (int e = tid; e < SM * SN; e += THREADS) {
      const int row = qr + e / SN;
      const int col = qc + e % SN;
      if (row < m && col < n) {
        const long long off = (long long)row * n + col;
        float x = alpha * cs[e];
        if (beta != 0.0f) x += beta * c[off];
        if (bias != nullptr) x += __ldg(bias + col);
        if (act_out != nullptr) {
          c[off] = x;
          act_out[off] = tessera_act(act, x);
        } else {
          c[off] = act != TESSERA_ACT_NONE ? tessera_act(act, x) : x;
        }
      }
    }
    __syncthreads();
  }
}

// BM x BN block tile, BK deep; each thread owns TM x TN outputs: TM/4 groups of 4 rows spaced
// BM/(TM/4) apart, TN/4 groups of 4 columns spaced BN/(TN/4) apart.
template <int BM, int BN, int BK, int TM, int TN, bool TA, bool TB>
__device__ __forceinline__ void gemm_body(int m, int n, int k, int kb, int ke, float alpha,
                                          const float* __restrict__ a, const float* __restrict__ b,
                                          float beta, float* c, const float* bias, int act,
                                          float* act_out) {
  constexpr int TX = BN / TN;  // threads along n
  constexpr int TY = BM / TM;  // threads along m
  constexpr int THREADS = TX * TY;
  static_assert(TM % 4 == 0 && TN % 4 == 0, "thread tile must be groups of 4");
  static_assert(TX % 8 == 0 && TY % 4 == 0 && THREADS % 32 == 0, "warp shape is 4 x 8 threads");

  // A tile: r = row of C (i), contiguous along k when A is stored m x k ('n').
  using IOA = TileIO<BM, BK, THREADS, !TA>;
  // B tile: r = column of C (j), contiguous along k when B is stored n x k ('t').
  using IOB = TileIO<BN, BK, THREADS, TB>;

  // One buffer: the double-buffered A and B tiles during the k loop, the C staging area after.
  constexpr int kAsFloats = 2 * BK * (BM + kPad);
  constexpr int kSmemFloats = kAsFloats + 2 * BK * (BN + kPad);
  __shared__ __align__(16) float smem[kSmemFloats];
  float (*As)[BK][BM + kPad] = reinterpret_cast<float (*)[BK][BM + kPad]>(smem);
  float (*Bs)[BK][BN + kPad] = reinterpret_cast<float (*)[BK][BN + kPad]>(smem + kAsFloats);

  const int tid = threadIdx.x;
  int ty, tx;
  thread_coords<BN, TN>(tid, ty, tx);
  const int m0 = blockIdx.y * BM;
  const int n0 = blockIdx.x * BN;

  const bool veca = (TA ? (m % 4 == 0) : (k % 4 == 0)) && tessera_aligned16(a);
  const bool vecb = (TB ? (k % 4 == 0) : (n % 4 == 0)) && tessera_aligned16(b);

  float acc[TM][TN];
#pragma unroll
  for (int i = 0; i < TM; ++i)
#pragma unroll
    for (int j = 0; j < TN; ++j) acc[i][j] = 0.0f;

  float ra[IOA::L][4];
  float rb[IOB::L][4];

  // The k range [kb, ke): all of k, or one split of a split-K launch (kb a multiple of BK, and ke
  // too unless ke = k, so no k-tile crosses ke except at k itself, where the loads' bound is).
  IOA::load(a, m, k, m0, kb, veca, tid, ra);
  IOB::load(b, n, k, n0, kb, vecb, tid, rb);
  IOA::store(As[0], tid, ra);
  IOB::store(Bs[0], tid, rb);
  __syncthreads();

  int cur = 0;
  for (int k0 = kb; k0 < ke; k0 += BK) {
    const bool more = k0 + BK < ke;  // uniform across the block
    if (more) {
      IOA::load(a, m, k, m0, k0 + BK, veca, tid, ra);
      IOB::load(b, n, k, n0, k0 + BK, vecb, tid, rb);
    }
    tile_math<BM, BN, BK, TM, TN>(As[cur], Bs[cur], ty, tx, acc);
    if (more) {
      // The buffer cur^1 was last read in iteration kt-1, which every thread has finished
      // (the __syncthreads below, or the prologue's), so it is free to overwrite.
      IOA::store(As[cur ^ 1], tid, ra);
      IOB::store(Bs[cur ^ 1], tid, rb);
    }
    __syncthreads();
    cur ^= 1;
  }

  epilogue<BM, BN, TM, TN, THREADS, kSmemFloats>(smem, acc, ty, tx, m0, n0, m, n, alpha, beta, c, bias, act, act_out);
}

// One operand's R x BK slice of a k-tile copied global -> shared memory asynchronously
// (cp.async through cuda_pipeline_primitives.h; no registers hold it on the way), into the same
// k-major layout and with the same thread -> element map as TileIO. Out-of-range elements are
// zero-filled (a zero-byte read from the base pointer). KCONTIG operands are transposed on the
// way, so their copies are 4 bytes each; the others move 16 bytes per copy when `vec`.
template <int R, int BK, int THREADS, bool KCONTIG>
struct TileAsync {
  using IO = TileIO<R, BK, THREADS, KCONTIG>;

  __device__ __forceinline__ static void copy4(float* dst, const float* base, const float* src, bool in) {
    if (in) {
      __pipeline_memcpy_async(dst, src, 4);
    } else {
      __pipeline_memcpy_async(dst, base, 4, 4);
    }
  }

  __device__ __forceinline__ static void issue(float (*tile)[R + kPad], const float* __restrict__ src, int rdim,
                                               int kdim, int r0, int k0, bool vec, int tid) {
#pragma unroll
    for (int s = 0; s < IO::L; ++s) {
      int r, p;
      IO::coords(tid, s, r, p);
      const int gr = r0 + r;
      const int gk = k0 + p;
      if (KCONTIG) {
        const bool rin = gr < rdim;
        const float* ptr = src + (long long)gr * kdim + gk;
#pragma unroll
        for (int q = 0; q < 4; ++q) copy4(&tile[p + q][r], src, ptr + q, rin && gk + q < kdim);
      } else {
        const float* ptr = src + (long long)gk * rdim + gr;
        const bool kin = gk < kdim;
        if (vec) {
          // rdim % 4 == 0 and gr % 4 == 0: the group is wholly inside or wholly outside.
          if (kin && gr < rdim) {
            __pipeline_memcpy_async(&tile[p][r], ptr, 16);
          } else {
            __pipeline_memcpy_async(&tile[p][r], src, 16, 16);
          }
        } else {
#pragma unroll
          for (int q = 0; q < 4; ++q) copy4(&tile[p][r + q], src, ptr + q, kin && gr + q < rdim);
        }
      }
    }
  }
};

// The pipelined version: the same block tile, thread tile, math and epilogue as gemm_body, but
// the k-tiles move global -> shared with asynchronous copies into STAGES shared buffers, up to
// STAGES - 1 tiles ahead of the math, with one __syncthreads per k-tile. Registers hold only
// the accumulators and the fragments (no staging registers), so BK can grow without spills.
template <int BM, int BN, int BK, int TM, int TN, int STAGES, bool TA, bool TB>
__device__ __forceinline__ void gemm_async_body(int m, int n, int k, float alpha, const float* __restrict__ a,
                                                const float* __restrict__ b, float beta, float* c,
                                                const float* bias, int act, float* act_out) {
  constexpr int THREADS = (BM / TM) * (BN / TN);
  static_assert(TM % 4 == 0 && TN % 4 == 0, "thread tile must be groups of 4");
  static_assert((BN / TN) % 8 == 0 && (BM / TM) % 4 == 0, "warp shape is 4 x 8 threads");
  static_assert(STAGES >= 2, "at least two buffers");
  using IOA = TileAsync<BM, BK, THREADS, !TA>;
  using IOB = TileAsync<BN, BK, THREADS, TB>;
  constexpr int kAsFloats = STAGES * BK * (BM + kPad);
  constexpr int kSmemFloats = kAsFloats + STAGES * BK * (BN + kPad);
  __shared__ __align__(16) float smem[kSmemFloats];
  float (*As)[BK][BM + kPad] = reinterpret_cast<float (*)[BK][BM + kPad]>(smem);
  float (*Bs)[BK][BN + kPad] = reinterpret_cast<float (*)[BK][BN + kPad]>(smem + kAsFloats);

  const int tid = threadIdx.x;
  int ty, tx;
  thread_coords<BN, TN>(tid, ty, tx);
  const int m0 = blockIdx.y * BM;
  const int n0 = blockIdx.x * BN;
  const bool veca = (TA ? (m % 4 == 0) : (k % 4 == 0)) && tessera_aligned16(a);
  const bool vecb = (TB ? (k % 4 == 0) : (n % 4 == 0)) && tessera_aligned16(b);
  const int ktiles = (k + BK - 1) / BK;

  float acc[TM][TN];
#pragma unroll
  for (int i = 0; i < TM; ++i)
#pragma unroll
    for (int j = 0; j < TN; ++j) acc[i][j] = 0.0f;

  // Prologue: tiles 0 .. STAGES-2 in flight, one commit group each (empty past the end, so
  // that tile t is always group t).
#pragma unroll
  for (int s = 0; s < STAGES - 1; ++s) {
    if (s < ktiles) {
      IOA::issue(As[s], a, m, k, m0, s * BK, veca, tid);
      IOB::issue(Bs[s], b, n, k, n0, s * BK, vecb, tid);
    }
    __pipeline_commit();
  }
  for (int kt = 0; kt < ktiles; ++kt) {
    // This thread's copies of tile kt have landed (later groups may still be in flight) ...
    __pipeline_wait_prior(STAGES - 2);
    // ... and everyone's; and everyone has finished the math of tile kt-1, whose buffer the
    // copies issued next overwrite.
    __syncthreads();
    const int nt = kt + STAGES - 1;
    if (nt < ktiles) {
      IOA::issue(As[nt % STAGES], a, m, k, m0, nt * BK, veca, tid);
      IOB::issue(Bs[nt % STAGES], b, n, k, n0, nt * BK, vecb, tid);
    }
    __pipeline_commit();
    tile_math<BM, BN, BK, TM, TN>(As[kt % STAGES], Bs[kt % STAGES], ty, tx, acc);
  }
  __pipeline_wait_prior(0);
  __syncthreads();  // every thread's math is done before the tiles' memory stages C
  epilogue<BM, BN, TM, TN, THREADS, kSmemFloats>(smem, acc, ty, tx, m0, n0, m, n, alpha, beta, c, bias, act, act_out);
}

// The block shapes the host launches (common.cuh) are the ones the templates below compute.
static_assert(TESSERA_GEMM_BM == 128 && TESSERA_GEMM_BN == 128, "gemm_*, gemm_pipe*, gemm_wide*: 128 x 128 tiles");
static_assert((128 / 8) * (128 / 8) == TESSERA_GEMM_THREADS, "gemm_*, gemm_pipe*: 8 x 8 outputs per thread");
static_assert((128 / 8) * (128 / 16) == TESSERA_GEMM_WIDE_THREADS, "gemm_wide*: 8 x 16 outputs per thread");
static_assert(TESSERA_GEMM_SMALL_BM == 64 && TESSERA_GEMM_SMALL_BN == 64 &&
                  (64 / 4) * (64 / 4) == TESSERA_GEMM_SMALL_THREADS,
              "gemm_small_*: 64 x 64 tiles, 4 x 4 outputs per thread");

}  // namespace

// ---- 128 x 128 tiles --------------------------------------------------------------------------
extern "C" __global__ __launch_bounds__(256, 2) void gemm_nn(int m, int n, int k, float alpha, const float* a, const float* b, float beta, float* c, const float* bias_opt, int act, float* act_out_opt) {
  gemm_body<128, 128, 8, 8, 8, false, false>(m, n, k, 0, k, alpha, a, b, beta, c, bias_opt, act, act_out_opt);
}
extern "C" __global__ __launch_bounds__(256, 2) void gemm_nt(int m, int n, int k, float alpha, const float* a, const float* b, float beta, float* c, const float* bias_opt, int act, float* act_out_opt) {
  gemm_body<128, 128, 8, 8, 8, false, true>(m, n, k, 0, k, alpha, a, b, beta, c, bias_opt, act, act_out_opt);
}
extern "C" __global__ __launch_bounds__(256, 2) void gemm_tn(int m, int n, int k, float alpha, const float* a, const float* b, float beta, float* c, const float* bias_opt, int act, float* act_out_opt) {
  gemm_body<128, 128, 8, 8, 8, true, false>(m, n, k, 0, k, alpha, a, b, beta, c, bias_opt, act, act_out_opt);
}
extern "C" __global__ __launch_bounds__(256, 2) void gemm_tt(int m, int n, int k, float alpha, const float* a, const float* b, float beta, float* c, const float* bias_opt, int act, float* act_out_opt) {
  gemm_body<128, 128, 8, 8, 8, true, true>(m, n, k, 0, k, alpha, a, b, beta, c, bias_opt, act, act_out_opt);
}

// ---- 64 x 64 tiles ----------------------------------------------------------------------------
extern "C" __global__ __launch_bounds__(256) void gemm_small_nn(int m, int n, int k, float alpha, const float* a, const float* b, float beta, float* c, const float* bias_opt, int act, float* act_out_opt) {
  gemm_body<64, 64, 16, 4, 4, false, false>(m, n, k, 0, k, alpha, a, b, beta, c, bias_opt, act, act_out_opt);
}
extern "C" __global__ __launch_bounds__(256) void gemm_small_nt(int m, int n, int k, float alpha, const float* a, const float* b, float beta, float* c, const float* bias_opt, int act, float* act_out_opt) {
  gemm_body<64, 64, 16, 4, 4, false, true>(m, n, k, 0, k, alpha, a, b, beta, c, bias_opt, act, act_out_opt);
}
extern "C" __global__ __launch_bounds__(256) void gemm_small_tn(int m, int n, int k, float alpha, const float* a, const float* b, float beta, float* c, const float* bias_opt, int act, float* act_out_opt) {
  gemm_body<64, 64, 16, 4, 4, true, false>(m, n, k, 0, k, alpha, a, b, beta, c, bias_opt, act, act_out_opt);
}
extern "C" __global__ __launch_bounds__(256) void gemm_small_tt(int m, int n, int k, float alpha, const float* a, const float* b, float beta, float* c, const float* bias_opt, int act, float* act_out_opt) {
  gemm_body<64, 64, 16, 4, 4, true, true>(m, n, k, 0, k, alpha, a, b, beta, c, bias_opt, act, act_out_opt);
}

// ---- split-K: the 64 x 64 tile over one k chunk per grid.z, then a fixed-order sum -----------
extern "C" __global__ __launch_bounds__(256) void gemm_splitk_nn(int m, int n, int k, int kc, const float* a, const float* b, float* ws) {
  const int kb = blockIdx.z * kc, ke = min(k, kb + kc);
  gemm_body<64, 64, 16, 4, 4, false, false>(m, n, k, kb, ke, 1.0f, a, b, 0.0f, ws + (long long)blockIdx.z * m * n, nullptr, TESSERA_ACT_NONE, nullptr);
}
extern "C" __global__ __launch_bounds__(256) void gemm_splitk_nt(int m, int n, int k, int kc, const float* a, const float* b, float* ws) {
  const int kb = blockIdx.z * kc, ke = min(k, kb + kc);
  gemm_body<64, 64, 16, 4, 4, false, true>(m, n, k, kb, ke, 1.0f, a, b, 0.0f, ws + (long long)blockIdx.z * m * n, nullptr, TESSERA_ACT_NONE, nullptr);
}
extern "C" __global__ __launch_bounds__(256) void gemm_splitk_tn(int m, int n, int k, int kc, const float* a, const float* b, float* ws) {
  const int kb = blockIdx.z * kc, ke = min(k, kb + kc);
  gemm_body<64, 64, 16, 4, 4, true, false>(m, n, k, kb, ke, 1.0f, a, b, 0.0f, ws + (long long)blockIdx.z * m * n, nullptr, TESSERA_ACT_NONE, nullptr);
}
extern "C" __global__ __launch_bounds__(256) void gemm_splitk_tt(int m, int n, int k, int kc, const float* a, const float* b, float* ws) {
  const int kb = blockIdx.z * kc, ke = min(k, kb + kc);
  gemm_body<64, 64, 16, 4, 4, true, true>(m, n, k, kb, ke, 1.0f, a, b, 0.0f, ws + (long long)blockIdx.z * m * n, nullptr, TESSERA_ACT_NONE, nullptr);
}
extern "C" __global__ __launch_bounds__(256) void gemm_splitk_reduce(long long mn, int n, int splits, const float* ws, float alpha, float beta, float* c, const float* bias_opt, int act, float* act_out_opt) {
  const long long stride = (long long)gridDim.x * blockDim.x;
  for (long long e = (long long)blockIdx.x * blockDim.x + threadIdx.x; e < mn; e += stride) {
    float acc = 0.0f;
    for (int z = 0; z < splits; ++z) acc += __ldg(ws + (long long)z * mn + e);
    float x = alpha * acc;
    if (beta != 0.0f) x += beta * c[e];
    if (bias_opt != nullptr) x += __ldg(bias_opt + e % n);
    if (act_out_opt != nullptr) {
      c[e] = x;
      act_out_opt[e] = tessera_act(act, x);
    } else {
      c[e] = act != TESSERA_ACT_NONE ? tessera_act(act, x) : x;
    }
  }
}

// ---- 128 x 128 tiles, pipelined with asynchronous copies (sm_80 and later) ---------------------
// gemm_pipe8_*: BK = 8, three stages (25,344 B of shared memory); gemm_pipe16_*: BK = 16, two
// stages (33,792 B). Same launch shape as gemm_*: block (TESSERA_GEMM_THREADS,1,1), grid
// (ceil(n / TESSERA_GEMM_BN), ceil(m / TESSERA_GEMM_BM), 1), no dynamic shared memory.
extern "C" __global__ __launch_bounds__(256, 2) void gemm_pipe8_nn(int m, int n, int k, float alpha, const float* a, const float* b, float beta, float* c, const float* bias_opt, int act, float* act_out_opt) {
  gemm_async_body<128, 128, 8, 8, 8, 3, false, false>(m, n, k, alpha, a, b, beta, c, bias_opt, act, act_out_opt);
}
extern "C" __global__ __launch_bounds__(256, 2) void gemm_pipe8_nt(int m, int n, int k, float alpha, const float* a, const float* b, float beta, float* c, const float* bias_opt, int act, float* act_out_opt) {
  gemm_async_body<128, 128, 8, 8, 8, 3, false, true>(m, n, k, alpha, a, b, beta, c, bias_opt, act, act_out_opt);
}
extern "C" __global__ __launch_bounds__(256, 2) void gemm_pipe8_tn(int m, int n, int k, float alpha, const float* a, const float* b, float beta, float* c, const float* bias_opt, int act, float* act_out_opt) {
  gemm_async_body<128, 128, 8, 8, 8, 3, true, false>(m, n, k, alpha, a, b, beta, c, bias_opt, act, act_out_opt);
}
extern "C" __global__ __launch_bounds__(256, 2) void gemm_pipe8_tt(int m, int n, int k, float alpha, const float* a, const float* b, float beta, float* c, const float* bias_opt, int act, float* act_out_opt) {
  gemm_async_body<128, 128, 8, 8, 8, 3, true, true>(m, n, k, alpha, a, b, beta, c, bias_opt, act, act_out_opt);
}
extern "C" __global__ __launch_bounds__(256, 2) void gemm_pipe16_nn(int m, int n, int k, float alpha, const float* a, const float* b, float beta, float* c, const float* bias_opt, int act, float* act_out_opt) {
  gemm_async_body<128, 128, 16, 8, 8, 2, false, false>(m, n, k, alpha, a, b, beta, c, bias_opt, act, act_out_opt);
}
extern "C" __global__ __launch_bounds__(256, 2) void gemm_pipe16_nt(int m, int n, int k, float alpha, const float* a, const float* b, float beta, float* c, const float* bias_opt, int act, float* act_out_opt) {
  gemm_async_body<128, 128, 16, 8, 8, 2, false, true>(m, n, k, alpha, a, b, beta, c, bias_opt, act, act_out_opt);
}
extern "C" __global__ __launch_bounds__(256, 2) void gemm_pipe16_tn(int m, int n, int k, float alpha, const float* a, const float* b, float beta, float* c, const float* bias_opt, int act, float* act_out_opt) {
  gemm_async_body<128, 128, 16, 8, 8, 2, true, false>(m, n, k, alpha, a, b, beta, c, bias_opt, act, act_out_opt);
}
extern "C" __global__ __launch_bounds__(256, 2) void gemm_pipe16_tt(int m, int n, int k, float alpha, const float* a, const float* b, float beta, float* c, const float* bias_opt, int act, float* act_out_opt) {
  gemm_async_body<128, 128, 16, 8, 8, 2, true, true>(m, n, k, alpha, a, b, beta, c, bias_opt, act, act_out_opt);
}

// ---- 128 x 128 tiles, 128 threads of 8 x 16 outputs, pipelined -----------------------------------
// gemm_wide8_*: BK = 8, three stages; gemm_wide16_*: BK = 16, two stages. Half the threads of
// gemm_pipe*, twice the outputs each: 6 float4 shared loads per 128 FMA instead of 4 per 64.
// Launch: block (TESSERA_GEMM_WIDE_THREADS,1,1) = 128, grid as gemm_* (128 x 128 tiles).
extern "C" __global__ __launch_bounds__(128) void gemm_wide8_nn(int m, int n, int k, float alpha, const float* a, const float* b, float beta, float* c, const float* bias_opt, int act, float* act_out_opt) {
  gemm_async_body<128, 128, 8, 8, 16, 3, false, false>(m, n, k, alpha, a, b, beta, c, bias_opt, act, act_out_opt);
}
extern "C" __global__ __launch_bounds__(128) void gemm_wide8_nt(int m, int n, int k, float alpha, const float* a, const float* b, float beta, float* c, const float* bias_opt, int act, float* act_out_opt) {
  gemm_async_body<128, 128, 8, 8, 16, 3, false, true>(m, n, k, alpha, a, b, beta, c, bias_opt, act, act_out_opt);
}
extern "C" __global__ __launch_bounds__(128) void gemm_wide8_tn(int m, int n, int k, float alpha, const float* a, const float* b, float beta, float* c, const float* bias_opt, int act, float* act_out_opt) {
  gemm_async_body<128, 128, 8, 8, 16, 3, true, false>(m, n, k, alpha, a, b, beta, c, bias_opt, act, act_out_opt);
}
extern "C" __global__ __launch_bounds__(128) void gemm_wide8_tt(int m, int n, int k, float alpha, const float* a, const float* b, float beta, float* c, const float* bias_opt, int act, float* act_out_opt) {
  gemm_async_body<128, 128, 8, 8, 16, 3, true, true>(m, n, k, alpha, a, b, beta, c, bias_opt, act, act_out_opt);
}
extern "C" __global__ __launch_bounds__(128) void gemm_wide16_nn(int m, int n, int k, float alpha, const float* a, const float* b, float beta, float* c, const float* bias_opt, int act, float* act_out_opt) {
  gemm_async_body<128, 128, 16, 8, 16, 2, false, false>(m, n, k, alpha, a, b, beta, c, bias_opt, act, act_out_opt);
}
extern "C" __global__ __launch_bounds__(128) void gemm_wide16_nt(int m, int n, int k, float alpha, const float* a, const float* b, float beta, float* c, const float* bias_opt, int act, float* act_out_opt) {
  gemm_async_body<128, 128, 16, 8, 16, 2, false, true>(m, n, k, alpha, a, b, beta, c, bias_opt, act, act_out_opt);
}
extern "C" __global__ __launch_bounds__(128) void gemm_wide16_tn(int m, int n, int k, float alpha, const float* a, const float* b, float beta, float* c, const float* bias_opt, int act, float* act_out_opt) {
  gemm_async_body<128, 128, 16, 8, 16, 2, true, false>(m, n, k, alpha, a, b, beta, c, bias_opt, act, act_out_opt);
}
extern "C" __global__ __launch_bounds__(128) void gemm_wide16_tt(int m, int n, int k, float alpha, const float* a, const float* b, float beta, float* c, const float* bias_opt, int act, float* act_out_opt) {
  gemm_async_body<128, 128, 16, 8, 16, 2, true, true>(m, n, k, alpha, a, b, beta, c, bias_opt, act, act_out_opt);
}
