// KNN over the prompt pool: argument checks, a blocked float32 GEMM that filters candidates under a rigorous error
// bound, and an exact re-rank of the few candidates the bound cannot separate, with torch.cdist itself (the
// reference's kernel). The result equals the reference's on every input; see csrc/README.md.
#include "pfedmoap.h"

#include <ATen/Context.h>
#include <ATen/Parallel.h>

#ifdef PFEDMOAP_WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#endif

#include <algorithm>
#include <cmath>
#include <limits>
#include <optional>
#include <tuple>
#include <utility>
#include <vector>

namespace pfedmoap {

namespace {

constexpr double kInf = std::numeric_limits<double>::infinity();
constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();
constexpr int64_t kNoId = std::numeric_limits<int64_t>::max();  // an empty slot of a candidate list
constexpr double kUd = 0x1p-53;                                  // unit roundoff of float64

// ------------------------------------------------------------------------------------------------ the error bound
//
// The reference ranks each valid row j (present, not the query) by R_j = fl(sqrt(S_j)), where S_j is the float64
// sum over the P values of (x_q - x_j)^2 (torch.cdist without the GEMM), ties to the lower id, NaN last. fl(sqrt)
// is correctly rounded, hence monotone: S_i <= S_j implies R_i <= R_j.
//
// Notation: u = unit roundoff of the GEMM type (2^-24 float, 2^-53 double); eta = its smallest normal number and
// eta_in = 2^-126 (the room that subnormals flushed to zero, FTZ/DAZ, can take); u_d = 2^-53; x = a row as float64
// (what the reference computes with: exact for every input dtype); m = the centre (GEMM type, finite);
// y = fl(x - m), the centred row in the GEMM type; r >= |y| an upper bound on its norm; s = r_q + r_j >= |y_q - y_j|.
//
// 1. Centring.  y_i = (x_i - m_i)(1 + d_i) + a_i with |d_i| <= u and |a_i| <= 3 eta_in (a subnormal input flushed on
//    our side or the reference's, and a flushed result), so e = y - (x - m) has |e| <= (u |y| + 3 eta_in sqrt(P)) /
//    (1 - u), and eps = |e_q| + |e_j| <= (u s + 6 eta_in sqrt(P)) / (1 - u). With t = |y_q - y_j| and
//    D = |x_q - x_j|^2 (real numbers): |sqrt(D) - t| <= eps, so |D - t^2| <= eps (2s + eps).
// 2. GEMM.  g = fl(y_q . y_j) in any summation order, with or without FMA (BLAS blocking, split-K included):
//    |g - y_q . y_j| <= gamma_P sum_i |y_qi y_ji| + 2 P eta + eta sqrt(P) s <= gamma_P r_q r_j + 2 P eta +
//    eta sqrt(P) s, with gamma_P = P u / (1 - P u) (Higham, Accuracy and Stability of Numerical Algorithms, ch. 3)
//    and Cauchy-Schwarz; 2 P eta for flushed products and sums, eta sqrt(P) s for inputs below eta read as zero.
//    Nothing overflows: a row with |y|^2 >= 2^100 (float; 2^1000 double) is "wild", below.
// 3. Assembly in float64.  dhat = (n_q + n_j) - 2 g, n = float64 |y|^2 in any order, |n - |y|^2| <= gamma_P^d
//    |y|^2, plus two roundings: |dhat - t^2| <= 2 (error of g) + (P + 3) u_d s^2 (1 + o(1)).
// 4. The reference's own rounding.  S_j = D (1 + theta) with |theta| <= gamma_(P+2)^d: |S_j - D| <= (P + 3) u_d
//    (s + eps)^2 (1 + o(1)).
// Together: |dhat - S_j| <= B = 2 gamma_P r_q r_j + 4 P eta + 2 eta sqrt(P) s + eps (2s + eps) + c s^2, with
// c = 1.01 (2P + 64) u_d, which also absorbs the roundings of lo = dhat - B and up = dhat + B; B is inflated by 2^-40
// for its own roundings. Hence lo_j <= S_j <= up_j for every valid j.
//
// Selection.  Let U = the take-th smallest up over the valid rows: at least `take` rows have S <= U. A row with
// lo_j > U' = U (1 + 64 u_d) has S_j > U', and since sqrt halves relative gaps (32 u_d, against two sqrt roundings
// of u_d each) R_j = fl(sqrt(S_j)) > fl(sqrt(U)) >= R_i for each of those rows (for U = 0: R_j > 0). It is strictly
// behind `take` rows, so whatever its id it is not returned. Every row with lo_j <= U' is a candidate and gets
// re-ranked exactly. Wild rows (non-finite values, or too large for the GEMM type) get lo = -inf, up = +inf: they are
// always candidates, and the exact re-rank puts NaN/inf distances where the reference does.
struct Plan {
  at::ScalarType gemm = at::kFloat;
  at::Tensor center;  // [P] in the GEMM type, or undefined: no centring
  int64_t width = 0;
  double gamma2 = 0;    // 2 gamma_P
  double u_c = 0;       // u / (1 - u)
  double tau = 0;       // 6 eta_in sqrt(P) / (1 - u)
  double gemm_abs = 0;  // 4 P eta
  double gemm_lin = 0;  // 2 eta sqrt(P), per s
  double c_d = 0;       // float64 roundings, per s^2
  double wild_sq = 0;   // rows with |y|^2 >= this (or NaN) are wild

