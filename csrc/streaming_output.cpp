// Huge-page backed allocation for large kernel outputs (see streaming_output.h for why).
#include "streaming_output.h"

#include <ATen/EmptyTensor.h>
#include <c10/core/Allocator.h>
#include <sys/mman.h>

#include <atomic>
#include <cstdlib>
#include <new>

namespace qadapter {
namespace {

constexpr size_t kHugePage = size_t(2) << 20;
constexpr size_t kLargeOutput = size_t(32) << 20;  // glibc's largest dynamic mmap threshold (64-bit)

// What the deleter needs: the block and its size, to report the free to the memory profiler.
struct Block {
  void* data;
  size_t bytes;
};

std::atomic<size_t> allocated_bytes{0};

void report(void* data, int64_t delta) {
  // The profiler's memory records (benchmarks' peak-memory figures) see these blocks as they
  // see the default CPU allocator's.
  if (c10::memoryProfilingEnabled()) {
    const size_t total = allocated_bytes.load();
    c10::reportMemoryUsageToProfiler(data, delta, total, total, c10::Device(c10::kCPU));
  }
}

void free_block(void* context) {
  auto* block = static_cast<Block*>(context);
  allocated_bytes -= block->bytes;
  report(block->data, -static_cast<int64_t>(block->bytes));
  std::free(block->data);
  delete block;
}

struct HugePageAllocator final : c10::Allocator {
  c10::DataPtr allocate(size_t n) override {
    const size_t bytes = (n + kHugePage - 1) / kHugePage * kHugePage;
    void* data = nullptr;
    TORCH_CHECK(bytes == 0 || posix_memalign(&data, kHugePage, bytes) == 0,
                "qadapter: out of memory allocating ", n, " bytes");
    // A hint: where THP is off or no huge page is free, the kernel falls back to 4 KiB pages.
    if (bytes) madvise(data, bytes, MADV_HUGEPAGE);
    auto* block = new Block{data, bytes};
    allocated_bytes += bytes;
    report(data, static_cast<int64_t>(bytes));
    return {data, block, &free_block, c10::Device(c10::kCPU)};
  }
  void copy_data(void* dest, const void* src, size_t count) const override { default_copy_data(dest, src, count); }
};

}  // namespace

at::Tensor empty_streaming_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  TORCH_INTERNAL_ASSERT(options.device().is_cpu());
  const size_t bytes = static_cast<size_t>(c10::multiply_integers(sizes)) * options.dtype().itemsize();
  if (bytes < kLargeOutput) return at::empty(sizes, options);
  static HugePageAllocator allocator;
  return at::detail::empty_generic(sizes, &allocator, c10::DispatchKeySet(c10::DispatchKey::CPU),
                                   c10::typeMetaToScalarType(options.dtype()), c10::MemoryFormat::Contiguous);
}

}  // namespace qadapter
