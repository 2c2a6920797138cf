// CPU kernels of qadapter::combined_logits, combined_sample and combined_sample_from_hidden.
//
// Sampling never sorts the vocabulary. Per row, in thread-local scratch that stays in cache:
// y = (Q + alpha_0 * L) / alpha_tilde (log_softmax(L) only shifts a row by a constant, which no
// filter and no draw can see), w = exp((y - max) / temperature) with each block's maximum weight;
// the block maxima bound the top-k and top-p thresholds from below, so only the blocks that can
// hold a kept token are read again, into a candidate list; the exact thresholds come from weighted
// quickselect over the candidates, min-p is w >= min_p, and the draw is one inverse-CDF walk over
// the candidates in vocabulary order with the row's uniform draw.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "checks.h"
#include "combined_hidden.h"
#include "vocab_tile.h"

namespace qadapter {
namespace {

struct RowParams {
  float temperature, top_p, min_p, uniform;
  int64_t top_k;

  bool by_k(int64_t vocab) const { return top_k > 0 && top_k < vocab; }
  bool by_p() const { return top_p < 1.f; }
};

using Vec = Vectorized<float>;
constexpr int64_t kVec = Vec::size();

// The filters' thresholds are bounded from below by the maxima of blocks of kBlock entries: the k
// largest block maxima are k distinct entries, so the k-th largest entry is at least the k-th largest
// block maximum; and if block maxima at or above t weigh p of the mass, so do the entries at or above
// t, so the top-p threshold is at least that t. Only blocks whose maximum reaches the bound are read
// again; with a nucleus of a few hundred tokens that is a few hundred blocks of the vocabulary. When
// the block maxima cannot reach the bound (a nucleus larger than, or crowded into, the blocks), the
// maxima of each block's vector lanes (kBlock / lanes entries each, kept from the same pass) can.
constexpr int64_t kBlock = 64;

// Per-thread scratch of sample_row, reused from row to row.
struct RowScratch {
  std::vector<float> block_max;   // per block: max of y, then max of the weights
  std::vector<float> lane_max;    // per block and vector lane: the max weight of the lane's entries
  std::vector<float> values;      // candidates' weights (vocabulary order), then permuted by selection
  std::vector<int64_t> indices;   // candidates' vocabulary indices
  std::vector<float> work;
  std::vector<float> block_weight;  // sample_row_lazily: each block's maximum as a weight
  std::vector<float> weights;       // sample_row_lazily: the candidate blocks' weights, at their indices
};

inline float reduce_max(const Vec& v) {
  return at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return at::vec::maximum(a, b); }, v);
}

inline float reduce_sum(const Vec& v) {
  return at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return a + b; }, v);
}

// max of y over [begin, end) (NaN propagates).
inline float range_max(const float* y, int64_t begin, int64_t end) {
  const int64_t n_vec = begin + (end - begin) - (end - begin) % kVec;
  Vec vmax(-std::numeric_limits<float>::infinity());
  for (int64_t v = begin; v < n_vec; v += kVec) vmax = at::vec::maximum(vmax, Vec::loadu(y + v));
  float m = reduce_max(vmax);
  for (int64_t v = n_vec; v < end; ++v) m = max_nan(m, y[v]);
  return m;
}

// Row maximum of y, with each block's maximum in block_max (a pass over a row already written).
float block_maxima(const float* y, int64_t vocab, std::vector<float>& block_max) {
  const int64_t blocks = (vocab + kBlock - 1) / kBlock;
  block_max.resize(blocks);
  float row_max = -std::numeric_limits<float>::infinity();
  for (int64_t b = 0; b < blocks; ++b) {
    block_max[b] = range_max(y, b * kBlock, std::min(vocab, (b + 1) * kBlock));
    row_max = max_nan(row_max, block_max[b]);
  }
  return row_max;
}

// y becomes w = exp((y - max_y) / temperature) in place; block_max becomes each block's max weight
// (computed from the stored weights, so a bound never exceeds an entry it stands for). Returns the
// total weight, summed in vector lanes then in double.
//
// Every weight comes from weigh_block, so a weight computed again for a candidate (sample_row_lazily)
// is bitwise the one a whole-row pass computes.
struct NoVisit {
  void vector(const Vec&) {}
  void scalar(float) {}
};

