// CUDA kernels of the batched expert prompt assembly: one launch of vectorised copies forward, and one launch
// that sums the context-position gradients over classes (in fp32, or fp64 for double) backward.
#include "../kernel_logic.h"
#include "../pfedmoap.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <algorithm>
#include <cstdint>

namespace pfedmoap {

namespace {

constexpr int kThreads = kKernelThreads;

int64_t grid_for(int64_t work) {
  // enough blocks to fill the device a few times over; grid-stride loops take the rest
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  return std::max<int64_t>(1, std::min<int64_t>((work + kThreads - 1) / kThreads, sms * 32));
}

// V is the copy unit (16, 8, 4, 2 or 1 bytes); every token row holds `units` of them. The per-element logic is
// logic::assemble_forward_element (kernel_logic.h), which the host test drives over the same grid and block.
template <typename V>
__global__ void assemble_forward_kernel(const V* __restrict__ prefix, const V* __restrict__ suffix,
                                        const V* __restrict__ ctx, V* __restrict__ out, int64_t classes, int64_t pre,
                                        int64_t n_ctx, int64_t seq, int64_t units, int64_t total) {
  const logic::GridStride loop = logic::grid_stride(blockIdx.x, blockDim.x, threadIdx.x, gridDim.x);
  for (int64_t idx = loop.first; idx < total; idx += loop.stride) {
    logic::assemble_forward_element<V>(prefix, suffix, ctx, out, classes, pre, n_ctx, seq, units, idx);
  }
}

template <typename V>
void launch_forward(const at::Tensor& prefix, const at::Tensor& suffix, const at::Tensor& ctx, at::Tensor& out) {
  const int64_t units = prefix.size(2) * prefix.element_size() / static_cast<int64_t>(sizeof(V));
  const int64_t total = out.numel() * out.element_size() / static_cast<int64_t>(sizeof(V));
  auto stream = at::cuda::getCurrentCUDAStream();
  assemble_forward_kernel<V><<<grid_for(total), kThreads, 0, stream>>>(
      static_cast<const V*>(prefix.data_ptr()), static_cast<const V*>(suffix.data_ptr()),
      static_cast<const V*>(ctx.data_ptr()), static_cast<V*>(out.data_ptr()), prefix.size(0), prefix.size(1),
      ctx.size(1), suffix.size(1), units, total);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

bool aligned_to(const at::Tensor& t, int64_t bytes) {
  return reinterpret_cast<std::uintptr_t>(t.data_ptr()) % bytes == 0;
}

template <typename scalar_t, typename acc_t>
__global__ void assemble_backward_kernel(const scalar_t* __restrict__ grad, scalar_t* __restrict__ grad_ctx,
                                         int64_t classes, int64_t seq_stride, int64_t offset, int64_t span,
                                         int64_t total) {
  const logic::GridStride loop = logic::grid_stride(blockIdx.x, blockDim.x, threadIdx.x, gridDim.x);
  for (int64_t idx = loop.first; idx < total; idx += loop.stride) {
    logic::assemble_backward_element<scalar_t, acc_t>(grad, grad_ctx, classes, seq_stride, offset, span, idx);
  }
}

}  // namespace

at::Tensor assemble_prompts_cuda(const at::Tensor& prefix, const at::Tensor& suffix, const at::Tensor& ctx) {
  c10::cuda::CUDAGuard guard(prefix.device());
  const int64_t experts = ctx.size(0), classes = prefix.size(0);
  const int64_t length = prefix.size(1) + ctx.size(1) + suffix.size(1);
  auto out = at::empty({experts * classes, length, prefix.size(2)}, prefix.options());
  if (out.numel() == 0) return out;
  const int64_t row_bytes = prefix.size(2) * prefix.element_size();
  // the widest copy unit that divides a token row and to which every buffer is aligned
  for (int64_t bytes : {16, 8, 4, 2}) {
    if (row_bytes % bytes == 0 && aligned_to(prefix, bytes) && aligned_to(suffix, bytes) && aligned_to(ctx, bytes) &&
        aligned_to(out, bytes)) {
      switch (bytes) {
        case 16: launch_forward<uint4>(prefix, suffix, ctx, out); return out;
        case 8: launch_forward<uint2>(prefix, suffix, ctx, out); return out;
        case 4: launch_forward<uint32_t>(prefix, suffix, ctx, out); return out;
        default: launch_forward<uint16_t>(prefix, suffix, ctx, out); return out;
      }
    }
  }
  launch_forward<uint8_t>(prefix, suffix, ctx, out);
  return out;
}

at::Tensor assemble_prompts_backward_cuda(const at::Tensor& grad_out, int64_t experts, int64_t classes,
                                          int64_t prefix_len, int64_t n_ctx) {
  c10::cuda::CUDAGuard guard(grad_out.device());
  const int64_t length = grad_out.size(1), width = grad_out.size(2);
  auto grad_ctx = at::empty({experts, n_ctx, width}, grad_out.options());
  if (grad_ctx.numel() == 0) return grad_ctx;
  if (classes == 0) return grad_ctx.zero_();
  const int64_t span = n_ctx * width, total = experts * span;
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad_out.scalar_type(), "assemble_prompts_backward_cuda",
                                  [&] {
                                    using acc_t = at::opmath_type<scalar_t>;
                                    assemble_backward_kernel<scalar_t, acc_t><<<grid_for(total), kThreads, 0, stream>>>(
                                        grad_out.data_ptr<scalar_t>(), grad_ctx.data_ptr<scalar_t>(), classes,
                                        length * width, prefix_len * width, span, total);
                                    C10_CUDA_KERNEL_LAUNCH_CHECK();
                                  });
  return grad_ctx;
}

}  // namespace pfedmoap
