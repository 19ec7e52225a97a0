#include "accumulate.hpp"

#include <algorithm>
#include <cstring>
#include <numeric>

#include "parallel.hpp"

namespace fedpress {
namespace {

// 2^15 floats = 128 KiB of accumulator per range: well inside a core's L2, so
// every client's additions to it hit cache (measured best among 2^13..2^19).
constexpr std::size_t kRange = std::size_t{1} << 15;

void add_run(float* acc, const std::uint32_t* idx, const float* val, std::size_t count, float w) {
  for (std::size_t j = 0; j < count; ++j) acc[idx[j]] += w * val[j];
}

// How many threads share the ranges of an n-element accumulator receiving `total` entries.
std::size_t range_parts(std::size_t total, std::size_t n_ranges) {
  return total < kParallelThreshold ? 1 : std::min<std::size_t>(n_ranges, static_cast<std::size_t>(num_threads()));
}

}  // namespace

std::size_t first_unsorted(const std::uint32_t* indices, std::size_t count) {
  for (std::size_t j = 1; j < count; ++j)
    if (indices[j] < indices[j - 1]) return j;
  return count;
}

std::uint32_t max_index(const std::uint32_t* indices, std::size_t count) {
  std::uint32_t m = 0;
  for (std::size_t j = 0; j < count; ++j) m = std::max(m, indices[j]);
  return m;
}

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
  std::vector<std::vector<std::uint32_t>> idx_copies;
  std::vector<std::vector<float>> val_copies;
  for (std::size_t c = 0; c < updates.size(); ++c) {
    if (checks[c].sorted) continue;
    SparseUpdate& u = updates[c];
    std::vector<std::size_t> order(u.count);
    std::iota(order.begin(), order.end(), std::size_t{0});
    std::stable_sort(order.begin(), order.end(),
                     [&](std::size_t a, std::size_t b) { return u.indices[a] < u.indices[b]; });
    idx_copies.emplace_back(u.count);
    val_copies.emplace_back(u.count);
    for (std::size_t j = 0; j < u.count; ++j) {
      idx_copies.back()[j] = u.indices[order[j]];
      val_copies.back()[j] = u.values[order[j]];
    }
    u.indices = idx_copies.back().data();
    u.values = val_copies.back().data();
  }
  scatter_add_many(acc, n, updates);
}

void scatter_add(float* acc, std::size_t n, const SparseUpdate& update) {
  if (first_unsorted(update.indices, update.count) != update.count) {
    add_run(acc, update.indices, update.values, update.count, update.weight);
    return;
  }
  scatter_add_many(acc, n, {update});
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
    const std::size_t r_begin = n_ranges * part / parts, r_end = n_ranges * (part + 1) / parts;
    if (r_begin == r_end) return;
    std::vector<std::size_t> cursor(updates.size());
    const std::uint32_t start = static_cast<std::uint32_t>(r_begin * kRange);
    for (std::size_t c = 0; c < updates.size(); ++c)
      cursor[c] = static_cast<std::size_t>(
          std::lower_bound(updates[c].indices, updates[c].indices + updates[c].count, start) - updates[c].indices);
    for (std::size_t r = r_begin; r < r_end; ++r) {
      // Indices are < n <= 2^32 - 1, so a range end of n needs 64 bits.
      const std::uint64_t hi = std::min<std::uint64_t>(n, std::uint64_t{r + 1} * kRange);
      for (std::size_t c = 0; c < updates.size(); ++c) {
        const SparseUpdate& u = updates[c];
        std::size_t j = cursor[c];
        const float w = u.weight;
        while (j < u.count && u.indices[j] < hi) {
          acc[u.indices[j]] += w * u.values[j];
          ++j;
        }
        cursor[c] = j;
      }
    }
  });
}

void scatter_add_streams(float* acc, std::size_t n, const std::vector<StreamUpdate>& updates) {
  std::size_t total = 0;
  for (const auto& u : updates) total += static_cast<std::size_t>(u.indices->count());
  const std::size_t n_ranges = ceil_div(n, kRange);
  // The same split as scatter_add_many: each thread starts every stream at its first
  // range from the stream's nearest checkpoint.
  const std::size_t parts = range_parts(total, n_ranges);
  parallel_for(parts, [&](std::size_t part) {
    const std::size_t r_begin = n_ranges * part / parts, r_end = n_ranges * (part + 1) / parts;
    if (r_begin == r_end) return;
    std::vector<RiceCursor> cursors;
    cursors.reserve(updates.size());
    for (const auto& u : updates) cursors.push_back(u.indices->seek(std::uint64_t{r_begin} * kRange));
    for (std::size_t r = r_begin; r < r_end; ++r) {
      const std::uint64_t hi = std::min<std::uint64_t>(n, std::uint64_t{r + 1} * kRange);
      for (std::size_t c = 0; c < updates.size(); ++c) {
        const std::uint8_t* values = updates[c].values;
        const float w = updates[c].weight;
        cursors[c].run_below(hi, [&](std::uint64_t i, std::uint64_t x) {
          float v;
          std::memcpy(&v, values + 4 * i, 4);
          acc[x] += w * v;
        });
      }
    }
  });
}

void divide(float* acc, std::size_t n, float divisor) {
  constexpr std::size_t kChunk = std::size_t{1} << 16;
  parallel_for_sized(ceil_div(n, kChunk), n, [&](std::size_t c) {
    const std::size_t begin = c * kChunk, end = std::min(n, begin + kChunk);
    for (std::size_t i = begin; i < end; ++i) acc[i] /= divisor;
  });
}

}  // namespace fedpress
