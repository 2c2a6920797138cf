// CPU kernels of qadapter::pair_loss and its backward: the [2B, T] pass that turns per-position
// values and picked Q into rewards, sequence scores and the Bradley-Terry loss.
// Rows 0..B-1 are chosen responses, rows B..2B-1 the rejected ones (DESIGN.md §2).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "acc_type.h"
#include "checks.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <string_view>

namespace qadapter {
namespace {

enum class Variant { kBellman, kOfficial, kAdvantage };

Variant parse_variant(std::string_view variant) {
  if (variant == "bellman") return Variant::kBellman;
  if (variant == "official") return Variant::kOfficial;
  if (variant == "advantage") return Variant::kAdvantage;
  TORCH_CHECK_VALUE(false, "variant must be 'bellman', 'official' or 'advantage', got '", variant, "'");
}

// What a sequence's summed reward is divided by (params.LengthNorm): its own number of scored
// actions (at least 1), the padded width T - 1 (the authors' rule), or nothing.
enum class LengthNorm { kResponse, kPadded, kNone };

LengthNorm parse_length_norm(std::string_view length_norm) {
  if (length_norm == "response") return LengthNorm::kResponse;
  if (length_norm == "padded") return LengthNorm::kPadded;
  if (length_norm == "none") return LengthNorm::kNone;
  TORCH_CHECK_VALUE(false, "length_norm must be 'response', 'padded' or 'none', got '", length_norm, "'");
}

// 1 / the divisor of a sequence's score, given its number of scored actions.
double inverse_norm(LengthNorm rule, int64_t T, int64_t num_scored) {
  switch (rule) {
    case LengthNorm::kResponse: return 1.0 / double(std::max<int64_t>(num_scored, 1));
    case LengthNorm::kPadded: return 1.0 / double(T - 1);
    case LengthNorm::kNone: break;
  }
  return 1.0;
}

// Which action is scored and which value bootstraps its reward. The action at position t
// is x[t+1], so the last column never holds one.
struct RewardRule {
  Variant variant;
  const bool* mask;
  int64_t T;

