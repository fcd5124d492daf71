// transformer.cu -- the transformer's own ops: token + position embedding, and LayerNorm.
//
// Layout: row-major, contiguous f32. A batch of B sequences of T positions is rows = B*T rows
// of c channels (row r is position r % T of sequence r / T).
//
// embed_fwd(rows, t, c, vocab, first, count, pos, ids, wte, wpe, out)
//   out[r, :] = wte[ids[r] - first, :] + pos * wpe[r % t, :], the token's row taken as 0 when
//   ids[r] is outside first..first+count (wte holds those count rows of a vocab x c table: the
//   whole table with first = 0, count = vocab; one rank's part of a vocabulary-parallel one
//   otherwise, pos = 1 on one rank and 0 on the others, the parts then summed). ids are token
//   ids held as f32 whole numbers (exact below 2^24); an id that is not a whole number in
//   0..vocab gives a NaN row (the host checks ids where they come from; the CPU refuses them).
//   wpe holds at least t x c. With first = 0, count = vocab and pos = 1 the bits are those of
//   wte[id] + wpe[p]. Launch: block (TESSERA_EMBED_THREADS,1,1), any grid (grid-stride over rows;
//   threads over c).
// embed_bwd_wte(rows, c, first, count, ids, dout, keep, dwte)
//   dwte[v, :] = keep * dwte[v, :] + sum over r with ids[r] == first + v of dout[r, :], r in
//   increasing order, for the count rows v of the table part: each block owns its rows of the
//   table and scans the ids, so no two blocks write one element and the sum's order does not
//   depend on timing (no atomics: same bits every run). keep == 0: dwte is not read. Launch:
//   block (TESSERA_EMBED_THREADS,1,1), grid (any, ceil(c / TESSERA_EMBED_THREADS), 1):
//   blockIdx.x grid-strides over the part's rows, blockIdx.y picks TESSERA_EMBED_THREADS
//   channels.
// embed_bwd_wpe(rows, t, c, dout, keep, dwpe)
//   dwpe[p, :] = keep * dwpe[p, :] + sum over b of dout[b*t + p, :], b in increasing order
//   (rows a multiple of t). Launch: as embed_bwd_wte, blockIdx.x grid-striding over positions.
//
// layernorm_fwd(rows, c, eps, x, gamma, beta, y, mean, rstd)
//   Per row: mean and variance in one pass (Welford per lane, lanes merged by Chan's formula
//   in a fixed butterfly, lane 0's result broadcast), rstd = 1 / sqrt(var + eps) with the
//   biased variance; y = (x - mean) * rstd * gamma + beta; mean[r], rstd[r] kept for backward.
// layernorm_bwd(rows, c, x, dy, gamma, mean, rstd, dx)
//   xhat = (x - mean) rstd, g = dy * gamma; dx = rstd (g - mean(g) - xhat mean(g xhat)): the two
//   row reductions in one pass, then the row written.
//   Both: one warp per row, block (TESSERA_LN_THREADS,1,1), any grid (grid-stride over rows).
// layernorm_dparams(rows, c, x, dy, mean, rstd, keep, dgamma, dbeta)
//   dgamma[j] = keep dgamma[j] + sum_r dy[r,j] xhat[r,j], dbeta[j] = keep dbeta[j] + sum_r dy[r,j]:
//   thread (tx, ty) of a block sums rows ty, ty + 8, ... of column 32 bx + tx in order, then the
//   8 partial sums are added in order (deterministic). keep == 0: not read.
//   Launch: block (TESSERA_COLSUM_COLS, TESSERA_COLSUM_ROWS, 1), grid (ceil(c / 32), 1, 1).
//
// Causal multi-head self-attention, fused (FlashAttention's online softmax: no T x T matrix in
// memory). qkv is rows x 3C (q, k, v side by side, as one projection makes them; head h uses
// channels [h d, h d + d) of each), out rows x C, lse one per (sequence, head, position) at
// ((b H + h) T + i). d = C / H <= TESSERA_ATTN_MAX_HEAD; scale = 1 / sqrt(d) from the host.
// attn_fwd(b, t, h, d, scale, qkv, out, lse)
//   One warp per query row: lanes hold elements lane, lane + 32, ... of q and of the output
//   accumulator; for each key j <= i in order: s = scale q.k_j (a fixed butterfly sum), the
//   running max and normaliser updated, the accumulator rescaled and p v_j added. out = acc / l,
//   lse = m + log l (what the backward recomputes the probabilities from).
// attn_bwd_dq(b, t, h, d, scale, qkv, out, dout, lse, dsum, dqkv)
//   One warp per query row: dsum = dout.out for the row (kept for attn_bwd_dkv), then for each
//   key j <= i: p = exp(s - lse), ds = p (dout.v_j - dsum), dq += scale ds k_j; writes the q
//   part of dqkv.
// attn_bwd_dkv(b, t, h, d, scale, qkv, dout, lse, dsum, dqkv)
//   One warp per key row j, after attn_bwd_dq: for each query i >= j in order, the same p and ds
//   recomputed: dv += p dout_i, dk += scale ds q_i; writes the k and v parts of dqkv.
//   Every sum runs in a fixed order, so the backward gives the same bits every run.
//   Launch (all three): block (TESSERA_ATTN_THREADS,1,1), any grid: warps grid-stride over the
//   b h t rows (fewer than 2^31).
#include "common.cuh"

