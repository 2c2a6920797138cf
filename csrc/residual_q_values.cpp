// CPU kernels of qadapter::residual_q_values and its backward.
//
// Each row of [N, V] logits is streamed once in tiles that stay in L1: per tile a vector
// max, then one rescale of the running sums and a vector exp-sum (online logsumexp at tile
// granularity, one exp per element and stream). Accumulation is fp32 (fp64 for double
// inputs, so gradcheck runs through this code).
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <limits>

#include "acc_type.h"
#include "checks.h"
#include "streaming_output.h"
#include "vocab_tile.h"

namespace qadapter {
namespace {

constexpr int64_t kTile = 1024;  // 4 KiB per stream in fp32: both streams stay in L1

int64_t row_grain(int64_t vocab) {
  return std::max<int64_t>(1, at::internal::GRAIN_SIZE / std::max<int64_t>(vocab, 1));
}

template <typename scalar_t>
void residual_q_values_rows(
    const at::Tensor& q, const at::Tensor& l, const at::Tensor& actions, double alpha_tilde,
    double alpha_0, at::Tensor& values, at::Tensor& q_taken, at::Tensor& lse_y) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t n_rows = q.size(0), vocab = q.size(1);
  const int64_t q_stride = q.stride(0), l_stride = l.stride(0);
  const scalar_t* q_data = q.const_data_ptr<scalar_t>();
  const scalar_t* l_data = l.const_data_ptr<scalar_t>();
  const int64_t* a_data = actions.const_data_ptr<int64_t>();
  acc_t* values_data = values.mutable_data_ptr<acc_t>();
  acc_t* q_taken_data = q_taken.mutable_data_ptr<acc_t>();
  acc_t* lse_data = lse_y.mutable_data_ptr<acc_t>();
  const Combine<acc_t> combine(alpha_tilde, alpha_0);

  at::parallel_for(0, n_rows, row_grain(vocab), [&](int64_t begin, int64_t end) {
    std::array<acc_t, kTile> q_buf, l_buf;
    for (int64_t row = begin; row < end; ++row) {
      const scalar_t* q_row = q_data + row * q_stride;
      const scalar_t* l_row = l_data + row * l_stride;
      OnlineLse<acc_t> lse_y_row, lse_l_row;
      for (int64_t start = 0; start < vocab; start += kTile) {
        const int64_t n = std::min(kTile, vocab - start);
        fold_tile<acc_t>(tile_as_acc<scalar_t, acc_t>(q_row + start, n, q_buf.data()),
                         tile_as_acc<scalar_t, acc_t>(l_row + start, n, l_buf.data()), n, combine, lse_y_row,
                         lse_l_row);
      }
      lse_data[row] = lse_y_row.value();
      values_data[row] = acc_t(alpha_tilde) * lse_y_row.value() - acc_t(alpha_0) * lse_l_row.value();
      // An out-of-range action (value checks off) reads nothing: NaN, as on every backend.
      const int64_t a = a_data[row];
      q_taken_data[row] =
          (a >= 0 && a < vocab) ? static_cast<acc_t>(q_row[a]) : std::numeric_limits<acc_t>::quiet_NaN();
    }
  });
}

template <typename scalar_t>
void residual_q_values_backward_rows(
    const at::Tensor& grad_values, const at::Tensor& grad_q_taken, const at::Tensor& q,
    const at::Tensor& l, const at::Tensor& actions, const at::Tensor& lse_y, double alpha_tilde,
    double alpha_0, at::Tensor& grad_q) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t n_rows = q.size(0), vocab = q.size(1);
  const int64_t q_stride = q.stride(0), l_stride = l.stride(0);
  const scalar_t* q_data = q.const_data_ptr<scalar_t>();
  const scalar_t* l_data = l.const_data_ptr<scalar_t>();
  const int64_t* a_data = actions.const_data_ptr<int64_t>();
  const acc_t* gv_data = grad_values.const_data_ptr<acc_t>();
  const acc_t* gq_data = grad_q_taken.const_data_ptr<acc_t>();
  const acc_t* lse_data = lse_y.const_data_ptr<acc_t>();
  scalar_t* out_data = grad_q.mutable_data_ptr<scalar_t>();
  const Combine<acc_t> combine(alpha_tilde, alpha_0);

