// loss.cu -- softmax cross-entropy over the rows of a logits matrix.
//
//   xent_fwd:     row_loss[r] = logsumexp(logits[r,:]) - logits[r, labels[r]]
//   xent_fwd_bwd: the same, plus dlogits[r,c] = scale * (softmax(logits[r,:])[c] - (c == labels[r]))
// logsumexp is computed stably as max + log(sum_c exp(x_c - max)), the max and the sum in one
// pass over the row (each lane rescales its running sum when its running max grows); the loss
// is written as log1p(others * exp(max - x_label)) while max - x_label <= 16 (others: the sum
// without the label's term, kept apart in the same pass), so that a row whose label holds the
// largest logit (loss about 0.01) does not lose its digits to log(sum) cancelling against
// max - x_label; as (max - x_label) + log(sum) above. Softmax is exp(x_c - max) / sum (a second
// pass, the backward only).
// (The MSE kernels, mse_partial and mse_bwd, live in reduce.cu next to partial_sum.)
//
// Vocabulary-parallel cross-entropy (the classes split over the ranks of a group; logits holds
// this rank's columns first..first+cols of each row of a rows x vocab matrix):
//   xent_part_stats(rows, cols, first, vocab, slots, slot, logits, labels, stats)
//     stats is rows x (slots + 1): the rank writes stats[r, slot] = log sum_c exp(logits[r, c])
//     over its columns (-inf with no columns), zero in the other slots < slots, and
//     stats[r, slots] = logits[r, labels[r] - first] when the label is its, else 0. Summed over
//     the ranks (one all-reduce of rows x (slots + 1) floats) stats hold every rank's
//     log-sum-exp and the label's logit; the logits never leave their rank. A label outside
//     0..vocab: NaN in the slot.
//   xent_part_bwd(rows, cols, first, slots, logits, labels, stats, scale, row_loss, dlogits)
//     From the summed stats: lse = the log-sum-exp of the slots (their max first), row_loss[r] =
//     lse - stats[r, slots], dlogits[r, c] = scale * (exp(logits[r, c] - lse) - (first + c ==
//     labels[r])) for the rank's columns (dlogits may equal logits).
//   Launch: as xent (one warp per row).
//
// Layout: logits and dlogits are rows x cols row-major f32 (ld = cols); labels has rows int32
// entries; row_loss has rows entries. dlogits may equal logits: each lane reads and writes only its own
// columns (c == lane mod 32), and a row's max, sum and logits[r, label] reach every lane through
// shuffles before any lane writes.
//
// Bad labels (< 0 or >= cols): nothing out of bounds is read; row_loss[r] = NaN, the whole row
// of dlogits = NaN, and atomicCAS(err, 0, r + 1) records the row, so *err ends as 1 + one of the
// bad rows (the first to get there), or stays 0. The host zeroes *err before the launch.
//
// Preconditions: rows >= 0, cols >= 1.
// Launch: one warp per row; block (TESSERA_XENT_THREADS,1,1) = 256 (8 rows per block),
//   grid (ceil(rows / (TESSERA_XENT_THREADS / 32)),1,1). Lanes stride over the columns by 32
//   (coalesced); max and sum are reduced with xor shuffles, so every lane holds the same value.
//   No __syncthreads, so warps past the last row simply return.
#include "common.cuh"

