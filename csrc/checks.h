// Argument checks at the top of every CPU kernel entry. The public Python functions check
// their arguments first, but the ops are also reachable directly (torch.ops.qadapter.*) and
// from compiled graphs: each kernel validates every size, dtype and device it indexes, and the
// message names the argument as the op's schema spells it.
#pragma once

#include <ATen/ATen.h>

namespace qadapter {

inline void check_cpu(const char* name, const at::Tensor& t) {
  TORCH_CHECK_VALUE(t.device().is_cpu(), name, " must be a CPU tensor, got one on ", t.device());
}

// fp32, fp64, bf16 or fp16: the dtypes the kernels are compiled for.
inline void check_float(const char* name, const at::Tensor& t) {
  check_cpu(name, t);
  const auto dtype = t.scalar_type();
  TORCH_CHECK_TYPE(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kBFloat16 || dtype == at::kHalf,
                   name, " must be float32, float64, bfloat16 or float16, got ", dtype);
}

inline void check_dtype(const char* name, const at::Tensor& t, at::ScalarType dtype) {
  check_cpu(name, t);
  TORCH_CHECK_TYPE(t.scalar_type() == dtype, name, " must be ", dtype, ", got ", t.scalar_type());
}

// `source` names the argument the expected shape comes from, so that a wrong source is named too.
inline void check_shape(const char* name, const at::Tensor& t, at::IntArrayRef shape, const char* source) {
  TORCH_CHECK_VALUE(t.sizes() == shape, name, " must have shape ", shape, " (from ", source, "), got ", t.sizes());
}

// A float tensor of exactly `shape`.
inline void check_float_shape(const char* name, const at::Tensor& t, at::IntArrayRef shape, const char* source) {
  check_float(name, t);
  check_shape(name, t, shape, source);
}

// A float tensor holding one number (a 0-dim gradient or count), read with item().
inline void check_float_scalar(const char* name, const at::Tensor& t) {
  check_float(name, t);
  TORCH_CHECK_VALUE(t.dim() == 0, name, " must be a 0-dim tensor, got shape ", t.sizes());
}

}  // namespace qadapter
