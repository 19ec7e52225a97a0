// Selection by magnitude without sorting and without copying the input.
//
// Every float is mapped to key = its bit pattern with the sign cleared. For
// non-NaN floats, |a| < |b| exactly when key(a) < key(b), so magnitudes can be
// compared, histogrammed and radix-selected as 31-bit unsigned integers.
//
// Exact top-k on a large input, the common path (one pass over x):
//   1. Sample 16,384 keys (1,024 random 16-element blocks, one per stratum) and
//      take a threshold `lo` a safe margin below the sample's k-th largest.
//   2. One filtering pass keeps (index, value) of every key > lo, per 64Ki chunk,
//      and counts keys == lo. With SIMD this runs at memory speed.
//   3. Radix-select the exact k-th key T among the few candidates; ties at T go
//      to the lowest indices, allotted chunk by chunk in index order.
// If the sample misjudged (fewer than k keys >= lo, or far too many candidates),
// the exact threshold comes from a 3-digit radix histogram over all of x instead.
// Chunks have a fixed size and are combined in order, so results do not depend
// on the number of threads.
#include "topk.hpp"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <mutex>
#include <stdexcept>

#include "bits.hpp"
#include "parallel.hpp"
#include "rng.hpp"
#include "simd.hpp"

#if FEDPRESS_HAVE_X86_DISPATCH
#include <immintrin.h>
#endif

