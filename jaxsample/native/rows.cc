// jaxsample's row reductions for XLA's CPU backend (XLA FFI handlers).
//
// JaxsampleBlockMax: the maximum of each block of `block` elements of every row (the last
// axis; the last block may be shorter), in lax.top_k's order of values (common.h's order
// key: +0.0 above -0.0, NaNs beyond the infinities, by their bits).
//
// JaxsampleLogTotalTopK: for every row of float32 logits, log_total = log(sum(exp(x - max x)))
// and the k largest values with their indices in lax.top_k's order (ties by the lower
// index). NaN counts as -inf and +inf as the largest finite float, as transforms.sanitize
// does; a row of -inf only has log_total = -inf. The raw log softmax is then
// (x - max) - log_total, exact to float32 whatever the size of the max (max + log_total
// rounded to float32 loses log_total's digits once |max| is large). Per row:
//  1. one pass (vectorized, blocks of 64): the block maxima and sum(exp(x - max)) against
//     the running maximum, each term rounded to float32 and added in double precision to
//     one of 64 lanes, the lanes rescaled when the maximum rises (MaxAndSumExp). Every step
//     depends on the row alone, so a row's bits do not depend on the batch;
//     log_total = log(sum), rounded once to float32;
//  2. the top k from the block maxima (common.h's TopKByBlocks; the row is in cache).
// exp is a Cody-Waite range reduction and Cephes's polynomial (about 1 ulp); a term below
// exp(-87) counts as 0 (together at most 1e-33 of the sum, which is at least 1).
//
// JaxsampleCandidates: the sampler's first candidate selection, for rows without NaN or
// +inf: the block maxima of `block` (as JaxsampleBlockMax), the k largest (TopKByBlocks)
// and, with the attribute `total`, sum(exp(x - max)) from the same pass (MaxAndSumExp's sum
// with the maxima of blocks of 32), else NaN.
//
// JaxsampleMassThreshold: per row, the largest value t of x (finite or -inf) with
// sum(a[x >= t]) >= target (MassThresholdRow), or -inf when the row's `run` is false.
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

// Elements per block of the log-total kernel's first pass, and lanes of its sum.
constexpr int64_t kBlock = 64;
constexpr float kFloatMax = std::numeric_limits<float>::max();

