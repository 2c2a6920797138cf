// CPU kernel of qadapter::combined_log_probs_from_hidden: log pi~(token) for each row of hidden
// states, where pi~ = softmax(W h_c + b') is the customised policy (combined_hidden.h). One head
// product per (row tile, W tile), folded into a running logsumexp per row; no [N, V] row is kept.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <limits>

#include "acc_type.h"
#include "checks.h"
#include "combined_hidden.h"

namespace qadapter {
namespace {

// Up to this many rows, MKL multiplies W_tile x hidden^T several times faster than hidden x W_tile^T
// (sampling.cpp); above it the direct product wins by giving contiguous [rows, cols] logits.
constexpr int64_t kFewRows = 4;

// log_softmax(W h + b)[token] of each row of `hidden` (acc dtype); NaN where token is outside [0, V).
at::Tensor row_tile_log_probs(const at::Tensor& hidden, const std::optional<at::Tensor>& bias,
                              const at::Tensor& weight, const at::Tensor& tokens, int64_t tile_vocab) {
  const int64_t rows = hidden.size(0), vocab = weight.size(0);
  const at::Tensor few_row_columns = rows <= kFewRows ? product_columns(hidden).t() : at::Tensor();
  at::Tensor running_lse = at::full({rows}, -std::numeric_limits<double>::infinity(), hidden.options());
  at::Tensor picked = at::full({rows}, std::numeric_limits<double>::quiet_NaN(), hidden.options());
  for (int64_t v0 = 0; v0 < vocab; v0 += tile_vocab) {
    const int64_t cols = std::min(tile_vocab, vocab - v0);
    const at::Tensor w_tile = weight.narrow(0, v0, cols).to(hidden.scalar_type());
    at::Tensor logits = rows <= kFewRows ? at::mm(w_tile, few_row_columns).narrow(1, 0, rows).t().contiguous()
                                         : at::mm(hidden, w_tile.t());  // [rows, cols]
    if (bias) logits.add_(bias->narrow(0, v0, cols));
    running_lse = at::logaddexp(running_lse, at::logsumexp(logits, 1));  // NaN propagates
    const at::Tensor in_tile = (tokens >= v0) & (tokens < v0 + cols);
    const at::Tensor column = (tokens - v0).clamp(0, cols - 1).unsqueeze(1);
    picked = at::where(in_tile, logits.gather(1, column).squeeze(1), picked);
  }
  return picked - running_lse;
}

at::Tensor combined_log_probs_from_hidden_cpu(const at::Tensor& adapter_hidden, const at::Tensor& base_hidden,
                                              const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                                              const at::Tensor& tokens, double alpha_tilde, double alpha_0,
                                              int64_t tile_rows, int64_t tile_vocab) {
  const at::NoGradGuard no_grad;  // log-likelihoods for scoring: no derivative is defined
  check_hidden_and_head(adapter_hidden, base_hidden, weight, bias);
  check_dtype("tokens", tokens, at::kLong);
  check_shape("tokens", tokens, {adapter_hidden.size(0)}, "adapter_hidden");
  TORCH_CHECK_VALUE(tile_rows > 0, "tile_rows must be positive, got ", tile_rows);
  TORCH_CHECK_VALUE(tile_vocab > 0, "tile_vocab must be positive, got ", tile_vocab);
  const auto acc = acc_type(adapter_hidden.scalar_type());
  const auto [hidden, combined_bias] = combine_hidden(adapter_hidden, base_hidden, bias, alpha_tilde, alpha_0, acc);
  const int64_t rows = hidden.size(0);
  at::Tensor out = at::empty({rows}, hidden.options());
  for (int64_t r0 = 0; r0 < rows; r0 += tile_rows) {
    const int64_t n = std::min(tile_rows, rows - r0);
    out.narrow(0, r0, n).copy_(row_tile_log_probs(hidden.narrow(0, r0, n), combined_bias, weight,
                                                  tokens.narrow(0, r0, n), tile_vocab));
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(qadapter, CPU, m) {
  m.impl("combined_log_probs_from_hidden", &combined_log_probs_from_hidden_cpu);
}

}  // namespace qadapter