  // [lo, up] around dhat, for one (query, row) pair with norm bounds rq, rj (+inf: wild).
  inline void interval(double dhat, double rq, double rj, double& lo, double& up) const {
    const double s = rq + rj;
    if (!(s < kInf) || std::isnan(dhat)) {
      lo = -kInf;
      up = kInf;
      return;
    }
    const double eps = u_c * s + tau;
    const double b =
        (gamma2 * rq * rj + gemm_abs + gemm_lin * s + eps * (2.0 * s + eps) + c_d * s * s) * (1.0 + 0x1p-40);
    lo = dhat - b;
    up = dhat + b;
  }
};

// U' of the selection rule above.
inline double loosen(double u_star) { return u_star + 64.0 * kUd * std::abs(u_star); }

// Working-set bounds per block: [chunk, P] converted pool rows and the [queries, chunk] Gram block (entries).
struct Budget {
  int64_t chunk_elems;
  int64_t block_elems;
  int64_t rerank_elems;  // float64 candidate rows gathered at once for the exact re-rank
};
constexpr Budget kCpuBudget{int64_t(1) << 24, int64_t(1) << 22, int64_t(1) << 22};
constexpr Budget kCudaBudget{int64_t(1) << 27, int64_t(1) << 24, int64_t(1) << 26};

// The mkldnn path of at::mm may round fp32 operands to bf16 or tf32 when the user allows it
// (torch.set_float32_matmul_precision, torch.backends.mkldnn.matmul.fp32_precision): the bound above would not hold.
bool cpu_fp32_matmul_is_ieee() {
  const auto reduced = [](at::Float32Precision p) {
    return p == at::Float32Precision::BF16 || p == at::Float32Precision::TF32;
  };
  try {
    auto& ctx = at::globalContext();
    return !reduced(ctx.float32Precision(at::Float32Backend::MKLDNN, at::Float32Op::MATMUL)) &&
           !reduced(ctx.float32Precision(at::Float32Backend::MKLDNN, at::Float32Op::ALL)) &&
           !reduced(ctx.float32Precision(at::Float32Backend::GENERIC, at::Float32Op::ALL));
  } catch (const std::exception&) {
    return false;  // unknown settings: take the float64 GEMM, which is exact under any of them
  }
}

template <typename T>
void row_sq_norms_cpu_impl(const T* x, int64_t n, int64_t p, double* out) {
  at::parallel_for(0, n, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      double part[8] = {0, 0, 0, 0, 0, 0, 0, 0};  // independent partial sums: vectorisable, no serial dependency
      const T* v = x + r * p;
      int64_t j = 0;
      for (; j + 8 <= p; j += 8) {
        for (int t = 0; t < 8; ++t) {
          const double a = static_cast<double>(v[j + t]);
          part[t] += a * a;
        }
      }
      for (; j < p; ++j) part[0] += static_cast<double>(v[j]) * static_cast<double>(v[j]);
      out[r] = ((part[0] + part[1]) + (part[2] + part[3])) + ((part[4] + part[5]) + (part[6] + part[7]));
    }
  });
}

// Rows of one block, converted and centred, with float64 squared norms and norm bounds (+inf for wild rows).
struct Rows {
  at::Tensor y;   // [m, P] GEMM type, contiguous
  at::Tensor sq;  // [m] float64: n = fl(|y|^2)
  at::Tensor r;   // [m] float64: r >= |y|, or +inf
};

Rows prepare_rows(const at::Tensor& rows, const Plan& plan) {
  Rows out;
  auto y = rows.to(plan.gemm);  // no copy for a contiguous pool already in the GEMM type
  if (plan.center.defined()) y = y - plan.center;
  out.y = y.contiguous();
  out.sq = row_sq_norms(out.y);
  // r = sqrt(n (1 + gamma_P^d) + P (2^-1021 + eta_in^2)) rounded up: |y|^2 <= n / (1 - gamma_P^d) plus what
  // flushing to zero can drop (float64 squares and partial sums, subnormal float inputs read as zero)
  const double p = static_cast<double>(plan.width);
  auto r = (out.sq * (1.0 + 2.0 * (p + 2.0) * kUd) + p * (2.0 * 0x1p-1022 + 0x1p-252)).sqrt_() * (1.0 + 4.0 * kUd);
  out.r = at::where(out.sq < plan.wild_sq, r, at::full({}, kInf, r.options()));
  return out;
}

