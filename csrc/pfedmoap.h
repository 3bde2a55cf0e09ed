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
// min(k, min over queries of the present rows other than the query). Nearest first by L2, ties to the lower
// id; the query itself and absent rows are never returned. Distances come from one GEMM per block
// (|a|^2 + |b|^2 - 2 a.b, clamped at 0), so near-ties closer than the GEMM's rounding may order differently
// from an exact difference-based computation. chunk_rows (0 = automatic) bounds the pool rows per block.
// method: "auto", "select" (CPU: per-query partial sort; CUDA: the top-k kernel) or "sort" (stable sort of
// the running best and each block, plain ATen ops: any device).
at::Tensor knn(const at::Tensor& pool, const at::Tensor& present, const at::Tensor& queries, int64_t k,
               int64_t chunk_rows, const std::string& method);

// Squared L2 norm of each row of a contiguous 2-D tensor, in a fixed summation order per row (equal rows give
// bit-equal norms wherever they sit), as ``acc`` (kDouble or kFloat).
at::Tensor row_sq_norms(const at::Tensor& rows, at::ScalarType acc);

#ifdef PFEDMOAP_WITH_CUDA
at::Tensor assemble_prompts_cuda(const at::Tensor& prefix, const at::Tensor& suffix, const at::Tensor& ctx);
at::Tensor assemble_prompts_backward_cuda(const at::Tensor& grad_out, int64_t experts, int64_t classes,
                                          int64_t prefix_len, int64_t n_ctx);
at::Tensor row_sq_norms_cuda(const at::Tensor& rows, at::ScalarType acc);
// Largest `take` the CUDA top-k kernel handles; larger ones use the "sort" merge.
constexpr int64_t kKnnKernelMaxTake = 64;
// Merges one block of candidates into the running best [Qb, T] (sorted by (distance, id), in place).
void knn_merge_block_cuda(const at::Tensor& gram, const at::Tensor& qnorm, const at::Tensor& pnorm,
                          const at::Tensor& present, const at::Tensor& qids, int64_t col0, at::Tensor& best_d,
                          at::Tensor& best_i, int64_t take);
#endif

inline bool cuda_built() {
#ifdef PFEDMOAP_WITH_CUDA
  return true;
#else
  return false;
#endif
}

}  // namespace pfedmoap