  bool scored(int64_t row, int64_t t) const {
    if (t >= T - 1) return false;
    return mask[row * T + (variant == Variant::kOfficial ? t : t + 1)];
  }
  // Index of the value subtracted from Q[a_t] (times gamma), or -1 when it is 0 (terminal).
  int64_t bootstrap(int64_t row, int64_t t) const {
    if (variant != Variant::kBellman) return t;
    return (t + 2 < T && mask[row * T + t + 2]) ? t + 1 : -1;
  }
};

// Rows per task: a typical batch is a few microseconds of work, cheaper on one thread than
// waking the pool.
int64_t row_grain(int64_t T) { return std::max<int64_t>(1, at::internal::GRAIN_SIZE / T); }

// x as acc_t, out-of-range values as +-inf like acc_t arithmetic (a plain cast would be undefined).
template <typename acc_t>
acc_t saturate(double x) {
  constexpr double kMax = std::numeric_limits<acc_t>::max();
  if (x > kMax) return std::numeric_limits<acc_t>::infinity();
  if (x < -kMax) return -std::numeric_limits<acc_t>::infinity();
  return static_cast<acc_t>(x);
}

double softplus(double x) { return x > 0 ? x + std::log1p(std::exp(-x)) : std::log1p(std::exp(x)); }
double sigmoid(double x) { return 1.0 / (1.0 + std::exp(-x)); }

void check_loss_mask(const at::Tensor& loss_mask, at::IntArrayRef shape, const char* source) {
  check_dtype("loss_mask", loss_mask, at::kBool);
  check_shape("loss_mask", loss_mask, shape, source);
}

void check_pair_inputs(const at::Tensor& values, const at::Tensor& q_taken, const at::Tensor& loss_mask) {
  check_float("values", values);
  TORCH_CHECK_VALUE(values.dim() == 2, "values must be [2B, T], got ", values.sizes());
  TORCH_CHECK_VALUE(values.size(0) % 2 == 0 && values.size(0) > 0,
                    "values must hold 2B rows (chosen then rejected), got ", values.size(0));
  TORCH_CHECK_VALUE(values.size(1) >= 2, "values: sequences need T >= 2 tokens, got T = ", values.size(1));
  check_float_shape("q_taken", q_taken, values.sizes(), "values");
  check_loss_mask(loss_mask, values.sizes(), "values");
}

// The backward's saved tensors and incoming gradients, each against the [2B, T] of rewards.
void check_pair_backward_inputs(const at::Tensor& grad_loss, const at::Tensor& grad_pref_loss,
                                const at::Tensor& grad_reg_loss, const at::Tensor& grad_scores,
                                const at::Tensor& grad_rewards, const at::Tensor& scores, const at::Tensor& rewards,
                                const at::Tensor& num_scored, const at::Tensor& loss_mask) {
  check_float("rewards", rewards);
  TORCH_CHECK_TYPE(rewards.scalar_type() == at::kFloat || rewards.scalar_type() == at::kDouble,
                   "rewards must be float32 or float64 (the accumulation dtype), got ", rewards.scalar_type());
  TORCH_CHECK_VALUE(rewards.dim() == 2 && rewards.size(0) % 2 == 0 && rewards.size(0) > 0 && rewards.size(1) >= 2,
                    "rewards must be [2B, T] with B >= 1 and T >= 2, got ", rewards.sizes());
  const int64_t rows = rewards.size(0);
  check_float_scalar("grad_loss", grad_loss);
  check_float_scalar("grad_pref_loss", grad_pref_loss);
  check_float_scalar("grad_reg_loss", grad_reg_loss);
  check_float_shape("grad_scores", grad_scores, {rows}, "rewards");
  check_float_shape("grad_rewards", grad_rewards, rewards.sizes(), "rewards");
  check_float_shape("scores", scores, {rows}, "rewards");
  check_float_scalar("num_scored", num_scored);
  check_loss_mask(loss_mask, rewards.sizes(), "rewards");
}

template <typename acc_t>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> pair_loss_impl(
    const at::Tensor& values, const at::Tensor& q_taken, const at::Tensor& loss_mask, double gamma,
    double beta, Variant variant, LengthNorm length_norm) {
  const int64_t rows = values.size(0), T = values.size(1), B = rows / 2;
  const acc_t* v = values.const_data_ptr<acc_t>();
  const acc_t* q = q_taken.const_data_ptr<acc_t>();
  const RewardRule rule{variant, loss_mask.const_data_ptr<bool>(), T};
  auto opts = values.options();
  at::Tensor rewards = at::zeros({rows, T}, opts), scores = at::empty({rows}, opts);
  at::Tensor row_sq = at::empty({rows}, opts.dtype(at::kDouble)), row_count = at::empty({rows}, opts.dtype(at::kLong));
  acc_t* r = rewards.mutable_data_ptr<acc_t>();
  acc_t* s = scores.mutable_data_ptr<acc_t>();
  double* sq = row_sq.mutable_data_ptr<double>();
  int64_t* count = row_count.mutable_data_ptr<int64_t>();

  at::parallel_for(0, rows, row_grain(T), [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      double sum = 0, sum_sq = 0;
      int64_t n = 0;
      for (int64_t t = 0; t < T; ++t) {
        if (!rule.scored(row, t)) continue;
        const int64_t vi = rule.bootstrap(row, t);
        const double reward = double(q[row * T + t]) - (vi < 0 ? 0.0 : gamma * double(v[row * T + vi]));
        r[row * T + t] = acc_t(reward);
        sum += reward;
        sum_sq += reward * reward;
        ++n;
      }
      s[row] = acc_t(sum * inverse_norm(length_norm, T, n));
      sq[row] = sum_sq;
      count[row] = n;
    }
  });