// w[v] = exp((y[v] - max_y) / temperature) over [begin, end): vectors, then the scalar tail.
template <typename Visit = NoVisit>
inline void weigh_range(const float* y, float* w, int64_t begin, int64_t end, float max_y, float temperature,
                        Visit&& visit = Visit()) {
  const Vec v_max(max_y), v_inv_t(1.f / temperature);
  const int64_t n_vec = begin + (end - begin) - (end - begin) % kVec;
  for (int64_t v = begin; v < n_vec; v += kVec) {
    const Vec wv = vexp<float>((Vec::loadu(y + v) - v_max) * v_inv_t);
    wv.store(w + v);
    visit.vector(wv);
  }
  for (int64_t v = n_vec; v < end; ++v) visit.scalar(w[v] = std::exp((y[v] - max_y) / temperature));
}

template <typename Visit = NoVisit>
inline void weigh_block(const float* y, float* w, int64_t b, int64_t vocab, float max_y, float temperature,
                        Visit&& visit = Visit()) {
  weigh_range(y, w, b * kBlock, std::min(vocab, (b + 1) * kBlock), max_y, temperature, visit);
}

double weigh_row(float* y, int64_t vocab, float max_y, float temperature, RowScratch& s) {
  struct Totals {
    Vec sum{0.f}, bmax{0.f};
    double tail = 0;
    float tail_max = 0.f;
    void vector(const Vec& w) {
      sum += w;
      bmax = at::vec::maximum(bmax, w);
    }
    void scalar(float w) {  // the block's tail joins the first lane's entries
      tail += w;
      tail_max = std::max(tail_max, w);
    }
  } totals;
  std::vector<float>& block_max = s.block_max;
  s.lane_max.resize(block_max.size() * kVec);
  for (int64_t b = 0; b < int64_t(block_max.size()); ++b) {
    totals.bmax = Vec(0.f);
    totals.tail_max = 0.f;
    weigh_block(y, y, b, vocab, max_y, temperature, totals);
    float* lanes = s.lane_max.data() + b * kVec;
    totals.bmax.store(lanes);
    lanes[0] = std::max(lanes[0], totals.tail_max);
    block_max[b] = *std::max_element(lanes, lanes + kVec);
  }
  return double(reduce_sum(totals.sum)) + totals.tail;
}

// The threshold t over values[0, n) such that mass(values > t) < target <= mass(values >= t),
// where mass counts 1 per element (top-k) or the element's value (top-p). Permutes values.
template <bool kByCount>
float select_threshold(float* values, int64_t n, double target) {
  double above = 0;  // mass of the elements known to lie above the current range
  int64_t lo = 0, hi = n;
  float last_pivot = values[0];
  while (hi > lo) {
    // Median of three keeps arbitrary token orders from degrading to quadratic time.
    float a = values[lo], b = values[lo + (hi - lo) / 2], c = values[hi - 1];
    const float pivot = std::max(std::min(a, b), std::min(std::max(a, b), c));
    last_pivot = pivot;
    // Three-way partition: [lo, gt) > pivot, [gt, lt) == pivot, [lt, hi) < pivot.
    int64_t gt = lo, i = lo, lt = hi;
    double mass_gt = 0, mass_eq = 0;
    while (i < lt) {
      const float v = values[i];
      if (v > pivot) {
        mass_gt += kByCount ? 1.0 : double(v);
        std::swap(values[gt++], values[i++]);
      } else if (v < pivot) {
        std::swap(values[i], values[--lt]);
      } else {
        mass_eq += kByCount ? 1.0 : double(v);
        ++i;
      }
    }
    if (above + mass_gt >= target) {
      hi = gt;
    } else if (above + mass_gt + mass_eq >= target) {
      return pivot;
    } else {
      above += mass_gt + mass_eq;
      lo = lt;
    }
  }
  // Rounding left the target just out of reach: keep everything down to the last pivot's side.
  return kByCount ? last_pivot : (lo < n ? values[lo] : last_pivot);
}

// Appends block b's entries with w >= bound and w > 0, in vocabulary order, to scratch.indices / values.
inline void gather_block(const float* w, int64_t b, int64_t vocab, float bound, RowScratch& s) {
  for (int64_t v = b * kBlock, end = std::min(vocab, v + kBlock); v < end; ++v) {
    if (w[v] >= bound && w[v] > 0.f) {
      s.indices.push_back(v);
      s.values.push_back(w[v]);
    }
  }
}

