// jaxsample's row reductions for XLA's CPU backend (XLA FFI handlers).
//
// JaxsampleBlockMax: the maximum of each block of `block` elements of every row (the last
// axis; the last block may be shorter), in lax.top_k's order of values (common.h's order
// key: +0.0 above -0.0, NaNs beyond the infinities, by their bits).
//
// JaxsampleLogSumExpTopK: for every row of float32 logits, lse = log(sum(exp(x))) and the k
// largest values with their indices in lax.top_k's order (ties by the lower index). NaN
// counts as -inf and +inf as the largest finite float, as transforms.sanitize does; a row
// of -inf only has lse = -inf. Per row:
//  1. one pass (vectorized, blocks of 64): the block maxima and sum(exp(x - max)) against
//     the running maximum, each term rounded to float32 and added in double precision to
//     one of 64 lanes, the lanes rescaled when the maximum rises (MaxAndSumExp). Every step
//     depends on the row alone, so a row's bits do not depend on the batch;
//     lse = max + log(sum), rounded once to float32;
//  2. the top k from the block maxima (common.h's TopKByBlocks; the row is in cache).
// exp is a Cody-Waite range reduction and Cephes's polynomial (about 1 ulp); a term below
// exp(-87) counts as 0 (together at most 1e-33 of the sum, which is at least 1).
//
// JaxsampleCandidates: the sampler's first candidate selection, for rows without NaN or
// +inf: the block maxima of `block` (as JaxsampleBlockMax), the k largest (TopKByBlocks)
// and, with the attribute `total`, sum(exp(x - max)) from the same pass (MaxAndSumExp's sum
// with the maxima of blocks of 32), else NaN.
//
// jaxsample/native/__init__.py builds this file with topk.cc on first use;
// tests/test_native.py checks both against float64 and lax.top_k.

#include <algorithm>
#include <functional>
#include <climits>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "common.h"

namespace ffi = xla::ffi;

