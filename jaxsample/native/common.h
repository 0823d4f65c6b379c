// Shared by jaxsample's CPU kernels (topk.cc, rows.cc): the total order of float32 values
// that lax.top_k uses, the threshold top-k, the operand checks, the sharing of a batch's
// rows with XLA's intra-op threads, and the instruction-set clones of the vectorized loops.
#ifndef JAXSAMPLE_NATIVE_COMMON_H_
#define JAXSAMPLE_NATIVE_COMMON_H_

#include <algorithm>
#include <atomic>
#include <climits>
#include <functional>
#include <cstdint>
#include <cstring>
#include <memory>
#include <optional>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "xla/ffi/api/ffi.h"

// The vectorized loops are compiled for AVX-512, AVX2 + FMA and the baseline, and the
// loader picks one for the machine (GCC on x86-64; other compilers and CPUs build the
// baseline only). The build turns off floating-point contraction and the loops use explicit
// fused multiply-adds only, so every clone gives the same bits.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define JAXSAMPLE_CLONES \
  __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define JAXSAMPLE_CLONES
#endif

namespace jaxsample {

// The order key of a float32: a signed integer that orders as lax.top_k orders the values
// (-0.0 just below +0.0; NaNs by their bits, beyond the infinities).
inline int32_t OrderKey(float value) {
  int32_t bits;
  std::memcpy(&bits, &value, sizeof(bits));
  return bits < 0 ? (bits ^ 0x7FFFFFFF) : bits;
}

// The float32 whose order key is key (OrderKey's inverse).
inline float FromOrderKey(int32_t key) {
  const int32_t bits = key < 0 ? (key ^ 0x7FFFFFFF) : key;
  float value;
  std::memcpy(&value, &bits, sizeof(value));
  return value;
}

// One 64-bit word per element: the order key (made unsigned), then the complement of the
// index, so all words of a row are distinct and sort descending in lax.top_k's order
// (equal values: the lower index first).
inline uint64_t Word(float value, uint32_t index) {
  const uint32_t unsigned_key = static_cast<uint32_t>(OrderKey(value)) ^ 0x80000000u;
  return (static_cast<uint64_t>(unsigned_key) << 32) | static_cast<uint32_t>(~index);
}

inline uint32_t WordIndex(uint64_t word) { return ~static_cast<uint32_t>(word & 0xFFFFFFFFu); }

// The order key of a word (Word's first half, signed again).
inline int32_t WordKey(uint64_t word) {
  return static_cast<int32_t>(static_cast<uint32_t>(word >> 32) ^ 0x80000000u);
}

// The k largest elements of a row of n in lax.top_k's order, into values[k], indices[k]
// (topk.cc's scan): a buffer keeps the words above a running threshold; when it holds 2k
// words, nth_element keeps the k largest and the threshold becomes the smallest of them;
// the survivors are sorted at the end. With block_max (the order-key maxima of the row's
// blocks of `block`), a block whose maximum cannot enter the buffer is skipped whole.
inline void TopKRow(const float* x, int64_t n, int64_t k, const int32_t* block_max,
                    int64_t block, std::vector<uint64_t>& buffer, float* values,
                    int32_t* indices) {
  buffer.clear();
  const size_t full = static_cast<size_t>(2 * k);
  bool bounded = false;
  uint64_t threshold = 0;
  if (block_max == nullptr) block = n;
  for (int64_t start = 0, b = 0; start < n; start += block, ++b) {
    // every element of the block has a key <= its maximum, and one equal to the
    // threshold's key comes after the threshold's element (a smaller word): none can enter
    if (bounded && block_max != nullptr && block_max[b] <= WordKey(threshold)) continue;
    const int64_t end = std::min(n, start + block);
    for (int64_t i = start; i < end; ++i) {
      const uint64_t word = Word(x[i], static_cast<uint32_t>(i));
      if (bounded && word <= threshold) continue;
      buffer.push_back(word);
      if (buffer.size() == full) {
        std::nth_element(buffer.begin(), buffer.begin() + (k - 1), buffer.end(),
                         std::greater<uint64_t>());
        buffer.resize(k);
        threshold = buffer[k - 1];
        bounded = true;
      }
    }
  }
  if (static_cast<int64_t>(buffer.size()) > k) {
    std::nth_element(buffer.begin(), buffer.begin() + (k - 1), buffer.end(),
                     std::greater<uint64_t>());
    buffer.resize(k);
  }
  std::sort(buffer.begin(), buffer.end(), std::greater<uint64_t>());
  for (int64_t j = 0; j < k; ++j) {
    indices[j] = static_cast<int32_t>(WordIndex(buffer[j]));
    values[j] = x[indices[j]];
  }
}

// The operand checks of a kernel that returns k elements of each row of n: an error naming
// the kernel when the operand has rank 0 or k is not in [1, n], or n is 2**31 or more.
inline std::optional<xla::ffi::Error> CheckRows(const char* kernel, size_t rank, int64_t n,
                                                int64_t k) {
  if (rank < 1) return xla::ffi::Error::InvalidArgument(std::string(kernel) + ": rank 0");
  if (k <= 0 || k > n || n > INT32_MAX) {
    return xla::ffi::Error::InvalidArgument(std::string(kernel) + ": need 0 < k <= n < 2**31");
  }
  return std::nullopt;
}

// Elements per helper thread below which sharing out the rows costs more than it saves.
constexpr int64_t kElementsPerHelper = 16384;

// Runs row_fn(row, scratch) for rows 0..rows-1, shared with the pool's threads: each thread
// claims the next row from a counter, so a helper that starts late finds nothing left and
// the caller never waits on a task that has not started. Scratch is per thread.
template <typename Scratch, typename RowFn>
void ForEachRow(xla::ffi::ThreadPool& pool, int64_t rows, int64_t row_length, RowFn row_fn) {
  struct Shared {
    std::atomic<int64_t> next{0};
    std::atomic<int64_t> done{0};
  };
  auto shared = std::make_shared<Shared>();
  auto run = [shared, rows, row_fn]() {
    Scratch scratch;
    for (;;) {
      const int64_t row = shared->next.fetch_add(1, std::memory_order_relaxed);
      if (row >= rows) return;
      row_fn(row, scratch);
      shared->done.fetch_add(1, std::memory_order_release);
    }
  };
  const int64_t helpers = std::min<int64_t>({static_cast<int64_t>(pool.num_threads()), rows - 1,
                                             rows * row_length / kElementsPerHelper});
  for (int64_t h = 0; h < helpers; ++h) {
    auto task = run;
    pool.Schedule(std::move(task));
  }
  run();
  // Only rows a running helper has claimed can be outstanding here.
  while (shared->done.load(std::memory_order_acquire) < rows) std::this_thread::yield();
}

}  // namespace jaxsample

#endif  // JAXSAMPLE_NATIVE_COMMON_H_
