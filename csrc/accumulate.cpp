#include "accumulate.hpp"

#include <algorithm>
#include <array>
#include <cstring>
#include <numeric>

#include "dispatch.hpp"
#include "parallel.hpp"
#include "quantize.hpp"
#include "simd.hpp"

namespace fedpress {
namespace {

// 2^15 floats = 128 KiB of accumulator per range: well inside a core's L2, so
// every client's additions to it hit cache (measured best among 2^13..2^19).
constexpr std::size_t kRange = std::size_t{1} << 15;
// Entries ahead whose accumulator line is fetched early. One client's kept entries
// land about a few cache lines apart, each a miss; fetched ahead, the misses overlap
// (a top-1% correction into 25.6M floats: 3.2 to about 1 ms).
constexpr std::size_t kAhead = 24;
// Sorted entries one task of scatter_add_each adds, at least.
constexpr std::size_t kTaskEntries = std::size_t{1} << 14;

#if defined(__GNUC__) || defined(__clang__)
inline void prefetch_for_write(const float* p) { __builtin_prefetch(p, 1, 3); }
#else
inline void prefetch_for_write(const float*) {}
#endif

// a[i] /= d over a run: float32 division, correctly rounded at every vector width, so each
// clone gives the same bits (8 or 16 lanes instead of SSE's 4: division is what bounds it).
FEDPRESS_CLONES
void divide_run(float* a, std::size_t n, float d) {
  for (std::size_t i = 0; i < n; ++i) a[i] /= d;
}

// How many threads share the ranges of an n-element accumulator receiving `total` entries.
std::size_t range_parts(std::size_t total, std::size_t n_ranges) {
  return total < kParallelThreshold ? 1 : std::min<std::size_t>(n_ranges, static_cast<std::size_t>(num_threads()));
}

// Adds every update's entries that fall in ranges [r_begin, r_end) of the
// accumulator, range by range and client by client in list order (the sorted
// indices walked forward from one binary search per client).
void add_ranges(float* acc, std::size_t n, const std::vector<SparseUpdate>& updates, std::size_t r_begin,
                std::size_t r_end) {
  if (r_begin == r_end) return;
  std::vector<std::size_t> cursor(updates.size());
  const std::uint32_t start = static_cast<std::uint32_t>(r_begin * kRange);
  for (std::size_t c = 0; c < updates.size(); ++c)
    cursor[c] = static_cast<std::size_t>(
        std::lower_bound(updates[c].indices, updates[c].indices + updates[c].count, start) - updates[c].indices);
  // With one client the range does not stay in cache for another: fetch ahead instead.
  const bool ahead = updates.size() == 1;
  for (std::size_t r = r_begin; r < r_end; ++r) {
    // Indices are < n <= 2^32 - 1, so a range end of n needs 64 bits.
    const std::uint64_t hi = std::min<std::uint64_t>(n, std::uint64_t{r + 1} * kRange);
    for (std::size_t c = 0; c < updates.size(); ++c) {
      const SparseUpdate& u = updates[c];
      std::size_t j = cursor[c];
      const float w = u.weight;
      // Each index is read once and written only below hi <= n: the caller's arrays are
      // read without the GIL, and another thread may change them after they were checked
      // (the sum is then wrong, as the caller made it, but nothing outside acc is written).
      if (ahead) {
        for (; j < u.count; ++j) {
          const std::uint32_t i = u.indices[j];
          if (i >= hi) break;
          if (j + kAhead < u.count) prefetch_for_write(acc + std::min<std::uint64_t>(u.indices[j + kAhead], n - 1));
          acc[i] += w * u.values[j];
        }
      } else {
        for (; j < u.count; ++j) {
          const std::uint32_t i = u.indices[j];
          if (i >= hi) break;
          acc[i] += w * u.values[j];
        }
      }
      cursor[c] = j;
    }
  }
}

// Sorted copies of the updates that are not sorted (stably, so equal indices keep
// their order), held in the copies' storage.
struct SortedCopies {
  std::vector<std::vector<std::uint32_t>> indices;
  std::vector<std::vector<float>> values;

