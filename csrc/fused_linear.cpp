// CPU kernels of qadapter::fused_linear_residual_q_values and its backward: the vocabulary pass
// of residual_q_values.cpp with the LM head fused in, so no [N, V] logits tensor ever exists.
//
// Tiles of [rows x vocab] logits of both streams come from ATen matmuls into two reused
// buffers (each W tile is read once for both streams); the reductions run over the buffers
// while they are hot. With `with_expected`, the same sweep also accumulates
// E = softmax(y) @ W online (rescaled like the running sums), which is all the backward needs
// for grad(adapter_hidden) = g_q * W[a] + g_V * E: no second sweep unless W or the bias
// requires grad.
//
// With `base_lse` (LSE(L) per row from a cached base pass) the tiles are those of the combined
// stream alone, y = W h_c + b' (the logit identity, combined_hidden.h): one head product per W
// tile instead of two; q_taken = h_q . W[a] + b[a] is a gather, not a tile.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <optional>
#include <tuple>
#include <vector>

#include "acc_type.h"
#include "checks.h"
#include "combined_hidden.h"
#include "vocab_tile.h"

namespace qadapter {
namespace {

struct Tiling {
  int64_t rows, vocab;
};

// What the head products are: both streams (Q and L tiles), or with a cached base pass the
// combined stream alone (y tiles; the l tile is then undefined).
struct Streams {
  bool combined;
  double alpha_tilde, alpha_0;
};

// Logits of one [rows x vocab] tile of one stream, computed in acc precision into `buffer`.
at::Tensor tile_logits(const at::Tensor& hidden, const at::Tensor& w_tile, const std::optional<at::Tensor>& b_tile,
                       at::Tensor& buffer) {
  at::Tensor out = buffer.narrow(0, 0, hidden.size(0) * w_tile.size(0)).view({hidden.size(0), w_tile.size(0)});
  if (b_tile) {
    at::addmm_out(out, *b_tile, hidden, w_tile.t());
  } else {
    at::mm_out(out, hidden, w_tile.t());
  }
  return out;
}

// Walks the [N, V] logits tile by tile: calls visit(r0, v0, q_tile, l_tile, hidden_a_rows, w_tile)
// with q_tile/l_tile [R, Vt] contiguous acc tensors (combined streams: q_tile holds y, l_tile is
// undefined), after each row block calls done_rows(r0, R).
template <typename Visit, typename Done>
void for_each_tile(const at::Tensor& hidden_a, const at::Tensor& hidden_b, const at::Tensor& weight,
                   const std::optional<at::Tensor>& bias, Tiling tiling, Streams streams, at::ScalarType acc,
                   Visit visit, Done done_rows) {
  const int64_t n = hidden_a.size(0), vocab = weight.size(0);
  auto opts = hidden_a.options().dtype(acc);
  at::Tensor q_buf = at::empty({tiling.rows * tiling.vocab}, opts);
  at::Tensor l_buf = streams.combined ? at::Tensor() : at::empty({tiling.rows * tiling.vocab}, opts);
  at::Tensor combined_hidden;
  std::optional<at::Tensor> tile_bias = bias;
  if (streams.combined) {
    std::tie(combined_hidden, tile_bias) =
        combine_hidden(hidden_a, hidden_b, bias, streams.alpha_tilde, streams.alpha_0, acc);
  }
  for (int64_t r0 = 0; r0 < n; r0 += tiling.rows) {
    const int64_t rows = std::min(tiling.rows, n - r0);
    const at::Tensor ha = hidden_a.narrow(0, r0, rows).to(acc);
    const at::Tensor first = streams.combined ? combined_hidden.narrow(0, r0, rows) : ha;
    const at::Tensor hb = streams.combined ? at::Tensor() : hidden_b.narrow(0, r0, rows).to(acc);
    for (int64_t v0 = 0; v0 < vocab; v0 += tiling.vocab) {
      const int64_t cols = std::min(tiling.vocab, vocab - v0);
      const at::Tensor w_tile = weight.narrow(0, v0, cols).to(acc);
      std::optional<at::Tensor> b_tile;
      if (tile_bias) b_tile = tile_bias->narrow(0, v0, cols).to(acc);
      at::Tensor q_tile = tile_logits(first, w_tile, b_tile, q_buf);
      at::Tensor l_tile = streams.combined ? at::Tensor() : tile_logits(hb, w_tile, b_tile, l_buf);
      visit(r0, v0, q_tile, l_tile, ha, w_tile);
    }
    done_rows(r0, rows);
  }
}

// The tile reductions' view of the streams: y = combine(q, l), or q itself (l == nullptr).
template <typename acc_t>
Combine<acc_t> tile_combine(Streams streams) {
  return streams.combined ? Combine<acc_t>(1.0, 0.0) : Combine<acc_t>(streams.alpha_tilde, streams.alpha_0);
}

template <typename acc_t>
const acc_t* l_data(const at::Tensor& l_tile) {
  return l_tile.defined() ? l_tile.const_data_ptr<acc_t>() : nullptr;
}

int64_t row_grain(int64_t vocab) {
  return std::max<int64_t>(1, at::internal::GRAIN_SIZE / std::max<int64_t>(vocab, 1));
}

template <typename acc_t>
void fused_forward(const at::Tensor& ha, const at::Tensor& hb, const at::Tensor& weight,
                   const std::optional<at::Tensor>& bias, const at::Tensor& actions, Streams streams,
                   const acc_t* base_lse, Tiling tiling, bool with_expected, at::Tensor& values,
                   at::Tensor& q_taken, at::Tensor& lse_y, at::Tensor& expected) {
  const double alpha_tilde = streams.alpha_tilde, alpha_0 = streams.alpha_0;
  const int64_t n = ha.size(0);
  const int64_t* a = actions.const_data_ptr<int64_t>();
  acc_t* values_data = values.mutable_data_ptr<acc_t>();
  acc_t* q_taken_data = q_taken.mutable_data_ptr<acc_t>();
  acc_t* lse_data = lse_y.mutable_data_ptr<acc_t>();
  const Combine<acc_t> combine = tile_combine<acc_t>(streams);
  std::vector<OnlineLse<acc_t>> lse_y_rows(n), lse_l_rows(n);
  at::Tensor factor = at::empty({tiling.rows}, values.options());
  acc_t* factor_data = factor.mutable_data_ptr<acc_t>();

  auto visit = [&](int64_t r0, int64_t v0, at::Tensor& q_tile, at::Tensor& l_tile, const at::Tensor&,
                   const at::Tensor& w_tile) {
    const int64_t rows = q_tile.size(0), cols = q_tile.size(1);
    acc_t* q = q_tile.mutable_data_ptr<acc_t>();
    const acc_t* l = l_data<acc_t>(l_tile);
    at::parallel_for(0, rows, row_grain(cols), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        acc_t* q_row = q + r * cols;
        const int64_t col = a[r0 + r] - v0;
        if (!streams.combined && col >= 0 && col < cols) q_taken_data[r0 + r] = q_row[col];
        // With with_expected the Q (or y) tile is overwritten by exp(y - running max), E's weights.
        factor_data[r] = fold_tile<acc_t>(q_row, l ? l + r * cols : nullptr, cols, combine, lse_y_rows[r0 + r],
                                          lse_l_rows[r0 + r], with_expected ? q_row : nullptr);
      }
    });
    if (with_expected) {
      at::Tensor e = expected.narrow(0, r0, rows);
      e.mul_(factor.narrow(0, 0, rows).unsqueeze(1));
      e.addmm_(q_tile, w_tile);
    }
  };
  auto done = [&](int64_t r0, int64_t rows) {
    for (int64_t r = r0; r < r0 + rows; ++r) {
      lse_data[r] = lse_y_rows[r].value();
      const acc_t lse_l = base_lse ? base_lse[r] : lse_l_rows[r].value();
      values_data[r] = acc_t(alpha_tilde) * lse_data[r] - acc_t(alpha_0) * lse_l;
      factor_data[r - r0] = lse_y_rows[r].sum;
    }
    if (with_expected) expected.narrow(0, r0, rows).div_(factor.narrow(0, 0, rows).unsqueeze(1));
  };
  for_each_tile(ha, hb, weight, bias, tiling, streams, values.scalar_type(), visit, done);
}