// The GEMM type, the centre and the bound's constants for one call. `sample`: some query rows (any dtype).
Plan make_plan(const at::Tensor& pool, const at::Tensor& sample, int64_t width) {
  Plan plan;
  plan.width = width;
  const auto st = pool.scalar_type();
  const bool small_float = st == at::kFloat || st == at::kHalf || st == at::kBFloat16;
  // float32 needs P u well below 1 for gamma_P to mean anything; P >= 2^22 values per row goes to float64.
  const bool fp32_ok = small_float && width < (int64_t(1) << 22) && (pool.is_cuda() || cpu_fp32_matmul_is_ieee());
  plan.gemm = fp32_ok ? at::kFloat : at::kDouble;
  const double u = fp32_ok ? 0x1p-24 : kUd;
  const double eta = fp32_ok ? 0x1p-126 : 0x1p-1022;
  const double p = static_cast<double>(width);
  plan.gamma2 = 2.0 * (p * u) / (1.0 - p * u);
  plan.u_c = u / (1.0 - u);
  plan.tau = 6.0 * 0x1p-126 * std::sqrt(p) / (1.0 - u);
  plan.gemm_abs = 4.0 * p * eta;
  plan.gemm_lin = 2.0 * eta * std::sqrt(p);
  plan.c_d = 1.01 * (2.0 * p + 64.0) * kUd;
  plan.wild_sq = fp32_ok ? 0x1p100 : 0x1p1000;

  // Centre on the mean of the (finite) sampled query rows when that removes most of their energy: the bound grows
  // with |y_q| |y_j|, so a pool of prompts clustered far from the origin (all trained from one initialisation)
  // would otherwise leave many near-ties to the exact re-rank. Distances do not change, only the GEMM's rounding;
  // any finite centre keeps the bound valid, so an estimate from a sample is enough.
  if (sample.size(0) == 0 || width == 0) return plan;
  auto xs = sample.to(plan.gemm).contiguous();
  auto norms = row_sq_norms(xs);
  auto finite = norms.isfinite();
  auto colsum = xs.index_select(0, finite.nonzero().squeeze(1)).sum(0, /*keepdim=*/false, at::kDouble);
  auto stats = at::stack({finite.sum().to(at::kDouble), norms.masked_fill(finite.logical_not(), 0.0).sum(),
                          colsum.square().sum()})
                   .cpu();  // one device sync
  const double cnt = stats[0].item<double>(), energy = stats[1].item<double>(), colsum_sq = stats[2].item<double>();
  const double kept = cnt > 0 ? colsum_sq / cnt : 0.0;  // cnt |mean|^2 = sum |q|^2 - sum |q - mean|^2
  if (std::isfinite(kept) && kept > 0.5 * energy) {
    plan.center = (colsum / cnt).to(plan.gemm).nan_to_num_(0.0).contiguous();
  }
  return plan;
}

// ------------------------------------------------------------------------------------------------ CPU "select"
struct Ranked {
  double dist;
  int64_t id;
};

// torch.sort's order: ascending, NaN after everything (inf included), equal keys by id (stable over ascending ids).
inline bool ranked_before(const Ranked& a, const Ranked& b) {
  const bool an = std::isnan(a.dist), bn = std::isnan(b.dist);
  if (an != bn) return bn;
  if (!an && a.dist != b.dist) return a.dist < b.dist;
  return a.id < b.id;
}

