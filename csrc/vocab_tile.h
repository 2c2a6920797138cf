// Building blocks shared by the CPU vocabulary passes: one tile of a logits row at a time,
// vectorised with at::vec, with the online logsumexp state of both streams
// (y = (Q + alpha_0 * L) / alpha_tilde and L).
#pragma once

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include "fast_exp.h"

#include <cmath>
#include <limits>
#include <type_traits>

namespace qadapter {

using at::vec::Vectorized;

// A tile of a row as acc_t: the row itself when no conversion is needed, else a converted copy.
template <typename scalar_t, typename acc_t>
const acc_t* tile_as_acc(const scalar_t* src, int64_t n, acc_t* buffer) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    return src;
  } else {
    at::vec::convert(src, buffer, n);
    return buffer;
  }
}

// NaN-propagating max: std::max would silently drop a NaN.
template <typename acc_t>
acc_t max_nan(acc_t a, acc_t b) {
  return (std::isnan(a) || a > b) ? a : b;
}

// y = Q / alpha_tilde + (alpha_0 / alpha_tilde) * L.
template <typename acc_t>
struct Combine {
  acc_t inv_at, scale;
  Combine(double alpha_tilde, double alpha_0)
      : inv_at(acc_t(1) / acc_t(alpha_tilde)), scale(acc_t(alpha_0) / acc_t(alpha_tilde)) {}
  acc_t operator()(acc_t q, acc_t l) const { return q * inv_at + l * scale; }
  Vectorized<acc_t> operator()(const Vectorized<acc_t>& q, const Vectorized<acc_t>& l) const {
    return at::vec::fmadd(q, Vectorized<acc_t>(inv_at), l * Vectorized<acc_t>(scale));
  }
  // y at entry i of a tile, rounded the same way by every pass (the softmax must stay consistent
  // with its normaliser at |y| ~ 1e4, where an ulp is 1e-3); l == nullptr: the tile q is y itself.
  acc_t y_at(const acc_t* q, const acc_t* l, int64_t i) const { return l ? (*this)(q[i], l[i]) : q[i]; }
  Vectorized<acc_t> y_vec(const acc_t* q, const acc_t* l, int64_t i) const {
    using Vec = Vectorized<acc_t>;
    return l ? (*this)(Vec::loadu(q + i), Vec::loadu(l + i)) : Vec::loadu(q + i);
  }
};

// Running logsumexp of one stream: `sum` of exp(x - max) over what has been folded in. `max` is
// the running maximum, or, after a single-pass fold (fold_tile), a reference point at most
// log(count) above it; value() is the logsumexp either way.
template <typename acc_t>
struct OnlineLse {
  acc_t max = -std::numeric_limits<acc_t>::infinity();
  acc_t sum = 0;

  // Moves the running max to cover tile_max; returns exp(old_max - new_max), the factor that
  // anything accumulated relative to the old max must be multiplied by.
  acc_t rescale_to(acc_t tile_max) {
    const acc_t new_max = max_nan(max, tile_max);
    if (new_max == -std::numeric_limits<acc_t>::infinity()) return acc_t(1);  // nothing finite yet
    const acc_t factor = std::exp(max - new_max);
    sum *= factor;
    max = new_max;
    return factor;
  }
  // Subtracted before exp; 0 while everything is -inf, so exp(-inf - shift) = 0, not NaN.
  acc_t shift() const { return max == -std::numeric_limits<acc_t>::infinity() ? acc_t(0) : max; }
  acc_t value() const { return max + std::log(sum); }
};

namespace detail {

// The tile's max first, then exps against the new running max: always safe, two passes.
template <typename acc_t>
acc_t fold_tile_two_pass(const acc_t* q, const acc_t* l, int64_t n, const Combine<acc_t>& combine,
                         OnlineLse<acc_t>& lse_y, OnlineLse<acc_t>& lse_l, acc_t* probs) {
  using Vec = Vectorized<acc_t>;
  constexpr int64_t kVec = Vec::size();
  const int64_t n_vec = n - n % kVec;
  const bool two = l != nullptr;
  const auto vmax = [](Vec& a, Vec& b) { return at::vec::maximum(a, b); };
  const auto vsum = [](Vec& a, Vec& b) { return a + b; };
  Vec max_y(-std::numeric_limits<acc_t>::infinity()), max_l = max_y;
  for (int64_t i = 0; i < n_vec; i += kVec) {
    max_y = at::vec::maximum(max_y, combine.y_vec(q, l, i));
    if (two) max_l = at::vec::maximum(max_l, Vec::loadu(l + i));
  }
  acc_t tile_max_y = at::vec::vec_reduce_all<acc_t>(vmax, max_y);
  acc_t tile_max_l = at::vec::vec_reduce_all<acc_t>(vmax, max_l);
  for (int64_t i = n_vec; i < n; ++i) {
    tile_max_y = max_nan(tile_max_y, combine.y_at(q, l, i));
    if (two) tile_max_l = max_nan(tile_max_l, l[i]);
  }
  const acc_t factor = lse_y.rescale_to(tile_max_y);
  if (two) lse_l.rescale_to(tile_max_l);
  const acc_t shift_y = lse_y.shift(), shift_l = lse_l.shift();
  const Vec v_shift_y(shift_y), v_shift_l(shift_l);
  Vec sum_y(0), sum_l(0);
  for (int64_t i = 0; i < n_vec; i += kVec) {
    const Vec p = vexp<acc_t>(combine.y_vec(q, l, i) - v_shift_y);
    if (probs) p.store(probs + i);
    sum_y += p;
    if (two) sum_l += vexp<acc_t>(Vec::loadu(l + i) - v_shift_l);
  }
  acc_t tile_sum_y = at::vec::vec_reduce_all<acc_t>(vsum, sum_y);
  acc_t tile_sum_l = at::vec::vec_reduce_all<acc_t>(vsum, sum_l);
  for (int64_t i = n_vec; i < n; ++i) {
    const acc_t p = std::exp(combine.y_at(q, l, i) - shift_y);
    if (probs) probs[i] = p;
    tile_sum_y += p;
    if (two) tile_sum_l += std::exp(l[i] - shift_l);
  }
  lse_y.sum += tile_sum_y;
  if (two) lse_l.sum += tile_sum_l;
  return factor;
}

}  // namespace detail