template <typename acc_t>
void fused_backward_weight(const at::Tensor& grad_values, const at::Tensor& grad_q_taken, const at::Tensor& ha,
                           const at::Tensor& hb, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                           const at::Tensor& actions, const at::Tensor& lse_y, Streams streams, Tiling tiling,
                           at::Tensor& grad_weight, at::Tensor* grad_bias) {
  const int64_t* a = actions.const_data_ptr<int64_t>();
  const acc_t* gv = grad_values.const_data_ptr<acc_t>();
  const acc_t* gq = grad_q_taken.const_data_ptr<acc_t>();
  const acc_t* lse = lse_y.const_data_ptr<acc_t>();
  const Combine<acc_t> combine = tile_combine<acc_t>(streams);
  auto visit = [&](int64_t r0, int64_t v0, at::Tensor& q_tile, at::Tensor& l_tile, const at::Tensor& ha_rows,
                   const at::Tensor&) {
    const int64_t rows = q_tile.size(0), cols = q_tile.size(1);
    acc_t* q = q_tile.mutable_data_ptr<acc_t>();
    const acc_t* l = l_data<acc_t>(l_tile);
    at::parallel_for(0, rows, row_grain(cols), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        acc_t* q_row = q + r * cols;  // becomes dQ = g_V * softmax(y) + g_q * onehot(a), in place
        softmax_grad_tile<acc_t>(q_row, l ? l + r * cols : nullptr, cols, combine, lse[r0 + r], gv[r0 + r], q_row);
        const int64_t col = a[r0 + r] - v0;
        if (col >= 0 && col < cols) q_row[col] += gq[r0 + r];
      }
    });
    grad_weight.narrow(0, v0, cols).addmm_(q_tile.t(), ha_rows);
    if (grad_bias) grad_bias->narrow(0, v0, cols).add_(q_tile.sum(0));
  };
  for_each_tile(ha, hb, weight, bias, tiling, streams, lse_y.scalar_type(), visit, [](int64_t, int64_t) {});
}