  at::parallel_for(0, n_rows, row_grain(vocab), [&](int64_t begin, int64_t end) {
    std::array<acc_t, kTile> q_buf, l_buf, out_buf;
    for (int64_t row = begin; row < end; ++row) {
      scalar_t* out_row = out_data + row * vocab;
      const acc_t gv = gv_data[row], gq = gq_data[row];
      // Prompt and pad positions carry no gradient: write zeros without reading the logits.
      if (gv == acc_t(0) && gq == acc_t(0)) {
        std::fill(out_row, out_row + vocab, scalar_t(0));
        continue;
      }
      const scalar_t* q_row = q_data + row * q_stride;
      const scalar_t* l_row = l_data + row * l_stride;
      const acc_t lse = lse_data[row];
      for (int64_t start = 0; start < vocab; start += kTile) {
        const int64_t n = std::min(kTile, vocab - start);
        acc_t* out = std::is_same_v<scalar_t, acc_t> ? reinterpret_cast<acc_t*>(out_row + start) : out_buf.data();
        softmax_grad_tile<acc_t>(tile_as_acc<scalar_t, acc_t>(q_row + start, n, q_buf.data()),
                                 tile_as_acc<scalar_t, acc_t>(l_row + start, n, l_buf.data()), n, combine, lse,
                                 gv, out);
        if constexpr (!std::is_same_v<scalar_t, acc_t>) at::vec::convert(out, out_row + start, n);
      }
      const int64_t a = a_data[row];
      if (a < 0 || a >= vocab) continue;  // no one-hot term for an invalid action
      const acc_t pi_a = std::exp(combine(acc_t(q_row[a]), acc_t(l_row[a])) - lse);
      out_row[a] = static_cast<scalar_t>(gv * pi_a + gq);
    }
  });
}

void check_logits(const at::Tensor& q, const at::Tensor& l, const at::Tensor& actions) {
  check_float("q_logits", q);
  TORCH_CHECK_VALUE(q.dim() == 2 && q.size(1) > 0, "q_logits must be [N, V] with V >= 1, got ", q.sizes());
  check_float_shape("base_logits", l, q.sizes(), "q_logits");
  TORCH_CHECK_TYPE(l.scalar_type() == q.scalar_type(), "base_logits dtype ", l.scalar_type(),
                   " differs from q_logits dtype ", q.scalar_type());
  check_dtype("actions", actions, at::kLong);
  check_shape("actions", actions, {q.size(0)}, "q_logits");
}

at::Tensor row_contiguous(const at::Tensor& t) { return t.stride(1) == 1 ? t : t.contiguous(); }

std::tuple<at::Tensor, at::Tensor, at::Tensor> residual_q_values_cpu(
    const at::Tensor& q_logits, const at::Tensor& base_logits, const at::Tensor& actions,
    double alpha_tilde, double alpha_0) {
  check_logits(q_logits, base_logits, actions);
  const at::Tensor q = row_contiguous(q_logits), l = row_contiguous(base_logits);
  const at::Tensor a = actions.contiguous();
  const auto acc_dtype = acc_type(q.scalar_type());
  auto opts = q.options().dtype(acc_dtype);
  at::Tensor values = at::empty({q.size(0)}, opts), q_taken = at::empty({q.size(0)}, opts),
             lse_y = at::empty({q.size(0)}, opts);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "residual_q_values_cpu", [&] {
    residual_q_values_rows<scalar_t>(q, l, a, alpha_tilde, alpha_0, values, q_taken, lse_y);
  });
  return {values, q_taken, lse_y};
}

at::Tensor residual_q_values_backward_cpu(
    const at::Tensor& grad_values, const at::Tensor& grad_q_taken, const at::Tensor& q_logits,
    const at::Tensor& base_logits, const at::Tensor& actions, const at::Tensor& lse_y,
    double alpha_tilde, double alpha_0) {
  check_logits(q_logits, base_logits, actions);
  check_float_shape("grad_values", grad_values, {q_logits.size(0)}, "q_logits");
  check_float_shape("grad_q_taken", grad_q_taken, {q_logits.size(0)}, "q_logits");
  check_float_shape("lse_y", lse_y, {q_logits.size(0)}, "q_logits");
  const auto acc_dtype = acc_type(q_logits.scalar_type());
  const at::Tensor q = row_contiguous(q_logits), l = row_contiguous(base_logits);
  const at::Tensor a = actions.contiguous();
  const at::Tensor gv = grad_values.to(acc_dtype).contiguous();
  const at::Tensor gq = grad_q_taken.to(acc_dtype).contiguous();
  const at::Tensor lse = lse_y.to(acc_dtype).contiguous();
  at::Tensor grad_q = empty_streaming_output(q.sizes(), q.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "residual_q_values_backward_cpu", [&] {
    residual_q_values_backward_rows<scalar_t>(gv, gq, q, l, a, lse, alpha_tilde, alpha_0, grad_q);
  });
  return grad_q;
}

}  // namespace

TORCH_LIBRARY_IMPL(qadapter, CPU, m) {
  m.impl("residual_q_values", &residual_q_values_cpu);
  m.impl("residual_q_values_backward", &residual_q_values_backward_cpu);
}

}  // namespace qadapter
