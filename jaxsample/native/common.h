// Shared by jaxsample's CPU kernels (topk.cc, rows.cc): the total order of float32 values
// that lax.top_k uses, the top-k from block maxima, the operand checks, the sharing of a
// batch's rows with XLA's intra-op threads, and the instruction-set clones of the vectorized
// loops.
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
// baseline only; -DJAXSAMPLE_NO_CLONES builds one version, for -march, to compare the
// clones' bits). The build turns off floating-point contraction and the loops use explicit
// fused multiply-adds only, so every clone gives the same bits.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && \
    !defined(JAXSAMPLE_NO_CLONES)
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

// Sorts `count` words in descending order: a least-significant-digit radix sort on bytes
// (stable, each byte's buckets from the largest), skipping the bytes that are the same in
// every word, through `spare` (room for `count` words). No comparison branches: for the
// thousand words of a large k, about four times faster than std::sort here.
inline void RadixSortDescending(uint64_t* words, int64_t count, uint64_t* spare) {
  uint64_t all_ones = ~uint64_t{0}, any_ones = 0;
  for (int64_t i = 0; i < count; ++i) {
    all_ones &= words[i];
    any_ones |= words[i];
  }
  const uint64_t varying = all_ones ^ any_ones;
  uint64_t* from = words;
  uint64_t* to = spare;
  for (int shift = 0; shift < 64; shift += 8) {
    if (((varying >> shift) & 0xFF) == 0) continue;
    int64_t start[256] = {0};
    for (int64_t i = 0; i < count; ++i) ++start[255 - ((from[i] >> shift) & 0xFF)];
    int64_t total = 0;
    for (int64_t& bucket : start) {
      const int64_t size = bucket;
      bucket = total;
      total += size;
    }
    for (int64_t i = 0; i < count; ++i) to[start[255 - ((from[i] >> shift) & 0xFF)]++] = from[i];
    std::swap(from, to);
  }
  if (from != words) std::memcpy(words, from, count * sizeof(uint64_t));
}

// Words at and above which FinishTopK radix-sorts them all instead of nth_element and a
// comparison sort of the k largest.
constexpr int64_t kRadixFrom = 512;

// The k largest of the `count` words at `words` into values[k], indices[k] (x: the row),
// in lax.top_k's order; `spare` has room for `count` words.
inline void FinishTopK(uint64_t* words, int64_t count, int64_t k, const float* x,
                       float* values, int32_t* indices, uint64_t* spare) {
  if (count >= kRadixFrom) {
    RadixSortDescending(words, count, spare);
  } else {
    if (count > k) {
      std::nth_element(words, words + (k - 1), words + count, std::greater<uint64_t>());
    }
    std::sort(words, words + k, std::greater<uint64_t>());
  }
  for (int64_t j = 0; j < k; ++j) {
    indices[j] = static_cast<int32_t>(WordIndex(words[j]));
    values[j] = x[indices[j]];
  }
}

// The order-key maxima of the blocks of `block` elements of a row of n (the last block may
// be shorter) into out[ceil(n / block)] (rows.cc, vectorized).
void BlockMaxKeys(const float* x, int64_t n, int64_t block, int32_t* out);

// The scratch of TopKByBlocks.
struct BlockScratch {
  std::vector<int32_t> chosen;
  std::vector<uint64_t> words;
  std::vector<uint64_t> spare;
};

// The largest order key with at least k of the `blocks` keys at or above it, or one a little
// below it: a bisection over the keys that stops once between k and 5k/4 keys reach it
// (INT32_MIN when there are at most k keys). Given the row's block maxima, at least k
// elements reach it, so it is at most the row's k-th largest key.
inline int32_t BlockFloor(const int32_t* keys, int64_t blocks, int64_t k) {
  if (blocks <= k) return INT32_MIN;
  int32_t lo = INT32_MAX, hi = INT32_MIN;
  for (int64_t b = 0; b < blocks; ++b) {
    lo = lo < keys[b] ? lo : keys[b];
    hi = hi > keys[b] ? hi : keys[b];
  }
  int64_t reached = lo, missed = static_cast<int64_t>(hi) + 1;  // >= k keys / fewer than k
  while (reached + 1 < missed) {
    const int32_t mid = static_cast<int32_t>(reached + (missed - reached) / 2);
    int64_t count = 0;
    for (int64_t b = 0; b < blocks; ++b) count += keys[b] >= mid;
    if (count < k) {
      missed = mid;
    } else {
      reached = mid;
      if (count <= k + k / 4) break;
    }
  }
  return static_cast<int32_t>(reached);
}

// The k largest elements of a row of n in lax.top_k's order, into values[k], indices[k],
// given block_max: the order-key maxima of the row's blocks of `block`.
// BlockFloor gives a key that at least k elements reach, so only the blocks whose maximum
// reaches it are read, in order; each block's words above the running threshold are
// appended without a branch per element, and when 2k are held nth_element keeps the k
// largest and the threshold rises to the smallest of them (a block whose maximum cannot beat
// it is then skipped whole). A row of equal values reads about 2k elements.
inline void TopKByBlocks(const float* x, int64_t n, int64_t k, const int32_t* block_max,
                         int64_t block, BlockScratch& s, float* values, int32_t* indices) {
  const int64_t blocks = (n + block - 1) / block;
  const int32_t floor_key = BlockFloor(block_max, blocks, k);
  s.chosen.resize(blocks);
  int64_t chosen = 0;
  for (int64_t b = 0; b < blocks; ++b) {
    s.chosen[chosen] = static_cast<int32_t>(b);
    chosen += block_max[b] >= floor_key;
  }
  s.words.resize(2 * k + block);
  uint64_t* words = s.words.data();
  // The largest word below every word whose key reaches the floor (0 for no floor: every
  // word is above it, since no index is 2**32 - 1).
  uint64_t threshold =
      floor_key > INT32_MIN
          ? (static_cast<uint64_t>(static_cast<uint32_t>(floor_key) ^ 0x80000000u) << 32) - 1
          : 0;
  int64_t count = 0;
  for (int64_t c = 0; c < chosen; ++c) {
    const int64_t b = s.chosen[c];
    // Every element of the block has a key <= its maximum. Below the threshold's key none
    // can enter; at it, none either: the threshold is the floor's (every word of that key
    // is above it, but the key is floor - 1) or an earlier element's (every later one of
    // the same key has a smaller word).
    if (threshold != 0 && block_max[b] <= WordKey(threshold)) continue;
    const int64_t start = b * block;
    const int64_t len = std::min(block, n - start);
    for (int64_t j = 0; j < len; ++j) {
      const uint64_t word = Word(x[start + j], static_cast<uint32_t>(start + j));
      words[count] = word;
      count += word > threshold;
    }
    if (count >= 2 * k) {
      std::nth_element(words, words + (k - 1), words + count, std::greater<uint64_t>());
      count = k;
      threshold = words[k - 1];
    }
  }
  s.spare.resize(count);
  FinishTopK(words, count, k, x, values, indices, s.spare.data());
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
