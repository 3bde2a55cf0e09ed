// Host drivers of the CUDA kernels' per-thread logic (kernel_logic.h). Each runs one kernel's launch on CPU tensors:
// every block of the grid, every thread of the block, in order, calling the same functions the device code calls,
// with the launch shape given; warp shuffles are emulated with their exact semantics (a lane whose source lane is
// out of range keeps its own value). For tests (tests/test_cuda_logic.py): they check the index arithmetic and the
// bounds of the CUDA kernels on shapes that hit every edge, in a build without a GPU.
#include "kernel_logic.h"
#include "pfedmoap.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>

#include <array>
#include <cstring>
#include <limits>
#include <vector>

namespace pfedmoap {

namespace {

struct alignas(16) Unit16 {  // the device's uint4
  uint64_t lo, hi;
};

void check_launch(int64_t grid, int64_t block) {
  TORCH_CHECK(grid >= 1 && block >= 1, "a launch needs at least one block of at least one thread, got grid ", grid,
              " and block ", block);
}

template <typename V>
void assemble_forward_launch(const at::Tensor& prefix, const at::Tensor& suffix, const at::Tensor& ctx,
                             at::Tensor& out, int64_t grid, int64_t block) {
  const int64_t units = prefix.size(2) * prefix.element_size() / static_cast<int64_t>(sizeof(V));
  const int64_t total = out.numel() * out.element_size() / static_cast<int64_t>(sizeof(V));
  const V* pre = static_cast<const V*>(prefix.data_ptr());
  const V* suf = static_cast<const V*>(suffix.data_ptr());
  const V* cx = static_cast<const V*>(ctx.data_ptr());
  V* dst = static_cast<V*>(out.data_ptr());
  for (int64_t b = 0; b < grid; ++b) {
    for (int64_t t = 0; t < block; ++t) {
      const logic::GridStride loop = logic::grid_stride(b, block, t, grid);
      for (int64_t idx = loop.first; idx < total; idx += loop.stride) {
        logic::assemble_forward_element<V>(pre, suf, cx, dst, prefix.size(0), prefix.size(1), ctx.size(1),
                                           suffix.size(1), units, idx);
      }
    }
  }
}

// A warp's shuffle-down tree over 32 lanes' (key, id) pairs, as __shfl_down_sync runs it: every lane reads its
// source's value from before the step. Lane 0 ends with the argmin.
template <typename acc_t>
void argmin_warp_host(std::array<acc_t, 32>& d, std::array<int64_t, 32>& id) {
  for (int offset = 16; offset > 0; offset /= 2) {
    const std::array<acc_t, 32> old_d = d;
    const std::array<int64_t, 32> old_i = id;
    for (int lane = 0; lane < 32; ++lane) {
      const int src = lane + offset < 32 ? lane + offset : lane;
      logic::argmin_step(d[lane], id[lane], old_d[src], old_i[src]);
    }
  }
}

template <int MAXT>
void knn_merge_launch(const at::Tensor& keys, int64_t col0, at::Tensor& best_d, at::Tensor& best_i, int take,
                      int block) {
  const double inf = std::numeric_limits<double>::infinity();
  const int64_t queries = keys.size(0), cols = keys.size(1);
  const int warps = block / 32;
  std::vector<logic::TopList<double, MAXT>> lists(block);
  std::vector<int> heads(block);
  for (int64_t q = 0; q < queries; ++q) {  // one block per query
    double* row_d = best_d.data_ptr<double>() + q * take;
    int64_t* row_i = best_i.data_ptr<int64_t>() + q * take;
    for (int tid = 0; tid < block; ++tid) {
      lists[tid].count = 0;
      heads[tid] = 0;
      logic::knn_collect<double, MAXT>(keys.data_ptr<double>() + q * cols, col0, cols, row_d, row_i, take, tid, block,
                                       lists[tid]);
    }
    std::vector<double> warp_d(warps);
    std::vector<int64_t> warp_i(warps);
    for (int r = 0; r < take; ++r) {
      for (int w = 0; w < warps; ++w) {
        std::array<double, 32> d;
        std::array<int64_t, 32> id;
        for (int lane = 0; lane < 32; ++lane) lists[w * 32 + lane].head(heads[w * 32 + lane], d[lane], id[lane]);
        argmin_warp_host(d, id);
        warp_d[w] = d[0];
        warp_i[w] = id[0];
      }
      std::array<double, 32> d;
      std::array<int64_t, 32> id;
      for (int lane = 0; lane < 32; ++lane) {
        d[lane] = lane < warps ? warp_d[lane] : inf;
        id[lane] = lane < warps ? warp_i[lane] : logic::kNoId;
      }
      argmin_warp_host(d, id);
      const int64_t winner = id[0];
      row_d[r] = d[0];
      row_i[r] = id[0];
      for (int tid = 0; tid < block; ++tid) {
        if (heads[tid] < lists[tid].count && lists[tid].id[heads[tid]] == winner) ++heads[tid];
      }
    }
  }
}

}  // namespace

at::Tensor assemble_prompts_host(const at::Tensor& prefix, const at::Tensor& suffix, const at::Tensor& ctx,
                                 int64_t grid, int64_t block, int64_t unit_bytes) {
  check_launch(grid, block);
  TORCH_CHECK(prefix.is_cpu() && suffix.is_cpu() && ctx.is_cpu(), "assemble_prompts_host: CPU tensors expected");
  TORCH_CHECK(prefix.scalar_type() == suffix.scalar_type() && prefix.scalar_type() == ctx.scalar_type(),
              "assemble_prompts_host: one dtype expected");
  const int64_t row_bytes = prefix.size(2) * prefix.element_size();
  TORCH_CHECK(unit_bytes == 1 || unit_bytes == 2 || unit_bytes == 4 || unit_bytes == 8 || unit_bytes == 16,
              "assemble_prompts_host: unit_bytes must be 1, 2, 4, 8 or 16, got ", unit_bytes);
  TORCH_CHECK(row_bytes % unit_bytes == 0, "assemble_prompts_host: a token row of ", row_bytes,
              " bytes is not a whole number of ", unit_bytes, "-byte units");
  auto p = prefix.contiguous(), s = suffix.contiguous(), c = ctx.contiguous();
  auto out = at::empty({c.size(0) * p.size(0), p.size(1) + c.size(1) + s.size(1), p.size(2)}, p.options());
  switch (unit_bytes) {
    case 16: assemble_forward_launch<Unit16>(p, s, c, out, grid, block); break;
    case 8: assemble_forward_launch<uint64_t>(p, s, c, out, grid, block); break;
    case 4: assemble_forward_launch<uint32_t>(p, s, c, out, grid, block); break;
    case 2: assemble_forward_launch<uint16_t>(p, s, c, out, grid, block); break;
    default: assemble_forward_launch<uint8_t>(p, s, c, out, grid, block); break;
  }
  return out;
}

at::Tensor assemble_prompts_backward_host(const at::Tensor& grad_out, int64_t experts, int64_t classes,
                                          int64_t prefix_len, int64_t n_ctx, int64_t grid, int64_t block) {
  check_launch(grid, block);
  TORCH_CHECK(grad_out.is_cpu(), "assemble_prompts_backward_host: a CPU tensor expected");
  auto g = grad_out.contiguous();
  const int64_t length = g.size(1), width = g.size(2);
  auto grad_ctx = at::zeros({experts, n_ctx, width}, g.options());
  const int64_t span = n_ctx * width, total = experts * span;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "assemble_prompts_backward_host", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    for (int64_t b = 0; b < grid; ++b) {
      for (int64_t t = 0; t < block; ++t) {
        const logic::GridStride loop = logic::grid_stride(b, block, t, grid);
        for (int64_t idx = loop.first; idx < total; idx += loop.stride) {
          logic::assemble_backward_element<scalar_t, acc_t>(g.data_ptr<scalar_t>(), grad_ctx.data_ptr<scalar_t>(),
                                                            classes, length * width, prefix_len * width, span, idx);
        }
      }
    }
  });
  return grad_ctx;
}

