// Declarations shared by the sources of the extension pfedmoap._C (see csrc/README.md).
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <string>

namespace pfedmoap {

// ---------------------------------------------------------------- batched expert prompt assembly
// prefix [C, P0, W], suffix [C, S, W], ctx [E, n_ctx, W] (one dtype, one device) -> [E * C, P0 + n_ctx + S, W],
// expert-major: row e * C + c is [prefix[c]; ctx[e]; suffix[c]].
at::Tensor assemble_prompts(const at::Tensor& prefix, const at::Tensor& suffix, const at::Tensor& ctx);

// grad_out [E * C, L, W] -> grad_ctx [E, n_ctx, W]: the sum over classes of the gradient at the context
// positions (prefix_len .. prefix_len + n_ctx). Accumulates in fp32 (fp64 for double inputs).
at::Tensor assemble_prompts_backward(const at::Tensor& grad_out, int64_t experts, int64_t classes, int64_t prefix_len,
                                     int64_t n_ctx);

at::Tensor assemble_prompts_cpu(const at::Tensor& prefix, const at::Tensor& suffix, const at::Tensor& ctx);
at::Tensor assemble_prompts_backward_cpu(const at::Tensor& grad_out, int64_t experts, int64_t classes,
                                         int64_t prefix_len, int64_t n_ctx);

// ---------------------------------------------------------------- KNN over the prompt pool
// pool [N, ...] (flattened to [N, P]), present [N] bool, queries [Q] long -> [Q, take] long, take =
// min(k, min over queries of the present rows other than the query). The reference's order exactly: nearest first
// by the float64 difference-based distance (torch.cdist without the GEMM), ties to the lower id; the query itself
// and absent rows are never returned. A float32 GEMM (|a|^2 + |b|^2 - 2 a.b) filters the candidates under a
// rigorous error bound, and torch.cdist re-ranks the few it cannot separate (knn.cpp derives the bound).
// chunk_rows (0 = automatic) bounds the pool rows per GEMM block. method: "auto", "select" (CPU: per-query
// candidate lists; CUDA: the top-k kernel for the running lists) or "sort" (running lists merged with at::topk,
// plain ATen ops: any device).
at::Tensor knn(const at::Tensor& pool, const at::Tensor& present, const at::Tensor& queries, int64_t k,
               int64_t chunk_rows, const std::string& method);

// Squared L2 norm of each row of a 2-D float32 or float64 tensor, accumulated in float64 -> [rows] float64.
at::Tensor row_sq_norms(const at::Tensor& rows);

// Threads per block of every CUDA kernel (the host drivers of their logic take it as the block shape).
constexpr int kKernelThreads = 256;

// Longest running list the CUDA top-k kernel keeps; longer ones use at::topk.
constexpr int64_t kKnnKernelMaxTake = 64;

// ---------------------------------------------------------------- the CUDA kernels' logic, run on the host
// Each runs one CUDA kernel's launch (grid x block threads, the device's grid-stride loops and warp shuffles) on CPU
// tensors with the per-thread functions of kernel_logic.h that the kernel itself calls (host_kernels.cpp; for tests).
at::Tensor assemble_prompts_host(const at::Tensor& prefix, const at::Tensor& suffix, const at::Tensor& ctx,
                                 int64_t grid, int64_t block, int64_t unit_bytes);
at::Tensor assemble_prompts_backward_host(const at::Tensor& grad_out, int64_t experts, int64_t classes,
                                          int64_t prefix_len, int64_t n_ctx, int64_t grid, int64_t block);
at::Tensor row_sq_norms_host(const at::Tensor& rows, int64_t grid, int64_t block);
void knn_merge_block_host(const at::Tensor& keys, int64_t col0, at::Tensor& best_d, at::Tensor& best_i, int64_t take,
                          int64_t block);

#ifdef PFEDMOAP_WITH_CUDA
at::Tensor assemble_prompts_cuda(const at::Tensor& prefix, const at::Tensor& suffix, const at::Tensor& ctx);
at::Tensor assemble_prompts_backward_cuda(const at::Tensor& grad_out, int64_t experts, int64_t classes,
                                          int64_t prefix_len, int64_t n_ctx);
at::Tensor row_sq_norms_cuda(const at::Tensor& rows);
// Merges one block of keys [Qb, C] float64 (columns = pool rows col0 ..) into the running lists best_d [Qb, T]
// float64 / best_i [Qb, T] long, sorted by (key, id), in place. Keys that are +inf or NaN are skipped; empty slots
// hold (+inf, INT64_MAX).
void knn_merge_block_cuda(const at::Tensor& keys, int64_t col0, at::Tensor& best_d, at::Tensor& best_i, int64_t take);
#endif

inline bool cuda_built() {
#ifdef PFEDMOAP_WITH_CUDA
  return true;
#else
  return false;
#endif
}

}  // namespace pfedmoap
