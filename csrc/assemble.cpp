// Batched expert prompt assembly: argument checks, device dispatch and the CPU (OpenMP) implementation.
#include "pfedmoap.h"

#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstring>
#include <vector>

namespace pfedmoap {

namespace {

void check_assemble_args(const at::Tensor& prefix, const at::Tensor& suffix, const at::Tensor& ctx) {
  TORCH_CHECK(prefix.dim() == 3 && suffix.dim() == 3 && ctx.dim() == 3,
              "assemble_prompts: prefix [C, 1, W], suffix [C, S, W] and ctx [E, n_ctx, W] must be 3-D, got ",
              prefix.sizes(), ", ", suffix.sizes(), ", ", ctx.sizes());
  TORCH_CHECK(prefix.size(0) == suffix.size(0), "assemble_prompts: prefix has ", prefix.size(0),
              " classes, suffix ", suffix.size(0));
  TORCH_CHECK(prefix.size(2) == suffix.size(2) && prefix.size(2) == ctx.size(2),
              "assemble_prompts: token widths differ: ", prefix.size(2), ", ", suffix.size(2), ", ", ctx.size(2));
  TORCH_CHECK(prefix.scalar_type() == suffix.scalar_type() && prefix.scalar_type() == ctx.scalar_type(),
              "assemble_prompts: prefix, suffix and ctx must share one dtype (cast in the caller)");
  TORCH_CHECK(prefix.device() == suffix.device() && prefix.device() == ctx.device(),
              "assemble_prompts: prefix, suffix and ctx must be on one device");
}

}  // namespace

at::Tensor assemble_prompts(const at::Tensor& prefix, const at::Tensor& suffix, const at::Tensor& ctx) {
  check_assemble_args(prefix, suffix, ctx);
  if (prefix.is_cuda()) {
#ifdef PFEDMOAP_WITH_CUDA
    return assemble_prompts_cuda(prefix.contiguous(), suffix.contiguous(), ctx.contiguous());
#else
    TORCH_CHECK(false, "pfedmoap._C was built without CUDA: assemble_prompts cannot run on ", prefix.device());
#endif
  }
  TORCH_CHECK(prefix.is_cpu(), "assemble_prompts: unsupported device ", prefix.device());
  return assemble_prompts_cpu(prefix.contiguous(), suffix.contiguous(), ctx.contiguous());
}

at::Tensor assemble_prompts_backward(const at::Tensor& grad_out, int64_t experts, int64_t classes, int64_t prefix_len,
                                     int64_t n_ctx) {
  TORCH_CHECK(grad_out.dim() == 3, "assemble_prompts_backward: grad must be [E * C, L, W], got ", grad_out.sizes());
  TORCH_CHECK(experts >= 0 && classes >= 0 && grad_out.size(0) == experts * classes, "assemble_prompts_backward: ",
              grad_out.size(0), " rows are not ", experts, " experts x ", classes, " classes");
  TORCH_CHECK(prefix_len >= 0 && n_ctx >= 0 && prefix_len + n_ctx <= grad_out.size(1),
              "assemble_prompts_backward: context positions out of range");
  TORCH_CHECK(at::isFloatingType(grad_out.scalar_type()), "assemble_prompts_backward: grad must be floating point");
  if (grad_out.is_cuda()) {
#ifdef PFEDMOAP_WITH_CUDA
    return assemble_prompts_backward_cuda(grad_out.contiguous(), experts, classes, prefix_len, n_ctx);
#else
    TORCH_CHECK(false, "pfedmoap._C was built without CUDA: assemble_prompts_backward cannot run on ",
                grad_out.device());
#endif
  }
  TORCH_CHECK(grad_out.is_cpu(), "assemble_prompts_backward: unsupported device ", grad_out.device());
  return assemble_prompts_backward_cpu(grad_out.contiguous(), experts, classes, prefix_len, n_ctx);
}

at::Tensor assemble_prompts_cpu(const at::Tensor& prefix, const at::Tensor& suffix, const at::Tensor& ctx) {
  const int64_t classes = prefix.size(0), pre = prefix.size(1), seq = suffix.size(1);
  const int64_t experts = ctx.size(0), n_ctx = ctx.size(1), width = prefix.size(2);
  const int64_t length = pre + n_ctx + seq;
  auto out = at::empty({experts * classes, length, width}, prefix.options());
  if (out.numel() == 0) return out;
  // Pure copies: work on bytes, so every dtype goes through the same code.
  const int64_t item = prefix.element_size();
  const int64_t row = width * item;  // bytes per token
  const auto* p = static_cast<const char*>(prefix.data_ptr());
  const auto* s = static_cast<const char*>(suffix.data_ptr());
  const auto* x = static_cast<const char*>(ctx.data_ptr());
  auto* o = static_cast<char*>(out.data_ptr());
  // Each (expert, class) sequence is a few KiB of contiguous output: a grain of a few sequences per task.
  at::parallel_for(0, experts * classes, 4, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t e = r / classes, c = r % classes;
      char* dst = o + r * length * row;
      std::memcpy(dst, p + c * pre * row, pre * row);
      std::memcpy(dst + pre * row, x + e * n_ctx * row, n_ctx * row);
      std::memcpy(dst + (pre + n_ctx) * row, s + c * seq * row, seq * row);
    }
  });
  return out;
}

at::Tensor assemble_prompts_backward_cpu(const at::Tensor& grad_out, int64_t experts, int64_t classes,
                                         int64_t prefix_len, int64_t n_ctx) {
  const int64_t length = grad_out.size(1), width = grad_out.size(2);
  auto grad_ctx = at::empty({experts, n_ctx, width}, grad_out.options());
  const int64_t span = n_ctx * width;  // context values per expert, contiguous in every sequence
  if (grad_ctx.numel() == 0) return grad_ctx;
  if (classes == 0) return grad_ctx.zero_();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad_out.scalar_type(), "assemble_prompts_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* g = grad_out.data_ptr<scalar_t>();
    scalar_t* out = grad_ctx.data_ptr<scalar_t>();
    const int64_t seq_stride = length * width;
    // Tasks are slices of one expert's context; classes are summed in order, in acc_t, for each slice.
    constexpr int64_t kSlice = 2048;
    const int64_t slices = (span + kSlice - 1) / kSlice;
    at::parallel_for(0, experts * slices, 1, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> acc(kSlice);
      for (int64_t t = begin; t < end; ++t) {
        const int64_t e = t / slices, j0 = (t % slices) * kSlice;
        const int64_t n = std::min(kSlice, span - j0);
        std::fill(acc.begin(), acc.begin() + n, acc_t(0));
        const scalar_t* base = g + e * classes * seq_stride + prefix_len * width + j0;
        for (int64_t c = 0; c < classes; ++c) {
          const scalar_t* src = base + c * seq_stride;
          for (int64_t j = 0; j < n; ++j) acc[j] += static_cast<acc_t>(src[j]);
        }
        scalar_t* dst = out + e * span + j0;
        for (int64_t j = 0; j < n; ++j) dst[j] = static_cast<scalar_t>(acc[j]);
      }
    });
  });
  return grad_ctx;
}

}  // namespace pfedmoap