at::Tensor row_sq_norms_host(const at::Tensor& rows, int64_t grid, int64_t block) {
  check_launch(grid, block);
  TORCH_CHECK(block % 32 == 0, "row_sq_norms_host: the block must be whole warps, got ", block, " threads");
  TORCH_CHECK(rows.is_cpu() && rows.dim() == 2, "row_sq_norms_host: a 2-D CPU tensor expected");
  auto x = rows.contiguous();
  const int64_t n = x.size(0), p = x.size(1);
  auto out = at::full({n}, std::numeric_limits<double>::quiet_NaN(), x.options().dtype(at::kDouble));
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "row_sq_norms_host", [&] {
    for (int64_t b = 0; b < grid; ++b) {
      for (int64_t w = 0; w < block / 32; ++w) {  // a warp's lanes move together: the rows of its first thread
        const logic::GridStride loop = logic::grid_stride(b, block, w * 32, grid);
        for (int64_t r = loop.first / 32; r < n; r += loop.stride / 32) {
          std::array<double, 32> sum;
          for (int lane = 0; lane < 32; ++lane) sum[lane] = logic::row_sq_norm_lane(x.data_ptr<scalar_t>(), r, p, lane);
          for (int offset = 16; offset > 0; offset /= 2) {
            const std::array<double, 32> old = sum;
            for (int lane = 0; lane < 32; ++lane) sum[lane] += old[lane + offset < 32 ? lane + offset : lane];
          }
          out.data_ptr<double>()[r] = sum[0];
        }
      }
    }
  });
  return out;
}

void knn_merge_block_host(const at::Tensor& keys, int64_t col0, at::Tensor& best_d, at::Tensor& best_i, int64_t take,
                          int64_t block) {
  TORCH_CHECK(take >= 1 && take <= kKnnKernelMaxTake, "knn_merge_block_host: take out of range");
  TORCH_CHECK(block % 32 == 0 && block >= take && block <= 1024,
              "knn_merge_block_host: the block must be whole warps, at least take and at most 1024 threads");
  TORCH_CHECK(keys.is_cpu() && keys.is_contiguous() && best_d.is_contiguous() && best_i.is_contiguous(),
              "knn_merge_block_host: contiguous CPU tensors expected");
  TORCH_CHECK(keys.scalar_type() == at::kDouble && best_d.scalar_type() == at::kDouble &&
                  best_i.scalar_type() == at::kLong,
              "knn_merge_block_host: float64 keys and lists, long ids expected");
  TORCH_CHECK(keys.size(0) == best_d.size(0) && best_d.sizes() == best_i.sizes() && best_d.size(1) == take,
              "knn_merge_block_host: shapes do not match");
  const int t = static_cast<int>(take), b = static_cast<int>(block);
  if (take <= 8) {  // the device's MAXT dispatch (knn.cu)
    knn_merge_launch<8>(keys, col0, best_d, best_i, t, b);
  } else if (take <= 16) {
    knn_merge_launch<16>(keys, col0, best_d, best_i, t, b);
  } else if (take <= 32) {
    knn_merge_launch<32>(keys, col0, best_d, best_i, t, b);
  } else {
    knn_merge_launch<kKnnKernelMaxTake>(keys, col0, best_d, best_i, t, b);
  }
}

}  // namespace pfedmoap