  void sort_unsorted(std::vector<SparseUpdate>& updates, const std::vector<UpdateCheck>& checks) {
    for (std::size_t c = 0; c < updates.size(); ++c) {
      if (checks[c].sorted) continue;
      SparseUpdate& u = updates[c];
      // Sorted by a copy of the keys: a comparator reading the caller's array, which
      // another thread may change meanwhile, could disagree with itself, and a sort given
      // an inconsistent order may read outside its range.
      const std::vector<std::uint32_t> keys(u.indices, u.indices + u.count);
      std::vector<std::size_t> order(u.count);
      std::iota(order.begin(), order.end(), std::size_t{0});
      std::stable_sort(order.begin(), order.end(), [&](std::size_t a, std::size_t b) { return keys[a] < keys[b]; });
      indices.emplace_back(u.count);
      values.emplace_back(u.count);
      for (std::size_t j = 0; j < u.count; ++j) {
        indices.back()[j] = keys[order[j]];
        values.back()[j] = u.values[order[j]];
      }
      u.indices = indices.back().data();
      u.values = values.back().data();
    }
  }
};

}  // namespace

std::vector<UpdateCheck> check_updates(const std::vector<SparseUpdate>& updates) {
  std::vector<UpdateCheck> out(updates.size());
  std::size_t total = 0;
  for (const auto& u : updates) total += u.count;
  parallel_for_sized(updates.size(), total, [&](std::size_t c) {
    const SparseUpdate& u = updates[c];
    std::uint32_t m = 0;
    bool sorted = true;
    for (std::size_t j = 0; j < u.count; ++j) {
      m = std::max(m, u.indices[j]);
      sorted &= j == 0 || u.indices[j] >= u.indices[j - 1];
    }
    out[c] = {m, sorted};
  });
  return out;
}

void scatter_add_many_any(float* acc, std::size_t n, std::vector<SparseUpdate> updates,
                          const std::vector<UpdateCheck>& checks) {
  SortedCopies copies;
  copies.sort_unsorted(updates, checks);
  scatter_add_many(acc, n, updates);
}

void scatter_add_each(const std::vector<float*>& accs, const std::vector<std::size_t>& sizes,
                      std::vector<SparseUpdate> updates, const std::vector<UpdateCheck>& checks) {
  SortedCopies copies;
  copies.sort_unsorted(updates, checks);
  // Tasks are runs of one accumulator's ranges, about kTaskEntries entries each, so a
  // model's few large tensors spread over the threads as well as its many small ones.
  struct Task {
    std::size_t which, r_begin, r_end;
  };
  std::vector<Task> tasks;
  std::size_t total = 0;
  for (std::size_t i = 0; i < accs.size(); ++i) {
    const std::size_t n_ranges = ceil_div(sizes[i], kRange);
    if (updates[i].count == 0 || n_ranges == 0) continue;
    const std::size_t parts = std::min(n_ranges, ceil_div(updates[i].count, kTaskEntries));
    for (std::size_t p = 0; p < parts; ++p) tasks.push_back({i, n_ranges * p / parts, n_ranges * (p + 1) / parts});
    total += updates[i].count;
  }
  parallel_for_sized(tasks.size(), total, [&](std::size_t t) {
    const Task& task = tasks[t];
    add_ranges(accs[task.which], sizes[task.which], {updates[task.which]}, task.r_begin, task.r_end);
  });
}

void scatter_add_many(float* acc, std::size_t n, const std::vector<SparseUpdate>& updates) {
  std::size_t total = 0;
  for (const auto& u : updates) total += u.count;
  const std::size_t n_ranges = ceil_div(n, kRange);
  // Each thread takes a contiguous run of ranges and walks every client's
  // sorted indices forward with its own cursor: one binary search per client
  // per thread instead of one per client per range (those searches miss the
  // cache and would cost as much as the additions). Any split gives every
  // element its additions in client order, so the sum is split-independent.
  const std::size_t parts = range_parts(total, n_ranges);
  parallel_for(parts, [&](std::size_t part) {
    add_ranges(acc, n, updates, n_ranges * part / parts, n_ranges * (part + 1) / parts);
  });
}

namespace {

// grid_point of every code c of `bits` bits: a code's value is its scale times this, the
// same bits as dequantize (one load per entry instead of a division).
const float* code_levels(int bits) {
  static const auto tables = [] {
    std::array<std::array<float, 256>, 9> t{};
    for (int b : {1, 2, 4, 8}) {
      const int levels = (1 << b) - 1;
      auto& row = t[static_cast<std::size_t>(b)];
      for (int c = 0; c <= levels; ++c) row[static_cast<std::size_t>(c)] = grid_point(c, levels);
    }
    return t;
  }();
  return tables[static_cast<std::size_t>(bits)].data();
}

// The code of entry i of a quantized stream of `bits`-bit codes (bits divides 8: no code
// straddles a byte).
inline unsigned code_at(const std::uint8_t* codes, std::uint64_t i, unsigned bits) {
  const std::uint64_t bit = i * bits;
  return (codes[bit >> 3] >> (bit & 7)) & ((1u << bits) - 1);
}

// Entry i's value as dequantize writes it (weight 1: the same bits): its scale times its
// code's level.
inline float code_value(float scale, const float* levels, unsigned code) { return 1.0f * (scale * levels[code]); }

// The scale of the entries of a quantized stream visited in ascending order: it changes at
// bucket edges only, found there, not divided out per entry.
class BucketScale {
 public:
  explicit BucketScale(const StreamUpdate& u) : scales_(u.scales), bucket_(u.bucket) {}
  float of(std::uint64_t i) {
    if (i >= end_) {
      const std::uint64_t b = i / bucket_;
      end_ = (b + 1) * bucket_;
      scale_ = scales_[b];
    }
    return scale_;
  }