namespace {

constexpr int kAttnPerLane = TESSERA_ATTN_MAX_HEAD / 32;

// The dot product of a row held by a warp (element lane + 32 e in a[e]) with the row at p (d
// elements), summed in a fixed butterfly: every lane gets the same bits.
__device__ __forceinline__ float warp_dot(const float (&a)[kAttnPerLane], const float* p, int d, int lane) {
  float s = 0.0f;
#pragma unroll
  for (int e = 0; e < kAttnPerLane; ++e) {
    const int k = lane + 32 * e;
    if (k < d) s += a[e] * p[k];
  }
  return tessera_warp_sum(s);
}

// Where warp row w of the b h t rows sits: (sequence, head, position) order, as lse is laid
// out. 32-bit divisions (a 64-bit one is a call with a stack frame): b h t < 2^31 (the host
// checks).
struct AttnRow {
  int pos;
  int head;
  long long row0;  // the sequence's first row of qkv / out
};

__device__ __forceinline__ AttnRow attn_row(long long w, int t, int h) {
  const int wi = (int)w;
  return AttnRow{wi % t, (wi / t) % h, (long long)(wi / (t * h)) * t};
}

__device__ __forceinline__ void warp_load(float (&a)[kAttnPerLane], const float* p, int d, int lane) {
#pragma unroll
  for (int e = 0; e < kAttnPerLane; ++e) {
    const int k = lane + 32 * e;
    a[e] = k < d ? p[k] : 0.0f;
  }
}

// Chan et al.'s merge of (n, mean, m2) with (nb, mb, m2b) into the first.
__device__ __forceinline__ void welford_merge(float& n, float& mean, float& m2, float nb, float mb, float m2b) {
  const float nt = n + nb;
  if (nt == 0.0f) return;
  const float d = mb - mean;
  const float f = nb / nt;
  mean = mean + d * f;
  m2 = m2 + m2b + d * d * n * f;
  n = nt;
}

// The mean and 1/sqrt(var + eps) of a row of c floats, computed by one warp; every lane gets
// lane 0's bits.
__device__ __forceinline__ void row_stats(const float* xr, int c, float eps, int lane, float& mean, float& rstd) {
  float n = 0.0f, mu = 0.0f, m2 = 0.0f;
  for (int j = lane; j < c; j += 32) {
    const float v = xr[j];
    n += 1.0f;
    const float d = v - mu;
    mu += d / n;
    m2 += d * (v - mu);
  }
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    const float nb = __shfl_xor_sync(0xffffffffu, n, off);
    const float mb = __shfl_xor_sync(0xffffffffu, mu, off);
    const float m2b = __shfl_xor_sync(0xffffffffu, m2, off);
    welford_merge(n, mu, m2, nb, mb, m2b);
  }
  mean = __shfl_sync(0xffffffffu, mu, 0);
  const float var = __shfl_sync(0xffffffffu, m2, 0) / (float)c;
  rstd = 1.0f / sqrtf(var + eps);
}

}  // namespace