// The single-pass fold below takes a tile's exps against the running reference point without
// looking for the tile's max. A tile sum above e^64 (some entry far above the reference) sends the
// tile to the two-pass fold; a running sum above e^32 moves the reference up to the current
// logsumexp. Sums then stay below e^32 + e^64, far from fp32 overflow, and the reference never
// sits more than log(V) above the true max, so nothing that matters underflows.
template <typename acc_t>
constexpr acc_t kMaxTileSum = acc_t(6.235149080811617e27);  // e^64
template <typename acc_t>
constexpr acc_t kRecentreAbove = acc_t(7.896296018268069e13);  // e^32

// Folds one tile of both streams into their running logsumexps. Returns the factor by which
// quantities accumulated against the old reference point of y must be rescaled; when `probs` is
// given, writes exp(y - new reference) there (softmax numerators, for an expectation accumulated
// alongside; OnlineLse::sum is their normaliser). With l == nullptr the tile is y itself (one
// stream: the base model's LSE came from a cached pass, DESIGN.md §1) and lse_l is left alone;
// pass Combine(1, 0) then.
//
// Without `probs`, once both reference points are finite, one pass over the tile does it: an exp
// and an add per entry and stream, with no separate max pass and no vector max (the loss forward
// is bound by exp throughput on CPU). A NaN reaches the sum, hence the row's LSE. Tiles before a
// finite reference exists, and tiles whose sum exceeds the bound above, take the two-pass fold.
// With `probs` (which callers may point at q itself, so an overwritten tile could not be folded
// again) the fold is always two-pass: there the head product, not the exp, bounds the time.
template <typename acc_t>
acc_t fold_tile(const acc_t* q, const acc_t* l, int64_t n, const Combine<acc_t>& combine,
                OnlineLse<acc_t>& lse_y, OnlineLse<acc_t>& lse_l, acc_t* probs = nullptr) {
  using Vec = Vectorized<acc_t>;
  constexpr int64_t kVec = Vec::size();
  const bool two = l != nullptr;
  if (probs || !std::isfinite(lse_y.max) || (two && !std::isfinite(lse_l.max))) {
    return detail::fold_tile_two_pass(q, l, n, combine, lse_y, lse_l, probs);
  }
  const int64_t n_vec = n - n % kVec;
  const acc_t ref_y = lse_y.max, ref_l = lse_l.max;
  const Vec v_ref_y(ref_y), v_ref_l(ref_l);
  Vec sum_y(0), sum_l(0);
  for (int64_t i = 0; i < n_vec; i += kVec) {
    sum_y += vexp<acc_t>(combine.y_vec(q, l, i) - v_ref_y);
    if (two) sum_l += vexp<acc_t>(Vec::loadu(l + i) - v_ref_l);
  }
  const auto vsum = [](Vec& a, Vec& b) { return a + b; };
  acc_t tile_sum_y = at::vec::vec_reduce_all<acc_t>(vsum, sum_y), tile_sum_l = at::vec::vec_reduce_all<acc_t>(vsum, sum_l);
  for (int64_t i = n_vec; i < n; ++i) {
    tile_sum_y += std::exp(combine.y_at(q, l, i) - ref_y);
    if (two) tile_sum_l += std::exp(l[i] - ref_l);
  }
  // A NaN sum stays: it is what the two-pass fold would give, and it must reach the LSE.
  const auto overflows = [](acc_t sum) { return sum > kMaxTileSum<acc_t>; };
  if (overflows(tile_sum_y) || (two && overflows(tile_sum_l))) {
    return detail::fold_tile_two_pass(q, l, n, combine, lse_y, lse_l, probs);
  }
  lse_y.sum += tile_sum_y;
  if (two) lse_l.sum += tile_sum_l;
  const auto recentre = [](OnlineLse<acc_t>& lse) {
    return lse.sum > kRecentreAbove<acc_t> ? lse.rescale_to(lse.max + std::log(lse.sum)) : acc_t(1);
  };
  const acc_t factor = recentre(lse_y);
  if (two) recentre(lse_l);
  return factor;
}

// out = g_v * softmax(y) over one tile, given the row's final LSE(y); l == nullptr: q is y (one stream).
template <typename acc_t>
void softmax_grad_tile(const acc_t* q, const acc_t* l, int64_t n, const Combine<acc_t>& combine, acc_t lse_y,
                       acc_t g_v, acc_t* out) {
  using Vec = Vectorized<acc_t>;
  constexpr int64_t kVec = Vec::size();
  const int64_t n_vec = n - n % kVec;
  const Vec v_g(g_v), v_lse(lse_y);
  for (int64_t i = 0; i < n_vec; i += kVec) {
    (v_g * vexp<acc_t>(combine.y_vec(q, l, i) - v_lse)).store(out + i);
  }
  for (int64_t i = n_vec; i < n; ++i) out[i] = g_v * std::exp(combine.y_at(q, l, i) - lse_y);
}

}  // namespace qadapter
