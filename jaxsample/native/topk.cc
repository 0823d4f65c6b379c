// jaxsample's exact top-k for XLA's CPU backend (an XLA FFI handler).
//
// Same contract as lax.top_k on float32: for every row (the last axis) the k largest
// values in descending order and their indices, ties by the lower index, values ordered by
// the integer key of their bits (so -0.0 sorts just below +0.0 and NaNs by their bits, as
// XLA's own TopK does). jaxsample/native/__init__.py builds this file on first use and
// checks it against lax.top_k in tests/test_native.py.
//
// Per row: each element becomes one 64-bit word, (order key of the value, complement of the
// index), so all words are distinct and their descending order is exactly the result's
// order. A scan keeps a buffer of candidate words above a running threshold: when the buffer
// holds 2k words, nth_element keeps the k largest and the threshold becomes the smallest of
// them. Most elements are rejected by one comparison; the k survivors are sorted at the end.
// Rows are shared out to XLA's intra-op thread pool (claimed one at a time from a counter,
// so a helper that starts late finds nothing left and the caller never waits on a task that
// has not started).

#include <algorithm>
#include <atomic>
#include <climits>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

inline uint64_t Word(float value, uint32_t index) {
  int32_t bits;
  std::memcpy(&bits, &value, sizeof(bits));
  const int32_t key = bits < 0 ? (bits ^ 0x7FFFFFFF) : bits;
  const uint32_t unsigned_key = static_cast<uint32_t>(key) ^ 0x80000000u;
  return (static_cast<uint64_t>(unsigned_key) << 32) | static_cast<uint32_t>(~index);
}

void TopKRow(const float* x, int64_t n, int64_t k, float* out_values, int32_t* out_indices,
             std::vector<uint64_t>& buffer) {
  buffer.clear();
  const size_t full = static_cast<size_t>(2 * k);
  bool bounded = false;
  uint64_t threshold = 0;
  for (int64_t i = 0; i < n; ++i) {
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
  if (static_cast<int64_t>(buffer.size()) > k) {
    std::nth_element(buffer.begin(), buffer.begin() + (k - 1), buffer.end(),
                     std::greater<uint64_t>());
    buffer.resize(k);
  }
  std::sort(buffer.begin(), buffer.end(), std::greater<uint64_t>());
  for (int64_t j = 0; j < k; ++j) {
    const uint32_t index = ~static_cast<uint32_t>(buffer[j] & 0xFFFFFFFFu);
    out_indices[j] = static_cast<int32_t>(index);
    out_values[j] = x[index];
  }
}

struct Work {
  const float* x = nullptr;
  float* values = nullptr;
  int32_t* indices = nullptr;
  int64_t rows = 0;
  int64_t n = 0;
  int64_t k = 0;
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};
};

void RunRows(Work* work) {
  std::vector<uint64_t> buffer;
  buffer.reserve(2 * work->k);
  for (;;) {
    const int64_t row = work->next.fetch_add(1, std::memory_order_relaxed);
    if (row >= work->rows) return;
    TopKRow(work->x + row * work->n, work->n, work->k, work->values + row * work->k,
            work->indices + row * work->k, buffer);
    work->done.fetch_add(1, std::memory_order_release);
  }
}

// Elements per helper thread below which sharing out the rows costs more than it saves.
constexpr int64_t kElementsPerHelper = 16384;

ffi::Error TopKImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                    ffi::ResultBuffer<ffi::F32> values, ffi::ResultBuffer<ffi::S32> indices) {
  const auto dims = x.dimensions();
  if (dims.size() < 1) return ffi::Error::InvalidArgument("jaxsample_topk: a rank-0 operand");
  const int64_t n = dims.back();
  const int64_t k = values->dimensions().back();
  if (k <= 0 || k > n || n > INT32_MAX) {
    return ffi::Error::InvalidArgument("jaxsample_topk: need 0 < k <= n < 2**31");
  }
  auto work = std::make_shared<Work>();
  work->x = x.typed_data();
  work->values = values->typed_data();
  work->indices = indices->typed_data();
  work->rows = x.element_count() / n;
  work->n = n;
  work->k = k;
  const int64_t helpers = std::min<int64_t>(
      {pool.num_threads(), work->rows - 1, work->rows * n / kElementsPerHelper});
  for (int64_t h = 0; h < helpers; ++h) pool.Schedule([work] { RunRows(work.get()); });
  RunRows(work.get());
  // Only rows a running helper has claimed can be outstanding here.
  while (work->done.load(std::memory_order_acquire) < work->rows) std::this_thread::yield();
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxsampleTopK, TopKImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::S32>>());