// The entries with w >= bound and w > 0, in vocabulary order, into scratch.indices / scratch.values:
// only blocks whose maximum weight reaches the bound are read.
void gather_candidates(const float* w, int64_t vocab, float bound, RowScratch& s) {
  s.indices.clear();
  s.values.clear();
  for (int64_t b = 0; b < int64_t(s.block_max.size()); ++b) {
    if (s.block_max[b] >= bound && s.block_max[b] > 0.f) gather_block(w, b, vocab, bound, s);
  }
}

// A lower bound of the top-k or top-p threshold from maxima of disjoint sets of entries (`maxima`);
// -1 when they cannot bound it. Maxima below (1 - top_p) * total / count weigh less than 1 - top_p
// together and are left out of the top-p selection (the bound holds for any subset that reaches the mass).
float bound_from_maxima(const std::vector<float>& maxima, const RowParams& p, int64_t vocab, double total,
                        std::vector<float>& work) {
  const int64_t n = int64_t(maxima.size());
  if (p.by_k(vocab)) {
    if (p.top_k > n) return -1.f;
    work.assign(maxima.begin(), maxima.end());
    return select_threshold<true>(work.data(), n, double(p.top_k));
  }
  const double target = double(p.top_p) * total;
  const float negligible = float((1.0 - p.top_p) * total / double(n));
  work.clear();
  double mass = 0;
  for (const float m : maxima) {
    if (m >= negligible && m > 0.f) {
      work.push_back(m);
      mass += m;
    }
  }
  if (work.empty() || mass < target) return -1.f;
  return select_threshold<false>(work.data(), int64_t(work.size()), target);
}

// A lower bound of the threshold top-k and top-p (over the whole row, mass total) will choose, from
// the block maxima, else from the lane maxima; 0 when neither bounds it.
float threshold_bound(const RowParams& p, int64_t vocab, double total, RowScratch& s) {
  if (p.by_k(vocab) || p.by_p()) {
    for (const std::vector<float>* maxima : {&s.block_max, &s.lane_max}) {
      const float bound = bound_from_maxima(*maxima, p, vocab, total, s.work);
      if (bound >= 0.f) return bound;
    }
    return 0.f;
  }
  return p.min_p;  // min-p alone: its threshold, exactly (the largest weight is 1)
}

constexpr int64_t kGatherAgain = -2;

// The thresholds (quickselect over the candidates in s.values / s.indices: every entry the filters may
// keep) and the draw. total: the row's mass, read by top-p without top-k only. Returns kGatherAgain when
// the candidates (gathered down to a bound > 0) fall short of the top-p mass by rounding.
int64_t draw_from_candidates(const RowParams& p, int64_t vocab, double total, float bound, RowScratch& s) {
  const int64_t n = int64_t(s.values.size());
  if (n == 0) return -1;
  float top_k_threshold = 0.f;
  double kept_by_k = total;
  if (p.by_k(vocab) && n >= p.top_k) {
    s.work.assign(s.values.begin(), s.values.end());
    top_k_threshold = select_threshold<true>(s.work.data(), n, double(p.top_k));
    kept_by_k = 0;
    for (const float w : s.values) kept_by_k += w >= top_k_threshold ? double(w) : 0.0;
  }
  float threshold = std::max(p.min_p, top_k_threshold);
  if (p.by_p()) {
    // top-p renormalises over what top-k kept.
    s.work.clear();
    double candidate_mass = 0;
    for (const float w : s.values) {
      if (w >= top_k_threshold) {
        s.work.push_back(w);
        candidate_mass += w;
      }
    }
    const double target = double(p.top_p) * kept_by_k;
    if (candidate_mass < target && bound > 0.f) return kGatherAgain;
    threshold = std::max(threshold, select_threshold<false>(s.work.data(), int64_t(s.work.size()), target));
  }
  double kept = 0;
  int64_t last = -1;
  for (int64_t i = 0; i < n; ++i) {
    if (s.values[i] >= threshold) {
      kept += s.values[i];
      last = i;
    }
  }
  const double target = double(p.uniform) * kept;
  double cumulative = 0;
  for (int64_t i = 0; i < n; ++i) {
    if (s.values[i] >= threshold) {
      cumulative += s.values[i];
      if (cumulative > target) return s.indices[i];
    }
  }
  return last < 0 ? -1 : s.indices[last];  // rounding ran past the end: the last kept entry
}