// NaN -> -inf, +inf -> the largest float, every other value's bits unchanged (on integers:
// a float min would read a subnormal as zero where XLA's threads flush denormals).
inline float Sanitize(float v) {
  int32_t bits;
  std::memcpy(&bits, &v, sizeof(bits));
  if ((bits & 0x7FFFFFFF) > 0x7F800000) return -INFINITY;  // NaN, either sign
  if (bits == 0x7F800000) return kFloatMax;                // +inf
  return v;
}

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
__attribute__((always_inline)) inline double MaxAndSumExpRow(const float* x, int64_t n,
                                                             int32_t* block_max, int32_t* lo,
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

void LogTotalTopKRow(const float* x, int64_t n, int64_t k, float* log_total, float* values,
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
  *log_total = static_cast<float>(std::log(sum));
  jaxsample::TopKByBlocks(x, n, k, s.block_max.data(), kBlock, s.top, values, indices);
}

ffi::Error LogTotalTopKImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                            ffi::ResultBuffer<ffi::F32> log_total,
                            ffi::ResultBuffer<ffi::F32> values,
                            ffi::ResultBuffer<ffi::S32> indices) {
  const int64_t n = x.dimensions().size() > 0 ? x.dimensions().back() : 0;
  const int64_t k = values->dimensions().back();
  const char* kernel = "jaxsample_log_total_top_k";
  if (auto error = jaxsample::CheckRows(kernel, x.dimensions().size(), n, k)) {
    return *error;
  }
  const float* data = x.typed_data();
  float* log_total_data = log_total->typed_data();
  float* value_data = values->typed_data();
  int32_t* index_data = indices->typed_data();
  jaxsample::ForEachRow<Scratch>(pool, x.element_count() / n, n, [=](int64_t row, Scratch& s) {
    LogTotalTopKRow(data + row * n, n, k, log_total_data + row, value_data + row * k,
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
  int32_t lo, hi;  // (unused: the rows hold no NaN)
  float top;
  *total = std::numeric_limits<float>::quiet_NaN();
  if (with_total && block == 32) {  // the block maxima from the sum's pass
    *total = static_cast<float>(MaxAndSumExp32(x, n, keys, &lo, &hi, &top));
  } else {
    jaxsample::BlockMaxKeys(x, n, block, keys);
    if (with_total) {
      s.keys.resize((n + kBlock - 1) / kBlock);
      *total = static_cast<float>(MaxAndSumExp(x, n, s.keys.data(), &lo, &hi, &top));
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

// Eight-lane vectors (GCC's vector extensions: one register or several, whatever the
// instruction-set clone has).
typedef int32_t V8i __attribute__((vector_size(32)));
typedef float V8f __attribute__((vector_size(32)));
typedef int64_t V8l __attribute__((vector_size(64)));
typedef double V8d __attribute__((vector_size(64)));

// The order keys of eight float32 values (or eight keys, Value = int32_t), from memory.
template <typename Value>
__attribute__((always_inline)) inline V8i Keys8(const Value* x) {
  V8i bits;
  std::memcpy(&bits, x, sizeof(bits));
  if constexpr (std::is_same_v<Value, float>) {
    return bits ^ ((bits >> 31) & 0x7FFFFFFF);  // OrderKey, lane by lane
  } else {
    return bits;
  }
}

// Lane by lane, a where mask (all ones) holds, else b.
__attribute__((always_inline)) inline V8i Select8(V8i mask, V8i a, V8i b) {
  return (a & mask) | (b & ~mask);
}

// Adds the eight lanes (pairwise) to *amount and *count.
__attribute__((always_inline)) inline void AddLanes(const V8d& sums, const V8l& counts,
                                                    double* amount, int64_t* count) {
  double s[8];
  int64_t c[8];
  std::memcpy(s, &sums, sizeof(s));
  std::memcpy(c, &counts, sizeof(c));
  for (int64_t width = 4; width >= 1; width /= 2) {
    for (int64_t j = 0; j < width; ++j) {
      s[j] += s[j + width];
      c[j] += c[j + width];
    }
  }
  *amount += s[0];
  *count += c[0];
}

// Over a row of n float32 values (or their order keys, Value = int32_t) and their amounts:
// sum(a[key >= mid]) in double precision into *amount and the number of those elements
// into *count, in eight lanes (lane j: elements j, j + 8, ...; added pairwise at the end,
// then the last n % 8 elements in order).
template <typename Value>
__attribute__((always_inline)) inline void AmountAboveRow(const Value* x, const float* a,
                                                          int64_t n, int32_t mid,
                                                          double* amount, int64_t* count) {
  V8d sums = {};
  V8l counts = {};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    V8f amounts;
    std::memcpy(&amounts, a + i, sizeof(amounts));
    const V8l above = __builtin_convertvector(Keys8(x + i) >= mid, V8l);  // -1 or 0
    sums += (V8d)((V8l)__builtin_convertvector(amounts, V8d) & above);
    counts -= above;
  }
  *amount = 0.0;
  *count = 0;
  AddLanes(sums, counts, amount, count);
  for (; i < n; ++i) {
    int32_t key;
    if constexpr (std::is_same_v<Value, float>) {
      key = OrderKey(x[i]);
    } else {
      key = x[i];
    }
    if (key >= mid) {
      *amount += a[i];
      *count += 1;
    }
  }
}

JAXSAMPLE_CLONES
void AmountAbove(const float* x, const float* a, int64_t n, int32_t mid, double* amount,
                 int64_t* count) {
  AmountAboveRow(x, a, n, mid, amount, count);
}

JAXSAMPLE_CLONES
void AmountAboveKeys(const int32_t* keys, const float* a, int64_t n, int32_t mid,
                     double* amount, int64_t* count) {
  AmountAboveRow(keys, a, n, mid, amount, count);
}

// A row's total amount (double, eight lanes), its number of finite values and their
// smallest and largest order keys (x: finite or -inf).
JAXSAMPLE_CLONES
void FiniteStats(const float* x, const float* a, int64_t n, double* total, int64_t* finite,
                 int32_t* lo, int32_t* hi) {
  const int32_t minus_inf = OrderKey(-INFINITY);
  V8d sums = {};
  V8l counts = {};
  V8i low = V8i{} + INT32_MAX, high = V8i{} + INT32_MIN;
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    V8f amounts;
    std::memcpy(&amounts, a + i, sizeof(amounts));
    const V8i key = Keys8(x + i);
    const V8i is_finite = key != minus_inf;  // -1 or 0
    sums += __builtin_convertvector(amounts, V8d);
    counts -= __builtin_convertvector(is_finite, V8l);
    low = Select8(is_finite & (key < low), key, low);
    high = Select8(is_finite & (key > high), key, high);
  }
  *total = 0.0;
  *finite = 0;
  AddLanes(sums, counts, total, finite);
  int32_t l = INT32_MAX, h = INT32_MIN;
  for (int64_t j = 0; j < 8; ++j) {
    l = std::min(l, low[j]);
    h = std::max(h, high[j]);
  }
  for (; i < n; ++i) {
    *total += a[i];
    if (x[i] == -INFINITY) continue;
    *finite += 1;
    l = std::min(l, OrderKey(x[i]));
    h = std::max(h, OrderKey(x[i]));
  }
  *lo = l;
  *hi = h;
}

// The bisection stops once at most this many elements lie between its bounds, and reads
// the row's elements between its bounds into a buffer once at most n / kCompact do.
constexpr int64_t kWindow = 256;
constexpr int64_t kCompact = 16;

struct MassScratch {
  std::vector<int32_t> keys;
  std::vector<float> amounts;
  std::vector<int32_t> sample;
  std::vector<std::pair<int32_t, float>> window;
};

// Reads the row's elements whose keys lie in [low, high) into the buffer (s.keys and
// s.amounts); returns how many.
int64_t GatherBetween(const float* x, const float* a, int64_t n, int64_t low, int64_t high,
                      MassScratch& s) {
  s.keys.clear();
  s.amounts.clear();
  for (int64_t i = 0; i < n; ++i) {
    const int32_t key = OrderKey(x[i]);
    if (key >= low && key < high) {
      s.keys.push_back(key);
      s.amounts.push_back(a[i]);
    }
  }
  return static_cast<int64_t>(s.keys.size());
}

// The largest value t of a row of n with sum(a[x >= t]) >= target, or -inf (x: finite or
// -inf, a >= 0 and 0 where x is -inf). A bisection over the order keys: the bounds low
// (reaches the target) and high (does not) start at the smallest finite key and one past
// the largest; each step's pivot is the median of the keys between them in a strided
// sample of the row (the middle key when the sample holds too few), and one pass measures
// the amount at or above it (AmountAbove, double precision). Once at most n / kCompact
// elements lie between the bounds they are read into a buffer, and later passes read the
// buffer only; once at most kWindow do, they are sorted in descending order and added to
// the amount above `high` until the target is reached.
float MassThresholdRow(const float* x, const float* a, int64_t n, float target,
                       MassScratch& s) {
  double total;
  int64_t finite;
  int32_t lo, hi;
  FiniteStats(x, a, n, &total, &finite, &lo, &hi);
  if (finite == 0 || !(total >= target)) return -INFINITY;
  int64_t low = lo, high = static_cast<int64_t>(hi) + 1;
  int64_t count_low = finite, count_high = 0;
  double amount_high = 0.0;
  bool compacted = false;
  int64_t m = 0;  // the buffer's elements (keys in [low, high)) once compacted
  const int64_t stride = std::max<int64_t>(1, n / 1024);
  while (low + 1 < high && count_low - count_high > kWindow) {
    if (!compacted && count_low - count_high <= std::max(kWindow, n / kCompact)) {
      m = GatherBetween(x, a, n, low, high, s);
      compacted = true;
    }
    // the pivot: the median of the sampled keys between the bounds
    s.sample.clear();
    if (compacted) {
      const int64_t step = std::max<int64_t>(1, m / 256);
      for (int64_t i = 0; i < m; i += step) s.sample.push_back(s.keys[i]);
    } else {
      for (int64_t i = 0; i < n; i += stride) {
        const int32_t key = OrderKey(x[i]);
        if (key >= low && key < high) s.sample.push_back(key);
      }
    }
    int64_t pivot = low + (high - low) / 2;
    if (s.sample.size() >= 8) {
      auto middle = s.sample.begin() + s.sample.size() / 2;
      std::nth_element(s.sample.begin(), middle, s.sample.end());
      pivot = std::clamp<int64_t>(*middle, low + 1, high - 1);
    }
    double amount;
    int64_t count;
    if (compacted) {
      AmountAboveKeys(s.keys.data(), s.amounts.data(), m, static_cast<int32_t>(pivot), &amount,
                      &count);
      amount += amount_high;
      count += count_high;
    } else {
      AmountAbove(x, a, n, static_cast<int32_t>(pivot), &amount, &count);
    }
    const bool reached = amount >= target;
    if (reached) {
      low = pivot;
      count_low = count;
    } else {
      high = pivot;
      count_high = count;
      amount_high = amount;
    }
    if (compacted) {  // keep the buffer's elements between the new bounds
      int64_t kept = 0;
      for (int64_t i = 0; i < m; ++i) {
        s.keys[kept] = s.keys[i];
        s.amounts[kept] = s.amounts[i];
        kept += (s.keys[i] >= pivot) == reached;
      }
      m = kept;
    }
  }
  if (low + 1 == high) return FromOrderKey(static_cast<int32_t>(low));
  if (!compacted) m = GatherBetween(x, a, n, low, high, s);
  s.window.clear();
  for (int64_t i = 0; i < m; ++i) s.window.emplace_back(s.keys[i], s.amounts[i]);
  std::sort(s.window.begin(), s.window.end(),
            [](const auto& p, const auto& q) { return p.first > q.first; });
  double cum = amount_high;
  for (const auto& [key, amount] : s.window) {
    cum += amount;
    if (cum >= target) return FromOrderKey(key);
  }
  // (rounding: the amounts above the bounds were measured in another order)
  return FromOrderKey(s.window.back().first);
}

ffi::Error MassThresholdImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                             ffi::Buffer<ffi::F32> a, ffi::Buffer<ffi::F32> target,
                             ffi::Buffer<ffi::PRED> run, ffi::ResultBuffer<ffi::F32> out) {
  const auto dims = x.dimensions();
  const int64_t n = dims.size() > 0 ? dims.back() : 0;
  if (dims.size() < 1 || n <= 0 || n > INT32_MAX) {
    return ffi::Error::InvalidArgument("jaxsample_mass_threshold: need rows of 1 to 2**31 - 1");
  }
  const int64_t rows = x.element_count() / n;
  if (a.element_count() != x.element_count() ||
      static_cast<int64_t>(target.element_count()) != rows ||
      static_cast<int64_t>(run.element_count()) != rows) {
    return ffi::Error::InvalidArgument("jaxsample_mass_threshold: operand shapes differ");
  }
  const float* x_data = x.typed_data();
  const float* a_data = a.typed_data();
  const float* target_data = target.typed_data();
  const bool* run_data = run.typed_data();
  float* out_data = out->typed_data();
  jaxsample::ForEachRow<MassScratch>(pool, rows, n, [=](int64_t row, MassScratch& s) {
    out_data[row] = run_data[row] ? MassThresholdRow(x_data + row * n, a_data + row * n, n,
                                                     target_data[row], s)
                                  : -INFINITY;
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

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxsampleLogTotalTopK, LogTotalTopKImpl,
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

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxsampleMassThreshold, MassThresholdImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::PRED>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
