// The logit identity (DESIGN.md §2b): with a shared head, (Q + alpha_0 * L) / alpha_tilde
// = W h_c + b', h_c = (h_q + alpha_0 * h_b) / alpha_tilde, b' = b * (1 + alpha_0) / alpha_tilde.
// One head product on h_c replaces the two on h_q and h_b.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <utility>

#include "checks.h"

namespace qadapter {

// [N, H] hidden states of both streams and a head [V, H] (+ bias [V]) they fit.
inline void check_hidden_and_head(const at::Tensor& adapter_hidden, const at::Tensor& base_hidden,
                                  const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  check_float("adapter_hidden", adapter_hidden);
  TORCH_CHECK_VALUE(adapter_hidden.dim() == 2, "adapter_hidden must be [N, H], got ", adapter_hidden.sizes());
  check_float_shape("base_hidden", base_hidden, adapter_hidden.sizes(), "adapter_hidden");
  check_float("weight", weight);
  TORCH_CHECK_VALUE(weight.dim() == 2 && weight.size(1) == adapter_hidden.size(1) && weight.size(0) > 0,
                    "weight must be [V, H] with V >= 1 and H = ", adapter_hidden.size(1), ", got ", weight.sizes());
  if (bias) check_float_shape("bias", *bias, {weight.size(0)}, "weight");
}

// (h_c, b') in `acc` (fp32, or fp64 for fp64 inputs).
inline std::pair<at::Tensor, std::optional<at::Tensor>> combine_hidden(const at::Tensor& adapter_hidden,
                                                                       const at::Tensor& base_hidden,
                                                                       const std::optional<at::Tensor>& bias,
                                                                       double alpha_tilde, double alpha_0,
                                                                       at::ScalarType acc) {
  at::Tensor combined = adapter_hidden.to(acc).add(base_hidden.to(acc), alpha_0).div_(alpha_tilde);
  std::optional<at::Tensor> combined_bias;
  if (bias) combined_bias = bias->to(acc).mul((1.0 + alpha_0) / alpha_tilde);
  return {combined, combined_bias};
}

// The hidden rows as the columns of a head product W_tile x columns^T. One row is fed twice:
// MKL's product with two columns is several times faster than its gemv for one (measured on
// SmolLM2's head); callers read the first column.
inline at::Tensor product_columns(const at::Tensor& hidden) {
  return hidden.size(0) == 1 ? at::cat({hidden, hidden}) : hidden;
}

}  // namespace qadapter
