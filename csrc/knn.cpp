// KNN over the prompt pool: argument checks, the blocked GEMM loop shared by every device, the CPU selection
// (OpenMP, one partial sort per query and block) and the device-agnostic stable-sort merge.
#include "pfedmoap.h"

#include <ATen/Parallel.h>

#ifdef PFEDMOAP_WITH_CUDA
#include <ATen/Context.h>
#include <c10/cuda/CUDAGuard.h>
#endif

#include <algorithm>
#include <cmath>
#include <limits>
#include <optional>
#include <tuple>
#include <vector>

namespace pfedmoap {

namespace {

constexpr double kInf = std::numeric_limits<double>::infinity();

struct Candidate {
  double dist;
  int64_t id;
  bool operator<(const Candidate& other) const {
    return dist < other.dist || (dist == other.dist && id < other.id);  // ties to the lower id
  }
};

// GEMM distances can come out slightly negative for (near-)equal rows: clamp to 0. NaN (non-finite pool values)
// becomes +inf so that the ordering stays a strict weak order.
inline double clean_distance(double d) {
  if (d >= 0) return d;
  return std::isnan(d) ? kInf : 0.0;
}

// Bounds on the working set per block: [chunk, P] converted pool rows and the [queries, chunk] Gram block.
struct Budget {
  int64_t chunk_elems;
  int64_t block_elems;
};
constexpr Budget kCpuBudget{int64_t(1) << 24, int64_t(1) << 22};   // 128 MiB / 32 MiB of doubles
constexpr Budget kCudaBudget{int64_t(1) << 27, int64_t(1) << 26};  // 512 MiB / 256 MiB of floats

// CPU selection: merge one [qn, cn] block into each query's sorted list of at most `take` candidates.
void merge_block_cpu(const at::Tensor& gram, const at::Tensor& qnorm, const at::Tensor& pnorm, const bool* present,
                     const int64_t* qids, int64_t col0, int64_t take, std::vector<Candidate>* best) {
  const int64_t qn = gram.size(0), cn = gram.size(1);
  const double* g = gram.data_ptr<double>();
  const double* qsq = qnorm.data_ptr<double>();
  const double* psq = pnorm.data_ptr<double>();
  at::parallel_for(0, qn, 1, [&](int64_t begin, int64_t end) {
    std::vector<Candidate> pick;
    for (int64_t i = begin; i < end; ++i) {
      std::vector<Candidate>& list = best[i];
      const bool full = static_cast<int64_t>(list.size()) == take;
      const int64_t self = qids[i];
      const double* row = g + i * cn;
      pick.clear();
      for (int64_t j = 0; j < cn; ++j) {
        const int64_t id = col0 + j;
        if (!present[id] || id == self) continue;
        const Candidate cand{clean_distance(qsq[i] + psq[j] - 2.0 * row[j]), id};
        if (full && !(cand < list.back())) continue;  // cannot enter the list
        pick.push_back(cand);
      }
      if (pick.empty()) continue;
      pick.insert(pick.end(), list.begin(), list.end());
      const int64_t keep = std::min<int64_t>(take, static_cast<int64_t>(pick.size()));
      std::partial_sort(pick.begin(), pick.begin() + keep, pick.end());
      list.assign(pick.begin(), pick.begin() + keep);
    }
  });
}

// Any device: stable-sort the running best (first, sorted by (distance, id), with ids below this block's) together
// with the block, whose ids ascend; a stable sort by distance then orders equal distances by id. Invalid entries
// are NaN, which sorts after every distance.
void merge_block_sorted(const at::Tensor& gram, const at::Tensor& qnorm, const at::Tensor& pnorm,
                        const at::Tensor& present, const at::Tensor& qids, int64_t col0, at::Tensor& best_d,
                        at::Tensor& best_i, int64_t take) {
  const int64_t qn = gram.size(0), cn = gram.size(1);
  auto dist = (qnorm.unsqueeze(1) + pnorm.unsqueeze(0)) - gram * 2;
  dist.clamp_min_(0).nan_to_num_(kInf, kInf, 0.0);
  auto ids = at::arange(col0, col0 + cn, qids.options());
  auto invalid = present.narrow(0, col0, cn).logical_not().unsqueeze(0) | (ids.unsqueeze(0) == qids.unsqueeze(1));
  dist.masked_fill_(invalid, std::numeric_limits<double>::quiet_NaN());
  auto all_d = at::cat({best_d, dist}, 1);
  auto all_i = at::cat({best_i, ids.unsqueeze(0).expand({qn, cn})}, 1);
  auto sorted = at::sort(all_d, /*stable=*/true, /*dim=*/1, /*descending=*/false);
  auto order = std::get<1>(sorted).narrow(1, 0, take);
  best_d.copy_(std::get<0>(sorted).narrow(1, 0, take));
  best_i.copy_(all_i.gather(1, order));
}

at::Tensor row_sq_norms_cpu(const at::Tensor& rows) {
  TORCH_CHECK(rows.scalar_type() == at::kDouble, "row_sq_norms_cpu expects float64 rows");
  const int64_t n = rows.size(0), p = rows.size(1);
  auto out = at::empty({n}, rows.options());
  const double* x = rows.data_ptr<double>();
  double* o = out.data_ptr<double>();
  at::parallel_for(0, n, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      // four interleaved partial sums in a fixed order: vectorisable, and the same order for every row
      double part[4] = {0.0, 0.0, 0.0, 0.0};
      const double* v = x + r * p;
      int64_t j = 0;
      for (; j + 4 <= p; j += 4) {
        for (int u = 0; u < 4; ++u) part[u] += v[j + u] * v[j + u];
      }
      for (; j < p; ++j) part[0] += v[j] * v[j];
      o[r] = (part[0] + part[1]) + (part[2] + part[3]);
    }
  });
  return out;
}

}  // namespace

