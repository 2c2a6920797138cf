// Huge-page backed allocation for large kernel outputs, with the last freed block kept for the
// next output of the same size (see streaming_output.h for why).
#include "streaming_output.h"

#include <ATen/EmptyTensor.h>
#include <c10/core/Allocator.h>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include <atomic>
#include <cstdlib>
#include <mutex>
#include <new>
#include <utility>

namespace qadapter {
#if defined(__linux__)
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
  // see the default CPU allocator's: allocated when a tensor takes one, freed when it lets go,
  // whether or not the pages go back to the system.
  if (c10::memoryProfilingEnabled()) {
    const size_t total = allocated_bytes.load();
    c10::reportMemoryUsageToProfiler(data, delta, total, total, c10::Device(c10::kCPU));
  }
}

// The one block kept for reuse (nullptr: none), written pages and all, and the largest block that
// may be kept (set from Python at import: QADAPTER_OUTPUT_CACHE_MB).
std::mutex kept_mutex;
Block* kept = nullptr;
size_t kept_limit = size_t(1) << 30;

void release(Block* block) {
  if (block == nullptr) return;
  std::free(block->data);
  delete block;
}

void free_block(void* context) {
  auto* block = static_cast<Block*>(context);
  allocated_bytes -= block->bytes;
  report(block->data, -static_cast<int64_t>(block->bytes));
  Block* dropped = block;
  {
    std::lock_guard<std::mutex> lock(kept_mutex);
    if (block->bytes <= kept_limit) dropped = std::exchange(kept, block);
  }
  release(dropped);
}

Block* take_or_map(size_t bytes) {
  Block* dropped;
  {
    std::lock_guard<std::mutex> lock(kept_mutex);
    if (kept != nullptr && kept->bytes == bytes) {
      return std::exchange(kept, nullptr);
    }
    // Another size: the kept block goes back to the system before a new one is mapped, so the
    // process never holds more than it would without reuse plus one block.
    dropped = std::exchange(kept, nullptr);
  }
  release(dropped);
  void* data = nullptr;
  TORCH_CHECK(bytes == 0 || posix_memalign(&data, kHugePage, bytes) == 0,
              "qadapter: out of memory allocating ", bytes, " bytes");
  // A hint: where THP is off or no huge page is free, the kernel falls back to 4 KiB pages.
  if (bytes) madvise(data, bytes, MADV_HUGEPAGE);
  return new Block{data, bytes};
}

struct HugePageAllocator final : c10::Allocator {
  c10::DataPtr allocate(size_t n) override {
    Block* block = take_or_map((n + kHugePage - 1) / kHugePage * kHugePage);
    allocated_bytes += block->bytes;
    report(block->data, static_cast<int64_t>(block->bytes));
    return {block->data, block, &free_block, c10::Device(c10::kCPU)};
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

size_t cached_output_bytes() {
  std::lock_guard<std::mutex> lock(kept_mutex);
  return kept ? kept->bytes : 0;
}

size_t release_cached_output() {
  Block* dropped;
  {
    std::lock_guard<std::mutex> lock(kept_mutex);
    dropped = std::exchange(kept, nullptr);
  }
  const size_t bytes = dropped ? dropped->bytes : 0;
  release(dropped);
  return bytes;
}

void set_cached_output_limit(size_t bytes) {
  Block* dropped = nullptr;
  {
    std::lock_guard<std::mutex> lock(kept_mutex);
    kept_limit = bytes;
    if (kept != nullptr && kept->bytes > bytes) dropped = std::exchange(kept, nullptr);
  }
  release(dropped);
}

size_t cached_output_limit() {
  std::lock_guard<std::mutex> lock(kept_mutex);
  return kept_limit;
}

#else  // no madvise / huge pages to ask for: plain allocations, nothing kept

at::Tensor empty_streaming_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  return at::empty(sizes, options);
}
size_t cached_output_bytes() { return 0; }
size_t release_cached_output() { return 0; }
void set_cached_output_limit(size_t) {}
size_t cached_output_limit() { return 0; }

#endif

}  // namespace qadapter
