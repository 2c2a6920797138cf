// CPU kernels of qadapter::combined_logits, combined_sample and combined_sample_from_hidden.
//
// Sampling never sorts the vocabulary. Per row, in thread-local scratch that stays in cache:
// y = (Q + alpha_0 * L) / alpha_tilde (log_softmax(L) only shifts a row by a constant, which no
// filter and no draw can see), w = exp((y - max) / temperature), then top-k and top-p
// thresholds by weighted quickselect (expected O(V)), min-p as w >= min_p, and one
// inverse-CDF walk in vocabulary order with the row's uniform draw.
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
};

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

using Vec = Vectorized<float>;
constexpr int64_t kVec = Vec::size();

// The entries of w kept by a threshold (w >= threshold and w > 0) as a vector mask's weights.
inline Vec kept_weights(const Vec& w, const Vec& threshold) {
  return Vec::blendv(Vec(0.f), w, (w >= threshold) & (w > Vec(0.f)));
}

// (mass, count) of the kept entries of w[0, n).
std::pair<double, int64_t> kept_mass(const float* w, int64_t n, float threshold) {
  const int64_t n_vec = n - n % kVec;
  const Vec v_thr(threshold), one(1.f), zero(0.f);
  Vec mass(0.f), count(0.f);
  for (int64_t i = 0; i < n_vec; i += kVec) {
    const Vec wv = Vec::loadu(w + i), kept = kept_weights(wv, v_thr);
    mass += kept;
    count += Vec::blendv(zero, one, kept > zero);
  }
  const auto vsum = [](Vec& a, Vec& b) { return a + b; };
  double total = at::vec::vec_reduce_all<float>(vsum, mass);
  int64_t kept = int64_t(at::vec::vec_reduce_all<float>(vsum, count));
  for (int64_t i = n_vec; i < n; ++i) {
    if (w[i] >= threshold && w[i] > 0.f) {
      total += w[i];
      ++kept;
    }
  }
  return {total, kept};
}

// The first index where the running kept mass exceeds target: sums a vector at a time and
// scans inside the vector that crosses it.
int64_t inverse_cdf(const float* w, int64_t n, float threshold, double target) {
  const int64_t n_vec = n - n % kVec;
  const Vec v_thr(threshold);
  const auto vsum = [](Vec& a, Vec& b) { return a + b; };
  double cumulative = 0;
  int64_t start = 0;
  for (; start < n_vec; start += kVec) {
    const double block = at::vec::vec_reduce_all<float>(vsum, kept_weights(Vec::loadu(w + start), v_thr));
    if (cumulative + block > target) break;
    cumulative += block;
  }
  for (int64_t v = start; v < n; ++v) {
    if (w[v] >= threshold && w[v] > 0.f) {
      cumulative += w[v];
      if (cumulative > target) return v;
    }
  }
  for (int64_t v = n - 1; v >= 0; --v) {  // rounding ran past the end: the last kept entry
    if (w[v] >= threshold && w[v] > 0.f) return v;
  }
  return -1;
}

// Draws one token from the filtered softmax of `y` (a combined row, before temperature).
// Overwrites y with the unnormalised weights; returns -1 when the row has no finite maximum.
int64_t sample_row(float* y, int64_t vocab, const RowParams& p, std::vector<float>& work) {
  const int64_t n_vec = vocab - vocab % kVec;
  Vec vmax(-std::numeric_limits<float>::infinity());
  for (int64_t v = 0; v < n_vec; v += kVec) vmax = at::vec::maximum(vmax, Vec::loadu(y + v));  // NaN propagates
  float max_y = at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return at::vec::maximum(a, b); }, vmax);
  for (int64_t v = n_vec; v < vocab; ++v) max_y = max_nan(max_y, y[v]);
  if (!std::isfinite(max_y)) return -1;  // NaN, +inf, or nothing finite
  if (p.temperature == 0.f) return std::find(y, y + vocab, max_y) - y;  // ties: the lowest index

  const Vec v_max(max_y), v_inv_t(1.f / p.temperature);
  for (int64_t v = 0; v < n_vec; v += kVec) vexp<float>((Vec::loadu(y + v) - v_max) * v_inv_t).store(y + v);
  for (int64_t v = n_vec; v < vocab; ++v) y[v] = std::exp((y[v] - max_y) / p.temperature);

  float threshold = p.min_p;  // w_max = 1, so min-p keeps w >= min_p * w_max
  float top_k_threshold = 0.f;
  if (p.top_k > 0 && p.top_k < vocab) {
    work.assign(y, y + vocab);
    top_k_threshold = select_threshold<true>(work.data(), vocab, double(p.top_k));
    threshold = std::max(threshold, top_k_threshold);
  }
  if (p.top_p < 1.f) {
    // top-p renormalises over what top-k kept. Entries below (1 - top_p) * mass / count are
    // dropped by top-p whatever the rest looks like (together they weigh less than 1 - top_p
    // and lie below everything else), so only the others are candidates.
    const auto [mass, count] = kept_mass(y, vocab, top_k_threshold);
    const float floor = std::max(top_k_threshold, float((1.0 - p.top_p) * mass / double(std::max<int64_t>(count, 1))));
    work.clear();
    for (int64_t v = 0; v < vocab; ++v) {
      if (y[v] >= floor) work.push_back(y[v]);
    }
    if (!work.empty()) {
      threshold = std::max(threshold, select_threshold<false>(work.data(), int64_t(work.size()), p.top_p * mass));
    }
  }
  const double total = kept_mass(y, vocab, threshold).first;
  return inverse_cdf(y, vocab, threshold, double(p.uniform) * total);
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