// Neither top-k nor min-p needs the row's total mass (top-p after top-k renormalises over what top-k
// kept), so with top-k, or min-p without top-p, only candidate blocks are weighed: the bound comes from
// the blocks' maxima of y (in s.block_max) as weights, lowered by 1e-5 relative so that a few ulp of
// difference between this exp and the vector one of weigh_block never drop an entry, and only the
// blocks reaching it get weights, by weigh_block (the very values a whole-row pass computes; extra
// candidates below a threshold change no selection). False (y untouched) when the bound cannot be set
// from the block maxima or misses the target: the caller weighs the whole row.
bool sample_row_lazily(const float* y, int64_t vocab, float max_y, const RowParams& p, RowScratch& s,
                       int64_t& token) {
  const bool by_k = p.by_k(vocab);
  const int64_t blocks = int64_t(s.block_max.size());
  s.block_weight.resize(blocks);
  weigh_range(s.block_max.data(), s.block_weight.data(), 0, blocks, max_y, p.temperature);
  // top-k's bound from the block maxima (-1: fewer blocks than k), else min-p's own threshold.
  float bound = by_k ? bound_from_maxima(s.block_weight, p, vocab, 0.0, s.work) : p.min_p;
  bound *= 1.f - 1e-5f;
  if (!(bound > 0.f)) return false;
  s.indices.clear();
  s.values.clear();
  s.weights.resize(vocab);
  for (int64_t b = 0; b < blocks; ++b) {
    if (!(s.block_weight[b] >= bound)) continue;
    weigh_block(y, s.weights.data(), b, vocab, max_y, p.temperature);
    gather_block(s.weights.data(), b, vocab, bound, s);
  }
  if (by_k && int64_t(s.values.size()) < p.top_k) return false;
  token = draw_from_candidates(p, vocab, std::numeric_limits<double>::quiet_NaN(), bound, s);
  return token != kGatherAgain;
}

// Draws one token from the filtered softmax of `y` (a combined row, before temperature), given its
// maximum and its blocks' maxima in s.block_max (block_maxima, or the pass that wrote y).
// Overwrites y with the unnormalised weights; returns -1 when the row has no finite maximum.
int64_t sample_row(float* y, int64_t vocab, float max_y, const RowParams& p, RowScratch& s) {
  if (!std::isfinite(max_y)) return -1;  // NaN, +inf, or nothing finite
  if (p.temperature == 0.f) {            // the first maximum: the first block holding it, then inside it
    const int64_t b = std::find(s.block_max.begin(), s.block_max.end(), max_y) - s.block_max.begin();
    return std::find(y + b * kBlock, y + vocab, max_y) - y;
  }
  const bool by_k = p.by_k(vocab), by_p = p.by_p();
  int64_t token = -1;
  if ((by_k || (!by_p && p.min_p > 0.f)) && sample_row_lazily(y, vocab, max_y, p, s, token)) return token;
  const double total = weigh_row(y, vocab, max_y, p.temperature, s);
  if (!by_k && !by_p && p.min_p <= 0.f) {  // no filter: one walk over the row
    double cumulative = 0;
    const double target = double(p.uniform) * total;
    int64_t last = -1;
    for (int64_t b = 0; b < int64_t(s.block_max.size()); ++b) {
      const int64_t begin = b * kBlock, end = std::min(vocab, begin + kBlock);
      const int64_t n_vec = begin + (end - begin) - (end - begin) % kVec;
      Vec block(0.f);
      for (int64_t v = begin; v < n_vec; v += kVec) block += Vec::loadu(y + v);
      double block_sum = reduce_sum(block);
      for (int64_t v = n_vec; v < end; ++v) block_sum += y[v];
      if (s.block_max[b] > 0.f) last = b;
      if (cumulative + block_sum <= target) {
        cumulative += block_sum;
        continue;
      }
      for (int64_t v = begin; v < end; ++v) {
        cumulative += y[v];
        if (y[v] > 0.f && cumulative > target) return v;
      }
    }
    if (last < 0) return -1;
    for (int64_t v = std::min(vocab, (last + 1) * kBlock) - 1; v >= last * kBlock; --v) {
      if (y[v] > 0.f) return v;  // rounding ran past the end: the last entry with weight
    }
    return -1;
  }

  // Candidates: every entry any of the filters may keep. Should rounding make the bound miss the
  // top-p target, the row is gathered again in full.
  for (float bound = threshold_bound(p, vocab, total, s);; bound = 0.f) {
    gather_candidates(y, vocab, bound, s);
    const int64_t token = draw_from_candidates(p, vocab, total, bound, s);
    if (token != kGatherAgain) return token;
  }
}

