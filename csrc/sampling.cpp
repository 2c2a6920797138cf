// CPU kernels of qadapter::combined_logits, combined_sample and combined_sample_from_hidden.
//
// Sampling never sorts the vocabulary and never stores a row. Per row, one pass over the inputs
// forms y = (Q + alpha_0 * L) / alpha_tilde block by block (log_softmax(L) only shifts a row by a
// constant, which no filter and no draw can see) and keeps, per block of kBlock entries, the maximum
// of y, its vector lanes' maxima and, when the draw needs the row's mass, the block's mass relative
// to its own maximum. With w = exp((y - max) / temperature), the block maxima as weights bound the
// top-k and top-p thresholds from below, so only the blocks that can hold a kept token are formed
// again, into a candidate list; the exact thresholds come from weighted quickselect over the
// candidates, min-p is w >= min_p, and the draw is one inverse-CDF walk over the candidates in
// vocabulary order with the row's uniform draw (without a filter: over the blocks' masses, then
// inside the one block the draw falls in).
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <functional>
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
// again; with a nucleus of tens of tokens that is tens of blocks of the vocabulary. When the block
// maxima cannot reach the bound (a nucleus larger than, or crowded into, the blocks), the maxima of
// finer sets can: each vector lane's over every kLaneSpan entries of a block (kLaneSpan / lanes
// entries each), kept from the same pass. A block of 256 entries costs the pass one horizontal
// reduction; a lane maximum costs none.
constexpr int64_t kBlock = 256;
constexpr int64_t kLaneSpan = 64;
constexpr int64_t kLanesPerBlock = kBlock / kLaneSpan * kVec;

// Per-thread scratch of sample_row, reused from row to row.
struct RowScratch {
  std::vector<float> block_max;     // per block: max of y (NaN propagates)
  std::vector<float> lane_max;      // per block, span and vector lane: max of y over the lane's entries
  std::vector<float> block_sum;     // per block: sum of exp((y - block max) / T), when the mass is needed
  std::vector<float> block_weight;  // per block: its maximum as a weight, exp((block max - row max) / T)
  std::vector<float> lane_weight;   // the lanes' maxima as weights (only when the blocks' cannot bound)
  std::vector<float> values;        // candidates' weights (vocabulary order), then permuted by selection
  std::vector<int64_t> indices;     // candidates' vocabulary indices
  std::vector<float> work;
};

inline float reduce_max(const Vec& v) {
  return at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return at::vec::maximum(a, b); }, v);
}

inline float reduce_sum(const Vec& v) {
  return at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return a + b; }, v);
}

// y = combine(q, l) over n entries of fp32 tiles into out: vectors, then the scalar tail (every pass
// that forms y goes through here, so an entry is rounded the same way in each).
inline void combine_tile(const float* q, const float* l, int64_t n, const Combine<float>& combine, float* out) {
  const int64_t n_vec = n - n % kVec;
  for (int64_t i = 0; i < n_vec; i += kVec) combine(Vec::loadu(q + i), Vec::loadu(l + i)).store(out + i);
  for (int64_t i = n_vec; i < n; ++i) out[i] = combine(q[i], l[i]);
}

// Where a row's y comes from, a block of n <= kBlock entries at a time (block() returns them).
// Every pass forms an entry the same way (the same lane of the same block), so y, and the weight a
// pass computes from it, is bitwise the same in each.
template <typename scalar_t>
struct CombinedRow {  // y formed from the two logits rows
  const scalar_t* q;
  const scalar_t* l;
  const Combine<float>& combine;

  const float* block(int64_t begin, int64_t n, float* buffer) const {
    float q_buf[kBlock], l_buf[kBlock];
    const float* qt = tile_as_acc<scalar_t, float>(q + begin, n, q_buf);
    combine_tile(qt, tile_as_acc<scalar_t, float>(l + begin, n, l_buf), n, combine, buffer);
    return buffer;
  }
};

struct StoredRow {  // y already written (from the LM head's product)
  const float* y;

  const float* block(int64_t begin, int64_t, float*) const { return y + begin; }
};

inline int64_t block_count(int64_t vocab) { return (vocab + kBlock - 1) / kBlock; }
inline int64_t block_size(int64_t b, int64_t vocab) { return std::min(kBlock, vocab - b * kBlock); }

