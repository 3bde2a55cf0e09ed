// The per-thread logic of the CUDA kernels in csrc/cuda/, as functions that compile for the device and for the host.
// The kernels call them on the GPU; host_kernels.cpp runs the same functions over the same grid and block shapes on
// the CPU, one thread after another (warp shuffles emulated with their exact semantics), so a CPU test checks which
// thread reads and writes which index, and every bound, without a GPU (tests/test_cuda_logic.py).
#pragma once

#include <cstdint>
#include <limits>

#ifdef __CUDACC__
#define PFEDMOAP_HD __host__ __device__ __forceinline__
#else
#define PFEDMOAP_HD inline
#endif

namespace pfedmoap {
namespace logic {

// ---------------------------------------------------------------- grid-stride loops
// Thread `thread` of block `block` visits first, first + stride, ... below the total.
struct GridStride {
  int64_t first;
  int64_t stride;
};

PFEDMOAP_HD GridStride grid_stride(int64_t block, int64_t block_dim, int64_t thread, int64_t grid_dim) {
  return {block * block_dim + thread, grid_dim * block_dim};
}

// ---------------------------------------------------------------- batched expert prompt assembly
// Output element `idx` (in copy units V, `units` per token row) of the [E * C, pre + n_ctx + seq, W] prompts:
// row e * C + c is [prefix[c]; ctx[e]; suffix[c]].
template <typename V>
PFEDMOAP_HD void assemble_forward_element(const V* prefix, const V* suffix, const V* ctx, V* out, int64_t classes,
                                          int64_t pre, int64_t n_ctx, int64_t seq, int64_t units, int64_t idx) {
  const int64_t length = pre + n_ctx + seq;
  const int64_t unit = idx % units;
  const int64_t token = idx / units;
  const int64_t pos = token % length;
  const int64_t r = token / length;
  const int64_t c = r % classes, e = r / classes;
  const V* src;
  if (pos < pre) {
    src = prefix + (c * pre + pos) * units;
  } else if (pos < pre + n_ctx) {
    src = ctx + (e * n_ctx + pos - pre) * units;
  } else {
    src = suffix + (c * seq + pos - pre - n_ctx) * units;
  }
  out[idx] = src[unit];
}

// Context gradient value `idx` = e * span + j (span = n_ctx * W): the sum over classes, in class order, of the output
// gradient at offset + j of every class's sequence of expert e, accumulated in acc_t.
template <typename scalar_t, typename acc_t>
PFEDMOAP_HD void assemble_backward_element(const scalar_t* grad, scalar_t* grad_ctx, int64_t classes,
                                           int64_t seq_stride, int64_t offset, int64_t span, int64_t idx) {
  const int64_t e = idx / span, j = idx % span;
  // neighbouring threads read neighbouring values of one class's context: coalesced
  const scalar_t* src = grad + e * classes * seq_stride + offset + j;
  acc_t acc = 0;
  for (int64_t c = 0; c < classes; ++c) acc += static_cast<acc_t>(src[c * seq_stride]);
  grad_ctx[idx] = static_cast<scalar_t>(acc);
}

// ---------------------------------------------------------------- KNN: float64 row norms
// The partial sum of squares lane `lane` of a warp adds up for row r of [n, p] rows (columns lane, lane + 32, ...).
template <typename in_t>
PFEDMOAP_HD double row_sq_norm_lane(const in_t* rows, int64_t r, int64_t p, int lane) {
  double sum = 0;
  for (int64_t j = lane; j < p; j += 32) {
    const double v = static_cast<double>(rows[r * p + j]);
    sum += v * v;
  }
  return sum;
}

// ---------------------------------------------------------------- KNN: the top-k merge
constexpr int64_t kNoId = std::numeric_limits<int64_t>::max();  // an empty slot's id

template <typename acc_t>
PFEDMOAP_HD bool before(acc_t d1, int64_t i1, acc_t d2, int64_t i2) {
  return d1 < d2 || (d1 == d2 && i1 < i2);  // ties to the lower id
}

// One step of the argmin over (key, id) pairs: keep the other pair when it comes first.
template <typename acc_t>
PFEDMOAP_HD void argmin_step(acc_t& d, int64_t& id, acc_t other_d, int64_t other_id) {
  if (before(other_d, other_id, d, id)) {
    d = other_d;
    id = other_id;
  }
}

// A thread's sorted list of its best entries, at most `take` <= MAXT of them.
template <typename acc_t, int MAXT>
struct TopList {
  acc_t d[MAXT];
  int64_t id[MAXT];
  int count = 0;

  PFEDMOAP_HD void insert(acc_t key, int64_t key_id, int take) {
    int pos = count < take ? count : take - 1;
    while (pos > 0 && before(key, key_id, d[pos - 1], id[pos - 1])) {
      d[pos] = d[pos - 1];
      id[pos] = id[pos - 1];
      --pos;
    }
    d[pos] = key;
    id[pos] = key_id;
    if (count < take) ++count;
  }

  // the entry a thread offers in a round of the block-wide argmin: its list's head, or (+inf, no id) when empty
  PFEDMOAP_HD void head(int at, acc_t& key, int64_t& key_id) const {
    key = at < count ? d[at] : std::numeric_limits<acc_t>::infinity();
    key_id = at < count ? id[at] : kNoId;
  }
};

// Phase 1 of the merge for thread `tid` of a block of `block_dim` threads working on one query: reload at most one
// entry of the query's previous list (row_d / row_i, `take` slots), then keep the best `take` of the keys of the
// block (pool rows col0 ..) it strides over. Keys that are not below +inf (invalid rows, NaN) are skipped.
template <typename acc_t, int MAXT>
PFEDMOAP_HD void knn_collect(const acc_t* key, int64_t col0, int64_t cols, const acc_t* row_d, const int64_t* row_i,
                             int take, int tid, int block_dim, TopList<acc_t, MAXT>& list) {
  const acc_t inf = std::numeric_limits<acc_t>::infinity();
  if (tid < take && row_i[tid] != kNoId) list.insert(row_d[tid], row_i[tid], take);
  for (int64_t j = tid; j < cols; j += block_dim) {
    const acc_t d = key[j];
    if (!(d < inf)) continue;
    const int64_t id = col0 + j;
    if (list.count < take || before(d, id, list.d[take - 1], list.id[take - 1])) list.insert(d, id, take);
  }
}

}  // namespace logic
}  // namespace pfedmoap