struct SamplingArgs {
  at::Tensor uniforms, temperature, top_k, top_p, min_p;

  RowParams row(int64_t r) const {
    return {temperature.const_data_ptr<float>()[r], top_p.const_data_ptr<float>()[r],
            min_p.const_data_ptr<float>()[r], uniforms.const_data_ptr<float>()[r],
            top_k.const_data_ptr<int64_t>()[r]};
  }
};

SamplingArgs check_sampling_args(int64_t rows, const char* rows_source, const at::Tensor& uniforms,
                                 const at::Tensor& temperature, const at::Tensor& top_k, const at::Tensor& top_p,
                                 const at::Tensor& min_p) {
  auto per_row = [&](const at::Tensor& t, const char* name, at::ScalarType dtype) {
    check_dtype(name, t, dtype);
    check_shape(name, t, {rows}, rows_source);
    return t.contiguous();
  };
  return {per_row(uniforms, "uniforms", at::kFloat), per_row(temperature, "temperature", at::kFloat),
          per_row(top_k, "top_k", at::kLong), per_row(top_p, "top_p", at::kFloat), per_row(min_p, "min_p", at::kFloat)};
}

void check_logits_rows(const at::Tensor& q, const at::Tensor& l) {
  check_float("q_logits", q);
  TORCH_CHECK_VALUE(q.dim() == 2 && q.size(1) > 0, "q_logits must be [B, V] with V >= 1, got ", q.sizes());
  check_float_shape("base_logits", l, q.sizes(), "q_logits");
  TORCH_CHECK_TYPE(l.scalar_type() == q.scalar_type(), "base_logits dtype ", l.scalar_type(),
                   " differs from q_logits dtype ", q.scalar_type());
}

// Writes y = (Q + alpha_0 * L) / alpha_tilde of one row into out (fp32); returns LSE(L) from the
// same sweep.
template <typename scalar_t>
float combine_row(const scalar_t* q, const scalar_t* l, int64_t vocab, const Combine<float>& combine, float* out) {
  constexpr int64_t kTile = 1024;
  float q_buf[kTile], l_buf[kTile];
  OnlineLse<float> lse_y, lse_l;
  for (int64_t start = 0; start < vocab; start += kTile) {
    const int64_t n = std::min(kTile, vocab - start), n_vec = n - n % kVec;
    const float* qt = tile_as_acc<scalar_t, float>(q + start, n, q_buf);
    const float* lt = tile_as_acc<scalar_t, float>(l + start, n, l_buf);
    fold_tile<float>(qt, lt, n, combine, lse_y, lse_l);
    for (int64_t i = 0; i < n_vec; i += kVec) combine(Vec::loadu(qt + i), Vec::loadu(lt + i)).store(out + start + i);
    for (int64_t i = n_vec; i < n; ++i) out[start + i] = combine(qt[i], lt[i]);
  }
  return lse_l.value();
}

// combine_row for sampling: writes y and, in the same pass, each block's maximum into block_max;
// returns the row maximum (NaN propagates).
template <typename scalar_t>
float combine_row_with_block_maxima(const scalar_t* q, const scalar_t* l, int64_t vocab, const Combine<float>& combine,
                                    float* out, std::vector<float>& block_max) {
  float q_buf[kBlock], l_buf[kBlock];
  const int64_t blocks = (vocab + kBlock - 1) / kBlock;
  block_max.resize(blocks);
  float row_max = -std::numeric_limits<float>::infinity();
  for (int64_t b = 0; b < blocks; ++b) {
    const int64_t begin = b * kBlock, n = std::min(kBlock, vocab - begin), n_vec = n - n % kVec;
    const float* qt = tile_as_acc<scalar_t, float>(q + begin, n, q_buf);
    const float* lt = tile_as_acc<scalar_t, float>(l + begin, n, l_buf);
    Vec vmax(-std::numeric_limits<float>::infinity());
    for (int64_t i = 0; i < n_vec; i += kVec) {
      const Vec y = combine(Vec::loadu(qt + i), Vec::loadu(lt + i));
      y.store(out + begin + i);
      vmax = at::vec::maximum(vmax, y);
    }
    float m = reduce_max(vmax);
    for (int64_t i = n_vec; i < n; ++i) m = max_nan(m, out[begin + i] = combine(qt[i], lt[i]));
    block_max[b] = m;
    row_max = max_nan(row_max, m);
  }
  return row_max;
}