// w[i] = exp((y[i] - max_y) / temperature) for i in [0, n): vectors, then the scalar tail.
inline void weigh_range(const float* y, float* w, int64_t n, float max_y, float temperature) {
  const Vec v_max(max_y), v_inv_t(1.f / temperature);
  const int64_t n_vec = n - n % kVec;
  for (int64_t i = 0; i < n_vec; i += kVec) vexp<float>((Vec::loadu(y + i) - v_max) * v_inv_t).store(w + i);
  for (int64_t i = n_vec; i < n; ++i) w[i] = std::exp((y[i] - max_y) / temperature);
}

// The one pass over a row: each block's maximum of y and its lanes' maxima and, with `mass`, each
// block's sum of exp((y - block max) / T) (0 for a block without a finite maximum). Returns the row's
// maximum (NaN propagates).
template <typename Row>
float scan_row(const Row& row, int64_t vocab, float temperature, bool mass, RowScratch& s) {
  const int64_t blocks = block_count(vocab);
  s.block_max.resize(blocks);
  s.lane_max.resize(blocks * kLanesPerBlock);
  s.block_sum.resize(mass ? blocks : 0);
  const Vec v_inv_t(1.f / temperature), v_low(-std::numeric_limits<float>::infinity());
  float buffer[kBlock];
  float row_max = -std::numeric_limits<float>::infinity();
  for (int64_t b = 0; b < blocks; ++b) {
    const int64_t n = block_size(b, vocab), n_vec = n - n % kVec;
    const float* y = row.block(b * kBlock, n, buffer);
    float* lanes = s.lane_max.data() + b * kLanesPerBlock;
    Vec v_max = v_low;
    for (int64_t span = 0; span < kBlock; span += kLaneSpan) {  // spans past n_vec keep -inf lanes
      Vec v_span = v_low;
      for (int64_t i = span; i < std::min(span + kLaneSpan, n_vec); i += kVec) {
        v_span = at::vec::maximum(v_span, Vec::loadu(y + i));
      }
      v_span.store(lanes + span / kLaneSpan * kVec);
      v_max = at::vec::maximum(v_max, v_span);
    }
    float m = reduce_max(v_max);
    for (int64_t i = n_vec; i < n; ++i) {  // the block's tail joins the first lane's entries
      m = max_nan(m, y[i]);
      lanes[0] = max_nan(lanes[0], y[i]);
    }
    s.block_max[b] = m;
    row_max = max_nan(row_max, m);
    if (!mass) continue;
    float sum = 0.f;
    if (std::isfinite(m)) {
      const Vec v_m(m);
      Vec acc(0.f);
      for (int64_t i = 0; i < n_vec; i += kVec) acc += vexp<float>((Vec::loadu(y + i) - v_m) * v_inv_t);
      sum = reduce_sum(acc);
      for (int64_t i = n_vec; i < n; ++i) sum += std::exp((y[i] - m) / temperature);
    }
    s.block_sum[b] = sum;
  }
  return row_max;
}