 private:
  const float* scales_;
  std::uint64_t bucket_, end_ = 0;
  float scale_ = 0.0f;
};

// add_run_of for codes of B bits (a constant: the shifts and masks fold).
template <int B>
void add_coded_run(float* acc, const StreamUpdate& u, std::uint64_t at, const std::uint32_t* idx, unsigned count) {
  const float w = u.weight;
  const float* levels = code_levels(B);
  BucketScale scale(u);
  for (unsigned j = 0; j < count; ++j)
    acc[idx[j]] += w * code_value(scale.of(at + j), levels, code_at(u.values, at + j, B));
}

// acc[idx[j]] += w * (the value of entry at + j) for a run of count entries of stream u.
inline void add_run_of(float* acc, const StreamUpdate& u, std::uint64_t at, const std::uint32_t* idx, unsigned count) {
  const float w = u.weight;
  if (u.bits == 0) {
    const std::uint8_t* v = u.values + 4 * at;
    for (unsigned j = 0; j < count; ++j) {
      float x;
      std::memcpy(&x, v + 4 * j, 4);
      acc[idx[j]] += w * x;
    }
    return;
  }
  // The code width a constant in each loop: 8-15% less CPU time than a variable.
  with_constant<1, 2, 4, 8>(static_cast<unsigned>(u.bits), [&](auto b) {
    add_coded_run<static_cast<int>(decltype(b)::value)>(acc, u, at, idx, count);
  });
}

// add_ranges for streams: every stream's entries that fall in ranges [r_begin, r_end),
// range by range and stream by stream in list order, each stream started at its first
// range from its nearest checkpoint.
void add_stream_ranges(float* acc, std::size_t n, const std::vector<StreamUpdate>& updates, std::size_t r_begin,
                       std::size_t r_end, const float* divisor) {
  if (r_begin == r_end) return;
  std::vector<RiceCursor> cursors;
  cursors.reserve(updates.size());
  for (const auto& u : updates) cursors.push_back(u.indices->seek(std::uint64_t{r_begin} * kRange));
  const bool ahead = updates.size() == 1;  // as in add_ranges
  for (std::size_t r = r_begin; r < r_end; ++r) {
    const std::uint64_t hi = std::min<std::uint64_t>(n, std::uint64_t{r + 1} * kRange);
    for (std::size_t c = 0; c < updates.size(); ++c) {
      const StreamUpdate& u = updates[c];
      RiceCursor& cursor = cursors[c];
      if (ahead) {
        const float* levels = u.bits != 0 ? code_levels(u.bits) : nullptr;
        BucketScale scale(u);
        cursor.run_below_touching(
            hi, static_cast<unsigned>(kAhead),
            [&](std::uint64_t i, std::uint64_t x) {
              float v;
              if (levels == nullptr)
                std::memcpy(&v, u.values + 4 * i, 4);
              else
                v = code_value(scale.of(i), levels, code_at(u.values, i, static_cast<unsigned>(u.bits)));
              acc[x] += u.weight * v;
            },
            [&](std::uint64_t x) { prefetch_for_write(acc + x); });
        continue;
      }
      const std::uint64_t from = cursor.position();
      cursor.runs_below(
          hi, [&](std::uint64_t at, const std::uint32_t* idx, unsigned count) { add_run_of(acc, u, at, idx, count); });
      // The other streams are walked before this one comes back, in the next range: its
      // bits for about as many entries as this range took are asked for now, so that they
      // arrive meanwhile (100 top-1% streams, warm sums: about 4% less CPU time).
      if (r + 1 < r_end) cursor.prefetch(cursor.position() - from + 8);
    }
    if (divisor != nullptr) divide_run(acc + r * kRange, static_cast<std::size_t>(hi - r * kRange), *divisor);
  }
}

}  // namespace

// One sum: the same split as scatter_add_streams_each gives it.
void scatter_add_streams(float* acc, std::size_t n, const std::vector<StreamUpdate>& updates) {
  scatter_add_streams_each({StreamSum{acc, n, updates}});
}

void scatter_add_streams_each(const std::vector<StreamSum>& sums) {
  // As scatter_add_each: tasks are runs of one sum's ranges, about kTaskEntries entries
  // each, so a model's many small tensors and its few large ones spread over the threads.
  struct Task {
    std::size_t which, r_begin, r_end;
  };
  std::vector<Task> tasks;
  std::size_t total = 0;
  for (std::size_t i = 0; i < sums.size(); ++i) {
    std::size_t entries = 0;
    for (const auto& u : sums[i].updates) entries += static_cast<std::size_t>(u.indices->count());
    const std::size_t n_ranges = ceil_div(sums[i].n, kRange);
    if (n_ranges == 0) continue;
    if (entries == 0) {  // nothing to add; a mean still divides (what was there before)
      if (sums[i].divide_after) divide(sums[i].acc, sums[i].n, sums[i].divisor);
      continue;
    }
    // A task starts every stream of its sum at a checkpoint, decoding up to kCheckpointEvery
    // indices it does not add: it takes at least 8 times that per stream (100 clients' streams
    // cut into one task per range decoded 10 times what they added), and no more tasks than
    // threads (a sum is one pass over every stream).
    const std::size_t per_task =
        std::max(kTaskEntries, sums[i].updates.size() * 8 * static_cast<std::size_t>(RiceStream::kCheckpointEvery));
    const std::size_t parts =
        std::min({n_ranges, ceil_div(entries, per_task), static_cast<std::size_t>(num_threads())});
    for (std::size_t p = 0; p < parts; ++p) tasks.push_back({i, n_ranges * p / parts, n_ranges * (p + 1) / parts});
    total += entries;
  }
  parallel_for_sized(tasks.size(), total, [&](std::size_t t) {
    const Task& task = tasks[t];
    const StreamSum& sum = sums[task.which];
    add_stream_ranges(sum.acc, sum.n, sum.updates, task.r_begin, task.r_end, sum.divide_after ? &sum.divisor : nullptr);
  });
}

void divide(float* acc, std::size_t n, float divisor) {
  constexpr std::size_t kChunk = std::size_t{1} << 16;
  parallel_for_sized(ceil_div(n, kChunk), n, [&](std::size_t c) {
    const std::size_t begin = c * kChunk, end = std::min(n, begin + kChunk);
    divide_run(acc + begin, end - begin, divisor);
  });
}

}  // namespace fedpress