  double total_sq = 0, pref = 0, correct = 0;
  int64_t total = 0;
  for (int64_t row = 0; row < rows; ++row) {
    total_sq += sq[row];
    total += count[row];
  }
  // No scored token: reg = 0 / 0 = NaN, as on every backend. The eager entry points raise
  // before this; with value checks off (compiled graphs) a kernel must not throw.
  for (int64_t i = 0; i < B; ++i) {
    const double chosen = s[i], rejected = s[i + B];
    pref += softplus(rejected - chosen);
    correct += chosen > rejected ? 1.0 : 0.0;
  }
  pref /= double(B);
  // The sums are double here but acc_t on the other backends: converted before they combine, a
  // sum of squares past acc_t's range is inf there too (so beta = 0 gives 0 * inf = NaN, and
  // at::scalar_tensor never sees a double it cannot convert).
  const acc_t reg = acc_t(beta) * saturate<acc_t>(total_sq) / acc_t(total);
  auto scalar = [&](double x) { return at::scalar_tensor(saturate<acc_t>(x), opts); };
  return {scalar(pref + reg), scalar(pref), scalar(reg), scores, scalar(correct / double(B)),
          rewards, scalar(double(total))};
}

template <typename acc_t>
std::tuple<at::Tensor, at::Tensor> pair_loss_backward_impl(
    double g_loss, double g_pref, double g_reg, const at::Tensor& grad_scores, const at::Tensor& grad_rewards,
    const at::Tensor& scores, const at::Tensor& rewards, double num_scored, const at::Tensor& loss_mask,
    double gamma, double beta, Variant variant, LengthNorm length_norm) {
  const int64_t rows = rewards.size(0), T = rewards.size(1), B = rows / 2;
  const acc_t* gs = grad_scores.const_data_ptr<acc_t>();
  const acc_t* gr = grad_rewards.const_data_ptr<acc_t>();
  const acc_t* s = scores.const_data_ptr<acc_t>();
  const acc_t* r = rewards.const_data_ptr<acc_t>();
  const RewardRule rule{variant, loss_mask.const_data_ptr<bool>(), T};
  const double g_bt = (g_loss + g_pref) / double(B);
  const double g_sq = (g_loss + g_reg) * 2.0 * beta / num_scored;
  at::Tensor grad_values = at::zeros({rows, T}, rewards.options());
  at::Tensor grad_q_taken = at::zeros({rows, T}, rewards.options());
  acc_t* gv = grad_values.mutable_data_ptr<acc_t>();
  acc_t* gq = grad_q_taken.mutable_data_ptr<acc_t>();

  at::parallel_for(0, rows, row_grain(T), [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const bool chosen = row < B;
      const int64_t partner = chosen ? row + B : row - B;
      // pref = mean softplus(S_rejected - S_chosen): the rejected side gets +sigmoid, the chosen -sigmoid.
      const double margin = chosen ? double(s[partner]) - double(s[row]) : double(s[row]) - double(s[partner]);
      const double g_score = (chosen ? -g_bt : g_bt) * sigmoid(margin) + double(gs[row]);
      int64_t n = 0;
      for (int64_t t = 0; t < T; ++t) n += rule.scored(row, t);
      const double inv_norm = inverse_norm(length_norm, T, n);
      for (int64_t t = 0; t < T; ++t) {
        if (!rule.scored(row, t)) continue;
        const double g = g_score * inv_norm + g_sq * double(r[row * T + t]) + double(gr[row * T + t]);
        gq[row * T + t] = acc_t(g);
        const int64_t vi = rule.bootstrap(row, t);
        if (vi >= 0) gv[row * T + vi] += acc_t(-gamma * g);
      }
    }
  });
  return {grad_values, grad_q_taken};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> pair_loss_cpu(
    const at::Tensor& values, const at::Tensor& q_taken, const at::Tensor& loss_mask, double gamma,
    double beta, c10::string_view variant, c10::string_view length_norm) {
  check_pair_inputs(values, q_taken, loss_mask);
  const Variant v = parse_variant(variant);
  const LengthNorm norm = parse_length_norm(length_norm);
  const auto acc = acc_type(values.scalar_type());
  const at::Tensor vals = values.to(acc).contiguous(), qt = q_taken.to(acc).contiguous();
  const at::Tensor mask = loss_mask.contiguous();
  return AT_DISPATCH_FLOATING_TYPES(acc, "pair_loss_cpu", [&] {
    return pair_loss_impl<scalar_t>(vals, qt, mask, gamma, beta, v, norm);
  });
}

std::tuple<at::Tensor, at::Tensor> pair_loss_backward_cpu(
    const at::Tensor& grad_loss, const at::Tensor& grad_pref_loss, const at::Tensor& grad_reg_loss,
    const at::Tensor& grad_scores, const at::Tensor& grad_rewards, const at::Tensor& scores,
    const at::Tensor& rewards, const at::Tensor& num_scored, const at::Tensor& loss_mask, double gamma,
    double beta, c10::string_view variant, c10::string_view length_norm) {
  check_pair_backward_inputs(grad_loss, grad_pref_loss, grad_reg_loss, grad_scores, grad_rewards, scores, rewards,
                             num_scored, loss_mask);
  const Variant v = parse_variant(variant);
  const LengthNorm norm = parse_length_norm(length_norm);
  const auto acc = rewards.scalar_type();
  auto as_acc = [&](const at::Tensor& t) { return t.to(acc).contiguous(); };
  const double g_loss = grad_loss.item<double>(), g_pref = grad_pref_loss.item<double>(),
               g_reg = grad_reg_loss.item<double>(), n = num_scored.item<double>();
  return AT_DISPATCH_FLOATING_TYPES(acc, "pair_loss_backward_cpu", [&] {
    return pair_loss_backward_impl<scalar_t>(g_loss, g_pref, g_reg, as_acc(grad_scores), as_acc(grad_rewards),
                                             as_acc(scores), as_acc(rewards), n, loss_mask.contiguous(), gamma,
                                             beta, v, norm);
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(qadapter, CPU, m) {
  m.impl("pair_loss", &pair_loss_cpu);
  m.impl("pair_loss_backward", &pair_loss_backward_cpu);
}

}  // namespace qadapter
