// CUDA parts of the KNN: float64 row norms, and the top-k kernel that merges one block of keys (the lower or upper
// bounds of knn.cpp's filter) into the running list of every query (the blocked loop, the GEMM, the bounds and the
// exact re-rank are in knn.cpp).
#include "../kernel_logic.h"
#include "../pfedmoap.h"

#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <algorithm>
#include <cstdint>
#include <limits>

namespace pfedmoap {

namespace {

constexpr int kThreads = kKernelThreads;  // >= kKnnKernelMaxTake: each thread reloads at most one previous best entry
constexpr int64_t kNoId = logic::kNoId;
static_assert(kThreads >= kKnnKernelMaxTake, "one previous best entry per thread");

// One warp per row: each lane's partial sum (logic::row_sq_norm_lane), then a shuffle-down tree, in float64
// (knn.cpp's bound allows any summation order).
template <typename in_t>
__global__ void row_sq_norms_kernel(const in_t* __restrict__ rows, double* __restrict__ out, int64_t n, int64_t p) {
  const int lane = threadIdx.x % 32;
  const logic::GridStride loop = logic::grid_stride(blockIdx.x, blockDim.x, threadIdx.x, gridDim.x);
  for (int64_t r = loop.first / 32; r < n; r += loop.stride / 32) {
    double sum = logic::row_sq_norm_lane(rows, r, p, lane);
    for (int offset = 16; offset > 0; offset /= 2) sum += __shfl_down_sync(0xffffffffu, sum, offset);
    if (lane == 0) out[r] = sum;
  }
}

template <typename acc_t>
__device__ __forceinline__ void argmin_warp(acc_t& d, int64_t& id) {
  for (int offset = 16; offset > 0; offset /= 2) {
    const acc_t od = __shfl_down_sync(0xffffffffu, d, offset);
    const int64_t oi = static_cast<int64_t>(__shfl_down_sync(0xffffffffu, static_cast<long long>(id), offset));
    logic::argmin_step(d, id, od, oi);
  }
}

// One block per query. Each thread keeps a sorted list of its best `take` entries among the block's columns it
// strides over (plus at most one entry of the previous list: logic::knn_collect); then `take` rounds of a block-wide
// argmin over the list heads write the merged list back in order. MAXT bounds `take` at compile time (local arrays).
template <typename acc_t, int MAXT>
__global__ void __launch_bounds__(kThreads) knn_merge_kernel(const acc_t* __restrict__ keys, int64_t col0,
                                                             int64_t cols, acc_t* __restrict__ best_d,
                                                             int64_t* __restrict__ best_i, int take) {
  const acc_t inf = std::numeric_limits<acc_t>::infinity();
  const int64_t q = blockIdx.x;
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  acc_t* row_d = best_d + q * take;
  int64_t* row_i = best_i + q * take;

  logic::TopList<acc_t, MAXT> list;
  logic::knn_collect<acc_t, MAXT>(keys + q * cols, col0, cols, row_d, row_i, take, tid, blockDim.x, list);

  __shared__ acc_t warp_d[kThreads / 32];
  __shared__ int64_t warp_i[kThreads / 32];
  __shared__ int64_t winner;
  int head = 0;
  for (int r = 0; r < take; ++r) {
    acc_t d;
    int64_t id;
    list.head(head, d, id);
    argmin_warp(d, id);
    if (lane == 0) {
      warp_d[warp] = d;
      warp_i[warp] = id;
    }
    __syncthreads();  // also orders every thread's read of the previous best before its overwrite below
    if (warp == 0) {
      const int warps = blockDim.x / 32;
      d = lane < warps ? warp_d[lane] : inf;
      id = lane < warps ? warp_i[lane] : kNoId;
      argmin_warp(d, id);
      if (lane == 0) {
        winner = id;
        row_d[r] = d;
        row_i[r] = id;
      }
    }
    __syncthreads();
    if (head < list.count && list.id[head] == winner) ++head;  // ids are unique: exactly one thread advances
  }
}

template <int MAXT>
void launch_merge(const at::Tensor& keys, int64_t col0, at::Tensor& best_d, at::Tensor& best_i, int64_t take) {
  auto stream = at::cuda::getCurrentCUDAStream();
  knn_merge_kernel<double, MAXT><<<keys.size(0), kThreads, 0, stream>>>(
      keys.data_ptr<double>(), col0, keys.size(1), best_d.data_ptr<double>(), best_i.data_ptr<int64_t>(),
      static_cast<int>(take));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

at::Tensor row_sq_norms_cuda(const at::Tensor& rows) {
  c10::cuda::CUDAGuard guard(rows.device());
  auto x = rows.contiguous();
  const int64_t n = x.size(0), p = x.size(1);
  auto out = at::empty({n}, x.options().dtype(at::kDouble));
  if (n == 0) return out;
  auto stream = at::cuda::getCurrentCUDAStream();
  const int64_t blocks = std::max<int64_t>(1, std::min<int64_t>((n * 32 + kThreads - 1) / kThreads, 65535));
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "row_sq_norms_cuda", [&] {
    row_sq_norms_kernel<scalar_t>
        <<<blocks, kThreads, 0, stream>>>(x.data_ptr<scalar_t>(), out.data_ptr<double>(), n, p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

void knn_merge_block_cuda(const at::Tensor& keys, int64_t col0, at::Tensor& best_d, at::Tensor& best_i, int64_t take) {
  TORCH_CHECK(take >= 1 && take <= kKnnKernelMaxTake, "knn_merge_block_cuda: take out of range");
  TORCH_CHECK(keys.is_contiguous() && best_d.is_contiguous() && best_i.is_contiguous(),
              "knn_merge_block_cuda: contiguous inputs expected");
  TORCH_CHECK(keys.scalar_type() == at::kDouble && best_d.scalar_type() == at::kDouble &&
                  best_i.scalar_type() == at::kLong,
              "knn_merge_block_cuda: float64 keys and lists, long ids expected");
  TORCH_CHECK(keys.size(0) == best_d.size(0) && best_d.sizes() == best_i.sizes() && best_d.size(1) == take,
              "knn_merge_block_cuda: shapes do not match");
  TORCH_CHECK(keys.size(0) <= std::numeric_limits<int32_t>::max(), "knn_merge_block_cuda: too many queries in a block");
  if (keys.size(0) == 0) return;
  c10::cuda::CUDAGuard guard(keys.device());
  if (take <= 8) {
    launch_merge<8>(keys, col0, best_d, best_i, take);
  } else if (take <= 16) {
    launch_merge<16>(keys, col0, best_d, best_i, take);
  } else if (take <= 32) {
    launch_merge<32>(keys, col0, best_d, best_i, take);
  } else {
    launch_merge<kKnnKernelMaxTake>(keys, col0, best_d, best_i, take);
  }
}

}  // namespace pfedmoap