namespace fedpress {
namespace {

constexpr std::size_t kChunk = std::size_t{1} << 16;
constexpr std::uint32_t kAbsMask = 0x7FFFFFFFu;
constexpr std::uint32_t kInfKey = 0x7F800000u;
constexpr std::size_t kSampleBlock = 16;
// Below this size the exact threshold is found directly; sampling does not pay.
constexpr std::size_t kSampleMinN = std::size_t{1} << 17;
// Above this density the candidate set would be most of x: use the histogram.
constexpr double kSampleMaxDensity = 0.05;

inline std::uint32_t key_of(float f) {
  std::uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u & kAbsMask;
}

// ---------------------------------------------------------------- filtering --
// Keep (i, v) for every element of [begin, end) whose key is > lo and count the
// keys == lo. With kAdd the element is acc[i] + src[i], written back to acc
// first (the error-feedback accumulation, fused into the same pass).
// out_idx / out_val need room for (end - begin) + 16 entries: SIMD paths store
// whole vectors past the last kept entry.

template <bool kAdd>
std::size_t filter_scalar(const float* src, float* acc, std::size_t begin, std::size_t end, std::uint32_t lo,
                          std::uint32_t* out_idx, float* out_val, std::size_t& eq) {
  std::size_t cnt = 0, e = 0;
  for (std::size_t i = begin; i < end; ++i) {
    float v = src[i];
    if (kAdd) {
      v += acc[i];
      acc[i] = v;
    }
    const std::uint32_t key = key_of(v);
    out_idx[cnt] = static_cast<std::uint32_t>(i);
    out_val[cnt] = v;
    cnt += key > lo;  // branch-free: the slot is overwritten unless kept
    e += key == lo;
  }
  eq += e;
  return cnt;
}

#if FEDPRESS_HAVE_X86_DISPATCH

template <bool kAdd>
__attribute__((target("avx2,bmi,bmi2,popcnt"))) std::size_t filter_avx2(const float* src, float* acc, std::size_t begin,
                                                                        std::size_t end, std::uint32_t lo,
                                                                        std::uint32_t* out_idx, float* out_val,
                                                                        std::size_t& eq) {
  const __m256i abs_mask = _mm256_set1_epi32(static_cast<int>(kAbsMask));
  // Keys are < 2^31, so signed 32-bit compares order them correctly.
  const __m256i vlo = _mm256_set1_epi32(static_cast<int>(lo));
  std::size_t cnt = 0, e = 0, i = begin;
  for (; i + 32 <= end; i += 32) {
    __m256 v[4];
    unsigned gt[4];
    for (int j = 0; j < 4; ++j) {
      v[j] = _mm256_loadu_ps(src + i + 8 * j);
      if (kAdd) {
        v[j] = _mm256_add_ps(v[j], _mm256_loadu_ps(acc + i + 8 * j));
        _mm256_storeu_ps(acc + i + 8 * j, v[j]);
      }
      const __m256i key = _mm256_and_si256(_mm256_castps_si256(v[j]), abs_mask);
      gt[j] = static_cast<unsigned>(_mm256_movemask_ps(_mm256_castsi256_ps(_mm256_cmpgt_epi32(key, vlo))));
      e += static_cast<std::size_t>(__builtin_popcount(
          static_cast<unsigned>(_mm256_movemask_ps(_mm256_castsi256_ps(_mm256_cmpeq_epi32(key, vlo))))));
    }
    if ((gt[0] | gt[1] | gt[2] | gt[3]) == 0) continue;
    for (int j = 0; j < 4; ++j) {
      unsigned m = gt[j];
      const float* lanes = reinterpret_cast<const float*>(&v[j]);
      while (m) {
        const unsigned lane = static_cast<unsigned>(__builtin_ctz(m));
        out_idx[cnt] = static_cast<std::uint32_t>(i + 8 * static_cast<std::size_t>(j) + lane);
        out_val[cnt] = lanes[lane];
        ++cnt;
        m &= m - 1;
      }
    }
  }
  std::size_t tail_eq = 0;
  cnt += filter_scalar<kAdd>(src, acc, i, end, lo, out_idx + cnt, out_val + cnt, tail_eq);
  eq += e + tail_eq;
  return cnt;
}

template <bool kAdd>
__attribute__((target("avx512f,avx512vl,avx512bw,avx512dq,bmi,bmi2,popcnt"))) std::size_t filter_avx512(
    const float* src, float* acc, std::size_t begin, std::size_t end, std::uint32_t lo, std::uint32_t* out_idx,
    float* out_val, std::size_t& eq) {
  const __m512i abs_mask = _mm512_set1_epi32(static_cast<int>(kAbsMask));
  const __m512i vlo = _mm512_set1_epi32(static_cast<int>(lo));
  const __m512i lane_ids = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  std::size_t cnt = 0, e = 0, i = begin;
  for (; i + 64 <= end; i += 64) {
    __m512 v[4];
    __mmask16 gt[4];
    for (int j = 0; j < 4; ++j) {
      v[j] = _mm512_loadu_ps(src + i + 16 * j);
      if (kAdd) {
        v[j] = _mm512_add_ps(v[j], _mm512_loadu_ps(acc + i + 16 * j));
        _mm512_storeu_ps(acc + i + 16 * j, v[j]);
      }
      const __m512i key = _mm512_and_si512(_mm512_castps_si512(v[j]), abs_mask);
      gt[j] = _mm512_cmpgt_epu32_mask(key, vlo);
      e += static_cast<std::size_t>(__builtin_popcount(_mm512_cmpeq_epu32_mask(key, vlo)));
    }
    if ((gt[0] | gt[1] | gt[2] | gt[3]) == 0) continue;
    for (int j = 0; j < 4; ++j) {
      if (!gt[j]) continue;
      const __m512i ids =
          _mm512_add_epi32(_mm512_set1_epi32(static_cast<int>(i + 16 * static_cast<std::size_t>(j))), lane_ids);
      // Compress into a register, then a plain store: compress-to-memory is
      // microcoded and slow on some cores.
      _mm512_storeu_si512(out_idx + cnt, _mm512_maskz_compress_epi32(gt[j], ids));
      _mm512_storeu_ps(out_val + cnt, _mm512_maskz_compress_ps(gt[j], v[j]));
      cnt += static_cast<std::size_t>(__builtin_popcount(gt[j]));
    }
  }
  std::size_t tail_eq = 0;
  cnt += filter_scalar<kAdd>(src, acc, i, end, lo, out_idx + cnt, out_val + cnt, tail_eq);
  eq += e + tail_eq;
  return cnt;
}

#endif  // FEDPRESS_HAVE_X86_DISPATCH

template <bool kAdd>
std::size_t filter_range(const float* src, float* acc, std::size_t begin, std::size_t end, std::uint32_t lo,
                         std::uint32_t* out_idx, float* out_val, std::size_t& eq) {
#if FEDPRESS_HAVE_X86_DISPATCH
  switch (active_simd()) {
    case SimdLevel::avx512:
      return filter_avx512<kAdd>(src, acc, begin, end, lo, out_idx, out_val, eq);
    case SimdLevel::avx2:
      return filter_avx2<kAdd>(src, acc, begin, end, lo, out_idx, out_val, eq);
    default:
      break;
  }
#endif
  return filter_scalar<kAdd>(src, acc, begin, end, lo, out_idx, out_val, eq);
}

// The input: one array, or several back to back in one index space (a model's
// tensors, selected together without being concatenated). Each segment is the
// vector itself, or an update whose sum with a residual (acc) is selected: sampled
// before the fused pass writes the sum back into acc, read from acc after it.
struct Segment {
  const float* x;      // the vector, or the update
  float* acc;          // the residual when accumulating, else nullptr
  std::size_t offset;  // index of its first element in the whole input
  std::size_t n;
  const float* values() const { return acc ? acc : x; }  // after accumulation
};

class Input {
 public:
  explicit Input(std::vector<Segment> segments) : segs_(std::move(segments)) {
    n_ = segs_.empty() ? 0 : segs_.back().offset + segs_.back().n;
  }
  std::size_t size() const { return n_; }
  bool accumulating() const {
    return std::any_of(segs_.begin(), segs_.end(), [](const Segment& s) { return s.acc != nullptr; });
  }
  const std::vector<Segment>& segments() const { return segs_; }

