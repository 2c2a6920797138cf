// The accumulation dtype of every CPU kernel (the Python side's acc_dtype): fp32, or fp64 for
// fp64 inputs so that gradcheck runs through the kernels.
#pragma once

#include <c10/core/ScalarType.h>

namespace qadapter {

inline at::ScalarType acc_type(at::ScalarType input) { return input == at::kDouble ? at::kDouble : at::kFloat; }

}  // namespace qadapter