void check_hidden(const at::Tensor& ha, const at::Tensor& hb, const at::Tensor& weight,
                  const std::optional<at::Tensor>& bias, const at::Tensor& actions) {
  check_float("adapter_hidden", ha);
  TORCH_CHECK_VALUE(ha.dim() == 2, "adapter_hidden must be [N, H], got ", ha.sizes());
  check_float_shape("base_hidden", hb, ha.sizes(), "adapter_hidden");
  check_float("weight", weight);
  TORCH_CHECK_VALUE(weight.dim() == 2 && weight.size(1) == ha.size(1) && weight.size(0) > 0,
                    "weight must be [V, H] with V >= 1 and H = ", ha.size(1), ", got ", weight.sizes());
  TORCH_CHECK_TYPE(hb.scalar_type() == ha.scalar_type() && weight.scalar_type() == ha.scalar_type(),
                   "adapter_hidden, base_hidden and weight must share a dtype, got ", ha.scalar_type(), ", ",
                   hb.scalar_type(), " and ", weight.scalar_type());
  if (bias) {
    check_float_shape("bias", *bias, {weight.size(0)}, "weight");
    TORCH_CHECK_TYPE(bias->scalar_type() == ha.scalar_type(), "bias must have the hidden states' dtype ",
                     ha.scalar_type(), ", got ", bias->scalar_type());
  }
  check_dtype("actions", actions, at::kLong);
  check_shape("actions", actions, {ha.size(0)}, "adapter_hidden");
}