// float64 sum of squared differences with eight independent partial sums (vectorisable).
template <typename T>
double diff_sq(const T* a, const T* b, int64_t p) {
  double part[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t j = 0;
  for (; j + 8 <= p; j += 8) {
    for (int t = 0; t < 8; ++t) {
      const double d = static_cast<double>(a[j + t]) - static_cast<double>(b[j + t]);
      part[t] += d * d;
    }
  }
  for (; j < p; ++j) {
    const double d = static_cast<double>(a[j]) - static_cast<double>(b[j]);
    part[0] += d * d;
  }
  return ((part[0] + part[1]) + (part[2] + part[3])) + ((part[4] + part[5]) + (part[6] + part[7]));
}

struct Scored {
  double lo, hi;  // bounds on the reference's S (its float64 sum before the square root)
  int64_t id;
};

// Tight bounds on the reference's S for candidates `ids` of query row `qid`, into `scored` (same order).
//
// torch.cdist's CPU kernel adds the P squares one after the other (a serial chain, ~4 cycles per value): run on
// every candidate it cost more than the filter. So every candidate first gets S~, a float64 sum in our own
// (vectorised) order. Both S~ and the reference's S are within gamma_(P+2)^d D of the real D (rounded difference,
// square and P - 1 additions, in any order), up to flushed subnormals: values read as zero move sqrt(S) by at most
// beta = 4 eta_in sqrt(P), and flushed float64 squares and sums move S by at most alpha. So S lies in
// [(sqrt(S~) - beta)^2 (1 - delta) - alpha, (sqrt(S~) + beta)^2 (1 + delta) + alpha], delta = 4 (P + 4) u_d.
// Non-finite or huge S~ gets [2^999, inf]: such a row is behind every finite distance below that.
void score_candidates(const at::Tensor& flat, int64_t qid, const std::vector<int64_t>& ids, int64_t slice,
                      std::vector<Scored>& scored) {
  const int64_t m = static_cast<int64_t>(ids.size()), width = flat.size(1);
  const double delta = 4.0 * (static_cast<double>(width) + 4.0) * kUd;
  const double alpha = 4.0 * (static_cast<double>(width) + 1.0) * 0x1p-1022;
  const double beta = 4.0 * 0x1p-126 * std::sqrt(static_cast<double>(width));
  scored.resize(m);
  const auto score = [&](int64_t t, double sq) {
    if (sq < 0x1p1000) {  // finite and far from overflow (NaN fails too)
      const double root = std::sqrt(sq), below = std::max(0.0, root - beta), above = root + beta;
      scored[t] = Scored{below * below * (1.0 - delta) - alpha, above * above * (1.0 + delta) + alpha, ids[t]};
    } else {
      scored[t] = Scored{0x1p999, kInf, ids[t]};
    }
  };
  const bool direct = flat.is_contiguous() && (flat.scalar_type() == at::kFloat || flat.scalar_type() == at::kDouble);
  if (direct && flat.scalar_type() == at::kFloat) {
    const float* x = flat.data_ptr<float>();
    for (int64_t t = 0; t < m; ++t) score(t, diff_sq(x + qid * width, x + ids[t] * width, width));
  } else if (direct) {
    const double* x = flat.data_ptr<double>();
    for (int64_t t = 0; t < m; ++t) score(t, diff_sq(x + qid * width, x + ids[t] * width, width));
  } else {  // half, bfloat16, integers or a strided pool: through float64 copies, `slice` rows at a time
    auto xq = flat.select(0, qid).to(at::kDouble).contiguous();
    for (int64_t s0 = 0; s0 < m; s0 += slice) {
      const int64_t len = std::min(slice, m - s0);
      auto idx = at::from_blob(const_cast<int64_t*>(ids.data()) + s0, {len}, at::TensorOptions().dtype(at::kLong));
      auto rows = flat.index_select(0, idx).to(at::kDouble).contiguous();
      for (int64_t t = 0; t < len; ++t) {
        score(s0 + t, diff_sq(xq.data_ptr<double>(), rows.data_ptr<double>() + t * width, width));
      }
    }
  }
}

// One candidate list per query, filled straight from the Gram block by an OpenMP loop over queries.
struct QueryState {
  std::vector<double> ups;                        // max-heap: the `take` smallest upper bounds so far
  std::vector<std::pair<double, int64_t>> cands;  // (lo, id) with lo <= U' at the time they were seen
  size_t next_prune = 0;
};

inline void push_up(std::vector<double>& ups, double up, size_t take) {
  ups.push_back(up);
  std::push_heap(ups.begin(), ups.end());
  if (ups.size() > take) {
    std::pop_heap(ups.begin(), ups.end());
    ups.pop_back();
  }
}

// When the GEMM's bound cannot thin a list (rows far from the centre in several clusters, or many near-ties), the
// list is refined with score_candidates' tight bounds: U becomes the take-th smallest tight upper bound (the heap
// only ever holds rows that are in the list, so these are `take` distinct rows), and rows ruled out go. This keeps
// the list near `take` plus the true near-ties, instead of growing with the pool.
void compact(QueryState& st, const at::Tensor& flat, int64_t qid, size_t take, int64_t slice,
             std::vector<int64_t>& ids, std::vector<Scored>& scored) {
  ids.clear();
  for (const auto& e : st.cands) ids.push_back(e.second);
  score_candidates(flat, qid, ids, slice, scored);
  st.ups.clear();
  for (const auto& sc : scored) push_up(st.ups, sc.hi, take);
  const double limit = st.ups.size() == take ? loosen(st.ups.front()) : kInf;
  st.cands.clear();
  for (const auto& sc : scored) {
    if (sc.lo <= limit) st.cands.emplace_back(sc.lo, sc.id);
  }
}

template <typename G>
void filter_block_cpu(const at::Tensor& gram, const Rows& q, const Rows& c, const at::Tensor& flat,
                      const bool* present, const int64_t* qids, int64_t col0, int64_t take, int64_t slice,
                      const Plan& plan, QueryState* states) {
  const int64_t qn = gram.size(0), cn = gram.size(1);
  const G* g = gram.data_ptr<G>();
  const double* qsq = q.sq.data_ptr<double>();
  const double* qr = q.r.data_ptr<double>();
  const double* psq = c.sq.data_ptr<double>();
  const double* pr = c.r.data_ptr<double>();
  const size_t full = static_cast<size_t>(take);
  const size_t compact_at = std::max<size_t>(4096, 16 * full);
  at::parallel_for(0, qn, 1, [&](int64_t begin, int64_t end) {
    std::vector<int64_t> ids;
    std::vector<Scored> scored;
    for (int64_t i = begin; i < end; ++i) {
      QueryState& st = states[i];
      double limit = st.ups.size() == full ? loosen(st.ups.front()) : kInf;
      const int64_t self = qids[i];
      const G* row = g + i * cn;
      for (int64_t j = 0; j < cn; ++j) {
        const int64_t id = col0 + j;
        if (!present[id] || id == self) continue;
        double lo, up;
        plan.interval(qsq[i] + psq[j] - 2.0 * static_cast<double>(row[j]), qr[i], pr[j], lo, up);
        if (!(lo <= limit)) continue;  // provably behind `take` rows already seen
        if (st.ups.size() < full || up < st.ups.front()) {
          push_up(st.ups, up, full);
          if (st.ups.size() == full) limit = loosen(st.ups.front());
        }
        st.cands.emplace_back(lo, id);
      }
      // drop candidates the tightened limit has ruled out, and refine a list that stays long; amortised (the
      // threshold doubles with what is left), so a list that cannot shrink costs O(its size) overall
      if (st.cands.size() > st.next_prune) {
        st.cands.erase(std::remove_if(st.cands.begin(), st.cands.end(),
                                      [limit](const std::pair<double, int64_t>& e) { return !(e.first <= limit); }),
                       st.cands.end());
        if (st.cands.size() > compact_at) compact(st, flat, self, full, slice, ids, scored);
        st.next_prune = std::max<size_t>(std::max<size_t>(2 * full + 64, compact_at), 2 * st.cands.size());
      }
    }
  });
}

// The exact order of one query's candidates, first `take` ids into `out`. Sorted by the start of their
// score_candidates interval (that is, by S~), the candidates split into groups wherever the next interval starts
// above (1 + 64 u_d) x the highest end so far: across groups the reference's R = fl(sqrt(S)) is then strictly
// ordered (as in the filter's rule). Only groups of two or more (near-ties at float64 resolution, duplicates,
// non-finite values) need torch.cdist for the reference's exact R, to order them by (R, id).
void order_candidates(const at::Tensor& flat, int64_t qid, const std::vector<int64_t>& ids, int64_t take,
                      int64_t slice, std::vector<Scored>& scored, std::vector<Ranked>& group, int64_t* out) {
  const int64_t m = static_cast<int64_t>(ids.size());
  score_candidates(flat, qid, ids, slice, scored);
  std::sort(scored.begin(), scored.end(),
            [](const Scored& a, const Scored& b) { return a.lo < b.lo || (a.lo == b.lo && a.id < b.id); });
  int64_t done = 0, pos = 0;
  while (done < take) {
    const int64_t begin = pos;
    double hi = scored[pos++].hi;
    while (pos < m && !(hi + 64.0 * kUd * hi < scored[pos].lo)) hi = std::max(hi, scored[pos++].hi);
    if (pos - begin == 1) {
      out[done++] = scored[begin].id;
      continue;
    }
    // the reference's kernel on these rows: torch.cdist without the GEMM, in float64
    auto xq = flat.select(0, qid).to(at::kDouble).unsqueeze(0);
    group.clear();
    for (int64_t s0 = begin; s0 < pos; s0 += slice) {
      const int64_t len = std::min(slice, pos - s0);
      std::vector<int64_t> gid(len);
      for (int64_t t = 0; t < len; ++t) gid[t] = scored[s0 + t].id;
      auto idx = at::from_blob(gid.data(), {len}, at::TensorOptions().dtype(at::kLong));
      auto dist = at::cdist(xq, flat.index_select(0, idx).to(at::kDouble), 2.0, /*donot_use_mm*/ 2).contiguous();
      const double* d = dist.data_ptr<double>();
      for (int64_t t = 0; t < len; ++t) group.push_back(Ranked{d[t], gid[t]});
    }
    std::sort(group.begin(), group.end(), ranked_before);
    for (size_t t = 0; t < group.size() && done < take; ++t) out[done++] = group[t].id;
  }
}

at::Tensor rerank_cpu(const at::Tensor& flat, const int64_t* qids, std::vector<QueryState>& states, int64_t take,
                      int64_t slice) {
  const int64_t nq = static_cast<int64_t>(states.size());
  auto out = at::empty({nq, take}, flat.options().dtype(at::kLong));
  int64_t* o = out.data_ptr<int64_t>();
  at::parallel_for(0, nq, 1, [&](int64_t begin, int64_t end) {
    std::vector<int64_t> ids;
    std::vector<Scored> scored;
    std::vector<Ranked> group;
    for (int64_t i = begin; i < end; ++i) {
      QueryState& st = states[i];
      TORCH_CHECK(st.ups.size() == static_cast<size_t>(take), "knn: internal error, too few upper bounds");
      const double limit = loosen(st.ups.front());
      ids.clear();
      for (const auto& e : st.cands) {
        if (e.first <= limit) ids.push_back(e.second);
      }
      std::vector<std::pair<double, int64_t>>().swap(st.cands);
      TORCH_CHECK(static_cast<int64_t>(ids.size()) >= take, "knn: internal error, too few candidates");
      order_candidates(flat, qids[i], ids, take, slice, scored, group, o + i * take);
    }
  });
  return out;
}

// ------------------------------------------------------------------------------------------------ any device
// Running lists kept as tensors: the W smallest lower bounds with their ids, and the `take` smallest upper bounds.
// Only which values a list holds matters (equal keys may come in any order), so at::topk can merge; lists stay
// ascending, so that column W - 1 is the W-th smallest.
struct ListState {
  at::Tensor lo;   // [q, W] float64, ascending, +inf in empty slots
  at::Tensor ids;  // [q, W] long, kNoId in empty slots
  at::Tensor up;   // [q, take] float64, ascending
};

void merge_topk(const at::Tensor& keys, const at::Tensor& key_ids, at::Tensor& best, at::Tensor* best_ids) {
  const int64_t t = best.size(1);
  auto merged = at::topk(at::cat({best, keys}, 1), t, 1, /*largest=*/false, /*sorted=*/true);
  if (best_ids != nullptr) {
    auto all_ids = at::cat({*best_ids, key_ids.expand({keys.size(0), keys.size(1)})}, 1);
    best_ids->copy_(all_ids.gather(1, std::get<1>(merged)));
  }
  best.copy_(std::get<0>(merged));
}

// Fills `state` (for the queries `qids`, [q] long on the pool's device) with one pass of blocked GEMMs over the pool.
void filter_pass(const at::Tensor& flat, const at::Tensor& present, const at::Tensor& qids, int64_t take, int64_t w,
                 int64_t chunk, bool use_kernel, const Plan& plan, const Budget& budget, ListState& state) {
  const int64_t n = flat.size(0), nq = qids.size(0);
  auto dopts = flat.options().dtype(at::kDouble);
  state.lo = at::full({nq, w}, kInf, dopts);
  state.ids = at::full({nq, w}, kNoId, dopts.dtype(at::kLong));
  state.up = at::full({nq, take}, kInf, dopts);
  at::Tensor up_ids = use_kernel ? at::full({nq, take}, kNoId, dopts.dtype(at::kLong)) : at::Tensor();
  const int64_t qblock = std::max<int64_t>(1, std::min<int64_t>(nq, budget.block_elems / (chunk + w)));
  const auto inf = at::full({}, kInf, dopts);
  const auto minus_inf = at::full({}, -kInf, dopts);
  for (int64_t q0 = 0; q0 < nq; q0 += qblock) {
    const int64_t qn = std::min(qblock, nq - q0);
    auto qids_blk = qids.narrow(0, q0, qn);
    const Rows q = prepare_rows(flat.index_select(0, qids_blk), plan);
    auto lo_best = state.lo.narrow(0, q0, qn);
    auto id_best = state.ids.narrow(0, q0, qn);
    auto up_best = state.up.narrow(0, q0, qn);
    auto up_id_best = use_kernel ? up_ids.narrow(0, q0, qn) : at::Tensor();
    for (int64_t c0 = 0; c0 < n; c0 += chunk) {
      const int64_t cn = std::min(chunk, n - c0);
      const Rows c = prepare_rows(flat.narrow(0, c0, cn), plan);
      auto gram = at::mm(q.y, c.y.t()).to(at::kDouble);  // [qn, cn]: one GEMM per block
      // the bound of Plan::interval, elementwise
      auto dhat = (q.sq.unsqueeze(1) + c.sq.unsqueeze(0)) - gram * 2.0;
      auto rq = q.r.unsqueeze(1), rj = c.r.unsqueeze(0);
      auto s = rq + rj;
      auto eps = s * plan.u_c + plan.tau;
      auto b = ((rq * rj) * plan.gamma2 + plan.gemm_abs + s * plan.gemm_lin + eps * (s * 2.0 + eps) +
                (s * s) * plan.c_d) *
               (1.0 + 0x1p-40);
      auto wild = s.isfinite().logical_not() | dhat.isnan();
      auto ids = at::arange(c0, c0 + cn, qids.options());
      auto invalid =
          present.narrow(0, c0, cn).logical_not().unsqueeze(0) | (ids.unsqueeze(0) == qids_blk.unsqueeze(1));
      auto lo = at::where(wild, minus_inf, dhat - b).masked_fill_(invalid, kInf);
      auto up = at::where(wild, inf, dhat + b).masked_fill_(invalid, kInf);
#ifdef PFEDMOAP_WITH_CUDA
      if (use_kernel) {
        // the kernel skips +inf keys: invalid rows never enter, and wild rows' +inf upper bounds change nothing
        knn_merge_block_cuda(lo.contiguous(), c0, lo_best, id_best, w);
        knn_merge_block_cuda(up.contiguous(), c0, up_best, up_id_best, take);
        continue;
      }
#endif
      // invalid rows (+inf lower bound) carry no id: an empty slot
      merge_topk(lo, at::where(lo < kInf, ids.unsqueeze(0), kNoId), lo_best, &id_best);
      merge_topk(up, at::Tensor(), up_best, nullptr);
    }
  }
}

// Exact re-rank of the candidates `cand` [q, W] (kNoId: none) of the queries `qids`; returns [q, take] ids.
at::Tensor rerank_tensors(const at::Tensor& flat, const at::Tensor& qids, const at::Tensor& cand, int64_t take,
                          const Budget& budget) {
  const int64_t n = flat.size(0), width = flat.size(1), nq = cand.size(0), w = cand.size(1);
  auto out = at::empty({nq, take}, cand.options());
  const int64_t row_elems = std::max<int64_t>(width, 1);
  const int64_t qb = std::max<int64_t>(1, budget.rerank_elems / (w * row_elems));
  const int64_t slice = std::max<int64_t>(1, budget.rerank_elems / (std::min(qb, nq) * row_elems));
  for (int64_t q0 = 0; q0 < nq; q0 += qb) {
    const int64_t qn = std::min(qb, nq - q0);
    // ascending ids first, so that the stable sort by distance below leaves equal distances in id order
    auto ids = std::get<0>(at::sort(cand.narrow(0, q0, qn), 1));
    auto real = ids < n;
    auto safe = at::where(real, ids, 0);
    auto xq = flat.index_select(0, qids.narrow(0, q0, qn)).to(at::kDouble).unsqueeze(1);  // [qn, 1, P]
    auto dist = at::empty({qn, w}, flat.options().dtype(at::kDouble));
    for (int64_t s0 = 0; s0 < w; s0 += slice) {
      const int64_t len = std::min(slice, w - s0);
      auto rows = flat.index_select(0, safe.narrow(1, s0, len).reshape({-1})).to(at::kDouble).view({qn, len, width});
      // the reference's kernel: torch.cdist without the GEMM; its value for a pair does not depend on the batch
      dist.narrow(1, s0, len).copy_(at::cdist(xq, rows, 2.0, /*donot_use_mm*/ 2).squeeze(1));
    }
    dist.masked_fill_(real.logical_not(), kNaN);  // empty slots: NaN with id kNoId, after every real NaN
    auto order = std::get<1>(at::sort(dist, /*stable=*/true, /*dim=*/1, /*descending=*/false));
    out.narrow(0, q0, qn).copy_(ids.gather(1, order.narrow(1, 0, take)));
  }
  return out;
}

}  // namespace