extern "C" __global__ __launch_bounds__(256) void embed_fwd(int rows, int t, int c, int vocab, int first, int count, float pos, const float* ids, const float* wte, const float* wpe, float* out) {
  for (int r = blockIdx.x; r < rows; r += gridDim.x) {
    const float f = ids[r];
    const bool ok = f >= 0.0f && f < (float)vocab && f == floorf(f);
    const bool mine = ok && f >= (float)first && f < (float)first + (float)count;
    const long long w = mine ? ((long long)f - first) * c : 0;
    const long long p = (long long)(r % t) * c;
    const long long o = (long long)r * c;
    for (int j = threadIdx.x; j < c; j += blockDim.x)
      out[o + j] = ok ? (mine ? wte[w + j] : 0.0f) + pos * wpe[p + j] : __int_as_float(0x7fc00000);
  }
}

extern "C" __global__ __launch_bounds__(256) void embed_bwd_wte(int rows, int c, int first, int count, const float* ids, const float* dout, float keep, float* dwte) {
  const int j = blockIdx.y * blockDim.x + threadIdx.x;
  for (int v = blockIdx.x; v < count; v += gridDim.x) {
    if (j >= c) continue;
    const float fv = (float)(first + v);
    float acc = 0.0f;
    for (int r = 0; r < rows; ++r)
      if (ids[r] == fv) acc += dout[(long long)r * c + j];
    const long long o = (long long)v * c + j;
    dwte[o] = keep != 0.0f ? keep * dwte[o] + acc : acc;
  }
}

extern "C" __global__ __launch_bounds__(256) void embed_bwd_wpe(int rows, int t, int c, const float* dout, float keep, float* dwpe) {
  const int j = blockIdx.y * blockDim.x + threadIdx.x;
  if (j >= c) return;
  for (int p = blockIdx.x; p < t; p += gridDim.x) {
    float acc = 0.0f;
    for (int r = p; r < rows; r += t) acc += dout[(long long)r * c + j];
    const long long o = (long long)p * c + j;
    dwpe[o] = keep != 0.0f ? keep * dwpe[o] + acc : acc;
  }
}

extern "C" __global__ __launch_bounds__(256) void layernorm_fwd(int rows, int c, float eps, const float* x, const float* gamma, const float* beta, float* y, float* mean, float* rstd) {
  const int lane = threadIdx.x & 31;
  const int warps = blockDim.x >> 5;
  for (int r = blockIdx.x * warps + (threadIdx.x >> 5); r < rows; r += gridDim.x * warps) {
    const float* xr = x + (long long)r * c;
    float mu, rs;
    row_stats(xr, c, eps, lane, mu, rs);
    float* yr = y + (long long)r * c;
    for (int j = lane; j < c; j += 32) yr[j] = (xr[j] - mu) * rs * gamma[j] + beta[j];
    if (lane == 0) {
      mean[r] = mu;
      rstd[r] = rs;
    }
  }
}

extern "C" __global__ __launch_bounds__(256) void layernorm_bwd(int rows, int c, const float* x, const float* dy, const float* gamma, const float* mean, const float* rstd, float* dx) {
  const int lane = threadIdx.x & 31;
  const int warps = blockDim.x >> 5;
  for (int r = blockIdx.x * warps + (threadIdx.x >> 5); r < rows; r += gridDim.x * warps) {
    const long long o = (long long)r * c;
    const float mu = mean[r], rs = rstd[r];
    float sg = 0.0f, sgx = 0.0f;
    for (int j = lane; j < c; j += 32) {
      const float g = dy[o + j] * gamma[j];
      sg += g;
      sgx += g * (x[o + j] - mu) * rs;
    }
    sg = tessera_warp_sum(sg) / (float)c;
    sgx = tessera_warp_sum(sgx) / (float)c;
    for (int j = lane; j < c; j += 32) {
      const float xh = (x[o + j] - mu) * rs;
      dx[o + j] = rs * (dy[o + j] * gamma[j] - sg - xh * sgx);
    }
  }
}

