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
// order. The row's block maxima (blocks of 32, one vectorized pass) give a floor that at
// least k elements reach, and only the blocks that reach it are scanned (common.h's
// TopKByBlocks): their words above a running threshold are kept; when 2k are held,
// nth_element keeps the k largest and the threshold rises; the k survivors are sorted at
// the end. Rows are shared out to XLA's intra-op thread pool (common.h: claimed one at a
// time from a counter, so a helper that starts late finds nothing left and the caller
// never waits on a task that has not started).

#include <algorithm>
#include <climits>
#include <cstdint>
#include <vector>

#include "common.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kBlock = 32;  // elements per block maximum

ffi::Error TopKImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                    ffi::ResultBuffer<ffi::F32> values, ffi::ResultBuffer<ffi::S32> indices) {
  const int64_t n = x.dimensions().size() > 0 ? x.dimensions().back() : 0;
  const int64_t k = values->dimensions().back();
  if (auto error = jaxsample::CheckRows("jaxsample_topk", x.dimensions().size(), n, k)) {
    return *error;
  }
  const float* data = x.typed_data();
  float* value_data = values->typed_data();
  int32_t* index_data = indices->typed_data();
  struct Scratch {
    std::vector<int32_t> block_max;
    jaxsample::BlockScratch top;
  };
  jaxsample::ForEachRow<Scratch>(pool, x.element_count() / n, n, [=](int64_t row, Scratch& s) {
    const float* x = data + row * n;
    s.block_max.resize((n + kBlock - 1) / kBlock);
    jaxsample::BlockMaxKeys(x, n, kBlock, s.block_max.data());
    jaxsample::TopKByBlocks(x, n, k, s.block_max.data(), kBlock, s.top, value_data + row * k,
                            index_data + row * k);
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxsampleTopK, TopKImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::S32>>());
