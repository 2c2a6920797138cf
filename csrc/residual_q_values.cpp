// CPU kernels of qadapter::residual_q_values and its backward.
//
// Each row of [N, V] logits is streamed once in tiles that stay in L1: per tile a vector
// max, then one rescale of the running sums and a vector exp-sum (online logsumexp at tile
// granularity, one exp per element and stream). Accumulation is fp32 (fp64 for double
// inputs, so gradcheck runs through this code).
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <limits>

namespace qadapter {
namespace {

using at::vec::Vectorized;

constexpr int64_t kTile = 1024;  // 4 KiB per stream in fp32: both streams stay in L1

// A tile of a logits row as acc_t: the row itself when no conversion is needed,
// otherwise a converted copy in `buffer`.
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

template <typename acc_t>
Vectorized<acc_t> vexp(const Vectorized<acc_t>& x) {
  if constexpr (std::is_same_v<acc_t, float>) {
    return x.exp_u20();  // ~1e-6 relative: ample for a softmax normaliser
  } else {
    return x.exp();
  }
}

// Running logsumexp state of one stream.
template <typename acc_t>
struct OnlineLse {
  acc_t max = -std::numeric_limits<acc_t>::infinity();
  acc_t sum = 0;

  // Rescales the sum to the new maximum; returns the shift to use for this tile's exps
  // (0 when everything so far is -inf, which keeps exp(-inf - shift) = 0, not NaN).
  acc_t advance(acc_t tile_max) {
    acc_t new_max = max_nan(max, tile_max);
    if (new_max == -std::numeric_limits<acc_t>::infinity()) return 0;
    sum *= std::exp(max - new_max);
    max = new_max;
    return new_max;
  }
  acc_t value() const { return max + std::log(sum); }
};

template <typename scalar_t>
void residual_q_values_rows(
    const at::Tensor& q, const at::Tensor& l, const at::Tensor& actions, double alpha_tilde,
    double alpha_0, at::Tensor& values, at::Tensor& q_taken, at::Tensor& lse_y) {
  using acc_t = at::opmath_type<scalar_t>;
  using Vec = Vectorized<acc_t>;
  constexpr int64_t kVec = Vec::size();
  const int64_t n_rows = q.size(0), vocab = q.size(1);
  const int64_t q_stride = q.stride(0), l_stride = l.stride(0);
  const scalar_t* q_data = q.const_data_ptr<scalar_t>();
  const scalar_t* l_data = l.const_data_ptr<scalar_t>();
  const int64_t* a_data = actions.const_data_ptr<int64_t>();
  acc_t* values_data = values.mutable_data_ptr<acc_t>();
  acc_t* q_taken_data = q_taken.mutable_data_ptr<acc_t>();
  acc_t* lse_data = lse_y.mutable_data_ptr<acc_t>();
  const acc_t inv_at = acc_t(1) / acc_t(alpha_tilde);
  const acc_t a0 = acc_t(alpha_0);
  const acc_t scale = a0 * inv_at;
  const Vec v_inv_at(inv_at), v_scale(scale);
  const int64_t grain = std::max<int64_t>(1, at::internal::GRAIN_SIZE / std::max<int64_t>(vocab, 1));

  at::parallel_for(0, n_rows, grain, [&](int64_t begin, int64_t end) {
    std::array<acc_t, kTile> q_buf, l_buf;
    for (int64_t row = begin; row < end; ++row) {
      const scalar_t* q_row = q_data + row * q_stride;
      const scalar_t* l_row = l_data + row * l_stride;
      OnlineLse<acc_t> lse_y_state, lse_l_state;
      for (int64_t start = 0; start < vocab; start += kTile) {
        const int64_t n = std::min(kTile, vocab - start);
        const int64_t n_vec = n - n % kVec;
        const acc_t* qt = tile_as_acc<scalar_t, acc_t>(q_row + start, n, q_buf.data());
        const acc_t* lt = tile_as_acc<scalar_t, acc_t>(l_row + start, n, l_buf.data());
        // y = Q / alpha_tilde + (alpha_0 / alpha_tilde) * L
        Vec vmax_y(-std::numeric_limits<acc_t>::infinity()), vmax_l = vmax_y;
        for (int64_t i = 0; i < n_vec; i += kVec) {
          Vec lv = Vec::loadu(lt + i);
          vmax_y = at::vec::maximum(vmax_y, at::vec::fmadd(Vec::loadu(qt + i), v_inv_at, lv * v_scale));
          vmax_l = at::vec::maximum(vmax_l, lv);
        }
        acc_t max_y = at::vec::vec_reduce_all<acc_t>(
            [](Vec& a, Vec& b) { return at::vec::maximum(a, b); }, vmax_y);
        acc_t max_l = at::vec::vec_reduce_all<acc_t>(
            [](Vec& a, Vec& b) { return at::vec::maximum(a, b); }, vmax_l);
        for (int64_t i = n_vec; i < n; ++i) {
          max_y = max_nan(max_y, qt[i] * inv_at + lt[i] * scale);
          max_l = max_nan(max_l, lt[i]);
        }
        const acc_t shift_y = lse_y_state.advance(max_y);
        const acc_t shift_l = lse_l_state.advance(max_l);
        const Vec v_shift_y(shift_y), v_shift_l(shift_l);
        Vec vsum_y(0), vsum_l(0);
        for (int64_t i = 0; i < n_vec; i += kVec) {
          Vec lv = Vec::loadu(lt + i);
          Vec yv = at::vec::fmadd(Vec::loadu(qt + i), v_inv_at, lv * v_scale);
          vsum_y += vexp<acc_t>(yv - v_shift_y);
          vsum_l += vexp<acc_t>(lv - v_shift_l);
        }
        acc_t sum_y = at::vec::vec_reduce_all<acc_t>([](Vec& a, Vec& b) { return a + b; }, vsum_y);
        acc_t sum_l = at::vec::vec_reduce_all<acc_t>([](Vec& a, Vec& b) { return a + b; }, vsum_l);
        for (int64_t i = n_vec; i < n; ++i) {
          sum_y += std::exp(qt[i] * inv_at + lt[i] * scale - shift_y);
          sum_l += std::exp(lt[i] - shift_l);
        }
        lse_y_state.sum += sum_y;
        lse_l_state.sum += sum_l;
      }
      const acc_t lse_y_row = lse_y_state.value();
      lse_data[row] = lse_y_row;
      values_data[row] = acc_t(alpha_tilde) * lse_y_row - a0 * lse_l_state.value();
      q_taken_data[row] = static_cast<acc_t>(q_row[a_data[row]]);
    }
  });
}

template <typename scalar_t>
void residual_q_values_backward_rows(
    const at::Tensor& grad_values, const at::Tensor& grad_q_taken, const at::Tensor& q,
    const at::Tensor& l, const at::Tensor& actions, const at::Tensor& lse_y, double alpha_tilde,
    double alpha_0, at::Tensor& grad_q) {
  using acc_t = at::opmath_type<scalar_t>;
  using Vec = Vectorized<acc_t>;
  constexpr int64_t kVec = Vec::size();
  const int64_t n_rows = q.size(0), vocab = q.size(1);
  const int64_t q_stride = q.stride(0), l_stride = l.stride(0);
  const scalar_t* q_data = q.const_data_ptr<scalar_t>();
  const scalar_t* l_data = l.const_data_ptr<scalar_t>();
  const int64_t* a_data = actions.const_data_ptr<int64_t>();
  const acc_t* gv_data = grad_values.const_data_ptr<acc_t>();
  const acc_t* gq_data = grad_q_taken.const_data_ptr<acc_t>();
  const acc_t* lse_data = lse_y.const_data_ptr<acc_t>();
  scalar_t* out_data = grad_q.mutable_data_ptr<scalar_t>();
  const acc_t inv_at = acc_t(1) / acc_t(alpha_tilde);
  const acc_t scale = acc_t(alpha_0) * inv_at;
  const Vec v_inv_at(inv_at), v_scale(scale);
  const int64_t grain = std::max<int64_t>(1, at::internal::GRAIN_SIZE / std::max<int64_t>(vocab, 1));

  at::parallel_for(0, n_rows, grain, [&](int64_t begin, int64_t end) {
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
      const Vec v_gv(gv), v_lse(lse_data[row]);
      const acc_t lse = lse_data[row];
      for (int64_t start = 0; start < vocab; start += kTile) {
        const int64_t n = std::min(kTile, vocab - start);
        const int64_t n_vec = n - n % kVec;
        const acc_t* qt = tile_as_acc<scalar_t, acc_t>(q_row + start, n, q_buf.data());
        const acc_t* lt = tile_as_acc<scalar_t, acc_t>(l_row + start, n, l_buf.data());
        acc_t* ot = std::is_same_v<scalar_t, acc_t> ? reinterpret_cast<acc_t*>(out_row + start)
                                                    : out_buf.data();
        for (int64_t i = 0; i < n_vec; i += kVec) {
          Vec yv = at::vec::fmadd(Vec::loadu(qt + i), v_inv_at, Vec::loadu(lt + i) * v_scale);
          (v_gv * vexp<acc_t>(yv - v_lse)).store(ot + i);
        }
        for (int64_t i = n_vec; i < n; ++i) {
          ot[i] = gv * std::exp(qt[i] * inv_at + lt[i] * scale - lse);
        }
        if constexpr (!std::is_same_v<scalar_t, acc_t>) {
          at::vec::convert(ot, out_row + start, n);
        }
      }
      const int64_t a = a_data[row];
      const acc_t pi_a = std::exp(acc_t(q_row[a]) * inv_at + acc_t(l_row[a]) * scale - lse);
      out_row[a] = static_cast<scalar_t>(gv * pi_a + gq);
    }
  });
}

void check_logits(const at::Tensor& q, const at::Tensor& l, const at::Tensor& actions) {
  TORCH_CHECK_VALUE(q.dim() == 2, "q_logits must be [N, V], got ", q.sizes());
  TORCH_CHECK_VALUE(l.sizes() == q.sizes(), "base_logits must match q_logits ", q.sizes(), ", got ", l.sizes());
  TORCH_CHECK_TYPE(l.scalar_type() == q.scalar_type(), "base_logits dtype ", l.scalar_type(),
                   " differs from q_logits dtype ", q.scalar_type());
  TORCH_CHECK_VALUE(q.size(1) > 0, "q_logits must have a non-empty vocabulary");
  TORCH_CHECK_TYPE(actions.scalar_type() == at::kLong, "actions must be int64, got ", actions.scalar_type());
  TORCH_CHECK_VALUE(actions.dim() == 1 && actions.size(0) == q.size(0), "actions must be [N] with N = ",
                    q.size(0), ", got ", actions.sizes());
}

void check_actions_in_range(const at::Tensor& actions, int64_t vocab) {
  const int64_t* a = actions.const_data_ptr<int64_t>();
  for (int64_t i = 0; i < actions.numel(); ++i) {
    TORCH_CHECK_VALUE(a[i] >= 0 && a[i] < vocab, "actions[", i, "] = ", a[i], " is outside [0, ", vocab, ")");
  }
}

at::Tensor row_contiguous(const at::Tensor& t) { return t.stride(1) == 1 ? t : t.contiguous(); }

std::tuple<at::Tensor, at::Tensor, at::Tensor> residual_q_values_cpu(
    const at::Tensor& q_logits, const at::Tensor& base_logits, const at::Tensor& actions,
    double alpha_tilde, double alpha_0) {
  check_logits(q_logits, base_logits, actions);
  const at::Tensor q = row_contiguous(q_logits), l = row_contiguous(base_logits);
  const at::Tensor a = actions.contiguous();
  check_actions_in_range(a, q.size(1));
  const auto acc_dtype = q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
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
  const auto acc_dtype = q_logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  for (const at::Tensor* t : {&grad_values, &grad_q_taken, &lse_y}) {
    TORCH_CHECK_VALUE(t->dim() == 1 && t->size(0) == q_logits.size(0),
                      "per-row tensors must be [N], got ", t->sizes());
  }
  const at::Tensor q = row_contiguous(q_logits), l = row_contiguous(base_logits);
  const at::Tensor a = actions.contiguous();
  check_actions_in_range(a, q.size(1));
  const at::Tensor gv = grad_values.to(acc_dtype).contiguous();
  const at::Tensor gq = grad_q_taken.to(acc_dtype).contiguous();
  const at::Tensor lse = lse_y.to(acc_dtype).contiguous();
  at::Tensor grad_q = at::empty(q.sizes(), q.options());
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