  // fn(segment, local_begin, local_end) for each segment's part of [begin, end), in order.
  template <class Fn>
  void pieces(std::size_t begin, std::size_t end, Fn&& fn) const {
    auto it = std::upper_bound(segs_.begin(), segs_.end(), begin,
                               [](std::size_t i, const Segment& s) { return i < s.offset + s.n; });
    for (; it != segs_.end() && it->offset < end; ++it) {
      const std::size_t lb = std::max(begin, it->offset) - it->offset;
      const std::size_t le = std::min(end, it->offset + it->n) - it->offset;
      if (lb < le) fn(*it, lb, le);
    }
  }

  // fn(value, index) for every element of [begin, end) after accumulation, in order,
  // while fn returns true.
  template <class Fn>
  void each_value(std::size_t begin, std::size_t end, Fn&& fn) const {
    bool go = true;
    pieces(begin, end, [&](const Segment& s, std::size_t lb, std::size_t le) {
      const float* v = s.values();
      for (std::size_t i = lb; go && i < le; ++i) go = fn(v[i], s.offset + i);
    });
  }

 private:
  std::vector<Segment> segs_;
  std::size_t n_ = 0;
};

struct ChunkCandidates {
  std::vector<std::uint32_t> idx;  // ascending
  std::vector<float> val;
  std::size_t eq = 0;  // keys == lo in the chunk (candidates hold only keys > lo)
};

struct FilterResult {
  std::vector<ChunkCandidates> chunks;
  std::size_t total = 0;  // candidates kept
  std::size_t total_eq = 0;
  bool overflow = false;  // more than `cap` candidates: lists are incomplete
  bool nan = false;
};

// One pass over the input keeping every key > lo. When accumulating, the pass also
// performs acc += x for every element, even after an overflow.
FilterResult filter_pass(const Input& in, std::uint32_t lo, std::size_t cap) {
  const std::size_t n = in.size(), n_chunks = ceil_div(n, kChunk);
  const bool accumulating = in.accumulating();
  FilterResult r;
  r.chunks.resize(n_chunks);
  std::atomic<std::size_t> total{0};
  std::atomic<bool> overflow{false}, nan{false};
  parallel_for_sized(n_chunks, n, [&](std::size_t c) {
    const std::size_t begin = c * kChunk, end = std::min(n, begin + kChunk);
    if (!accumulating && overflow.load(std::memory_order_relaxed)) return;
    thread_local std::vector<std::uint32_t> idx_buf;
    thread_local std::vector<float> val_buf;
    idx_buf.resize(kChunk + 64);
    val_buf.resize(kChunk + 64);
    std::size_t eq = 0, cnt = 0;
    // A chunk may span several segments: each piece's kept entries follow the last's
    // (a piece's SIMD stores run at most 16 past its own, within the buffer's slack).
    in.pieces(begin, end, [&](const Segment& s, std::size_t lb, std::size_t le) {
      std::uint32_t* oi = idx_buf.data() + cnt;
      const std::size_t kept = s.acc ? filter_range<true>(s.x, s.acc, lb, le, lo, oi, val_buf.data() + cnt, eq)
                                     : filter_range<false>(s.x, nullptr, lb, le, lo, oi, val_buf.data() + cnt, eq);
      if (s.offset)
        for (std::size_t j = 0; j < kept; ++j) oi[j] += static_cast<std::uint32_t>(s.offset);
      cnt += kept;
    });
    const std::size_t before = total.fetch_add(cnt, std::memory_order_relaxed);
    if (before + cnt > cap) overflow.store(true, std::memory_order_relaxed);
    if (overflow.load(std::memory_order_relaxed)) return;
    ChunkCandidates& out = r.chunks[c];
    out.idx.assign(idx_buf.begin(), idx_buf.begin() + static_cast<std::ptrdiff_t>(cnt));
    out.val.assign(val_buf.begin(), val_buf.begin() + static_cast<std::ptrdiff_t>(cnt));
    out.eq = eq;
    for (std::size_t j = 0; j < cnt; ++j)
      if (key_of(out.val[j]) > kInfKey) nan.store(true, std::memory_order_relaxed);
  });
  r.overflow = overflow.load();
  r.nan = nan.load();
  if (!r.overflow) {
    for (const auto& ch : r.chunks) {
      r.total += ch.idx.size();
      r.total_eq += ch.eq;
    }
  }
  return r;
}

// ------------------------------------------------------------ radix select --
// Keys are 31 bits: digits of 11, 10 and 10 bits, most significant first.
constexpr int kDigitShift[3] = {20, 10, 0};
constexpr std::uint32_t kDigitBins[3] = {2048, 1024, 1024};

struct Threshold {
  std::uint32_t key = 0;  // the k-th largest key
  std::size_t above = 0;  // keys strictly greater than `key`
};

// Walks a histogram from the top bin down to the bin holding the need-th
// largest key; returns the bin, adds the counts above it to `above` and reduces
// `need` to the rank within that bin.
std::uint32_t descend(const std::vector<std::uint64_t>& hist, std::uint64_t& need, std::size_t& above) {
  for (std::size_t b = hist.size(); b-- > 0;) {
    if (hist[b] >= need) return static_cast<std::uint32_t>(b);
    need -= hist[b];
    above += static_cast<std::size_t>(hist[b]);
  }
  throw std::logic_error("fedpress: radix select ran out of keys");
}

// The k-th largest of `keys` (1 <= k <= keys.size()); consumes keys.
Threshold kth_largest(std::vector<std::uint32_t> keys, std::size_t k) {
  Threshold t;
  std::uint64_t need = k;
  for (int d = 0; d < 3; ++d) {
    const int shift = kDigitShift[d];
    const std::uint32_t mask = kDigitBins[d] - 1;
    std::vector<std::uint64_t> hist(kDigitBins[d], 0);
    for (std::uint32_t key : keys) ++hist[(key >> shift) & mask];
    const std::uint32_t bin = descend(hist, need, t.above);
    t.key |= bin << shift;
    if (d < 2) {
      std::size_t w = 0;
      for (std::uint32_t key : keys)
        if (((key >> shift) & mask) == bin) keys[w++] = key;
      keys.resize(w);
    }
  }
  return t;
}

// The k-th largest key of the whole input (after accumulation) by three histogram
// passes, without materialising anything (the fallback for dense selections and bad
// samples).
Threshold kth_largest_streaming(const Input& in, std::size_t k) {
  const std::size_t n = in.size(), n_chunks = ceil_div(n, kChunk);
  Threshold t;
  std::uint64_t need = k;
  std::uint32_t prefix = 0, prefix_mask = 0;
  std::atomic<bool> nan{false};
  for (int d = 0; d < 3; ++d) {
    const int shift = kDigitShift[d];
    const std::uint32_t bins = kDigitBins[d], mask = bins - 1;
    std::vector<std::uint64_t> hist(bins, 0);
    std::mutex hist_mutex;
    parallel_for_sized(n_chunks, n, [&](std::size_t c) {
      const std::size_t begin = c * kChunk, end = std::min(n, begin + kChunk);
      std::vector<std::uint32_t> local(bins, 0);
      std::uint32_t max_key = 0;
      in.pieces(begin, end, [&](const Segment& s, std::size_t lb, std::size_t le) {
        const float* x = s.values();
        for (std::size_t i = lb; i < le; ++i) {
          const std::uint32_t key = key_of(x[i]);
          max_key = std::max(max_key, key);
          if ((key & prefix_mask) == prefix) ++local[(key >> shift) & mask];
        }
      });
      if (max_key > kInfKey) nan.store(true, std::memory_order_relaxed);
      std::lock_guard<std::mutex> lock(hist_mutex);  // integer sums: order-independent
      for (std::uint32_t b = 0; b < bins; ++b) hist[b] += local[b];
    });
    if (nan.load()) throw std::invalid_argument("x contains NaN");
    const std::uint32_t bin = descend(hist, need, t.above);
    prefix |= bin << shift;
    prefix_mask |= mask << shift;
  }
  t.key = prefix;
  return t;
}

// ---------------------------------------------------------------- sampling --
// Keys of n_blocks random 16-element blocks, one per equal stratum of the input.
std::vector<std::uint32_t> sample_keys(const Input& in, std::size_t n_blocks, std::uint64_t seed) {
  const std::size_t n = in.size();
  n_blocks = std::min(n_blocks, n / kSampleBlock);
  const std::size_t stratum = n / n_blocks;
  std::vector<std::uint32_t> keys(n_blocks * kSampleBlock);
  for (std::size_t b = 0; b < n_blocks; ++b) {
    const std::size_t start =
        b * stratum + static_cast<std::size_t>(bounded64(hash64(seed, b), stratum - kSampleBlock + 1));
    // A block's segments are found once (a model's 160 tensors: a search per element
    // took half a millisecond of the selection).
    std::uint32_t* out = keys.data() + b * kSampleBlock;
    in.pieces(start, start + kSampleBlock, [&](const Segment& s, std::size_t lb, std::size_t le) {
      for (std::size_t i = lb; i < le; ++i) *out++ = key_of(s.acc ? s.acc[i] + s.x[i] : s.x[i]);
    });
  }
  return keys;
}

// The key of rank `rank` (0 = largest) in the sample. A NaN anywhere in the
// sample is reported here: as a threshold it would make NaNs look like ties.
std::uint32_t sample_rank_key(std::vector<std::uint32_t>& keys, std::size_t rank) {
  for (std::uint32_t key : keys)
    if (key > kInfKey) throw std::invalid_argument("x contains NaN");
  rank = std::min(rank, keys.size() - 1);
  std::nth_element(keys.begin(), keys.begin() + static_cast<std::ptrdiff_t>(rank), keys.end(),
                   std::greater<std::uint32_t>());
  return keys[rank];
}

// ----------------------------------------------------------------- assembly --
// Builds the result from per-chunk candidates: every candidate with key > T,
// and `ties` entries with key == T, lowest indices first. When ties_in_lists
// is false the candidates hold only keys > T and the ties are found by
// rescanning the chunks of the input (whose eq counts say where they are).
SparseVector assemble(const FilterResult& f, const Input& in, std::uint32_t T, std::size_t ties, bool ties_in_lists) {
  const std::size_t n = in.size(), n_chunks = f.chunks.size();
  std::vector<std::size_t> take_gt(n_chunks), take_eq(n_chunks), offset(n_chunks + 1, 0);
  for (std::size_t c = 0; c < n_chunks; ++c) {
    const ChunkCandidates& ch = f.chunks[c];
    std::size_t gt = 0, eq = 0;
    if (ties_in_lists) {
      for (float v : ch.val) {
        const std::uint32_t key = key_of(v);
        gt += key > T;
        eq += key == T;
      }
    } else {
      gt = ch.idx.size();
      eq = ch.eq;
    }
    take_gt[c] = gt;
    take_eq[c] = std::min(eq, ties);
    ties -= take_eq[c];
    offset[c + 1] = offset[c] + gt + take_eq[c];
  }
  SparseVector out;
  out.indices.resize(offset[n_chunks]);
  out.values.resize(offset[n_chunks]);
  parallel_for_sized(n_chunks, offset[n_chunks] * 16, [&](std::size_t c) {
    const ChunkCandidates& ch = f.chunks[c];
    std::uint32_t* oi = out.indices.data() + offset[c];
    float* ov = out.values.data() + offset[c];
    std::size_t eq_left = take_eq[c], w = 0;
    if (ties_in_lists) {
      for (std::size_t j = 0; j < ch.idx.size(); ++j) {
        const std::uint32_t key = key_of(ch.val[j]);
        if (key > T || (key == T && eq_left > 0)) {
          if (key == T) --eq_left;
          oi[w] = ch.idx[j];
          ov[w] = ch.val[j];
          ++w;
        }
      }
      return;
    }
    // Merge the chunk's candidates with its first eq_left elements equal to T.
    const std::size_t begin = c * kChunk, end = std::min(n, begin + kChunk);
    std::size_t j = 0;
    if (eq_left > 0)
      in.each_value(begin, end, [&](float v, std::size_t i) {
        if (key_of(v) != T) return true;
        while (j < ch.idx.size() && ch.idx[j] < i) {
          oi[w] = ch.idx[j];
          ov[w++] = ch.val[j++];
        }
        oi[w] = static_cast<std::uint32_t>(i);
        ov[w++] = v;
        return --eq_left > 0;
      });
    for (; j < ch.idx.size(); ++j) {
      oi[w] = ch.idx[j];
      ov[w++] = ch.val[j];
    }
  });
  return out;
}

// Selects exactly k among the candidates of a filter pass that holds >= k of them.
SparseVector select_from_candidates(const FilterResult& f, const Input& in, std::size_t k) {
  std::vector<std::uint32_t> keys;
  keys.reserve(f.total);
  for (const auto& ch : f.chunks)
    for (float v : ch.val) keys.push_back(key_of(v));
  const Threshold t = kth_largest(std::move(keys), k);
  return assemble(f, in, t.key, k - t.above, /*ties_in_lists=*/true);
}

// The input after accumulation, read as it stands (the filter pass must not add again).
Input accumulated(const Input& in) {
  std::vector<Segment> segs = in.segments();
  for (Segment& s : segs) {
    s.x = s.values();
    s.acc = nullptr;
  }
  return Input(std::move(segs));
}

// The exact path over an accumulated input: exact threshold, then one filtering pass at it.
SparseVector select_exact_threshold(const Input& in, std::size_t k) {
  const std::size_t n = in.size();
  Threshold t;
  if (n < kSampleMinN) {
    std::vector<std::uint32_t> keys;
    keys.reserve(n);
    in.each_value(0, n, [&](float v, std::size_t) {
      keys.push_back(key_of(v));
      return true;
    });
    for (std::uint32_t key : keys)
      if (key > kInfKey) throw std::invalid_argument("x contains NaN");
    t = kth_largest(std::move(keys), k);
  } else {
    t = kth_largest_streaming(in, k);
  }
  const FilterResult f = filter_pass(in, t.key, k);
  if (f.nan) throw std::invalid_argument("x contains NaN");
  return assemble(f, in, t.key, k - t.above, /*ties_in_lists=*/false);
}

void check_no_nan(const Input& in) {
  const std::size_t n = in.size(), n_chunks = ceil_div(n, kChunk);
  std::atomic<bool> nan{false};
  parallel_for_sized(n_chunks, n, [&](std::size_t c) {
    const std::size_t begin = c * kChunk, end = std::min(n, begin + kChunk);
    std::uint32_t m = 0;
    in.pieces(begin, end, [&](const Segment& s, std::size_t lb, std::size_t le) {
      const float* x = s.values();
      for (std::size_t i = lb; i < le; ++i) m = std::max(m, key_of(x[i]));
    });
    if (m > kInfKey) nan.store(true, std::memory_order_relaxed);
  });
  if (nan.load()) throw std::invalid_argument("x contains NaN");
}

SparseVector take_all(const Input& in) {
  SparseVector out;
  out.indices.reserve(in.size());
  out.values.reserve(in.size());
  in.each_value(0, in.size(), [&](float v, std::size_t i) {
    out.indices.push_back(static_cast<std::uint32_t>(i));
    out.values.push_back(v);
    return true;
  });
  return out;
}

// acc += x over the whole input (nothing when not accumulating).
void accumulate_only(const Input& in) {
  if (!in.accumulating()) return;
  const std::size_t n = in.size(), n_chunks = ceil_div(n, kChunk);
  parallel_for_sized(n_chunks, n, [&](std::size_t c) {
    const std::size_t begin = c * kChunk, end = std::min(n, begin + kChunk);
    in.pieces(begin, end, [&](const Segment& s, std::size_t lb, std::size_t le) {
      if (s.acc == nullptr) return;
      for (std::size_t i = lb; i < le; ++i) s.acc[i] += s.x[i];
    });
  });
}

// Exact top-k; when accumulating, performs acc += x on the way and selects from acc.
SparseVector topk_impl(const Input& in, std::size_t k) {
  const std::size_t n = in.size();
  if (k == 0 || k == n) {
    accumulate_only(in);
    const Input values = accumulated(in);
    check_no_nan(values);
    return k == 0 ? SparseVector{} : take_all(values);
  }
  const double density = static_cast<double>(k) / static_cast<double>(n);
  if (n < kSampleMinN || density > kSampleMaxDensity) {
    accumulate_only(in);
    return select_exact_threshold(accumulated(in), k);
  }
  // Sampled threshold with a margin of ~4 standard deviations (plus slack for
  // the correlation inside sampled blocks): the sample's expected count above
  // the k-th largest key is density * s.
  std::vector<std::uint32_t> sample = sample_keys(in, 1024, 0x5EEDF00Du);
  if (in.accumulating() && std::any_of(sample.begin(), sample.end(), [](std::uint32_t key) { return key > kInfKey; })) {
    accumulate_only(in);  // ef_topk's promise: the residual holds the whole sum, whatever is thrown
    throw std::invalid_argument("x contains NaN");
  }
  const double s = static_cast<double>(sample.size());
  const double expect = density * s;
  const std::size_t rank = static_cast<std::size_t>(std::ceil(expect + 4.0 * std::sqrt(expect) + 16.0));
  if (rank >= sample.size()) {
    accumulate_only(in);
    return select_exact_threshold(accumulated(in), k);
  }
  const std::uint32_t lo = sample_rank_key(sample, rank);
  // Budget for candidates: generous enough for any sane sample, bounded memory.
  const std::size_t cap = std::max<std::size_t>(4 * k, std::size_t{1} << 16);
  const FilterResult f = filter_pass(in, lo, cap);
  if (f.nan) throw std::invalid_argument("x contains NaN");
  const Input values = accumulated(in);
  if (!f.overflow) {
    if (f.total >= k) return select_from_candidates(f, values, k);
    if (f.total + f.total_eq >= k) return assemble(f, values, lo, k - f.total, false);
  }
  // The sample misjudged the distribution: exact threshold over the full input.
  return select_exact_threshold(values, k);
}

SparseVector topk_threshold_impl(const Input& in, double ratio, std::uint64_t seed) {
  if (!(ratio >= 0.0 && ratio <= 1.0)) throw std::invalid_argument("ratio must be in [0, 1]");
  const std::size_t n = in.size();
  const std::size_t target =
      std::min<std::size_t>(n, static_cast<std::size_t>(std::llround(ratio * static_cast<double>(n))));
  const std::size_t band_lo = static_cast<std::size_t>(std::ceil(0.9 * static_cast<double>(target)));
  const std::size_t band_hi = static_cast<std::size_t>(std::floor(1.1 * static_cast<double>(target)));
  if (n < kSampleMinN || target == 0 || target == n || band_lo >= band_hi) return topk_impl(in, target);
  std::vector<std::uint32_t> sample = sample_keys(in, 4096, seed);
  const double expect = static_cast<double>(target) / static_cast<double>(n) * static_cast<double>(sample.size());
  // Aim slightly above the target: an overshoot is fixed from the candidates
  // alone, an undershoot needs another pass over x.
  const std::size_t rank = static_cast<std::size_t>(std::llround(expect * 1.04));
  if (rank == 0 || rank >= sample.size()) return topk_impl(in, target);
  const std::uint32_t lo = sample_rank_key(sample, rank - 1);
  const FilterResult f = filter_pass(in, lo, std::max<std::size_t>(8 * target, std::size_t{1} << 16));
  if (f.nan) throw std::invalid_argument("x contains NaN");
  if (!f.overflow) {
    if (f.total >= band_lo && f.total <= band_hi) return assemble(f, in, lo, 0, false);
    if (f.total > band_hi) return select_from_candidates(f, in, target);
    if (f.total + f.total_eq >= band_lo) return assemble(f, in, lo, std::min(f.total_eq, target - f.total), false);
  }
  return topk_impl(in, target);
}

// The arrays back to back in one index space (whose size must stay below 2^32).
Input input_of(const std::vector<const float*>& xs, const std::vector<float*>& accs,
               const std::vector<std::size_t>& ns) {
  std::vector<Segment> segs(xs.size());
  std::size_t offset = 0;
  for (std::size_t i = 0; i < xs.size(); ++i) {
    segs[i] = Segment{xs[i], accs.empty() ? nullptr : accs[i], offset, ns[i]};
    offset += ns[i];
  }
  if (offset > 0xFFFFFFFFu) throw std::invalid_argument("the arrays hold 2^32 or more elements together");
  return Input(std::move(segs));
}

}  // namespace

SparseVector topk_exact(const float* x, std::size_t n, std::size_t k) {
  if (k > n) throw std::invalid_argument("k must be <= n");
  return topk_impl(Input({Segment{x, nullptr, 0, n}}), k);
}

SparseVector topk_exact_many(const std::vector<const float*>& xs, const std::vector<std::size_t>& ns, std::size_t k) {
  const Input in = input_of(xs, {}, ns);
  if (k > in.size()) throw std::invalid_argument("k must be <= the total length");
  return topk_impl(in, k);
}

SparseVector ef_topk(const float* update, float* residual, std::size_t n, std::size_t k, bool zero_selected) {
  return ef_topk_many({update}, {residual}, {n}, k, zero_selected);
}

SparseVector ef_topk_many(const std::vector<const float*>& updates, const std::vector<float*>& residuals,
                          const std::vector<std::size_t>& ns, std::size_t k, bool zero_selected) {
  const Input in = input_of(updates, residuals, ns);
  if (k > in.size()) throw std::invalid_argument("k must be <= n");
  SparseVector out = topk_impl(in, k);
  if (zero_selected) {
    std::size_t seg = 0;  // indices ascend: walk the segments along
    for (std::uint32_t i : out.indices) {
      while (i >= in.segments()[seg].offset + in.segments()[seg].n) ++seg;
      residuals[seg][i - in.segments()[seg].offset] = 0.0f;
    }
  }
  return out;
}

std::vector<std::size_t> split_by_array(std::vector<std::uint32_t>& indices, const std::vector<std::size_t>& ns) {
  std::vector<std::size_t> cuts(ns.size() + 1, indices.size());
  std::size_t j = 0, offset = 0;
  for (std::size_t a = 0; a < ns.size(); ++a) {
    cuts[a] = j;
    const std::size_t end = offset + ns[a];
    const auto off = static_cast<std::uint32_t>(offset);  // below 2^32: the arrays' total is
    for (; j < indices.size() && indices[j] < end; ++j) indices[j] -= off;
    offset = end;
  }
  if (j != indices.size()) throw std::invalid_argument("an index lies past the arrays' total length");
  return cuts;
}

SparseVector topk_threshold(const float* x, std::size_t n, double ratio, std::uint64_t seed) {
  return topk_threshold_impl(Input({Segment{x, nullptr, 0, n}}), ratio, seed);
}

SparseVector topk_threshold_many(const std::vector<const float*>& xs, const std::vector<std::size_t>& ns, double ratio,
                                 std::uint64_t seed) {
  return topk_threshold_impl(input_of(xs, {}, ns), ratio, seed);
}

std::vector<std::uint32_t> randomk_indices(std::size_t n, std::size_t k, std::uint64_t seed) {
  if (k > n) throw std::invalid_argument("k must be <= n");
  // Floyd's algorithm over a bitmap draws k distinct positions in O(k) draws;
  // scanning the bitmap lists them in ascending order without a sort. For
  // k > n/2 it draws the n-k positions to leave out instead.
  const bool complement = k > n / 2;
  const std::size_t draw = complement ? n - k : k;
  std::vector<std::uint64_t> bitmap(ceil_div(n, 64), 0);
  auto test_and_set = [&](std::size_t i) {
    const std::uint64_t bit = std::uint64_t{1} << (i & 63);
    const bool was = (bitmap[i >> 6] & bit) != 0;
    bitmap[i >> 6] |= bit;
    return was;
  };
  for (std::size_t j = n - draw; j < n; ++j) {
    const std::size_t t = static_cast<std::size_t>(bounded64(hash64(seed, j), j + 1));
    if (test_and_set(t)) test_and_set(j);
  }
  std::vector<std::uint32_t> out;
  out.reserve(k);
  for (std::size_t w = 0; w < bitmap.size(); ++w) {
    std::uint64_t word = complement ? ~bitmap[w] : bitmap[w];
    if (w == bitmap.size() - 1 && (n & 63)) word &= (std::uint64_t{1} << (n & 63)) - 1;
    while (word) {
      out.push_back(static_cast<std::uint32_t>(w * 64 + std::size_t{ctz64(word)}));
      word &= word - 1;
    }
  }
  return out;
}

SparseVector randomk(const float* x, std::size_t n, std::size_t k, std::uint64_t seed) {
  SparseVector out;
  out.indices = randomk_indices(n, k, seed);
  out.values.resize(out.indices.size());
  for (std::size_t j = 0; j < out.indices.size(); ++j) out.values[j] = x[out.indices[j]];
  return out;
}

}  // namespace fedpress