at::Tensor combined_logits_cpu(const at::Tensor& q_logits, const at::Tensor& base_logits, double alpha_tilde,
                               double alpha_0) {
  check_logits_rows(q_logits, base_logits);
  const at::Tensor q = q_logits.contiguous(), l = base_logits.contiguous();
  const int64_t rows = q.size(0), vocab = q.size(1);
  at::Tensor out = at::empty({rows, vocab}, q.options().dtype(at::kFloat));
  const Combine<float> combine(alpha_tilde, alpha_0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "combined_logits_cpu", [&] {
    const scalar_t* q_data = q.const_data_ptr<scalar_t>();
    const scalar_t* l_data = l.const_data_ptr<scalar_t>();
    float* out_data = out.mutable_data_ptr<float>();
    at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        float* row = out_data + r * vocab;
        const float lse_l = combine_row<scalar_t>(q_data + r * vocab, l_data + r * vocab, vocab, combine, row);
        // (Q + alpha_0 * log_softmax(L)) / alpha_tilde = y - alpha_0 * LSE(L) / alpha_tilde
        const float shift = float(alpha_0 / alpha_tilde) * lse_l;
        for (int64_t v = 0; v < vocab; ++v) row[v] -= shift;
      }
    });
  });
  return out;
}

at::Tensor combined_sample_cpu(const at::Tensor& q_logits, const at::Tensor& base_logits, const at::Tensor& uniforms,
                               const at::Tensor& temperature, const at::Tensor& top_k, const at::Tensor& top_p,
                               const at::Tensor& min_p, double alpha_tilde, double alpha_0) {
  check_logits_rows(q_logits, base_logits);
  const at::Tensor q = q_logits.contiguous(), l = base_logits.contiguous();
  const int64_t rows = q.size(0), vocab = q.size(1);
  const SamplingArgs args = check_sampling_args(rows, "q_logits", uniforms, temperature, top_k, top_p, min_p);
  at::Tensor tokens = at::empty({rows}, q.options().dtype(at::kLong));
  int64_t* out = tokens.mutable_data_ptr<int64_t>();
  const Combine<float> combine(alpha_tilde, alpha_0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "combined_sample_cpu", [&] {
    const scalar_t* q_data = q.const_data_ptr<scalar_t>();
    const scalar_t* l_data = l.const_data_ptr<scalar_t>();
    at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
      // Kept from call to call: a fresh row buffer would be page-faulted in on every decode step.
      static thread_local std::vector<float> y;
      static thread_local RowScratch scratch;
      y.resize(vocab);
      for (int64_t r = begin; r < end; ++r) {
        const float max_y = combine_row_with_block_maxima<scalar_t>(q_data + r * vocab, l_data + r * vocab, vocab,
                                                                    combine, y.data(), scratch.block_max);
        out[r] = sample_row(y.data(), vocab, max_y, args.row(r), scratch);
      }
    });
  });
  return tokens;
}

