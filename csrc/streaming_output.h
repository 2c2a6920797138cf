// Fresh [N, V] kernel outputs (the loss's dQ: hundreds of MiB) without a page fault per 4 KiB.
#pragma once

#include <ATen/ATen.h>

#include <cstddef>

namespace qadapter {

// An uninitialised contiguous CPU tensor like at::empty(sizes, options). On Linux, from 32 MiB up
// (where glibc's malloc maps fresh pages for every allocation anyway) its memory is 2 MiB-aligned
// with transparent huge pages requested (madvise; a no-op where THP is off): the first write of a
// fresh 4 KiB-paged dQ faults once per page, which on the development VM made a 131 MB dQ cost 8x
// its own streaming write. Even on huge pages the kernel zeroes fresh memory, a write pass of its
// own, so the last such block freed is kept (one, whatever its size, up to the limit below) and
// handed to the next request of the same rounded size, pages already written: a training loop asks
// for one dQ of the same size every step. A request of another size first returns the kept block to
// the system, so the process holds at most one block beyond what live tensors use
// (docs/DESIGN.md, "Memory traffic of the loss"). Elsewhere: at::empty.
at::Tensor empty_streaming_output(at::IntArrayRef sizes, const at::TensorOptions& options);

// The kept block, for qadapter_kernels.cached_memory_bytes() and friends: its size (0: none),
// returning it to the system (returns the bytes released), and the largest block that may be kept
// (0: never keep one; a kept block above a new limit is released at once).
size_t cached_output_bytes();
size_t release_cached_output();
void set_cached_output_limit(size_t bytes);
size_t cached_output_limit();

}  // namespace qadapter