namespace {

template <bool BWD>
__device__ __forceinline__ void xent_row(int rows, int cols, const float* logits, const int* labels,
                                         float scale, float* row_loss, float* dlogits, int* err) {
  const int row = blockIdx.x * (TESSERA_XENT_THREADS / 32) + (threadIdx.x >> 5);
  const int lane = threadIdx.x & 31;
  if (row >= rows) return;  // whole warp
  const long long base = (long long)row * cols;
  const float* x = logits + base;
  const int label = labels[row];
  const float nan = __int_as_float(0x7fc00000);
  if (label < 0 || label >= cols) {
    if (lane == 0) {
      row_loss[row] = nan;
      atomicCAS(err, 0, row + 1);
    }
    if (BWD) {
      float* d = dlogits + base;
      for (int c = lane; c < cols; c += 32) d[c] = nan;
    }
    return;
  }

  // Each lane only ever touches columns c == lane (mod 32), in every pass; logits[r, label] is
  // picked up by its owning lane in the first pass and handed to the others through the
  // shuffle tree (the other lanes add exact zeros). So no lane reads a column another lane may
  // already have overwritten when dlogits aliases logits (lanes are not lock-step).
  // One pass for the max and the sum ("online" softmax): each lane keeps its running max m and
  // s = sum exp(x - m), rescaling s when m grows; the lanes then meet at the row's max.
  // so: the same sum without the label's term.
  float m = -INFINITY, s = 0.0f, so = 0.0f;
  float xl = 0.0f;
  for (int c = lane; c < cols; c += 32) {
    const float v = x[c];
    const float other = c == label ? 0.0f : 1.0f;
    if (c == label) xl = v;
    if (v > m) {
      const float r = expf(m - v);  // exp(-inf) = 0 for the lane's first column
      s = s * r + 1.0f;
      so = so * r + other;
      m = v;
    } else {
      const float e = expf(v - m);  // a NaN logit lands here and makes the row's loss NaN
      s += e;
      so += other * e;
    }
  }
  const float mx = tessera_warp_max(m);
  xl = tessera_warp_sum(xl);
  // Lanes without columns (cols < 32) hold m = -inf and s = 0, and add nothing.
  const float r = m == -INFINITY ? 0.0f : expf(m - mx);
  s = tessera_warp_sum(s * r);
  so = tessera_warp_sum(so * r);
  const float d = mx - xl;
  if (lane == 0) row_loss[row] = d <= 16.0f ? log1pf(so * expf(d)) : d + logf(s);

  if (BWD) {
    float* d = dlogits + base;
    for (int c = lane; c < cols; c += 32) {
      const float p = expf(x[c] - mx) / s;
      d[c] = scale * (p - (c == label ? 1.0f : 0.0f));
    }
  }
}

}  // namespace

extern "C" __global__ __launch_bounds__(256) void xent_part_stats(int rows, int cols, int first, int vocab, int slots, int slot, const float* logits, const int* labels, float* stats) {
  const int row = blockIdx.x * (TESSERA_XENT_THREADS / 32) + (threadIdx.x >> 5);
  const int lane = threadIdx.x & 31;
  if (row >= rows) return;  // whole warp
  const float* x = logits + (long long)row * cols;
  const int label = labels[row];
  float m = -INFINITY, s = 0.0f, z = 0.0f;
  for (int c = lane; c < cols; c += 32) {
    const float v = x[c];
    if (first + c == label) z = v;
    if (v > m) {
      s = s * expf(m - v) + 1.0f;
      m = v;
    } else {
      s += expf(v - m);
    }
  }
  const float mx = tessera_warp_max(m);
  s = tessera_warp_sum(m == -INFINITY ? 0.0f : s * expf(m - mx));
  z = tessera_warp_sum(z);
  if (lane == 0) {
    float* st = stats + (long long)row * (slots + 1);
    for (int k = 0; k < slots; ++k) st[k] = 0.0f;
    const bool bad = label < 0 || label >= vocab;
    st[slot] = bad ? __int_as_float(0x7fc00000) : (mx == -INFINITY ? -INFINITY : mx + logf(s));
    st[slots] = z;
  }
}

extern "C" __global__ __launch_bounds__(256) void xent_part_bwd(int rows, int cols, int first, int slots, const float* logits, const int* labels, const float* stats, float scale, float* row_loss, float* dlogits) {
  const int row = blockIdx.x * (TESSERA_XENT_THREADS / 32) + (threadIdx.x >> 5);
  const int lane = threadIdx.x & 31;
  if (row >= rows) return;  // whole warp
  const float* st = stats + (long long)row * (slots + 1);
  float mx = -INFINITY;
  bool nan = false;
  for (int k = 0; k < slots; ++k) {
    nan = nan || st[k] != st[k];
    mx = st[k] > mx ? st[k] : mx;
  }
  float s = 0.0f;
  for (int k = 0; k < slots; ++k)
    if (st[k] != -INFINITY) s += expf(st[k] - mx);
  const float lse = nan ? __int_as_float(0x7fc00000) : mx + logf(s);
  const int label = labels[row];
  if (lane == 0) row_loss[row] = lse - st[slots];
  const long long base = (long long)row * cols;
  for (int c = lane; c < cols; c += 32)
    dlogits[base + c] = scale * (expf(logits[base + c] - lse) - (first + c == label ? 1.0f : 0.0f));
}

extern "C" __global__ __launch_bounds__(256) void xent_fwd(int rows, int cols, const float* logits, const int* labels, float* row_loss, int* err) {
  xent_row<false>(rows, cols, logits, labels, 0.0f, row_loss, nullptr, err);
}

extern "C" __global__ __launch_bounds__(256) void xent_fwd_bwd(int rows, int cols, const float* logits, const int* labels, float scale, float* row_loss, float* dlogits, int* err) {
  xent_row<true>(rows, cols, logits, labels, scale, row_loss, dlogits, err);
}
