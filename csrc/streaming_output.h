// Fresh [N, V] kernel outputs (the loss's dQ: hundreds of MiB) without a page fault per 4 KiB.
#pragma once

#include <ATen/ATen.h>

namespace qadapter {

// An uninitialised contiguous CPU tensor like at::empty(sizes, options). From 32 MiB up (where
// glibc's malloc maps fresh pages for every allocation anyway) its memory is 2 MiB-aligned with
// transparent huge pages requested (madvise; a no-op where THP is off): the first write of a fresh
// 4 KiB-paged dQ faults once per page, which on the development VM made a 131 MB dQ cost 8x its
// own streaming write (docs/DESIGN.md, "Memory traffic of the loss").
at::Tensor empty_streaming_output(at::IntArrayRef sizes, const at::TensorOptions& options);

}  // namespace qadapter