namespace {

using jaxsample::FromOrderKey;
using jaxsample::OrderKey;

// Elements per block of the logsumexp kernel's first pass, and lanes of its sum.
constexpr int64_t kBlock = 64;
constexpr float kFloatMax = std::numeric_limits<float>::max();

inline float Sanitize(float v) { return std::isnan(v) ? -INFINITY : std::min(v, kFloatMax); }

// The largest and smallest order key of len elements (kFixed > 0: len is kFixed, a fixed
// trip count that vectorizes).
template <int64_t kFixed>
inline void KeyMaxMin(const float* x, int64_t len, int32_t* max, int32_t* min) {
  if (kFixed > 0) len = kFixed;
  int32_t m = INT32_MIN, l = INT32_MAX;
  for (int64_t j = 0; j < len; ++j) {
    int32_t bits;
    std::memcpy(&bits, x + j, sizeof(bits));
    const int32_t key = bits < 0 ? (bits ^ 0x7FFFFFFF) : bits;
    m = m > key ? m : key;
    l = l < key ? l : key;
  }
  *max = m;
  *min = l;
}

// The maximum of each block of `block` elements of a row of n (the last block may be
// shorter) in the order of OrderKey, into out[ceil(n / block)]: the values (Out = float)
// or their order keys (Out = int32_t).
template <int64_t kFixed, typename Out>
inline void BlockMaxRow(const float* x, int64_t n, int64_t block, Out* out) {
  int32_t m, l;
  int64_t start = 0, b = 0;
  auto put = [](int32_t key) -> Out {
    if constexpr (std::is_same_v<Out, float>) {
      return FromOrderKey(key);
    } else {
      return key;
    }
  };
  for (; start + block <= n; start += block, ++b) {
    KeyMaxMin<kFixed>(x + start, block, &m, &l);
    out[b] = put(m);
  }
  if (start < n) {
    KeyMaxMin<0>(x + start, n - start, &m, &l);
    out[b] = put(m);
  }
}

JAXSAMPLE_CLONES
void BlockMax(const float* x, int64_t n, int64_t block, float* out) {
  if (block == 32) return BlockMaxRow<32>(x, n, block, out);  // transforms.CANDIDATE_BLOCK
  BlockMaxRow<0>(x, n, block, out);
}


// exp(t) for t <= 0, -inf included; 0 below -87.
inline float ExpNonPositive(float t) {
  const float c = t < -87.0f ? -87.0f : t;
  const float n = (c * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  // round(c / ln 2)
  float r = std::fma(n, -0.693145751953125f, c);  // ln 2, high part (n * it is exact)
  r = std::fma(n, -1.428606765330187e-06f, r);     // ln 2, low part
  float p = std::fma(1.9875691500e-4f, r, 1.3981999507e-3f);
  p = std::fma(p, r, 8.3334519073e-3f);
  p = std::fma(p, r, 4.1665795894e-2f);
  p = std::fma(p, r, 1.6666665459e-1f);
  p = std::fma(p, r, 5.0000001201e-1f);
  p = std::fma(p, r * r, r) + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;  // 2^n, n >= -126
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return t < -87.0f ? 0.0f : p * scale;
}

// One pass over a row: the order-key maxima of its blocks of kSub (a divisor of kBlock;
// into block_max, the last block may be shorter), its smallest and largest keys (lo, hi),
// and sum(exp(x - top)) with top = the row's maximum (0 for a row of -inf only), returned
// with top in *top. The sum runs against the running maximum of the blocks of kBlock so
// far: each term is exp(x - running max) rounded to float32 and added to its lane (lane j:
// elements j, j + 64, ... of the row) in double precision; when a block raises the running
// maximum, the lanes are first scaled by exp(old - new) in double precision. At the end the
// lanes are added pairwise. Every step depends on the row alone, and the sum does not
// depend on kSub.
// (always inlined: it must be compiled for each instruction-set clone that calls it, or its
// fused multiply-adds become library calls)
template <int64_t kSub>
__attribute__((always_inline)) inline double MaxAndSumExpRow(const float* x, int64_t n, int32_t* block_max, int32_t* lo,
                              int32_t* hi, float* top) {
  static_assert(kBlock % kSub == 0, "kSub must divide kBlock");
  double lanes[kBlock];
  float terms[kBlock];
  for (int64_t j = 0; j < kBlock; ++j) lanes[j] = 0.0;
  int32_t row_lo = INT32_MAX, row_hi = INT32_MIN;
  float shift = -INFINITY;  // the running maximum
  for (int64_t start = 0; start < n; start += kBlock) {
    const int64_t len = std::min(kBlock, n - start);
    int32_t m = INT32_MIN, l = INT32_MAX;
    for (int64_t off = 0; off < len; off += kSub) {
      int32_t sub_max, sub_min;
      if (off + kSub <= len) {
        KeyMaxMin<kSub>(x + start + off, kSub, &sub_max, &sub_min);
      } else {
        KeyMaxMin<0>(x + start + off, len - off, &sub_max, &sub_min);
      }
      block_max[(start + off) / kSub] = sub_max;
      m = m > sub_max ? m : sub_max;
      l = l < sub_min ? l : sub_min;
    }
    row_lo = row_lo < l ? row_lo : l;
    if (m > row_hi) {
      row_hi = m;
      const float block_top = FromOrderKey(m);
      if (block_top > shift) {
        if (shift != -INFINITY) {
          const double scale = std::exp(static_cast<double>(shift) - block_top);
          for (int64_t j = 0; j < kBlock; ++j) lanes[j] *= scale;
        }
        shift = block_top;
      }
    }
    const float s = shift == -INFINITY ? 0.0f : shift;
    if (len == kBlock) {
      for (int64_t j = 0; j < kBlock; ++j) terms[j] = ExpNonPositive(x[start + j] - s);
      for (int64_t j = 0; j < kBlock; ++j) lanes[j] += terms[j];
    } else {
      for (int64_t j = 0; j < len; ++j) lanes[j] += ExpNonPositive(x[start + j] - s);
    }
  }
  for (int64_t width = kBlock / 2; width >= 1; width /= 2) {
    for (int64_t j = 0; j < width; ++j) lanes[j] += lanes[j + width];
  }
  *lo = row_lo;
  *hi = row_hi;
  *top = shift == -INFINITY ? 0.0f : shift;
  return lanes[0];
}

JAXSAMPLE_CLONES
double MaxAndSumExp(const float* x, int64_t n, int32_t* block_max, int32_t* lo, int32_t* hi,
                    float* top) {
  return MaxAndSumExpRow<kBlock>(x, n, block_max, lo, hi, top);
}

// MaxAndSumExp with the maxima of blocks of 32 (transforms.CANDIDATE_BLOCK): the same sum.
JAXSAMPLE_CLONES
double MaxAndSumExp32(const float* x, int64_t n, int32_t* block_max, int32_t* lo, int32_t* hi,
                      float* top) {
  return MaxAndSumExpRow<32>(x, n, block_max, lo, hi, top);
}

struct Scratch {
  std::vector<int32_t> block_max;
  std::vector<int32_t> keys;
  std::vector<float> clean;
  jaxsample::BlockScratch top;
};

void LogSumExpTopKRow(const float* x, int64_t n, int64_t k, float* lse, float* values,
                      int32_t* indices, Scratch& s) {
  s.block_max.resize((n + kBlock - 1) / kBlock);
  int32_t lo, hi;
  float top;
  double sum = MaxAndSumExp(x, n, s.block_max.data(), &lo, &hi, &top);
  if (hi >= OrderKey(INFINITY) || lo < OrderKey(-INFINITY)) {  // a NaN or +inf: sanitize
    s.clean.resize(n);
    for (int64_t i = 0; i < n; ++i) s.clean[i] = Sanitize(x[i]);
    x = s.clean.data();
    sum = MaxAndSumExp(x, n, s.block_max.data(), &lo, &hi, &top);
  }
  *lse = static_cast<float>(static_cast<double>(top) + std::log(sum));
  jaxsample::TopKByBlocks(x, n, k, s.block_max.data(), kBlock, s.top, values, indices);
}

ffi::Error LogSumExpTopKImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                             ffi::ResultBuffer<ffi::F32> lse, ffi::ResultBuffer<ffi::F32> values,
                             ffi::ResultBuffer<ffi::S32> indices) {
  const int64_t n = x.dimensions().size() > 0 ? x.dimensions().back() : 0;
  const int64_t k = values->dimensions().back();
  const char* kernel = "jaxsample_logsumexp_top_k";
  if (auto error = jaxsample::CheckRows(kernel, x.dimensions().size(), n, k)) {
    return *error;
  }
  const float* data = x.typed_data();
  float* lse_data = lse->typed_data();
  float* value_data = values->typed_data();
  int32_t* index_data = indices->typed_data();
  jaxsample::ForEachRow<Scratch>(pool, x.element_count() / n, n, [=](int64_t row, Scratch& s) {
    LogSumExpTopKRow(data + row * n, n, k, lse_data + row, value_data + row * k,
                     index_data + row * k, s);
  });
  return ffi::Error::Success();
}

// The candidates of one row of n (no NaN): the block maxima (blocks of `block`) into
// block_max, the k largest values and their indices (common.h's TopKByBlocks, from the
// block maxima), and with `with_total` the sum of exp(x - max x) into *total (else NaN),
// in the same pass as the block maxima (MaxAndSumExp's sum, to about 1 ulp).
void CandidatesRow(const float* x, int64_t n, int64_t k, int64_t block, bool with_total,
                   float* block_max, float* values, int32_t* indices, float* total,
                   Scratch& s) {
  const int64_t blocks = (n + block - 1) / block;
  s.block_max.resize(blocks);
  int32_t* keys = s.block_max.data();
  if (with_total && block == 32) {
    int32_t lo, hi;
    float top;
    *total = static_cast<float>(MaxAndSumExp32(x, n, keys, &lo, &hi, &top));
  } else {
    jaxsample::BlockMaxKeys(x, n, block, keys);
    if (with_total) {
      int32_t lo, hi;
      float top;
      s.keys.resize((n + kBlock - 1) / kBlock);
      *total = static_cast<float>(MaxAndSumExp(x, n, s.keys.data(), &lo, &hi, &top));
    } else {
      *total = std::numeric_limits<float>::quiet_NaN();
    }
  }
  for (int64_t b = 0; b < blocks; ++b) block_max[b] = FromOrderKey(keys[b]);
  jaxsample::TopKByBlocks(x, n, k, keys, block, s.top, values, indices);
}

ffi::Error CandidatesImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                          ffi::ResultBuffer<ffi::F32> block_max, ffi::ResultBuffer<ffi::F32> values,
                          ffi::ResultBuffer<ffi::S32> indices, ffi::ResultBuffer<ffi::F32> total,
                          int64_t block, bool with_total) {
  const int64_t n = x.dimensions().size() > 0 ? x.dimensions().back() : 0;
  const int64_t k = values->dimensions().back();
  const char* kernel = "jaxsample_candidates";
  if (auto error = jaxsample::CheckRows(kernel, x.dimensions().size(), n, k)) {
    return *error;
  }
  const int64_t blocks = block_max->dimensions().back();
  if (block <= 0 || blocks != (n + block - 1) / block) {
    return ffi::Error::InvalidArgument("jaxsample_candidates: need ceil(n / block) maxima");
  }
  const float* data = x.typed_data();
  float* max_data = block_max->typed_data();
  float* value_data = values->typed_data();
  int32_t* index_data = indices->typed_data();
  float* total_data = total->typed_data();
  jaxsample::ForEachRow<Scratch>(pool, x.element_count() / n, n, [=](int64_t row, Scratch& s) {
    CandidatesRow(data + row * n, n, k, block, with_total, max_data + row * blocks,
                  value_data + row * k, index_data + row * k, total_data + row, s);
  });
  return ffi::Error::Success();
}