at::Tensor row_sq_norms(const at::Tensor& rows, at::ScalarType acc) {
  TORCH_CHECK(rows.dim() == 2, "row_sq_norms expects a 2-D tensor");
  if (rows.is_cuda()) {
#ifdef PFEDMOAP_WITH_CUDA
    return row_sq_norms_cuda(rows.contiguous(), acc);
#else
    TORCH_CHECK(false, "pfedmoap._C was built without CUDA");
#endif
  }
  TORCH_CHECK(acc == at::kDouble, "row_sq_norms on the CPU accumulates in float64");
  return row_sq_norms_cpu(rows.to(at::kDouble).contiguous());
}

at::Tensor knn(const at::Tensor& pool, const at::Tensor& present, const at::Tensor& queries, int64_t k,
               int64_t chunk_rows, const std::string& method) {
  TORCH_CHECK(pool.dim() >= 1, "knn: pool must be [N, ...], got a 0-d tensor");
  TORCH_CHECK(!pool.is_complex(), "knn: complex pools are not supported");
  TORCH_CHECK(present.dim() == 1 && present.size(0) == pool.size(0), "knn: present must be [N] = [", pool.size(0),
              "], got ", present.sizes());
  TORCH_CHECK(queries.dim() == 1, "knn: queries must be a 1-D tensor of row ids, got ", queries.sizes());
  TORCH_CHECK(k >= 0, "knn: k must be >= 0, got ", k);
  TORCH_CHECK(chunk_rows >= 0, "knn: chunk_rows must be >= 0 (0 = automatic)");
  TORCH_CHECK(method == "auto" || method == "select" || method == "sort", "knn: method must be auto, select or sort");
  TORCH_CHECK(pool.is_cpu() || pool.is_cuda(), "knn: unsupported device ", pool.device());
#ifndef PFEDMOAP_WITH_CUDA
  TORCH_CHECK(pool.is_cpu(), "pfedmoap._C was built without CUDA: knn cannot run on ", pool.device());
#endif
  const int64_t n = pool.size(0);
  const int64_t nq = queries.size(0);
  const int64_t width = n > 0 ? pool.numel() / n : 0;

  // take = min(k, fewest present others over the queries): decided on the host from small copies
  auto present_host = present.to(at::kCPU, at::kBool).contiguous();
  auto queries_host = queries.to(at::kCPU, at::kLong).contiguous();
  const bool* pres = present_host.data_ptr<bool>();
  const int64_t* qids = queries_host.data_ptr<int64_t>();
  int64_t n_present = 0;
  for (int64_t j = 0; j < n; ++j) n_present += pres[j];
  int64_t take = nq > 0 ? k : 0;
  for (int64_t i = 0; i < nq; ++i) {
    TORCH_CHECK(qids[i] >= 0 && qids[i] < n, "knn: query id ", qids[i], " is out of range for ", n, " pool rows");
    take = std::min(take, n_present - (pres[qids[i]] ? 1 : 0));
  }
  auto long_opts = pool.options().dtype(at::kLong);
  if (take <= 0) return at::empty({nq, 0}, long_opts);

  const bool on_cuda = pool.is_cuda();
  const Budget budget = on_cuda ? kCudaBudget : kCpuBudget;
  // CUDA keeps float32 unless the pool is float64; the CPU always uses float64 (matches the exact reference on
  // data whose distance gaps exceed float64 GEMM rounding).
  const at::ScalarType acc = (on_cuda && pool.scalar_type() != at::kDouble) ? at::kFloat : at::kDouble;
  const int64_t chunk = std::max<int64_t>(
      1, std::min<int64_t>(n, chunk_rows > 0 ? chunk_rows : budget.chunk_elems / std::max<int64_t>(width, 1)));
  const int64_t qblock = std::max<int64_t>(1, std::min<int64_t>(nq, budget.block_elems / chunk));
  auto flat = pool.reshape({n, width});

#ifdef PFEDMOAP_WITH_CUDA
  c10::OptionalDeviceGuard device_guard(on_cuda ? std::optional<at::Device>(pool.device()) : std::nullopt);
  at::NoTF32Guard no_tf32;  // TF32 rounding (10-bit mantissa) would scramble the order of close neighbours
#endif

  const bool cpu_select = !on_cuda && method != "sort";
#ifdef PFEDMOAP_WITH_CUDA
  const bool cuda_kernel = on_cuda && method != "sort" && take <= kKnnKernelMaxTake;
#else
  const bool cuda_kernel = false;
#endif
  auto present_dev = on_cuda ? present.to(pool.device(), at::kBool).contiguous() : present_host;
  auto queries_dev = on_cuda ? queries.to(pool.device(), at::kLong).contiguous() : queries_host;

  std::vector<std::vector<Candidate>> lists;
  at::Tensor best_d, best_i;
  if (cpu_select) {
    lists.resize(nq);
  } else if (cuda_kernel) {
    best_d = at::full({nq, take}, kInf, pool.options().dtype(acc));
    best_i = at::full({nq, take}, std::numeric_limits<int64_t>::max(), long_opts);
  } else {
    best_d = at::full({nq, take}, std::numeric_limits<double>::quiet_NaN(), pool.options().dtype(acc));
    best_i = at::full({nq, take}, -1, long_opts);
  }

  for (int64_t q0 = 0; q0 < nq; q0 += qblock) {
    const int64_t qn = std::min(qblock, nq - q0);
    auto qids_blk = queries_dev.narrow(0, q0, qn);
    auto qrows = flat.index_select(0, qids_blk).to(acc).contiguous();
    auto qnorm = row_sq_norms(qrows, acc);
    for (int64_t c0 = 0; c0 < n; c0 += chunk) {
      const int64_t cn = std::min(chunk, n - c0);
      auto rows = flat.narrow(0, c0, cn).to(acc).contiguous();
      auto pnorm = row_sq_norms(rows, acc);
      auto gram = at::mm(qrows, rows.t()).contiguous();  // [qn, cn]: one GEMM per block
      if (cpu_select) {
        merge_block_cpu(gram, qnorm, pnorm, pres, qids + q0, c0, take, lists.data() + q0);
      } else {
        auto bd = best_d.narrow(0, q0, qn);
        auto bi = best_i.narrow(0, q0, qn);
#ifdef PFEDMOAP_WITH_CUDA
        if (cuda_kernel) {
          knn_merge_block_cuda(gram, qnorm, pnorm, present_dev, qids_blk, c0, bd, bi, take);
          continue;
        }
#endif
        merge_block_sorted(gram, qnorm, pnorm, present_dev, qids_blk, c0, bd, bi, take);
      }
    }
  }

  if (!cpu_select) return best_i;
  auto out = at::empty({nq, take}, long_opts);
  int64_t* o = out.data_ptr<int64_t>();
  for (int64_t i = 0; i < nq; ++i) {
    TORCH_CHECK(static_cast<int64_t>(lists[i].size()) == take, "knn: internal error, short candidate list");
    for (int64_t j = 0; j < take; ++j) o[i * take + j] = lists[i][j].id;
  }
  return out;
}

}  // namespace pfedmoap