// The combined rows y [B, V] (fp32) from hidden states, one W tile at a time. Default: one
// product on h_c (combined_hidden.h). two_stream: the adapter and base rows in one product per
// tile, then y = Q / alpha_tilde + L * alpha_0 / alpha_tilde (twice the FLOPs; the authors' scheme).
at::Tensor combined_rows_from_hidden(const at::Tensor& adapter_hidden, const at::Tensor& base_hidden,
                                     const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                                     double alpha_tilde, double alpha_0, int64_t tile_vocab, bool two_stream) {
  const int64_t rows = adapter_hidden.size(0), vocab = weight.size(0);
  at::Tensor hidden;
  std::optional<at::Tensor> tile_bias = bias;
  if (two_stream) {
    hidden = at::cat({adapter_hidden.to(at::kFloat), base_hidden.to(at::kFloat)});
  } else {
    auto [combined_hidden, combined_bias] =
        combine_hidden(adapter_hidden, base_hidden, bias, alpha_tilde, alpha_0, at::kFloat);
    hidden = combined_hidden;
    tile_bias = combined_bias;
  }
  // MKL's fp32 products of the head, SmolLM2's [128256, 576] on one thread of the development
  // machine: W_tile x hidden^T ([cols, rows]) takes 14.8 / 35.0 / 69.2 ms at 2 / 8 / 16 rows,
  // hidden x W_tile^T ([rows, cols]) 59.0 / 48.8 / 61.9 ms. From 16 rows the second is faster on one
  // thread, and its tiles are already rows of y. On two threads MKL splits the first over the
  // vocabulary and it stays faster at 16 rows (40-46 against 53-55 ms; 1.3x the other way at 128 rows).
  const bool row_tiles = hidden.size(0) >= (at::get_num_threads() == 1 ? 16 : 128);
  if (!row_tiles) hidden = product_columns(hidden);
  const int64_t product_rows = hidden.size(0);
  at::Tensor combined = at::empty({rows, vocab}, hidden.options());
  const bool direct = row_tiles && !two_stream && tile_vocab >= vocab;  // the one tile is y itself
  at::Tensor tile = direct ? combined
                           : row_tiles ? at::empty({product_rows, std::min(tile_vocab, vocab)}, hidden.options())
                                       : at::empty({std::min(tile_vocab, vocab), product_rows}, hidden.options());
  const float inv_at = float(1.0 / alpha_tilde), scale = float(alpha_0 / alpha_tilde);
  for (int64_t v0 = 0; v0 < vocab; v0 += tile_vocab) {
    const int64_t cols = std::min(tile_vocab, vocab - v0);
    const at::Tensor w_tile = weight.narrow(0, v0, cols).to(at::kFloat);
    at::Tensor logits;  // [product_rows, cols]: two_stream: adapter rows, then base rows
    if (row_tiles) {
      logits = tile.narrow(1, 0, cols);
      at::mm_out(logits, hidden, w_tile.t());
      if (tile_bias) logits.add_(tile_bias->narrow(0, v0, cols).to(at::kFloat).unsqueeze(0));
    } else {
      at::Tensor tile_t = tile.narrow(0, 0, cols);
      at::mm_out(tile_t, w_tile, hidden.t());
      if (tile_bias) tile_t.add_(tile_bias->narrow(0, v0, cols).to(at::kFloat).unsqueeze(1));
      logits = tile_t.t();
    }
    if (direct) continue;
    if (two_stream) {
      combined.narrow(1, v0, cols).copy_(logits.narrow(0, 0, rows) * inv_at + logits.narrow(0, rows, rows) * scale);
    } else {
      combined.narrow(1, v0, cols).copy_(logits.narrow(0, 0, rows));
    }
  }
  return combined;
}

at::Tensor combined_sample_from_hidden_cpu(const at::Tensor& adapter_hidden, const at::Tensor& base_hidden,
                                           const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                                           const at::Tensor& uniforms, const at::Tensor& temperature,
                                           const at::Tensor& top_k, const at::Tensor& top_p, const at::Tensor& min_p,
                                           double alpha_tilde, double alpha_0, int64_t tile_vocab, bool two_stream) {
  // Sampling has no derivative: inputs that require grad (a model's lm_head.weight outside
  // no_grad) must not reach the out= matmuls below with autograd on.
  const at::NoGradGuard no_grad;
  check_hidden_and_head(adapter_hidden, base_hidden, weight, bias);
  TORCH_CHECK_VALUE(tile_vocab > 0, "tile_vocab must be positive, got ", tile_vocab);
  const int64_t rows = adapter_hidden.size(0), vocab = weight.size(0);
  const SamplingArgs args = check_sampling_args(rows, "adapter_hidden", uniforms, temperature, top_k, top_p, min_p);
  at::Tensor combined =
      combined_rows_from_hidden(adapter_hidden, base_hidden, weight, bias, alpha_tilde, alpha_0, tile_vocab, two_stream);
  at::Tensor tokens = at::empty({rows}, combined.options().dtype(at::kLong));
  int64_t* out = tokens.mutable_data_ptr<int64_t>();
  float* y = combined.mutable_data_ptr<float>();
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    static thread_local RowScratch scratch;
    for (int64_t r = begin; r < end; ++r) {
      float* row = y + r * vocab;
      out[r] = sample_row(row, vocab, block_maxima(row, vocab, scratch.block_max), args.row(r), scratch);
    }
  });
  return tokens;
}

}  // namespace

TORCH_LIBRARY_IMPL(qadapter, CPU, m) {
  m.impl("combined_logits", &combined_logits_cpu);
  m.impl("combined_sample", &combined_sample_cpu);
  m.impl("combined_sample_from_hidden", &combined_sample_from_hidden_cpu);
}

}  // namespace qadapter