ffi::Error BlockMaxImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                        ffi::ResultBuffer<ffi::F32> out, int64_t block) {
  const auto dims = x.dimensions();
  if (dims.size() < 1) return ffi::Error::InvalidArgument("jaxsample_block_max: rank 0");
  const int64_t n = dims.back();
  const int64_t blocks = out->dimensions().back();
  if (n <= 0 || block <= 0 || blocks != (n + block - 1) / block) {
    return ffi::Error::InvalidArgument("jaxsample_block_max: need ceil(n / block) outputs");
  }
  const float* data = x.typed_data();
  float* out_data = out->typed_data();
  struct None {};
  jaxsample::ForEachRow<None>(pool, x.element_count() / n, n, [=](int64_t row, None&) {
    BlockMax(data + row * n, n, block, out_data + row * blocks);
  });
  return ffi::Error::Success();
}

}  // namespace

namespace jaxsample {

JAXSAMPLE_CLONES
void BlockMaxKeys(const float* x, int64_t n, int64_t block, int32_t* out) {
  if (block == 32) return BlockMaxRow<32>(x, n, block, out);  // transforms.CANDIDATE_BLOCK
  BlockMaxRow<0>(x, n, block, out);
}

}  // namespace jaxsample

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxsampleLogSumExpTopK, LogSumExpTopKImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::S32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxsampleBlockMax, BlockMaxImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("block"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxsampleCandidates, CandidatesImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("block")
                                  .Attr<bool>("total"));
