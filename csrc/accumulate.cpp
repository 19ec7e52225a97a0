#include "accumulate.hpp"

#include <algorithm>

#include "parallel.hpp"

namespace fedpress {
namespace {

// 2^17 floats = 512 KiB of accumulator per task: inside a core's L2 on current
// x86 parts, small enough that 200 tasks spread the work over any thread count.
constexpr std::size_t kRange = std::size_t{1} << 17;

void add_run(float* acc, const std::uint32_t* idx, const float* val, std::size_t count, float w) {
  for (std::size_t j = 0; j < count; ++j) acc[idx[j]] += w * val[j];
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
  parallel_for_sized(n_ranges, total, [&](std::size_t r) {
    const std::uint32_t lo = static_cast<std::uint32_t>(r * kRange);
    const std::size_t hi_sz = std::min(n, (r + 1) * kRange);
    for (const auto& u : updates) {
      // Sorted indices: the range's entries are one contiguous run.
      const std::uint32_t* first = std::lower_bound(u.indices, u.indices + u.count, lo);
      const std::uint32_t* last = first;
      if (hi_sz >= n) {
        last = u.indices + u.count;
      } else {
        last = std::lower_bound(first, u.indices + u.count, static_cast<std::uint32_t>(hi_sz));
      }
      const std::size_t off = static_cast<std::size_t>(first - u.indices);
      add_run(acc, first, u.values + off, static_cast<std::size_t>(last - first), u.weight);
    }
  });
}

}  // namespace fedpress