at::Tensor row_sq_norms(const at::Tensor& rows) {
  TORCH_CHECK(rows.dim() == 2, "row_sq_norms expects a 2-D tensor");
  TORCH_CHECK(rows.scalar_type() == at::kFloat || rows.scalar_type() == at::kDouble,
              "row_sq_norms expects float32 or float64 rows");
  if (rows.is_cuda()) {
#ifdef PFEDMOAP_WITH_CUDA
    return row_sq_norms_cuda(rows.contiguous());
#else
    TORCH_CHECK(false, "pfedmoap._C was built without CUDA");
#endif
  }
  auto x = rows.contiguous();
  auto out = at::empty({x.size(0)}, x.options().dtype(at::kDouble));
  if (x.scalar_type() == at::kFloat) {
    row_sq_norms_cpu_impl(x.data_ptr<float>(), x.size(0), x.size(1), out.data_ptr<double>());
  } else {
    row_sq_norms_cpu_impl(x.data_ptr<double>(), x.size(0), x.size(1), out.data_ptr<double>());
  }
  return out;
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
  auto flat = pool.reshape({n, width});

#ifdef PFEDMOAP_WITH_CUDA
  c10::OptionalDeviceGuard device_guard(on_cuda ? std::optional<at::Device>(pool.device()) : std::nullopt);
  at::NoTF32Guard no_tf32;  // TF32 (10-bit mantissa) would break the error bound of the float32 GEMM
#endif
  auto present_dev = on_cuda ? present.to(pool.device(), at::kBool).contiguous() : present_host;
  auto queries_dev = on_cuda ? queries.to(pool.device(), at::kLong).contiguous() : queries_host;

  const Plan plan = make_plan(pool, flat.index_select(0, queries_dev.narrow(0, 0, std::min<int64_t>(nq, 256))), width);
  const int64_t chunk = std::max<int64_t>(
      1, std::min<int64_t>(n, chunk_rows > 0 ? chunk_rows : budget.chunk_elems / std::max<int64_t>(width, 1)));

  if (!on_cuda && method != "sort") {
    const int64_t slice = std::max<int64_t>(1, budget.rerank_elems / std::max<int64_t>(width, 1));
    std::vector<QueryState> states(nq);
    const int64_t qblock = std::max<int64_t>(1, std::min<int64_t>(nq, budget.block_elems / chunk));
    for (int64_t q0 = 0; q0 < nq; q0 += qblock) {
      const int64_t qn = std::min(qblock, nq - q0);
      const Rows q = prepare_rows(flat.index_select(0, queries_host.narrow(0, q0, qn)), plan);
      for (int64_t c0 = 0; c0 < n; c0 += chunk) {
        const int64_t cn = std::min(chunk, n - c0);
        const Rows c = prepare_rows(flat.narrow(0, c0, cn), plan);
        auto gram = at::mm(q.y, c.y.t()).contiguous();  // [qn, cn]: one GEMM per block
        if (gram.scalar_type() == at::kFloat) {
          filter_block_cpu<float>(gram, q, c, flat, pres, qids + q0, c0, take, slice, plan, states.data() + q0);
        } else {
          filter_block_cpu<double>(gram, q, c, flat, pres, qids + q0, c0, take, slice, plan, states.data() + q0);
        }
      }
    }
    return rerank_cpu(flat, qids, states, take, slice);
  }

  // Tensor lists of fixed width W. The filter is complete for a query when its W-th smallest lower bound exceeds U'
  // (every row left out is provably too far) or W covers the pool; otherwise that query is filtered again, wider.
#ifdef PFEDMOAP_WITH_CUDA
  const bool kernel_ok = on_cuda && method != "sort";
#else
  const bool kernel_ok = false;
#endif
  auto out = at::empty({nq, take}, long_opts);
  auto pending = at::arange(nq, long_opts);  // positions in `queries` still to do
  int64_t w = std::min(n, take + std::max<int64_t>(take, 16));
  while (pending.size(0) > 0) {
    auto qsub = queries_dev.index_select(0, pending);
    const bool use_kernel = kernel_ok && w <= kKnnKernelMaxTake && take <= kKnnKernelMaxTake;
    ListState state;
    filter_pass(flat, present_dev, qsub, take, w, chunk, use_kernel, plan, budget, state);
    auto limit = state.up.select(1, take - 1);
    limit = limit + limit.abs() * (64.0 * kUd);  // U' (loosen)
    auto cand = at::where(state.lo <= limit.unsqueeze(1), state.ids, kNoId);
    auto done = (state.ids.select(1, w - 1) >= n) | (state.lo.select(1, w - 1) > limit);
    if (w >= n) done.fill_(true);
    auto done_pos = done.nonzero().squeeze(1);
    if (done_pos.size(0) > 0) {
      out.index_copy_(0, pending.index_select(0, done_pos),
                      rerank_tensors(flat, qsub.index_select(0, done_pos), cand.index_select(0, done_pos), take,
                                     budget));
    }
    pending = pending.index_select(0, done.logical_not().nonzero().squeeze(1));
    w = w * 8 >= n ? n : w * 8;
  }
  return out;
}

}  // namespace pfedmoap