extern "C" __global__ __launch_bounds__(256) void layernorm_dparams(int rows, int c, const float* x, const float* dy, const float* mean, const float* rstd, float keep, float* dgamma, float* dbeta) {
  __shared__ float sg[TESSERA_COLSUM_ROWS][TESSERA_COLSUM_COLS + 1];
  __shared__ float sb[TESSERA_COLSUM_ROWS][TESSERA_COLSUM_COLS + 1];
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int j = blockIdx.x * TESSERA_COLSUM_COLS + tx;
  float ag = 0.0f, ab = 0.0f;
  if (j < c) {
    for (int r = ty; r < rows; r += TESSERA_COLSUM_ROWS) {
      const long long o = (long long)r * c + j;
      const float d = dy[o];
      ag += d * (x[o] - mean[r]) * rstd[r];
      ab += d;
    }
  }
  sg[ty][tx] = ag;
  sb[ty][tx] = ab;
  __syncthreads();
  if (ty == 0 && j < c) {
    float g = 0.0f, b = 0.0f;
    for (int q = 0; q < TESSERA_COLSUM_ROWS; ++q) {
      g += sg[q][tx];
      b += sb[q][tx];
    }
    dgamma[j] = keep != 0.0f ? keep * dgamma[j] + g : g;
    dbeta[j] = keep != 0.0f ? keep * dbeta[j] + b : b;
  }
}

extern "C" __global__ __launch_bounds__(256) void attn_fwd(int b, int t, int h, int d, float scale, const float* qkv, float* out, float* lse) {
  const int lane = threadIdx.x & 31;
  const long long c = (long long)h * d, stride = 3 * c;
  const long long total = (long long)b * h * t;
  const long long warps = (long long)gridDim.x * (blockDim.x >> 5);
  for (long long w = (long long)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5); w < total; w += warps) {
    const AttnRow at = attn_row(w, t, h);
    const int i = at.pos, hh = at.head;
    const long long row0 = at.row0;
    float q[kAttnPerLane], acc[kAttnPerLane];
    warp_load(q, qkv + (row0 + i) * stride + (long long)hh * d, d, lane);
#pragma unroll
    for (int e = 0; e < kAttnPerLane; ++e) acc[e] = 0.0f;
    float m = -INFINITY, l = 0.0f;
    for (int j = 0; j <= i; ++j) {
      const float* kj = qkv + (row0 + j) * stride + c + (long long)hh * d;
      const float s = scale * warp_dot(q, kj, d, lane);
      const float mn = fmaxf(m, s);
      const float alpha = expf(m - mn);
      const float p = expf(s - mn);
      l = l * alpha + p;
      const float* vj = kj + c;
#pragma unroll
      for (int e = 0; e < kAttnPerLane; ++e) {
        const int k = lane + 32 * e;
        acc[e] = acc[e] * alpha + (k < d ? p * vj[k] : 0.0f);
      }
      m = mn;
    }
    float* o = out + (row0 + i) * c + (long long)hh * d;
    const float inv = 1.0f / l;
#pragma unroll
    for (int e = 0; e < kAttnPerLane; ++e) {
      const int k = lane + 32 * e;
      if (k < d) o[k] = acc[e] * inv;
    }
    if (lane == 0) lse[w] = m + logf(l);
  }
}