// base_lse, when given: [N] LSE(L) per row (any float dtype), as an acc tensor.
std::optional<at::Tensor> checked_base_lse(const std::optional<at::Tensor>& base_lse, int64_t n, at::ScalarType acc) {
  if (!base_lse) return std::nullopt;
  check_float_shape("base_lse", *base_lse, {n}, "adapter_hidden");
  return base_lse->to(acc).contiguous();
}

// Q[a] = h_q . W[a] (+ b[a]) per row, NaN where a is outside [0, V): the combined streams have no Q tile.
at::Tensor gathered_q_taken(const at::Tensor& ha, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                            const at::Tensor& actions, at::ScalarType acc) {
  const at::Tensor valid = (actions >= 0) & (actions < weight.size(0));
  const at::Tensor safe = at::where(valid, actions, 0);
  at::Tensor q = (ha.to(acc) * weight.index_select(0, safe).to(acc)).sum(1);
  if (bias) q.add_(bias->index_select(0, safe).to(acc));
  return at::where(valid, q, std::numeric_limits<double>::quiet_NaN());
}

// Tiles no larger than the problem: a huge requested tile would only size the scratch buffers.
Tiling check_tiling(int64_t tile_rows, int64_t tile_vocab, int64_t n, int64_t vocab) {
  TORCH_CHECK_VALUE(tile_rows > 0, "tile_rows must be positive, got ", tile_rows);
  TORCH_CHECK_VALUE(tile_vocab > 0, "tile_vocab must be positive, got ", tile_vocab);
  return {std::min(tile_rows, std::max<int64_t>(n, 1)), std::min(tile_vocab, vocab)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> fused_linear_residual_q_values_cpu(
    const at::Tensor& adapter_hidden, const at::Tensor& base_hidden, const at::Tensor& weight,
    const std::optional<at::Tensor>& bias, const at::Tensor& actions, double alpha_tilde, double alpha_0,
    int64_t tile_rows, int64_t tile_vocab, bool with_expected, const std::optional<at::Tensor>& base_lse) {
  check_hidden(adapter_hidden, base_hidden, weight, bias, actions);
  const at::Tensor a = actions.contiguous();
  const int64_t n = adapter_hidden.size(0), h = adapter_hidden.size(1);
  Tiling tiling = check_tiling(tile_rows, tile_vocab, n, weight.size(0));
  const auto acc = acc_type(adapter_hidden.scalar_type());
  auto opts = adapter_hidden.options().dtype(acc);
  const std::optional<at::Tensor> lse_l = checked_base_lse(base_lse, n, acc);
  const Streams streams{lse_l.has_value(), alpha_tilde, alpha_0};
  at::Tensor values = at::empty({n}, opts), lse_y = at::empty({n}, opts);
  // Only a tile holding a row's action writes its q_taken: an out-of-range action keeps NaN.
  at::Tensor q_taken = streams.combined ? gathered_q_taken(adapter_hidden, weight, bias, a, acc)
                                        : at::full({n}, std::numeric_limits<double>::quiet_NaN(), opts);
  at::Tensor expected = at::zeros({with_expected ? n : 0, h}, opts);
  AT_DISPATCH_FLOATING_TYPES(acc, "fused_linear_residual_q_values_cpu", [&] {
    fused_forward<scalar_t>(adapter_hidden, base_hidden, weight, bias, a, streams,
                            lse_l ? lse_l->const_data_ptr<scalar_t>() : nullptr, tiling, with_expected, values,
                            q_taken, lse_y, expected);
  });
  return {values, q_taken, lse_y, expected};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> fused_linear_residual_q_values_backward_cpu(
    const at::Tensor& grad_values, const at::Tensor& grad_q_taken, const at::Tensor& adapter_hidden,
    const at::Tensor& base_hidden, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& actions, const at::Tensor& lse_y, const at::Tensor& expected, double alpha_tilde,
    double alpha_0, int64_t tile_rows, int64_t tile_vocab, std::array<bool, 3> output_mask,
    const std::optional<at::Tensor>& base_lse) {
  // No double backward: saved inputs that require grad must not reach the out= matmuls with autograd on.
  const at::NoGradGuard no_grad;
  check_hidden(adapter_hidden, base_hidden, weight, bias, actions);
  const int64_t n = adapter_hidden.size(0), h = adapter_hidden.size(1), vocab = weight.size(0);
  check_float_shape("grad_values", grad_values, {n}, "adapter_hidden");
  check_float_shape("grad_q_taken", grad_q_taken, {n}, "adapter_hidden");
  check_float_shape("lse_y", lse_y, {n}, "adapter_hidden");
  check_float("expected", expected);
  TORCH_CHECK_VALUE(expected.dim() == 2 && expected.size(1) == h && (expected.size(0) == n || expected.size(0) == 0),
                    "expected must be [N, H] = [", n, ", ", h, "] (or [0, H] without with_expected), got ",
                    expected.sizes());
  const at::Tensor a = actions.contiguous();
  Tiling tiling = check_tiling(tile_rows, tile_vocab, n, vocab);
  const auto acc = acc_type(adapter_hidden.scalar_type());
  const at::Tensor gv = grad_values.to(acc).contiguous(), gq = grad_q_taken.to(acc).contiguous();
  const at::Tensor lse = lse_y.to(acc).contiguous();
  const Streams streams{checked_base_lse(base_lse, n, acc).has_value(), alpha_tilde, alpha_0};
  at::Tensor grad_hidden = at::empty({0}, adapter_hidden.options());
  at::Tensor grad_weight = at::empty({0}, weight.options()), grad_bias = at::empty({0}, weight.options());
  if (output_mask[0]) {
    TORCH_CHECK_VALUE(expected.size(0) == n,
                      "expected is empty: the forward ran without with_expected, so grad(adapter_hidden) is "
                      "unavailable");
    // An out-of-range action (value checks off) gets no one-hot term and indexes no row of W.
    const at::Tensor valid = (a >= 0) & (a < vocab);
    const at::Tensor rows_of_w = weight.index_select(0, at::where(valid, a, 0)).to(acc);
    grad_hidden = (at::where(valid, gq, 0).unsqueeze(1) * rows_of_w + gv.unsqueeze(1) * expected.to(acc))
                      .to(adapter_hidden.scalar_type());
  }
  if (output_mask[1] || output_mask[2]) {
    at::Tensor gw = at::zeros(weight.sizes(), weight.options().dtype(acc));
    at::Tensor gb = at::zeros({weight.size(0)}, weight.options().dtype(acc));
    AT_DISPATCH_FLOATING_TYPES(acc, "fused_linear_residual_q_values_backward_cpu", [&] {
      fused_backward_weight<scalar_t>(gv, gq, adapter_hidden, base_hidden, weight, bias, a, lse, streams, tiling,
                                      gw, output_mask[2] ? &gb : nullptr);
    });
    if (output_mask[1]) grad_weight = gw.to(weight.scalar_type());
    if (output_mask[2]) grad_bias = gb.to(weight.scalar_type());
  }
  return {grad_hidden, grad_weight, grad_bias};
}

}  // namespace

TORCH_LIBRARY_IMPL(qadapter, CPU, m) {
  m.impl("fused_linear_residual_q_values", &fused_linear_residual_q_values_cpu);
  m.impl("fused_linear_residual_q_values_backward", &fused_linear_residual_q_values_backward_cpu);
}

}  // namespace qadapter