// The blocks' maxima as weights into s.block_weight; returns the row's mass (with scan_row's `mass`).
double weigh_blocks(float max_y, float temperature, bool mass, RowScratch& s) {
  const int64_t blocks = int64_t(s.block_max.size());
  s.block_weight.resize(blocks);
  weigh_range(s.block_max.data(), s.block_weight.data(), blocks, max_y, temperature);
  double total = 0;
  for (int64_t b = 0; mass && b < blocks; ++b) total += double(s.block_sum[b]) * double(s.block_weight[b]);
  return total;
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

// A lower bound of the weight of every entry the filters may keep: top-k's or top-p's (over the
// whole row, mass total) from the block maxima, else from the lane maxima, else 0; min-p alone: its
// own threshold. Lowered by 1e-5 relative: the maxima's weights come from other lanes of the vector
// exp (or its scalar tail) than their entries' and may differ from them by a few ulp, and an extra
// candidate below a threshold changes no selection.
float threshold_bound(const RowParams& p, int64_t vocab, float max_y, double total, RowScratch& s) {
  float bound = p.min_p;  // min-p alone: its threshold, exactly (the largest weight is 1)
  if (p.by_k(vocab) || p.by_p()) {
    bound = bound_from_maxima(s.block_weight, p, vocab, total, s.work);
    if (bound < 0.f) {
      s.lane_weight.resize(s.lane_max.size());
      weigh_range(s.lane_max.data(), s.lane_weight.data(), int64_t(s.lane_max.size()), max_y, p.temperature);
      bound = std::max(0.f, bound_from_maxima(s.lane_weight, p, vocab, total, s.work));
    }
  }
  return bound * (1.f - 1e-5f);
}

// Entries of y below this weigh less than `bound` whatever the last few ulp of the exp and of its
// argument: w = exp((y - max) / T) >= bound needs y >= max + T ln(bound), and the margin is far wider
// than those roundings (an entry it lets through is weighed and compared exactly). -inf (every entry is
// weighed) for a bound of 0 or one where exp's argument is clamped.
inline float weighing_floor(float max_y, float temperature, float bound) {
  const double log_bound = bound > 0.f ? std::log(double(bound)) : -1e300;
  if (log_bound < -100.0) return -std::numeric_limits<float>::infinity();
  const double shift = double(temperature) * log_bound;
  const double margin = 1e-4 * (1.0 + std::fabs(double(max_y)) - shift + double(temperature));
  return float(double(max_y) + shift - margin);
}

// The entries with w >= bound and w > 0 of the blocks whose maximum reaches block_floor, in vocabulary
// order, into s.indices / s.values (weights). Only vectors of entries that reach weighing_floor are
// weighed (each entry by the same lane of the same exp as in every other pass).
template <typename Row>
void gather_candidates(const Row& row, int64_t vocab, float max_y, float temperature, float bound, float block_floor,
                       RowScratch& s) {
  s.indices.clear();
  s.values.clear();
  const Vec v_floor(weighing_floor(max_y, temperature, bound));
  constexpr int kNoneReach = (1 << kVec) - 1;  // zero_mask of a compare that fails in every lane
  float buffer[kBlock], w[kVec];
  for (int64_t b = 0; b < int64_t(s.block_weight.size()); ++b) {
    if (!(s.block_weight[b] >= block_floor && s.block_weight[b] > 0.f)) continue;
    const int64_t n = block_size(b, vocab);
    const float* y = row.block(b * kBlock, n, buffer);
    for (int64_t i = 0; i < n; i += kVec) {
      const int64_t m = std::min(kVec, n - i);
      if (m == kVec && (Vec::loadu(y + i) >= v_floor).zero_mask() == kNoneReach) continue;
      weigh_range(y + i, w, m, max_y, temperature);
      for (int64_t j = 0; j < m; ++j) {
        if (w[j] >= bound && w[j] > 0.f) {
          s.indices.push_back(b * kBlock + i + j);
          s.values.push_back(w[j]);
        }
      }
    }
  }
}

constexpr int64_t kGatherAgain = -2;

// The thresholds (quickselect over the candidates in s.values / s.indices: every entry the filters may
// keep) and the draw. total: the row's mass, read by top-p without top-k only (scan_row's `mass`).
// Returns kGatherAgain when candidates gathered down to a bound > 0 are too few for top-k, or fall
// short of the top-p mass by rounding.
int64_t draw_from_candidates(const RowParams& p, int64_t vocab, double total, float bound, RowScratch& s) {
  const int64_t n = int64_t(s.values.size());
  if (p.by_k(vocab) && n < p.top_k && bound > 0.f) return kGatherAgain;
  if (n == 0) return -1;
  float top_k_threshold = 0.f;
  double kept_by_k = total;
  if (p.by_k(vocab)) {  // fewer candidates than k (entries of weight 0 are none): top-k keeps them all
    if (n >= p.top_k) {
      s.work.assign(s.values.begin(), s.values.end());
      top_k_threshold = select_threshold<true>(s.work.data(), n, double(p.top_k));
    }
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

// The first entry holding the row's maximum: the first block holding it, then inside it.
template <typename Row>
int64_t first_maximum(const Row& row, int64_t vocab, float max_y, const RowScratch& s) {
  const int64_t b = std::find(s.block_max.begin(), s.block_max.end(), max_y) - s.block_max.begin();
  const int64_t n = block_size(b, vocab);
  float buffer[kBlock];
  const float* y = row.block(b * kBlock, n, buffer);
  return b * kBlock + (std::find(y, y + n, max_y) - y);
}

// No filter: the inverse-CDF walk over the blocks' masses, then inside the block the draw falls in.
template <typename Row>
int64_t walk_row(const Row& row, int64_t vocab, float max_y, const RowParams& p, double total, const RowScratch& s) {
  const double target = double(p.uniform) * total;
  double cumulative = 0;
  float buffer[kBlock], w[kBlock];
  for (int64_t b = 0; b < int64_t(s.block_sum.size()); ++b) {
    const double mass = double(s.block_sum[b]) * double(s.block_weight[b]);
    if (!(cumulative + mass > target)) {
      cumulative += mass;
      continue;
    }
    const int64_t n = block_size(b, vocab);
    weigh_range(row.block(b * kBlock, n, buffer), w, n, max_y, p.temperature);
    int64_t weighted = -1;
    double inside = cumulative;
    for (int64_t i = 0; i < n; ++i) {
      if (!(w[i] > 0.f)) continue;
      weighted = i;
      inside += w[i];
      if (inside > target) return b * kBlock + i;
    }
    // The block's entries summed to a little less than its mass (rounding): its last entry with weight.
    if (weighted >= 0) return b * kBlock + weighted;
    cumulative += mass;
  }
  return first_maximum(row, vocab, max_y, s);  // rounding ran past the end
}

// When the maxima bound no threshold, or the bound proved too high (rounding): the blocks in decreasing
// order of their maximum, 1, 2, 4, ... at a time, up to an eighth of them. For top-p without top-k the
// gathered entries suffice once those above the largest maximum left out weigh p of the row (every entry
// the nucleus keeps is then among them: a nucleus crowded into a few blocks or lanes); otherwise, and
// at the end, every block is gathered.
template <typename Row>
int64_t draw_from_growing_blocks(const Row& row, int64_t vocab, float max_y, const RowParams& p, double total,
                                 RowScratch& s) {
  const int64_t blocks = int64_t(s.block_weight.size());
  // Past an eighth of the blocks the nucleus is spread wide: gathering every block then wastes least.
  for (int64_t m = 1; p.by_p() && !p.by_k(vocab) && m <= blocks / 8; m *= 2) {
    s.work.assign(s.block_weight.begin(), s.block_weight.end());
    std::nth_element(s.work.begin(), s.work.begin() + (m - 1), s.work.end(), std::greater<float>());
    const float floor = s.work[m - 1];
    if (!(floor > 0.f)) break;
    float left_out = 0.f;  // the largest block maximum below the floor
    for (const float w : s.block_weight) left_out = w < floor ? std::max(left_out, w) : left_out;
    gather_candidates(row, vocab, max_y, p.temperature, 0.f, floor, s);
    double above = 0;
    for (const float w : s.values) above += w > left_out ? double(w) : 0.0;
    if (above >= double(p.top_p) * total) return draw_from_candidates(p, vocab, total, 0.f, s);
  }
  gather_candidates(row, vocab, max_y, p.temperature, 0.f, 0.f, s);
  return draw_from_candidates(p, vocab, total, 0.f, s);
}

// Draws one token from the filtered softmax of a row's y (before temperature); -1 when the row has
// no finite maximum.
template <typename Row>
int64_t sample_row(const Row& row, int64_t vocab, const RowParams& p, RowScratch& s) {
  const bool greedy = p.temperature == 0.f, by_k = p.by_k(vocab), by_p = p.by_p();
  const bool filtered = by_k || by_p || p.min_p > 0.f;
  // The row's mass: for the walk without a filter, and for top-p without top-k (top-p after top-k
  // renormalises over what top-k kept; top-k and min-p need none).
  const bool mass = !greedy && (!filtered || (by_p && !by_k));
  const float max_y = scan_row(row, vocab, p.temperature, mass, s);
  if (!std::isfinite(max_y)) return -1;  // NaN, +inf, or nothing finite
  if (greedy) return first_maximum(row, vocab, max_y, s);
  const double total = weigh_blocks(max_y, p.temperature, mass, s);
  if (!filtered) return walk_row(row, vocab, max_y, p, total, s);
  const float bound = threshold_bound(p, vocab, max_y, total, s);
  if (bound > 0.f) {
    gather_candidates(row, vocab, max_y, p.temperature, bound, bound, s);
    const int64_t token = draw_from_candidates(p, vocab, total, bound, s);
    if (token != kGatherAgain) return token;
  }
  return draw_from_growing_blocks(row, vocab, max_y, p, total, s);
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
    const int64_t n = std::min(kTile, vocab - start);
    const float* qt = tile_as_acc<scalar_t, float>(q + start, n, q_buf);
    const float* lt = tile_as_acc<scalar_t, float>(l + start, n, l_buf);
    fold_tile<float>(qt, lt, n, combine, lse_y, lse_l);
    combine_tile(qt, lt, n, combine, out + start);
  }
  return lse_l.value();
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
      static thread_local RowScratch scratch;  // kept from call to call: fresh buffers fault pages in
      for (int64_t r = begin; r < end; ++r) {
        const CombinedRow<scalar_t> row{q_data + r * vocab, l_data + r * vocab, combine};
        out[r] = sample_row(row, vocab, args.row(r), scratch);
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
  const float* y = combined.const_data_ptr<float>();
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    static thread_local RowScratch scratch;
    for (int64_t r = begin; r < end; ++r) {
      out[r] = sample_row(StoredRow{y + r * vocab}, vocab, args.row(r), scratch);
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