// Writes y = (Q + alpha_0 * L) / alpha_tilde of one row into out (fp32); with kLseL, returns
// LSE(L) from the same sweep (else 0).
template <typename scalar_t, bool kLseL>
float combine_row(const scalar_t* q, const scalar_t* l, int64_t vocab, const Combine<float>& combine, float* out) {
  constexpr int64_t kTile = 1024;
  float q_buf[kTile], l_buf[kTile];
  using Vec = Vectorized<float>;
  OnlineLse<float> lse_y, lse_l;
  for (int64_t start = 0; start < vocab; start += kTile) {
    const int64_t n = std::min(kTile, vocab - start), n_vec = n - n % Vec::size();
    const float* qt = tile_as_acc<scalar_t, float>(q + start, n, q_buf);
    const float* lt = tile_as_acc<scalar_t, float>(l + start, n, l_buf);
    if constexpr (kLseL) fold_tile<float>(qt, lt, n, combine, lse_y, lse_l);
    for (int64_t i = 0; i < n_vec; i += Vec::size()) combine(Vec::loadu(qt + i), Vec::loadu(lt + i)).store(out + start + i);
    for (int64_t i = n_vec; i < n; ++i) out[start + i] = combine(qt[i], lt[i]);
  }
  return kLseL ? lse_l.value() : 0.f;
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
        const float lse_l = combine_row<scalar_t, true>(q_data + r * vocab, l_data + r * vocab, vocab, combine, row);
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
      std::vector<float> y(vocab), work;
      work.reserve(vocab);
      for (int64_t r = begin; r < end; ++r) {
        combine_row<scalar_t, false>(q_data + r * vocab, l_data + r * vocab, vocab, combine, y.data());
        out[r] = sample_row(y.data(), vocab, args.row(r), work);
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
  // Each tile is computed as W_tile x hidden^T ([cols, rows]), not hidden x W_tile^T: MKL's path
  // for few rows times a transposed row-major matrix is far slower (SmolLM2's head at B = 1,
  // 2 threads: 14.7 ms against 2.4 ms; still 1.3x at 2B = 128).
  at::Tensor hidden;
  std::optional<at::Tensor> tile_bias = bias;
  if (two_stream) {
    hidden = at::cat({adapter_hidden.to(at::kFloat), base_hidden.to(at::kFloat)});
  } else {
    auto [combined_hidden, combined_bias] =
        combine_hidden(adapter_hidden, base_hidden, bias, alpha_tilde, alpha_0, at::kFloat);
    hidden = product_columns(combined_hidden);
    tile_bias = combined_bias;
  }
  at::Tensor combined = at::empty({rows, vocab}, hidden.options());
  at::Tensor tile = at::empty({std::min(tile_vocab, vocab), hidden.size(0)}, hidden.options());
  const float inv_at = float(1.0 / alpha_tilde), scale = float(alpha_0 / alpha_tilde);
  for (int64_t v0 = 0; v0 < vocab; v0 += tile_vocab) {
    const int64_t cols = std::min(tile_vocab, vocab - v0);
    at::Tensor tile_t = tile.narrow(0, 0, cols);
    at::mm_out(tile_t, weight.narrow(0, v0, cols).to(at::kFloat), hidden.t());
    if (tile_bias) tile_t.add_(tile_bias->narrow(0, v0, cols).to(at::kFloat).unsqueeze(1));
    const at::Tensor logits = tile_t.t();  // two_stream: adapter rows, then base rows
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
    std::vector<float> work;
    work.reserve(vocab);
    for (int64_t r = begin; r < end; ++r) out[r] = sample_row(y + r * vocab, vocab, args.row(r), work);
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