extern "C" __global__ __launch_bounds__(256) void attn_bwd_dq(int b, int t, int h, int d, float scale, const float* qkv, const float* out, const float* dout, const float* lse, float* dsum, float* dqkv) {
  const int lane = threadIdx.x & 31;
  const long long c = (long long)h * d, stride = 3 * c;
  const long long total = (long long)b * h * t;
  const long long warps = (long long)gridDim.x * (blockDim.x >> 5);
  for (long long w = (long long)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5); w < total; w += warps) {
    const AttnRow at = attn_row(w, t, h);
    const int i = at.pos, hh = at.head;
    const long long row0 = at.row0;
    float q[kAttnPerLane], g[kAttnPerLane], dq[kAttnPerLane];
    warp_load(q, qkv + (row0 + i) * stride + (long long)hh * d, d, lane);
    warp_load(g, dout + (row0 + i) * c + (long long)hh * d, d, lane);
    const float dd = warp_dot(g, out + (row0 + i) * c + (long long)hh * d, d, lane);
    if (lane == 0) dsum[w] = dd;
    const float li = lse[w];
#pragma unroll
    for (int e = 0; e < kAttnPerLane; ++e) dq[e] = 0.0f;
    for (int j = 0; j <= i; ++j) {
      const float* kj = qkv + (row0 + j) * stride + c + (long long)hh * d;
      const float p = expf(scale * warp_dot(q, kj, d, lane) - li);
      const float ds = p * (warp_dot(g, kj + c, d, lane) - dd);
#pragma unroll
      for (int e = 0; e < kAttnPerLane; ++e) {
        const int k = lane + 32 * e;
        if (k < d) dq[e] += scale * ds * kj[k];
      }
    }
    float* o = dqkv + (row0 + i) * stride + (long long)hh * d;
#pragma unroll
    for (int e = 0; e < kAttnPerLane; ++e) {
      const int k = lane + 32 * e;
      if (k < d) o[k] = dq[e];
    }
  }
}

extern "C" __global__ __launch_bounds__(256) void attn_bwd_dkv(int b, int t, int h, int d, float scale, const float* qkv, const float* dout, const float* lse, const float* dsum, float* dqkv) {
  const int lane = threadIdx.x & 31;
  const long long c = (long long)h * d, stride = 3 * c;
  const long long total = (long long)b * h * t;
  const long long warps = (long long)gridDim.x * (blockDim.x >> 5);
  for (long long w = (long long)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5); w < total; w += warps) {
    const AttnRow at = attn_row(w, t, h);
    const int j = at.pos, hh = at.head;
    const long long row0 = at.row0;
    const long long base = w - j;  // the (sequence, head)'s first row
    float kk[kAttnPerLane], vv[kAttnPerLane], dk[kAttnPerLane], dv[kAttnPerLane];
    warp_load(kk, qkv + (row0 + j) * stride + c + (long long)hh * d, d, lane);
    warp_load(vv, qkv + (row0 + j) * stride + 2 * c + (long long)hh * d, d, lane);
#pragma unroll
    for (int e = 0; e < kAttnPerLane; ++e) {
      dk[e] = 0.0f;
      dv[e] = 0.0f;
    }
    for (int i = j; i < t; ++i) {
      const float* qi = qkv + (row0 + i) * stride + (long long)hh * d;
      const float* gi = dout + (row0 + i) * c + (long long)hh * d;
      const float p = expf(scale * warp_dot(kk, qi, d, lane) - lse[base + i]);
      const float ds = p * (warp_dot(vv, gi, d, lane) - dsum[base + i]);
#pragma unroll
      for (int e = 0; e < kAttnPerLane; ++e) {
        const int k = lane + 32 * e;
        if (k < d) {
          dv[e] += p * gi[k];
          dk[e] += scale * ds * qi[k];
        }
      }
    }
    float* ok = dqkv + (row0 + j) * stride + c + (long long)hh * d;
#pragma unroll
    for (int e = 0; e < kAttnPerLane; ++e) {
      const int k = lane + 32 * e;
      if (k < d) {
        ok[k] = dk[e];
        ok[c + k] = dv[e];
      }
    }
  }
}
